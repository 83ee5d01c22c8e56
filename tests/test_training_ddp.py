"""Two gloo processes under torchrun give the loss and LoRA gradients of one process on the same global batch,
for every objective (contrastive negatives are gathered across processes with gradients)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import save_tiny_base

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "ddp_worker.py"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp-base")
    save_tiny_base(folder)
    return folder


def _environment() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(args: list[str]) -> None:
    result = subprocess.run(args, env=_environment(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("objective", ["mntp", "simcse", "infonce", "cosent"])
def test_two_processes_equal_one_process(objective, tiny_base, tmp_path):
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    _run([sys.executable, str(WORKER), objective, str(tiny_base), str(single)])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(WORKER), objective, str(tiny_base), str(double)])
    one, two = load_file(single), load_file(double)
    assert set(one) == set(two)
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    lora = [name for name in one if "lora_" in name]
    assert lora and all(float(one[name].abs().max()) > 0 for name in lora if "lora_A" in name)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_train_command_under_torchrun_matches_one_process(tiny_base, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar.",
                               "The cat ran.", "Light.", "Sugar is sweet.", "Where is the cat?", "A park."]) + "\n")
    common = ["train", "simcse", "--base", str(tiny_base), "--data", str(data), "--max-steps", "3",
              "--batch-size", "8", "--lora-dropout", "0", "--attention-dropout", "0", "--no-progress"]
    _run([sys.executable, "-m", "llama_encoder.cli", *common, "--out", str(tmp_path / "one")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "llama_encoder.cli", *common, "--out", str(tmp_path / "two")])
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert set(one) == set(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
