"""Which datasets a contrastive run trains on: one per `--data` file, or the entries of a recipe file.

A recipe (JSON, or YAML where PyYAML is installed) lists datasets, each with its own task instruction, format, loss
and an optional cap on its examples; each training batch is drawn from one dataset (proportionally to their sizes),
so in-batch negatives always share a task, as in the E5/LLM2Vec mix:

    datasets:
      - name: squad
        path: squad-train.jsonl           # relative paths are read from the recipe's folder
        instruction: Given a question, retrieve the Wikipedia paragraph that answers it
        prompt_name: query                # the checkpoint's query prompt is this task's
        max_examples: 20000
      - name: nli
        path: nli-triples.jsonl
        instruction: Given a premise, retrieve a sentence it entails
        mine_negatives: 1                 # hard negatives mined with the model before training
      - name: sts
        path: sts-train.csv
        format: sts
        loss: cosent
        instruction: Retrieve semantically similar text

A converted checkpoint saves each task's prompt under its `prompt_name` (default: the dataset's name), so
`model.encode(texts, prompt_name="sts")` writes the instruction the model was trained with. Datasets may share a
prompt name when they share the instruction. Every problem (unknown key, missing file, bad value, one prompt name for
two instructions) is refused before any work, naming the recipe and the entry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import InputError, MissingInputError
from ..prompts import named_instructions, prompt_name_problem

DATA_FORMATS = ("auto", "jsonl", "csv", "sts", "text")
LOSSES = ("auto", "infonce", "cosent")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a run. `instruction` applies to queries (CoSENT: to both texts) whose records carry none;
    documents never get one. `prompt_name` names that prompt in a converted checkpoint (None: the dataset's `name`).
    `max_examples` keeps a seeded random sample of that many records; `max_negatives` keeps each record's first
    that many hard negatives (for files whose records list different numbers). `mine_negatives` (InfoNCE) replaces each
    record's negatives with that many mined with the model before training; `mining` holds further `MiningSettings`
    fields."""

    name: str
    path: str
    format: str = "auto"
    instruction: str | None = None
    prompt_name: str | None = None
    loss: str = "auto"
    max_examples: int | None = None
    positive_threshold: float | None = None
    max_negatives: int | None = None
    mine_negatives: int | None = None
    mining: dict = field(default_factory=dict)

    def check(self, where: str) -> None:
        problems = [
            (bool(re.fullmatch(r"[A-Za-z0-9_-]+", self.name)), "name must be letters, digits, '_' or '-'"),
            (self.format in DATA_FORMATS, f"format must be one of {', '.join(DATA_FORMATS)}"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}"),
            (self.max_examples is None or self.max_examples >= 1, "max_examples must be at least 1"),
            (self.mine_negatives is None or self.mine_negatives >= 1, "mine_negatives must be at least 1"),
            (self.max_negatives is None or self.max_negatives >= 0, "max_negatives must be 0 or more"),
            (self.instruction is None or bool(str(self.instruction).strip()), "instruction must not be blank"),
        ]
        for ok, message in problems:
            if not ok:
                raise InputError(f"{where}: {message}.")
        named = self.prompt_name is not None or self.instruction is not None
        if named and (problem := prompt_name_problem(self.prompt_key)):
            default = "" if self.prompt_name else " (the dataset's name, as no prompt_name is given)"
            raise InputError(f"{where}: {problem}{default}.")
        if not Path(self.path).is_file():
            raise MissingInputError(f"{where}: no data file at {self.path}; fix the path (relative paths are read "
                                    "from the recipe's folder).")

    @property
    def prompt_key(self) -> str:
        """The name of this dataset's task prompt in a converted checkpoint: `prompt_name`, else the dataset's name."""
        return self.prompt_name or self.name


def _read_recipe_file(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise InputError(f"{path} is YAML but PyYAML is not installed; pip install pyyaml, or write the recipe "
                             "as JSON.") from error
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InputError(f"{path}: not valid YAML ({error}).") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); a recipe is a JSON object with a "
                         "'datasets' list (or YAML with a .yaml suffix).") from error


def read_recipe(path: str | Path) -> list[DatasetSpec]:
    """The datasets a recipe file lists, checked (files exist, known keys and values, unique names)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"No recipe file at {path}; give the path of a JSON or YAML recipe.")
    recipe = _read_recipe_file(path)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("datasets"), list) or not recipe["datasets"]:
        raise InputError(f"{path}: a recipe needs a non-empty 'datasets' list of entries with name and path.")
    unknown_top = sorted(set(recipe) - {"datasets"})
    if unknown_top:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown_top)}; a recipe holds only 'datasets'.")
    known = {item.name for item in fields(DatasetSpec)}
    specs = []
    for index, entry in enumerate(recipe["datasets"], start=1):
        where = f"{path}: dataset {index}"
        if not isinstance(entry, dict) or "path" not in entry:
            raise InputError(f"{where}: each entry is an object with at least 'path' (and usually 'name').")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}.")
        values = dict(entry)
        values["path"] = str((path.parent / str(values["path"])).resolve())
        values.setdefault("name", re.sub(r"[^A-Za-z0-9_-]", "_", Path(values["path"]).stem))
        values["name"] = str(values["name"])
        spec = DatasetSpec(**values)
        spec.check(f"{where} ({spec.name})")
        specs.append(spec)
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(f"{path}: dataset name(s) {', '.join(duplicates)} appear more than once; names must be "
                         "unique.")
    named_instructions((f"{path}: dataset {index} ({spec.name})", f"dataset {index} ({spec.name})", spec.prompt_key,
                        spec.instruction) for index, spec in enumerate(specs, start=1) if spec.instruction is not None)
    return specs


def specs_from_files(paths: list[str], *, data_format: str, instruction: str | None, loss: str,
                     positive_threshold: float | None, max_negatives: int | None = None) -> list[DatasetSpec]:
    """One dataset per `--data` file, each with the command line's format, instruction and loss."""
    specs, seen = [], set()
    for index, path in enumerate(paths):
        name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem) or f"data{index}"
        if name in seen:
            name = f"{name}-{index}"
        seen.add(name)
        spec = DatasetSpec(name=name, path=str(path), format=data_format, instruction=instruction, loss=loss,
                           positive_threshold=positive_threshold, max_negatives=max_negatives)
        spec.check(f"--data {path}")
        specs.append(spec)
    return specs


__all__ = ["DATA_FORMATS", "LOSSES", "DatasetSpec", "read_recipe", "specs_from_files"]
