"""The one merge of LoRA adapters into base weights, used by `convert` (streamed to shards), by training (the model
trained on) and by verification (the reference): every adapter's delta is added in order, in float32, and the sum
is rounded once to the output dtype. So a model trained on top of earlier adapters is exactly the model `convert`
writes from them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ..errors import InputError
from .lora import LoraAdapter, validate_adapter_against
from .shards import BaseSource, TensorSource, tensor_source
from .streaming import output_dtype, write_shards

logger = logging.getLogger(__name__)


def _matches_copy(copy: torch.Tensor, current: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether an adapter's saved copy of a weight is the weight it was trained on, up to rounding in `dtype`."""
    if copy.shape != current.shape:
        return False
    tolerance = 4 * torch.finfo(dtype).eps
    scale = float(current.abs().max()) if current.numel() else 0.0
    return torch.allclose(copy.float(), current.float(), rtol=tolerance, atol=tolerance * scale)


def merge_tensor(
    name: str,
    tensor: torch.Tensor,
    adapters: Sequence[LoraAdapter],
    applied: list[set[str]] | None = None,
) -> torch.Tensor:
    """`tensor` (the base weight called `name`) with the delta of every adapter that targets it added, in order
    (the second adapter on the first one's result), in float32: the caller rounds the result once. Returns `tensor`
    itself when no adapter targets it. An adapter's saved copy of the weight (peft's embedding copy) must equal the
    weight it is merged into. `applied`, one set per adapter, collects the names each adapter was applied to."""
    merged = None
    for number, adapter in enumerate(adapters):
        copy = adapter.base_copies.get(name)
        if copy is not None:
            if not _matches_copy(copy, tensor if merged is None else merged, tensor.dtype):
                raise InputError(
                    f"The adapter at {adapter.path} carries its own copy of {name} that differs from the weight it "
                    "is merged into (peft saved the embedding, e.g. after resizing the vocabulary). Merge it with "
                    "peft instead, or use the base model the adapter was trained on."
                )
            if applied is not None:
                applied[number].add(name)
        if name in adapter.modules:
            try:
                merged = adapter.merge_into(name, tensor.float() if merged is None else merged)
            except ValueError as exc:
                raise InputError(f"Cannot merge the adapter at {adapter.path} into {name}: {exc}") from exc
            if applied is not None:
                applied[number].add(name)
    return tensor if merged is None else merged


class AdapterMerge:
    """`merge_tensor` over one pass of a base's tensors, remembering what each adapter was applied to, so that
    `check_complete` can refuse an adapter whose targets the base does not have."""

    def __init__(self, adapters: Sequence[LoraAdapter]):
        self.adapters = list(adapters)
        self.applied: list[set[str]] = [set() for _ in self.adapters]

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return merge_tensor(name, tensor, self.adapters, self.applied)

    def check_complete(self) -> None:
        for adapter, done in zip(self.adapters, self.applied, strict=True):
            unapplied = sorted((set(adapter.modules) | set(adapter.base_copies)) - done)
            if unapplied:
                raise InputError(
                    f"The adapter at {adapter.path} targets {len(unapplied)} weights that the base checkpoint "
                    f"does not have, e.g. {', '.join(unapplied[:5])}. It was trained on "
                    f"{adapter.base_model_name_or_path or 'another base model'}; convert with that base."
                )


def merged_state_dict(
    tensors: Iterable[tuple[str, torch.Tensor]],
    adapters: Sequence[LoraAdapter],
    *,
    dtype: torch.dtype | None = None,
    inspect: Callable[[str, torch.Tensor], object] | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of `tensors` (encoder name, base tensor; e.g. `BaseModel.tensor_source()`) with `adapters`
    merged by `merge_tensor`, each floating tensor rounded once to `dtype` (None: its own dtype). `inspect(name,
    merged)` sees each tensor before that rounding (float32 where an adapter was merged). Raises `InputError` when an
    adapter targets a weight that `tensors` lack."""
    merge = AdapterMerge(adapters)
    state = {}
    for name, tensor in tensors:
        merged = merge(name, tensor)
        if inspect is not None:
            inspect(name, merged)
        state[name] = merged.to(output_dtype(tensor.dtype, dtype))
        del tensor, merged
    merge.check_complete()
    return state


def stream_merge(
    base: BaseSource | TensorSource,
    adapters: Sequence[LoraAdapter],
    out_dir: str | os.PathLike,
    *,
    shard_size_bytes: int,
    dtype: torch.dtype | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Write the base weights with every adapter merged in, as safetensors shards in `out_dir`, one tensor at a time
    (`streaming.write_shards` with `merge_tensor` as its transform).

    `base` is what `shards.tensor_source` takes (a folder, files, loaders or a state dict), or a `TensorSource`.
    Whatever the headers tell (not a loader's tensors) is checked against every adapter before anything is written.
    Returns the writer's summary plus `merged_modules` (LoRA modules per adapter). Raises `InputError` when an adapter
    targets a weight the base lacks or of another shape."""
    source = base if isinstance(base, TensorSource) else tensor_source(base)
    if source.shapes is not None:
        for adapter in adapters:
            validate_adapter_against(adapter, {}, source.shapes)
    merge = AdapterMerge(adapters)
    summary = write_shards(source, out_dir, shard_size_bytes=shard_size_bytes, dtype=dtype, transform=merge,
                           extra_tensors=extra_tensors, check=merge.check_complete)
    summary["merged_modules"] = [len(adapter.modules) for adapter in adapters]
    logger.info("Merged %s LoRA modules into %d tensors (%d file(s))", summary["merged_modules"],
                summary["num_tensors"], len(summary["files"]))
    return summary


__all__ = ["AdapterMerge", "merge_tensor", "merged_state_dict", "stream_merge"]
