"""The file readers the package's layers share: jsonl records, STS scored pairs, and a file's sha256.

Training reads its supervised data and evaluation its tasks through the same readers, so a file means the same to
both and a bad line gets the same `file:line` message. Every reader checks as it goes and raises
`InputError` (a `ValueError`) naming the file and line, or `MissingInputError` for a missing file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import InputError, MissingInputError

STS_FIELDS = ("score", "sentence1", "sentence2")
_HASH_CHUNK = 8 * 2**20


def sha256_file(path: str | os.PathLike, *, on_chunk: Callable[[int], object] | None = None) -> str:
    """The hex sha256 of the file at `path`, read in 8 MiB chunks (`on_chunk(bytes read)` after each, e.g. a
    progress bar's update)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return digest.hexdigest()


def jsonl_records(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """`(line number, record)` for each non-blank line of a jsonl file; each record must hold `required`."""
    if not path.is_file():
        raise MissingInputError(f"No file at {path}; give the path of a BEIR-style jsonl file.")
    with path.open(encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                message = f"{path}:{line}: not valid JSON ({exc.msg}); each line must be one JSON object."
                raise InputError(message) from None
            if not isinstance(record, dict):
                holding = f" with {', '.join(required)}" if required else ""
                raise InputError(f"{path}:{line}: expected a JSON object{holding}; found a {type(record).__name__}.")
            missing = [field for field in required if field not in record]
            if missing:
                raise InputError(f"{path}:{line}: missing field(s) {', '.join(missing)}; each line needs "
                                 f"{', '.join(required)}.")
            yield line, record


def _score(value: str, path: Path, line: int) -> float:
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise InputError(f"{path}:{line}: the score {value!r} is not a number; fix or remove that line.")
    return score


def read_sts(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """Read STS pairs `(sentence1, sentence2, score)` from `path`, in file order.

    Takes the STS Benchmark's tab-separated files (no header; genre, file, year, id, score, sentence1, sentence2,
    sometimes followed by source fields, which are ignored; quotes are literal) or a file whose header names
    `score`, `sentence1` and `sentence2` (comma-separated csv with csv quoting, or tab-separated with literal
    quotes). Raises ValueError naming file:line for a malformed line, FileNotFoundError for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"No STS file at {path}; give the path of e.g. sts-dev.csv from the STS Benchmark.")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        first = handle.readline().rstrip("\r\n")
        handle.seek(0)
        delimiter = "\t" if "\t" in first else ","
        header = [field.strip().lower() for field in next(csv.reader([first], delimiter=delimiter), [])]
        has_header = set(STS_FIELDS) <= set(header)
        # tab-separated STS files use literal quotes (sentences contain unbalanced ones); csv files use csv quoting
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        if has_header:
            next(reader)
            columns = [header.index(name) for name in STS_FIELDS]
            expected = f"{max(columns) + 1} fields as the header says"
        else:
            columns = [4, 5, 6]
            expected = "7 tab-separated fields (genre, file, year, id, score, sentence1, sentence2)"
        pairs = []
        for row in reader:
            if not row or row == [""]:
                continue
            if len(row) <= max(columns):
                raise InputError(
                    f"{path}:{reader.line_num}: expected {expected}; found {len(row)}. Use the STS Benchmark "
                    "format or a csv with a score,sentence1,sentence2 header."
                )
            score, sentence1, sentence2 = (row[column] for column in columns)
            pairs.append((sentence1, sentence2, _score(score, path, reader.line_num)))
    if not pairs:
        raise InputError(f"{path} holds no STS pairs; check that it is the right file.")
    return pairs


__all__ = ["STS_FIELDS", "jsonl_records", "read_sts", "sha256_file"]
