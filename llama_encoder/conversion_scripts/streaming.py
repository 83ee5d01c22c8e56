"""Merge LoRA adapters into a base checkpoint one tensor at a time, writing output shards as they fill.

Peak memory is about one output shard, one input tensor (in float32 while deltas are added) and the adapters,
whatever the size of the base: input shards are read tensor by tensor with `safetensors.safe_open`, and each
output shard is written and released as soon as the next tensor would overflow it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def _file_headers(files: Sequence[Path]) -> dict[Path, dict[str, tuple[int, ...]]]:
    """Open every file's header up front so a corrupt shard fails before any work is done."""
    headers = {}
    for file in files:
        try:
            with _open(file) as handle:
                headers[file] = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except SafetensorError as exc:
            raise _corrupt(file, exc) from exc
    return headers


def _check_index_covered(weight_map: dict[str, str], headers: dict[Path, dict[str, tuple[int, ...]]]) -> None:
    held = {(file.name, key) for file, header in headers.items() for key in header}
    absent = [name for name, shard in weight_map.items() if (shard, name) not in held]
    if absent:
        raise ValueError(
            f"The checkpoint's {SAFE_WEIGHTS_INDEX_NAME} lists {len(absent)} tensors that their shards do not "
            f"hold, e.g. {', '.join(absent[:3])}; the checkpoint is incomplete. Download it again."
        )


def _iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with _open(file) as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)
    except SafetensorError as exc:
        raise _corrupt(file, exc) from exc


def _iter_loader(loader: Callable[[], Mapping[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    state = dict(loader())
    for key in list(state):
        yield key, state.pop(key)  # drop our reference as we go so merged tensors do not pile up


TensorIterators = list[tuple[str, Callable[[], Iterator[tuple[str, torch.Tensor]]]]]


def _sources(base: BaseSource) -> tuple[TensorIterators, dict[str, tuple[int, ...]] | None]:
    """A (label, tensor iterator factory) per shard of `base`, and the encoder-named shapes of all its tensors
    when they are known up front (not for loaders). Every safetensors header is read here, so a corrupt or
    incomplete checkpoint fails before any work."""
    if isinstance(base, Mapping):
        shapes = {normalize_base_key(key): tuple(tensor.shape) for key, tensor in base.items()}
        shapes.pop(None, None)  # dropped tensors (lm_head)
        return [("state dict", lambda: _iter_loader(lambda: base))], shapes
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
    shapes = {normalize_base_key(key): shape for header in headers.values() for key, shape in header.items()}
    shapes.pop(None, None)
    return sources, shapes


def base_weight_shapes(base: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Encoder weight name -> shape for a safetensors base checkpoint (folder, file or list of files), read
    from the file headers only. Feed it to `lora.validate_adapter_against` before merging."""
    files = _resolve(base)[0] if isinstance(base, (str, os.PathLike)) else [Path(item) for item in base]
    shapes = {}
    for header in _file_headers(files).values():
        shapes.update({normalize_base_key(key): shape for key, shape in header.items()})
    shapes.pop(None, None)  # dropped tensors (lm_head)
    return shapes


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class _ShardWriter:
    """Write tensors into safetensors shards of at most `shard_size_bytes` (a bigger single tensor gets its own
    shard) without holding a shard in memory: each tensor's bytes go to a data file as soon as it is merged, and a
    full shard becomes `length + JSON header + data` by streaming that file after its header. Shards get temporary
    names until all are known, then `model-0000i-of-0000N`."""

    def __init__(self, out_dir: Path, shard_size_bytes: int):
        self.out_dir = out_dir
        self.shard_size_bytes = shard_size_bytes
        self.header: dict[str, dict] = {}
        self.data_path = out_dir / ".shard-data.tmp"
        self.data = None
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.header and self.pending_bytes + nbytes > self.shard_size_bytes:
            self.flush()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"Tensor {name} has dtype {tensor.dtype}, which safetensors cannot store.")
        if self.data is None:
            self.data = self.data_path.open("wb")
        flat = tensor.detach().contiguous().reshape(-1)
        if nbytes:  # raw little-endian bytes, written without a copy
            self.data.write(memoryview(flat.view(torch.uint8).numpy()))
        self.header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
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
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        path = self.out_dir / f".shard-{len(self.written) + 1:05d}.safetensors.tmp"
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
        count = len(self.written)
        if count == 1:
            self.written[0][0].rename(self.out_dir / SAFE_WEIGHTS_NAME)
            return [SAFE_WEIGHTS_NAME]
        weight_map = {}
        names = []
        for number, (path, keys) in enumerate(self.written, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / final)
            names.append(final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


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
    out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
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
    written as soon as its shard is full. `extra_tensors` (the pooling head) are appended unchanged except for
    the cast. `out_dir` must exist (the caller's `atomic_directory`); it receives `model.safetensors`, or
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`.

    Returns a summary: `total_size` (bytes), `files`, `num_tensors` and `merged_modules` (per adapter). Raises
    `ValueError` when an adapter targets a weight the base lacks or of another shape, or a name appears twice.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"Output folder {out_dir} does not exist; create it (atomic_directory) first.")
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive; got {shard_size_bytes}.")
    from .lora import validate_adapter_against  # lora imports this module at load time

    sources, shapes = _sources(base)
    if shapes is not None:  # fail before writing anything when the adapters cannot fit
        for adapter in adapters:
            validate_adapter_against(adapter, {}, shapes)
    total = None if shapes is None else len(shapes)
    writer = _ShardWriter(out_dir, shard_size_bytes)
    consumed: list[set[str]] = [set() for _ in adapters]
    seen: set[str] = set()

    def emit(name: str, tensor: torch.Tensor) -> None:
        if name in seen:
            raise ValueError(f"Tensor {name} appears twice in the base checkpoint and extra tensors; keep one.")
        seen.add(name)
        writer.add(name, tensor)

    extra = dict(extra_tensors or {})
    total = None if total is None else total + len(extra)
    with tqdm(total=total, desc="Merging", unit="tensor", disable=None) as progress:
        for label, source in sources:
            logger.debug("Reading %s", label)
            for key, tensor in source():
                name = normalize_base_key(key)
                merged = None if name is None else _merge_one(name, tensor, adapters, consumed, dtype)
                replaced = merged is not None and merged is not tensor
                del tensor  # drop the input before the writer may flush, so the two never coexist with a shard
                if merged is not None:
                    emit(name, merged)
                    progress.update()
                del merged
                if replaced:
                    _release_freed_memory()
        for name, tensor in extra.items():
            emit(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
            progress.update()

    for adapter, done in zip(adapters, consumed, strict=True):
        unconsumed = sorted((set(adapter.modules) | set(adapter.base_copies)) - done)
        if unconsumed:
            raise ValueError(
                f"The adapter at {adapter.path} targets {len(unconsumed)} weights that the base checkpoint does "
                f"not have, e.g. {', '.join(unconsumed[:5])}. It was trained on "
                f"{adapter.base_model_name_or_path or 'another base model'}; convert with that base."
            )
    files = writer.finish()
    summary = {
        "total_size": writer.total_size,
        "files": files,
        "num_tensors": len(seen),
        "merged_modules": [len(adapter.modules) for adapter in adapters],
    }
    logger.info("Merged %s LoRA modules into %d tensors (%d file(s))", summary["merged_modules"], len(seen), len(files))
    return summary


__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "base_weight_shapes",
    "normalize_base_key",
    "resolve_base_files",
    "stream_merge",
]
