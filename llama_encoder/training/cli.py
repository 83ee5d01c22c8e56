"""`llama-encoder train mntp|simcse|supervised`: the options are `TrainingArguments`' fields, with their defaults and
help texts, so the command line and Python train the same recipe."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import types
import typing

from .arguments import OBJECTIVES, TrainingArguments

TRAIN_EPILOG = """the LLM2Vec recipe on the embedded SmolLM2 (texts.txt: one text per line):
  llama-encoder train mntp --data texts.txt --out runs/mntp --max-steps 1000
  llama-encoder train simcse --adapter runs/mntp --data texts.txt --out runs/simcse
  llama-encoder train supervised --adapter runs/mntp --data triples.jsonl --out runs/supervised
several datasets, each with its own instruction, hard negatives mined first (recipe.yaml: see docs):
  llama-encoder mine --model my-encoder --data pairs.jsonl --out mined.jsonl
  llama-encoder train supervised --adapter runs/mntp --recipe recipe.yaml --batch-size 512 --mini-batch-size 32 \
      --matryoshka-dims 64,128,256,576 --out runs/supervised
  llama-encoder convert --adapter runs/mntp --adapter runs/supervised --out my-encoder
several processes (the global batch is shared out; contrastive negatives span all of it):
  torchrun --nproc-per-node 4 -m llama_encoder.cli train supervised ...
"""

_DESCRIPTIONS = {
    "mntp": "Masked next-token prediction (on transformers' Trainer): mask a share of the tokens and predict each "
    "masked token from the "
    "hidden state one position before it, with the base's frozen LM head. Data: text files, one text per line.",
    "simcse": "Unsupervised SimCSE (on sentence-transformers' trainer): each text passes twice through dropout; the "
    "two views are a positive pair and "
    "every other text of the global batch is a negative. Data: text files, one text per line.",
    "supervised": "Supervised contrastive training on sentence-transformers' trainer. Triples (jsonl records with "
    "query, positive, optional negatives list and instruction; or a csv with those columns): InfoNCE "
    "(MultipleNegativesRankingLoss) with in-batch and hard negatives, queries written behind "
    "'Instruct: {task}\\nQuery: ' (attended to, not pooled). Scored pairs (STS Benchmark tsv, or a csv with "
    "score,sentence1,sentence2): CoSENT, or InfoNCE over the pairs at or above --positive-threshold. Each --data "
    "file (or --recipe entry) is one dataset; each batch comes from one dataset and holds no duplicate text.",
}


def _value_type(hint) -> tuple[type, bool]:
    """The element type of a field's type hint (`int | None` -> int) and whether it is a list."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _int_list(text: str) -> list[int]:
    """`64,128,256` -> [64, 128, 256] (an argparse type: a bad value is reported with the option's name)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 64,128,256; got {text!r}") \
            from error


def _help(item: dataclasses.Field) -> str:
    """The field's help text, with its default when that says something, escaped for argparse."""
    text = item.metadata["help"]
    default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
    shown = default is not None and default is not False and default is not dataclasses.MISSING and default != []
    if shown and "(default" not in text and "(auto" not in text:
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")


def _add_options(parser: argparse.ArgumentParser, objective: str) -> None:
    """One option per field of `TrainingArguments` that `objective` takes. Defaults are the dataclass's own:
    options left out do not reach `TrainingArguments` (argparse.SUPPRESS)."""
    hints = typing.get_type_hints(TrainingArguments)
    groups: dict[str, argparse._ActionsContainer] = {}
    for item in dataclasses.fields(TrainingArguments):
        meta = item.metadata
        if meta.get("cli", True) is False or objective not in meta.get("objectives", OBJECTIVES):
            continue
        container: argparse._ActionsContainer = parser
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            container = groups[meta["group"]]
        if "exclusive" in meta:
            key = f"exclusive: {meta['exclusive']}"
            if key not in groups:
                groups[key] = container.add_mutually_exclusive_group()
            container = groups[key]
        kind, is_list = _value_type(hints[item.name])
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        kwargs = dict(dest=item.name, help=_help(item), default=argparse.SUPPRESS)
        if required:
            kwargs["required"] = True
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if meta.get("parse") == "int_list":
            kwargs["type"] = _int_list
        elif kind is bool:
            kwargs["action"] = meta.get("action", "store_true")
        elif is_list:
            kwargs.update(type=kind, **({"nargs": meta["nargs"]} if "nargs" in meta else {"action": "append"}))
        else:
            kwargs["type"] = kind
        container.add_argument(meta.get("flag", "--" + item.name.replace("_", "-")), **kwargs)
        if "alias" in meta:
            flag, value = meta["alias"]
            container.add_argument(flag, dest=item.name, action="store_const", const=value, default=argparse.SUPPRESS,
                                   help=f"the same as --{item.name.replace('_', '-')} {value}")


def add_train_parser(subparsers) -> None:
    """Add `train` with its three objectives to the top-level `llama-encoder` parser."""
    train = subparsers.add_parser(
        "train", help="train a LoRA adapter: mntp, simcse or supervised (the LLM2Vec recipe)",
        description="Train a LoRA adapter on a bidirectional encoder built from a base LLM (Llama, Mistral, Qwen2 "
        "or Qwen3). The adapter "
        "folder feeds `llama-encoder convert --adapter`.", epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    objectives = train.add_subparsers(dest="objective", required=True, metavar="OBJECTIVE")
    for name, description in _DESCRIPTIONS.items():
        parser = objectives.add_parser(name, help=description.split(":")[0], description=description,
                                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_options(parser, name)
        parser.set_defaults(handler=run_train)


def arguments_from_namespace(args: argparse.Namespace) -> TrainingArguments:
    """The `TrainingArguments` of a parsed `llama-encoder train` command line (the command itself recorded)."""
    fields = {item.name for item in dataclasses.fields(TrainingArguments)}
    values = {key: value for key, value in vars(args).items() if key in fields}
    values["command"] = "llama-encoder " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return TrainingArguments(**values)


def run_train(args: argparse.Namespace) -> int:
    from .run import train

    summary = train(arguments_from_namespace(args))
    shown = {k: v for k, v in summary.items() if k != "history"}
    print(json.dumps(shown, indent=2))
    return 0


__all__ = ["add_train_parser", "arguments_from_namespace", "run_train"]
