"""Reading a checkpoint's weights: its safetensors files (in shard-number order), their headers, and its tensors one
at a time under the encoder's names (`TensorSource`).

Files are read with `pread` where safetensors supports it, so file pages are not mapped into the process (with mmap,
every byte read stays resident until the file is closed). Every header is read before any tensor, so a corrupt or
incomplete checkpoint fails before any work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import InputError, MissingInputError
from .names import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, normalize_base_key

# A shard supplied by the caller: a label for messages and a function that returns its tensors.
ShardLoader = tuple[str, Callable[[], Mapping[str, torch.Tensor]]]
BaseSource = str | os.PathLike | Mapping[str, torch.Tensor] | Iterable[str | os.PathLike | ShardLoader]
# A file's header: tensor name -> (safetensors dtype code, shape).
FileHeader = dict[str, tuple[str, tuple[int, ...]]]
# A kept tensor as known before reading: encoder name, dtype, shape.
TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
FLOAT_CODES = ("F16", "BF16", "F32", "F64")


def index_shards(index: Path) -> tuple[list[str], dict[str, str]]:
    """The shard file names a `*.index.json` names, in shard-number (= name) order, and its weight map."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{index} is not a valid weight index ({exc!r}). Restore it from the original model.") from exc
    return names, weight_map


def checkpoint_files(
    folder: Path, *, index_name: str = SAFE_WEIGHTS_INDEX_NAME, single_name: str = SAFE_WEIGHTS_NAME,
    name: str | None = None,
) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a checkpoint folder, `single_name` or the shards its index names (in shard-number order),
    and the index's weight map (None for a single file). `name` is how messages call the checkpoint.

    Raises `MissingInputError` when the folder has neither, or when a shard named in the index is missing."""
    name = name or str(folder)
    if (folder / single_name).is_file():
        return [folder / single_name], None
    index = folder / index_name
    if not index.is_file():
        raise MissingInputError(
            f"{name} has neither {single_name} nor {index_name}. Only safetensors checkpoints are read; convert "
            "pickled (.bin) weights with transformers' save_pretrained(safe_serialization=True)."
        )
    shard_names, weight_map = index_shards(index)
    files = [folder / shard for shard in shard_names]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise MissingInputError(
            f"{name} is incomplete: {index_name} names weight files that are missing ({', '.join(missing)}). "
            "Download or copy the complete model again."
        )
    return files, weight_map


def _resolve(path: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    path = Path(path).expanduser()
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise MissingInputError(f"Base checkpoint {path} does not exist; pass a model folder or a .safetensors file.")
    return checkpoint_files(path)


def resolve_base_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: `path` itself when it is a file, else the folder's `model.safetensors`
    or the shards named by its `model.safetensors.index.json`, in shard-number order.

    Raises `MissingInputError` when the folder has neither, or when a shard named in the index is missing."""
    return _resolve(path)[0]


def open_safetensors(file: Path):
    """`safe_open` reading with pread where safetensors supports it (no file pages kept mapped)."""
    try:
        return safe_open(file, framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend argument
        return safe_open(file, framework="pt")


def _unreadable(file: Path, exc: Exception) -> InputError:
    return InputError(f"{file} is not a readable safetensors file ({exc}). Download it again.")


def read_headers(files: Sequence[Path]) -> dict[Path, FileHeader]:
    """Every file's header (tensor name -> dtype code, shape), read before any tensor: a corrupt shard fails here."""
    headers = {}
    for file in files:
        try:
            with open_safetensors(file) as handle:
                header = {}
                for key in handle.keys():
                    view = handle.get_slice(key)
                    header[key] = (view.get_dtype(), tuple(view.get_shape()))
                headers[file] = header
        except (SafetensorError, OSError) as exc:
            raise _unreadable(file, exc) from exc
    return headers


def read_tensors(files: Sequence[Path], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors named `keys` (names as stored) from whichever of `files` holds them; absent keys are left out."""
    wanted = set(keys)
    found = {}
    for file in files:
        try:
            with open_safetensors(file) as handle:
                for key in wanted.intersection(handle.keys()):
                    found[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise _unreadable(file, exc) from exc
    return found


def _check_index_covered(weight_map: dict[str, str], headers: dict[Path, FileHeader]) -> None:
    held = {(file.name, key) for file, header in headers.items() for key in header}
    absent = [name for name, shard in weight_map.items() if (shard, name) not in held]
    if absent:
        raise InputError(
            f"The checkpoint's {SAFE_WEIGHTS_INDEX_NAME} lists {len(absent)} tensors that their shards do not "
            f"hold, e.g. {', '.join(absent[:3])}; the checkpoint is incomplete. Download it again."
        )


def _iter_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(encoder name, tensor) for each kept tensor of `file`, in `keys()` order; dropped tensors are never read."""
    try:
        with open_safetensors(file) as handle:
            for key in handle.keys():
                name = normalize_base_key(key)
                if name is not None:
                    yield name, handle.get_tensor(key)
    except SafetensorError as exc:
        raise _unreadable(file, exc) from exc


def _iter_mapping(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(encoder name, tensor) for each kept tensor of `state`, popping each so that it is freed once used."""
    for key in list(state):
        tensor = state.pop(key)
        name = normalize_base_key(key)
        if name is not None:
            yield name, tensor
        del tensor


def _header_specs(file: Path, header: FileHeader) -> list[TensorSpec]:
    """The kept tensors of one file, in the order `_iter_file` yields them."""
    specs = []
    for key, (code, shape) in header.items():
        name = normalize_base_key(key)
        if name is None:
            continue
        if code not in TORCH_DTYPES:
            raise InputError(
                f"{file} stores {key} as {code}, which this merger cannot write. Convert the base to float32, "
                "bfloat16 or float16 safetensors (e.g. with transformers' save_pretrained) and merge again."
            )
        specs.append((name, TORCH_DTYPES[code], shape))
    return specs


@dataclass
class TensorSource:
    """A checkpoint's kept tensors under encoder names, one at a time: `parts` is a (label, iterator factory) per
    shard, `specs` every tensor's (name, dtype, shape) in the order they come, when that is known before reading
    (safetensors headers, a state dict; not tensors from loaders)."""

    parts: list[tuple[str, Callable[[], Iterator[tuple[str, torch.Tensor]]]]]
    specs: list[TensorSpec] | None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Encoder name -> shape, when the specs are known."""
        return None if self.specs is None else {name: shape for name, _, shape in self.specs}

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for _, part in self.parts:
            yield from part()


def tensor_source(base: BaseSource, *, consume: bool = False) -> TensorSource:
    """The tensors of `base`: a checkpoint folder or `.safetensors` file, a list of safetensors files and/or
    `(label, loader)` pairs whose loader returns one shard's tensors, or one in-memory state dict. With `consume`, a
    state dict is emptied as it is read, so each tensor is freed once the reader drops it. Every safetensors header
    is read here."""
    if isinstance(base, Mapping):
        specs = [(normalize_base_key(key), tensor.dtype, tuple(tensor.shape)) for key, tensor in base.items()]
        specs = [spec for spec in specs if spec[0] is not None]  # dropped tensors (lm_head)
        return TensorSource([("state dict", lambda: _iter_mapping(base if consume else dict(base)))], specs)
    if isinstance(base, (str, os.PathLike)):
        items, weight_map = _resolve(base)
    else:
        items, weight_map = list(base), None
    files = [Path(item) for item in items if isinstance(item, (str, os.PathLike))]
    headers = read_headers(files)
    if weight_map is not None:
        _check_index_covered(weight_map, headers)
    parts = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            parts.append((str(item), lambda file=Path(item): _iter_file(file)))
        elif isinstance(item, tuple) and len(item) == 2 and callable(item[1]):
            parts.append((str(item[0]), lambda loader=item[1]: _iter_mapping(dict(loader()))))
        else:
            raise TypeError(
                f"Each base shard must be a safetensors path or a (label, loader) pair; got {type(item).__name__}."
            )
    if len(files) != len(items):
        return TensorSource(parts, None)
    return TensorSource(parts, [spec for file in files for spec in _header_specs(file, headers[file])])


def base_weight_shapes(base: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Encoder weight name -> shape for a safetensors checkpoint (folder, file or list of files), from the file
    headers only. Feed it to `lora.validate_adapter_against` before merging."""
    files = _resolve(base)[0] if isinstance(base, (str, os.PathLike)) else [Path(item) for item in base]
    shapes = {}
    for header in read_headers(files).values():
        shapes.update({normalize_base_key(key): shape for key, (_, shape) in header.items()})
    shapes.pop(None, None)  # dropped tensors (lm_head)
    return shapes


__all__ = [
    "FLOAT_CODES",
    "SAFETENSORS_DTYPES",
    "TORCH_DTYPES",
    "BaseSource",
    "FileHeader",
    "ShardLoader",
    "TensorSource",
    "TensorSpec",
    "base_weight_shapes",
    "checkpoint_files",
    "index_shards",
    "open_safetensors",
    "read_headers",
    "read_tensors",
    "resolve_base_files",
    "tensor_source",
]
