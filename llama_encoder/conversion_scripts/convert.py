"""The package's main job: base LLM (+ LoRA adapters) -> a verified, self-contained encoder checkpoint.

Order of work: check the destination, resolve and validate the base and every adapter (nothing written yet), then,
inside one temporary sibling of the destination: stream-merge the weights, write config / Hub files / tokenizer /
sentence-transformers files, embed reference sentences with the package's own model, verify the folder in a fresh
process that cannot import the package, write the model card with the figures and the file manifest, and only then
rename the folder into place. Any failure leaves the destination as it was.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_directory, check_destination
from ..configuration_llama_encoder import POOLING_MODES, LlamaEncoderConfig
from ..dtypes import DTYPES
from ..modeling_llama_encoder import LatentAttentionPooling, LlamaEncoderModel
from .base_model import BaseModel, resolve_base
from .checkpoint import default_prompts, resolve_max_seq_length, write_checkpoint, write_model_card
from .lora import LoraAdapter, read_adapter, validate_adapter_against
from .streaming import base_weight_shapes, normalize_base_key, stream_merge
from .verify import DEFAULT_SENTENCES, compute_reference_embeddings, verify_checkpoint, write_verification_manifest

logger = logging.getLogger(__name__)

_LATENT_KEYS = (
    "latent_attention_num_latents",
    "latent_attention_num_heads",
    "latent_attention_head_dim",
    "latent_attention_mlp_dim",
)
# Keys of a base config that describe the source model, not the encoder written from it.
_BASE_ONLY_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "is_causal")
_LICENSE_FILES = re.compile(r"^(LICENSE|LICENCE|NOTICE|USE_POLICY)", re.IGNORECASE)


@dataclass
class ConvertResult:
    """What `convert` wrote: the checkpoint folder, its files, the adapters merged and the verification report."""

    out_dir: Path
    files: list[str]
    merged_adapters: list[dict]
    verification: dict
    pooling_mode: str
    dtype: str
    weights: dict = field(default_factory=dict)


def parse_size(size: str | int) -> int:
    """`"2GB"`, `"500MB"`, `"1.5GiB"` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"Cannot read size {size!r}; write it like 2GB, 500MB or 1073741824.")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), (match.group(3) or "").lower() == "ib"
    scale = (1024 if binary else 1000) ** "_KMGT".index(unit or "_")
    return int(number * scale)


def _resolve_dtype(name: str, base: BaseModel) -> torch.dtype:
    if name == "auto":
        stored = getattr(base.config, "dtype", None) or getattr(base.config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = DTYPES.get(stored)
        return stored if stored in DTYPES.values() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}; got {name!r}.")
    return DTYPES[name]


def _pooling_settings(adapters: list[LoraAdapter], pooling: str | None) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """The pooling mode, latent sizes and head tensors: from `pooling`, else from the last adapter that saved a
    pooling config, else the config's default."""
    saved = next((a for a in reversed(adapters) if a.pooling_config or a.pooling_head), None)
    saved_mode = (saved.pooling_config or {}).get("pooling_mode") if saved else None
    if saved is not None and saved.pooling_head and saved_mode is None:
        saved_mode = "latent_attention"
    if pooling is not None and pooling not in POOLING_MODES:
        raise ValueError(f"--pooling must be one of {', '.join(POOLING_MODES)}; got {pooling!r}.")
    if pooling is not None and saved_mode is not None and pooling != saved_mode:
        raise ValueError(
            f"Adapter {saved.path} was trained with pooling {saved_mode!r} but --pooling {pooling!r} was given; "
            f"omit --pooling to keep the trained pooling, or pass --pooling {saved_mode}."
        )
    mode = pooling or saved_mode or LlamaEncoderConfig().pooling_mode
    sizes = {k: v for k, v in ((saved.pooling_config or {}) if saved else {}).items() if k in _LATENT_KEYS}
    head = dict(saved.pooling_head) if saved is not None and mode == "latent_attention" else {}
    return mode, sizes, head


def encoder_config(base: BaseModel, mode: str, sizes: dict, dtype: torch.dtype, normalize: bool | None):
    """The `LlamaEncoderConfig` for `base` with pooling `mode`, latent-head `sizes` and weights of `dtype`."""
    values = {k: v for k, v in base.config.to_dict().items() if k not in _BASE_ONLY_KEYS}
    values.pop("torch_dtype", None)
    values.update(sizes, pooling_mode=mode)
    if normalize is not None:
        values["normalize_embeddings"] = normalize
    config = LlamaEncoderConfig(**values)
    config.dtype = str(dtype).removeprefix("torch.")  # describes the weights the merger writes
    return config


def _initial_latent_head(config: LlamaEncoderConfig) -> dict[str, torch.Tensor]:
    """A freshly initialised latent-attention head, the way `LlamaEncoderModel` initialises a missing one."""
    torch.manual_seed(0)
    head = LatentAttentionPooling(config)
    std = config.initializer_range
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        head.latents.normal_(0.0, std)
    return {f"latent_attention.{name}": tensor.detach().clone() for name, tensor in head.state_dict().items()}


def source_weight_shapes(source: BaseModel) -> dict[str, tuple[int, ...]]:
    """Encoder weight name -> shape for a resolved base (from safetensors headers, or its state dict)."""
    if source.safetensors_files:
        return base_weight_shapes(source.safetensors_files)
    named = ((normalize_base_key(key), tuple(tensor.shape)) for key, tensor in source.state_dict.items())
    return {name: shape for name, shape in named if name is not None}


def _adapter_record(adapter: LoraAdapter) -> dict:
    trained_on = f" (trained on {adapter.base_model_name_or_path})" if adapter.base_model_name_or_path else ""
    return {
        "name": f"{adapter.path.name}{trained_on}",
        "path": str(adapter.path),
        "r": adapter.config.get("r"),
        "alpha": adapter.config.get("lora_alpha"),
        "use_rslora": bool(adapter.config.get("use_rslora")),
        "target_modules": sorted({name.split(".")[-2] for name in adapter.modules}),
    }


def convert(
    *,
    out: str | os.PathLike,
    base: str | None = None,
    gguf: str | os.PathLike | None = None,
    adapters: list[str | os.PathLike] | tuple = (),
    pooling: str | None = None,
    query_instruction: str | None = None,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    normalize: bool | None = None,
    max_seq_length: int | None = None,
    dtype: str = "auto",
    shard_size: str | int = "2GB",
    padding_side: str = "right",
    model_id: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike | None = None,
    tolerance: float = 1e-4,
) -> ConvertResult:
    """Convert a base Llama LLM plus LoRA adapters (merged in the order given) into an encoder checkpoint at `out`.

    `base` is a local HF folder or a Hub repo id, `gguf` a GGUF file; with neither, the embedded SmolLM2-135M-Instruct.
    `pooling` defaults to what the last adapter was trained with, else mean. The query prompt is `query_prompt`
    verbatim, or the config's instruction template filled with `query_instruction`. Returns a `ConvertResult`;
    raises `ValueError`/`FileNotFoundError`/`FileExistsError` for bad input before anything is written, and
    `VerificationError` if the written checkpoint does not embed like the merged model (nothing is left in place).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be left or right; got {padding_side!r}.")
    if query_prompt is not None and query_instruction is not None:
        raise ValueError("Give either a query instruction or a full query prompt, not both.")
    shard_bytes = parse_size(shard_size)
    dest = check_destination(out, overwrite=overwrite)

    source = resolve_base(
        base=base, gguf=gguf, cache_dir=Path(cache_dir) if cache_dir else None, allow_pickle=allow_pickle
    )
    loaded = [read_adapter(path, allow_pickle=allow_pickle) for path in adapters]
    shapes = source_weight_shapes(source)
    for adapter in loaded:
        validate_adapter_against(adapter, source.config.to_dict(), shapes)
        if adapter.base_model_name_or_path and adapter.base_model_name_or_path != source.name:
            logger.warning(
                "Adapter %s names %s as its base; merging it into %s. Shapes are checked, but make sure this is the "
                "model it was trained on.", adapter.path, adapter.base_model_name_or_path, source.name,
            )
    mode, sizes, head = _pooling_settings(loaded, pooling)
    torch_dtype = _resolve_dtype(dtype, source)
    config = encoder_config(source, mode, sizes, torch_dtype, normalize)
    if mode == "latent_attention" and not head:
        logger.warning(
            "Pooling is latent_attention but no adapter carries a trained latent-attention head; the head is "
            "freshly initialised (close to mean pooling). Train it with the adapters to get its benefit."
        )
        head = _initial_latent_head(config)

    prompts = default_prompts(config)
    if query_instruction is not None:
        prompts["query"] = config.instruction_template.replace("{instruction}", query_instruction)
    if query_prompt is not None:
        prompts["query"] = query_prompt
    if document_prompt is not None:
        prompts["document"] = document_prompt
    max_seq_length = resolve_max_seq_length(config, source.tokenizer, max_seq_length)
    records = [_adapter_record(adapter) for adapter in loaded]
    weights_source = source.safetensors_files or source.state_dict
    # What the merged shards take in the output dtype (the other files are small), for a disk-full message.
    needed = torch_dtype.itemsize * (sum(map(math.prod, shapes.values())) + sum(t.numel() for t in head.values()))

    logger.info("Converting %s with %d adapter(s), pooling %s, into %s", source.name, len(loaded), mode, dest)
    with atomic_directory(dest, overwrite=overwrite, needed_bytes=needed) as tmp:
        weights = stream_merge(weights_source, loaded, tmp, shard_size_bytes=shard_bytes, dtype=torch_dtype,
                               extra_tensors=head or None)
        del head
        source.state_dict = None  # a GGUF base's tensors are in the shards now
        gc.collect()
        card_args = dict(
            tokenizer=source.tokenizer, model_id=model_id or str(dest), base_name=source.name, license=source.license,
            merged_adapters=records, prompts=prompts, max_seq_length=max_seq_length,
        )
        write_checkpoint(None, out_dir=tmp, weights_written=True, config=config, padding_side=padding_side, **card_args)
        for name, path in source.source_files.items():
            if _LICENSE_FILES.match(name):
                shutil.copyfile(path, tmp / name)

        model = LlamaEncoderModel.from_pretrained(tmp, dtype=torch_dtype).eval()
        expected = {
            "plain": compute_reference_embeddings(model, source.tokenizer, DEFAULT_SENTENCES,
                                                  max_length=max_seq_length),
            "query": compute_reference_embeddings(model, source.tokenizer, DEFAULT_SENTENCES, prompts["query"],
                                                  max_length=max_seq_length),
        }
        del model
        gc.collect()
        report = verify_checkpoint(tmp, expected=expected, tolerance=tolerance, write_manifest=False)
        card_args.pop("tokenizer")
        write_model_card(tmp, config=config, verification=report, **card_args)
        report = write_verification_manifest(tmp, report)
        files = sorted(report["files"])
    logger.info("Checkpoint verified (max cosine distance %.2e) and written to %s", report["max_cosine_distance"], dest)
    return ConvertResult(
        out_dir=dest, files=files, merged_adapters=records, verification=report, pooling_mode=mode,
        dtype=config.dtype, weights=weights,
    )
