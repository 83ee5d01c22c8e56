"""Encoding with a converted checkpoint: the encode API, corpus embedding, evaluation and the MTEB adapter."""

from .encode import Encoder, length_sorted_batches
from .mteb_adapter import MTEBEncoder

__all__ = ["Encoder", "MTEBEncoder", "length_sorted_batches"]
