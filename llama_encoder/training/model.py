"""The model a training run optimises: the base LLM as a bidirectional `LlamaEncoderModel` (earlier adapters, such
as the MNTP one, merged in first), LoRA from peft on its projections, the latent-attention head trainable when that
is the pooling, and, for MNTP, the base's frozen LM head.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

from ..conversion_scripts.base_model import BaseModel, resolve_base
from ..conversion_scripts.convert import encoder_config, source_weight_shapes
from ..conversion_scripts.lora import LoraAdapter, read_adapter, validate_adapter_against
from ..conversion_scripts.streaming import normalize_base_key
from ..modeling_llama_encoder import LlamaEncoderModel

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def _base_tensors(source: BaseModel):
    """(original name, tensor) for every tensor of the base, from its safetensors files or its state dict."""
    if source.safetensors_files:
        for file in source.safetensors_files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
    else:
        yield from source.state_dict.items()


def _load_weights(source: BaseModel, adapters: list[LoraAdapter]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The encoder's state dict with `adapters` merged in order, and the LM head weight (the input embeddings
    when the base ties them)."""
    state, lm_head = {}, None
    for key, tensor in _base_tensors(source):
        if key.startswith("lm_head."):
            lm_head = tensor
            continue
        name = normalize_base_key(key)
        if name is None:
            continue
        for adapter in adapters:
            tensor = adapter.merge_into(name, tensor)
        state[name] = tensor
    if lm_head is None:
        lm_head = state["embed_tokens.weight"]  # tied embeddings (SmolLM2, Llama 3.2)
    return state, lm_head


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
    and merged into its weights; a fresh LoRA adapter (`lora_r`, `lora_alpha`, `lora_dropout` on
    `target_modules`) is added on top. Frozen weights are kept in `dtype`; LoRA and the latent head in float32.
    LoRA and the latent head are initialised from `init_seed`, identically in every process."""
    source = resolve_base(base=base, gguf=gguf, cache_dir=Path(cache_dir) if cache_dir else None)
    loaded = [read_adapter(path) for path in adapters]
    shapes = source_weight_shapes(source)
    for adapter in loaded:
        validate_adapter_against(adapter, source.config.to_dict(), shapes)
    unknown = sorted(set(target_modules) - set(DEFAULT_TARGET_MODULES))
    if unknown:
        raise ValueError(f"Unknown LoRA target module(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(DEFAULT_TARGET_MODULES)}.")

    config = encoder_config(source, pooling, dict(latent_sizes or {}), dtype, None)
    config.attention_dropout = attention_dropout
    config._attn_implementation = attn_implementation
    state, lm_head_weight = _load_weights(source, loaded)
    source.state_dict = None  # now held by `state`

    torch.manual_seed(init_seed)
    encoder = LlamaEncoderModel(config)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith("latent_attention.")]
    if missing or unexpected:
        raise ValueError(f"The base's weights do not fit a Llama encoder: missing {missing[:5]}, unexpected "
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
        raise ValueError(f"The mask token {token!r} is {len(encoded)} tokens for this tokenizer; pass --mask-token "
                         "with a string that is a single token.")
    return encoded[0]


__all__ = ["DEFAULT_TARGET_MODULES", "TrainingModel", "load_training_model", "resolve_mask_token"]
