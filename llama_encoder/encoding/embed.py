"""Embed a corpus into sharded output that survives interruptions and splits across processes.

Layout of the output folder: `run.json` (the parameters of the run, written before any shard), then per shard of
`shard_size` records `shard-NNNNN.ids.json` (the records' ids) and `shard-NNNNN.npy` (float32, `(n, dimension)`),
each written atomically, ids first: a shard is done exactly when both exist. `manifest.json` (parameters, dimension,
and every shard's record count and sha256) is written by whichever process finds every shard done.

Re-running the same command skips done shards. Process `r` of `N` (from `shard_index`/`num_shards`, else torchrun's
RANK/WORLD_SIZE) takes shards r, r+N, r+2N, ...; each shard is encoded alone, with batches that depend only on its
own texts, so the bytes don't depend on which process computed them (on the same kind of device).

The engine is part of the run (`engine` in run.json: "transformers" for `Encoder`, "vllm" for
`llama_encoder.engines.vllm.VllmEncoder`, which serves every shard from one vLLM process): a resume with the other
engine is refused like any other changed setting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import _TMP_PREFIX, atomic_directory, atomic_file
from ..errors import InputChangedError, InputError, MissingInputError, NotAFolderError, OutputExistsError
from ..modeling_llama_encoder import is_blank
from ..prompts import choose_prompt
from ..readers import sha256_file

logger = logging.getLogger(__name__)

FORMAT = 1
RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
# What makes two runs the same: a resumed run must match on all of these (the input by content, not by path).
IDENTITY_KEYS = (
    "format", "input_sha256", "num_records", "id_field", "text_field", "shard_size", "model", "model_dtype", "prompt",
    "engine",
)
# What a run.json written before a key existed means by its absence.
IDENTITY_DEFAULTS = {"engine": "transformers"}


@dataclass(frozen=True)
class CorpusIndex:
    """Where each shard starts in the input file, found in one validating pass."""

    path: Path
    kind: str  # "txt" or "jsonl"
    num_records: int
    shard_offsets: list[int]  # byte offset of each shard's first record
    shard_first_lines: list[int]  # 1-based line number of each shard's first record
    sha256: str
    num_blank: int = 0  # records whose text is empty or whitespace only: embedded as the zero vector


def index_corpus(
    path: str | os.PathLike,
    *,
    shard_size: int,
    id_field: str = "id",
    text_field: str = "text",
    show_progress: bool = False,
) -> CorpusIndex:
    """Check every record of a .txt (one text per line) or .jsonl corpus and record where each shard starts.

    Takes the corpus path and the records per shard; returns a `CorpusIndex` (record count, byte offset and line of
    each shard's first record, sha256 of the file, the number of blank records). Only one line is held at a time.
    Raises ValueError naming file:line for invalid UTF-8 or JSON, a missing field, or an id/text of the wrong type.
    A blank text (an empty .txt line, an empty or whitespace-only text field) is a record like any other: its
    embedding is the zero vector, and one warning counts such records.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"Corpus {path} does not exist; give the path of a .txt or .jsonl file.")
    kind = {".txt": "txt", ".jsonl": "jsonl"}.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: give a .txt file (one text per line) or a .jsonl file (id and text fields).")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard_size must be a positive integer; got {shard_size!r}.")
    digest, offsets, first_lines, count, offset = hashlib.sha256(), [], [], 0, 0
    blank_lines = []
    with path.open("rb") as handle, tqdm(total=path.stat().st_size, desc="Checking corpus", unit="B",
                                         unit_scale=True, disable=not show_progress) as progress:
        for line_number, raw in enumerate(handle, start=1):
            digest.update(raw)
            if not (kind == "jsonl" and not raw.strip()):  # a blank .jsonl line holds no record; a .txt line does
                if is_blank(_parse(raw, kind, path, line_number, id_field, text_field, count)[1]):
                    blank_lines.append(line_number)
                if count % shard_size == 0:
                    offsets.append(offset)
                    first_lines.append(line_number)
                count += 1
            offset += len(raw)
            progress.update(len(raw))
    if count == 0:
        raise InputError(f"{path} holds no records; give a corpus with at least one text.")
    if blank_lines:
        logger.warning("%s: %d of %d records are empty or blank (lines %s); each gets the zero vector as its "
                       "embedding.", path, len(blank_lines), count,
                       ", ".join(map(str, blank_lines[:5])) + (", ..." if len(blank_lines) > 5 else ""))
    return CorpusIndex(path.absolute(), kind, count, offsets, first_lines, digest.hexdigest(), len(blank_lines))


def _parse(raw: bytes, kind: str, path: Path, line: int, id_field: str, text_field: str,
           position: int) -> tuple[str, str]:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise InputError(f"{path}:{line}: not valid UTF-8; save the corpus as UTF-8.") from None
    if line == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark is file metadata, not text
    if kind == "txt":
        return str(position), text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{line}: not valid JSON ({exc.msg}); each line must be one JSON object.") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}:{line}: expected a JSON object with {id_field!r} and {text_field!r} fields.")
    for field in (id_field, text_field):
        if field not in record:
            raise InputError(
                f"{path}:{line}: missing field {field!r} (it has {sorted(record)}); choose the fields with "
                "id_field/text_field (--id-field/--text-field)."
            )
    record_id, text = record[id_field], record[text_field]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise InputError(f"{path}:{line}: field {id_field!r} must be a string or an integer; got {record_id!r}.")
    if not isinstance(text, str):
        raise InputError(f"{path}:{line}: field {text_field!r} must be a string; got {text!r:.60}.")
    return str(record_id), text


def _read_shard(index: CorpusIndex, shard: int, shard_size: int, id_field: str,
                text_field: str) -> tuple[list[str], list[str]]:
    expected = min(shard_size, index.num_records - shard * shard_size)
    ids, texts = [], []
    with index.path.open("rb") as handle:
        handle.seek(index.shard_offsets[shard])
        line = index.shard_first_lines[shard]
        while len(ids) < expected:
            raw = handle.readline()
            if not raw:
                break
            if not (index.kind == "jsonl" and not raw.strip()):
                record_id, text = _parse(raw, index.kind, index.path, line, id_field, text_field,
                                         shard * shard_size + len(ids))
                ids.append(record_id)
                texts.append(text)
            line += 1
    if len(ids) != expected:
        raise InputChangedError(f"{index.path} changed while it was being embedded (shard {shard} ended early); "
                                "re-run once the file stays unchanged.")
    return ids, texts


def _process_slot(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    if (shard_index is None) != (num_shards is None):
        raise InputError("Give both shard_index and num_shards, or neither (then RANK/WORLD_SIZE are used).")
    if shard_index is None:
        try:
            shard_index, num_shards = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise InputError("RANK and WORLD_SIZE must be integers (as torchrun sets them).") from None
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InputError(f"shard_index must be in [0, num_shards); got {shard_index} of {num_shards}.")
    return shard_index, num_shards


def _resolve_prompt(encoder, prompt: str | None, prompt_name: str | None, instruction: str | None) -> str:
    """The text that goes before every input, checked before anything is read or written."""
    return choose_prompt(getattr(encoder, "prompts", {}), lambda text: encoder.instruction_prompt(text), prompt=prompt,
                         prompt_name=prompt_name, instruction=instruction) or ""


def _model_name(encoder) -> str:
    name = str(getattr(encoder, "name_or_path", None) or type(encoder).__name__)
    # A local folder is named absolutely, so "./model" and "/abs/model" resume each other.
    return str(Path(name).resolve()) if os.path.exists(name) else name


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _write_json(path: Path, value) -> None:
    data = _json_bytes(value)
    with atomic_file(path, overwrite=True, needed_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def _read_run(output: Path) -> dict | None:
    try:
        return json.loads((output / RUN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{output / RUN_FILE} is not valid JSON; remove the output folder, or pass --overwrite "
                         "(overwrite=True) to replace it.") from None


def _changed(previous: dict, run: dict) -> list[str]:
    def value(record: dict, key: str):
        return record.get(key, IDENTITY_DEFAULTS.get(key))

    return [key for key in IDENTITY_KEYS if value(previous, key) != value(run, key)]


def _create_output(output: Path, run: dict, *, overwrite: bool) -> None:
    """A new folder holding only run.json appears at `output` in one rename, so other processes never see a
    folder of this run without it."""
    data = _json_bytes(run)
    with atomic_directory(output, overwrite=overwrite, needed_bytes=len(data)) as tmp:
        (tmp / RUN_FILE).write_bytes(data)


def _prepare_output(output: Path, run: dict, *, overwrite: bool) -> None:
    """Make `output` hold this run's run.json: keep a matching run (resume), refuse or replace another.

    Safe for processes of one job starting together: run.json is never absent from a folder of this run once
    listed (the folder appears with it), and a process that loses the race to create the folder joins it.
    """
    if output.exists() and not output.is_dir():
        raise NotAFolderError(f"Output path {output} is a file; give a folder.")
    # List first, then read: run.json may appear in between (another process), but is never removed.
    listed = {e.name for e in os.scandir(output) if not e.name.startswith(_TMP_PREFIX)} if output.is_dir() else None
    previous = _read_run(output) if listed and RUN_FILE in listed else None
    if previous is not None:
        changed = _changed(previous, run)
        if not changed:
            return
        if not overwrite:
            raise InputError(
                f"{output} holds embeddings of a different run (changed: {', '.join(changed)}); use another output "
                "folder, re-run with the same parameters to resume, or pass --overwrite (overwrite=True) to "
                "replace them."
            )
        logger.warning("Replacing %s: it holds a different run (changed: %s)", output, ", ".join(changed))
    elif listed:
        if not overwrite:
            raise InputError(f"{output} is not empty and holds no {RUN_FILE} (it has {sorted(listed)[:5]}); choose "
                             "an empty or new folder, or pass --overwrite (overwrite=True) to replace its contents.")
        logger.warning("Replacing %s: it holds files of no embedding run", output)
    elif listed is not None:  # an empty folder made beforehand: only run.json needs writing
        _write_json(output / RUN_FILE, run)
        return
    replace = listed is not None
    if replace and (current := _read_run(output)) is not None and not _changed(current, run):
        return  # another process of this run replaced it a moment ago: don't throw away its shards
    try:
        _create_output(output, run, overwrite=replace)
    except (OutputExistsError, OSError):
        # Another process of the same job created the folder first: join it if it is this run.
        current = _read_run(output) if output.is_dir() else None
        if current is None or _changed(current, run):
            raise


def _finished(output: Path, total: int) -> set[int]:
    """Shards whose ids and embeddings both exist, from one listing of the folder."""
    names = {entry.name for entry in os.scandir(output)}
    return {s for s in range(total) if f"{_shard_name(s)}.npy" in names and f"{_shard_name(s)}.ids.json" in names}


def _remove_stale_temporaries(output: Path, shards: set[int]) -> None:
    """Drop half-written files a killed run of this process's slice left behind (atomic_file's temporaries)."""
    for entry in os.scandir(output):
        stem = entry.name.removeprefix(_TMP_PREFIX).split(".")[0]
        if entry.name.startswith(f"{_TMP_PREFIX}shard-") and stem[6:].isdigit() and int(stem[6:]) in shards:
            logger.debug("Removing %s, left by an interrupted run", entry.path)
            Path(entry.path).unlink(missing_ok=True)


def _write_shard(output: Path, name: str, ids: list[str], embeddings: np.ndarray) -> None:
    _write_json(output / f"{name}.ids.json", ids)  # ids first: the .npy appearing completes the shard
    with atomic_file(output / f"{name}.npy", overwrite=True, needed_bytes=embeddings.nbytes + 128) as tmp, \
            tmp.open("wb") as handle:
        np.save(handle, embeddings, allow_pickle=False)  # straight to the file: no second copy of the shard


def _write_manifest(output: Path, run: dict, total: int, *, show_progress: bool) -> dict:
    """Check every shard's shape against its ids and the corpus, then write manifest.json; returns it."""
    shards, dimension = [], None
    for shard in tqdm(range(total), desc="Hashing shards", unit="shard", disable=not show_progress):
        name = _shard_name(shard)
        npy = output / f"{name}.npy"
        count = len(json.loads((output / f"{name}.ids.json").read_text()))
        expected = min(run["shard_size"], run["num_records"] - shard * run["shard_size"])
        array = np.load(npy, mmap_mode="r")  # reads the header only
        dimension = dimension or array.shape[-1]
        if count != expected or array.dtype != np.float32 or array.shape != (expected, dimension):
            raise InputError(f"{npy} holds {array.dtype} {array.shape} with {count} ids; expected float32 "
                             f"({expected}, {dimension}). Delete that shard's two files and re-run to recompute it.")
        shards.append({"name": name, "num_records": count, "sha256": sha256_file(npy)})
    manifest = {**run, "dimension": int(dimension), "dtype": "float32", "shards": shards}
    _write_json(output / MANIFEST_FILE, manifest)
    return manifest


def embed_corpus(
    encoder,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    id_field: str = "id",
    text_field: str = "text",
    shard_size: int = 10000,
    prompt: str | None = None,
    prompt_name: str | None = None,
    instruction: str | None = None,
    shard_index: int | None = None,
    num_shards: int | None = None,
    overwrite: bool = False,
    batch_tokens: int = 16384,
    show_progress: bool = True,
) -> dict:
    """Embed every record of `input_path` (.txt or .jsonl) into `output_dir` (layout: see the module docstring).

    `encoder` is an `Encoder` (or anything with its `encode`, `name_or_path` and `prompts`, e.g.
    `llama_encoder.engines.vllm.VllmEncoder`, whose `engine` and `model_dtype` attributes are recorded); at most one of
    `prompt`, `prompt_name` (a prompt saved in the checkpoint) and `instruction` goes before every text. This
    process does shards `shard_index`, `shard_index + num_shards`, ... (default: torchrun's RANK/WORLD_SIZE, else
    all). The corpus is checked completely before anything is written. A folder holding a run with other
    parameters (input content, model, dtype, engine, prompt, shard size, fields) is refused unless `overwrite`, which
    replaces it; the same run is resumed, skipping its done shards. `batch_tokens` is passed to `encode`.

    A blank record (empty or whitespace-only text) does not stop the run: it is embedded as the zero vector (see
    `Encoder.encode`), and the corpus check warns once with their count and lines.

    Returns a summary: `output_dir`, `num_records`, `num_blank` (records embedded as the zero vector), `num_shards`
    (output shards), `process_index`, `num_processes`, `computed` and `skipped` (names of this process's shards) and
    `manifest` (whether every shard is done and manifest.json is written).
    """
    rank, world = _process_slot(shard_index, num_shards)
    effective_prompt = _resolve_prompt(encoder, prompt, prompt_name, instruction)
    index = index_corpus(input_path, shard_size=shard_size, id_field=id_field, text_field=text_field,
                         show_progress=show_progress)
    output = Path(output_dir).absolute()
    total = len(index.shard_offsets)
    model_dtype = getattr(encoder, "model_dtype", None) or getattr(getattr(encoder, "model", None), "dtype", None)
    run = {
        "format": FORMAT, "input": str(index.path), "input_sha256": index.sha256, "num_records": index.num_records,
        "shard_size": shard_size, "num_shards": total, "id_field": id_field, "text_field": text_field,
        "model": _model_name(encoder), "model_dtype": None if model_dtype is None else str(model_dtype).split(".")[-1],
        "prompt": effective_prompt, "prompt_name": prompt_name, "instruction": instruction,
        "engine": getattr(encoder, "engine", "transformers"),
    }
    _prepare_output(output, run, overwrite=overwrite)

    mine = range(rank, total, world)
    done = _finished(output, total)
    pending = [s for s in mine if s not in done]
    skipped = [s for s in mine if s in done]
    _remove_stale_temporaries(output, set(pending))
    if skipped:
        logger.info("Resuming %s: %d of this process's %d shards are already done, %d to compute", output,
                    len(skipped), len(mine), len(pending))

    def records(shards) -> int:
        return sum(min(shard_size, index.num_records - s * shard_size) for s in shards)

    computed = []
    with tqdm(total=records(mine), initial=records(skipped), desc=f"Embedding ({rank + 1}/{world})", unit="text",
              disable=not show_progress) as progress:
        for shard in pending:
            ids, texts = _read_shard(index, shard, shard_size, id_field, text_field)
            embeddings = np.ascontiguousarray(encoder.encode(
                texts, prompt=effective_prompt, batch_tokens=batch_tokens, show_progress=False,
            ), dtype=np.float32)
            if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
                raise RuntimeError(f"The encoder returned shape {embeddings.shape} for {len(texts)} texts; it must "
                                   "return one row per text.")
            _write_shard(output, _shard_name(shard), ids, embeddings)
            computed.append(_shard_name(shard))
            progress.update(len(ids))

    complete = len(_finished(output, total)) == total
    if complete and (computed or not (output / MANIFEST_FILE).is_file()):
        _write_manifest(output, run, total, show_progress=show_progress)
    logger.info("Process %d of %d: computed %d shard(s), skipped %d; %s", rank, world, len(computed), len(skipped),
                "every shard is done, manifest.json written" if complete else "other shards are pending")
    return {"output_dir": str(output), "num_records": index.num_records, "num_blank": index.num_blank,
            "num_shards": total,
            "process_index": rank, "num_processes": world, "computed": computed,
            "skipped": [_shard_name(s) for s in skipped], "manifest": complete}
