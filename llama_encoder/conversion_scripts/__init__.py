"""Conversion scripts: a base Llama LLM (+ LoRA adapters) -> a verified, self-contained encoder checkpoint."""
