"""Merge LoRA adapters into a base checkpoint one tensor at a time, writing each merged tensor to disk at once.

Peak memory is about one input tensor (in float32 while deltas are added) plus the adapters, whatever the size of
the base or of the output shards. Input shards are read tensor by tensor with `safetensors.safe_open`. When every
tensor's name, dtype and shape is known before reading (safetensors headers, an in-memory state dict), the output
shards are planned up front: each file starts with its final header and each merged tensor is written at its
planned offset as soon as it is computed. Tensors from `(label, loader)` pairs are only known once loaded: they are
spooled to a data file that is copied behind its header when the shard is full.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .lora import LoraAdapter

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# A shard supplied by the caller: a label for messages and a function that returns its tensors.
ShardLoader = tuple[str, Callable[[], Mapping[str, torch.Tensor]]]
BaseSource = str | os.PathLike | Mapping[str, torch.Tensor] | Iterable[str | os.PathLike | ShardLoader]

_ENCODER_ROOTS = ("layers.", "embed_tokens.", "norm.")


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps freed blocks under its (adaptive, up to 32 MiB) mmap
    threshold resident; without this, inputs freed between kept merged tensors grow RSS well past one shard."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def normalize_base_key(name: str) -> str | None:
    """Map a base checkpoint's tensor name to the encoder's: `model.layers.0...` -> `layers.0...` (likewise
    `model.embed_tokens.*`, `model.norm.*`); `lm_head.*` and rotary `inv_freq` buffers -> `None` (dropped).
    Names already in the encoder's form are returned unchanged."""
    if name.startswith("lm_head.") or name.endswith("rotary_emb.inv_freq"):
        return None
    if name.startswith("model.") and name[len("model.") :].startswith(_ENCODER_ROOTS):
        return name[len("model.") :]
    return name


def _resolve(path: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The checkpoint's safetensors files and, when it is sharded, its index's weight map."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"Base checkpoint {path} does not exist; pass a model folder or a .safetensors file.")
    if (path / SAFE_WEIGHTS_NAME).is_file():
        return [path / SAFE_WEIGHTS_NAME], None
    index_file = path / SAFE_WEIGHTS_INDEX_NAME
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{path} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}. Only safetensors checkpoints "
            "are read; convert pickled (.bin) weights with transformers' save_pretrained(safe_serialization=True)."
        )
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index_file} is not a valid index (no 'weight_map'); download it again.") from exc
    files = [path / name for name in dict.fromkeys(weight_map.values())]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index_file} names shards that are not in {path}: {', '.join(missing)}. Download the missing shards."
        )
    return files, weight_map


def resolve_base_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a base checkpoint: `path` itself when it is a file, else the folder's
    `model.safetensors` or the shards named by its `model.safetensors.index.json`, in index order.

    Raises `FileNotFoundError` when the folder has neither, or when a shard named in the index is missing.
    """
    return _resolve(path)[0]


def _open(file: Path):
    """`safe_open` reading with pread where safetensors supports it, so file pages are not mapped into the
    process (with mmap, every byte read stays resident until the file is closed)."""
    try:
        return safe_open(file, framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend argument
        return safe_open(file, framework="pt")


def _corrupt(file: Path, exc: Exception) -> ValueError:
    return ValueError(f"Cannot read {file}: {exc}. The file is truncated or corrupt; download it again.")


# An input header: tensor name -> (safetensors dtype code, shape).
FileHeader = dict[str, tuple[str, tuple[int, ...]]]


def _file_headers(files: Sequence[Path]) -> dict[Path, FileHeader]:
    """Open every file's header up front so a corrupt shard fails before any work is done."""
    headers = {}
    for file in files:
        try:
            with _open(file) as handle:
                header = {}
                for key in handle.keys():
                    view = handle.get_slice(key)
                    header[key] = (view.get_dtype(), tuple(view.get_shape()))
                headers[file] = header
        except SafetensorError as exc:
            raise _corrupt(file, exc) from exc
    return headers


def _check_index_covered(weight_map: dict[str, str], headers: dict[Path, FileHeader]) -> None:
    held = {(file.name, key) for file, header in headers.items() for key in header}
    absent = [name for name, shard in weight_map.items() if (shard, name) not in held]
    if absent:
        raise ValueError(
            f"The checkpoint's {SAFE_WEIGHTS_INDEX_NAME} lists {len(absent)} tensors that their shards do not "
            f"hold, e.g. {', '.join(absent[:3])}; the checkpoint is incomplete. Download it again."
        )


def _iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(encoder name, tensor) for each kept tensor of `file`, in `keys()` order; dropped tensors are never read."""
    try:
        with _open(file) as handle:
            for key in handle.keys():
                name = normalize_base_key(key)
                if name is not None:
                    yield name, handle.get_tensor(key)
    except SafetensorError as exc:
        raise _corrupt(file, exc) from exc


def _iter_loader(loader: Callable[[], Mapping[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(encoder name, tensor) for each kept tensor the loader returns, in its order."""
    state = dict(loader())
    for key in list(state):
        name = normalize_base_key(key)
        if name is None:
            del state[key]
        else:
            yield name, state.pop(key)  # drop our reference as we go so merged tensors do not pile up


TensorIterators = list[tuple[str, Callable[[], Iterator[tuple[str, torch.Tensor]]]]]
# A kept input tensor as known before reading: encoder name, dtype, shape.
InputSpec = tuple[str, torch.dtype, tuple[int, ...]]

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}


def _header_specs(file: Path, header: FileHeader) -> list[InputSpec]:
    """The kept tensors of one file, in the order `_iter_file` yields them."""
    specs = []
    for key, (code, shape) in header.items():
        name = normalize_base_key(key)
        if name is None:
            continue
        if code not in _TORCH_DTYPES:
            raise ValueError(
                f"{file} stores {key} as {code}, which this merger cannot write. Convert the base to float32, "
                "bfloat16 or float16 safetensors (e.g. with transformers' save_pretrained) and merge again."
            )
        specs.append((name, _TORCH_DTYPES[code], shape))
    return specs


def _sources(base: BaseSource) -> tuple[TensorIterators, list[InputSpec] | None]:
    """A (label, tensor iterator factory) per shard of `base`, and every kept tensor's name, dtype and shape in
    the order the iterators yield them when that is known up front (not for loaders). Every safetensors header
    is read here, so a corrupt or incomplete checkpoint fails before any work."""
    if isinstance(base, Mapping):
        specs = [(normalize_base_key(key), tensor.dtype, tuple(tensor.shape)) for key, tensor in base.items()]
        specs = [spec for spec in specs if spec[0] is not None]  # dropped tensors (lm_head)
        return [("state dict", lambda: _iter_loader(lambda: base))], specs
    if isinstance(base, (str, os.PathLike)):
        items, weight_map = _resolve(base)
    else:
        items, weight_map = list(base), None
    files = [Path(item) for item in items if isinstance(item, (str, os.PathLike))]
    headers = _file_headers(files)
    if weight_map is not None:
        _check_index_covered(weight_map, headers)
    sources: TensorIterators = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            sources.append((str(item), lambda file=Path(item): _iter_file(file)))
        elif isinstance(item, tuple) and len(item) == 2 and callable(item[1]):
            sources.append((str(item[0]), lambda loader=item[1]: _iter_loader(loader)))
        else:
            raise TypeError(
                f"Each base shard must be a safetensors path or a (label, loader) pair; got {type(item).__name__}."
            )
    if len(files) != len(items):
        return sources, None
    return sources, [spec for file in files for spec in _header_specs(file, headers[file])]


def base_weight_shapes(base: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Encoder weight name -> shape for a safetensors base checkpoint (folder, file or list of files), read
    from the file headers only. Feed it to `lora.validate_adapter_against` before merging."""
    files = _resolve(base)[0] if isinstance(base, (str, os.PathLike)) else [Path(item) for item in base]
    shapes = {}
    for header in _file_headers(files).values():
        shapes.update({normalize_base_key(key): shape for key, (_, shape) in header.items()})
    shapes.pop(None, None)  # dropped tensors (lm_head)
    return shapes


def _output_dtype(dtype: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of `dtype` is written in: `cast` for floating tensors when given, else its own."""
    return cast if cast is not None and dtype.is_floating_point else dtype


def _dtype_code(name: str, dtype: torch.dtype) -> str:
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"Tensor {name} has dtype {dtype}, which safetensors cannot store; cast it first.")
    return _SAFETENSORS_DTYPES[dtype]


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

    def _changed(self, found: str) -> RuntimeError:
        return RuntimeError(
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
            raise ValueError(f"Tensor {name} appears twice in the base checkpoint and extra tensors; keep one.")
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
        _release_freed_memory()

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


def _matches_copy(copy: torch.Tensor, current: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether an adapter's saved copy of a weight is the weight it was trained on, up to rounding in `dtype`."""
    if copy.shape != current.shape:
        return False
    tolerance = 4 * torch.finfo(dtype).eps
    scale = float(current.abs().max()) if current.numel() else 0.0
    return torch.allclose(copy.float(), current.float(), rtol=tolerance, atol=tolerance * scale)


def _merge_one(
    name: str,
    tensor: torch.Tensor,
    adapters: Sequence[LoraAdapter],
    consumed: list[set[str]],
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """Apply every adapter that targets `name`, in order, accumulating in float32 so the result is rounded once,
    to `dtype` (floating tensors only; `None` keeps the tensor's dtype)."""
    out_dtype = _output_dtype(tensor.dtype, dtype)
    merged = None
    for number, adapter in enumerate(adapters):
        copy = adapter.base_copies.get(name)
        if copy is not None:
            if not _matches_copy(copy, tensor if merged is None else merged, tensor.dtype):
                raise ValueError(
                    f"The adapter at {adapter.path} carries its own copy of {name} that differs from the weight it "
                    "is merged into (peft saved the embedding, e.g. after resizing the vocabulary). Merge it with "
                    "peft instead, or use the base model the adapter was trained on."
                )
            consumed[number].add(name)
        if name in adapter.modules:
            try:
                merged = adapter.merge_into(name, tensor.float() if merged is None else merged)
            except ValueError as exc:
                raise ValueError(f"Cannot merge the adapter at {adapter.path} into {name}: {exc}") from exc
            consumed[number].add(name)
    return (tensor if merged is None else merged).to(out_dtype)


def stream_merge(
    base: BaseSource,
    adapters: Sequence[LoraAdapter],
    out_dir: str | os.PathLike,
    *,
    shard_size_bytes: int,
    dtype: torch.dtype | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Write the base weights with every adapter merged in, as safetensors shards in `out_dir`.

    `base` is a checkpoint folder or `.safetensors` file, a list of safetensors files and/or `(label, loader)`
    pairs whose loader returns one shard's tensors, or one in-memory state dict (e.g. a dequantised GGUF).
    Each tensor is renamed with `normalize_base_key`, gets the adapters' deltas in order (the second adapter on
    the first one's result), is cast to `dtype` (floating tensors only; `None` keeps each tensor's dtype) and is
    written to disk before the next one is read. `extra_tensors` (the pooling head) are appended unchanged except
    for the cast. Tensors fill output shards of at most `shard_size_bytes` (a bigger tensor gets its own) in the
    base's order. `out_dir` must exist (the caller's `atomic_directory`); it receives `model.safetensors`, or
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`. Files are written under temporary
    names, renamed once all are complete, and removed if the merge fails.

    Returns a summary: `total_size` (bytes), `files`, `num_tensors` and `merged_modules` (per adapter). Raises
    `ValueError` when an adapter targets a weight the base lacks or of another shape, or a name appears twice;
    whatever is known from the headers (not a loader's tensors) is checked before anything is written.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"Output folder {out_dir} does not exist; create it (atomic_directory) first.")
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive; got {shard_size_bytes}.")
    from .lora import validate_adapter_against  # lora imports this module at load time

    sources, specs = _sources(base)
    extra = dict(extra_tensors or {})
    if specs is None:
        writer: _PlannedShardWriter | _SpoolingShardWriter = _SpoolingShardWriter(out_dir, shard_size_bytes)
        total = None
    else:  # everything is known: check it all, then lay out the output, before reading any tensor
        shapes = {name: shape for name, _, shape in specs}
        for adapter in adapters:
            validate_adapter_against(adapter, {}, shapes)
        slots = [_Slot(name, _output_dtype(kind, dtype), shape) for name, kind, shape in specs]
        slots += [_Slot(name, _output_dtype(t.dtype, dtype), tuple(t.shape)) for name, t in extra.items()]
        names = [slot.name for slot in slots]
        if len(set(names)) != len(names):
            twice = next(name for number, name in enumerate(names) if name in names[:number])
            raise ValueError(f"Tensor {twice} appears twice in the base checkpoint and extra tensors; keep one.")
        writer = _PlannedShardWriter(out_dir, _plan_shards(slots, shard_size_bytes))
        total = len(slots)

    consumed: list[set[str]] = [set() for _ in adapters]
    num_tensors = 0
    try:
        with tqdm(total=total, desc="Merging", unit="tensor", disable=None) as progress:
            for label, source in sources:
                logger.debug("Reading %s", label)
                for name, tensor in source():
                    merged = _merge_one(name, tensor, adapters, consumed, dtype)
                    replaced = merged is not tensor
                    del tensor  # the input is freed before the merged tensor is written
                    writer.add(name, merged)
                    del merged
                    if replaced:
                        _release_freed_memory()
                    num_tensors += 1
                    progress.update()
            for name, tensor in extra.items():
                writer.add(name, tensor.to(_output_dtype(tensor.dtype, dtype)))
                num_tensors += 1
                progress.update()

        for adapter, done in zip(adapters, consumed, strict=True):
            unconsumed = sorted((set(adapter.modules) | set(adapter.base_copies)) - done)
            if unconsumed:
                raise ValueError(
                    f"The adapter at {adapter.path} targets {len(unconsumed)} weights that the base checkpoint "
                    f"does not have, e.g. {', '.join(unconsumed[:5])}. It was trained on "
                    f"{adapter.base_model_name_or_path or 'another base model'}; convert with that base."
                )
        files = writer.finish()
    except BaseException:
        writer.discard()
        raise
    summary = {
        "total_size": writer.total_size,
        "files": files,
        "num_tensors": num_tensors,
        "merged_modules": [len(adapter.modules) for adapter in adapters],
    }
    logger.info("Merged %s LoRA modules into %d tensors (%d file(s))", summary["merged_modules"], num_tensors,
                len(files))
    return summary


__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "base_weight_shapes",
    "normalize_base_key",
    "resolve_base_files",
    "stream_merge",
]
