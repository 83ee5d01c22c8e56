"""Two gloo processes under torchrun train as one process on the same global batch: one real optimizer step of the
trainers gives the same loss, gradient norm and gradients (contrastive negatives gathered across processes with
gradients; MNTP's loss the token mean of the global batch), and the train command gives the same losses."""

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
from llama_encoder.cli import main as cli_main
from tests.ddp_worker import CASES, GLOBAL_BATCH, write_data
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import save_tiny_base

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "ddp_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# Where the new path does not (yet) equal one process; strict, so a fix shows up as XPASS and fails the run.
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


def _run(args: list) -> None:
    result = subprocess.run([str(a) for a in args], env=_environment(), capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def summation_terms(objective: str, base: Path, *, length: int | None = None, texts: int | None = None) -> int:
    """How many summands one process and two may add in different orders, for the loss and for each gradient
    element: the forward pass and the backward pass through the same reductions (twice encoder_terms over the
    longest row), every token of the global batch (each LoRA gradient sums over all of them), and the loss's own
    sums (MNTP: the LM head and the softmax over the vocabulary; contrastive: the similarities and the softmax over
    the gathered batch). `objective` is a worker case (tests/ddp_worker.py), whose longest row and texts per example
    are the defaults."""
    _, _, max_length, per_example, options = CASES[objective]
    llama = LlamaConfig.from_pretrained(base).to_dict()
    pooling = options.get("pooling", "mean")
    model = LlamaEncoderModel(LlamaEncoderConfig(**{**llama, "pooling_mode": pooling}))
    length = length or max_length
    texts = texts or GLOBAL_BATCH * per_example
    loss = llama["hidden_size"] + (llama["vocab_size"] if objective == "mntp" else texts)
    return 2 * encoder_terms(model, length) + texts * length + loss


@pytest.fixture(scope="module")
def steps(tiny_base, tmp_path_factory):
    """One optimizer step of every case, as one process and as two (one launch each, all cases in turn)."""
    data, one, two = (tmp_path_factory.mktemp(name) for name in ("ddp-data", "one-process", "two-processes"))
    write_data(data)
    _run([sys.executable, WORKER, tiny_base, data, one, *CASES])
    _run([*TORCHRUN, WORKER, tiny_base, data, two, *CASES])
    return one, two


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process(case, steps, tiny_base):
    one_folder, two_folder = steps
    # the same global batch: the two processes' rows together are the one process's rows
    rows_one = json.loads((one_folder / f"{case}-rows.json").read_text())
    rows_two = json.loads((two_folder / f"{case}-rows.json").read_text())
    assert len(rows_one) == 1 and len(rows_two) == 2 and len(rows_two[0]) == len(rows_two[1])
    assert len(rows_one[0]) == GLOBAL_BATCH * CASES[case][3]
    assert sorted(rows_two[0] + rows_two[1]) == sorted(rows_one[0])

    one, two = load_file(one_folder / f"{case}.safetensors"), load_file(two_folder / f"{case}.safetensors")
    assert set(one) == set(two)
    lora = [name for name in one if "lora_" in name]
    assert lora and all(float(one[name].abs().max()) > 0 for name in lora if "lora_A" in name)
    # Relative to each tensor's scale, not elementwise: gradient entries near zero carry rounding errors of partial
    # sums as large as anyone's (an elementwise rtol=1e-4, atol=1e-6 failed on such entries on an AVX2-only host).
    terms = summation_terms(case, tiny_base)
    for name in ("loss", "grad_norm", *sorted(n for n in one if n not in ("loss", "grad_norm"))):
        assert_equal_up_to_summation_order(two[name], one[name], terms=terms, what=name)


def test_train_command_under_torchrun_matches_one_process(tiny_base, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar.",
                               "The cat ran.", "Light.", "Sugar is sweet.", "Where is the cat?", "A park."]) + "\n")
    common = ["train", "simcse", "--base", str(tiny_base), "--data", str(data), "--max-steps", "3", "--batch-size",
              "8", "--lora-dropout", "0", "--attention-dropout", "0", "--no-progress", "--log-every", "1",
              "--max-length", "32", "--dtype", "float32"]  # the comparison below is of float32 summation orders
    assert cli_main([*common, "--out", str(tmp_path / "one")]) == 0  # one process: this one (a launch less)
    _run([*TORCHRUN, "-m", "llama_encoder.cli", *common, "--out", tmp_path / "two"])
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert set(one) == set(two) and all(one[name].shape == two[name].shape for name in one)
    assert all(float(one[name].abs().max()) > 0 for name in one if "lora_B" in name)  # trained from B = 0
    # What is equal up to summation order after AdamW steps: each step's loss (the mean over the processes) and the
    # first step's gradient norm (before any update). Not the adapters elementwise: AdamW divides each gradient
    # entry by its own magnitude, so an entry near zero turns a rounding difference into a difference of up to
    # 2 x lr per step (a flipped sign), and no tolerance short of that holds on every host. The loss is
    # insensitive to exactly those entries (their gradient is near zero), so it still checks that both runs trained
    # on the same global batches with the processes' gradients combined.
    summaries = [json.loads((tmp_path / run / "training_summary.json").read_text()) for run in ("one", "two")]
    assert [s["world_size"] for s in summaries] == [1, 2]
    history = [s["history"] for s in summaries]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]] == [1, 2, 3]
    terms = summation_terms("simcse", tiny_base)  # rows of at most --max-length 32 tokens, 16 texts a step
    assert_equal_up_to_summation_order([h["loss"] for h in history[1]], [h["loss"] for h in history[0]],
                                       terms=terms, dtype=torch.float32, what="loss per step")
    assert_equal_up_to_summation_order(history[1][0]["grad_norm"], history[0][0]["grad_norm"], terms=terms,
                                       dtype=torch.float32, what="first gradient norm")
