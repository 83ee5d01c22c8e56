"""Tiny random Llama configs and models that build and run in milliseconds."""

from __future__ import annotations

import contextlib

import torch

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_LATENTS = dict(latent_attention_num_latents=16, latent_attention_num_heads=4, latent_attention_mlp_dim=96)


def tiny_encoder_config(**overrides):
    from llama_encoder import LlamaEncoderConfig

    values = {**TINY_LLAMA, **TINY_LATENTS, **overrides}
    return LlamaEncoderConfig(**values)


def tiny_encoder(seed: int = 0, **overrides):
    from llama_encoder import LlamaEncoderModel

    torch.manual_seed(seed)
    return LlamaEncoderModel(tiny_encoder_config(**overrides)).eval()


def tiny_bpe_tokenizer(corpus: list[str], chat_template: str | None = None, *, add_bos: bool = True):
    """A byte-level BPE fast tokenizer (like Llama 3's and SmolLM2's) trained on `corpus`; it adds a BOS token
    (like Llama 3's; with `add_bos=False` none, like SmolLM2's, so "" has no token), has no pad token, and ids 0, 1, 2
    are `<|pad|>`, `<|begin|>` (BOS) and `<|end|>` (EOS) as in TINY_LLAMA."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|begin|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus * 3, trainer)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        *([processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 1)])] if add_bos else []),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|end|>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


TINY_CORPUS = [
    "The cat sat on the mat.",
    "A dog ran in the park.",
    "Instruct: Given a query, retrieve relevant passages that answer the query\nQuery: where is the cat?",
    "Plants make sugar from light.",
]


def save_tiny_base(folder, *, seed: int = 0, lm_head_scale: float = 1.0, family: str = "llama", **overrides):
    """A sharded tiny causal-LM folder of `family` (LlamaForCausalLM by default; see TINY_FAMILIES) with a
    byte-level BPE tokenizer that has no pad token; returns it. `lm_head_scale` multiplies the LM head's weights
    (random ones give near-uniform logits); `overrides` go to the family's config."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_bpe_tokenizer(TINY_CORPUS)
    torch.manual_seed(seed)
    # Headroom in the vocabulary, as real models have: a family's tokenizer class may add its own special tokens
    # (Qwen2's loads with "<|endoftext|>").
    vocab_size = len(tokenizer) if family == "llama" else len(tokenizer) + 8
    config = tiny_family_config(family, vocab_size=vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    model.save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    return folder


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside the block (the previous count restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_padded_batch(lengths, padding_side: str, *, seed: int, width: int | None = None):
    """Random token ids (3 and up: no special tokens) for rows of `lengths`, padded to `width` (default the longest)
    on `padding_side`, with their attention mask: `(ids, mask)`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    width = max(lengths) if width is None else width
    ids = torch.full((len(lengths), width), TINY_LLAMA["pad_token_id"])
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        span = slice(0, length) if padding_side == "right" else slice(width - length, width)
        ids[row, span] = torch.randint(3, TINY_LLAMA["vocab_size"], (length,), generator=generator)
        mask[row, span] = 1
    return ids, mask


# Each decoder family's tiny config on top of TINY_LLAMA: what makes the family differ is switched on (Qwen2's q/k/v
# biases come with its layer; Qwen3's q/k norms likewise; a sliding window where the family has one).
TINY_FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"head_dim": 16},
    # Gemma3 defaults to head_dim 256; every second layer global here (its own default is every sixth).
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window_pattern": 2},
}
# A window shorter than the tests' inputs, on every layer (Mistral) or from layer 1 on (Qwen2's max_window_layers).
TINY_WINDOWS = {
    "mistral": {"sliding_window": 3},
    "qwen2": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    "gemma3_text": {"sliding_window": 6},  # bidirectional: |d| <= 3 on the local layers
}


def tiny_family_config(family: str, **overrides):
    """The stock transformers config of `family` (model_type) at TINY_LLAMA's sizes."""
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**TINY_LLAMA, **TINY_FAMILIES[family], **overrides})


def tiny_family_base(family: str, seed: int = 0, **overrides):
    """A random stock `<Family>Model` (causal, as published) at TINY_LLAMA's sizes, in eval mode."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_family_config(family, **overrides)).eval()


def tiny_family_encoder(family: str, seed: int = 0, pooling_mode: str = "mean", **overrides):
    """(stock base, LlamaEncoderModel with the base's weights): the encoder built as convert builds it, from the
    base's config (`weights.encoder.encoder_config`), loaded with every base tensor and nothing else."""
    from llama_encoder import LlamaEncoderModel
    from llama_encoder.weights.encoder import encoder_config

    base = tiny_family_base(family, seed, **overrides)
    config = encoder_config(base.config, pooling_mode=pooling_mode, dtype=torch.float32,
                            latent_sizes=TINY_LATENTS if pooling_mode == "latent_attention" else None)
    encoder = LlamaEncoderModel(config).eval()
    missing, unexpected = encoder.load_state_dict(base.state_dict(), strict=False)
    if unexpected or [name for name in missing if not name.startswith("latent_attention.")]:
        raise AssertionError(f"{family}: the encoder and the stock model disagree on weights: missing {missing}, "
                             f"unexpected {unexpected}")
    return base, encoder
