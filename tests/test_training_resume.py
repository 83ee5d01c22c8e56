"""A training run interrupted after a checkpoint (killed with SIGKILL, or stopped in-process) and resumed with
`--resume` ends with exactly the adapter of an uninterrupted run: the trainer restores the optimizer, scheduler, data
position and RNG (SimCSE's attention dropout, MNTP's masking), and our checkpoints restore the trained tensors."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llama_encoder.training import run as run_module
from llama_encoder.training.arguments import TrainingArguments
from llama_encoder.training.run import checkpoints, train
from tests.tiny import one_torch_thread, save_tiny_base

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "The cat ran.",
         "A dog sat on the mat in the park.", "Light.", "Sugar from plants is sweet.", "Where is the cat?"]
STEPS = 12  # 8 texts in batches of 4: six epochs, so the resumed run also crosses epoch boundaries


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread here and in the killed subprocess (OMP_NUM_THREADS=1): the same kernels, so equal bits."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    save_tiny_base(folder / "base")
    (folder / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return folder


OPTIONS = {
    "simcse": dict(attention_dropout=0.2),  # dropout draws from the RNG the trainer restores
    "mntp": dict(mask_probability=0.3),  # so does the masking
}


def _args(setup: Path, out: Path, objective: str, **extra) -> TrainingArguments:
    options = dict(objective=objective, out=str(out), data=[str(setup / "texts.txt")], base=str(setup / "base"),
                   max_steps=STEPS, batch_size=4, save_every=2, keep_checkpoints=2, dtype="float32", lr=5e-3,
                   show_progress=False, **OPTIONS[objective])
    return TrainingArguments(**{**options, **extra})


def _command(setup: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "llama_encoder.cli", "train", "simcse", "--base", str(setup / "base"),
            "--data", str(setup / "texts.txt"), "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "4",
            "--save-every", "2", "--keep-checkpoints", "2", "--dtype", "float32", "--lr", "0.005",
            "--attention-dropout", "0.2", "--no-progress"]


def _environment() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def _assert_same_adapter(resumed: Path, straight: Path) -> None:
    got, want = _adapter(resumed), _adapter(straight)
    assert set(got) == set(want)
    assert [name for name in want if not torch.equal(got[name], want[name])] == []


_uninterrupted: dict[str, Path] = {}


@pytest.fixture()
def uninterrupted(setup):
    """The adapter of an uninterrupted run of an objective (trained once per module)."""

    def run(objective: str) -> Path:
        if objective not in _uninterrupted:
            out = setup / f"straight-{objective}"
            summary = train(_args(setup, out, objective))
            assert summary["steps"] == STEPS
            _uninterrupted[objective] = out
        return _uninterrupted[objective]

    return run


@pytest.mark.parametrize("objective", ["simcse", "mntp"])
def test_a_stopped_run_resumes_to_the_uninterrupted_adapter(objective, setup, uninterrupted, tmp_path,
                                                            monkeypatch, caplog):
    straight = uninterrupted(objective)
    out = tmp_path / "adapter"
    real = run_module.prepare_run

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise KeyboardInterrupt  # right after the step-6 checkpoint is complete

    def prepare_then_interrupt(args):
        run = real(args)
        run.trainer.add_callback(Interrupt())
        return run

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "prepare_run", prepare_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(_args(setup, out, objective))
    assert not out.exists()
    # --keep-checkpoints 2
    assert [p.name for p in checkpoints(tmp_path / "adapter-checkpoints")] == ["checkpoint-4", "checkpoint-6"]

    with caplog.at_level(logging.INFO, logger="llama_encoder.training.run"):
        summary = train(_args(setup, out, objective, resume=True, log_every=1))
    assert f"--resume: continuing from {tmp_path / 'adapter-checkpoints' / 'checkpoint-6'}." in caplog.messages
    assert summary["steps"] == STEPS
    assert [h["step"] for h in summary["history"]] == list(range(7, STEPS + 1))  # only the remaining steps ran
    _assert_same_adapter(out, straight)


def test_sigkill_then_resume_equals_uninterrupted(setup, uninterrupted, tmp_path):
    """The CLI killed with SIGKILL once its step-4 checkpoint is complete (maybe while it writes a later one); every
    complete checkpoint is a whole adapter, and --resume from the newest ends on the uninterrupted adapter."""
    straight = uninterrupted("simcse")
    out, folder = tmp_path / "adapter", tmp_path / "adapter-checkpoints"
    process = subprocess.Popen(_command(setup, out), env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if any(int(p.name.split("-")[1]) >= 4 for p in checkpoints(folder)):
            break
        time.sleep(0.005)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]  # still training: killed mid-run
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not out.exists()
    complete = checkpoints(folder)
    assert complete and int(complete[-1].name.split("-")[1]) < STEPS
    for checkpoint in complete:
        assert set(_adapter(checkpoint)) == set(_adapter(straight))

    summary = train(_args(setup, out, "simcse", resume=True))
    assert summary["steps"] == STEPS
    _assert_same_adapter(out, straight)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("objective", ["simcse", "mntp"])
def test_stop_at_step_keeps_the_schedule_and_resume_ends_at_the_uninterrupted_adapter(objective, setup, uninterrupted,
                                                                                     tmp_path):
    straight = uninterrupted(objective)
    out = tmp_path / "adapter"
    first = train(_args(setup, out, objective, stop_at_step=5, save_every=4))
    assert (first["steps"], first["scheduled_steps"]) == (5, STEPS)
    # the adapter so far is written, and a checkpoint at the stopping step (off the --save-every grid) to resume from
    assert (out / "adapter_model.safetensors").is_file()
    assert [p.name for p in checkpoints(tmp_path / "adapter-checkpoints")] == ["checkpoint-4", "checkpoint-5"]
    second = train(_args(setup, out, objective, resume=True, save_every=4, log_every=1))
    assert (second["steps"], second["scheduled_steps"]) == (STEPS, STEPS)
    assert [h["step"] for h in second["history"]] == list(range(6, STEPS + 1))
    _assert_same_adapter(out, straight)


def test_stop_at_step_beyond_max_steps_is_refused_before_work(setup, tmp_path):
    with pytest.raises(ValueError, match="--stop-at-step must not exceed --max-steps"):
        train(_args(setup, tmp_path / "adapter", "simcse", stop_at_step=STEPS + 1))
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter-checkpoints").exists()
