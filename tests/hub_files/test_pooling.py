"""Every pooling mode against an independent, loop-written computation; pool_mask excludes instructions."""

from __future__ import annotations

import pytest
import torch

from llama_encoder import LlamaEncoderConfig
from llama_encoder.modeling_llama_encoder import LatentAttentionPooling, pool
from tests.numeric import assert_equal_up_to_summation_order, latent_attention_terms
from tests.tiny import TINY_LATENTS, TINY_LLAMA, tiny_encoder

MODES = ["mean", "weighted_mean", "eos", "last_token", "bos"]


def reference_pool(states: torch.Tensor, pool_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pooling written as plain loops over rows and positions."""
    rows = []
    for row in range(states.shape[0]):
        positions = [i for i in range(states.shape[1]) if pool_mask[row, i] == 1]
        vectors = [states[row, i].double() for i in positions]
        if mode == "mean":
            rows.append(sum(vectors) / len(vectors))
        elif mode == "weighted_mean":
            weights = [k + 1 for k in range(len(vectors))]
            rows.append(sum(w * v for w, v in zip(weights, vectors, strict=True)) / sum(weights))
        elif mode in ("eos", "last_token"):
            rows.append(vectors[-1])
        elif mode == "bos":
            rows.append(vectors[0])
    return torch.stack(rows).float()


def _masks() -> torch.Tensor:
    # right padding, left padding, no padding, an instruction excluded (first 3 real tokens), one token only
    return torch.tensor(
        [
            [1, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 0, 0, 0],
        ]
    )


@pytest.mark.parametrize("mode", MODES)
def test_pool_matches_reference(mode):
    states = torch.randn(5, 7, 16)
    mask = _masks()
    # float32 sums of up to 7 rows (weights too), one division, against float64 loops: 7 + 2 roundings
    assert_equal_up_to_summation_order(pool(states, mask, mode), reference_pool(states, mask, mode), terms=7 + 2)


@pytest.mark.parametrize("mode", MODES + ["latent_attention"])
def test_model_pooler_output_is_pool_of_its_token_states(mode):
    model = tiny_encoder(pooling_mode=mode, normalize_embeddings=False)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 6))
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    pool_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention, pool_mask=pool_mask)
        states = out.last_hidden_state
        if mode == "latent_attention":
            states = model.latent_attention(states)
            expected = reference_pool(states, pool_mask, "mean")
        else:
            expected = reference_pool(states, pool_mask, mode)
    # the model's float32 pooling of the same states against float64 loops (the head runs on the same states)
    assert_equal_up_to_summation_order(out.pooler_output, expected, terms=6 + 2)


def test_normalised_embeddings_have_unit_norm_and_the_same_direction():
    raw = tiny_encoder(normalize_embeddings=False)
    normalised = tiny_encoder(normalize_embeddings=True)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (3, 5))
    with torch.no_grad():
        a, b = raw(input_ids=ids).pooler_output, normalised(input_ids=ids).pooler_output
    hidden = TINY_LLAMA["hidden_size"]  # a norm sums `hidden` squares, then a square root and a division
    assert_equal_up_to_summation_order(b.norm(dim=-1), torch.ones(3), terms=2 * (hidden + 2), what="unit norm")
    assert_equal_up_to_summation_order(b, a / a.norm(dim=-1, keepdim=True), terms=hidden + 2, what="direction")


@pytest.mark.parametrize("mode", MODES + ["latent_attention"])
def test_instruction_states_carry_no_pooling_weight(mode):
    """Whatever the instruction tokens' states are, the embedding depends only on the pooled tokens."""
    head = None
    if mode == "latent_attention":
        head = LatentAttentionPooling(LlamaEncoderConfig(**TINY_LLAMA, **TINY_LATENTS))
        torch.nn.init.normal_(head.latents)
    states = torch.randn(2, 8, TINY_LLAMA["hidden_size"])
    pool_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    scrambled = states.clone()
    scrambled[pool_mask == 0] = torch.randn(int((pool_mask == 0).sum()), TINY_LLAMA["hidden_size"]) * 10
    head_terms = latent_attention_terms(head) if head is not None else 0
    with torch.no_grad():  # the pooled rows are the same numbers; only the kernels' blocking could differ
        assert_equal_up_to_summation_order(pool(scrambled, pool_mask, mode, head), pool(states, pool_mask, mode, head),
                                           terms=head_terms + 8 + 2)


def test_excluding_the_instruction_changes_the_embedding_but_not_the_attention():
    model = tiny_encoder(pooling_mode="mean", normalize_embeddings=False)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (1, 8))
    instruction_excluded = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        full = model(input_ids=ids)
        excluded = model(input_ids=ids, pool_mask=instruction_excluded)
    # Token states are identical (the instruction is still attended to) ...
    torch.testing.assert_close(full.last_hidden_state, excluded.last_hidden_state, atol=0, rtol=0)
    # ... and the embedding is the mean over the text tokens only (5 of them summed, one division).
    assert_equal_up_to_summation_order(excluded.pooler_output, full.last_hidden_state[0, 3:].mean(dim=0, keepdim=True),
                                       terms=5 + 2)
    assert (full.pooler_output - excluded.pooler_output).abs().max() > 1e-4


@pytest.mark.parametrize("mode", MODES + ["latent_attention"])
def test_a_row_that_pools_nothing_gets_the_zero_vector(mode):
    """A blank text's row pools no token: its embedding is exactly zero whatever its states hold (NaN and inf
    included), and the other rows are pooled as without it."""
    head = None
    if mode == "latent_attention":
        head = LatentAttentionPooling(LlamaEncoderConfig(**TINY_LLAMA, **TINY_LATENTS))
        torch.nn.init.normal_(head.latents)
    states = torch.randn(4, 7, TINY_LLAMA["hidden_size"])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0] * 7, [0, 0, 0, 0, 1, 1, 1], [0] * 7])
    states[1], states[3, :2], states[3, 2:] = float("nan"), float("inf"), float("-inf")
    head_terms = latent_attention_terms(head) if head is not None else 0
    with torch.no_grad():
        pooled = pool(states, mask, mode, head)
        alone = pool(states[[0, 2]], mask[[0, 2]], mode, head)
    assert torch.equal(pooled[[1, 3]], torch.zeros(2, TINY_LLAMA["hidden_size"]))
    assert_equal_up_to_summation_order(pooled[[0, 2]], alone, terms=head_terms + 7 + 2)


def test_unknown_pooling_mode_is_refused_by_the_config():
    with pytest.raises(ValueError, match="pooling_mode must be one of"):
        LlamaEncoderConfig(**TINY_LLAMA, pooling_mode="max")
