"""The scorecard behind `llama-encoder evaluate`: several STS and retrieval sets scored in one run, printed as a
table and recorded as JSON with what produced every figure.

    from llama_encoder.encoding.scorecard import EvalSet, load_encoder, read_sets, score_sets, scorecard_table

    sets = [EvalSet.sts("sts-dev.csv"), EvalSet.retrieval("squad-dev-ir/")]
    data = read_sets(sets)                      # every file read and checked before a model loads
    card = score_sets(load_encoder("smollm2-encoder"), sets, data)
    print(scorecard_table(card))

Each set is one row: an STS set gives the Spearman (headline) and Pearson correlation of cosine similarity with the
gold scores, a retrieval set nDCG@10 and Recall@100 (also nDCG@100 and Recall@10) by exact cosine search
(`evaluate`). Prompts: an STS set's sentences get the checkpoint's `sts` prompt (where it has one: the instruction
it was trained with for sentence similarity) and a retrieval set's queries its `query` prompt (where it has one),
unless the set names another prompt, `plain` (no prompt) or an instruction; documents get the checkpoint's
`document` prompt. The card records, per set, the files and their sha256, the prompts
used, every metric (raw, in [-1, 1] or [0, 1]), the count and the seconds; and the model, dtype, device, host and
versions.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_file
from ..dtypes import describe_compute_dtype, resolve_compute_dtype
from ..errors import InputError, MissingInputError
from ..prompts import NO_PROMPT
from ..readers import read_sts, sha256_file
from .encode import Encoder, _checkpoint_file, is_encoder_config
from .evaluate import evaluate_retrieval, evaluate_sts, read_retrieval, retrieval_files

logger = logging.getLogger(__name__)

KINDS = ("sts", "retrieval")
TABLE_COLUMNS = ("set", "kind", "prompt", "Spearman", "nDCG@10", "Recall@100", "n", "seconds")
METRIC_COLUMNS = {"Spearman": "spearman", "nDCG@10": "ndcg@10", "Recall@100": "recall@100"}
"""Table column -> metric key; the table shows these x100."""


@dataclass(frozen=True)
class EvalSet:
    """One row of the scorecard: a named STS file or retrieval task, and the prompt its texts get.

    `prompt_name` names one of the checkpoint's saved prompts, `prompt` is a prompt's text, `instruction` (retrieval
    only) is written with the checkpoint's instruction template; at most one. An STS set's applies to both
    sentences (default: none), a retrieval set's to its queries (default: the checkpoint's `query` prompt)."""

    name: str
    kind: str
    files: tuple[Path, ...]
    prompt_name: str | None = None
    prompt: str | None = None
    instruction: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"A set's kind is one of {', '.join(KINDS)}; got {self.kind!r}.")
        if not self.name or "=" in self.name:
            raise InputError(f"A set needs a name without '='; got {self.name!r} (name it with NAME=PATH).")
        if sum(value is not None for value in (self.prompt_name, self.prompt, self.instruction)) > 1:
            raise InputError(f"Set {self.name}: give at most one of a prompt name, a prompt and an instruction.")
        if self.kind == "sts" and self.instruction is not None:
            raise InputError(f"Set {self.name}: an instruction is for retrieval queries; give STS a prompt.")

    @classmethod
    def sts(cls, path: str | os.PathLike, *, name: str | None = None, prompt_name: str | None = None,
            prompt: str | None = None) -> EvalSet:
        """An STS file (as `readers.read_sts` reads it); named after the file without its suffix by default."""
        path = Path(path)
        if not path.is_file():
            raise MissingInputError(f"No STS file at {path}." + (" It is a folder." if path.is_dir() else ""))
        return cls(name or path.stem, "sts", (path,), prompt_name, prompt)

    @classmethod
    def retrieval(cls, path: str | os.PathLike | Sequence[str | os.PathLike], *, name: str | None = None,
                  prompt_name: str | None = None, prompt: str | None = None,
                  instruction: str | None = None) -> EvalSet:
        """A retrieval task: a BEIR-style folder or its three files (`evaluate.retrieval_files`); named after the
        folder (the corpus file's folder) by default."""
        files = retrieval_files(path)
        return cls(name or files[0].resolve().parent.name, "retrieval", files, prompt_name, prompt, instruction)


def split_name(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a plain path (or one that exists as written, '=' and all) -> (None, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and os.sep not in name and not Path(spec).exists():
        return name, path
    return None, spec


def check_sets(sets: Sequence[EvalSet]) -> None:
    """Refuse an empty list and repeated set names."""
    if not sets:
        raise InputError("Nothing to score: give at least one STS file or retrieval task.")
    seen = set()
    for eval_set in sets:
        if eval_set.name in seen:
            raise InputError(f"Two sets are named {eval_set.name!r}; name them apart with NAME=PATH.")
        seen.add(eval_set.name)


def read_sets(sets: Sequence[EvalSet]) -> dict[str, Any]:
    """Every set's data, read and checked (file:line errors) before any model is loaded: set name -> STS pairs,
    or `(corpus, queries, qrels)`."""
    check_sets(sets)
    return {s.name: read_sts(s.files[0]) if s.kind == "sts" else read_retrieval(*s.files) for s in sets}


def saved_prompts(checkpoint: str | os.PathLike) -> dict[str, str] | None:
    """The prompts a local checkpoint folder saved (config_sentence_transformers.json; {} without one), read
    without loading the model; None for a Hub id (known once it loads)."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        return None
    config = folder / "config_sentence_transformers.json"
    if not config.is_file():
        return {}
    return json.loads(config.read_text()).get("prompts") or {}


DEFAULT_PROMPT_NAMES = {"sts": "sts", "retrieval": "query"}
"""A set kind -> the checkpoint prompt its sentences (STS) or queries (retrieval) get when the set names none."""


def check_prompt_names(sets: Sequence[EvalSet], prompts: dict[str, str], model: str) -> None:
    """Refuse a set whose prompt name the model does not have."""
    for eval_set in sets:
        if eval_set.prompt_name not in (None, NO_PROMPT) and eval_set.prompt_name not in prompts:
            raise InputError(f"Set {eval_set.name}: {model} has no prompt named {eval_set.prompt_name!r}; its "
                             f"prompts: {', '.join(prompts) or 'none'}.")


class SentenceTransformerEncoder:
    """A stock Sentence Transformers model (e.g. all-MiniLM-L6-v2) behind the `encode` the evaluators call, so a
    baseline is scored by the same code as a checkpoint. Its prompts are its saved ones; it has no instruction
    template. A token budget becomes rows per batch: `batch_tokens // max_seq_length`."""

    model_type = "sentence-transformers"

    def __init__(self, model, *, name_or_path: str, dtype_choice: str | None = None):
        self.model = model
        self.prompts = dict(model.prompts or {})
        self.name_or_path = name_or_path
        self.dtype_choice = dtype_choice

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | None = None, dtype: str = "auto",
                        allow_slow_dtype: bool = False) -> SentenceTransformerEncoder:
        """Load a Sentence Transformers folder or Hub id with stock modules only (no remote code), to compute in
        `dtype` (resolved as for `Encoder.from_pretrained`)."""
        import torch
        from sentence_transformers import SentenceTransformer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        compute_dtype = resolve_compute_dtype(dtype, device, allow_slow_dtype=allow_slow_dtype)
        model = SentenceTransformer(str(path), device=device, trust_remote_code=False).to(compute_dtype)
        return cls(model.eval(), name_or_path=str(path), dtype_choice=describe_compute_dtype(compute_dtype, device))

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def encode(self, inputs: Sequence[str], *, prompt: str | None = None, instruction: str | None = None,
               batch_tokens: int = 16384, show_progress: bool | None = None) -> np.ndarray:
        """Embed `inputs` behind `prompt` (default: the model's own default prompt, if any); float32 rows."""
        if instruction is not None:
            raise InputError(f"{self.name_or_path} has no instruction template; give its queries a prompt instead.")
        batch_size = max(1, batch_tokens // (self.model.max_seq_length or 512))
        embeddings = self.model.encode(list(inputs), prompt=prompt, batch_size=batch_size, convert_to_numpy=True,
                                       show_progress_bar=bool(show_progress))
        return np.asarray(embeddings, dtype=np.float32)


def load_encoder(path: str | os.PathLike, *, device: str | None = None, dtype: str = "auto",
                 allow_slow_dtype: bool = False) -> Encoder | SentenceTransformerEncoder:
    """An `Encoder` for a llama-encoder checkpoint; a `SentenceTransformerEncoder` for any other Sentence
    Transformers model (a folder or Hub id with modules.json), such as a baseline to compare with."""
    path = str(path)
    config, modules = _checkpoint_file(path, "config.json"), _checkpoint_file(path, "modules.json")
    if config is not None and modules is not None and not is_encoder_config(json.loads(config.read_text())):
        return SentenceTransformerEncoder.from_pretrained(path, device=device, dtype=dtype,
                                                          allow_slow_dtype=allow_slow_dtype)
    return Encoder.from_pretrained(path, device=device, dtype=dtype, allow_slow_dtype=allow_slow_dtype)


def _label(used: dict[str, Any]) -> str:
    """A prompt record's short name for the table: the prompt's name, instruction, custom (a given text) or none."""
    if "instruction" in used:
        return "instruction"
    return used["prompt_name"] or ("custom" if used["prompt"] is not None else "none")


def _prompt_options(encoder, eval_set: EvalSet) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The evaluator's prompt keywords for a set, the record of the prompts it used, and the table's label."""
    prompts = getattr(encoder, "prompts", {}) or {}
    name = eval_set.prompt_name
    if name is None and eval_set.prompt is None and eval_set.instruction is None \
            and DEFAULT_PROMPT_NAMES[eval_set.kind] in prompts:
        name = DEFAULT_PROMPT_NAMES[eval_set.kind]  # the checkpoint's own prompt for the task (as MTEBEncoder)
    text = None if name == NO_PROMPT else prompts[name] if name is not None else eval_set.prompt
    if eval_set.kind == "sts":
        used = {"prompt_name": name, "prompt": text}
        return {"prompt": text}, {"sentences": used}, _label(used)
    queries = {"instruction": eval_set.instruction} if eval_set.instruction is not None else \
        {"prompt_name": name, "prompt": text}
    document = prompts.get("document") or None
    options = {"query_prompt": queries.get("prompt"), "query_instruction": queries.get("instruction"),
               "document_prompt": document}
    documents = {"prompt_name": "document" if document else None, "prompt": document}
    return options, {"queries": queries, "documents": documents}, _label(queries)


def host_description(device: Any = "cpu") -> dict[str, Any]:
    """The machine a figure was measured on: CPU model, logical CPUs, torch threads, device (and GPU name)."""
    import torch

    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        pass
    device = torch.device(device)
    host = {"cpu": cpu or platform.processor() or platform.machine(), "machine": platform.machine(),
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda" and torch.cuda.is_available():
        host["gpu"] = torch.cuda.get_device_name(device)
    return host


def versions() -> dict[str, str | None]:
    """Versions of what computed the figures."""
    import importlib.metadata

    found = {"python": platform.python_version()}
    for package in ("llama-encoder", "torch", "transformers", "sentence-transformers", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def score_sets(encoder, sets: Sequence[EvalSet], data: dict[str, Any] | None = None, *, batch_tokens: int = 16384,
               show_progress: bool | None = None) -> dict[str, Any]:
    """Score `encoder` (an `Encoder`, a `SentenceTransformerEncoder`, or anything with the evaluators' `encode`) on
    each set, with `data` from `read_sets` (read here when not given). Returns the scorecard as a JSON-ready dict:
    `model`, `model_type`, `dtype`, `dtype_choice`, `host`, `versions`, `checkpoint_prompts`, `measured_at` and
    `sets` (name -> `kind`, `files` [{path, sha256}], `prompts`, `prompt_label`, `metrics` (raw), `n`, `seconds`),
    in the order given."""
    data = read_sets(sets) if data is None else data
    prompts = getattr(encoder, "prompts", {}) or {}
    model_name = str(getattr(encoder, "name_or_path", type(encoder).__name__))
    check_prompt_names(sets, prompts, model_name)
    model = getattr(encoder, "model", None)
    dtype = getattr(encoder, "dtype", None) or getattr(model, "dtype", None)
    device = getattr(encoder, "device", None) or "cpu"
    card = {
        "model": model_name,
        "model_type": getattr(encoder, "model_type", "llama_encoder" if isinstance(encoder, Encoder) else None),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "dtype_choice": getattr(encoder, "dtype_choice", None),
        "host": host_description(device),
        "versions": versions(),
        "checkpoint_prompts": prompts,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sets": {},
    }
    for eval_set in sets:
        options, used, label = _prompt_options(encoder, eval_set)
        logger.info("Scoring %s (%s, prompt: %s)", eval_set.name, eval_set.kind, label)
        start = time.perf_counter()
        if eval_set.kind == "sts":
            metrics = evaluate_sts(encoder, data[eval_set.name], **options, batch_tokens=batch_tokens,
                                   show_progress=show_progress)
            count = metrics["n"]
        else:
            metrics = evaluate_retrieval(encoder, *data[eval_set.name], **options, batch_tokens=batch_tokens,
                                         show_progress=show_progress)
            count = metrics["queries"]
        card["sets"][eval_set.name] = {
            "kind": eval_set.kind,
            "files": [{"path": str(path.resolve()), "sha256": sha256_file(path)} for path in eval_set.files],
            "prompts": used,
            "prompt_label": label,
            "metrics": metrics,
            "n": count,
            "seconds": round(time.perf_counter() - start, 3),
        }
    return card


def scorecard_rows(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's sets as table rows: TABLE_COLUMNS -> raw value (None where a kind has no such figure)."""
    return [{"set": name, "kind": entry["kind"], "prompt": entry["prompt_label"],
             **{column: entry["metrics"].get(key) for column, key in METRIC_COLUMNS.items()},
             "n": entry["n"], "seconds": entry["seconds"]} for name, entry in card["sets"].items()]


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in METRIC_COLUMNS:
        return f"{100 * value:.2f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Rows as an aligned plain-text table: metrics x100 with 2 decimals, numbers right-aligned, '-' for none."""
    cells = [[_cell(column, row.get(column)) for column in columns] for row in rows]
    numeric = [all(isinstance(row.get(column), (int, float)) or row.get(column) is None for row in rows)
               for column in columns]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = [[*columns], *cells]
    return "\n".join("  ".join(text.rjust(width) if right else text.ljust(width)
                               for text, width, right in zip(line, widths, numeric, strict=True)).rstrip()
                     for line in lines)


def scorecard_table(card: dict[str, Any]) -> str:
    """The card as a table under a line naming the model, its dtype and device."""
    head = f"{card['model']} ({card['dtype_choice'] or card['dtype'] or 'dtype not recorded'})"
    return f"{head}\n{format_table(scorecard_rows(card))}\n(Spearman, nDCG@10, Recall@100 x100; n: pairs or queries)"


def write_scorecard(card: dict[str, Any], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the card as JSON, atomically; returns the path."""
    path = Path(path)
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


__all__ = [
    "EvalSet",
    "SentenceTransformerEncoder",
    "DEFAULT_PROMPT_NAMES",
    "check_prompt_names",
    "format_table",
    "load_encoder",
    "read_sets",
    "saved_prompts",
    "score_sets",
    "scorecard_rows",
    "scorecard_table",
    "split_name",
    "write_scorecard",
]
