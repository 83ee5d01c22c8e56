"""The package's main job: base LLM (+ LoRA adapters) -> a verified, self-contained encoder checkpoint.

Order of work: check the destination, resolve and validate the base and every adapter (nothing written yet), then,
inside one temporary sibling of the destination: stream-merge the weights into shards, write config / Hub files /
tokenizer / sentence-transformers files, merge the weights a second time from the same sources, in memory and without
the shard writer (the reference), compare a sample of the written tensors with it and embed reference sentences with
it, verify the folder in a fresh process that cannot import the package, write the model card with the figures and
the file manifest, and only then rename the folder into place. Any failure leaves the destination as it was.

`convert` runs this as stages, each taking and returning small records: `_resolve_inputs` (options -> `_Inputs`),
`_plan_checkpoint` (-> `_Plan`), then in the temporary folder `_merge_weights`, `_write_checkpoint_files`,
`_verify` (-> the report) and `_write_card` (-> the report with its manifest).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_directory, check_destination
from ..configuration_llama_encoder import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    LATENT_ATTENTION_KEYS,
    POOLING_MODES,
    LlamaEncoderConfig,
    fill_instruction_template,
)
from ..dtypes import DTYPES
from ..errors import InputError
from ..modeling_llama_encoder import LatentAttentionPooling
from ..weights.base_model import BaseModel, resolve_base
from ..weights.default_adapters import DefaultAdapters, default_adapters
from ..weights.encoder import encoder_config, encoder_from_state_dict
from ..weights.lora import LoraAdapter, read_adapter, validate_adapter_against
from ..weights.merge import merged_state_dict, stream_merge
from ..weights.streaming import output_dtype
from .checkpoint import (
    GEMMA_NOTICE,
    default_prompts,
    resolve_max_seq_length,
    write_checkpoint,
    write_model_card,
)
from .layout import DEFAULT_FORMAT, CheckpointLayout, binding_window, drop_idle_window, plan_layout
from .manifest import write_verification_manifest
from .verify import (
    DEFAULT_SENTENCES,
    WrittenWeights,
    compute_reference_embeddings,
    verified_prompts,
    verify_checkpoint,
)

logger = logging.getLogger(__name__)

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
    format: str = DEFAULT_FORMAT


def parse_size(size: str | int) -> int:
    """`"2GB"`, `"500MB"`, `"1.5GiB"` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise InputError(f"Cannot read size {size!r}; write it like 2GB, 500MB or 1073741824.")
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
        raise InputError(f"--dtype must be auto or one of {', '.join(DTYPES)}; got {name!r}.")
    return DTYPES[name]


def _pooling_settings(adapters: list[LoraAdapter], pooling: str | None) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """The pooling mode, latent sizes and head tensors: from `pooling`, else from the last adapter that saved a
    pooling config, else the config's default."""
    saved = next((a for a in reversed(adapters) if a.pooling_config or a.pooling_head), None)
    saved_mode = (saved.pooling_config or {}).get("pooling_mode") if saved else None
    if saved is not None and saved.pooling_head and saved_mode is None:
        saved_mode = "latent_attention"
    if pooling is not None and pooling not in POOLING_MODES:
        raise InputError(f"--pooling must be one of {', '.join(POOLING_MODES)}; got {pooling!r}.")
    if pooling is not None and saved_mode is not None and pooling != saved_mode:
        raise InputError(
            f"Adapter {saved.path} was trained with pooling {saved_mode!r} but --pooling {pooling!r} was given; "
            f"omit --pooling to keep the trained pooling, or pass --pooling {saved_mode}."
        )
    mode = pooling or saved_mode or LlamaEncoderConfig().pooling_mode
    sizes = {k: v for k, v in ((saved.pooling_config or {}) if saved else {}).items() if k in LATENT_ATTENTION_KEYS}
    head = dict(saved.pooling_head) if saved is not None and mode == "latent_attention" else {}
    return mode, sizes, head


def _matryoshka_dimensions(adapters: list[LoraAdapter], hidden_size: int) -> list[int] | None:
    """The Matryoshka dimensions the last contrastive adapter was trained with (its pooling_config.json), smallest
    first, the full size included (vLLM accepts only a listed `dimensions`), or None."""
    saved = next((a for a in reversed(adapters) if a.pooling_config), None)
    dims = (saved.pooling_config or {}).get("matryoshka_dimensions") if saved else None
    if not dims:
        return None
    if not isinstance(dims, list) or not all(isinstance(d, int) and 0 < d <= hidden_size for d in dims):
        raise InputError(f"{saved.path}/pooling_config.json: matryoshka_dimensions must be a list of sizes up to "
                         f"{hidden_size}; found {dims!r}.")
    return sorted(set(dims) | {hidden_size})


def _trained_prompts(adapters: list[LoraAdapter]) -> tuple[str, dict[str, str]]:
    """The checkpoint's instruction template and the task prompts its adapters were trained with, by name.

    The template is the one the last adapter trained with instructions wrote them with (an adapter of an earlier
    version that records none: `LEGACY_INSTRUCTION_TEMPLATE`, see `weights.lora.trained_instruction_template`);
    with no such adapter (none, MNTP, SimCSE, data without instructions, or adapters trained elsewhere) it is
    `DEFAULT_INSTRUCTION_TEMPLATE`. Each named prompt is its instruction written with its own adapter's template, a
    later adapter's prompt replacing an earlier one of the same name."""
    template, prompts = DEFAULT_INSTRUCTION_TEMPLATE, {}
    for adapter in adapters:
        if adapter.instruction_template is None:
            continue
        template = adapter.instruction_template
        for name, instruction in sorted(adapter.prompt_instructions.items()):
            prompts[name] = fill_instruction_template(template, instruction)
    return template, prompts


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


def _reference_model(source: BaseModel, adapters: list[LoraAdapter], head: dict[str, torch.Tensor],
                     config: LlamaEncoderConfig, dtype: torch.dtype, written: WrittenWeights):
    """The model the checkpoint must equal, merged a second time from the sources (in float32, rounded once to
    `dtype`) without the shard writer; the sampled tensors of `written` are compared with it on the way. An
    in-memory base's state dict is consumed here, so nothing holds it afterwards."""

    def compare(name: str, merged: torch.Tensor) -> None:
        if name in written.sample:
            written.compare(name, merged)

    state = merged_state_dict(source.tensor_source(consume=True), adapters, dtype=dtype, inspect=compare)
    source.state_dict = None
    for name, tensor in head.items():
        compare(name, tensor)
        state[name] = tensor.to(output_dtype(tensor.dtype, dtype))
    written.compare_names(set(state))
    return encoder_from_state_dict(config, state)


@dataclass(frozen=True)
class _Options:
    """`convert`'s arguments, as given."""

    out: str | os.PathLike
    base: str | None
    gguf: str | os.PathLike | None
    adapters: list[str | os.PathLike] | tuple | None
    untrained: bool
    pooling: str | None
    query_instruction: str | None
    query_prompt: str | None
    document_prompt: str | None
    normalize: bool | None
    max_seq_length: int | None
    dtype: str
    shard_size: str | int
    padding_side: str
    model_id: str | None
    overwrite: bool
    allow_pickle: bool
    cache_dir: str | os.PathLike | None
    tolerance: float
    format: str
    vllm: bool | None
    vllm_python: str | None


@dataclass(frozen=True)
class _Inputs:
    """What the checkpoint is made from: the checked destination, the base, the adapters in merge order (`shipped`:
    the shipped defaults, when they are the adapters), the base's weight shapes and the shard size in bytes."""

    dest: Path
    source: BaseModel
    adapters: list[LoraAdapter]
    shipped: DefaultAdapters | None
    shapes: dict[str, tuple[int, ...]]
    shard_bytes: int


@dataclass(frozen=True)
class _Plan:
    """What will be written: the encoder config, the weights' dtype, the pooling-head tensors, the prompts, the
    maximum sequence length, the layout, the card's adapter records and training section, and the bytes the shards
    take (for a disk-full message)."""

    config: LlamaEncoderConfig
    dtype: torch.dtype
    head: dict[str, torch.Tensor]
    prompts: dict[str, str]
    max_seq_length: int
    layout: CheckpointLayout
    merged_adapters: list[dict]
    training_section: Sequence[str]
    needed_bytes: int


def _resolve_inputs(options: _Options) -> _Inputs:
    """Takes the options; checks them and the destination, reads the base and the adapters (the shipped defaults
    for the embedded base when none are named) and checks each adapter against the base; returns the `_Inputs`.
    Nothing is written."""
    if options.padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be left or right; got {options.padding_side!r}.")
    if options.query_prompt is not None and options.query_instruction is not None:
        raise InputError("Give either a query instruction or a full query prompt, not both.")
    if options.untrained and options.adapters:
        raise InputError("--untrained converts the bare base; it cannot be combined with --adapter. Drop one of them.")
    shard_bytes = parse_size(options.shard_size)
    dest = check_destination(options.out, overwrite=options.overwrite)
    folders, shipped = options.adapters, None
    if folders is None:
        if options.base is None and options.gguf is None and not options.untrained:
            shipped = default_adapters()
            folders = shipped.folders
            logger.info("Merging the shipped default adapters (%s) into the embedded default base; --untrained "
                        "skips them", ", ".join(folder.name for folder in folders))
        else:
            folders = ()

    source = resolve_base(base=options.base, gguf=options.gguf,
                          cache_dir=Path(options.cache_dir) if options.cache_dir else None,
                          allow_pickle=options.allow_pickle)
    adapters = [read_adapter(path, allow_pickle=options.allow_pickle) for path in folders]
    shapes = source.weight_shapes()
    for adapter in adapters:
        validate_adapter_against(adapter, source.config.to_dict(), shapes)
        if adapter.base_model_name_or_path and adapter.base_model_name_or_path != source.name:
            logger.warning(
                "Adapter %s names %s as its base; merging it into %s. Shapes are checked, but make sure this is the "
                "model it was trained on.", adapter.path, adapter.base_model_name_or_path, source.name,
            )
    return _Inputs(dest=dest, source=source, adapters=adapters, shipped=shipped, shapes=shapes,
                   shard_bytes=shard_bytes)


def _plan_checkpoint(options: _Options, inputs: _Inputs) -> _Plan:
    """Takes the options and the `_Inputs`; decides the pooling, dtype, config, prompts, maximum sequence length and
    layout; returns the `_Plan`. Nothing is written."""
    source, adapters = inputs.source, inputs.adapters
    mode, sizes, head = _pooling_settings(adapters, options.pooling)
    torch_dtype = _resolve_dtype(options.dtype, source)
    config = encoder_config(source.config, pooling_mode=mode, latent_sizes=sizes, dtype=torch_dtype,
                            normalize=options.normalize)
    dims = _matryoshka_dimensions(adapters, config.hidden_size)
    if dims:  # where vLLM reads them (and our card names them)
        config.matryoshka_dimensions, config.is_matryoshka = dims, True
    if mode == "latent_attention" and not head:
        logger.warning(
            "Pooling is latent_attention but no adapter carries a trained latent-attention head; the head is "
            "freshly initialised (close to mean pooling). Train it with the adapters to get its benefit."
        )
        head = _initial_latent_head(config)

    config.instruction_template, trained = _trained_prompts(adapters)
    prompts = {**default_prompts(config), **trained}
    if trained:
        logger.info("Task prompts the adapters were trained with: %s (instruction template %r)",
                    ", ".join(sorted(trained)), config.instruction_template)
    if options.query_instruction is not None:
        prompts["query"] = config.instruction_prompt(options.query_instruction)
    if options.query_prompt is not None:
        prompts["query"] = options.query_prompt
    if options.document_prompt is not None:
        prompts["document"] = options.document_prompt
    max_seq_length = resolve_max_seq_length(config, source.tokenizer, options.max_seq_length)
    window = getattr(config, "sliding_window", None)
    if drop_idle_window(config, max_seq_length):
        logger.info("The base's sliding window (%s tokens) never binds for inputs of at most %d tokens: the "
                    "checkpoint is written as full attention, which computes the same", window, max_seq_length)
    if config.eos_token_id is None and source.tokenizer.eos_token_id is not None:
        config.eos_token_id = source.tokenizer.eos_token_id  # some engines (TEI's Qwen3) need the id in config.json
    layout = plan_layout(format=options.format, pooling_mode=mode, tokenizer=source.tokenizer, prompts=prompts,
                         padding_side=options.padding_side, family=config.base_model_type,
                         window=binding_window(config, max_seq_length))
    if layout.native and layout.sentence_transformers == "custom":
        logger.warning("The checkpoint keeps its own Sentence Transformers module (SentenceTransformer then needs "
                       "trust_remote_code=True): %s. Pass --query-prompt with a prompt ending in a newline (and train "
                       "with an --instruction-template ending in one) to make it native.", layout.custom_reason)
    # What the merged shards take in the output dtype (the other files are small), for a disk-full message.
    elements = sum(map(math.prod, inputs.shapes.values())) + sum(t.numel() for t in head.values())
    return _Plan(config=config, dtype=torch_dtype, head=head, prompts=prompts, max_seq_length=max_seq_length,
                 layout=layout, merged_adapters=[_adapter_record(adapter) for adapter in adapters],
                 training_section=inputs.shipped.card_section() if inputs.shipped else (),
                 needed_bytes=torch_dtype.itemsize * elements)


def _card_arguments(options: _Options, inputs: _Inputs, plan: _Plan) -> dict:
    """What the model card says, as `write_checkpoint` and `write_model_card` both take it (less the tokenizer)."""
    return dict(model_id=options.model_id or str(inputs.dest), base_name=inputs.source.name,
                license=inputs.source.license, merged_adapters=plan.merged_adapters, prompts=plan.prompts,
                max_seq_length=plan.max_seq_length, training_section=plan.training_section, layout=plan.layout)


def _merge_weights(inputs: _Inputs, plan: _Plan, folder: Path) -> dict:
    """Takes the `_Inputs` and the `_Plan`; stream-merges the base, the adapters and the pooling head into shards in
    `folder`; returns `stream_merge`'s record of the weight files."""
    return stream_merge(inputs.source.tensor_source(), inputs.adapters, folder, shard_size_bytes=inputs.shard_bytes,
                        dtype=plan.dtype, extra_tensors=plan.head or None)


def _write_checkpoint_files(options: _Options, inputs: _Inputs, plan: _Plan, folder: Path) -> None:
    """Takes the options, the `_Inputs` and the `_Plan`; writes the config, Hub files, tokenizer and Sentence
    Transformers files the layout names into `folder`, and the base's licence files (and the Gemma notice)."""
    write_checkpoint(None, out_dir=folder, weights_written=True, config=plan.config, padding_side=options.padding_side,
                     tokenizer=inputs.source.tokenizer, **_card_arguments(options, inputs, plan))
    for name, path in inputs.source.source_files.items():
        if _LICENSE_FILES.match(name):
            shutil.copyfile(path, folder / name)
    if inputs.source.license == "gemma" and not (folder / "NOTICE").exists():  # the Gemma Terms of Use ask for it
        (folder / "NOTICE").write_text(GEMMA_NOTICE + "\n", encoding="utf-8")


def _verify(options: _Options, inputs: _Inputs, plan: _Plan, folder: Path) -> dict:
    """Takes the options, the `_Inputs` and the `_Plan`; merges the weights a second time, in memory (the
    reference), compares a sample of the written tensors and the reference sentences' embeddings with it, and checks
    `folder` in a fresh process; returns `verify_checkpoint`'s report (raises `VerificationError` if it fails). The
    reference model is freed before the fresh process starts."""
    weights_named = "the base and adapter weights" if inputs.adapters else "the base weights"
    reference = (f"an in-memory model of {weights_named} merged a second time from their files (in float32, rounded "
                 f"once to {str(plan.dtype).removeprefix('torch.')}, without the shard writer)")
    written = WrittenWeights(folder, reference="that second merge in float32, before rounding")
    model = _reference_model(inputs.source, inputs.adapters, plan.head, plan.config, plan.dtype, written)
    expected = {name: compute_reference_embeddings(model, inputs.source.tokenizer, DEFAULT_SENTENCES, prompt,
                                                   max_length=plan.max_seq_length)
                for name, prompt in verified_prompts(plan.prompts).items()}
    del model
    gc.collect()
    return verify_checkpoint(folder, expected=expected, reference=reference, weights=written,
                             tolerance=options.tolerance, write_manifest=False, layout=plan.layout, vllm=options.vllm,
                             vllm_python=options.vllm_python)


def _write_card(options: _Options, inputs: _Inputs, plan: _Plan, folder: Path, report: dict) -> dict:
    """Takes the options, the `_Inputs`, the `_Plan` and the verification report; writes the model card (with the
    report's figures) and verification.json (with the file manifest) into `folder`; returns the report with its
    manifest."""
    write_model_card(folder, config=plan.config, verification=report, **_card_arguments(options, inputs, plan))
    return write_verification_manifest(folder, report)


def convert(
    *,
    out: str | os.PathLike,
    base: str | None = None,
    gguf: str | os.PathLike | None = None,
    adapters: list[str | os.PathLike] | tuple | None = None,
    untrained: bool = False,
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
    format: str = DEFAULT_FORMAT,
    vllm: bool | None = None,
    vllm_python: str | None = None,
) -> ConvertResult:
    """Convert a decoder LLM (any family of `BASE_FAMILIES`) plus LoRA adapters (merged in the order given)
    into an encoder checkpoint at `out`.

    `base` is a local HF folder or a Hub repo id, `gguf` a GGUF file; with neither, the embedded SmolLM2-135M-Instruct.
    `adapters=None` means: the shipped default adapters for the embedded base (MNTP + supervised, see
    `weights.default_adapters`), none for any other base; `untrained=True` keeps the bare embedded base.
    `pooling` defaults to what the last adapter was trained with, else mean. The instruction template is the one the
    last adapter trained with instructions was trained with (`Instruct: {instruction}\\nQuery:\\n` without one); the
    checkpoint's prompts are `query` (that template filled with `query_instruction`, else with a generic retrieval
    instruction; or `query_prompt` verbatim), `document` (`document_prompt`, default none) and every task prompt
    the adapters were trained with, under its name (a trained `query` prompt is the query prompt unless one is
    given). `format`: "native" (a stock
    bidirectional Llama config and, where exact, stock Sentence Transformers modules: transformers >= 5.2, vLLM and
    TEI load it without our code) or "remote-code" (see `layout`). `vllm`: also verify with vLLM (None: when a vLLM
    interpreter is found, see `engines.vllm.find_vllm_python`; `vllm_python` names one). Returns a `ConvertResult`;
    raises a `LlamaEncoderError` (`InputError`, `MissingInputError`, `OutputExistsError`, ...) for bad input before
    anything is written, and `VerificationError` if the written checkpoint does not hold or embed like the
    independently merged model (nothing is left in place).
    """
    options = _Options(
        out=out, base=base, gguf=gguf, adapters=adapters, untrained=untrained, pooling=pooling,
        query_instruction=query_instruction, query_prompt=query_prompt, document_prompt=document_prompt,
        normalize=normalize, max_seq_length=max_seq_length, dtype=dtype, shard_size=shard_size,
        padding_side=padding_side, model_id=model_id, overwrite=overwrite, allow_pickle=allow_pickle,
        cache_dir=cache_dir, tolerance=tolerance, format=format, vllm=vllm, vllm_python=vllm_python,
    )
    inputs = _resolve_inputs(options)
    plan = _plan_checkpoint(options, inputs)
    logger.info("Converting %s with %d adapter(s), pooling %s, %s format, into %s", inputs.source.name,
                len(inputs.adapters), plan.config.pooling_mode, plan.layout.format, inputs.dest)
    with atomic_directory(inputs.dest, overwrite=overwrite, needed_bytes=plan.needed_bytes) as tmp:
        weights = _merge_weights(inputs, plan, tmp)
        _write_checkpoint_files(options, inputs, plan, tmp)
        report = _verify(options, inputs, plan, tmp)
        report = _write_card(options, inputs, plan, tmp, report)
    logger.info("Checkpoint verified (max cosine distance %.2e) and written to %s", report["max_cosine_distance"],
                inputs.dest)
    return ConvertResult(
        out_dir=inputs.dest, files=sorted(report["files"]), merged_adapters=plan.merged_adapters, verification=report,
        pooling_mode=plan.config.pooling_mode, dtype=plan.config.dtype, weights=weights, format=plan.layout.format,
    )


__all__ = ["ConvertResult", "convert", "parse_size"]
