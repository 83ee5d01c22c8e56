"""Tolerances derived from the arithmetic, so a numeric test passes on every host whatever SIMD kernels it has.

A correct computation can differ from its reference in two ways, and each has its own check:

- **Rounding to a low-precision dtype** (`assert_within_rounding_steps`): `actual` holds values of a dtype D
  (bfloat16, float16, float32) that should be the round-to-nearest of `exact` (computed in float64). If the work
  before the final rounding was itself inexact (float32 accumulation), `error` bounds how far it may be from
  `exact`; `actual` must then be the rounding of some number within `error` of `exact` (rounding is monotonic, so
  that is every value between round(exact - error) and round(exact + error)), give or take `steps` representable
  values of D. Steps are counted in representable values, not as a relative tolerance: one bfloat16 step is 2**-8
  of the value at the top of a binade but 2**-7 at its bottom, so no single `rtol` is "one step".

- **Another summation order** (`assert_equal_up_to_summation_order`): the same floating-point computation done in
  another order (other batching or padding, another kernel's blocking, two processes instead of one). Summing n
  terms in any order rounds each of the n - 1 partial sums once, by at most u = eps/2 of its size, so two orders
  differ by at most (n - 1) * eps * S, S the largest partial sum. S is taken as the tensor's scale (its largest
  magnitude, or `scale=`), not each element's own size: the rounding errors of an element near zero come from
  partial sums as large as anyone's, which is why an elementwise `rtol` fails on such entries. For a chain of
  reductions (a network), first-order errors add: `terms` is the sum of the reduction lengths along the chain
  (`llama_forward_terms`, `latent_attention_terms` and `encoder_terms` count them for this package's models),
  valid while no step amplifies errors relative to the tensor's scale (RMSNorm and LayerNorm rescale error and
  value alike). `terms` may also count roundings to a lower precision along the chain (a bfloat16 forward pass
  against a float32 one, with dtype=bfloat16): each moves the result by at most eps of the scale, to first order.
  Not covered: optimizers that divide by a gradient's own magnitude (Adam), which amplify rounding without bound.

`lora_merge_error` bounds a float32 LoRA merge elementwise (for `error=`), `cosine_distance_bound` turns a
summation-order bound on unit embeddings into a cosine distance. Both checks return the figure they checked
(steps outside the interval; the largest difference in units of eps * scale) and log it at debug level under
`tests.numeric`, so a run with `--log-cli-level=DEBUG` shows every margin.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

logger = logging.getLogger("tests.numeric")

_INT_VIEW = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def _float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _dtype_of(values, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if isinstance(values, torch.Tensor):
        return values.dtype
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.floating):  # Python floats and ints: float64
        return torch.float64
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
            np.dtype(np.float16): torch.float16}[array.dtype]


def round_to(values, dtype: torch.dtype) -> np.ndarray:
    """`values` rounded to the nearest value of `dtype` (ties to even), as float64; written out, not a cast, so it
    rounds once from float64 (torch casts float64 to bfloat16 through float32, which can round twice)."""
    x = _float64(values)
    info = torch.finfo(dtype)
    precision = 1 - round(math.log2(info.eps))  # significant bits, the implicit one included: bfloat16 8
    min_exponent = round(math.log2(info.smallest_normal)) + 1  # np.frexp's exponent of the smallest normal
    _, exponent = np.frexp(x)
    quantum = np.ldexp(1.0, np.maximum(exponent, min_exponent) - precision)  # subnormals: the smallest spacing
    rounded = np.rint(x / quantum) * quantum  # exact: a power-of-two scaling and an integer
    if not np.all(np.abs(rounded[np.isfinite(rounded)]) <= info.max):
        raise OverflowError(f"some values overflow {dtype} (largest finite {info.max})")
    return rounded


def _ordinal(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Each value's position among the representable values of `dtype`: neighbours differ by 1, +0 == -0 == 0."""
    bits = torch.from_numpy(np.ascontiguousarray(values)).to(dtype).view(_INT_VIEW[torch.finfo(dtype).bits])
    bits = bits.to(torch.int64).numpy()
    magnitude = bits & ((1 << (torch.finfo(dtype).bits - 1)) - 1)
    return np.where(bits < 0, -magnitude, magnitude)


def rounding_steps(a, b, dtype: torch.dtype) -> np.ndarray:
    """How many representable values of `dtype` lie between `a` and `b` (values of `dtype`), elementwise."""
    a, b = _float64(a), _float64(b)
    for name, values in (("a", a), ("b", b)):
        if not np.array_equal(round_to(values, dtype), values):
            raise ValueError(f"{name} holds values that are not {dtype} values; round them first")
    return np.abs(_ordinal(a, dtype) - _ordinal(b, dtype))


def assert_within_rounding_steps(actual, exact, *, steps: int, dtype: torch.dtype | None = None, error=0.0,
                                 what: str = "") -> int:
    """Every element of `actual` (values of `dtype`, default its own dtype) lies within `steps` representable
    values of [round(exact - error), round(exact + error)]: it is the rounding, to `steps` steps, of a number within
    `error` (absolute, scalar or elementwise) of `exact`. Returns the most steps any element lies outside."""
    dtype = _dtype_of(actual, dtype)
    got = _float64(actual)
    exact = np.broadcast_to(_float64(exact), got.shape)
    error = np.broadcast_to(_float64(error), got.shape)
    if not (np.isfinite(got).all() and np.isfinite(exact).all()):
        raise AssertionError(f"{what}: non-finite values")
    if not np.array_equal(round_to(got, dtype), got):
        raise AssertionError(f"{what}: actual holds values that are not {dtype} values")
    position = _ordinal(got, dtype)
    low, high = _ordinal(round_to(exact - error, dtype), dtype), _ordinal(round_to(exact + error, dtype), dtype)
    outside = np.maximum(np.maximum(low - position, position - high), 0)
    worst = int(outside.max()) if outside.size else 0
    logger.debug("%s: %s, at most %d steps outside the interval (allowed %d)", what, dtype, worst, steps)
    if worst > steps:
        index = np.unravel_index(int(np.argmax(outside)), outside.shape)
        nearest = round_to(exact[index], dtype)
        raise AssertionError(
            f"{what}: {int((outside > steps).sum())} of {outside.size} elements lie more than {steps} {dtype} "
            f"rounding steps from the rounding of exact +- error; worst at {tuple(int(i) for i in index)}: actual "
            f"{got[index]!r}, exact {exact[index]!r} (rounds to {nearest!r}), error bound {error[index]:.3g}, "
            f"{worst} steps outside")
    return worst


def assert_equal_up_to_summation_order(actual, expected, *, terms: int, dtype: torch.dtype | None = None,
                                       scale: float | None = None, what: str = "") -> float:
    """max |actual - expected| <= terms * eps(dtype) * scale, with scale the tensor's scale (max |expected|, or the
    given `scale`) and `terms` the summands whose order may differ (see the module docstring). `dtype` is the
    precision the computation ran in; by default the less precise of the two inputs' dtypes (a float64 reference
    of a float32 computation checks float32 rounding). Returns the largest difference in units of eps * scale."""
    if dtype is None:
        dtype = max(_dtype_of(actual, None), _dtype_of(expected, None), key=lambda d: torch.finfo(d).eps)
    got, want = _float64(actual), _float64(expected)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shapes differ: {got.shape} vs {want.shape}")
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        raise AssertionError(f"{what}: non-finite values")
    scale = float(np.abs(want).max()) if scale is None and want.size else float(scale or 0.0)
    unit = torch.finfo(dtype).eps * scale
    difference = np.abs(got - want)
    worst = float(difference.max()) if difference.size else 0.0
    measured = worst / unit if unit > 0 else (0.0 if worst == 0 else math.inf)
    logger.debug("%s: max difference %.3g = %.2f eps*scale (scale %.3g, %s; allowed %d)", what, worst, measured,
                 scale, dtype, terms)
    if measured > terms:
        index = np.unravel_index(int(np.argmax(difference)), difference.shape)
        raise AssertionError(
            f"{what}: differences exceed summation-order rounding: max |actual - expected| = {worst:.3g} at "
            f"{tuple(int(i) for i in index)} ({got[index]!r} vs {want[index]!r}) is {measured:.1f} x eps * scale "
            f"(eps {torch.finfo(dtype).eps:.3g} for {dtype}, scale {scale:.3g}); reordering {terms} terms allows "
            f"{terms}; {int((difference > terms * unit).sum())} of {difference.size} elements are over")
    return measured


def llama_forward_terms(config, seq_len: int) -> int:
    """Summands on the path from the embeddings to a Llama model's last hidden state, summed over the reductions
    (see the module docstring): per layer the input RMSNorm (hidden), q/k/v projections (hidden), attention scores
    (head_dim), softmax normaliser and weighted values (2 x seq_len), o_proj (heads x head_dim), the residual (1), the
    post-attention RMSNorm (hidden), gate/up (hidden), down (intermediate), the residual (1); then the final norm."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    hidden, intermediate, layers = get("hidden_size"), get("intermediate_size"), get("num_hidden_layers")
    head_dim = hidden // get("num_attention_heads")
    per_layer = hidden + hidden + head_dim + 2 * seq_len + hidden + 1 + hidden + hidden + intermediate + 1
    return layers * per_layer + hidden


def lora_merge_error(weight: torch.Tensor, modules, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elementwise bound (float64) on how far a `dtype` evaluation of `weight + sum_i scaling_i * B_i @ A_i` (one
    addmm, or a matmul then an add, per adapter) is from its exact value. Each adapter's step rounds r sums of
    products, the scaling and the addition: at most (r + 4) * u of the magnitudes involved (the gamma_n bound),
    u = eps(dtype) / 2; the steps' errors add. `modules` are LoraModule-like (lora_a, lora_b, scaling,
    fan_in_fan_out); inputs are exact in float64 (bfloat16 and float32 products are)."""
    magnitude = weight.detach().double().abs()
    roundings = 0
    for module in modules:
        delta = abs(module.scaling) * (module.lora_b.double().abs() @ module.lora_a.double().abs())
        magnitude = magnitude + (delta.T if getattr(module, "fan_in_fan_out", False) else delta)
        roundings += module.lora_a.shape[0] + 4
    return roundings * (torch.finfo(dtype).eps / 2) * magnitude


def latent_attention_terms(head) -> int:
    """Summands on the path through NV-Embed's latent-attention head (a LatentAttentionPooling module): LayerNorm
    (hidden), q_proj (hidden), scores (head_dim), softmax normaliser and weighted values (2 x latents), o_proj (heads x
    head_dim), the residual (1), LayerNorm (hidden), mlp_in (hidden), mlp_out (its width), the residual (1)."""
    latents, hidden = head.latents.shape
    inner = head.num_heads * head.head_dim
    return 4 * hidden + head.head_dim + 2 * latents + inner + head.mlp_out.in_features + 2


def encoder_terms(model, seq_len: int, *, pooled: bool = True) -> int:
    """Summands from the embeddings to a LlamaEncoderModel's pooler_output (`pooled`) or last_hidden_state: the
    forward pass, then per pooling mode the head (latent_attention), the sum over up to seq_len tokens, its weights
    and the division (mean, weighted_mean, latent_attention), then the L2 norm (hidden, the square root, division)."""
    config = model.config
    terms = llama_forward_terms(config, seq_len)
    if not pooled:
        return terms
    mode = config.pooling_mode
    if mode == "latent_attention":
        terms += latent_attention_terms(model.latent_attention)
    if mode in ("mean", "weighted_mean", "latent_attention"):
        terms += seq_len + 2
    if config.normalize_embeddings:
        terms += config.hidden_size + 2
    return terms


def cosine_distance_bound(terms: int, dimension: int, dtype: torch.dtype = torch.float32) -> float:
    """The largest cosine distance between two unit embeddings of `dimension` elements that are equal up to
    summation order (each element within t = terms x eps of the other, the scale of a unit vector's elements being
    at most 1): 1 - cos(angle) <= sin(angle)**2 <= |difference|**2 <= dimension x t**2."""
    return dimension * (terms * torch.finfo(dtype).eps) ** 2
