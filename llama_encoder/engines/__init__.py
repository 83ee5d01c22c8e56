"""Serving engines that run engine-native checkpoints (`llama-encoder convert --format native`) without our code.

`llama_encoder.engines.vllm`: embed with vLLM in a separate interpreter (`find_vllm_python`, `embed_with_vllm`,
`VllmEmbedder`, and `VllmEncoder`, which `llama-encoder embed --engine vllm` uses). Nothing here imports vLLM into
this process.
"""

from .vllm import VllmEmbedder, VllmEncoder, VllmResult, embed_with_vllm, find_vllm_python

__all__ = ["VllmEmbedder", "VllmEncoder", "VllmResult", "embed_with_vllm", "find_vllm_python"]
