"""The model a training run optimises: the base LLM as a bidirectional `LlamaEncoderModel` (earlier adapters, such
as the MNTP one, merged in first, by the same float32 merge `convert` uses), LoRA from peft on its projections, the
latent-attention head trainable when that is the pooling, and, for MNTP, the base's frozen LM head.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..errors import InputError
from ..modeling_llama_encoder import LlamaEncoderModel
from ..weights.base_model import BaseModel, resolve_base
from ..weights.encoder import encoder_config
from ..weights.lora import read_adapter, validate_adapter_against
from ..weights.merge import merged_state_dict
from ..weights.names import LM_HEAD_NAME
from .arguments import DEFAULT_TARGET_MODULES

logger = logging.getLogger(__name__)


@dataclass
class TrainingModel:
    """`peft_model` wraps `encoder` (LoRA layers are injected into `encoder` itself, so calling `encoder` runs the
    adapted model); `lm_head` is set for MNTP only."""

    peft_model: PeftModel
    encoder: LlamaEncoderModel
    tokenizer: object
    base: BaseModel
    merged_adapters: list[str] = field(default_factory=list)
    lm_head: nn.Linear | None = None

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trained tensor, in a fixed order (LoRA pairs, then the latent head)."""
        return [(name, p) for name, p in self.peft_model.named_parameters() if p.requires_grad]


def load_training_model(
    *,
    base: str | None = None,
    gguf: str | os.PathLike | None = None,
    adapters: list[str | os.PathLike] | tuple = (),
    pooling: str = "mean",
    latent_sizes: dict | None = None,
    with_lm_head: bool = False,
    lora_r: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.05,
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
    attention_dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
    init_seed: int = 0,
) -> TrainingModel:
    """Build the model to train. `adapters` (e.g. the MNTP adapter before SimCSE) are validated against the base
    and merged into its weights in float32, rounded once to `dtype` (`weights.merge`: the model `convert` writes
    from the same adapters); a fresh LoRA adapter (`lora_r`, `lora_alpha`, `lora_dropout` on `target_modules`) is
    added on top. Frozen weights are kept in `dtype`; LoRA and the latent head in float32. LoRA and the latent head
    are initialised from `init_seed`, identically in every process."""
    unknown = sorted(set(target_modules) - set(DEFAULT_TARGET_MODULES))
    if unknown:
        raise InputError(f"Unknown LoRA target module(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(DEFAULT_TARGET_MODULES)}.")
    source = resolve_base(base=base, gguf=gguf, cache_dir=Path(cache_dir) if cache_dir else None)
    loaded = [read_adapter(path) for path in adapters]
    shapes = source.weight_shapes()
    for adapter in loaded:
        validate_adapter_against(adapter, source.config.to_dict(), shapes)

    config = encoder_config(source.config, pooling_mode=pooling, latent_sizes=latent_sizes, dtype=dtype)
    config.attention_dropout = attention_dropout
    config._attn_implementation = attn_implementation
    lm_head_weight = source.read_tensor(LM_HEAD_NAME) if with_lm_head else None
    state = merged_state_dict(source.tensor_source(consume=True), loaded, dtype=dtype)
    source.state_dict = None  # consumed into `state`
    if with_lm_head and lm_head_weight is None:
        lm_head_weight = state["embed_tokens.weight"]  # tied embeddings (SmolLM2, Llama 3.2)

    torch.manual_seed(init_seed)
    encoder = LlamaEncoderModel(config)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith("latent_attention.")]
    if missing or unexpected:
        raise InputError(f"The base's weights do not fit a Llama encoder: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}.")
    del state
    encoder.to(device=device, dtype=dtype)
    if encoder.latent_attention is not None:
        encoder.latent_attention.float()  # trained in float32 like the LoRA weights
    encoder.config._name_or_path = source.name
    if gradient_checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # A pattern over the decoder layers only: the latent-attention head has q_proj/o_proj too, and is trained
    # in full, not through LoRA.
    pattern = rf"layers\.\d+\.(self_attn|mlp)\.({'|'.join(target_modules)})"
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=pattern,
                      bias="none")
    peft_model = get_peft_model(encoder, lora)  # LoRA weights in float32 (peft's autocast_adapter_dtype)
    if encoder.latent_attention is not None:
        encoder.latent_attention.requires_grad_(True)

    lm_head = None
    if with_lm_head:
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        lm_head.weight = nn.Parameter(lm_head_weight.to(device=device, dtype=dtype), requires_grad=False)
    trainable = sum(p.numel() for _, p in peft_model.named_parameters() if p.requires_grad)
    logger.info("Training %s trainable parameters on %s (%d earlier adapter(s) merged)", f"{trainable:,}",
                source.name, len(loaded))
    return TrainingModel(peft_model=peft_model, encoder=encoder, tokenizer=source.tokenizer, base=source,
                         merged_adapters=[str(a.path) for a in loaded], lm_head=lm_head)


def resolve_mask_token(tokenizer, mask_token: str | None) -> int:
    """The id MNTP masks with: `mask_token` (must be one token), else the tokenizer's mask token, else `_` as
    LLM2Vec used for Llama."""
    if mask_token is None and tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    token = mask_token or "_"
    ids = tokenizer.convert_tokens_to_ids(token)
    if isinstance(ids, int) and ids != tokenizer.unk_token_id and ids is not None:
        return ids
    encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise InputError(f"The mask token {token!r} is {len(encoded)} tokens for this tokenizer; pass --mask-token "
                         "with a string that is a single token.")
    return encoded[0]


__all__ = ["TrainingModel", "load_training_model", "resolve_mask_token"]
