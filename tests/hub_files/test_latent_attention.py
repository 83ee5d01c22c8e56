"""NV-Embed latent attention head: shape, padding invariance, gradients, save/load, and its arithmetic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_encoder import LlamaEncoderModel
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms, latent_attention_terms
from tests.tiny import TINY_LATENTS, TINY_LLAMA, tiny_encoder


def reference_latent_attention(head, states: torch.Tensor) -> torch.Tensor:
    """The head written out with explicit softmax attention, one head at a time."""
    heads, head_dim = head.num_heads, head.head_dim
    query = head.q_proj(F.layer_norm(states, states.shape[-1:], head.query_norm.weight, head.query_norm.bias))
    latents = F.layer_norm(head.latents, head.latents.shape[-1:], head.latent_norm.weight, head.latent_norm.bias)
    key, value = head.kv_proj(latents).split(heads * head_dim, dim=-1)
    outputs = []
    for h in range(heads):
        q = query[..., h * head_dim : (h + 1) * head_dim]
        k = key[:, h * head_dim : (h + 1) * head_dim]
        v = value[:, h * head_dim : (h + 1) * head_dim]
        weights = torch.softmax(q @ k.T / head_dim**0.5, dim=-1)
        outputs.append(weights @ v)
    states = states + head.o_proj(torch.cat(outputs, dim=-1))
    normed = F.layer_norm(states, states.shape[-1:], head.mlp_norm.weight, head.mlp_norm.bias)
    value_part, gate = head.mlp_in(normed).chunk(2, dim=-1)
    return states + head.mlp_out(value_part * F.gelu(gate))


def test_head_matches_explicit_attention():
    model = tiny_encoder(pooling_mode="latent_attention")
    states = torch.randn(2, 5, TINY_LLAMA["hidden_size"])
    with torch.no_grad():
        expected = reference_latent_attention(model.latent_attention, states)
        assert_equal_up_to_summation_order(model.latent_attention(states), expected,
                                           terms=latent_attention_terms(model.latent_attention))


def test_output_shape_and_sizes_follow_the_config():
    model = tiny_encoder(pooling_mode="latent_attention")
    head = model.latent_attention
    assert head.latents.shape == (TINY_LATENTS["latent_attention_num_latents"], TINY_LLAMA["hidden_size"])
    assert head.num_heads == TINY_LATENTS["latent_attention_num_heads"]
    assert head.mlp_out.in_features == TINY_LATENTS["latent_attention_mlp_dim"]
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (3, 6))
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.pooler_output.shape == (3, TINY_LLAMA["hidden_size"])
    assert out.last_hidden_state.shape == (3, 6, TINY_LLAMA["hidden_size"])


def test_padding_does_not_change_the_embedding():
    model = tiny_encoder(pooling_mode="latent_attention")
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 4])
    with torch.no_grad():
        alone = model(input_ids=ids).pooler_output
        with_padding = model(input_ids=padded, attention_mask=mask).pooler_output
    assert_equal_up_to_summation_order(with_padding, alone, terms=encoder_terms(model, 9))


def test_gradients_reach_the_latents():
    model = tiny_encoder(pooling_mode="latent_attention").train()
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 6))
    model(input_ids=ids).pooler_output.pow(2).sum().backward()
    assert model.latent_attention.latents.grad is not None
    assert model.latent_attention.latents.grad.abs().sum() > 0
    assert model.latent_attention.q_proj.weight.grad.abs().sum() > 0


def test_weights_survive_save_and_load(tmp_path):
    model = tiny_encoder(pooling_mode="latent_attention")
    with torch.no_grad():
        model.latent_attention.latents.add_(torch.randn_like(model.latent_attention.latents))
    model.save_pretrained(tmp_path)
    loaded = LlamaEncoderModel.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 6))
    with torch.no_grad():  # the same weights, bit for bit, and the same inputs
        assert_equal_up_to_summation_order(loaded(input_ids=ids).pooler_output, model(input_ids=ids).pooler_output,
                                           terms=encoder_terms(model, 6))
