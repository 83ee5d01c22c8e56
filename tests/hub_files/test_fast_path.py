"""The inference fast path of LlamaEncoderModel (unpadded layers, fused q/k/v and gate/up, no mask without padding)
computes what the stock decoder layers compute.

Expectations come from elsewhere: each row encoded on its own with no padding at all (batch of one, where there is
no mask to build and no padding to drop), and the stock layers (which run whenever autograd is on). Tolerances are
the summation-order bounds of tests.numeric: a batch of another shape may use other matmul blocking.
"""

from __future__ import annotations

import pytest
import torch

from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import random_padded_batch, tiny_encoder

SEQ_LEN = 9
LENGTHS = [9, 4, 7, 1, 9]


def _batch(lengths, padding_side: str, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return random_padded_batch(lengths, padding_side, seed=seed, width=SEQ_LEN)


def _one_at_a_time(model, ids, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each row alone, its padding cut off: (pooled embeddings, per-row token states)."""
    pooled, states = [], []
    with torch.no_grad():
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            out = model(input_ids=ids[row, keep][None])
            pooled.append(out.pooler_output[0])
            states.append(out.last_hidden_state[0])
    return torch.stack(pooled), states


def _stock(model, **inputs):
    """The stock decoder layers: the fast path never runs with autograd on."""
    with torch.enable_grad():
        out = model(**inputs)
    return out.pooler_output.detach(), out.last_hidden_state.detach()


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean", "last_token", "latent_attention"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_padded_batch_equals_rows_one_at_a_time(padding_side, pooling_mode, fuse):
    model = tiny_encoder(pooling_mode=pooling_mode)
    model.fuse_projections = fuse
    ids, mask = _batch(LENGTHS, padding_side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    expected, states = _one_at_a_time(model, ids, mask)
    terms = encoder_terms(model, SEQ_LEN)
    assert_equal_up_to_summation_order(out.pooler_output, expected, terms=terms, what="pooled")
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        assert_equal_up_to_summation_order(out.last_hidden_state[row, keep], states[row],
                                           terms=encoder_terms(model, SEQ_LEN, pooled=False), what=f"row {row}")
        assert torch.all(out.last_hidden_state[row, ~keep] == 0), "padding positions are zero on the fast path"


@pytest.mark.parametrize("lengths", [LENGTHS, [SEQ_LEN, SEQ_LEN, SEQ_LEN]], ids=["padded", "unpadded"])
def test_fast_path_equals_stock_layers(lengths):
    model = tiny_encoder(pooling_mode="mean")
    ids, mask = _batch(lengths, "right")
    with torch.inference_mode():
        fast = model(input_ids=ids, attention_mask=mask)
    stock_pooled, stock_states = _stock(model, input_ids=ids, attention_mask=mask)
    terms = encoder_terms(model, SEQ_LEN)
    assert_equal_up_to_summation_order(fast.pooler_output, stock_pooled, terms=terms, what="pooled")
    keep = mask.bool()
    assert_equal_up_to_summation_order(fast.last_hidden_state[keep], stock_states[keep],
                                       terms=encoder_terms(model, SEQ_LEN, pooled=False), what="token states")


def test_models_over_the_memory_budget_keep_one_copy_of_their_weights():
    """Past `fuse_projections_max_bytes` no fused copies are made (an 8B model would otherwise hold its decoder
    weights twice); the unpadded fast path still equals the stock layers."""
    model = tiny_encoder(pooling_mode="mean")
    assert model._decoder_weight_bytes() == sum(
        p.numel() * p.element_size() for name, p in model.named_parameters()
        if name.startswith("layers.") and name.endswith("_proj.weight"))
    model.fuse_projections_max_bytes = model._decoder_weight_bytes() - 1
    ids, mask = _batch(LENGTHS, "right")
    with torch.inference_mode():
        fast = model(input_ids=ids, attention_mask=mask).pooler_output
    assert not model._fused_cache
    stock_pooled, _ = _stock(model, input_ids=ids, attention_mask=mask)
    assert_equal_up_to_summation_order(fast, stock_pooled, terms=encoder_terms(model, SEQ_LEN), what="pooled")
    model.fuse_projections_max_bytes = model._decoder_weight_bytes()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    assert len(model._fused_cache) == len(model.layers)


def test_fused_weights_follow_weight_changes():
    """The fused copies are remade when a weight changes in place or is replaced (e.g. after a training step or
    `.to(dtype)`), so the fast path never runs stale weights."""
    model = tiny_encoder(pooling_mode="mean")
    ids, mask = _batch(LENGTHS, "right")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).pooler_output
        model.layers[0].self_attn.k_proj.weight.mul_(3.0)  # in place
        model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(model.layers[1].mlp.up_proj.weight * -1.0)
        after = model(input_ids=ids, attention_mask=mask).pooler_output
    stock_pooled, _ = _stock(model, input_ids=ids, attention_mask=mask)
    assert not torch.allclose(before, after)
    assert_equal_up_to_summation_order(after, stock_pooled, terms=encoder_terms(model, SEQ_LEN), what="pooled")


def test_hooks_and_training_take_the_stock_layers():
    """A forward hook on a layer still fires (the fast path would skip it), and so does anything with autograd."""
    model = tiny_encoder(pooling_mode="mean")
    ids, mask = _batch(LENGTHS, "right")
    calls = []
    handle = model.layers[1].mlp.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    try:
        with torch.no_grad():
            hooked = model(input_ids=ids, attention_mask=mask).pooler_output
    finally:
        handle.remove()
    assert calls, "the hook did not run: the fast path ran despite a hook"
    calls.clear()
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).pooler_output
    assert not calls
    assert_equal_up_to_summation_order(fast, hooked, terms=encoder_terms(model, SEQ_LEN), what="pooled")
    model.train()
    out = model(input_ids=ids, attention_mask=mask)
    assert out.pooler_output.requires_grad
    assert model._can_take_fast_path(False, {}) is False


def test_lora_wrapped_projection_takes_the_stock_layers():
    """A projection that is not a plain nn.Linear (a LoRA wrapper, a quantised layer) is honoured, not fused."""

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = tiny_encoder(pooling_mode="mean")
    ids, mask = _batch(LENGTHS, "right")
    old = model.layers[0].self_attn.v_proj
    wrapped = Scaled(old.in_features, old.out_features, bias=False)
    wrapped.weight = old.weight
    model.layers[0].self_attn.v_proj = wrapped
    assert model._can_take_fast_path(False, {}) is False
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).pooler_output
    stock_pooled, _ = _stock(model, input_ids=ids, attention_mask=mask)
    assert torch.equal(got, stock_pooled)


def test_model_with_fused_weights_can_be_copied_and_pickled():
    """The fused (on CPU: oneDNN-prepacked) copies are a cache: deepcopy and pickle start without them and the copy
    embeds like the original."""
    import copy
    import pickle

    model = tiny_encoder(pooling_mode="mean")
    ids, mask = _batch(LENGTHS, "right")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).pooler_output
    assert model._fused_cache
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert not clone._fused_cache
        with torch.no_grad():
            assert torch.equal(clone(input_ids=ids, attention_mask=mask).pooler_output, expected)
