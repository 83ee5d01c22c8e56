"""The host a benchmark ran on: printed beside every table and stored in every results file.

CPU figures depend on which kernels torch picks (AVX2, AVX-512, AMX; bfloat16 native or emulated in software, about
30x slower), on the thread count and on the library versions, so a figure without its host cannot be compared.
What is recorded: the CPU model, the ISA flags that matter (avx2, avx512f, avx512_bf16, amx_bf16, amx_tile), the
kernels torch runs (its CPU capability, oneDNN's bfloat16), whether bfloat16 is native (`llama_encoder.dtypes`), the
ISA caps in effect (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ...), threads, versions.

    from host import host_info, host_line   # benchmarks/ is on sys.path when a benchmark script runs
    print(host_line())                        # one line beside the table
    results["host"] = host_info()             # the same as a dict, for the results JSON

    python benchmarks/host.py                 # this host, as JSON
"""

from __future__ import annotations

import json
import os
import platform
import sys

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                 "MKL_CBWR", "OMP_NUM_THREADS")
_TORCH_FEATURE = {"avx512f": "avx512_f"}  # torch's name where it differs from /proc/cpuinfo's


def _cpuinfo() -> tuple[str | None, set[str]]:
    """Model name and flags from /proc/cpuinfo (Linux); (None, empty) elsewhere."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def host_info(device: str = "cpu") -> dict:
    """What the benchmark's figures depend on, as a JSON-ready dict (see the module docstring)."""
    import torch

    from llama_encoder.dtypes import half_support

    try:
        features = dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        features = {}
    model, flags = _cpuinfo()
    isa = {}
    for flag in ISA_FLAGS:
        key = _TORCH_FEATURE.get(flag, flag)
        isa[flag] = bool(features[key]) if key in features else flag in flags
    bfloat16 = half_support(torch.bfloat16, "cpu")
    info = {
        "cpu": model or features.get("cpu_name") or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "isa": isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        "native_bf16": bfloat16.native,
        "native_bf16_detail": bfloat16.detail,
        "isa_caps": {name: os.environ[name] for name in CAP_VARIABLES if name in os.environ},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "sentence_transformers": _version("sentence_transformers"),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(device), "bf16": torch.cuda.is_bf16_supported(),
                        "torch_cuda": torch.version.cuda}
    return info


def host_line(info: dict | None = None) -> str:
    """One line for beside a table: `host: CPU, threads; ISA; kernels; native bf16; caps; versions`."""
    info = info or host_info()
    have = [flag for flag, present in info["isa"].items() if present]
    lacking = [flag for flag, present in info["isa"].items() if not present]
    caps = ", ".join(f"{name}={value}" for name, value in info["isa_caps"].items() if name != "OMP_NUM_THREADS")
    line = (f"host: {info['cpu']} ({info['machine']}, {info['logical_cpus']} logical CPUs, {info['threads']} torch "
            f"threads); ISA {' '.join(have) or 'none of ' + '/'.join(ISA_FLAGS)}"
            f"{'; no ' + ' '.join(lacking) if lacking else ''}; torch kernels {info['torch_cpu_capability']}; "
            f"native bf16 {'yes' if info['native_bf16'] else 'no'}; ISA caps {caps or 'none'}; "
            f"torch {info['torch']}, transformers {info['transformers']}")
    if "cuda" in info:
        line += f"; CUDA {info['cuda']['device']} (bf16 {'yes' if info['cuda']['bf16'] else 'no'})"
    return line


if __name__ == "__main__":
    data = host_info(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print(host_line(data), file=sys.stderr)
    print(json.dumps(data, indent=2))
