"""One real optimizer step of the trainers (`prepare_run`, then `trainer.train()` for one step), as one process or
as one of several under torchrun (used by tests/test_training_ddp.py). For each case it saves the step's logged loss
and gradient norm, every trained tensor's gradient as the optimizer sees it (after the processes' all-reduce), and
the rows the encoder was given (to check that both runs saw the same global batch).

Usage: python tests/ddp_worker.py BASE DATA_DIR OUT_DIR CASE [CASE ...]   (write the data first: `write_data`)
Cases: mntp, simcse, infonce, cosent."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from llama_encoder.training.arguments import TrainingArguments
from llama_encoder.training.mntp import IGNORE_INDEX
from llama_encoder.training.run import prepare_run

GLOBAL_BATCH = 8
INSTRUCTION = "Find the sentence that answers it"
TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "The cat ran.",
         "A dog sat on the mat in the park.", "Light.", "Sugar from plants is sweet.", "Where is the cat?"]
QUERIES = ["Where is the cat?", "What do plants make?", "Who ran in the park?", "What is sweet?",
           "Where did the dog sit?", "What gives light?", "What sat on the mat?", "Which animal ran?"]
POSITIVES = ["The cat sat on the mat.", "Plants make sugar from light.", "A dog ran in the park.",
             "Sugar from plants is sweet.", "A dog sat on the mat in the park.", "The sun gives light.",
             "A cat sat on a mat.", "The cat ran."]
NEGATIVES = ["A park.", "Light.", "The mat is red.", "Plants grow.", "The dog is old.", "Sugar.", "Where is the park?",
             "A sweet cat."]
# case: (objective, data file, the longest row allowed, texts per example, further options)
CASES = {
    "mntp": ("mntp", "texts.txt", 32, 1, {"mask_probability": 0.3}),
    "simcse": ("simcse", "texts.txt", 32, 2, {"pooling": "latent_attention", "attention_dropout": 0.0}),
    "infonce": ("supervised", "triples.jsonl", 48, 3, {"instruction": INSTRUCTION, "attention_dropout": 0.0}),
    "cosent": ("supervised", "pairs.csv", 48, 2, {"instruction": INSTRUCTION, "attention_dropout": 0.0}),
}


def write_data(folder: Path) -> None:
    """The cases' data: one global batch each, every text distinct (the no-duplicates sampler drops repeats)."""
    (folder / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (folder / "triples.jsonl").write_text("".join(json.dumps({"query": q, "positive": p, "negatives": [n]}) + "\n"
                                                  for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES, strict=True)))
    (folder / "pairs.csv").write_text("score,sentence1,sentence2\n" + "".join(
        f"{(i * 7) % 6}.{i},{QUERIES[i]},{POSITIVES[(3 * i + 1) % 8]}\n" for i in range(GLOBAL_BATCH)))


class FirstStepGradients(TrainerCallback):
    """The trained tensors' gradients just before the first optimizer step (all-reduced across processes)."""

    def __init__(self, run) -> None:
        self.run, self.gradients = run, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.gradients is None:
            self.gradients = {name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                              for name, p in self.run.model.trainable_parameters()}


def one_step(case: str, base: str, data: Path, out: Path) -> None:
    objective, file, max_length, _, options = CASES[case]
    args = TrainingArguments(objective=objective, out=str(out / f"{case}-adapter"), data=[str(data / file)],
                             base=base, batch_size=GLOBAL_BATCH, max_steps=1, max_length=max_length,
                             lora_dropout=0.0, dtype="float32", max_grad_norm=0.0, log_every=1, show_progress=False,
                             **options)
    run = prepare_run(args)
    torch.manual_seed(5)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient: give it values
        for name, param in run.model.trainable_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rows: list[list[int]] = []

    def record(module, positional, kwargs):  # the real tokens of every row the step embeds (MNTP: unmasked)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if kwargs.get("labels") is not None:
            ids = torch.where(kwargs["labels"] != IGNORE_INDEX, kwargs["labels"], ids)
        rows.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))

    target = run.trainer.model if objective == "mntp" else run.model.encoder
    hook = target.register_forward_pre_hook(record, with_kwargs=True)
    grabber = FirstStepGradients(run)
    run.trainer.add_callback(grabber)
    try:
        run.trainer.train()
    finally:
        hook.remove()
    history = [entry for entry in run.trainer.state.log_history if "loss" in entry]
    every = [rows]
    if torch.distributed.is_initialized():
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, rows)
    if int(os.environ.get("RANK", "0")) == 0:
        tensors = {"loss": torch.tensor([history[0]["loss"]]), "grad_norm": torch.tensor([history[0]["grad_norm"]]),
                   **{name: g.contiguous() for name, g in grabber.gradients.items()}}
        save_file(tensors, out / f"{case}.safetensors")
        (out / f"{case}-rows.json").write_text(json.dumps(every))


def main() -> None:
    base, data, out, *cases = sys.argv[1:]
    for case in cases:
        one_step(case, base, Path(data), Path(out))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
