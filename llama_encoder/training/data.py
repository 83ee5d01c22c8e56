"""Training data readers: plain texts (MNTP, SimCSE), query/positive/negatives triples and scored pairs
(supervised). Every reader checks the whole file before training starts and names `file:line` for a bad record.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import InputError, MissingInputError
from ..readers import jsonl_records, read_sts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Triple:
    """One supervised example: a query (behind its task `instruction`), a positive document and hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    instruction: str | None = None


@dataclass(frozen=True)
class ScoredPair:
    """Two texts and a similarity score (STS style: higher is more similar)."""

    text1: str
    text2: str
    score: float


@dataclass
class SupervisedData:
    """What `read_supervised` found: triples for InfoNCE, or scored pairs for CoSENT (one of them is empty)."""

    triples: list[Triple] = field(default_factory=list)
    pairs: list[ScoredPair] = field(default_factory=list)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise MissingInputError(f"No training data at {path}; give the path of {what}.")


def read_texts(paths: str | os.PathLike | list) -> list[str]:
    """Texts from plain text files, one per line (blank lines skipped; a trailing `\\r` dropped), in file order.
    Raises `ValueError` when no file holds any text."""
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    texts: list[str] = []
    for path in paths:
        _require_file(path, "a text file with one text per line")
        with path.open(encoding="utf-8-sig") as handle:
            for line_number, line in enumerate(handle, start=1):
                text = line.rstrip("\r\n")
                if "\x00" in text:
                    raise InputError(f"{path}:{line_number}: the line holds a NUL character; is this a binary file?")
                if text.strip():
                    texts.append(text)
    if not texts:
        raise InputError(
            f"{', '.join(map(str, paths))} holds no text (every line is blank); give a file with one text per line."
        )
    return texts


def _text_field(record: dict, name: str, path: Path, line: int, *, required: bool) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise InputError(f"{path}:{line}: missing field {name!r}; each record needs query and positive "
                             "(negatives and instruction are optional).")
        return None
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{path}:{line}: {name} must be a non-empty string; found {value!r}.")
    return value


def _triple(record: dict, path: Path, line: int) -> Triple:
    query = _text_field(record, "query", path, line, required=True)
    positive = _text_field(record, "positive", path, line, required=True)
    negatives = record.get("negatives", record.get("negative", []))
    if isinstance(negatives, str):
        negatives = [negatives] if negatives.strip() else []
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise InputError(f"{path}:{line}: negatives must be a list of non-empty strings; found {negatives!r}.")
    instruction = _text_field(record, "instruction", path, line, required=False)
    return Triple(query=query, positive=positive, negatives=tuple(negatives), instruction=instruction)


def _read_jsonl_triples(path: Path) -> list[Triple]:
    return [_triple(record, path, line) for line, record in jsonl_records(path, ())]


def _read_csv_triples(path: Path) -> list[Triple]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        first = handle.readline()
        handle.seek(0)
        reader = csv.DictReader(handle, delimiter="\t" if "\t" in first else ",")
        if not reader.fieldnames or not {"query", "positive"} <= set(reader.fieldnames):
            raise InputError(f"{path}:1: the header must name query and positive (optionally negative and "
                             f"instruction); found {reader.fieldnames}.")
        triples = []
        for record in reader:
            line = reader.line_num
            if None in record:
                raise InputError(f"{path}:{line}: more fields than the header names; quote fields that hold commas.")
            cleaned = {key: value for key, value in record.items() if value not in (None, "")}
            triples.append(_triple(cleaned, path, line))
    return triples


def detect_format(path: Path) -> str:
    """`jsonl`, `csv` (a header naming query and positive) or `sts` (STS Benchmark tsv or a scored csv)."""
    if path.suffix == ".jsonl":
        return "jsonl"
    with path.open(encoding="utf-8-sig") as handle:
        header = handle.readline().lower()
    if "query" in header and "positive" in header:
        return "csv"
    return "sts"


def read_supervised(
    paths: str | os.PathLike | list, *, data_format: str = "auto", positive_threshold: float | None = None,
    max_negatives: int | None = None,
) -> SupervisedData:
    """Read supervised training data.

    `data_format`: `jsonl` (records with `query`, `positive`, optional `negatives` list and `instruction`), `csv`
    (a header with query, positive, optional negative and instruction), `sts` (the STS Benchmark's tab-separated
    files, or a csv with a score,sentence1,sentence2 header), or `auto` (by suffix and header). Scored pairs are
    returned as pairs, or, with `positive_threshold`, turned into triples from the pairs scored at or above it.
    `max_negatives` keeps each triple's first that many hard negatives; a triple with fewer is refused.
    """
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    data = SupervisedData()
    for path in paths:
        _require_file(path, "a jsonl, csv or STS file")
        found = detect_format(path) if data_format == "auto" else data_format
        if found == "jsonl":
            data.triples.extend(_read_jsonl_triples(path))
        elif found == "csv":
            data.triples.extend(_read_csv_triples(path))
        elif found == "sts":
            data.pairs.extend(ScoredPair(a, b, score) for a, b, score in read_sts(path))
        else:
            raise InputError(f"Unknown data format {data_format!r}; use auto, jsonl, csv or sts.")
    if positive_threshold is not None and data.pairs:
        kept = [pair for pair in data.pairs if pair.score >= positive_threshold]
        if not kept:
            raise InputError(f"No pair is scored at or above --positive-threshold {positive_threshold}; lower it.")
        logger.info("Kept %d of %d scored pairs (score >= %s) as positives", len(kept), len(data.pairs),
                    positive_threshold)
        data.triples.extend(Triple(query=pair.text1, positive=pair.text2) for pair in kept)
        data.pairs = []
    if data.triples and data.pairs:
        raise InputError("The data mixes triples (query/positive) and scored pairs; train them separately, or "
                         "pass --positive-threshold to turn the scored pairs into triples.")
    if not data.triples and not data.pairs:
        raise InputError(f"{', '.join(map(str, paths))} holds no training records; check that it is the right file.")
    if max_negatives is not None:
        short = sum(len(t.negatives) < max_negatives for t in data.triples)
        if short:
            raise InputError(f"{short} of {len(data.triples)} triples in {', '.join(map(str, paths))} have fewer than "
                             f"{max_negatives} hard negatives (max_negatives); lower it, or mine negatives with "
                             "`llama-encoder mine`.")
        data.triples = [replace(t, negatives=t.negatives[:max_negatives]) for t in data.triples]
    counts = {len(t.negatives) for t in data.triples}
    if len(counts) > 1:
        raise InputError(f"Triples have different numbers of hard negatives ({sorted(counts)}); give every query "
                         "the same number (or none), or keep each record's first N (--max-negatives, or "
                         "max_negatives in a recipe), so each batch has the same shape.")
    return data


__all__ = ["ScoredPair", "SupervisedData", "Triple", "detect_format", "read_supervised", "read_texts"]
