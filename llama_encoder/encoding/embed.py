"""Embed a corpus into sharded output that survives interruptions and splits across processes.

Layout of the output folder: `run.json` (what is being computed), then per shard of `shard_size` records
`shard-NNNNN.ids.json` and `shard-NNNNN.npy` (float32), each written atomically, the `.npy` last: a shard is done
exactly when its `.npy` exists. Re-running the same command skips done shards. Process `r` of `N` (from
`shard_index`/`num_shards`, else torchrun's RANK/WORLD_SIZE) takes shards r, r+N, r+2N, ...; whichever process
sees every shard done writes `manifest.json`. Shards are encoded alone, so the bytes don't depend on who computed them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_file

logger = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class CorpusIndex:
    """Where each shard starts in the input file, found in one validating pass."""

    path: Path
    kind: str  # "txt" or "jsonl"
    num_records: int
    shard_offsets: list[int]  # byte offset of each shard's first record
    shard_first_lines: list[int]  # 1-based line number of each shard's first record
    sha256: str


def index_corpus(path: str | os.PathLike, *, shard_size: int, id_field: str = "id",
                 text_field: str = "text") -> CorpusIndex:
    """Check every record of a .txt (one text per line) or .jsonl corpus and record where shards start.
    Raises ValueError naming file:line for an empty line, invalid JSON, a missing field or a non-string text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Corpus {path} does not exist.")
    kind = {".txt": "txt", ".jsonl": "jsonl"}.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: give a .txt file (one text per line) or a .jsonl file (id and text fields).")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1; got {shard_size}.")
    digest, offsets, first_lines, count, offset = hashlib.sha256(), [], [], 0, 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            digest.update(raw)
            if kind == "jsonl" and not raw.strip():
                offset += len(raw)
                continue
            _parse(raw, kind, path, line_number, id_field, text_field, count)
            if count % shard_size == 0:
                offsets.append(offset)
                first_lines.append(line_number)
            count += 1
            offset += len(raw)
    if count == 0:
        raise ValueError(f"{path} holds no records; give a corpus with at least one text.")
    return CorpusIndex(path.absolute(), kind, count, offsets, first_lines, digest.hexdigest())


def _parse(raw: bytes, kind: str, path: Path, line: int, id_field: str, text_field: str, position: int):
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path}:{line}: not valid UTF-8.") from None
    if kind == "txt":
        if not text.strip():
            raise ValueError(f"{path}:{line}: empty line; every line must hold a text (remove empty lines).")
        return str(position), text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{line}: not valid JSON ({exc.msg}).") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line}: expected a JSON object with {id_field!r} and {text_field!r}.")
    for field in (id_field, text_field):
        if field not in record:
            raise ValueError(f"{path}:{line}: missing field {field!r} (choose it with --id-field/--text-field).")
    if not isinstance(record[text_field], str) or not record[text_field].strip():
        raise ValueError(f"{path}:{line}: field {text_field!r} must be a non-empty string.")
    return str(record[id_field]), record[text_field]


def _read_shard(index: CorpusIndex, shard: int, shard_size: int, id_field: str, text_field: str):
    ids, texts = [], []
    with index.path.open("rb") as handle:
        handle.seek(index.shard_offsets[shard])
        line = index.shard_first_lines[shard]
        while len(ids) < shard_size:
            raw = handle.readline()
            if not raw:
                break
            if index.kind == "jsonl" and not raw.strip():
                line += 1
                continue
            record_id, text = _parse(raw, index.kind, index.path, line, id_field, text_field,
                                     shard * shard_size + len(ids))
            ids.append(record_id)
            texts.append(text)
            line += 1
    return ids, texts


def _process_slot(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    if (shard_index is None) != (num_shards is None):
        raise ValueError("Give both shard_index and num_shards, or neither.")
    if shard_index is None:
        shard_index, num_shards = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards); got {shard_index} of {num_shards}.")
    return shard_index, num_shards


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes, *, overwrite: bool) -> None:
    with atomic_file(path, overwrite=overwrite, needed_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def _prepare_output(output: Path, run: dict, overwrite: bool) -> None:
    run_file = output / "run.json"
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"Output path {output} is a file; give a folder.")
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous == run:
            return
        if not overwrite:
            changed = sorted(k for k in set(previous) | set(run) if previous.get(k) != run.get(k))
            raise ValueError(
                f"{output} holds embeddings of a different run (changed: {', '.join(changed)}); use another output "
                "folder, or pass --overwrite (overwrite=True) to replace them."
            )
        shutil.rmtree(output)
    elif output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ValueError(f"{output} is not empty and holds no run.json; choose an empty or new folder, or pass "
                             "--overwrite (overwrite=True) to replace its contents.")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    _write_bytes(run_file, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode(), overwrite=True)


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
    """Embed every record of `input_path` into `output_dir` (see the module docstring for the layout).

    `encoder` is an `Encoder` (or anything with its `encode`). Returns a summary: `output_dir`, `num_records`,
    `num_shards`, `computed` and `skipped` (this process's shard names) and `manifest` (whether every shard is done
    and manifest.json was written). The corpus is checked completely before anything is written.
    """
    rank, world = _process_slot(shard_index, num_shards)
    index = index_corpus(input_path, shard_size=shard_size, id_field=id_field, text_field=text_field)
    output = Path(output_dir).absolute()
    total = len(index.shard_offsets)
    run = {
        "format": FORMAT, "input": str(index.path), "input_sha256": index.sha256, "num_records": index.num_records,
        "shard_size": shard_size, "num_shards": total, "id_field": id_field, "text_field": text_field,
        "model": str(getattr(encoder, "name_or_path", type(encoder).__name__)), "prompt": prompt,
        "prompt_name": prompt_name, "instruction": instruction,
        "dtype": str(getattr(getattr(encoder, "model", None), "dtype", "unknown")).removeprefix("torch."),
    }
    _prepare_output(output, run, overwrite)

    mine = list(range(rank, total, world))
    skipped = [s for s in mine if (output / f"{_shard_name(s)}.npy").is_file()]
    if skipped:
        logger.info("Resuming: %d of this process's %d shards are already done", len(skipped), len(mine))
    computed = []
    with tqdm(total=len(mine), initial=len(skipped), desc="Embedding shards", unit="shard",
              disable=not show_progress) as progress:
        for shard in mine:
            name = _shard_name(shard)
            if shard in skipped:
                continue
            ids, texts = _read_shard(index, shard, shard_size, id_field, text_field)
            embeddings = np.ascontiguousarray(encoder.encode(
                texts, prompt=prompt, prompt_name=prompt_name, instruction=instruction, batch_tokens=batch_tokens,
                show_progress=False,
            ), dtype=np.float32)
            _write_bytes(output / f"{name}.ids.json", json.dumps(ids).encode(), overwrite=True)
            _write_bytes(output / f"{name}.npy", _npy_bytes(embeddings), overwrite=False)
            computed.append(name)
            progress.update(1)

    done = all((output / f"{_shard_name(s)}.npy").is_file() for s in range(total))
    if done:
        shards = []
        for shard in range(total):
            name = _shard_name(shard)
            data = (output / f"{name}.npy").read_bytes()
            count = len(json.loads((output / f"{name}.ids.json").read_text()))
            shards.append({"name": name, "num_records": count, "sha256": hashlib.sha256(data).hexdigest()})
        dimension = int(np.load(output / f"{_shard_name(0)}.npy", mmap_mode="r").shape[1])
        manifest = {**run, "dimension": dimension, "shards": shards}
        _write_bytes(output / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
                     overwrite=True)
    logger.info("Process %d of %d: computed %d shard(s), skipped %d; %s", rank, world, len(computed), len(skipped),
                "all shards done, manifest written" if done else "other shards pending")
    return {"output_dir": str(output), "num_records": index.num_records, "num_shards": total,
            "computed": computed, "skipped": [_shard_name(s) for s in skipped], "manifest": done}
