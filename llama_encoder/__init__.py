"""llama-encoder: decoder-only Llama LLMs turned into bidirectional text-embedding models.

Importing the package registers `LlamaEncoderConfig` and `LlamaEncoderModel` with transformers' Auto classes, and
marks both for `save_pretrained` to write `auto_map` and copy the two Hub files into the checkpoint.
"""

from transformers import AutoConfig, AutoModel

from .configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE, POOLING_MODES, LlamaEncoderConfig
from .modeling_llama_encoder import (
    LatentAttentionPooling,
    LlamaEncoderModel,
    LlamaEncoderOutput,
    ModifiedLlamaDecoderLayer,
)

__version__ = "0.1.0"

AutoConfig.register(LlamaEncoderConfig.model_type, LlamaEncoderConfig, exist_ok=True)
AutoModel.register(LlamaEncoderConfig, LlamaEncoderModel, exist_ok=True)
LlamaEncoderConfig.register_for_auto_class()
LlamaEncoderModel.register_for_auto_class("AutoModel")

__all__ = [
    "DEFAULT_INSTRUCTION_TEMPLATE",
    "POOLING_MODES",
    "LatentAttentionPooling",
    "LlamaEncoderConfig",
    "LlamaEncoderModel",
    "LlamaEncoderOutput",
    "ModifiedLlamaDecoderLayer",
    "__version__",
]
