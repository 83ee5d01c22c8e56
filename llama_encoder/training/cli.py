"""`llama-encoder train mntp|simcse|supervised`: argument parsing for the training loop."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..configuration_llama_encoder import POOLING_MODES
from .model import DEFAULT_TARGET_MODULES

TRAIN_EPILOG = """the LLM2Vec recipe on the embedded SmolLM2 (texts.txt: one text per line):
  llama-encoder train mntp --data texts.txt --out runs/mntp --max-steps 1000 --bf16
  llama-encoder train simcse --adapter runs/mntp --data texts.txt --out runs/simcse --bf16
  llama-encoder train supervised --adapter runs/mntp --data triples.jsonl --out runs/supervised --bf16
  llama-encoder convert --adapter runs/mntp --adapter runs/supervised --out my-encoder
several processes (the global batch is shared out; contrastive negatives span all of it):
  torchrun --nproc-per-node 4 -m llama_encoder.cli train supervised ...
"""

_DESCRIPTIONS = {
    "mntp": "Masked next-token prediction: mask a share of the tokens and predict each masked token from the "
    "hidden state one position before it, with the base's frozen LM head. Data: text files, one text per line.",
    "simcse": "Unsupervised SimCSE: each text passes twice through dropout; the two views are a positive pair and "
    "every other text of the global batch is a negative. Data: text files, one text per line.",
    "supervised": "Supervised contrastive training. Triples (jsonl records with query, positive, optional "
    "negatives list and instruction; or a csv with those columns): InfoNCE with in-batch and hard negatives, "
    "queries written behind 'Instruct: {task}\\nQuery: ' (attended to, not pooled). Scored pairs (STS Benchmark "
    "tsv, or a csv with score,sentence1,sentence2): CoSENT, or InfoNCE over the pairs at or above "
    "--positive-threshold.",
}


def _common(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--base", help="base model: a local Hugging Face folder or a Hub repo id (default: the "
                        "embedded SmolLM2-135M-Instruct)")
    source.add_argument("--gguf", help="base model as a GGUF file of a Llama-architecture model")
    parser.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="PATH",
                        help="a LoRA adapter merged into the base before training (e.g. the MNTP adapter before "
                        "SimCSE or supervised); repeat to merge several in order")
    parser.add_argument("--data", action="append", required=True, metavar="FILE",
                        help="training data file; repeat for several")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the adapter folder to write (convert takes it with --adapter); checkpoints go to "
                        "DIR-checkpoints")
    length = parser.add_argument_group("length")
    length.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: --epochs)")
    length.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --max-steps is unset")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="global batch: examples per optimizer step over all processes and accumulation steps")
    optim.add_argument("--grad-accum", type=int, default=1, metavar="N",
                       help="micro-batches per step (contrastive negatives come from the same micro-batch)")
    optim.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW")
    optim.add_argument("--warmup-ratio", type=float, default=0.1,
                       help="share of the steps with a linear warmup; then linear decay to 0")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    optim.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="clip the global gradient norm to this (default: 1.0)")
    optim.add_argument("--max-length", type=int, default=128, metavar="N", help="tokens per text, longer are cut")
    optim.add_argument("--group-by-length", action="store_true",
                       help="batch texts of similar length together (shuffled batches): much less padding, "
                       "so faster on CPU; contrastive negatives then have similar lengths")
    optim.add_argument("--seed", type=int, default=42, help="seeds LoRA init, data order, masking and dropout")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=16, help="LoRA rank r (default: 16)")
    lora.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (scaling alpha / r)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    lora.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGET_MODULES), metavar="NAME",
                      help=f"projections that get LoRA (default: {' '.join(DEFAULT_TARGET_MODULES)})")
    run = parser.add_argument_group("running")
    run.add_argument("--bf16", action="store_true",
                     help="frozen weights in bfloat16 and bf16 autocast (LoRA stays float32); much faster on "
                     "recent CPUs (AMX) and GPUs")
    run.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute layer activations in the backward pass: less memory, about a third slower")
    run.add_argument("--attn-implementation", default="auto",
                     choices=["auto", "eager", "sdpa", "flex_attention", "flash_attention_2"],
                     help="attention backend (default: sdpa on CUDA, eager on CPU, where it trains faster)")
    run.add_argument("--device", help="cpu or cuda (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    run.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    run.add_argument("--save-every", type=int, default=0, metavar="N", help="write a checkpoint every N steps")
    run.add_argument("--keep-checkpoints", type=int, default=2, metavar="N",
                     help="how many of the newest checkpoints to keep")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in DIR-checkpoints (same arguments required); the "
                     "result equals an uninterrupted run")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out (only once the new adapter is complete) and old checkpoints")
    run.add_argument("--eval-sts", metavar="FILE", help="STS file (e.g. sts-dev.csv) scored during training")
    run.add_argument("--eval-every", type=int, default=0, metavar="N",
                     help="score --eval-sts every N steps (it is always scored at the end)")
    run.add_argument("--log-every", type=int, default=10, metavar="N", help="log loss and throughput every N steps")
    run.add_argument("--no-progress", dest="show_progress", action="store_false", default=None,
                     help="do not show the tqdm progress bar")
    run.add_argument("--cache-dir", metavar="DIR", help="where the embedded default model is cached")


def add_train_parser(subparsers) -> None:
    """Add `train` with its three objectives to the top-level `llama-encoder` parser."""
    train = subparsers.add_parser(
        "train", help="train a LoRA adapter: mntp, simcse or supervised (the LLM2Vec recipe)",
        description="Train a LoRA adapter on a bidirectional encoder built from a base Llama LLM. The adapter "
        "folder feeds `llama-encoder convert --adapter`.", epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    objectives = train.add_subparsers(dest="objective", required=True, metavar="OBJECTIVE")
    for name, description in _DESCRIPTIONS.items():
        parser = objectives.add_parser(name, help=description.split(":")[0], description=description,
                                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(parser)
        if name == "mntp":
            parser.add_argument("--mask-probability", type=float, default=0.2,
                                help="share of tokens masked (80%% mask token, 10%% random, 10%% kept)")
            parser.add_argument("--mask-token", metavar="TOKEN",
                                help="the token used as mask (default: the tokenizer's, else '_' as LLM2Vec)")
        else:
            parser.add_argument("--pooling", default="mean", choices=POOLING_MODES,
                                help="pooling trained with; latent_attention trains NV-Embed's head too")
            parser.add_argument("--temperature", type=float,
                                help="softmax temperature (default: 0.05 simcse, 0.02 supervised)")
            parser.add_argument("--attention-dropout", type=float, default=0.3 if name == "simcse" else 0.0,
                                help=f"attention dropout while training (default: {0.3 if name == 'simcse' else 0})")
        if name == "supervised":
            parser.add_argument("--format", dest="data_format", default="auto",
                                choices=["auto", "jsonl", "csv", "sts"], help="data format (default: by suffix "
                                "and header)")
            parser.add_argument("--loss", default="auto", choices=["auto", "infonce", "cosent"],
                                help="InfoNCE for triples, CoSENT for scored pairs (default: by the data)")
            parser.add_argument("--positive-threshold", type=float, metavar="SCORE",
                                help="scored pairs: keep pairs scored at or above SCORE as InfoNCE positives")
            parser.add_argument("--instruction", metavar="TEXT",
                                help="task instruction for queries without their own (for CoSENT pairs: both texts)")
            parser.add_argument("--cosent-scale", type=float, default=20.0, help="CoSENT's scale (1/temperature)")
        parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .loop import TrainingArguments, train

    fields = TrainingArguments.__dataclass_fields__
    values = {key: value for key, value in vars(args).items() if key in fields}
    values["command"] = "llama-encoder " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = train(TrainingArguments(**values))
    shown = {k: v for k, v in summary.items() if k != "history"}
    print(json.dumps(shown, indent=2))
    return 0


__all__ = ["add_train_parser", "run_train"]
