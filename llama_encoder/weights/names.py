"""What weights and weight files are called: a base checkpoint's tensor names mapped to the encoder's, and the file
names transformers reads and writes."""

from __future__ import annotations

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
LM_HEAD_NAME = "lm_head.weight"

_ENCODER_ROOTS = ("layers.", "embed_tokens.", "norm.")


def normalize_base_key(name: str) -> str | None:
    """Map a base checkpoint's tensor name to the encoder's: `model.layers.0...` -> `layers.0...` (likewise
    `model.embed_tokens.*`, `model.norm.*`); `lm_head.*` and rotary `inv_freq` buffers -> `None` (dropped).
    Names already in the encoder's form are returned unchanged."""
    if name.startswith("lm_head.") or name.endswith("rotary_emb.inv_freq"):
        return None
    if name.startswith("model.") and name[len("model.") :].startswith(_ENCODER_ROOTS):
        return name[len("model.") :]
    return name


__all__ = [
    "LM_HEAD_NAME",
    "PICKLE_WEIGHTS_INDEX_NAME",
    "PICKLE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "normalize_base_key",
]
