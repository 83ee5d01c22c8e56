"""The compute dtype: `auto` picks bfloat16 only where the device runs it natively, an explicit half-precision
request on a CPU that emulates it is refused before any work (with the missing feature, the measured slowdown and
the flag that forces it), and the CPU kernel caps that simulate such a host really take effect."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llama_encoder import dtypes
from llama_encoder.cli import main as cli_main
from llama_encoder.dtypes import SlowDtypeError, describe_compute_dtype, resolve_compute_dtype
from llama_encoder.encoding import Encoder
from llama_encoder.errors import LlamaEncoderError

ROOT = Path(__file__).resolve().parent.parent
AVX2_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""What scripts/test.sh sets for its capped run: an AVX2-only host without native bfloat16, simulated."""


def _has_avx2() -> bool:
    features = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", dict)()
    return bool(dict(features).get("avx2"))


needs_avx2 = pytest.mark.skipif(not _has_avx2(), reason="the AVX2 cap simulates an x86 AVX2 host; this CPU has no AVX2")

REFUSAL = ("bfloat16 was requested on a CPU without native bfloat16 matrix instructions", "208 s in bfloat16",
           "6.4 s in float32", "about 30x slower", "--allow-slow-dtype")


def _assert_refusal(message: str) -> None:
    for part in REFUSAL:
        assert part in message, (part, message)
    assert "AVX512_BF16" in message or "AMX-BF16" in message, message  # the missing CPU feature, by name


def _capped(**extra) -> dict:
    env = {**os.environ, **AVX2_CAP, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


PROBE = textwrap.dedent("""
    import json, time
    import torch
    from llama_encoder.dtypes import SlowDtypeError, half_support, resolve_compute_dtype

    def refusal(name):
        try:
            resolve_compute_dtype(name, "cpu")
        except SlowDtypeError as exc:
            return str(exc)
        return None

    def seconds(dtype):
        a, b = torch.randn(384, 384).to(dtype), torch.randn(384, 384).to(dtype)
        a @ b
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return sorted(times)[1]

    torch.set_num_threads(1)
    print(json.dumps({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "native": half_support(torch.bfloat16, "cpu").native,
        "auto": str(resolve_compute_dtype("auto", "cpu")),
        "float32": str(resolve_compute_dtype("float32", "cpu")),
        "forced": str(resolve_compute_dtype("bfloat16", "cpu", allow_slow_dtype=True)),
        "bfloat16": refusal("bfloat16"),
        "float16": refusal("float16"),
        "bf16_over_fp32": seconds(torch.bfloat16) / seconds(torch.float32),
    }))
""")


@needs_avx2
def test_under_the_avx2_cap_auto_is_float32_and_bfloat16_is_refused():
    result = subprocess.run([sys.executable, "-c", PROBE], env=_capped(), capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout)
    assert probe["capability"] == "AVX2" and not probe["onednn_bf16"] and not probe["native"]
    assert probe["auto"] == probe["float32"] == "torch.float32"
    assert probe["forced"] == "torch.bfloat16"
    _assert_refusal(probe["bfloat16"])
    assert probe["float16"] is not None and "float16 was requested" in probe["float16"]
    # What the refusal protects against: emulated bfloat16 products, here several times slower than float32
    # (about 25-70x on an AVX512_BF16 host capped this way; a native bfloat16 kernel is faster than float32).
    assert probe["bf16_over_fp32"] > 3, probe


@pytest.fixture()
def no_native_bf16(monkeypatch):
    """This process as an AVX2-only host sees it: no AVX512_BF16/AMX and oneDNN without bfloat16 kernels."""
    features = {key: value for key, value in dtypes._cpu_features().items() if "bf16" not in key and "fp16" not in key}
    monkeypatch.setattr(dtypes, "_cpu_features", lambda: features)
    monkeypatch.setattr(dtypes, "_onednn_bf16", lambda: False)
    monkeypatch.setattr(dtypes, "_onednn_fp16", lambda: False)


@pytest.fixture()
def native_bf16(monkeypatch):
    """This process as an AVX512_BF16 host sees it (bfloat16 arithmetic itself still runs on whatever CPU this is)."""
    features = {**dtypes._cpu_features(), "avx512_bf16": True}
    monkeypatch.setattr(dtypes, "_cpu_features", lambda: features)
    monkeypatch.setattr(dtypes, "_onednn_bf16", lambda: True)


def test_resolve_names_and_errors(no_native_bf16):
    assert resolve_compute_dtype(None) == resolve_compute_dtype("auto") == torch.float32
    assert resolve_compute_dtype(torch.float32) == torch.float32
    assert resolve_compute_dtype(torch.bfloat16, allow_slow_dtype=True) == torch.bfloat16
    with pytest.raises(SlowDtypeError) as refused:
        resolve_compute_dtype(torch.bfloat16)
    _assert_refusal(str(refused.value))
    assert "no AVX512_BF16 or AMX-BF16" in str(refused.value)
    with pytest.raises(LlamaEncoderError, match="Unknown dtype 'bf16': choose one of auto, float32, bfloat16"):
        resolve_compute_dtype("bf16")
    line = describe_compute_dtype(torch.float32)
    assert line.startswith("float32 on cpu (native bfloat16: no;") and "no AVX512_BF16 or AMX-BF16" in line


def test_auto_is_bfloat16_where_native(native_bf16):
    assert resolve_compute_dtype("auto") == torch.bfloat16
    assert resolve_compute_dtype("bfloat16") == torch.bfloat16
    assert describe_compute_dtype(torch.bfloat16).startswith("bfloat16 on cpu (native bfloat16: yes;")


def test_auto_on_a_cuda_device_without_cuda_is_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_compute_dtype("auto", "cuda") == torch.float32


def test_encoder_refuses_slow_bfloat16_before_loading_anything(no_native_bf16, tmp_path):
    with pytest.raises(SlowDtypeError) as refused:  # before the path is even looked at: there is nothing there
        Encoder.from_pretrained(tmp_path / "no-such-checkpoint", device="cpu", dtype="bfloat16")
    _assert_refusal(str(refused.value))
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16; got 'half'"):
        Encoder.from_pretrained(tmp_path, device="cpu", dtype="half")


def test_encoder_auto_and_forced_dtypes(no_native_bf16, tiny_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="llama_encoder"):
        auto = Encoder.from_pretrained(tiny_checkpoint, device="cpu")
    assert auto.model.dtype == torch.float32
    assert auto.dtype_choice.startswith("float32 on cpu (native bfloat16: no;")
    assert any(auto.dtype_choice in record.getMessage() for record in caplog.records)
    forced = Encoder.from_pretrained(tiny_checkpoint, device="cpu", dtype="bfloat16", allow_slow_dtype=True)
    assert forced.model.dtype == torch.bfloat16


def test_embed_cli_refuses_bfloat16_before_writing_and_records_auto(no_native_bf16, tiny_checkpoint, tmp_path,
                                                                     capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\nA dog ran in the park.\n")
    out = tmp_path / "out"
    assert cli_main(["embed", str(tiny_checkpoint), str(corpus), str(out), "--device", "cpu",
                     "--dtype", "bfloat16"]) == 1
    error = capsys.readouterr().err
    assert "error: bfloat16 was requested on a CPU without native bfloat16" in error
    _assert_refusal(error)
    assert not out.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["corpus.txt"]

    assert cli_main(["embed", str(tiny_checkpoint), str(corpus), str(out), "--device", "cpu"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_dtype"] == "float32"


def test_evaluate_cli_records_the_dtype_auto_chose(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    sts = tmp_path / "sts.csv"
    sts.write_text("g\tf\t1\t1\t5.0\tThe cat sat on the mat.\tA cat sat on a mat.\n"
                   "g\tf\t1\t2\t0.5\tThe cat sat on the mat.\tPlants make sugar from light.\n")
    for native, expected in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(dtypes, "_onednn_bf16", lambda native=native: native)
        monkeypatch.setattr(dtypes, "_cpu_features", lambda native=native: {"cpu_name": "test CPU", "avx2": True,
                                                                            "avx512_bf16": native})
        assert cli_main(["evaluate", str(tiny_checkpoint), "--sts", str(sts), "--device", "cpu", "--format",
                         "json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["dtype"] == expected, result
        assert result["dtype_choice"].startswith(f"{expected} on cpu (native bfloat16: {'yes' if native else 'no'};")


@pytest.fixture()
def training_inputs(tmp_path) -> Path:
    """A tiny base and two texts under tmp_path."""
    from tests.tiny import save_tiny_base

    save_tiny_base(tmp_path / "base")
    (tmp_path / "texts.txt").write_text("The cat sat on the mat.\nA dog ran in the park.\n")
    return tmp_path


def _train_mntp(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`llama-encoder train mntp` on the tiny base for one step, in a process under the AVX2 cap."""
    out = tmp_path / "mntp"
    command = [sys.executable, "-m", "llama_encoder.cli", "train", "mntp", "--base", str(tmp_path / "base"), "--data",
               str(tmp_path / "texts.txt"), "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--no-progress"]
    result = subprocess.run([*command, *flags], env=_capped(), capture_output=True, text=True, timeout=300, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    return result, out


@needs_avx2
@pytest.mark.parametrize("flag", [["--bf16"], ["--dtype", "bfloat16"]], ids=["bf16-alias", "dtype-bfloat16"])
def test_train_bfloat16_under_the_avx2_cap_is_refused_before_anything_is_written(flag, training_inputs):
    before = sorted(path.name for path in training_inputs.iterdir())
    result, _ = _train_mntp(training_inputs, *flag)
    assert result.returncode == 1, result.stderr[-3000:]
    _assert_refusal(result.stderr)
    assert sorted(path.name for path in training_inputs.iterdir()) == before  # no output, no checkpoint folder


@needs_avx2
def test_train_dtype_auto_under_the_avx2_cap_trains_in_float32(training_inputs):
    result, out = _train_mntp(training_inputs, "--dtype", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "training_summary.json").read_text())["dtype"] == "float32"
