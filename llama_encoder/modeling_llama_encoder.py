"""A bidirectional Llama encoder with sentence pooling (a Hub file: imports only torch, transformers and
`configuration_llama_encoder`).

Classes follow the data: the decoder layer with causality switched off, the latent-attention pooling head,
pooling, then the model. Every token attends to every non-padding token on every attention backend, because the
mask is built here (padding only) and every attention module is constructed with `is_causal = False`; nothing is
toggled per call, so one model can serve several threads.

The decoder layers are the base family's own (`config.base_model_type`: Llama, Mistral, Qwen2 with q/k/v biases,
Qwen3 with q/k norms; `build_decoder_layer`), which share Llama's tensor names, rotary embedding and final norm.
Gemma3 also brings its own embedding (scaled by sqrt(hidden)), (1 + w) final norm and a rotary base per layer type,
all built from a stock `Gemma3TextConfig` (`gemma3_text_config`). A sliding window (Mistral, Qwen2
`use_sliding_window`, Gemma3's local layers) is applied on the family's sliding layers as stock transformers does for
a bidirectional model of that family: keys at most `attention_window(config)` positions away on either side.

Inference (eval mode, no autograd, sdpa attention, plain `nn.Linear` projections, no hooks, not under
torch.compile) takes a faster path with the same arithmetic per token: padding is dropped before the layers (every
product, norm and rotary runs on the real tokens only; only attention sees the padded layout), q/k/v and gate/up
run as one product each from fused copies of their weights (on CPU prepacked for oneDNN), and no mask is built
when a batch has no padding. Anything else (training, LoRA-wrapped projections, eager/flash attention,
`output_hidden_states`, a sliding window shorter than the batch, Gemma3) runs the stock decoder layers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import __version__ as _transformers_version
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils import logging

from .configuration_llama_encoder import (
    BASE_FAMILIES,
    LlamaEncoderConfig,
    attention_window,
    encoder_layer_types,
    gemma3_text_config,
)

logger = logging.get_logger(__name__)

try:  # transformers 5.x: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # transformers 4.x initialises only modules whose weights were missing
    _init = nn.init


def is_blank(text: str) -> bool:
    """Whether `text` is empty or whitespace only: nothing to embed, so its embedding is the zero vector."""
    return not text.strip()


def tokenize_for_encoder(
    tokenizer,
    texts: list[str],
    prompts: str | list[str] | None = None,
    *,
    max_length: int | None = None,
    append_eos: bool = False,
    return_tensors: str | None = "pt",
    padding: bool = True,
) -> BatchEncoding:
    """Tokenise `prompt + text` for each text and mark which tokens are pooled.

    The prompt (an instruction such as `"Instruct: ...\\nQuery: "`) is tokenised together with its text, as the
    model sees it, and a token is pooled from the first token that ends past the prompt's characters onwards.
    Counting the prompt's tokens on their own is wrong for byte-level BPE: `"Query: "` alone ends in a lone-space
    token that, joined to the text, merges into the text's first token. A fast tokenizer is required (offsets).

    With `append_eos`, the tokenizer's EOS token ends every input, also one cut at `max_length`. Rows are padded
    on the tokenizer's `padding_side` (with `padding=False`, they are returned as unpadded lists). Returns a
    `BatchEncoding` with `input_ids`, `attention_mask` and `pool_mask` (ready for `model(**batch)`); its attribute
    `num_truncated` counts the inputs cut at `max_length`, and one warning says how many were.

    A blank text (empty or whitespace only, `is_blank`) pools no token, whatever the prompt, BOS, EOS or whitespace
    tokens its row holds, so the model gives it the zero vector; one warning counts them. A text that is not blank
    but keeps no token to pool (its prompt fills `max_length`) raises ValueError before any work.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_for_encoder needs a fast tokenizer (offset mappings); load it with use_fast=True.")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token."
        )
    if isinstance(prompts, str) or prompts is None:
        prompts = [prompts or ""] * len(texts)
    if len(prompts) != len(texts):
        raise ValueError(f"Got {len(prompts)} prompts for {len(texts)} texts; pass one prompt, or one per text.")
    eos_id = tokenizer.eos_token_id
    if append_eos and eos_id is None:
        raise ValueError("append_eos=True needs a tokenizer with an EOS token; set tokenizer.eos_token first.")
    limit = None if max_length is None else max_length - int(append_eos)
    if limit is not None and limit < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text; use a larger max_length.")

    full = [prompt + text for prompt, text in zip(prompts, texts, strict=True)]
    encoded = tokenizer(full, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    too_long = [row for row, row_ids in enumerate(ids) if limit is not None and len(row_ids) > limit]
    if too_long:  # re-tokenise only those, so the tokenizer keeps any special tokens it adds at the end
        cut = tokenizer([full[row] for row in too_long], truncation=True, max_length=limit, return_offsets_mapping=True)
        for position, row in enumerate(too_long):
            ids[row], offsets[row] = cut["input_ids"][position], cut["offset_mapping"][position]
        logger.warning(
            "%d of %d inputs were longer than %d tokens and were truncated.", len(too_long), len(texts), max_length
        )

    rows, pooled, blank = [], [], 0
    for index, (row_ids, row_offsets, prompt, text) in enumerate(zip(ids, offsets, prompts, texts, strict=True)):
        row_ids = list(row_ids)
        # Special tokens before the text have end offset 0, so they count as part of the prompt.
        first = next((i for i, (_, end) in enumerate(row_offsets) if end > len(prompt)), len(row_ids)) if prompt else 0
        if is_blank(text):
            blank += 1
            first = len(row_ids) + 1  # nothing to pool, not even an appended EOS
        elif first >= len(row_ids):
            raise ValueError(
                f"Input {index} ({text[:40]!r}) has no token to pool: its prompt fills max_length ({max_length} "
                "tokens), or the tokenizer drops all of its text. Use a shorter prompt or a larger max_length, or "
                "remove the input."
            )
        if append_eos and (not row_ids or row_ids[-1] != eos_id):
            row_ids.append(eos_id)
        rows.append(row_ids)
        pooled.append([int(i >= first) for i in range(len(row_ids))])
    if blank:
        logger.warning("%d of %d inputs are empty or blank; each gets the zero vector as its embedding.", blank,
                       len(texts))

    if not padding:
        attention = [[1] * len(row) for row in rows]
        result = BatchEncoding({"input_ids": rows, "attention_mask": attention, "pool_mask": pooled})
    else:
        result = pad_for_encoder(
            rows, pooled, pad_token_id=tokenizer.pad_token_id, padding_side=tokenizer.padding_side,
            return_tensors=return_tensors,
        )
    result.num_truncated = len(too_long)
    return result


def pad_for_encoder(
    input_ids: list[list[int]],
    pool_masks: list[list[int]],
    *,
    pad_token_id: int,
    padding_side: str = "right",
    return_tensors: str | None = "pt",
) -> BatchEncoding:
    """Pad token rows (and their pool masks) to the longest row on `padding_side`; returns a `BatchEncoding` with
    `input_ids`, `attention_mask` and `pool_mask`. Lets a caller tokenise once (`tokenize_for_encoder(...,
    padding=False)`) and batch later, e.g. by length."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
    # At least one column: rows of blank texts may have no token at all, and decoder layers cannot reshape an empty
    # sequence. A row of padding only pools nothing (the zero vector).
    width = max([1, *map(len, input_ids)])
    batch = {"input_ids": [], "attention_mask": [], "pool_mask": []}
    for row_ids, row_pool in zip(input_ids, pool_masks, strict=True):
        pad = width - len(row_ids)
        values = (list(row_ids), [1] * len(row_ids), list(row_pool))
        fills = (pad_token_id, 0, 0)
        for key, value, fill in zip(batch, values, fills, strict=True):
            batch[key].append(value + [fill] * pad if padding_side == "right" else [fill] * pad + value)
    return BatchEncoding(batch, tensor_type=return_tensors)


class ModifiedLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose self-attention is bidirectional (`is_causal = False`), set once at build."""

    def __init__(self, config: LlamaEncoderConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn.is_causal = False


def build_decoder_layer(config: LlamaEncoderConfig, layer_idx: int, family_config=None) -> nn.Module:
    """Decoder layer `layer_idx` of the base family (`config.base_model_type`), its self-attention made
    bidirectional once, at build: a `ModifiedLlamaDecoderLayer` for Llama, else the family's own transformers layer
    (Mistral, Qwen2 with its q/k/v biases, Qwen3 with its q/k norms, which take the same inputs; Gemma3's, built from
    `family_config`, the stock `Gemma3TextConfig` of `config`, made here when not given)."""
    family = getattr(config, "base_model_type", "llama")
    if family == "llama":
        return ModifiedLlamaDecoderLayer(config, layer_idx)
    if family == "gemma3_text":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

        layer = Gemma3DecoderLayer(family_config or gemma3_text_config(config), layer_idx)
        layer.self_attn.is_causal = False
        return layer
    if family == "mistral":
        from transformers.models.mistral.modeling_mistral import MistralDecoderLayer as layer_class
    elif family == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer as layer_class
    elif family == "qwen3":
        from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer as layer_class
    else:
        raise ValueError(f"Unknown base_model_type {family!r}; expected one of {', '.join(BASE_FAMILIES)}.")
    layer = layer_class(config, layer_idx)
    layer.self_attn.is_causal = False
    return layer


class LatentAttentionPooling(nn.Module):
    """NV-Embed's latent attention layer: token states are the queries against a trainable latent array that
    supplies keys and values (multi-head cross-attention, pre-LayerNorm on both sides, residual), then a GELU-gated
    MLP with a residual. Each token is processed independently of the others, so padding cannot change a real
    token's output; the masked mean over the pool mask happens in `pool`.
    """

    def __init__(self, config: LlamaEncoderConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.latent_attention_num_heads
        self.head_dim = config.latent_head_dim
        inner = self.num_heads * self.head_dim
        mlp_dim = config.latent_mlp_dim

        self.latents = nn.Parameter(torch.empty(config.latent_attention_num_latents, hidden))
        self.query_norm = nn.LayerNorm(hidden)
        self.latent_norm = nn.LayerNorm(hidden)
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.kv_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden)
        self.mlp_norm = nn.LayerNorm(hidden)
        self.mlp_in = nn.Linear(hidden, 2 * mlp_dim)
        self.mlp_out = nn.Linear(mlp_dim, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        query = self.q_proj(self.query_norm(hidden_states))
        query = query.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        key, value = self.kv_proj(self.latent_norm(self.latents)).chunk(2, dim=-1)
        key = key.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        value = value.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).reshape(batch, seq_len, -1)
        hidden_states = hidden_states + self.o_proj(attended)

        value_part, gate = self.mlp_in(self.mlp_norm(hidden_states)).chunk(2, dim=-1)
        return hidden_states + self.mlp_out(value_part * F.gelu(gate))


def _masked_mean(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return torch.einsum("bs,bsh->bh", weights, hidden_states)


def pool(
    hidden_states: torch.Tensor,
    pool_mask: torch.Tensor,
    pooling_mode: str,
    latent_attention: LatentAttentionPooling | None = None,
) -> torch.Tensor:
    """Reduce token states `(batch, seq, hidden)` to one float32 vector per row over the tokens where
    `pool_mask` is 1. `pool_mask` is the attention mask with instruction tokens (and padding) zeroed. A row that
    pools no token (a blank text: see `tokenize_for_encoder`) gets the zero vector, whatever its states hold."""
    pool_mask = pool_mask.to(hidden_states.device)
    weights = pool_mask.float()
    empty = (weights.sum(dim=1) == 0)[:, None]
    if pooling_mode == "latent_attention":
        if latent_attention is None:
            raise ValueError("pooling_mode 'latent_attention' needs the model's latent attention head.")
        return _masked_mean(latent_attention(hidden_states).float(), weights).masked_fill(empty, 0.0)
    states = hidden_states.float()
    if pooling_mode == "mean":
        pooled = _masked_mean(states, weights)
    elif pooling_mode == "weighted_mean":
        # 1..n over the n pooled tokens, wherever they sit in the row (left or right padding alike).
        pooled = _masked_mean(states, torch.cumsum(weights, dim=1) * weights)
    elif pooling_mode in ("eos", "last_token", "bos"):
        positions = torch.arange(weights.shape[1], device=weights.device)
        if pooling_mode == "bos":
            index = torch.where(weights > 0, positions, weights.shape[1]).amin(dim=1).clamp(max=weights.shape[1] - 1)
        else:
            index = torch.where(weights > 0, positions, -1).amax(dim=1).clamp(min=0)
        pooled = states[torch.arange(states.shape[0], device=states.device), index]
    else:
        raise ValueError(f"Unknown pooling_mode {pooling_mode!r}.")
    # masked_fill, not a product: a row of padding only may hold non-finite states on some attention kernels
    return pooled.masked_fill(empty, 0.0)


def window_binds(window: int | None, seq_len: int) -> bool:
    """Whether a bidirectional sliding window of `window` hides any token of a `seq_len`-token row: a query sees
    the keys at most `window` positions away on either side (stock transformers' bidirectional window)."""
    return window is not None and seq_len - 1 > window


def bidirectional_attention_mask(
    attention_mask: torch.Tensor | None,
    attn_implementation: str,
    dtype: torch.dtype,
    *,
    window: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | object | None:
    """The mask each attention backend expects, or `None` when every token may see every token.

    Without `window` the mask is padding only (`None` when nothing is padded: the attention modules are not
    causal). With `window`, a query also sees only the keys whose positions (`position_ids`, which count real tokens,
    so left and right padding agree) are at most `window` away, on either side: the bidirectional sliding window
    stock transformers builds (`create_bidirectional_sliding_window_mask`) for Mistral and Qwen2 configs.
    """
    if attention_mask is None:
        raise ValueError("bidirectional_attention_mask needs the 2D attention_mask (1 = token, 0 = padding).")
    batch, seq_len = attention_mask.shape
    windowed = window_binds(window, seq_len)
    if not windowed and bool(attention_mask.all()):
        return None
    keep = attention_mask.bool()
    # A row of padding only (a blank text with no token) attends to its padding: never pooled, but finite, where
    # sdpa's memory-efficient CUDA kernel gives NaN for a query that sees no key (pytorch#110213; transformers'
    # _unmask_unattended does the same).
    keep = keep | ~keep.any(dim=1, keepdim=True)
    if windowed:
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        positions = position_ids.expand(batch, seq_len)
        near = (positions[:, :, None] - positions[:, None, :]).abs() <= window  # (batch, query, key)
    if "flash" in attn_implementation:
        if windowed:
            raise ValueError(
                f"A sliding window of {window} tokens shorter than the input ({seq_len} tokens) cannot run on "
                f"{attn_implementation} in the encoder; load it with attn_implementation='sdpa' or 'eager', or keep "
                f"inputs to at most {window + 1} tokens."
            )
        return attention_mask  # flash kernels unpad from the 2D mask themselves
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        if windowed:

            def keep_key(b, h, q_idx, kv_idx):
                return keep[b, kv_idx] & near[b, q_idx, kv_idx]

        else:

            def keep_key(b, h, q_idx, kv_idx):
                return keep[b, kv_idx]

        return create_block_mask(keep_key, batch, None, seq_len, seq_len, device=keep.device)
    expanded = keep[:, None, None, :].expand(batch, 1, seq_len, seq_len)
    if windowed:
        expanded = expanded & near[:, None]
    if attn_implementation == "sdpa":
        return expanded  # boolean: valid whatever dtype autocast gives the queries
    return torch.zeros(expanded.shape, dtype=dtype, device=keep.device).masked_fill(
        ~expanded, torch.finfo(dtype).min
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight reordered into oneDNN's blocked layout for `torch.ops.mkldnn._linear_pointwise`, or None where
    that is unavailable (no oneDNN, not on CPU, another dtype). On an AMD EPYC (AVX-512) this ran the float32
    products of SmolLM2's shapes about 1.5x faster than `F.linear` (MKL); bfloat16 already goes through oneDNN."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _project(states: torch.Tensor, weights: tuple) -> torch.Tensor:
    weight, bias, packed = weights
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(states, packed, bias, "none", [], "")
    return F.linear(states, weight, bias)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None))


def _fast_path_layer_ok(layer: nn.Module) -> bool:
    """A decoder layer the fast path can run: stock attention/MLP made of plain nn.Linear (not LoRA-wrapped), with
    real weights (not offloaded to meta) and no forward hooks anywhere in it."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not hasattr(mlp, "act_fn"):
        return False
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma3's four norms per layer: the stock layer only
        return False
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if any(type(linear) is not nn.Linear or linear.weight.device.type == "meta" for linear in linears):
        return False
    return not any(_has_hooks(module) for module in layer.modules())


@dataclass
class LlamaEncoderOutput(ModelOutput):
    """`last_hidden_state`: token states `(batch, seq, hidden)`; `pooler_output`: sentence embeddings
    `(batch, hidden)` in float32, L2-normalised when the config says so; `hidden_states`: per-layer states when
    asked for."""

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class LlamaEncoderModel(LlamaPreTrainedModel):
    """A Llama model built from `ModifiedLlamaDecoderLayer`s, with pooling. Loads plain `LlamaModel` and
    `LlamaForCausalLM` weights; only the latent-attention head (when used) is newly initialised."""

    config_class = LlamaEncoderConfig
    config: LlamaEncoderConfig
    _no_split_modules = ["ModifiedLlamaDecoderLayer", *(layer for _, layer in BASE_FAMILIES.values())]
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]
    fuse_projections: bool = True
    """Inference runs q/k/v and gate/up as one product each, from copies of the layer weights made on first use
    (and remade when a weight changes): fused, and on CPU prepacked for oneDNN. More speed for more memory: the
    decoder layers' weights are held twice. Set False on the model (or the class) to keep one copy; the fast path
    then runs the stock products one by one."""
    fuse_projections_max_bytes: int = 2 * 1024**3
    """The copies are made only while the decoder layers' projection weights take at most this many bytes (2 GiB:
    about 0.5B parameters in float32, 1B in bfloat16); a larger model keeps one copy of its weights and runs the
    unpadded fast path with the stock products. Raise it on the model to trade the memory for the speed."""

    def __init__(self, config: LlamaEncoderConfig):
        super().__init__(config)
        self._fused_cache: dict[int, tuple] = {}
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        family = gemma3_text_config(config) if config.base_model_type == "gemma3_text" else None
        self.family_config = family
        if family is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm, Gemma3TextScaledWordEmbedding

            self.embed_tokens = Gemma3TextScaledWordEmbedding(
                config.vocab_size, config.hidden_size, self.padding_idx, embed_scale=config.hidden_size**0.5
            )
            self.norm = Gemma3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(
            [build_decoder_layer(config, layer_idx, family) for layer_idx in range(config.num_hidden_layers)]
        )
        self.layer_types = encoder_layer_types(config)
        self.build_computed_buffers()
        self.latent_attention = (
            LatentAttentionPooling(config) if config.pooling_mode == "latent_attention" else None
        )
        self.gradient_checkpointing = False
        self.post_init()

    def build_computed_buffers(self) -> None:
        """(Re)build what is computed from the config rather than stored (e.g. after loading a state dict onto a
        model made on the meta device): the rotary embeddings, one for every family, Gemma3's with a base per layer
        type (transformers 5.x) or a second module for the local layers' base (`rotary_emb_local`, transformers
        4.57, whose Gemma3 layer takes both); and Gemma3's embedding scale."""
        family = self.family_config
        if family is None:
            self.rotary_emb = LlamaRotaryEmbedding(config=self.config)
            self._two_rope_layers = False
            return
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        device = self.embed_tokens.weight.device
        device = None if device.type == "meta" else device
        self.embed_tokens.register_buffer(
            "embed_scale", torch.tensor(self.config.hidden_size**0.5, device=device), persistent=False
        )
        self.rotary_emb = Gemma3RotaryEmbedding(config=family, device=device)
        # transformers 4.x: Gemma3's layer takes the global and local rotary pairs (one rotary base per module)
        self._two_rope_layers = int(_transformers_version.split(".")[0]) < 5
        if self._two_rope_layers:  # the global module reads rope_theta / rope_scaling, the local one its own copy
            local = type(family)(**{**family.to_dict(), "rope_theta": family.rope_local_base_freq,
                                    "rope_scaling": {"rope_type": "default"}})
            self.rotary_emb_local = Gemma3RotaryEmbedding(config=local, device=device)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LatentAttentionPooling):
            _init.normal_(module.latents, mean=0.0, std=self.config.initializer_range)
        elif self.family_config is not None:  # Gemma3's computed buffers (made on the meta device by transformers 5.x)
            name = type(module).__name__
            if name == "Gemma3RMSNorm":
                _init.zeros_(module.weight)  # (1 + w): zero is the identity scale
            elif name == "Gemma3TextScaledWordEmbedding" and hasattr(module, "scalar_embed_scale"):
                _init.constant_(module.embed_scale, module.scalar_embed_scale)
            elif name == "Gemma3RotaryEmbedding" and hasattr(module, "layer_types"):
                for layer_type in module.layer_types:
                    init_fn = module.compute_default_rope_parameters
                    if module.rope_type[layer_type] != "default":
                        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                        init_fn = ROPE_INIT_FUNCTIONS[module.rope_type[layer_type]]
                    inv_freq, _ = init_fn(module.config, layer_type=layer_type)
                    _init.copy_(getattr(module, f"{layer_type}_inv_freq"), inv_freq)
                    _init.copy_(getattr(module, f"{layer_type}_original_inv_freq"), inv_freq)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def pool(self, hidden_states: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings from token states with the configured pooling mode and normalisation."""
        pooled = pool(hidden_states, pool_mask, self.config.pooling_mode, self.latent_attention)
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize_embeddings else pooled

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LlamaEncoderOutput | tuple:
        """Encode a batch. `attention_mask` marks real tokens (1) and padding (0), on either side;
        `pool_mask` (defaults to `attention_mask`) marks the tokens that are pooled, so an instruction can be
        attended to but not pooled. Positions count real tokens only, so left and right padding agree."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        for unsupported in ("past_key_values", "cache", "use_cache", "is_causal"):
            kwargs.pop(unsupported, None)  # an encoder has no cache and is never causal
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq_len, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (batch, seq_len):
            raise ValueError(
                f"attention_mask must have shape (batch, seq) = {(batch, seq_len)}; got {tuple(attention_mask.shape)}."
            )
        if pool_mask is None:
            pool_mask = attention_mask
        elif pool_mask.shape != attention_mask.shape:
            raise ValueError(
                f"pool_mask must have the shape of attention_mask {tuple(attention_mask.shape)}; "
                f"got {tuple(pool_mask.shape)}."
            )
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        if seq_len == 0:  # blank texts only, tokenised to nothing (no BOS): nothing to attend to, nothing to pool
            pooled = inputs_embeds.new_zeros(batch, inputs_embeds.shape[-1], dtype=torch.float32)
            output = LlamaEncoderOutput(last_hidden_state=inputs_embeds, pooler_output=pooled)
            return output.to_tuple() if return_dict is False else output

        window = attention_window(self.config)
        if self._can_take_fast_path(output_hidden_states, kwargs) and not window_binds(window, seq_len):
            hidden_states = self._fast_layers(inputs_embeds, attention_mask, position_ids)
            output = LlamaEncoderOutput(
                last_hidden_state=hidden_states, pooler_output=self.pool(hidden_states, pool_mask)
            )
            return output.to_tuple() if return_dict is False else output

        implementation = self.config._attn_implementation
        masks = {"full_attention": bidirectional_attention_mask(attention_mask, implementation, inputs_embeds.dtype)}
        if window is not None:
            masks["sliding_attention"] = bidirectional_attention_mask(
                attention_mask, implementation, inputs_embeds.dtype, window=window, position_ids=position_ids
            )
        hidden_states = inputs_embeds
        rotary = self._position_embeddings(hidden_states, position_ids)
        all_hidden_states = [] if output_hidden_states else None
        for layer, layer_type in zip(self.layers, self.layer_types, strict=True):
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            if self._two_rope_layers:
                positional = {"position_embeddings_global": rotary["full_attention"],
                              "position_embeddings_local": rotary["sliding_attention"]}
            else:
                positional = {"position_embeddings": rotary[layer_type]}
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer_type],
                position_ids=position_ids,
                **positional,
                **kwargs,
            )
            if isinstance(hidden_states, tuple):  # older decoder layers return (hidden_states, ...)
                hidden_states = hidden_states[0]
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)

        output = LlamaEncoderOutput(
            last_hidden_state=hidden_states,
            pooler_output=self.pool(hidden_states, pool_mask),
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )
        return output.to_tuple() if return_dict is False else output

    def _position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """The rotary (cos, sin) per layer type: one pair for every layer, except Gemma3's global and local bases."""
        if self.family_config is None:
            shared = self.rotary_emb(hidden_states, position_ids)
            return {"full_attention": shared, "sliding_attention": shared}
        if self._two_rope_layers:
            return {"full_attention": self.rotary_emb(hidden_states, position_ids),
                    "sliding_attention": self.rotary_emb_local(hidden_states, position_ids)}
        return {kind: self.rotary_emb(hidden_states, position_ids, kind) for kind in self.rotary_emb.layer_types}

    def __getstate__(self) -> dict:
        # The fused copies are a cache (prepacked oneDNN tensors cannot be copied or pickled): copies start empty.
        return {**super().__getstate__(), "_fused_cache": {}}

    def _can_take_fast_path(self, output_hidden_states, kwargs) -> bool:
        if self.training or torch.is_grad_enabled() or output_hidden_states or kwargs:
            return False
        if torch.compiler.is_compiling():  # the stock layers are what torch.compile is known to trace
            return False
        if self.config._attn_implementation != "sdpa" or _has_hooks(self):
            return False
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return False
        return all(_fast_path_layer_ok(layer) for layer in self.layers)

    def _decoder_weight_bytes(self) -> int:
        """What the fused copies would cost: the bytes of the decoder layers' projection weights."""
        return sum(
            linear.weight.numel() * linear.weight.element_size()
            for layer in self.layers
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        )

    def _fused_weights(self, index: int, layer: nn.Module) -> tuple | None:
        """A layer's products as (weight, bias, packed) for qkv, o, gate-up and down: q/k/v and gate/up concatenated,
        each weight also prepacked for oneDNN on CPU (`_pack_for_cpu`). Made once and cached; remade when any
        source weight is replaced or changed in place (its data pointer or version moves)."""
        if not self.fuse_projections:
            return None
        if self._decoder_weight_bytes() > self.fuse_projections_max_bytes:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        parts = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        key = tuple(
            (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)
            for linear in parts
            for tensor in (linear.weight, linear.bias)
            if tensor is not None
        )
        cached = self._fused_cache.get(index)
        if cached is None or cached[0] != key:

            def product(*linears):
                weight = torch.cat([linear.weight.detach() for linear in linears])
                bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
                packed = _pack_for_cpu(weight)
                return (weight if packed is None else None), bias, packed  # one extra copy, not two

            cached = (key, product(*parts[:3]), product(parts[3]), product(*parts[4:6]), product(parts[6]))
            self._fused_cache[index] = cached
        return cached[1:]

    def _fast_layers(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """The decoder layers and final norm over the real tokens only: same per-token arithmetic as the stock
        layers (their own norms, weights and activation; rotary as `apply_rotary_pos_emb`; sdpa attention over a
        padding-only mask, or none when nothing is padded). Returns `(batch, seq, hidden)` with zeros at padding."""
        config = self.config
        batch, seq_len, hidden = inputs_embeds.shape
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = self.layers[0].self_attn.head_dim
        keep = attention_mask.bool()
        padded = not bool(keep.all())
        states = inputs_embeds.reshape(batch * seq_len, hidden)
        positions = position_ids.expand(batch, seq_len).reshape(1, batch * seq_len)
        mask = None
        if padded:
            index = keep.reshape(-1).nonzero().squeeze(1)
            states, positions = states.index_select(0, index), positions.index_select(1, index)
            mask = keep[:, None, None, :].expand(batch, 1, seq_len, seq_len)
        # sdpa takes the grouped key/value heads as they are (`enable_gqa`: no copies, the same arithmetic), except
        # with a mask off CPU, where that falls back to the math kernel: there they are repeated, as transformers' sdpa
        # does with a mask.
        groups = heads // kv_heads
        repeat_heads = padded and groups > 1 and inputs_embeds.device.type != "cpu"
        tokens = states.shape[0]
        cos, sin = self.rotary_emb(states[None], positions)
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (tokens, 1, head_dim): one row per real token

        def to_batch(x: torch.Tensor, num_heads: int) -> torch.Tensor:  # (tokens, h, d) -> (batch, h, seq, d)
            if padded:
                full = x.new_zeros(batch * seq_len, num_heads, head_dim)
                full[index] = x
                x = full
            return x.view(batch, seq_len, num_heads, head_dim).transpose(1, 2)

        for layer_index, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            fused = self._fused_weights(layer_index, layer)
            residual = states
            normed = layer.input_layernorm(states)
            if fused is not None:
                query, key, value = _project(normed, fused[0]).split(
                    [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1
                )
            else:
                query, key, value = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
            query = query.view(tokens, heads, head_dim)
            key = key.view(tokens, kv_heads, head_dim)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm of q and k, before rotary
                query, key = attn.q_norm(query), attn.k_norm(key)
            query = (query * cos) + (_rotate_half(query) * sin)
            key = (key * cos) + (_rotate_half(key) * sin)
            query, key = to_batch(query, heads), to_batch(key, kv_heads)
            value = to_batch(value.view(tokens, kv_heads, head_dim), kv_heads)
            if repeat_heads:
                key = key[:, :, None].expand(batch, kv_heads, groups, seq_len, head_dim)
                key = key.reshape(batch, heads, seq_len, head_dim)
                value = value[:, :, None].expand(batch, kv_heads, groups, seq_len, head_dim)
                value = value.reshape(batch, heads, seq_len, head_dim)
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=attn.scaling, enable_gqa=heads != kv_heads and not repeat_heads
            )
            attended = attended.transpose(1, 2).reshape(batch * seq_len, heads * head_dim)
            if padded:
                attended = attended.index_select(0, index)
            states = residual + (_project(attended, fused[1]) if fused is not None else attn.o_proj(attended))

            residual = states
            normed = layer.post_attention_layernorm(states)
            if fused is not None:
                gate, up = _project(normed, fused[2]).chunk(2, dim=-1)
                states = residual + _project(mlp.act_fn(gate) * up, fused[3])
            else:
                gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
                states = residual + mlp.down_proj(mlp.act_fn(gate) * up)

        states = self.norm(states)
        if padded:
            full = states.new_zeros(batch * seq_len, hidden)
            full[index] = states
            states = full
        return states.view(batch, seq_len, hidden)


__all__ = [
    "LatentAttentionPooling",
    "LlamaEncoderModel",
    "LlamaEncoderOutput",
    "ModifiedLlamaDecoderLayer",
    "bidirectional_attention_mask",
    "build_decoder_layer",
    "is_blank",
    "pad_for_encoder",
    "pool",
    "tokenize_for_encoder",
    "window_binds",
]
