"""The two tolerance helpers of tests/numeric.py accept what the arithmetic allows and reject one step more."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.numeric import (
    assert_equal_up_to_summation_order,
    assert_within_rounding_steps,
    cosine_distance_bound,
    lora_merge_error,
    round_to,
    rounding_steps,
)


def _wide_float32(n: int, seed: int) -> torch.Tensor:
    """Values over many binades, both signs, subnormals of float16 included."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator) * torch.exp(torch.randn(n, generator=generator) * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_is_torch_single_rounding_cast_from_float32(dtype):
    values = _wide_float32(50_000, 1).clamp(-6e4, 6e4)
    np.testing.assert_array_equal(round_to(values, dtype), values.to(dtype).double().numpy())


def test_round_to_rounds_once_from_float64_where_torch_rounds_twice():
    # 1 + 2**-8 is halfway between the bfloat16 values 1 and 1 + 2**-7; a hair above it rounds up. torch casts
    # float64 to bfloat16 through float32, which first rounds to the halfway point, then to even: 1.
    above_half = 1 + 2**-8 + 2**-30
    assert round_to([above_half], torch.bfloat16)[0] == 1 + 2**-7
    assert torch.tensor([above_half], dtype=torch.float64).bfloat16().item() == 1.0
    assert round_to([1 + 2**-8], torch.bfloat16)[0] == 1.0  # ties to even
    assert round_to([1 + 3 * 2**-8], torch.bfloat16)[0] == 1 + 2**-6


def test_rounding_steps_counts_representable_values_across_zero_and_binades():
    b = torch.bfloat16
    tiny = float(torch.finfo(b).smallest_normal) * 2**-7  # the smallest subnormal
    steps = rounding_steps([1.0, 1.0, 2.0 - 2**-7, -tiny, 0.0], [1.0 + 2**-7, 1.0 - 2**-8, 2.0, tiny, -0.0], b)
    assert steps.tolist() == [1, 1, 1, 2, 0]
    with pytest.raises(ValueError, match="not torch.bfloat16 values"):
        rounding_steps([1.0 + 2**-9], [1.0], b)


def test_rounding_steps_accepts_k_steps_and_rejects_k_plus_one():
    exact = _wide_float32(4096, 2).double() * (1 + 1e-3)  # not bfloat16 values
    nearest = torch.from_numpy(round_to(exact, torch.bfloat16)).bfloat16()
    assert assert_within_rounding_steps(nearest, exact, steps=0, what="nearest") == 0
    up, down = torch.tensor(np.inf, dtype=torch.bfloat16), torch.tensor(-np.inf, dtype=torch.bfloat16)
    moved = nearest.clone()
    moved[::7] = torch.nextafter(moved[::7], up)  # the next bfloat16 value up
    assert assert_within_rounding_steps(moved, exact, steps=1, what="one step") == 1
    with pytest.raises(AssertionError, match=r"586 of 4096 elements lie more than 0 torch.bfloat16 rounding steps"):
        assert_within_rounding_steps(moved, exact, steps=0, what="one step")
    moved[3] = torch.nextafter(torch.nextafter(nearest[3], down), down)
    with pytest.raises(AssertionError, match="2 steps outside"):
        assert_within_rounding_steps(moved, exact, steps=1, what="two steps")


def test_one_bfloat16_step_is_not_a_relative_tolerance():
    # The failure seen on an AVX2-only host: one step at a value near 0.39 is 2**-9 = 0.00195, 0.5% of the value,
    # twice the rtol=2**-8 that stood for "one step".
    exact = torch.tensor([0.390625 + 2**-11], dtype=torch.float64)  # a quarter step above the bfloat16 0.390625
    one_step_off = torch.tensor([0.390625 + 2**-9], dtype=torch.bfloat16)
    assert rounding_steps(one_step_off, round_to(exact, torch.bfloat16), torch.bfloat16)[0] == 1
    with pytest.raises(AssertionError):
        torch.testing.assert_close(one_step_off, exact.bfloat16(), rtol=2**-8, atol=0)
    assert assert_within_rounding_steps(one_step_off, exact, steps=1) == 1


def test_float32_then_round_is_the_rounding_of_a_value_within_the_float32_error():
    # exact values a hair above bfloat16 halfway points: float32 arithmetic lands on the halfway point itself, which
    # rounds to even, one step below the exact value's rounding.
    base = torch.arange(1, 65, dtype=torch.float64) * 2**-7 + 1  # bfloat16 values in [1, 1.5]
    exact = base + 2**-8 + 2**-40
    float32_result = exact.float()  # error 2**-40 < float32's half step 2**-24
    computed = float32_result.bfloat16()
    assert (rounding_steps(computed, round_to(exact, torch.bfloat16), torch.bfloat16) == 1).sum() == 32
    with pytest.raises(AssertionError, match="32 of 64 elements"):
        assert_within_rounding_steps(computed, exact, steps=0)
    error = (float32_result.double() - exact).abs().max().item()
    assert assert_within_rounding_steps(computed, exact, steps=0, error=error) == 0
    assert assert_within_rounding_steps(computed, exact, steps=1) == 1


def test_error_bound_covers_values_near_zero_that_steps_alone_do_not():
    # Near zero a bfloat16 step is tiny, and a float32 accumulation error of 1e-8 spans thousands of them.
    exact = torch.tensor([1e-9, -3e-9, 5e-10], dtype=torch.float64)
    computed = (exact + torch.tensor([8e-9, -6e-9, 9e-9], dtype=torch.float64)).bfloat16()
    with pytest.raises(AssertionError, match="3 of 3 elements"):
        assert_within_rounding_steps(computed, exact, steps=1)
    assert assert_within_rounding_steps(computed, exact, steps=0, error=1e-8) == 0
    with pytest.raises(AssertionError, match="1 of 3 elements"):
        assert_within_rounding_steps(computed, exact, steps=0, error=8.5e-9)


def _sums_in_two_orders(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of n float32 terms summed left to right and right to left, in float32: a positive row sets the tensor's
    scale; every other row holds n/2 terms and their negatives, shuffled, so its exact sum is 0."""
    rng = np.random.default_rng(0)
    half = rng.normal(0.0, 1.0, (64, n // 2)).astype(np.float32)
    terms = rng.permuted(np.concatenate([half, -half], axis=1), axis=1)
    terms[0] = np.abs(terms[0]) + 1
    forward = np.zeros(64, np.float32)
    backward = np.zeros(64, np.float32)
    for k in range(n):
        forward += terms[:, k]
        backward += terms[:, n - 1 - k]
    return forward, backward


def test_two_summation_orders_stay_within_terms_eps_scale_where_rtol_fails():
    forward, backward = _sums_in_two_orders(1000)
    assert not np.array_equal(forward, backward)  # the orders do round differently
    assert assert_equal_up_to_summation_order(forward, backward, terms=1000) <= 1000
    with pytest.raises(AssertionError):  # an elementwise relative bound fails on the rows that sum near zero
        np.testing.assert_allclose(forward[1:], backward[1:], rtol=1e-4, atol=1e-6)


def test_summation_order_rejects_an_injected_error_just_over_the_bound():
    forward, backward = _sums_in_two_orders(200)
    unit = np.finfo(np.float32).eps * float(np.abs(backward).max())
    measured = assert_equal_up_to_summation_order(forward, backward, terms=200)
    assert 0 < measured < 20  # the two orders differ by a few rounding steps of the scale
    shifted = backward.astype(np.float64)
    shifted[5] += 200 * unit * 1.01
    with pytest.raises(AssertionError, match=r"reordering 200 terms allows 200; 1 of 64 elements are over"):
        assert_equal_up_to_summation_order(shifted, backward.astype(np.float64), terms=200, dtype=torch.float32)
    shifted[5] = backward[5] + 200 * unit * 0.99
    assert assert_equal_up_to_summation_order(shifted, backward.astype(np.float64), terms=200, dtype=torch.float32) \
        == pytest.approx(198, rel=1e-6)


def test_lora_merge_error_bounds_every_float32_evaluation_order():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 48, generator=generator)
    lora_a, lora_b = torch.randn(8, 48, generator=generator), torch.randn(32, 8, generator=generator)
    pair = SimpleNamespace(lora_a=lora_a, lora_b=lora_b, scaling=0.37, fan_in_fan_out=False)
    exact = weight.double() + 0.37 * (pair.lora_b.double() @ pair.lora_a.double())
    error = lora_merge_error(weight, [pair])
    by_rank = weight.clone()
    for k in range(8):  # rank-one updates, one rounding after each
        by_rank += 0.37 * torch.outer(pair.lora_b[:, k], pair.lora_a[k])
    orders = {"addmm": torch.addmm(weight, pair.lora_b, pair.lora_a, alpha=0.37),
              "matmul then add": weight + (pair.lora_b @ pair.lora_a) * 0.37, "rank by rank": by_rank}
    for name, merged in orders.items():
        assert assert_within_rounding_steps(merged, exact, steps=0, error=error, what=name) == 0
    with pytest.raises(AssertionError):  # and it is no wider than float32 rounding: a bfloat16 delta is outside it
        assert_within_rounding_steps(weight + ((pair.lora_b @ pair.lora_a) * 0.37).bfloat16().float(), exact,
                                     steps=0, error=error)


def test_cosine_distance_bound_covers_unit_vectors_within_t_elementwise():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(200, 64))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    terms = 1000
    t = terms * np.finfo(np.float32).eps
    b = a + rng.choice([-t, t], size=a.shape)  # the worst case: every element off by the full bound
    distance = 1 - (a * b).sum(axis=1) / np.linalg.norm(b, axis=1)
    bound = cosine_distance_bound(terms, 64)
    assert distance.max() <= bound and distance.max() > bound / 10  # a bound, and not a loose one


def test_summation_order_checks_shapes_and_finiteness():
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_equal_up_to_summation_order(torch.zeros(3), torch.zeros(4), terms=1)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_equal_up_to_summation_order(torch.tensor([np.nan]), torch.zeros(1), terms=1)
