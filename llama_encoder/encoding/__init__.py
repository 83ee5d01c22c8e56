"""Encoding with a converted checkpoint: the encode API, corpus embedding and evaluation."""

from .encode import Encoder, MTEBModel, length_sorted_batches

__all__ = ["Encoder", "MTEBModel", "length_sorted_batches"]
