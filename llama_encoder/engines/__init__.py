"""Serving engines: what each engine that runs engine-native checkpoints (`llama-encoder convert --format native`)
without our code needs of a checkpoint folder, and how to run it.

`llama_encoder.engines.vllm`: embed with vLLM in a separate interpreter (`find_vllm_python`, `embed_with_vllm`,
`VllmEmbedder`, and `VllmEncoder`, which `llama-encoder embed --engine vllm` uses). Nothing here imports vLLM into
this process.

`llama_encoder.engines.tei`: text-embeddings-inference's parsing rules per family (`check_tei_folder`), checked
against a folder's files without running TEI. Import it from its module: it is not re-exported here, so that
`embed --engine vllm` does not load it (nor the `weights` readers it uses).

Engines read checkpoint folders (through `weights`' readers at most), never the conversion, encoding or training
layers.
"""

from .vllm import VllmEmbedder, VllmEncoder, VllmResult, embed_with_vllm, find_vllm_python

__all__ = ["VllmEmbedder", "VllmEncoder", "VllmResult", "embed_with_vllm", "find_vllm_python"]
