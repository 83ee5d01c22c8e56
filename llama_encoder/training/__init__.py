"""LLM2Vec training: MNTP, unsupervised SimCSE and supervised contrastive LoRA adapters (`llama-encoder train`)."""

from .loop import TrainingArguments, train

__all__ = ["TrainingArguments", "train"]
