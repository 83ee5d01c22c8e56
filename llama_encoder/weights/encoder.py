"""The encoder a base model becomes: its config (what convert writes and training trains), and the model built
straight from merged weights."""

from __future__ import annotations

from itertools import chain

import torch
from transformers import PretrainedConfig

from ..configuration_llama_encoder import BASE_FAMILIES, LATENT_ATTENTION_KEYS, LlamaEncoderConfig
from ..errors import InputError
from ..modeling_llama_encoder import LlamaEncoderModel

# Keys of a base config that describe the source model, not the encoder written from it.
_BASE_ONLY_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "is_causal",
                   "torch_dtype")


def encoder_config(
    base_config: PretrainedConfig,
    *,
    pooling_mode: str,
    latent_sizes: dict | None = None,
    dtype: torch.dtype,
    normalize: bool | None = None,
) -> LlamaEncoderConfig:
    """The `LlamaEncoderConfig` of `base_config`'s architecture (its family, a key of `BASE_FAMILIES`, becomes
    `base_model_type`; the family's own entries are kept) with `pooling_mode`, the latent-head `latent_sizes`
    (entries of `LATENT_ATTENTION_KEYS`), `normalize_embeddings` when `normalize` is given, and `dtype` recorded as
    the dtype of the weights."""
    family = getattr(base_config, "base_model_type", None) or base_config.model_type
    if family not in BASE_FAMILIES:
        raise InputError(f"A {family!r} base has no encoder; the base families are {', '.join(BASE_FAMILIES)}.")
    unknown = sorted(set(latent_sizes or {}) - set(LATENT_ATTENTION_KEYS))
    if unknown:
        raise InputError(f"Unknown latent-attention settings {', '.join(unknown)}; use "
                         f"{', '.join(LATENT_ATTENTION_KEYS)}.")
    values = {k: v for k, v in base_config.to_dict().items() if k not in _BASE_ONLY_KEYS}
    values.update(latent_sizes or {}, pooling_mode=pooling_mode, base_model_type=family)
    if normalize is not None:
        values["normalize_embeddings"] = normalize
    config = LlamaEncoderConfig(**values)
    config.dtype = str(dtype).removeprefix("torch.")  # describes the weights written or trained
    return config


def encoder_from_state_dict(config: LlamaEncoderConfig, state: dict[str, torch.Tensor]) -> LlamaEncoderModel:
    """A `LlamaEncoderModel` of `config` (in eval mode) whose weights are the tensors of `state` themselves: built on
    the meta device and given `state` (no copy and no random initialisation, so memory stays one model), with the
    rotary embeddings (and Gemma3's embedding scale), which are computed rather than stored,
    built afresh. `state` must hold every weight."""
    with torch.device("meta"):
        model = LlamaEncoderModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.build_computed_buffers()
    left = [name for name, tensor in chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"The encoder was built without {', '.join(left[:5])}; nothing in the state dict sets it.")
    return model.eval()


__all__ = ["encoder_config", "encoder_from_state_dict"]
