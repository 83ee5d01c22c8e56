"""Tiny random Llama configs and models that build and run in milliseconds."""

from __future__ import annotations

import torch

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_LATENTS = dict(latent_attention_num_latents=16, latent_attention_num_heads=4, latent_attention_mlp_dim=96)


def tiny_encoder_config(**overrides):
    from llama_encoder import LlamaEncoderConfig

    values = {**TINY_LLAMA, **TINY_LATENTS, **overrides}
    return LlamaEncoderConfig(**values)


def tiny_encoder(seed: int = 0, **overrides):
    from llama_encoder import LlamaEncoderModel

    torch.manual_seed(seed)
    return LlamaEncoderModel(tiny_encoder_config(**overrides)).eval()
