"""LoRA adapters in peft's on-disk layout: reading, validating against a base model, and the merge arithmetic.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or the pickled
`adapter_model.bin`), exactly as `PeftModel.save_pretrained` writes them. Our own training may add the pooling
head it trained beside the adapter: `pooling_head.safetensors` (keys `latent_attention.*`) and
`pooling_config.json`, and always its `training_args.json`, whose `instruction_template` and `prompt_instructions`
say how it wrote task instructions. Only plain LoRA is merged; variants whose merge is not `W + scaling * B @ A`
are refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE, LEGACY_INSTRUCTION_TEMPLATE
from ..errors import InputError, MissingInputError
from ..prompts import prompt_name_problem
from .names import normalize_base_key

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFETENSORS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"
POOLING_HEAD_NAME = "pooling_head.safetensors"
POOLING_CONFIG_NAME = "pooling_config.json"
TRAINING_ARGS_NAME = "training_args.json"
# The `training_args.json` entry naming each task prompt a run trained: prompt name -> instruction.
PROMPT_INSTRUCTIONS_KEY = "prompt_instructions"

_PEFT_PREFIX = "base_model.model."
# peft's key for one half of a LoRA pair: `<module>.lora_A.weight` (Linear) or `<module>.lora_embedding_A` (Embedding).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
# A full copy of a targeted embedding that peft writes beside its LoRA pair (`save_embedding_layers`).
_BASE_COPY_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
# init_lora_weights values that rewrite the base weights at initialisation: the adapter alone is not a delta.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair. `lora_a` is `(r, in)`, `lora_b` is `(out, r)`; the merged weight is
    `W + scaling * B @ A`, transposed first when `fan_in_fan_out` (peft's embedding layout)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the base weight this pair can be merged into."""
        shape = (self.lora_b.shape[0], self.lora_a.shape[1])
        return shape[::-1] if self.fan_in_fan_out else shape


@dataclass
class LoraAdapter:
    """A LoRA adapter read from disk, keyed by the encoder's weight names (`layers.0.self_attn.q_proj.weight`).

    `modules` are the LoRA pairs to merge; `base_copies` are full copies of targeted embeddings that peft saved
    beside their pairs (they must equal the base, see `merge.merge_tensor`); `ignored_modules` are LoRA targets the
    encoder does not have (`lm_head`). `pooling_head` / `pooling_config` come from our own training, when present;
    so do `instruction_template` (how its training wrote task instructions; None when it wrote none) and
    `prompt_instructions` (the instruction of each task prompt it trained, by prompt name).
    """

    path: Path
    config: dict
    modules: dict[str, LoraModule]
    base_model_name_or_path: str | None = None
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored_modules: tuple[str, ...] = ()
    pooling_head: dict[str, torch.Tensor] = field(default_factory=dict)
    pooling_config: dict | None = None
    instruction_template: str | None = None
    prompt_instructions: dict[str, str] = field(default_factory=dict)

    def merge_into(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Return `weight` (the base tensor called `name`) with this adapter's delta added, or `weight` itself
        when the adapter does not target it."""
        module = self.modules.get(name)
        if module is None:
            return weight
        return merge_lora_delta(
            weight, module.lora_a, module.lora_b, module.scaling, fan_in_fan_out=module.fan_in_fan_out
        )


def merge_lora_delta(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """Return `weight + scaling * (lora_b @ lora_a)` as a new tensor in `weight`'s dtype.

    `lora_a` is `(r, in)` and `lora_b` is `(out, r)`; `weight` is `(out, in)`, or `(in, out)` with `fan_in_fan_out`
    (the delta is transposed). The sum is computed in float32 so bf16/fp16 weights lose nothing to the matmul.
    Raises `ValueError` when the shapes do not fit together.
    """
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise InputError(
            f"LoRA pair does not fit together: lora_A {tuple(lora_a.shape)} must be (r, in) and lora_B "
            f"{tuple(lora_b.shape)} must be (out, r) with the same r."
        )
    # (B @ A).T == A.T @ B.T: the transposed delta needs no extra copy.
    left, right = (lora_a.T, lora_b.T) if fan_in_fan_out else (lora_b, lora_a)
    if tuple(weight.shape) != (left.shape[0], right.shape[1]):
        raise InputError(
            f"LoRA delta of shape {(left.shape[0], right.shape[1])} cannot be added to a weight of shape "
            f"{tuple(weight.shape)}; the adapter was trained on a model of another size."
        )
    # One float32 copy of the weight, updated by a fused multiply-add: no delta-sized temporaries.
    merged = weight.to(torch.float32, copy=True)
    merged.addmm_(left.float(), right.float(), alpha=scaling)
    return merged.to(weight.dtype)


def _pattern_value(patterns: dict, module_name: str, default):
    """peft's per-module override: the first pattern that matches the end of the module name, at a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _check_config(config: dict, path: Path) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InputError(
            f"{path / ADAPTER_CONFIG_NAME} describes a {config.get('peft_type')!r} adapter; only LoRA adapters "
            "(peft_type 'LORA') can be merged. Train or download a LoRA adapter instead."
        )
    refusals = {
        "use_dora": "DoRA (use_dora=true) rescales each weight by a learned magnitude, so it is not a plain LoRA "
        "delta; merge it with peft (merge_and_unload) and convert the merged model instead",
        "lora_bias": "lora_bias=true adds a bias that the Llama layers do not have; train without lora_bias",
        "layer_replication": "layer_replication changes the number of layers; merge it with peft first",
        "target_parameters": "target_parameters adapts raw parameters, not Linear layers; merge it with peft first",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) only applies after its invocation "
        "tokens, so merging it into the weights would change its behaviour",
    }
    for key, reason in refusals.items():
        if config.get(key):
            raise InputError(f"Cannot merge the adapter at {path}: {reason}.")
    init = str(config.get("init_lora_weights", "")).lower()
    if init.startswith(_BASE_REWRITING_INITS):
        raise InputError(
            f"The adapter at {path} was initialised with init_lora_weights={config['init_lora_weights']!r}, which "
            "rewrites the base weights, so the adapter alone is not a delta on the original model. Save it with "
            "peft's path_initial_model_for_weight_conversion, which turns it into a plain LoRA adapter."
        )
    if config.get("fan_in_fan_out"):
        # peft itself resets fan_in_fan_out for torch.nn.Linear targets, which every Llama projection is.
        logger.warning("%s sets fan_in_fan_out, which peft ignores for Llama's Linear layers; merging like peft.", path)


def _load_adapter_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safetensors_file = path / ADAPTER_SAFETENSORS_NAME
    pickle_file = path / ADAPTER_PICKLE_NAME
    if safetensors_file.is_file():
        try:
            return load_file(safetensors_file)
        except SafetensorError as exc:
            raise InputError(
                f"Cannot read {safetensors_file}: {exc}. The file is truncated or corrupt; save or download it again."
            ) from exc
    if pickle_file.is_file():
        if not allow_pickle:
            raise InputError(
                f"The adapter at {path} stores its weights in {ADAPTER_PICKLE_NAME}, a pickle that can run code "
                "when loaded. Pass allow_pickle=True (--allow-pickle) if you trust its source, or convert it to "
                f"{ADAPTER_SAFETENSORS_NAME}."
            )
        return torch.load(pickle_file, map_location="cpu", weights_only=True)
    raise MissingInputError(
        f"The adapter at {path} has {ADAPTER_CONFIG_NAME} but no weights: expected {ADAPTER_SAFETENSORS_NAME} "
        f"(or {ADAPTER_PICKLE_NAME}) beside it. Copy the adapter's weights file into the folder."
    )


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{file} is not valid JSON ({exc}); save or download it again.") from exc


def _module_path(key: str) -> str:
    """The module's name in the model the adapter was trained on (the peft wrapper's prefix removed)."""
    return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key


def _read_pooling_head(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    head_file = path / POOLING_HEAD_NAME
    config_file = path / POOLING_CONFIG_NAME
    pooling_config = _read_json(config_file) if config_file.is_file() else None
    if pooling_config is not None and not isinstance(pooling_config, dict):
        raise InputError(f'{config_file} must hold a JSON object such as {{"pooling_mode": "mean"}}.')
    head: dict[str, torch.Tensor] = {}
    if head_file.is_file():
        try:
            head = load_file(head_file)
        except SafetensorError as exc:
            raise InputError(f"Cannot read {head_file}: {exc}. The file is truncated or corrupt.") from exc
        stray = sorted(name for name in head if not name.startswith("latent_attention."))
        if stray:
            raise InputError(
                f"{head_file} may only hold the latent-attention head (keys 'latent_attention.*'); found "
                f"{', '.join(stray[:5])}."
            )
    mode = (pooling_config or {}).get("pooling_mode")
    if mode == "latent_attention" and not head:
        raise MissingInputError(
            f"{config_file} sets pooling_mode 'latent_attention' but {head_file} is missing; copy the trained "
            "head beside the adapter."
        )
    if head and mode not in (None, "latent_attention"):
        raise InputError(
            f"{head_file} holds a latent-attention head but {config_file} sets pooling_mode {mode!r}; "
            "fix pooling_config.json or remove the head."
        )
    return head, pooling_config


def trained_instruction_template(record: dict) -> str | None:
    """The template a training run wrote its task instructions with, from its `training_args.json` (`record`), or
    None when it wrote none (MNTP, SimCSE, data without instructions). Runs of earlier versions record neither the
    template nor their prompts: one given an `instruction` or a `recipe` is taken to have written instructions, with
    that version's `LEGACY_INSTRUCTION_TEMPLATE` (a record's own instructions in a `--data` file cannot be seen)."""
    if PROMPT_INSTRUCTIONS_KEY in record:
        return record.get("instruction_template", DEFAULT_INSTRUCTION_TEMPLATE) if record[PROMPT_INSTRUCTIONS_KEY] \
            else None
    if record.get("objective") == "supervised" and (record.get("instruction") or record.get("recipe")):
        return record.get("instruction_template", LEGACY_INSTRUCTION_TEMPLATE)
    return None


def _read_training_record(path: Path) -> tuple[str | None, dict[str, str]]:
    """The instruction template and named task prompts of an adapter our training wrote (its `training_args.json`);
    `(None, {})` for an adapter without that file (trained elsewhere) or trained without instructions."""
    record_file = path / TRAINING_ARGS_NAME
    if not record_file.is_file():
        return None, {}
    record = _read_json(record_file)
    if not isinstance(record, dict):
        raise InputError(f"{record_file} must hold a JSON object, as `llama-encoder train` writes it.")
    template = trained_instruction_template(record)
    if template is None:
        return None, {}
    if not isinstance(template, str) or "{instruction}" not in template:
        raise InputError(f"{record_file}: instruction_template must be a string with the placeholder "
                         f"'{{instruction}}'; found {template!r}. Restore the file the training run wrote.")
    prompts = record.get(PROMPT_INSTRUCTIONS_KEY) or {}
    if not isinstance(prompts, dict):
        raise InputError(f"{record_file}: {PROMPT_INSTRUCTIONS_KEY} must map prompt names to instructions; found "
                         f"{prompts!r}. Restore the file the training run wrote.")
    for name, instruction in prompts.items():
        problem = prompt_name_problem(name)
        if problem is None and (not isinstance(instruction, str) or not instruction.strip()):
            problem = f"the instruction of prompt {name!r} must be a non-empty string; found {instruction!r}"
        if problem:
            raise InputError(f"{record_file}: {problem}. Restore the file the training run wrote.")
    return template, dict(prompts)


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read the peft LoRA adapter folder at `path` (plus our pooling head, when saved beside it).

    Keys are mapped to the encoder's weight names, whether the adapter was trained on a `LlamaForCausalLM`
    (`base_model.model.model.layers...`) or on a base `LlamaModel` as LLM2Vec's adapters are
    (`base_model.model.layers...`). Scaling is `alpha / r`, or `alpha / sqrt(r)` with rsLoRA, with `rank_pattern`
    and `alpha_pattern` honoured per module. Returns a `LoraAdapter`; raises `FileNotFoundError` for a missing
    file and `ValueError` for anything that cannot be merged as a plain LoRA delta.
    """
    path = Path(path).expanduser()
    config_file = path / ADAPTER_CONFIG_NAME
    if not path.is_dir():
        raise MissingInputError(f"Adapter folder {path} does not exist; pass the folder holding {ADAPTER_CONFIG_NAME}.")
    if not config_file.is_file():
        raise MissingInputError(f"{path} has no {ADAPTER_CONFIG_NAME}; pass a folder saved by peft's save_pretrained.")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise InputError(f"{config_file} must hold a JSON object as peft writes it.")
    _check_config(config, path)
    tensors = _load_adapter_tensors(path, allow_pickle)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    base_copies: dict[str, torch.Tensor] = {}
    others: list[str] = []
    for key, tensor in tensors.items():
        if match := _LORA_KEY.match(key):
            module_path = _module_path(match["module"])
            pairs.setdefault(module_path, {})[match["kind"][-1]] = tensor
            if "embedding" in match["kind"]:
                embeddings.add(module_path)
        elif match := _BASE_COPY_KEY.match(key):
            base_copies[_module_path(match["module"])] = tensor
        else:
            others.append(key)
    if others:
        hint = f" (modules_to_save={config['modules_to_save']})" if config.get("modules_to_save") else ""
        raise InputError(
            f"The adapter at {path} holds {len(others)} tensors that are not LoRA pairs{hint}, e.g. "
            f"{', '.join(sorted(others)[:5])}. Only LoRA deltas can be merged; train without modules_to_save, "
            "trainable tokens or biases, or merge with peft first."
        )
    if not pairs:
        raise InputError(f"The adapter at {path} holds no LoRA weights (no '*.lora_A.weight' keys).")

    alpha = config.get("lora_alpha", 8)
    rank = config.get("r", 8)
    modules: dict[str, LoraModule] = {}
    ignored: list[str] = []
    for module_path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InputError(
                f"The adapter at {path} has no {missing} for {module_path}; the weights file is incomplete."
            )
        target = normalize_base_key(f"{module_path}.weight")
        if target is None:
            ignored.append(module_path)  # lm_head: the encoder has no language-model head
            continue
        r = _pattern_value(config.get("rank_pattern") or {}, module_path, rank)
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, module_path, alpha)
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != r or lora_b.shape[1] != r:
            raise InputError(
                f"The adapter at {path} has lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} for "
                f"{module_path}, but its config gives rank r={r}; adapter_config.json does not match the weights."
            )
        scaling = module_alpha / math.sqrt(r) if config.get("use_rslora") else module_alpha / r
        # peft stores an embedding's pair as (r, vocab) and (hidden, r): its delta is (B @ A) transposed.
        modules[target] = LoraModule(
            lora_a=lora_a, lora_b=lora_b, scaling=scaling, fan_in_fan_out=module_path in embeddings
        )
    if ignored:
        logger.warning(
            "Adapter %s also adapts %s, which the encoder drops; that part of the adapter is not merged.",
            path,
            ", ".join(ignored),
        )
    copies = {}
    for module_path, tensor in base_copies.items():
        target = normalize_base_key(f"{module_path}.weight")
        if target is not None:
            copies[target] = tensor

    head, pooling_config = _read_pooling_head(path)
    template, prompt_instructions = _read_training_record(path)
    logger.info("Read adapter %s: %d LoRA modules", path, len(modules))
    return LoraAdapter(
        path=path,
        config=config,
        modules=modules,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        base_copies=copies,
        ignored_modules=tuple(ignored),
        pooling_head=head,
        pooling_config=pooling_config,
        instruction_template=template,
        prompt_instructions=prompt_instructions,
    )


def validate_adapter_against(
    adapter: LoraAdapter, config_dict: dict, weight_shapes: dict[str, tuple[int, ...]]
) -> None:
    """Check that `adapter` fits the base model described by `config_dict` (its config.json; may be empty) and
    `weight_shapes` (encoder weight name -> shape, e.g. from `shards.base_weight_shapes`).

    Every LoRA target must exist in the base with the shape the pair implies (A: `(r, in)`, B: `(out, r)`).
    Returns nothing; raises `ValueError` naming the base's size and the missing or mismatched modules.
    """
    missing = sorted(name for name in (*adapter.modules, *adapter.base_copies) if name not in weight_shapes)
    mismatched = []
    for name, module in sorted(adapter.modules.items()):
        if name in weight_shapes and tuple(weight_shapes[name]) != module.weight_shape:
            mismatched.append(f"{name}: adapter {module.weight_shape} vs base {tuple(weight_shapes[name])}")
    for name, tensor in sorted(adapter.base_copies.items()):
        if name in weight_shapes and tuple(weight_shapes[name]) != tuple(tensor.shape):
            mismatched.append(f"{name}: adapter copy {tuple(tensor.shape)} vs base {tuple(weight_shapes[name])}")
    problems = []
    if missing:
        layers = [int(m[1]) for name in missing if (m := re.match(r"layers\.(\d+)\.", name))]
        reach = f"; the adapter reaches layer {max(layers)}" if layers else ""
        problems.append(f"modules missing from the base ({len(missing)}{reach}): {', '.join(missing[:5])}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:5])}")
    if adapter.ignored_modules and config_dict.get("tie_word_embeddings"):
        problems.append(
            f"it adapts {', '.join(adapter.ignored_modules)}, which this base ties to embed_tokens, so peft's merge "
            "would also change the input embeddings"
        )
    if problems:
        trained_on = adapter.base_model_name_or_path or "another base model"
        sizes = ", ".join(
            f"{key}={config_dict[key]}" for key in ("hidden_size", "num_hidden_layers") if key in config_dict
        )
        raise InputError(
            f"The adapter at {adapter.path} does not fit this base model{f' ({sizes})' if sizes else ''}: "
            f"{'; '.join(problems)}. It was trained on {trained_on}; convert with that base model."
        )


__all__ = [
    "PROMPT_INSTRUCTIONS_KEY",
    "TRAINING_ARGS_NAME",
    "LoraAdapter",
    "LoraModule",
    "merge_lora_delta",
    "read_adapter",
    "trained_instruction_template",
    "validate_adapter_against",
]
