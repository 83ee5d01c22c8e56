"""The weights layer under `convert` and training: base models resolved and read, LoRA adapters read and merged in
float32 (one merge for both), and tensors streamed to safetensors shards."""
