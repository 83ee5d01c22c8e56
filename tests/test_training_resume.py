"""A training run killed with SIGKILL at any point resumes to exactly the adapter of an uninterrupted run, and
never leaves a partial adapter or checkpoint under its final name."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import save_tiny_base

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "The cat ran.",
         "A dog sat on the mat in the park.", "Light.", "Sugar from plants is sweet.", "Where is the cat?"]
STEPS = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    save_tiny_base(folder / "base")
    (folder / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return folder


def _command(setup: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llama_encoder.cli", "train", "simcse", "--base", str(setup / "base"),
            "--data", str(setup / "texts.txt"), "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "4",
            "--save-every", "2", "--keep-checkpoints", "2", "--attention-dropout", "0.2", "--no-progress", *extra]


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup / "straight"
    subprocess.run(_command(setup, out), env=_environment(), check=True, capture_output=True, timeout=300)
    return _adapter(out)


def _checkpoint_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-"))


@pytest.mark.parametrize("kill_after_checkpoint", [2, 20, 40, STEPS - 2])
def test_sigkill_then_resume_equals_uninterrupted(setup, uninterrupted, kill_after_checkpoint, tmp_path):
    out = tmp_path / "adapter"
    checkpoints = tmp_path / "adapter-checkpoints"
    process = subprocess.Popen(_command(setup, out), env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if any(step >= kill_after_checkpoint for step in _checkpoint_steps(checkpoints)):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # whatever the moment, every checkpoint under its final name is complete, and the adapter is absent or whole
    for step in _checkpoint_steps(checkpoints):
        folder = checkpoints / f"step-{step:06d}"
        assert json.loads((folder / "state.json").read_text())["step"] == step
        load_file(folder / "trainable.safetensors")
    if out.exists():
        assert set(_adapter(out)) == set(uninterrupted)

    result = subprocess.run(_command(setup, out, "--resume", "--overwrite"), env=_environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = _adapter(out)
    assert set(resumed) == set(uninterrupted)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert not list(checkpoints.glob(".tmp-*"))
