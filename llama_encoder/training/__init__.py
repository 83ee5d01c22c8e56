"""LLM2Vec training: MNTP, unsupervised SimCSE and supervised contrastive LoRA adapters (`llama-encoder train`).

`TrainingArguments` and `train` are imported on first use, so building the command line loads no model code."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arguments import TrainingArguments
    from .run import train

_LAZY = {"TrainingArguments": ".arguments", "train": ".run"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainingArguments", "train"]
