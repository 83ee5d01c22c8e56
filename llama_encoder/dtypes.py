"""Dtypes by name, and the choice of a compute dtype for the host at hand.

`DTYPES` maps the names every `--dtype` option accepts to torch dtypes. `resolve_compute_dtype` turns a request
(`"auto"`, a name, or a torch dtype) into the dtype to compute in on a device:

- `"auto"` is bfloat16 on a CUDA device that supports it and on a CPU with native bfloat16 matrix instructions
  (x86 AVX512_BF16 or AMX-BF16, as torch's oneDNN sees them), float32 everywhere else.
- An explicit half-precision request on a CPU without the native instructions is refused before any work: there
  oneDNN emulates the products in software. On an AMD EPYC host with AVX2 only, one `train mntp` step took 208 s in
  bfloat16 against 6.4 s in float32 (about 30x). `allow_slow_dtype=True` (`--allow-slow-dtype`) forces it anyway.

Detection goes through torch, not /proc/cpuinfo, so it sees the ISA caps a process runs under
(`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`) just as the kernels do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import LlamaEncoderError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
"""What a `--dtype` option for compute accepts."""

MEASURED_SLOWDOWN = ("on an AMD EPYC host with AVX2 only, one `llama-encoder train mntp` step took 208 s in bfloat16 "
                     "against 6.4 s in float32, about 30x slower")


class SlowDtypeError(LlamaEncoderError, ValueError):
    """A half-precision dtype was asked for on a device that only emulates it."""


@dataclass(frozen=True)
class HalfSupport:
    """Whether `device` runs one half-precision dtype natively, and the evidence (a short phrase for logs)."""

    dtype: torch.dtype
    native: bool
    detail: str


def _cpu_features() -> dict:
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):  # older torch: no feature dictionary
        return {}


def _onednn_bf16() -> bool:
    """oneDNN's own verdict: honours ONEDNN_MAX_CPU_ISA, which /proc/cpuinfo does not."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn_fp16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def half_support(dtype: torch.dtype, device: str | torch.device = "cpu") -> HalfSupport:
    """Does `device` compute in `dtype` (bfloat16 or float16) natively? float32 is always native."""
    device = torch.device(device)
    if dtype == torch.float32:
        return HalfSupport(dtype, True, "float32")
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else:
            native = torch.cuda.is_available()
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
        return HalfSupport(dtype, native, f"CUDA ({name})")
    if device.type != "cpu":  # mps, xpu, ...: trust the backend
        return HalfSupport(dtype, True, device.type)
    features = _cpu_features()
    name = features.get("cpu_name") or "this CPU"
    capability = torch.backends.cpu.get_cpu_capability()
    if dtype == torch.bfloat16:
        units = [label for key, label in (("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX-BF16"))
                 if features.get(key)]
        onednn = _onednn_bf16()
        if features.get("architecture") == "aarch64" or os.uname().machine == "aarch64":
            units = units or (["BF16"] if onednn else [])
        native = bool(units) and onednn
        missing = "AVX512_BF16 or AMX-BF16"
    elif dtype == torch.float16:
        units = [label for key, label in (("avx512_fp16", "AVX512_FP16"), ("amx_fp16", "AMX-FP16"))
                 if features.get(key)]
        onednn = _onednn_fp16()
        native = bool(units) and onednn
        missing = "AVX512_FP16 or AMX-FP16"
    else:
        raise ValueError(f"half_support takes bfloat16 or float16, not {dtype}")
    if native:
        detail = f"{name}: {' and '.join(units)} (oneDNN kernels, torch capability {capability})"
    elif units:
        detail = (f"{name}: has {' and '.join(units)}, but oneDNN's kernels are capped below it "
                  f"(ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}, torch capability "
                  f"{capability})")
    else:
        detail = f"{name}: no {missing} (torch capability {capability})"
    return HalfSupport(dtype, native, detail)


def resolve_compute_dtype(requested: str | torch.dtype | None, device: str | torch.device = "cpu", *,
                          allow_slow_dtype: bool = False) -> torch.dtype:
    """The dtype to compute in on `device` for `requested` ("auto", None = "auto", a name of DTYPES, a torch dtype).

    Raises SlowDtypeError for bfloat16/float16 on a CPU without native support unless `allow_slow_dtype`."""
    if requested is None or requested == "auto":
        support = half_support(torch.bfloat16, device)
        return torch.bfloat16 if support.native else torch.float32
    if isinstance(requested, str):
        if requested not in DTYPES:
            raise LlamaEncoderError(f"Unknown dtype {requested!r}: choose one of {', '.join(DTYPE_CHOICES)}.")
        requested = DTYPES[requested]
    if requested not in DTYPES.values():
        raise LlamaEncoderError(f"Unsupported dtype {requested}: choose one of {', '.join(DTYPE_CHOICES)}.")
    if requested == torch.float32 or allow_slow_dtype:
        return requested
    support = half_support(requested, device)
    if not support.native:
        name = str(requested).removeprefix("torch.")
        raise SlowDtypeError(
            f"{name} was requested on a CPU without native {name} matrix instructions ({support.detail}). "
            f"There torch emulates {name} products in software: {MEASURED_SLOWDOWN}. Use --dtype auto or "
            f"--dtype float32 (same results within rounding), or pass --allow-slow-dtype "
            f"(allow_slow_dtype=True) to force {name} anyway.")
    return requested


def describe_compute_dtype(dtype: torch.dtype, device: str | torch.device = "cpu") -> str:
    """One line for logs and results files: the dtype chosen and why."""
    support = half_support(torch.bfloat16, device)
    return (f"{str(dtype).removeprefix('torch.')} on {torch.device(device).type} "
            f"(native bfloat16: {'yes' if support.native else 'no'}; {support.detail})")
