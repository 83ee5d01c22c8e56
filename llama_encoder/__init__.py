"""llama-encoder: decoder-only Llama LLMs turned into bidirectional text-embedding models.

The public API, each imported on first use:

    from llama_encoder import convert, push, Encoder, embed_corpus, train, TrainingArguments

- `convert(out=..., base=..., adapters=[...])`: a base LLM plus LoRA adapters -> a verified checkpoint folder.
- `push(folder, repo_id=...)`: upload a verified checkpoint folder to the Hugging Face Hub.
- `Encoder.from_pretrained(folder).encode(texts)`: embeddings; `embed_corpus(encoder, corpus, out)`: a whole corpus.
- `train(TrainingArguments(objective="mntp", data=[...], out=...))`: an LLM2Vec training stage (a LoRA adapter).

Failures a user can fix raise `LlamaEncoderError` subclasses (`llama_encoder.errors`).

Importing the package registers `LlamaEncoderConfig` and `LlamaEncoderModel` with transformers' Auto classes, and
marks both for `save_pretrained` to write `auto_map` and copy the two Hub files into the checkpoint.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel

from .configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE, POOLING_MODES, LlamaEncoderConfig
from .errors import LlamaEncoderError
from .modeling_llama_encoder import (
    LatentAttentionPooling,
    LlamaEncoderModel,
    LlamaEncoderOutput,
    ModifiedLlamaDecoderLayer,
)

if TYPE_CHECKING:
    from .conversion_scripts.convert import convert
    from .conversion_scripts.push import push_folder as push
    from .encoding.embed import embed_corpus
    from .encoding.encode import Encoder
    from .training.arguments import TrainingArguments
    from .training.run import train

__version__ = "0.1.0"

AutoConfig.register(LlamaEncoderConfig.model_type, LlamaEncoderConfig, exist_ok=True)
AutoModel.register(LlamaEncoderConfig, LlamaEncoderModel, exist_ok=True)
LlamaEncoderConfig.register_for_auto_class()
LlamaEncoderModel.register_for_auto_class("AutoModel")

# name -> (module, attribute): the public API, imported on first use so `import llama_encoder` stays light.
_LAZY = {
    "convert": (".conversion_scripts.convert", "convert"),
    "push": (".conversion_scripts.push", "push_folder"),
    "Encoder": (".encoding.encode", "Encoder"),
    "embed_corpus": (".encoding.embed", "embed_corpus"),
    "train": (".training.run", "train"),
    "TrainingArguments": (".training.arguments", "TrainingArguments"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DEFAULT_INSTRUCTION_TEMPLATE",
    "POOLING_MODES",
    "Encoder",
    "LatentAttentionPooling",
    "LlamaEncoderConfig",
    "LlamaEncoderError",
    "LlamaEncoderModel",
    "LlamaEncoderOutput",
    "ModifiedLlamaDecoderLayer",
    "TrainingArguments",
    "__version__",
    "convert",
    "embed_corpus",
    "push",
    "train",
]
