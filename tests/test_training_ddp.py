"""Two gloo processes under torchrun give the loss and LoRA gradients of one process on the same global batch,
for every objective (contrastive negatives are gathered across processes with gradients)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from llama_encoder import LlamaEncoderConfig, LlamaEncoderModel
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
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


# The worker's batches (tests/ddp_worker.py): 8 examples, the longest row, texts per example.
MAX_LENGTH = {"mntp": 32, "simcse": 32, "infonce": 48, "cosent": 48}
TEXTS_PER_EXAMPLE = {"mntp": 1, "simcse": 2, "infonce": 3, "cosent": 2}


def summation_terms(objective: str, base: Path) -> int:
    """How many summands one process and two may add in different orders, for the loss and for each gradient
    element: the forward pass and the backward pass through the same reductions (twice encoder_terms over the
    longest row), every token of the global batch (each LoRA gradient sums over all of them), and the loss's own
    sums (MNTP: the LM head and the softmax over the vocabulary; contrastive: the similarities and the softmax over
    the gathered batch)."""
    llama = LlamaConfig.from_pretrained(base).to_dict()
    pooling = "latent_attention" if objective == "simcse" else "mean"
    model = LlamaEncoderModel(LlamaEncoderConfig(**{**llama, "pooling_mode": pooling}))
    length, texts = MAX_LENGTH[objective], 8 * TEXTS_PER_EXAMPLE[objective]
    loss = llama["hidden_size"] + (llama["vocab_size"] if objective == "mntp" else texts)
    return 2 * encoder_terms(model, length) + texts * length + loss


@pytest.mark.parametrize("objective", ["mntp", "simcse", "infonce", "cosent"])
def test_two_processes_equal_one_process(objective, tiny_base, tmp_path):
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    _run([sys.executable, str(WORKER), objective, str(tiny_base), str(single)])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(WORKER), objective, str(tiny_base), str(double)])
    one, two = load_file(single), load_file(double)
    assert set(one) == set(two)
    lora = [name for name in one if "lora_" in name]
    assert lora and all(float(one[name].abs().max()) > 0 for name in lora if "lora_A" in name)
    # Relative to each tensor's scale, not elementwise: gradient entries near zero carry rounding errors of partial
    # sums as large as anyone's (an elementwise rtol=1e-4, atol=1e-6 failed on such entries on an AVX2-only host).
    terms = summation_terms(objective, tiny_base)
    for name in one:
        assert_equal_up_to_summation_order(two[name], one[name], terms=terms, what=name)


def test_train_command_under_torchrun_matches_one_process(tiny_base, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar.",
                               "The cat ran.", "Light.", "Sugar is sweet.", "Where is the cat?", "A park."]) + "\n")
    common = ["train", "simcse", "--base", str(tiny_base), "--data", str(data), "--max-steps", "3",
              "--batch-size", "8", "--lora-dropout", "0", "--attention-dropout", "0", "--no-progress",
              "--dtype", "float32"]  # the comparison below is of float32 summation orders
    _run([sys.executable, "-m", "llama_encoder.cli", *common, "--out", str(tmp_path / "one")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "llama_encoder.cli", *common, "--out", str(tmp_path / "two")])
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert set(one) == set(two) and all(one[name].shape == two[name].shape for name in one)
    assert all(float(one[name].abs().max()) > 0 for name in one if "lora_B" in name)  # trained from B = 0
    # What is equal up to summation order after AdamW steps: each step's loss (summed over the processes) and the
    # first step's gradient norm (before any update). Not the adapters elementwise: AdamW divides each gradient
    # entry by its own magnitude, so an entry near zero turns a rounding difference into a difference of up to
    # 2 x lr per step (a flipped sign), and no tolerance short of that holds on every host. The loss is
    # insensitive to exactly those entries (their gradient is near zero), so it still checks that both runs trained
    # on the same global batches with summed gradients.
    history = [json.loads((tmp_path / run / "training_summary.json").read_text())["history"] for run in ("one", "two")]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]] == [1, 2, 3]
    terms = summation_terms("simcse", tiny_base)
    assert_equal_up_to_summation_order([h["loss"] for h in history[1]], [h["loss"] for h in history[0]],
                                       terms=terms, dtype=torch.float32, what="loss per step")
    assert_equal_up_to_summation_order(history[1][0]["grad_norm"], history[0][0]["grad_norm"], terms=terms,
                                       dtype=torch.float32, what="first gradient norm")
