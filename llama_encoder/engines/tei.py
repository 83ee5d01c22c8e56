"""Check the files text-embeddings-inference (TEI) reads against TEI's parsing rules, without running TEI.

TEI serves Llama, Mistral and Qwen2 only on CUDA in float16 with flash attention, Qwen3 on CPU too, and Gemma3 on CPU
and CUDA in float32 only, so most of what a checkpoint needs cannot be run on the machines that convert and verify
checkpoints. Instead, this module checks every file TEI reads from a checkpoint folder (`config.json`, the
safetensors headers, `1_Pooling/config.json`, `sentence_bert_config.json`, `config_sentence_transformers.json`,
`modules.json`, `tokenizer.json`) against the rules written up in docs/ENGINES.md ("TEI file-format checker", rules
1-24), each of which names the TEI source (commit `TEI_SOURCE_COMMIT`) it protects against. Weights are checked from
their headers only; no tensor is read.

The rules follow the family TEI dispatches on, config.json's `model_type`: `llama` (alias `llama_bidirec`),
`mistral`, `qwen2`, `qwen3` and `gemma3_text` (`TEI_CHECKED_FAMILIES`; `tei_family(config)` says which one a config
is checked as, `tei_rules_implemented(config)` whether it is one of them). Rules shared by the families (3-10, 22) check
what each family's TEI struct and loader read (Gemma3's own required fields go to the rule of their topic:
`hidden_activation` and `query_pre_attn_scalar` rule 4, `pad_token_id` rule 5, `rope_local_base_freq` rule 6,
`attention_bias` rule 8, `sliding_window` and `_sliding_window_pattern` rule 9); rules 23 (Qwen2/Qwen3
`use_sliding_window`) and 24 (Qwen3's own required fields) exist for one family only.

    report = check_tei_folder(out_dir)              # pooling from config.json's `pooling_mode`
    report.loadable                                 # no errors: TEI would load it and run it as this checkpoint
    report.family, report.pooling, report.bidirectional   # what TEI would run
    json.dumps(report.to_dict())                    # for verification.json and the model card

A finding is an "error" when TEI would refuse to load the folder or would run it differently from the checkpoint
(causal attention, an attention window, another pooling, unscaled RoPE, other token ids), and a "warning" for
behaviour a user must know (TEI ignores `include_prompt`, normalises on request, ignores a `modules.json` it cannot
parse, ...). Rule 22 (the device and dtype TEI serves the family on) cannot be checked from files; `to_dict` states
it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..configuration_llama_encoder import POOLING_MODES
from ..errors import InputError, MissingInputError, NotAFolderError
from ..weights.names import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from ..weights.shards import FLOAT_CODES, read_headers, resolve_base_files

logger = logging.getLogger(__name__)

TEI_SOURCE_COMMIT = "0d124dc9773be6ac5a9a57d8439aba9bbbf33273"
"""The commit of github.com/huggingface/text-embeddings-inference whose source the rules (and `source`) cite."""

TEI_TOKENIZERS_VERSION = "0.21.1"
"""The `tokenizers` crate TEI is built with at `TEI_SOURCE_COMMIT` (`Cargo.toml:37` asks for 0.21, `Cargo.lock` pins
0.21.1)."""

ERROR = "error"
WARNING = "warning"

TEI_CHECKED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
"""The decoder families (`config.base_model_type`, native `model_type`) whose TEI rules `check_tei_folder`
implements."""
# The model_types TEI dispatches on (backends/candle/src/lib.rs:124-154) that are checked, with the family's rules
# they get.
TEI_MODEL_TYPES = {"llama": "llama", "llama_bidirec": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                   "gemma3_text": "gemma3_text"}
# TEI's name for each family (its config structs are `<name>Config`).
FAMILY_LABELS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3_text": "Gemma3"}
# The stock transformers class a family's native checkpoint names (its weights are saved as one), where it is not
# `<label>Model` (transformers' Gemma3Model is the multimodal model).
FAMILY_MODEL_CLASSES = {"gemma3_text": "Gemma3TextModel"}

# TEI's pooling for our pooling modes; the other modes are not TEI-native (docs/ENGINES.md, "Pooling modes").
TEI_POOLING = {"mean": "mean", "last_token": "last-token"}
LLAMA_MODEL_TYPES = ("llama", "llama_bidirec")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swiglu", "tanh")
REQUIRED_UINTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings")
REQUIRED_NUMBERS = ("initializer_range", "rms_norm_eps")
# Per family, the float fields its TEI config struct requires (Qwen2Config and Qwen3Config have no
# initializer_range).
FAMILY_REQUIRED_NUMBERS = {"llama": REQUIRED_NUMBERS, "mistral": REQUIRED_NUMBERS, "qwen2": ("rms_norm_eps",),
                           "qwen3": ("rms_norm_eps",), "gemma3_text": ("rms_norm_eps",)}
# The key a family's TEI struct reads the MLP activation from, where it is not `hidden_act`.
ACTIVATION_KEYS = {"gemma3_text": "hidden_activation"}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Per family, the token ids TEI parses as an integer or null: LlamaConfig's three, the router's pad_token_id for the
# others (Qwen3's required integer eos_token_id is rule 24; Gemma3Config requires an integer pad_token_id).
FAMILY_TOKEN_ID_KEYS = {"llama": TOKEN_ID_KEYS, "mistral": ("pad_token_id",), "qwen2": ("pad_token_id",),
                        "qwen3": ("pad_token_id",), "gemma3_text": ("pad_token_id",)}
# The key each family's TEI model reads to attend bidirectionally (docs/ENGINES.md, "Bidirectionality per family").
BIDIRECTIONAL_KEYS = {"llama": "use_bidirectional_attention", "mistral": "use_bidirectional_attention",
                      "qwen2": "is_causal", "qwen3": "use_bidirectional_attention",
                      "gemma3_text": "use_bidirectional_attention"}
POOLING_CONFIG = "1_Pooling/config.json"
# The names TEI tries, in order, for the Sentence Transformers config (core/src/download.rs:7-15).
ST_CONFIG_NAMES = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                   "sentence_camembert_config.json", "sentence_albert_config.json",
                   "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
TEI_MODULE_TYPES = tuple(f"sentence_transformers.models.{name}" for name in ("Dense", "Normalize", "Pooling",
                                                                              "Transformer"))
# The component `type`s the tokenizers crate 0.21.1 deserialises (tokenizers/src/*/mod.rs at tag v0.21.1): a
# tokenizer.json with anything else (e.g. the `FixedLength` pre-tokenizer of 0.22) fails to load in TEI.
TOKENIZER_COMPONENT_TYPES = {
    "normalizer": {"BertNormalizer", "Bert", "Strip", "StripAccents", "NFC", "NFD", "NFKC", "NFKD", "Sequence",
                   "Lowercase", "Nmt", "Precompiled", "Replace", "Prepend", "ByteLevel"},
    "pre_tokenizer": {"BertPreTokenizer", "ByteLevel", "Delimiter", "CharDelimiterSplit", "Metaspace", "Whitespace",
                      "Sequence", "Split", "Punctuation", "WhitespaceSplit", "Digits", "UnicodeScripts"},
    "model": {"BPE", "WordPiece", "WordLevel", "Unigram"},
    "post_processor": {"RobertaProcessing", "BertProcessing", "ByteLevel", "TemplateProcessing", "Sequence"},
    "decoder": {"BPEDecoder", "ByteLevel", "WordPiece", "Metaspace", "CTC", "Sequence", "Replace", "Fuse", "Strip",
                "ByteFallback"},
}
# Where a Sequence component keeps its parts.
_SEQUENCE_KEYS = {"normalizer": "normalizers", "pre_tokenizer": "pretokenizers", "post_processor": "processors",
                  "decoder": "decoders"}
# Texts covering every first-character class (letters, upper case, digits, 's, -, (, ", accented, CJK, emoji, single
# characters, punctuation, contractions, leading whitespace): prompt + text is tokenised for each.
PROBE_TEXTS = (
    "where is the cat?",
    "The capital of France is Paris.",
    "42 apples and 7 pears",
    "'s",
    "-dash first",
    "(in parentheses)",
    '"quoted" text',
    "café crème brûlée",
    "東京タワーの高さ",
    "🙂 emoji first",
    "a",
    ".",
    "?",
    "don't stop",
    "  two leading spaces",
    "\nnewline first",
)
# The Qwen2 remote-code AutoModel for which TEI's router appends `<|endoftext|>` to every input
# (router/src/lib.rs:154-182).
QWEN2_REMOTE_AUTO_MODEL = "modeling_qwen.Qwen2Model"

# The TEI source each rule protects against (paths relative to the TEI repository at TEI_SOURCE_COMMIT): the Llama
# path's (or the only) source here, another family's in FAMILY_SOURCES.
SOURCES = {
    1: "backends/candle/src/lib.rs:124-154",
    2: "router/src/lib.rs:406-440, 469-482",
    3: "backends/candle/src/models/flash_mistral.rs:57,107",
    4: "backends/candle/src/models/llama.rs:6-34, backends/candle/src/layers/linear.rs:7-17",
    5: "backends/candle/src/models/llama.rs:27-29, router/src/lib.rs:479",
    6: "backends/candle/src/layers/rotary.rs:5-9, backends/candle/src/lib.rs:549-552",
    7: "backends/candle/src/models/flash_mistral.rs:26-47",
    8: "backends/candle/src/models/flash_mistral.rs:32-50, 130-145",
    9: "backends/candle/src/lib.rs:553-575, backends/candle/src/models/flash_mistral.rs:56,107-108",
    10: "backends/candle/src/lib.rs:170-215, backends/candle/src/models/flash_mistral.rs:256-267",
    11: "router/src/lib.rs:446-460",
    12: "router/src/lib.rs:486-491",
    13: "router/src/lib.rs:493-507",
    14: "core/src/tokenization.rs:310-318",
    15: "router/src/lib.rs:195-219, 511-513",
    16: "router/src/lib.rs:241-249, 516-518",
    17: "backends/src/lib.rs:818-858",
    18: "backends/src/lib.rs:524-551",
    19: "router/src/http/types.rs:434-446",
    20: "router/src/lib.rs:149-152, Cargo.toml:37",
    21: "core/src/tokenization.rs:310-318",
    22: "backends/candle/src/lib.rs:341-344, backends/candle/src/models/flash_mistral.rs:240-248",
    23: "backends/candle/src/models/qwen2.rs:22-23, backends/candle/src/models/flash_qwen2.rs:26-29, "
        "backends/candle/src/models/qwen3.rs:28-29, 57-60, backends/candle/src/models/flash_qwen3.rs:31-34",
    24: "backends/candle/src/models/qwen3.rs:14-37, 482",
}
FAMILY_SOURCES = {
    (3, "qwen2"): "backends/candle/src/models/qwen2.rs:4-7, 24-25, backends/candle/src/models/flash_qwen2.rs:72,118",
    (3, "qwen3"): "backends/candle/src/models/qwen3.rs:33-34, 484, 602-608, "
                  "backends/candle/src/models/flash_qwen3.rs:104,165-166",
    (4, "mistral"): "backends/candle/src/models/mistral.rs:5-24, backends/candle/src/layers/linear.rs:7-17",
    (4, "qwen2"): "backends/candle/src/models/qwen2.rs:9-26, backends/candle/src/layers/linear.rs:7-17",
    (4, "qwen3"): "backends/candle/src/models/qwen3.rs:13-37, backends/candle/src/layers/linear.rs:7-17",
    (5, "mistral"): "router/src/lib.rs:478-479",
    (5, "qwen2"): "router/src/lib.rs:478-479",
    (5, "qwen3"): "router/src/lib.rs:478-479",
    (6, "mistral"): "backends/candle/src/layers/rotary.rs:4-27, 86-93, "
                    "backends/candle/src/models/flash_mistral.rs:269-283",
    (6, "qwen2"): "backends/candle/src/layers/rotary.rs:4-9, backends/candle/src/models/flash_qwen2.rs:290-304",
    (6, "qwen3"): "backends/candle/src/layers/rotary.rs:4-9, backends/candle/src/models/qwen3.rs:460-469, "
                  "backends/candle/src/models/flash_qwen3.rs:359-373",
    (7, "qwen2"): "backends/candle/src/models/flash_qwen2.rs:31-45, 59",
    (7, "qwen3"): "backends/candle/src/models/qwen3.rs:17, 62-72, 111-118, "
                  "backends/candle/src/models/flash_qwen3.rs:36-46, 82-89",
    (8, "qwen2"): "backends/candle/src/models/flash_qwen2.rs:36-61, 142-156",
    (8, "qwen3"): "backends/candle/src/models/qwen3.rs:73-115, 288-302, "
                  "backends/candle/src/models/flash_qwen3.rs:47-86",
    (9, "mistral"): "backends/candle/src/models/flash_mistral.rs:56,107-108, backends/candle/src/flash_attn.rs:74-80",
    (10, "qwen2"): "backends/candle/src/lib.rs:170-215, backends/candle/src/models/flash_qwen2.rs:268-288",
    (10, "qwen3"): "backends/candle/src/lib.rs:170-215, backends/candle/src/models/qwen3.rs:417-439, "
                   "backends/candle/src/models/flash_qwen3.rs:320-342",
    (22, "mistral"): "backends/candle/src/lib.rs:345-348, 477-485, backends/candle/src/models/flash_mistral.rs:240-248",
    (22, "qwen2"): "backends/candle/src/lib.rs:359-362, 515-523, backends/candle/src/models/flash_qwen2.rs:251-259",
    (22, "qwen3"): "backends/candle/src/lib.rs:363-366, 524-535",
    (23, "qwen2"): "backends/candle/src/models/qwen2.rs:22-23, backends/candle/src/models/flash_qwen2.rs:26-29",
    (23, "qwen3"): "backends/candle/src/models/qwen3.rs:28-29, 57-60, backends/candle/src/models/flash_qwen3.rs:31-34",
    (3, "gemma3_text"): "backends/candle/src/models/gemma3.rs:32, 231, 244, 251-287",
    (4, "gemma3_text"): "backends/candle/src/models/gemma3.rs:12-34, 218, backends/candle/src/layers/linear.rs:7-17",
    (5, "gemma3_text"): "backends/candle/src/models/gemma3.rs:15, 738-745, router/src/lib.rs:478-479",
    (6, "gemma3_text"): "backends/candle/src/layers/rotary.rs:4-9, backends/candle/src/models/gemma3.rs:26-28, 670-690",
    (7, "gemma3_text"): "backends/candle/src/models/gemma3.rs:16, 164-216, 666-668",
    (8, "gemma3_text"): "backends/candle/src/models/gemma3.rs:14, 185-211, 468-484",
    (9, "gemma3_text"): "backends/candle/src/models/gemma3.rs:29-31, 226-246, 251-287, 654-662, 812-822",
    (10, "gemma3_text"): "backends/candle/src/lib.rs:170-215, backends/candle/src/models/gemma3.rs:158-216, 468-484, "
                         "522-548, 602-604, 652-664",
    (22, "gemma3_text"): "backends/candle/src/lib.rs:322-332, 454-465, router/src/lib.rs:274-281",
}
# Where each family's TEI model bails without a RoPE base.
_ROPE_THETA_SOURCES = {
    "llama": "backends/candle/src/models/flash_mistral.rs:269-275",
    "mistral": "backends/candle/src/models/flash_mistral.rs:269-275",
    "qwen2": "backends/candle/src/models/flash_qwen2.rs:290-297",
    "qwen3": "backends/candle/src/models/qwen3.rs:460-467, backends/candle/src/models/flash_qwen3.rs:359-366",
    "gemma3_text": "backends/candle/src/models/gemma3.rs:670-677",
}
RUNTIME_NOTE = (
    "TEI serves Llama only on CUDA in float16 with flash attention (on CPU/Metal: \"Llama is only supported on Cuda "
    "devices in fp16 with flash attention enabled\"); this cannot be checked from files, and TEI's embeddings can "
    "only be compared with the checkpoint's on a GPU in float16 (cosine, not bit equality)."
)
# Rule 22 per family: where TEI serves it (not checkable from files).
RUNTIME_NOTES = {
    "llama": RUNTIME_NOTE,
    "mistral": (
        "TEI serves Mistral only on CUDA in float16 with flash attention v2 (compute capability 8.0 or newer; on "
        "CPU/Metal: \"Mistral is only supported on Cuda devices in fp16 with flash attention enabled\"); this cannot "
        "be checked from files, and TEI's embeddings can only be compared with the checkpoint's on such a GPU in "
        "float16 (cosine, not bit equality)."),
    "qwen2": (
        "TEI serves Qwen2 only on CUDA in float16 with flash attention (v1 or v2; on CPU/Metal: \"Qwen2 is only "
        "supported on Cuda devices in fp16 with flash attention enabled\"); this cannot be checked from files, and "
        "TEI's embeddings can only be compared with the checkpoint's on a GPU in float16 (cosine, not bit "
        "equality)."),
    "qwen3": (
        "TEI serves Qwen3 on CPU and Metal (Qwen3Model, float32 or float16) and on CUDA (FlashQwen3Model in float16 "
        "with flash attention, otherwise Qwen3Model): TEI's embeddings can be compared with the checkpoint's on a "
        "CPU in float32 (`--dtype float32`, the CPU image's default)."),
    "gemma3_text": (
        "TEI serves Gemma3 (Gemma3Model, no flash attention) on CPU, Metal and CUDA in float32 only (any other "
        "`--dtype`: \"Gemma3 is only supported in fp32 precision\"; without `--dtype` TEI picks float32 for "
        "gemma3_text): TEI's embeddings can be compared with the checkpoint's on a CPU in float32."),
}
# The families TEI serves on CPU (their embeddings can be compared with TEI's on the machines that convert).
CPU_FAMILIES = ("qwen3", "gemma3_text")
# The families whose TEI model honours config.json's `head_dim` (the others use hidden_size / num_attention_heads).
HEAD_DIM_FAMILIES = ("qwen3", "gemma3_text")
_NATIVE_FIX = "convert with `--format native`"


def tei_family(config: Mapping) -> str | None:
    """The family (a key of `TEI_CHECKED_FAMILIES`) whose TEI rules `check_tei_folder` applies to the `config.json`
    dict `config`, from its `model_type` (`llama_bidirec` is TEI's alias of `llama`); None for any other model type
    (including our remote-code `llama_encoder` and TEI families the checker does not implement, such as
    `bert`)."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else None
    return TEI_MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None


def tei_rules_implemented(config: Mapping) -> bool:
    """Whether `check_tei_folder` implements TEI's rules for the `config.json` dict `config`'s `model_type`."""
    return tei_family(config) is not None


@dataclass(frozen=True)
class TeiFinding:
    """One broken rule: its number in docs/ENGINES.md, "error" (TEI would refuse to load the folder or run it wrong)
    or "warning" (behaviour a user must know), what is wrong and the fix, and the TEI source the rule protects
    against."""

    rule: int
    level: str
    message: str
    source: str


@dataclass
class TeiReport:
    """What `check_tei_folder` found in `folder`, and what TEI would run: `family` the family whose rules were
    applied (`TEI_CHECKED_FAMILIES`; for a model_type TEI would not run as one of them, the family its other files
    were checked as), `pooling` the pooling TEI derives (`"cls"`, `"mean"`, `"last-token"`, or None when
    `1_Pooling/config.json` is missing or unparseable) and `bidirectional` whether TEI would attend bidirectionally
    (the family's switch, `BIDIRECTIONAL_KEYS`: `use_bidirectional_attention` true, or Qwen2's `is_causal` false)."""

    folder: str
    findings: list[TeiFinding]
    pooling: str | None
    bidirectional: bool
    tokenizers_version: str | None = field(default=None)
    family: str = field(default="llama")

    @property
    def errors(self) -> list[TeiFinding]:
        """The findings that stop TEI from loading the folder or make it run the folder wrong."""
        return [finding for finding in self.findings if finding.level == ERROR]

    @property
    def warnings(self) -> list[TeiFinding]:
        """The findings about behaviour a user must know."""
        return [finding for finding in self.findings if finding.level == WARNING]

    @property
    def loadable(self) -> bool:
        """True when no rule has an error: as far as files can tell, TEI loads the folder and runs it as intended."""
        return not self.errors

    def to_dict(self) -> dict:
        """A JSON-able summary (for verification.json and the model card)."""
        return {
            "tei_commit": TEI_SOURCE_COMMIT,
            "folder": self.folder,
            "family": self.family,
            "loadable": self.loadable,
            "pooling": self.pooling,
            "bidirectional": self.bidirectional,
            "error_count": len(self.errors),
            "warning_count": len(self.warnings),
            "findings": [asdict(finding) for finding in self.findings],
            "tokenizer_checked_with": {"tokenizers": self.tokenizers_version, "tei_tokenizers": TEI_TOKENIZERS_VERSION},
            "runtime": {"rule": 22, "note": RUNTIME_NOTES[self.family],
                        "source": _source(22, self.family), "cpu": self.family in CPU_FAMILIES},
        }


def _source(rule: int, family: str) -> str:
    return FAMILY_SOURCES.get((rule, family), SOURCES[rule])


class _Findings:
    """Collects findings; `source` defaults to the rule's source for `family` (FAMILY_SOURCES, else SOURCES)."""

    def __init__(self, family: str = "llama") -> None:
        self.items: list[TeiFinding] = []
        self.family = family

    def error(self, rule: int, message: str, source: str | None = None) -> None:
        self.items.append(TeiFinding(rule, ERROR, message, source or _source(rule, self.family)))

    def warn(self, rule: int, message: str, source: str | None = None) -> None:
        self.items.append(TeiFinding(rule, WARNING, message, source or _source(rule, self.family)))


_MISSING = object()


def _reject_constant(name: str):
    raise InputError(f"{name} is not valid JSON")  # serde_json refuses NaN and Infinity too; caught as ValueError


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(value, None), or (_MISSING, None) when the file does not exist, or (None, why) when it cannot be parsed."""
    if not path.is_file():
        return _MISSING, None
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant), None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, str(exc)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _shown(config: dict, key: str) -> str:
    """A config value for a message: its JSON, or "missing"."""
    return _show(config[key]) if key in config else "missing"


def _examples(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _model_class(family: str) -> str:
    """The stock transformers class whose weights a native checkpoint of `family` holds."""
    return FAMILY_MODEL_CLASSES.get(family, f"{FAMILY_LABELS[family]}Model")


def _checked_family(config: dict) -> str:
    """The family whose rules the rest of config.json and the weights are checked by: the model_type's
    (`tei_family`), else a remote-code config's `base_model_type`, else Llama."""
    family = tei_family(config)
    if family is None:
        base = config.get("base_model_type")
        family = base if base in TEI_CHECKED_FAMILIES else "llama"
    return family


def _bidirectional(config: dict | None, family: str) -> bool:
    """Whether TEI's model of `family` would attend bidirectionally with `config`."""
    if config is None:
        return False
    if family == "qwen2":
        return config.get("is_causal", True) is False
    return config.get("use_bidirectional_attention") is True


# config.json, rules 1-9, 23-24


def _check_model_type(config: dict, found: _Findings) -> None:
    model_type = config.get("model_type")
    if tei_family(config) is not None:
        return
    if model_type == "llama_encoder":
        base = config.get("base_model_type", "llama")
        native = base if base in TEI_CHECKED_FAMILIES else "llama"
        found.error(1, "config.json has model_type \"llama_encoder\" (the remote-code layout), which TEI rejects "
                       "(\"Model is not supported\"; TEI never runs remote code); "
                       f"{_NATIVE_FIX} to write model_type {_show(native)}.")
    elif model_type == "bidirectional_pplx_qwen3":
        found.error(1, "config.json has model_type \"bidirectional_pplx_qwen3\": TEI runs it as Perplexity's Qwen3 "
                       "(mean pooling only, float32 only, and tanh-scaled, rounded embeddings), not as this "
                       "checkpoint; write model_type \"qwen3\" with `use_bidirectional_attention: true`.",
                    "backends/candle/src/lib.rs:147-148, 367-377, backends/candle/src/models/pplx1.rs:13-45")
    else:
        found.error(1, f"config.json has model_type {_show(model_type)}; this checker implements TEI's rules only for "
                       "model_type \"llama\", \"mistral\", \"qwen2\", \"qwen3\" and \"gemma3_text\" (a "
                       f"bidirectional model of the base's family): {_NATIVE_FIX} from a base of one of those "
                       "families.")


def _check_router_fields(config: dict, family: str, found: _Findings) -> None:
    example = _show([_model_class(family)])  # any non-classifier name does (layout writes the engines')
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures or not all(isinstance(a, str) for a in architectures):
        found.error(2, f"config.json `architectures` is {_show(architectures)}; TEI requires a non-empty list of "
                       f"strings (e.g. {example}).")
    else:
        classifiers = [name for name in architectures if name.endswith("Classification")]
        if classifiers:
            found.error(2, f"config.json `architectures` names {', '.join(classifiers)}: TEI serves any architecture "
                           "ending in `Classification` as a classifier, not an embedding model (and refuses "
                           f"classifiers of this family); use {example}.")
    typed = {"id2label": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
             "label2id": lambda v: isinstance(v, dict) and all(_is_uint(x) for x in v.values()),
             "auto_map": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
             "max_trained_positions": _is_uint}
    for key, valid in typed.items():
        value = config.get(key)
        if value is not None and not valid(value):
            found.error(2, f"config.json `{key}` is {_show(value)}, which TEI's router cannot parse (\"Failed to parse "
                           f"`config.json`\"); {'use string values only' if key == 'auto_map' else 'fix or drop it'}.")


def _check_bidirectional(config: dict, family: str, found: _Findings) -> None:
    label = FAMILY_LABELS[family]
    if family == "qwen2":
        value = config.get("is_causal", _MISSING)
        if value is False:
            return
        if value is _MISSING:
            also = (" (it ignores `use_bidirectional_attention`)"
                    if config.get("use_bidirectional_attention") is True else "")
            found.error(3, f"config.json has no `is_causal`: TEI's Qwen2 then runs causally (it defaults to true, with "
                           f"a warning){also}; set `is_causal: false`.")
        elif value is True:
            found.error(3, "config.json `is_causal` is true: TEI's Qwen2 would run this checkpoint causally (it reads "
                           "`is_causal`, not `use_bidirectional_attention`); set `is_causal: false`.")
        else:
            found.error(3, f"config.json `is_causal` is {_show(value)}, not a boolean: TEI's Qwen2Config fails to "
                           "parse config.json (\"Model is not supported\"); set it to false.")
        return
    value = config.get("use_bidirectional_attention")
    if value is True:
        return
    if family == "gemma3_text" and value is not False:
        state = "is missing" if value is None else f"is {_show(value)}, not a boolean"
        found.error(3, f"config.json `use_bidirectional_attention` {state}: TEI's Gemma3Config requires a boolean and "
                       "fails to parse config.json (\"Model is not supported\"); set "
                       "`use_bidirectional_attention: true`.")
        return
    ignores = "it ignores `is_causal` for now" if family == "qwen3" else "it ignores `is_causal`"
    if value is None or value is False:
        state = "is missing" if value is None else "is false"
        found.error(3, f"config.json `use_bidirectional_attention` {state}: TEI would run this {label} causally "
                       f"({ignores}); set `use_bidirectional_attention: true`.")
    else:
        found.error(3, f"config.json `use_bidirectional_attention` is {_show(value)}, not a boolean: TEI fails to "
                       "parse config.json; set it to true.")


def _check_required_fields(config: dict, family: str, found: _Findings) -> None:
    numbers = FAMILY_REQUIRED_NUMBERS[family]
    bad = [f"`{key}` ({_shown(config, key)})" for key in REQUIRED_UINTS if not _is_uint(config.get(key))]
    bad += [f"`{key}` ({_shown(config, key)})" for key in numbers if not _is_number(config.get(key))]
    if family == "gemma3_text" and not _is_uint(config.get("query_pre_attn_scalar")):
        # an integer in the JSON (256.0 fails to parse); TEI scales the queries by its inverse square root
        bad.append(f"`query_pre_attn_scalar` ({_shown(config, 'query_pre_attn_scalar')})")
    if bad:
        found.error(4, f"config.json lacks required fields of the right type: {', '.join(bad)}; TEI's "
                       f"{FAMILY_LABELS[family]}Config needs non-negative integers for the sizes and numbers for "
                       f"{'/'.join(numbers)}.")
    act_key = ACTIVATION_KEYS.get(family, "hidden_act")
    act = config.get(act_key)
    if act not in HIDDEN_ACTS:
        reads = "" if act_key == "hidden_act" else f" (TEI's {FAMILY_LABELS[family]}Config reads `{act_key}`)"
        found.error(4, f"config.json `{act_key}` is {_show(act)}; TEI accepts only {', '.join(HIDDEN_ACTS)}{reads}.")
    elif act == "gelu":
        found.warn(4, f"config.json `{act_key}` is \"gelu\": TEI computes it with the tanh approximation, so "
                      "embeddings differ slightly from transformers' exact GeLU.",
                   "backends/candle/src/layers/linear.rs:7-17")
    if family != "llama":
        return  # the other families' structs have no further optional fields of these names
    optional = {"attention_dropout": _is_number, "pretraining_tp": _is_uint,
                "tie_word_embeddings": lambda v: isinstance(v, bool)}
    for key, valid in optional.items():
        value = config.get(key)
        if value is not None and not valid(value):
            found.error(4, f"config.json `{key}` is {_show(value)}, which TEI's LlamaConfig cannot parse; fix or drop "
                           "it.")


def _check_token_ids(config: dict, family: str, found: _Findings) -> None:
    for key in FAMILY_TOKEN_ID_KEYS[family]:
        value = config.get(key)
        if family == "gemma3_text" and value is None:
            found.error(5, f"config.json `{key}` is {'null' if key in config else 'missing'}: TEI's Gemma3Config "
                           "requires an integer (it pads batches with it) and fails to parse config.json (\"Model is "
                           "not supported\"); write the tokenizer's pad token id.")
            continue
        if value is None or _is_uint(value):
            continue
        if isinstance(value, list):
            found.error(5, f"config.json `{key}` is a list ({_show(value)}); TEI parses it as one integer and fails "
                           f"(\"Failed to parse `config.json`\"): write the one id of the tokenizer's "
                           f"{key[:-len('_token_id')]} token.")
        else:
            found.error(5, f"config.json `{key}` is {_show(value)}; TEI needs a non-negative integer or null.")


def _check_rope(config: dict, family: str, found: _Findings) -> None:
    label = FAMILY_LABELS[family]
    theta_source = _ROPE_THETA_SOURCES[family]
    theta = config.get("rope_theta")
    if theta is not None and not _is_number(theta):
        found.error(6, f"config.json `rope_theta` is {_show(theta)}, not a number: TEI fails to parse config.json.")
        theta = None
    parameters = config.get("rope_parameters")
    parameters_theta = None
    if family == "gemma3_text":
        local = config.get("rope_local_base_freq")
        if not _is_number(local):
            found.error(6, f"config.json `rope_local_base_freq` is {_shown(config, 'rope_local_base_freq')}: TEI's "
                           "Gemma3Config requires a number there (the local layers' RoPE base) and fails to parse "
                           "config.json; write the sliding layers' rope_theta there (transformers 5's "
                           "`rope_parameters.sliding_attention.rope_theta`).",
                        "backends/candle/src/models/gemma3.rs:26, 683-690")
    if family == "gemma3_text" and isinstance(parameters, dict) and (
            "full_attention" in parameters or "sliding_attention" in parameters):
        found.error(6, "config.json `rope_parameters` is per layer type (full_attention / sliding_attention, as "
                       "transformers 5 writes it): TEI's Gemma3Config parses it as one {rope_theta, rope_type} "
                       "object and fails to parse config.json (and transformers 4.57 ignores it and runs its default "
                       "RoPE bases); write the flat form instead: `rope_theta` (full_attention's), "
                       "`rope_local_base_freq` (sliding_attention's), `rope_scaling` (full_attention's scaling, or "
                       "null), and no rope_parameters.")
        parameters = _MISSING  # reported; the checks below would only repeat it
    elif parameters is not None:
        if not isinstance(parameters, dict) or not _is_number(parameters.get("rope_theta")) or not isinstance(
                parameters.get("rope_type"), str):
            found.error(6, f"config.json `rope_parameters` is {_show(parameters)}; TEI needs an object with a numeric "
                           "`rope_theta` and a string `rope_type` (\"default\").")
        else:
            parameters_theta = parameters["rope_theta"]
            if parameters["rope_type"] != "default":
                found.error(6, f"config.json `rope_parameters.rope_type` is {_show(parameters['rope_type'])}: TEI "
                               "reads only `rope_theta` from rope_parameters and would silently run unscaled RoPE. "
                               "TEI cannot serve this checkpoint's RoPE scaling; keep it off TEI (or use a base with "
                               "default RoPE).")
    if parameters is _MISSING:
        parameters = None
    elif config.get("rope_theta") is None and parameters is None:
        found.error(6, "config.json has neither `rope_theta` nor `rope_parameters.rope_theta`: TEI refuses to start "
                       "(\"Neither `rope_theta` nor `rope_parameters.rope_theta` are defined\"); write the base "
                       "model's rope_theta.", theta_source)
    if theta is not None and parameters_theta is not None and theta != parameters_theta:
        where = "drop rope_parameters" if family == "gemma3_text" else "in rope_parameters"
        found.error(6, f"config.json has `rope_theta` {theta} and `rope_parameters.rope_theta` {parameters_theta}: TEI "
                       f"uses the top-level one; write one value ({where}).", theta_source)
    scaling = config.get("rope_scaling")
    if scaling is None:
        return
    if family == "llama":
        found.error(6, f"config.json `rope_scaling` is {_show(scaling)}: TEI refuses it (\"Rope scaling is not "
                       "supported for FlashLlama yet\"); TEI cannot serve this checkpoint's RoPE scaling.")
    elif family == "mistral":
        found.error(6, f"config.json `rope_scaling` is {_show(scaling)}: TEI's Mistral applies it only as Llama 3 or "
                       "NTK scaling (any other `type` with a `factor` runs as NTK; without `factor` config.json "
                       "fails to parse), whatever rope_parameters says; TEI cannot be trusted with this checkpoint's "
                       "RoPE scaling: drop rope_scaling (transformers reads rope_parameters) or keep it off TEI.")
    else:
        found.error(6, f"config.json `rope_scaling` is {_show(scaling)}: TEI's {label} silently ignores it and runs "
                       "unscaled RoPE; TEI cannot serve this checkpoint's RoPE scaling (drop rope_scaling only if "
                       "the checkpoint does not scale RoPE).")


def _head_size(config: dict) -> int | None:
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if _is_uint(hidden) and _is_uint(heads) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def _qwen3_head_size(config: dict) -> int | None:
    """The head size TEI's Qwen3 (and Gemma3) uses: `head_dim` when set, else hidden_size / num_attention_heads (Rust
    integer division)."""
    head_dim = config.get("head_dim")
    if head_dim is not None:
        return head_dim if _is_uint(head_dim) and head_dim > 0 else None
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if _is_uint(hidden) and _is_uint(heads) and heads > 0 and hidden >= heads:
        return hidden // heads
    return None


def _check_head_dim(config: dict, family: str, found: _Findings) -> None:
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not (_is_uint(hidden) and _is_uint(heads)):
        return  # rule 4 reports them
    if family in HEAD_DIM_FAMILIES:
        label = FAMILY_LABELS[family]
        head_dim = config.get("head_dim")
        if head_dim is not None and not (_is_uint(head_dim) and head_dim > 0):
            found.error(7, f"config.json `head_dim` is {_show(head_dim)}: TEI's {label}Config parses it as a positive "
                           "integer (or null) and fails to load this model; write the base's head_dim.")
        elif heads == 0:
            found.error(7, f"config.json `num_attention_heads` is 0: TEI's {label} cannot load this model.")
        return  # TEI's Qwen3 and Gemma3 honour head_dim; rule 10 checks the shapes it gives
    if heads == 0 or hidden % heads:
        found.error(7, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}: TEI derives the head "
                       "size as hidden_size / num_attention_heads and cannot load this model.")
        return
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        found.error(7, f"config.json `head_dim` is {_show(head_dim)} but TEI always uses hidden_size / "
                       f"num_attention_heads = {hidden // heads}; TEI cannot serve a {FAMILY_LABELS[family]} with a "
                       "different head size.")


def _check_biases(config: dict, family: str, found: _Findings) -> None:
    """Rule 8 on config.json (the bias tensors themselves are checked with the weights)."""
    attention_bias = config.get("attention_bias")
    if family == "llama":
        if attention_bias is not None and attention_bias is not False:
            found.error(8, f"config.json `attention_bias` is {_show(attention_bias)}: TEI loads no attention biases "
                           "(or cannot parse a non-boolean); TEI cannot serve this model.")
        if "mlp_bias" in config and config["mlp_bias"] is not False:
            value = config["mlp_bias"]
            found.error(8, f"config.json `mlp_bias` is {_show(value)}: "
                        + ("TEI loads no MLP biases; TEI cannot serve this model." if value is True else
                           "TEI parses it as a boolean and fails; write false or drop it."))
    elif family == "qwen3" and attention_bias is True:  # rule 24 checks that it is a boolean
        found.error(8, "config.json `attention_bias` is true: the Qwen3 model then has q/k/v and o_proj biases, and "
                       "TEI's Qwen3 loads the q/k/v biases but never o_proj's (its flash path also asks for a q_proj "
                       "bias of hidden_size): TEI would run this model without its o_proj biases; TEI cannot serve it.",
                    "backends/candle/src/models/qwen3.rs:73-115, backends/candle/src/models/flash_qwen3.rs:47-51, 86")
    elif family == "gemma3_text" and not isinstance(attention_bias, bool):
        state = "is missing" if "attention_bias" not in config else f"is {_show(attention_bias)}"
        found.error(8, f"config.json `attention_bias` {state}: TEI's Gemma3Config requires a boolean and fails to "
                       "parse config.json (\"Model is not supported\"); write the base's value (false for the Gemma3 "
                       "bases).")
    # Gemma3 with attention_bias true: transformers' and TEI's models both have q/k/v/o biases (checked with the
    # weights).
    # Mistral and Qwen2: transformers' and TEI's models ignore `attention_bias` (and `mlp_bias`): Mistral has no
    # biases, Qwen2 q/k/v biases only; the bias tensors are checked with the weights.


def _check_sliding_window(config: dict, family: str, found: _Findings, max_length: int | None = None) -> None:
    """Rule 9 (Llama, Mistral: a window TEI applies; Gemma3: its local layers); Qwen2 and Qwen3 never read
    `sliding_window` (rule 23). `max_length` is the longest input TEI accepts (for Gemma3's binding window)."""
    if family == "gemma3_text":
        _check_gemma3_window(config, found, max_length)
        return
    window = config.get("sliding_window")
    if window is None or family in ("qwen2", "qwen3"):
        return
    if family == "llama":
        found.error(9, f"config.json `sliding_window` is {_show(window)}: TEI passes it to flash attention as an "
                       "attention window (Llama has none); drop it or write null.")
    elif not _is_uint(window):
        found.error(9, f"config.json `sliding_window` is {_show(window)}: TEI's MistralConfig parses it as an integer "
                       "or null and fails; write null.")
    else:
        found.error(9, f"config.json `sliding_window` is {window}: TEI's Mistral passes it to flash attention as a "
                       f"left-only window (each token sees at most {window} tokens to its left and every token to "
                       "its right, since the checkpoint is bidirectional), which is not this encoder's attention; "
                       "write `sliding_window: null` (a window that never binds within the checkpoint's inputs can "
                       "be dropped; one that binds cannot be served by TEI).")


def _gemma3_hf_layer_types(config: dict) -> list[str] | None:
    """The layer types transformers (4.57 and 5.x) runs: `layer_types`, else every `sliding_window_pattern`-th layer
    (default 6) global; None when config.json cannot say."""
    layers = config.get("num_hidden_layers")
    types = config.get("layer_types")
    if types is not None:
        return list(types) if isinstance(types, list) else None
    pattern = config.get("sliding_window_pattern", 6)  # transformers reads the key without the underscore
    if not (_is_uint(layers) and _is_uint(pattern) and pattern > 0):
        return None
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _check_gemma3_window(config: dict, found: _Findings, max_length: int | None) -> None:
    """Rule 9 for Gemma3: TEI's local layers are every layer but each `_sliding_window_pattern`-th (it ignores
    `layer_types`), with the mask |i - j| <= sliding_window / 2 and the local RoPE base; a layer is local only if
    `sliding_window` is an integer."""
    layers = config.get("num_hidden_layers")
    pattern = config.get("_sliding_window_pattern", _MISSING)
    tei_types = None
    if not (_is_uint(pattern) and pattern > 0):
        state = "is missing" if pattern is _MISSING else f"is {_show(pattern)}"
        why = ("TEI takes each layer's kind from it modulo and panics on 0" if pattern == 0 and _is_uint(pattern)
               else "TEI's Gemma3Config requires a positive integer there (the key with the leading underscore) "
                    "and fails to parse config.json")
        found.error(9, f"config.json `_sliding_window_pattern` {state}: {why}; write the base's pattern (every "
                       "pattern-th layer global, e.g. 6), as in `layer_types`.")
    elif _is_uint(layers):
        tei_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    hf_types = _gemma3_hf_layer_types(config)
    if tei_types is not None and hf_types is not None and tei_types != hf_types:
        differ = [str(i) for i, (a, b) in enumerate(zip(tei_types, hf_types, strict=False)) if a != b]
        if len(tei_types) != len(hf_types):
            differ = ["layer_types has the wrong length"]
        found.error(9, f"config.json `_sliding_window_pattern` {pattern} makes TEI run other layer kinds than "
                       f"`layer_types` (transformers') at layers {_examples(differ, 5)}: TEI ignores layer_types and "
                       "makes every pattern-th layer global; write the pattern of layer_types there (a layout that "
                       "is not every pattern-th layer global cannot be served by TEI).")
    window = config.get("sliding_window")
    local = tei_types is None or "sliding_attention" in tei_types
    if window is None:
        if local:
            found.error(9, f"config.json `sliding_window` is {'null' if 'sliding_window' in config else 'missing'}: "
                           "TEI's Gemma3 then runs its local layers without a window and with the global RoPE base "
                           "(a layer is local only if it has a window); write the base's sliding_window (the "
                           "un-halved value, e.g. 512).")
    elif not _is_uint(window):
        found.error(9, f"config.json `sliding_window` is {_show(window)}: TEI's Gemma3Config parses it as an integer "
                       "or null and fails; write the base's (un-halved) sliding_window.")
    elif local and max_length is not None and max_length > window // 2 + 1:
        found.warn(9, f"config.json `sliding_window` {window} binds within the inputs TEI accepts (up to {max_length} "
                      f"tokens): TEI's local layers see |i - j| <= {window // 2}, as transformers' do with this "
                      "un-halved value, but TEI drops the window (and attends everywhere) in a batch of several "
                      f"inputs of the same length, so inputs longer than {window // 2 + 1} tokens can embed "
                      "differently there; compare TEI's embeddings with the checkpoint's.",
                   "backends/candle/src/models/gemma3.rs:251-287, 374-389, 716-784")


def _max_input_length(folder: Path, config: dict) -> int | None:
    """The longest input TEI accepts: the Sentence Transformers config's max_seq_length, else
    max_position_embeddings (router/src/lib.rs:195-219); None when neither is an integer."""
    name = next((name for name in ST_CONFIG_NAMES if (folder / name).is_file()), None)
    if name is not None:
        st_config, problem = _read_json(folder / name)
        if problem is None and isinstance(st_config, dict) and _is_uint(st_config.get("max_seq_length")):
            return st_config["max_seq_length"]
    limit = config.get("max_position_embeddings")
    return limit if _is_uint(limit) else None


def _check_sliding_flag(config: dict, family: str, found: _Findings) -> None:
    """Rule 23: Qwen2's and Qwen3's required `use_sliding_window`, which TEI refuses when true."""
    if family not in ("qwen2", "qwen3"):
        return
    label = FAMILY_LABELS[family]
    value = config.get("use_sliding_window", _MISSING)
    if value is True:
        found.error(23, f"config.json `use_sliding_window` is true: TEI refuses to load it (\"Sliding window is not "
                        f"supported for {label}\"); write `use_sliding_window: false` when the window never binds "
                        "within the checkpoint's inputs (otherwise TEI cannot serve this checkpoint).")
    elif value is _MISSING or value is None:
        state = "no `use_sliding_window`" if value is _MISSING else "`use_sliding_window: null`"
        found.error(23, f"config.json has {state}: TEI's {label}Config requires a boolean there and fails to parse "
                        "config.json (\"Model is not supported\"); write `use_sliding_window: false`.")
    elif value is not False:
        found.error(23, f"config.json `use_sliding_window` is {_show(value)}, not a boolean: TEI's {label}Config fails "
                        "to parse config.json; write `use_sliding_window: false`.")
    window = config.get("sliding_window")
    if window is not None and not _is_uint(window):
        found.error(23, f"config.json `sliding_window` is {_show(window)}: TEI's {label}Config parses it as an integer "
                        "or null (and never applies it) and fails; write null or the base's integer.")


def _check_qwen3_fields(config: dict, family: str, found: _Findings) -> None:
    """Rule 24: Qwen3Config's required `attention_bias` (a boolean) and `eos_token_id` (one integer), and its
    optional `num_labels`."""
    if family != "qwen3":
        return
    bias = config.get("attention_bias", _MISSING)
    if not isinstance(bias, bool):
        state = "is missing" if bias is _MISSING else f"is {_show(bias)}"
        found.error(24, f"config.json `attention_bias` {state}: TEI's Qwen3Config requires a boolean and fails to "
                        "parse config.json (\"Model is not supported\"); write the base's value (false for the Qwen3 "
                        "bases).", "backends/candle/src/models/qwen3.rs:14-15")
    eos = config.get("eos_token_id", _MISSING)
    if not _is_uint(eos):
        if isinstance(eos, list):
            state, fix = f"is a list ({_show(eos)})", "one of them: the id the tokenizer appends as EOS"
        else:
            state = "is missing" if eos is _MISSING else f"is {_show(eos)}"
            fix = "the tokenizer's EOS id"
        found.error(24, f"config.json `eos_token_id` {state}: TEI's Qwen3Config requires one non-negative integer (it "
                        "pads batches with it) and fails to parse config.json (\"Model is not supported\"); write "
                        f"{fix}.", "backends/candle/src/models/qwen3.rs:30, 482, 547")
    labels = config.get("num_labels")
    if labels is not None and not _is_uint(labels):
        found.error(24, f"config.json `num_labels` is {_show(labels)}: TEI's Qwen3Config parses it as an integer or "
                        "null and fails; drop it.", "backends/candle/src/models/qwen3.rs:35-36")


# weights, rule 10 (and rule 8's bias tensors, rule 24's projection)


def _expected_shapes(config: dict, family: str = "llama") -> dict[str, tuple[int, ...]] | None:
    """The tensors TEI's model of `family` loads (unprefixed names), with the shapes it asks for; None when
    config.json cannot say."""
    if not all(_is_uint(config.get(key)) for key in REQUIRED_UINTS):
        return None
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    if family in HEAD_DIM_FAMILIES:
        head = _qwen3_head_size(config)
        if head is None:
            return None
        queries = config["num_attention_heads"] * head
    else:
        head = _head_size(config)
        if head is None:
            return None
        queries = hidden
    kv = config["num_key_value_heads"] * head
    shapes = {"embed_tokens.weight": (vocab, hidden), "norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"layers.{i}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (queries, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, queries),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
        if family in ("qwen3", "gemma3_text"):
            shapes.update({prefix + "self_attn.q_norm.weight": (head,), prefix + "self_attn.k_norm.weight": (head,)})
        if family == "gemma3_text":
            shapes.update({prefix + "pre_feedforward_layernorm.weight": (hidden,),
                           prefix + "post_feedforward_layernorm.weight": (hidden,)})
        biased = config.get("attention_bias") is True
        if family == "qwen2" or (family in ("qwen3", "gemma3_text") and biased):
            shapes.update({prefix + "self_attn.q_proj.bias": (queries,), prefix + "self_attn.k_proj.bias": (kv,),
                           prefix + "self_attn.v_proj.bias": (kv,)})
        if family == "gemma3_text" and biased:  # TEI's Gemma3 loads o_proj's bias too
            shapes[prefix + "self_attn.o_proj.bias"] = (hidden,)
    return shapes


def _check_weights(folder: Path, config: dict | None, found: _Findings, family: str = "llama") -> None:
    label = FAMILY_LABELS[family]
    try:
        headers = read_headers(resolve_base_files(folder))
    except (MissingInputError, InputError) as exc:
        found.error(10, f"The weights cannot be checked: {exc} TEI's {label} path needs {SAFE_WEIGHTS_NAME} or the "
                        f"shards of {SAFE_WEIGHTS_INDEX_NAME}.")
        return
    tensors = {name: spec for header in headers.values() for name, spec in header.items()}
    # Llama and Mistral load unprefixed names only; Qwen2 and Qwen3 load everything under `model.` when
    # `model.embed_tokens.weight` exists.
    prefixable = family in ("qwen2", "qwen3")
    prefix = "model." if prefixable and "model.embed_tokens.weight" in tensors else ""
    prefixed = [] if prefixable else sorted(name for name in tensors if name.startswith("model."))
    if prefixed:
        found.error(10, f"{len(prefixed)} tensors carry a `model.` prefix (e.g. {_examples(prefixed)}); TEI's {label} "
                        f"path loads unprefixed names (embed_tokens.weight, layers.0...): {_NATIVE_FIX} (the weights "
                        f"are saved as a {_model_class(family)}).")
    not_float = sorted(f"{name} ({code})" for name, (code, _) in tensors.items() if code not in FLOAT_CODES)
    if not_float:
        found.error(10, f"TEI loads float weights only; these are not: {_examples(not_float)}. Save the weights as "
                        "float32, bfloat16 or float16.")
    expected = _expected_shapes(config, family) if config is not None else None
    loaded: set[str] = set()
    stray: set[str] = set()
    if expected is not None:
        if prefix:  # unprefixed copies of the names TEI now looks for under `model.`
            stray = {name for name in tensors if name in expected or (
                name.endswith("norm.gamma") and name[: -len("gamma")] + "weight" in expected)}
        if stray:
            found.error(10, f"The weights hold model.embed_tokens.weight, so TEI's {label} loads every tensor under "
                            f"`model.`, but {len(stray)} tensors are unprefixed (e.g. {_examples(sorted(stray))}), "
                            "which TEI never finds; write all names with the prefix or all without it.")
        expected = {prefix + name: shape for name, shape in expected.items()}
        # TEI's RMSNorm also takes `gamma` for `weight`.
        gamma = {name: name[: -len("weight")] + "gamma" for name in expected if name.endswith("norm.weight")}
        missing, wrong = [], []
        for name, shape in expected.items():
            held = name if name in tensors else gamma.get(name) if gamma.get(name) in tensors else None
            if held is None:
                if prefixable or "model." + name not in tensors:  # a prefixed Llama/Mistral name is reported above
                    missing.append(name)
            elif tensors[held][1] != shape:
                wrong.append(f"{held} {list(tensors[held][1])} (TEI expects {list(shape)})")
        if missing:
            where = ("all unprefixed, or all under `model.`" if prefixable else "unprefixed")
            found.error(10, f"The weights lack {len(missing)} tensors TEI's {label} path loads, e.g. "
                            f"{_examples(missing)}; write the complete {_model_class(family)} weights ({where}).")
        if wrong:
            head = ("head_dim" if family in HEAD_DIM_FAMILIES and config.get("head_dim") is not None
                    else "hidden_size / num_attention_heads")
            found.error(10, f"{len(wrong)} tensors do not have the shape TEI asks for (from config.json: head size "
                            f"{head}): {_examples(wrong)}.")
        loaded = set(expected) | set(gamma.values())
    projection = (family == "qwen3" and config is not None and _is_uint(config.get("num_labels"))
                  and "linear.weight" in tensors)
    if projection:
        found.error(24, f"config.json sets num_labels {config['num_labels']} and the weights hold `linear.weight`: "
                        "TEI's Qwen3 applies it as a projection after the final norm, which the checkpoint does not; "
                        "drop num_labels from config.json (or the tensor).",
                    "backends/candle/src/models/qwen3.rs:441-454, backends/candle/src/models/flash_qwen3.rs:344-357")

    def reported(name: str) -> bool:  # by a prefix error above
        return (not prefixable and name.startswith("model.")) or name in stray

    if expected is not None or not prefixable:
        biases = sorted(name for name in tensors if name.endswith(".bias") and name not in loaded
                        and not reported(name))
        if biases:
            found.error(8, f"The weights hold {len(biases)} bias tensors (e.g. {_examples(biases)}) that TEI's {label} "
                           "never loads: TEI would run this model without them.")
    if expected is None:
        return  # rules 4 and 7 report why the shapes are unknown
    extra = sorted(name for name in tensors if name not in loaded and not reported(name)
                   and not name.endswith(".bias") and name not in ("lm_head.weight", "model.lm_head.weight")
                   and not name.endswith("inv_freq") and not (projection and name == "linear.weight"))
    if extra:
        found.warn(10, f"TEI ignores {len(extra)} tensors (e.g. {_examples(extra)}): it serves the {label} layers "
                       "only, so whatever they compute is not in TEI's embeddings.")


# 1_Pooling/config.json, rules 11-14


def _check_pooling(folder: Path, found: _Findings) -> tuple[str | None, dict | None]:
    """Rules 11-13 on the file: the pooling TEI derives (None when it cannot) and the parsed file (None if unusable)."""
    pool, problem = _read_json(folder / POOLING_CONFIG)
    if pool is _MISSING:
        found.error(11, f"{POOLING_CONFIG} is missing: TEI refuses a non-BERT model without it (unless launched with "
                        "`--pooling`). Write it with the legacy booleans (pooling_mode_cls_token, "
                        "pooling_mode_mean_tokens, pooling_mode_lasttoken).")
        return None, None
    if problem is not None or not isinstance(pool, dict):
        found.error(12, f"{POOLING_CONFIG} is not a JSON object ({problem or _show(pool)}): TEI fails to start "
                        f"(\"Failed to parse `{POOLING_CONFIG}`\").")
        return None, None
    required = [key for key in ("pooling_mode_cls_token", "pooling_mode_mean_tokens")
                if not isinstance(pool.get(key), bool)]
    last = pool.get("pooling_mode_lasttoken", False)
    if required:
        compact = " (the compact format Sentence Transformers >= 5.4 writes)" if "pooling_mode" in pool else ""
        found.error(12, f"{POOLING_CONFIG} lacks the booleans {' and '.join(required)}{compact}: TEI requires both "
                        f"and fails to start (\"Failed to parse `{POOLING_CONFIG}`\"). Write the legacy boolean "
                        "format (do not re-save the folder with Sentence Transformers).")
        return None, pool
    if not isinstance(last, bool):
        found.error(12, f"{POOLING_CONFIG} `pooling_mode_lasttoken` is {_show(last)}, not a boolean: TEI fails to "
                        "parse the file.")
        return None, pool
    if pool["pooling_mode_cls_token"]:
        return "cls", pool
    if pool["pooling_mode_mean_tokens"]:
        return "mean", pool
    if last:
        return "last-token", pool
    found.error(13, f"{POOLING_CONFIG} sets none of pooling_mode_cls_token, pooling_mode_mean_tokens, "
                    "pooling_mode_lasttoken: TEI refuses it (\"Pooling config ... is not supported\").")
    return None, pool


def _check_include_prompt(pool: dict | None, derived: str | None, found: _Findings) -> None:
    """Rule 14 (last-token pooling is unaffected: the last token is a text token either way)."""
    if isinstance(pool, dict) and pool.get("include_prompt") is False and derived != "last-token":
        found.warn(14, f"{POOLING_CONFIG} has include_prompt: false, which TEI ignores: it pools every token of "
                       "prompt + text, so queries sent with a prompt (prompt_name) pool the instruction too and "
                       "differ from the checkpoint's own embeddings; documents without a prompt are unaffected.")


def _check_pooling_mode(ours: str | None, derived: str | None, found: _Findings) -> None:
    if ours is None:
        found.warn(13, "The checkpoint's pooling is unknown (no `pooling_mode` in config.json and none given), so "
                       f"TEI's pooling ({derived}) cannot be compared with it.")
    elif ours not in TEI_POOLING:
        found.error(13, f"The checkpoint pools with {ours!r}, which TEI cannot run (TEI has cls, mean, last-token and "
                        "splade); only mean and last_token checkpoints can be served by TEI.")
    elif derived is not None and derived != TEI_POOLING[ours]:
        found.error(13, f"TEI derives {derived!r} pooling from {POOLING_CONFIG} (cls wins over mean, mean over "
                        f"last-token) but the checkpoint pools with {ours!r}; set only "
                        f"{'pooling_mode_mean_tokens' if ours == 'mean' else 'pooling_mode_lasttoken'} to true.")


# sentence_bert_config.json, config_sentence_transformers.json, modules.json: rules 15-19


def _check_st_config(folder: Path, config: dict | None, found: _Findings) -> None:
    name = next((name for name in ST_CONFIG_NAMES if (folder / name).is_file()), None)
    if name is None:
        return  # TEI then uses max_position_embeddings
    st_config, problem = _read_json(folder / name)
    if problem is not None or not isinstance(st_config, dict):
        found.error(15, f"{name} is not a JSON object ({problem or _show(st_config)}): TEI fails to start "
                        f"(\"Failed to parse `{name}`\").")
        return
    length = st_config.get("max_seq_length")
    if not _is_uint(length):
        found.error(15, f"{name} has max_seq_length {_show(length) if 'max_seq_length' in st_config else 'missing'}: "
                        f"TEI requires a non-negative integer there when the file exists and fails to start; write "
                        "the checkpoint's maximum length (e.g. max_position_embeddings).")
        return
    limit = config.get("max_position_embeddings") if config is not None else None
    if _is_uint(limit) and length > limit:
        found.error(15, f"{name} has max_seq_length {length} over max_position_embeddings {limit}: TEI would accept "
                        "inputs longer than the model's positions; lower max_seq_length.")


def _prompts_from_file(folder: Path, found: _Findings) -> dict[str, str]:
    """Rule 16; returns the prompts TEI would read (the string-valued ones)."""
    st, problem = _read_json(folder / "config_sentence_transformers.json")
    if st is _MISSING:
        return {}
    if problem is not None or not isinstance(st, dict):
        found.error(16, f"config_sentence_transformers.json is not a JSON object ({problem or _show(st)}): TEI fails "
                        "to start (\"Failed to parse `config_sentence_transformers.json`\").")
        return {}
    prompts = st.get("prompts")
    if prompts is None:
        return {}
    if not isinstance(prompts, dict):
        found.error(16, f"config_sentence_transformers.json `prompts` is {_show(prompts)}; TEI needs an object of "
                        "strings and fails to start.")
        return {}
    bad = [f"{key!r} ({_show(value)})" for key, value in prompts.items() if not isinstance(value, str)]
    if bad:
        found.error(16, f"config_sentence_transformers.json `prompts` has values that are not strings: "
                        f"{', '.join(bad)}; TEI fails to parse the file. Write \"\" for an empty prompt.")
    return {key: value for key, value in prompts.items() if isinstance(value, str)}


def _check_modules(folder: Path, config: dict | None, found: _Findings) -> None:
    modules, problem = _read_json(folder / "modules.json")
    types: list[str] = []
    if modules is not _MISSING:
        why = problem
        if why is None and not isinstance(modules, list):
            why = "not a list"
        if why is None:
            for module in modules:
                if not isinstance(module, dict):
                    why = f"an entry is {_show(module)}"
                    break
                if isinstance(module.get("type"), str):
                    types.append(module["type"])
                if module.get("type") not in TEI_MODULE_TYPES:
                    why = f"module type {_show(module.get('type'))} is not one of {', '.join(TEI_MODULE_TYPES)}"
                elif not (_is_uint(module.get("idx")) and isinstance(module.get("name"), str)
                          and isinstance(module.get("path"), str)):
                    why = f"entry {_show(module)} lacks an integer idx or a string name/path"
                if why:
                    break
        if why:
            found.warn(17, f"TEI cannot parse modules.json ({why}) and ignores it with a warning; that only matters "
                           "for Dense modules, which TEI then skips. Use the sentence_transformers.models.* type "
                           "names.")
        dense = [t for t in types if t.rsplit(".", 1)[-1] == "Dense"]
        if dense:
            found.warn(18, "modules.json has a Dense module: TEI applies it from its folder's config.json and weights, "
                           "which this checker does not check; compare TEI's embeddings with the checkpoint's.",
                       "backends/src/lib.rs:524-551, 818-858")
    normalizes = config.get("normalize_embeddings") if config is not None else None
    if not isinstance(normalizes, bool):
        normalizes = any(t.rsplit(".", 1)[-1] == "Normalize" for t in types) if types else None
    if normalizes is False:
        found.warn(19, "The checkpoint does not normalise its embeddings, but TEI normalises unless the request says "
                       "otherwise (`normalize` defaults to true, the Normalize module is not read): clients must send "
                       "`normalize: false`.")


# tokenizer.json, rules 20-21


def _component_types(kind: str, component: Any, path: str) -> list[str]:
    """`path: type` for each component (and Sequence part) whose type tokenizers 0.21.1 does not know."""
    if not isinstance(component, dict):
        return []
    kind_type = component.get("type")
    unknown = [] if kind_type is None or kind_type in TOKENIZER_COMPONENT_TYPES[kind] else [f"{path}: {kind_type}"]
    parts = component.get(_SEQUENCE_KEYS.get(kind, ""))
    if kind_type == "Sequence" and isinstance(parts, list):
        for position, part in enumerate(parts):
            unknown += _component_types(kind, part, f"{path}.{_SEQUENCE_KEYS[kind]}[{position}]")
    return unknown


def _load_raw_tokenizer(folder: Path, found: _Findings):
    """Rule 20: the tokenizers `Tokenizer` TEI would build from tokenizer.json (None when it cannot)."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        found.error(20, "tokenizer.json is missing: TEI only supports fast tokenizers and panics without it; save the "
                        "tokenizer with a fast (tokenizers-backed) tokenizer.")
        return None
    spec, problem = _read_json(path)
    if problem is not None or not isinstance(spec, dict):
        found.error(20, f"tokenizer.json is not a JSON object ({problem or 'not an object'}): TEI cannot load it.")
        return None
    unknown = [item for kind in TOKENIZER_COMPONENT_TYPES for item in _component_types(kind, spec.get(kind), kind)]
    if unknown:
        found.error(20, f"tokenizer.json uses components that the tokenizers crate TEI is built with "
                        f"({TEI_TOKENIZERS_VERSION}) does not know ({', '.join(unknown)}); TEI cannot load it. Rebuild "
                        "the tokenizer without them.")
        return None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust crate's parse errors arrive as plain Exceptions
        found.error(20, f"tokenizer.json does not load with the tokenizers library ({exc}); TEI cannot load it either.")
        return None
    tokenizer.no_padding()  # TEI removes padding and sets truncation per request
    tokenizer.no_truncation()
    return tokenizer


def _check_prompt_tokens(folder: Path, raw, prompts: Mapping[str, str], found: _Findings) -> None:
    """Rule 21: TEI's ids (tokenizer.json on prompt + text) equal tokenize_for_encoder's, for every prompt."""
    from transformers import AutoTokenizer, PretrainedConfig

    from ..modeling_llama_encoder import tokenize_for_encoder

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # any failure of transformers to build the tokenizer: report, do not crash the check
        # transformers reads config.json too and refuses some configs that the rules above already report; the
        # tokenizer files alone decide the comparison then (tokenizer_config.json names the tokenizer class).
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, config=PretrainedConfig(), local_files_only=True,
                                                      trust_remote_code=False)
        except Exception:  # the first failure is the one to report
            found.error(21, f"transformers cannot load the checkpoint's tokenizer ({type(exc).__name__}: {exc}), "
                            "so TEI's tokenisation cannot be compared with the checkpoint's; fix the tokenizer "
                            "files.")
            return
        logger.warning("transformers refuses %s/config.json (%s: %s); compared the tokenizer without it.", folder,
                       type(exc).__name__, exc)
    if not getattr(tokenizer, "is_fast", False):
        found.error(21, "transformers loads a slow tokenizer from this folder, so tokenize_for_encoder cannot run; "
                        "save a fast tokenizer (tokenizer.json) with a matching tokenizer_config.json.")
        return
    if tokenizer.pad_token_id is None:  # no padding is done; tokenize_for_encoder only insists on a pad token
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    texts = list(PROBE_TEXTS)
    cases = {"(no prompt)": ""}
    cases.update({f"prompt {name!r}": prompt for name, prompt in prompts.items() if prompt})
    for label, prompt in cases.items():
        try:
            ours = tokenize_for_encoder(tokenizer, texts, prompt, max_length=None, append_eos=False,
                                        padding=False, return_tensors=None)["input_ids"]
        except ValueError as exc:
            found.error(21, f"tokenize_for_encoder refuses the checkpoint's tokenizer ({exc}).")
            return
        tei = [encoding.ids for encoding in raw.encode_batch([prompt + text for text in texts],
                                                              add_special_tokens=True)]
        differ = [index for index, (a, b) in enumerate(zip(ours, tei, strict=True)) if list(a) != list(b)]
        if differ:
            first = differ[0]
            found.error(21, f"For {label}, tokenizer.json (what TEI runs on prompt + text) gives other ids than the "
                            f"checkpoint's tokenize_for_encoder for {len(differ)} of {len(texts)} probe texts, e.g. "
                            f"{texts[first]!r}: TEI {list(tei[first])} vs {list(ours[first])}. Save tokenizer.json "
                            "from the same tokenizer (tokenizer.save_pretrained) so that it holds every added and "
                            "special token tokenizer_config.json declares.")


def _check_qwen2_post_processor(config: dict, family: str, found: _Findings) -> None:
    """Rule 21, Qwen2 only: TEI's router appends `<|endoftext|>` to every input of a Qwen2 remote-code config."""
    auto_map = config.get("auto_map")
    if family == "qwen2" and isinstance(auto_map, dict) and auto_map.get("AutoModel") == QWEN2_REMOTE_AUTO_MODEL:
        found.error(21, f"config.json `auto_map.AutoModel` is {_show(QWEN2_REMOTE_AUTO_MODEL)}: TEI's router then "
                        "appends `<|endoftext|>` (id 151643) to every input, which the checkpoint's tokenisation does "
                        "not; write the checkpoint's own auto_map.", "router/src/lib.rs:154-182")


def check_tei_folder(
    folder: str | os.PathLike,
    *,
    pooling_mode: str | None = None,
    prompts: dict[str, str] | None = None,
) -> TeiReport:
    """Check `folder` against TEI's parsing rules (docs/ENGINES.md, rules 1-21, 23-24) for the family of its
    config.json's `model_type` (`tei_family`) and return what TEI would do.

    `pooling_mode` is the checkpoint's pooling (one of `POOLING_MODES`; default: config.json's `pooling_mode`), which
    rule 13 compares with the pooling TEI derives; `prompts` (default: `config_sentence_transformers.json`'s
    `prompts`) are the prompts rule 21 tokenises with each probe text. Reads JSON files, safetensors headers and the
    tokenizer; never a tensor. A model_type the checker has no rules for is a rule 1 error, and the other rules are
    then those of the config's `base_model_type` (a remote-code config) or Llama.

    Raises `MissingInputError` when `folder` does not exist, `NotAFolderError` when it is a file, and `InputError`
    for a `pooling_mode` or `prompts` that cannot be used.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise MissingInputError(f"There is no folder {root} to check for TEI; pass the folder a conversion wrote.")
    if not root.is_dir():
        raise NotAFolderError(f"{root} is a file; pass the checkpoint folder (the one holding config.json).")
    if pooling_mode is not None and pooling_mode not in POOLING_MODES:
        raise InputError(f"pooling_mode must be one of {', '.join(POOLING_MODES)}; got {pooling_mode!r}.")
    if prompts is not None and (not isinstance(prompts, Mapping)
                                or not all(isinstance(v, str) for v in prompts.values())):
        raise InputError(f"prompts must map prompt names to strings; got {prompts!r}.")

    config, problem = _read_json(root / "config.json")
    if config is _MISSING or problem is not None or not isinstance(config, dict):
        found = _Findings()
        why = "is missing" if config is _MISSING else f"is not a JSON object ({problem or _show(config)})"
        found.error(1, f"config.json {why}: TEI cannot start without it; {_NATIVE_FIX}.", "router/src/lib.rs:113-117")
        config = None
        family = "llama"
    else:
        family = _checked_family(config)
        found = _Findings(family)
        _check_model_type(config, found)
        _check_router_fields(config, family, found)
        _check_bidirectional(config, family, found)
        _check_required_fields(config, family, found)
        _check_token_ids(config, family, found)
        _check_rope(config, family, found)
        _check_head_dim(config, family, found)
        _check_biases(config, family, found)
        _check_sliding_window(config, family, found, _max_input_length(root, config))
        _check_sliding_flag(config, family, found)
        _check_qwen3_fields(config, family, found)
    _check_weights(root, config, found, family)

    derived, pool = _check_pooling(root, found)
    ours = pooling_mode
    if ours is None and config is not None:
        ours = config.get("pooling_mode")
    if ours is not None and ours not in POOLING_MODES:
        found.error(13, f"config.json `pooling_mode` is {_show(ours)}, not one of {', '.join(POOLING_MODES)}; write "
                        "the checkpoint's pooling there.")
    else:
        _check_pooling_mode(ours, derived, found)
    _check_include_prompt(pool, derived, found)
    _check_st_config(root, config, found)
    file_prompts = _prompts_from_file(root, found)
    _check_modules(root, config, found)
    if config is not None:
        _check_qwen2_post_processor(config, family, found)
    raw = _load_raw_tokenizer(root, found)
    if raw is not None:
        _check_prompt_tokens(root, raw, file_prompts if prompts is None else prompts, found)

    import tokenizers

    findings = sorted(found.items, key=lambda finding: finding.rule)  # stable: the order of checks within a rule
    report = TeiReport(
        folder=str(root), findings=findings, pooling=derived, bidirectional=_bidirectional(config, family),
        tokenizers_version=tokenizers.__version__, family=family,
    )
    logger.info("TEI check of %s (%s rules): %d errors, %d warnings (pooling %s, bidirectional %s).", root, family,
                len(report.errors), len(report.warnings), report.pooling, report.bidirectional)
    for finding in findings:
        logger.debug("TEI rule %d (%s): %s", finding.rule, finding.level, finding.message)
    return report


__all__ = [
    "FAMILY_LABELS",
    "PROBE_TEXTS",
    "RUNTIME_NOTES",
    "TEI_CHECKED_FAMILIES",
    "TEI_SOURCE_COMMIT",
    "TEI_TOKENIZERS_VERSION",
    "TeiFinding",
    "TeiReport",
    "check_tei_folder",
    "tei_family",
    "tei_rules_implemented",
]
