"""Write named tensors to disk one at a time as safetensors shards, whatever they are (the LoRA-agnostic writer).

Peak memory is about one input tensor (plus what `transform` makes of it), whatever the size of the source or of the
output shards. When every tensor's name, dtype and shape is known before reading (safetensors headers, an in-memory
state dict), the output shards are planned up front: each file starts with its final header and each tensor is
written at its planned offset as soon as it is computed. Tensors from `(label, loader)` pairs are only known once
loaded: they are spooled to a data file that is copied behind its header when the shard is full.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import InputChangedError, InputError, MissingInputError
from .names import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from .shards import SAFETENSORS_DTYPES, BaseSource, TensorSource, tensor_source

logger = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps freed blocks under its (adaptive, up to 32 MiB) mmap
    threshold resident; without this, inputs freed between kept merged tensors grow RSS well past one shard."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def output_dtype(dtype: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of `dtype` is written in: `cast` for floating tensors when given, else its own."""
    return cast if cast is not None and dtype.is_floating_point else dtype


def _dtype_code(name: str, dtype: torch.dtype) -> str:
    if dtype not in SAFETENSORS_DTYPES:
        raise InputError(f"Tensor {name} has dtype {dtype}, which safetensors cannot store; cast it first.")
    return SAFETENSORS_DTYPES[dtype]


def _header_bytes(entries: dict[str, dict]) -> bytes:
    """A safetensors JSON header for `entries` (name -> dtype, shape, data_offsets), padded with spaces so the
    tensor data after it starts 8-byte aligned."""
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)


def _write_tensor(handle, tensor: torch.Tensor) -> None:
    """Write `tensor`'s raw little-endian bytes at `handle`'s position, through a view of its memory (no copy
    unless it is not contiguous)."""
    if tensor.numel():
        flat = tensor.detach().contiguous().reshape(-1)
        handle.write(memoryview(flat.view(torch.uint8).numpy()))  # a byte view works for bf16, which numpy lacks


def _publish(out_dir: Path, shards: list[tuple[Path, list[str]]], total_size: int) -> list[str]:
    """Give the written shards (temporary path, tensor names) their final names, `model.safetensors` or
    `model-0000i-of-0000N.safetensors` plus the index; return the file names."""
    count = len(shards)
    if count == 1:
        shards[0][0].rename(out_dir / SAFE_WEIGHTS_NAME)
        return [SAFE_WEIGHTS_NAME]
    weight_map = {}
    names = []
    for number, (path, keys) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{count:05d}.safetensors"
        path.rename(out_dir / final)
        names.append(final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _temporary_shard(out_dir: Path, number: int) -> Path:
    return out_dir / f".shard-{number:05d}.safetensors.tmp"


@dataclass(frozen=True)
class _Slot:
    """One output tensor as it will be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{self.name} ({self.dtype}, shape {self.shape})"


def _plan_shards(slots: Sequence[_Slot], shard_size_bytes: int) -> list[list[_Slot]]:
    """Split `slots` (in arrival order) into consecutive shards of at most `shard_size_bytes`; a bigger tensor
    gets a shard of its own."""
    shards: list[list[_Slot]] = []
    size = 0
    for slot in slots:
        if not shards or (shards[-1] and size + slot.nbytes > shard_size_bytes):
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
    return shards


class _PlannedShardWriter:
    """Write tensors into shards laid out before any tensor is read: each file is opened with its final header and
    every tensor is written at its planned offset as it arrives, so no shard is ever held in memory. Within a
    shard, tensors with wider elements come first (as `save_file` orders them) so every tensor is aligned."""

    def __init__(self, out_dir: Path, shards: list[list[_Slot]]):
        self.out_dir = out_dir
        self.order = [slot for shard in shards for slot in shard]
        self.shard_of = [number for number, shard in enumerate(shards) for _ in shard]
        self.paths = [_temporary_shard(out_dir, number) for number in range(1, len(shards) + 1)]
        self.names = [[slot.name for slot in shard] for shard in shards]
        self.headers: list[bytes] = []
        self.file_offsets: dict[str, int] = {}
        self.sizes: list[int] = []
        for shard in shards:
            entries, offsets, position = {}, {}, 0
            for slot in sorted(shard, key=lambda slot: -slot.dtype.itemsize):  # stable: arrival order otherwise
                entries[slot.name] = {
                    "dtype": _dtype_code(slot.name, slot.dtype),
                    "shape": list(slot.shape),
                    "data_offsets": [position, position + slot.nbytes],
                }
                offsets[slot.name] = position
                position += slot.nbytes
            header = _header_bytes(entries)
            self.headers.append(header)
            self.sizes.append(position)
            self.file_offsets.update({name: 8 + len(header) + offset for name, offset in offsets.items()})
        self.total_size = sum(self.sizes)
        self.position = 0
        self.current = -1
        self.handle = None

    def _changed(self, found: str) -> InputChangedError:
        return InputChangedError(
            f"The base checkpoint changed while it was read: {found} where its headers promised "
            f"{self.order[self.position] if self.position < len(self.order) else 'no more tensors'}. Make sure "
            "nothing rewrites the base folder during the merge and run it again."
        )

    def add(self, name: str, tensor: torch.Tensor) -> None:
        arrived = _Slot(name, tensor.dtype, tuple(tensor.shape))
        if self.position >= len(self.order) or arrived != self.order[self.position]:
            raise self._changed(str(arrived))
        shard = self.shard_of[self.position]
        if shard != self.current:
            self._close()
            self.handle = self.paths[shard].open("wb")
            self.handle.write(len(self.headers[shard]).to_bytes(8, "little"))
            self.handle.write(self.headers[shard])
            self.current = shard
        self.handle.seek(self.file_offsets[name])
        _write_tensor(self.handle, tensor)
        self.position += 1

    def _close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
            logger.info("Wrote shard %d (%.1f MiB)", self.current + 1, self.sizes[self.current] / 2**20)

    def finish(self) -> list[str]:
        if self.position != len(self.order):
            raise self._changed("the end of the checkpoint")
        self._close()
        return _publish(self.out_dir, list(zip(self.paths, self.names, strict=True)), self.total_size)

    def discard(self) -> None:
        """Remove every file written so far (after an error)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        for path in self.paths:
            path.unlink(missing_ok=True)


class _SpoolingShardWriter:
    """Write tensors whose sizes are not known up front into safetensors shards of at most `shard_size_bytes`
    (a bigger single tensor gets its own shard) without holding a shard in memory: each tensor's bytes go to a
    data file as it arrives, and a full shard becomes `length + JSON header + data` by streaming that file after
    its header."""

    def __init__(self, out_dir: Path, shard_size_bytes: int):
        self.out_dir = out_dir
        self.shard_size_bytes = shard_size_bytes
        self.header: dict[str, dict] = {}
        self.data_path = out_dir / ".shard-data.tmp"
        self.data = None
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.seen: set[str] = set()
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.seen:
            raise InputError(f"Tensor {name} appears twice in the base checkpoint and extra tensors; keep one.")
        self.seen.add(name)
        code = _dtype_code(name, tensor.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if self.header and self.pending_bytes + nbytes > self.shard_size_bytes:
            self.flush()
        if self.data is None:
            self.data = self.data_path.open("wb")
        _write_tensor(self.data, tensor)
        self.header[name] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [self.pending_bytes, self.pending_bytes + nbytes],
        }
        self.pending_bytes += nbytes
        self.total_size += nbytes

    def flush(self) -> None:
        if not self.header:
            return
        self.data.close()
        self.data = None
        header = _header_bytes(self.header)
        path = _temporary_shard(self.out_dir, len(self.written) + 1)
        with path.open("wb") as shard, self.data_path.open("rb") as data:
            shard.write(len(header).to_bytes(8, "little"))
            shard.write(header)
            shutil.copyfileobj(data, shard, length=16 * 2**20)
        self.data_path.unlink()
        logger.info("Wrote shard %d (%.1f MiB)", len(self.written) + 1, self.pending_bytes / 2**20)
        self.written.append((path, list(self.header)))
        self.header = {}
        self.pending_bytes = 0
        release_freed_memory()

    def finish(self) -> list[str]:
        self.flush()
        return _publish(self.out_dir, self.written, self.total_size)

    def discard(self) -> None:
        """Remove every file written so far (after an error)."""
        if self.data is not None:
            self.data.close()
            self.data = None
        self.data_path.unlink(missing_ok=True)
        for path, _ in self.written:
            path.unlink(missing_ok=True)


def write_shards(
    base: BaseSource | TensorSource,
    out_dir: str | os.PathLike,
    *,
    shard_size_bytes: int,
    dtype: torch.dtype | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    check: Callable[[], None] | None = None,
) -> dict:
    """Write every tensor of `base` (see `shards.tensor_source`), then `extra_tensors`, as safetensors shards in
    `out_dir`.

    Each tensor goes through `transform(name, tensor)` (default: unchanged; it must keep the shape) and is cast to
    `dtype` (floating tensors only; `None` keeps each input tensor's dtype), then written to disk before the next one
    is read. Tensors fill output shards of at most `shard_size_bytes` (a bigger tensor gets its own) in the source's
    order. `check`, when given, is called after the last tensor; whatever it raises discards the shards. `out_dir`
    must exist (the caller's `atomic_directory`); it receives `model.safetensors`, or
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`, written under temporary names and renamed
    once all are complete (removed if anything fails).

    Returns a summary: `total_size` (bytes), `files` and `num_tensors`. Raises `InputError` when a name appears twice
    and `InputChangedError` when a file no longer holds what its header promised.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise MissingInputError(f"Output folder {out_dir} does not exist; create it (atomic_directory) first.")
    if shard_size_bytes <= 0:
        raise InputError(f"shard_size_bytes must be positive; got {shard_size_bytes}.")
    source = base if isinstance(base, TensorSource) else tensor_source(base)
    extra = dict(extra_tensors or {})
    if source.specs is None:
        writer: _PlannedShardWriter | _SpoolingShardWriter = _SpoolingShardWriter(out_dir, shard_size_bytes)
        total = None
    else:  # everything is known: lay out the output before reading any tensor
        slots = [_Slot(name, output_dtype(kind, dtype), shape) for name, kind, shape in source.specs]
        slots += [_Slot(name, output_dtype(t.dtype, dtype), tuple(t.shape)) for name, t in extra.items()]
        names = [slot.name for slot in slots]
        if len(set(names)) != len(names):
            twice = next(name for number, name in enumerate(names) if name in names[:number])
            raise InputError(f"Tensor {twice} appears twice in the base checkpoint and extra tensors; keep one.")
        writer = _PlannedShardWriter(out_dir, _plan_shards(slots, shard_size_bytes))
        total = len(slots)

    num_tensors = 0
    try:
        with tqdm(total=total, desc="Writing", unit="tensor", disable=None) as progress:
            for label, part in source.parts:
                logger.debug("Reading %s", label)
                for name, tensor in part():
                    written = tensor if transform is None else transform(name, tensor)
                    written = written.to(output_dtype(tensor.dtype, dtype))
                    replaced = written is not tensor
                    del tensor  # the input is freed before the output tensor is written
                    writer.add(name, written)
                    del written
                    if replaced:
                        release_freed_memory()
                    num_tensors += 1
                    progress.update()
            for name, tensor in extra.items():
                writer.add(name, tensor.to(output_dtype(tensor.dtype, dtype)))
                num_tensors += 1
                progress.update()
        if check is not None:
            check()
        files = writer.finish()
    except BaseException:
        writer.discard()
        raise
    return {"total_size": writer.total_size, "files": files, "num_tensors": num_tensors}


__all__ = ["output_dtype", "release_freed_memory", "write_shards"]
