"""Which files a checkpoint gets, decided in one place: the engine-native layout or the remote-code one.

Two formats (`--format`):

* `native` (default): `config.json` keeps the base family's `model_type` (`llama`, `mistral`, `qwen2`, `qwen3`,
  `gemma3_text`) with `is_causal: false` (stock transformers >= 5.2 builds that family's model bidirectionally, vLLM's
  layers run encoder-only attention), `use_bidirectional_attention: true` (what TEI reads, and for Gemma3 the one
  switch: its configs carry no `is_causal`, see `native_config_dict`), the `architectures` entry vLLM's
  registry maps to a pooling model of the family (`NATIVE_ARCHITECTURES`) and `pooling` (what vLLM's
  `LlamaBidirectionalModel` reads), and keeps `auto_map`, so `trust_remote_code=True` still gives
  `LlamaEncoderModel` (pool mask, `pooler_output`) on transformers 4.57 and later. The Sentence Transformers files are
  the stock Transformer + Pooling (+ Normalize) modules in the legacy boolean pooling format every reader parses,
  *when they pool exactly the tokens the encoder's `pool_mask` pools* for the checkpoint's prompts (checked here with
  the checkpoint's tokenizer); where they would not, the checkpoint keeps its own Sentence Transformers module for
  that reason, and says so.
  Only mean and last-token pooling have native forms: no engine has the others.
* `remote-code`: `model_type: llama_encoder` and the checkpoint's own Sentence Transformers module. Nothing but our
  Hub code runs it, so an old transformers fails loudly instead of running it causally.

The facts behind every key (and the engines' source lines) are in docs/ENGINES.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import transformers

from ..configuration_llama_encoder import BASE_FAMILIES, attention_window, encoder_layer_types, gemma3_rope
from ..engines.tei import FAMILY_LABELS, TEI_CHECKED_FAMILIES
from ..errors import InputError
from ..modeling_llama_encoder import tokenize_for_encoder

FORMATS = ("native", "remote-code")
DEFAULT_FORMAT = "native"
AUTO_MAP = {
    "AutoConfig": "configuration_llama_encoder.LlamaEncoderConfig",
    "AutoModel": "modeling_llama_encoder.LlamaEncoderModel",
}
NATIVE_ARCHITECTURE = "LlamaBidirectionalModel"
# Per family, the `architectures` entry of a native config: what vLLM's registry maps to a model of that family
# whose layers switch to encoder-only attention on `is_causal: false` (docs/ENGINES.md has the source lines).
NATIVE_ARCHITECTURES = {
    "llama": NATIVE_ARCHITECTURE,
    "mistral": "MistralModel",
    "qwen2": "Qwen2Model",
    "qwen3": "Qwen3Model",
    "gemma3_text": "Gemma3TextModel",
}


@dataclass(frozen=True)
class NativePooling:
    """How one of our pooling modes is spelled for the engines."""

    st_key: str  # the legacy boolean key of 1_Pooling/config.json set to true
    include_prompt: bool  # 1_Pooling's include_prompt: whether prompt tokens are pooled
    vllm: str  # config.json `pooling`, read by vLLM's LlamaBidirectionalModel
    vllm_pooler: str  # the pooler type vLLM then runs
    tei: str  # the pooling TEI derives from 1_Pooling/config.json


NATIVE_POOLING = {
    "mean": NativePooling("pooling_mode_mean_tokens", False, "avg", "MEAN", "mean"),
    # The last token is a text token whatever the prompt, so the prompt is "included" (ST would otherwise count the
    # prompt's tokens alone and could exclude the whole of a one-token text).
    "last_token": NativePooling("pooling_mode_lasttoken", True, "last", "LAST", "last-token"),
}
NOT_NATIVE = {
    "weighted_mean": "no engine has a position-weighted mean (vLLM pools CLS, LAST or MEAN; TEI cls, mean or "
                     "last-token)",
    "eos": "the encoder appends an EOS token to every input and no engine does",
    "bos": "the encoder pools the first token after the prompt, while the engines' CLS pooling takes token 0",
    "latent_attention": "no engine has a latent-attention pooler: the head runs only in the checkpoint's own code",
}
ST_POOLING_KEYS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)

# First characters of every class a text can start with: byte-level BPE merges a prompt's last character with some
# of them, and whether it does decides whether counting the prompt's tokens alone finds where the text starts.
# Left out on purpose: texts that start with a run of two or more whitespace characters (e.g. "\t x" behind a prompt
# ending in "\n"): byte-level BPE merges such a run with the prompt's final newline whatever the prompt, so no
# prompt would pass; the model card names that exception (ST then leaves out the run's first characters' token).
PROBE_TEXTS = (
    "What is the capital of France?", "how do llamas live", "x", "A", "2026 was a year.", "'s", "-1 degrees",
    "(see below)", '"quoted"', "Élan vital", "日本語の文", "🙂 smile", ".", "?", "don't", " leading space",
    "\nnew line", "UPPER CASE", "e-mail", "#hashtag", "$5", "[1]",
)


def sentence_transformers_mismatch(tokenizer, prompt: str, pooling_mode: str,
                                   texts: Sequence[str] = PROBE_TEXTS) -> str | None:
    """None when stock Sentence Transformers modules (the tokenizer on `prompt + text`, then Pooling with
    `NATIVE_POOLING[pooling_mode].include_prompt`) pool exactly the tokens `tokenize_for_encoder` pools for every
    text in `texts`; otherwise one sentence saying where they differ.

    Sentence Transformers excludes a prompt by its length tokenised alone (less a trailing special token); the
    encoder excludes the tokens that end within the prompt's characters. For byte-level BPE they differ when the
    prompt's last character merges into the text's first token (a prompt ending in a space, before a word)."""
    native = NATIVE_POOLING[pooling_mode]
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    prompt_length = len(prompt_ids)
    if prompt_ids and prompt_ids[-1] in set(tokenizer.all_special_ids):
        prompt_length -= 1
    for text in texts:
        ours = tokenize_for_encoder(tokenizer, [text], prompt, return_tensors=None, padding=False)
        ids, pooled = ours["input_ids"][0], ours["pool_mask"][0]
        st_ids = tokenizer(prompt + text)["input_ids"]
        if list(st_ids) != list(ids):
            return f"the tokenizer gives other tokens for {prompt + text!r} than the encoder's tokenisation"
        st_pooled = [1] * len(st_ids)
        if prompt and not native.include_prompt:
            st_pooled = [int(i >= prompt_length) for i in range(len(st_ids))]
        if pooling_mode == "last_token":
            ours_last = max((i for i, flag in enumerate(pooled) if flag), default=None)
            st_last = max((i for i, flag in enumerate(st_pooled) if flag), default=None)
            if ours_last != st_last:
                return f"the last pooled token of {text!r} behind the prompt would differ"
        elif list(st_pooled) != list(pooled):
            ours_count, st_count = sum(pooled), sum(st_pooled)
            return (f"behind the prompt {prompt!r}, Sentence Transformers would pool {st_count} token(s) of "
                    f"{text!r} where the encoder pools {ours_count} (the prompt is {prompt_length} tokens alone, but "
                    "its last characters merge with the text's first)")
    return None


@dataclass(frozen=True)
class CheckpointLayout:
    """The decided layout of one checkpoint.

    `format`: "native" or "remote-code". `sentence_transformers`: "native" (stock Transformer + Pooling (+
    Normalize) modules) or "custom" (the checkpoint's `LlamaEncoderTransformer`, loaded with trust_remote_code).
    `custom_reason`: why the custom module was kept (None when it was not). `native_pooling`: the engines' spelling of
    the pooling (None for remote-code)."""

    format: str
    pooling_mode: str
    sentence_transformers: str
    custom_reason: str | None = None
    native_pooling: NativePooling | None = None
    notes: tuple[str, ...] = field(default=())
    family: str = "llama"  # the base's decoder family (config base_model_type), a key of BASE_FAMILIES
    window: int | None = None  # the sliding window of its sliding layers, when it has any and it binds

    @property
    def native(self) -> bool:
        return self.format == "native"


def binding_window(config, max_seq_length: int | None) -> int | None:
    """How far a query on `config`'s sliding layers sees (`attention_window`: that many positions either side) when
    inputs of `max_seq_length` tokens (no limit: None) can be longer than that reach, else None: a window that never
    binds leaves the model exactly full-attention for every input it takes."""
    window = attention_window(config)
    if window is None:
        return None
    return window if max_seq_length is None or max_seq_length - 1 > window else None


def drop_idle_window(config, max_seq_length: int | None) -> bool:
    """Turn off a sliding window that never binds for inputs of `max_seq_length` tokens (`binding_window` is None):
    `sliding_window` null, `use_sliding_window` false, every layer full attention. The model then computes exactly
    what it did for every input it takes, and every engine reads one unambiguous config (TEI, for one, applies a
    Mistral `sliding_window` as a left-only window and refuses Qwen's `use_sliding_window`). Returns whether it
    changed `config`. Gemma3's window is kept as it is: its local layers have their own rotary base, so they stay
    local layers, and every engine that runs Gemma3 applies its window alike."""
    if getattr(config, "base_model_type", None) == "gemma3_text":
        return False
    if getattr(config, "sliding_window", None) is None and not getattr(config, "use_sliding_window", False):
        return False
    if binding_window(config, max_seq_length) is not None:
        return False
    config.sliding_window = None
    if getattr(config, "use_sliding_window", None) is not None:
        config.use_sliding_window = False
    if getattr(config, "layer_types", None):
        config.layer_types = ["full_attention"] * len(config.layer_types)
    return True


def plan_layout(*, format: str, pooling_mode: str, tokenizer, prompts: dict[str, str],
                padding_side: str = "right", family: str = "llama", window: int | None = None) -> CheckpointLayout:
    """Decide the checkpoint's layout. Raises `InputError` (before anything is written) for a format that cannot
    hold the checkpoint: `native` with a pooling no engine has, or with left padding. `family` is the base's
    decoder family; `window` its binding sliding window (`binding_window`), if any."""
    if format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}.")
    if family not in BASE_FAMILIES:
        raise InputError(f"Unknown decoder family {family!r}; expected one of {', '.join(BASE_FAMILIES)}.")
    if format == "remote-code":
        return CheckpointLayout(format=format, pooling_mode=pooling_mode, sentence_transformers="custom",
                                custom_reason="the remote-code format always uses the checkpoint's own module",
                                family=family, window=window)
    if pooling_mode not in NATIVE_POOLING:
        raise InputError(
            f"Pooling {pooling_mode!r} has no engine-native form ({NOT_NATIVE[pooling_mode]}); pass --format "
            "remote-code to write it for trust_remote_code loaders, or choose --pooling mean or last_token."
        )
    if padding_side != "right":
        raise InputError(
            "A native checkpoint pads on the right: stock models count positions over left padding, so a "
            "left-padded batch would embed differently; drop --padding-side left (or use --format remote-code)."
        )
    problems = []
    for name, prompt in sorted(prompts.items()):
        mismatch = sentence_transformers_mismatch(tokenizer, prompt, pooling_mode)
        if mismatch:
            problems.append(f"{name} prompt: {mismatch}")
    if problems:
        reason = ("stock Sentence Transformers pooling would not pool exactly the encoder's tokens (" +
                  "; ".join(problems) + "); a prompt ending in a newline avoids this")
        return CheckpointLayout(format=format, pooling_mode=pooling_mode, sentence_transformers="custom",
                                custom_reason=reason, native_pooling=NATIVE_POOLING[pooling_mode], family=family,
                                window=window)
    return CheckpointLayout(format=format, pooling_mode=pooling_mode, sentence_transformers="native",
                            native_pooling=NATIVE_POOLING[pooling_mode], family=family, window=window)


__all__ = [
    "AUTO_MAP",
    "NATIVE_ARCHITECTURE",
    "NATIVE_ARCHITECTURES",
    "binding_window",
    "drop_idle_window",
    "native_config_dict",
    "DEFAULT_FORMAT",
    "FORMATS",
    "NATIVE_POOLING",
    "NOT_NATIVE",
    "PROBE_TEXTS",
    "ST_POOLING_KEYS",
    "CheckpointLayout",
    "NativePooling",
    "plan_layout",
    "sentence_transformers_mismatch",
]


def native_config_dict(config) -> dict:
    """The `config.json` of a native checkpoint: every key of `config` written out (no defaults left implicit, since
    a stock config of the family reads it), as a bidirectional model of the base's family: its `model_type`
    (`config.base_model_type`), `is_causal: false`, `use_bidirectional_attention: true`, the family's
    `architectures` entry (`NATIVE_ARCHITECTURES`), vLLM's `pooling`, no KV cache, and `auto_map` for
    trust_remote_code loaders (which read the family back from the model type)."""
    native = NATIVE_POOLING.get(config.pooling_mode)
    if native is None:
        raise InputError(f"Pooling {config.pooling_mode!r} has no native form; write the checkpoint with "
                         "format='remote-code'.")
    values = config.to_dict()
    values.pop("transformers_version", None)
    family = values.pop("base_model_type", "llama")
    values.update(
        model_type=family, architectures=[NATIVE_ARCHITECTURES[family]], auto_map=dict(AUTO_MAP), is_causal=False,
        use_bidirectional_attention=True, pooling=native.vllm, use_cache=False,
        transformers_version=transformers.__version__,
    )
    if family == "qwen3" and isinstance(values.get("eos_token_id"), list):  # TEI's Qwen3Config reads one id
        values["eos_token_id"] = values["eos_token_id"][0] if values["eos_token_id"] else None
    if family == "gemma3_text":
        values = _gemma3_native_values(values, config)
    return dict(sorted(values.items()))


def _gemma3_native_values(values: dict, config) -> dict:
    """A Gemma3 native config in the form every reader of Gemma3 configs parses alike (transformers 4.57 and 5.x,
    vLLM, TEI): `use_bidirectional_attention: true` and no `is_causal` (transformers 5.x would then apply a
    one-wider window than vLLM on the local layers), the rotary bases flat (`rope_theta`, `rope_local_base_freq`,
    `rope_scaling`: 4.57 and TEI do not read a per-layer-type `rope_parameters`), the layout both as `layer_types`
    and as the `sliding_window_pattern` / `_sliding_window_pattern` integer (TEI reads only the latter), and the
    un-halved `sliding_window` (transformers halves it on load). Llama-only keys the family does not have go."""
    theta, local_theta, scaling = gemma3_rope(config)
    for key in ("is_causal", "rope_parameters", "hidden_act", "mlp_bias", "pretraining_tp"):
        values.pop(key, None)
    # The integer comes from the layer types the encoder runs (a config's own pattern key can be a stale default
    # beside custom layer_types): every n-th layer global, n = the first global layer's number; TEI's rule 9
    # refuses a layout that is not periodic.
    types = encoder_layer_types(config)
    full = [index for index, kind in enumerate(types) if kind == "full_attention"]
    pattern = full[0] + 1 if full else len(types) + 1
    values.update(
        rope_theta=theta, rope_local_base_freq=local_theta, rope_scaling=scaling, layer_types=types,
        sliding_window_pattern=pattern, _sliding_window_pattern=pattern,
        query_pre_attn_scalar=int(values["query_pre_attn_scalar"]),
        attention_bias=bool(values.get("attention_bias", False)),
    )
    return values


# The loaders a checkpoint can claim, in the order the "Where it runs" tables list them.
ENGINES = (
    ("transformers", "transformers >= 5.2, `AutoModel` (no remote code)"),
    ("transformers_remote", "transformers >= 4.57, `AutoModel`, `trust_remote_code=True`"),
    ("transformers_old", "transformers 4.57 to 5.1, `AutoModel` (no remote code)"),
    ("sentence_transformers", "sentence-transformers >= 6.2 (no remote code)"),
    ("sentence_transformers_remote", "sentence-transformers >= 6.2, `trust_remote_code=True`"),
    ("vllm", "vLLM 0.32 (`runner=\"pooling\"`)"),
    ("tei", "text-embeddings-inference"),
)
ENGINE_LABELS = dict(ENGINES)
# The families each engine is claimed for (docs/ENGINES.md: what was read in its source, and what was run).
VLLM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
TEI_FAMILIES = TEI_CHECKED_FAMILIES
# Where TEI serves each family (tei.RUNTIME_NOTES has the source lines), for the claims' notes.
TEI_RUNTIME = {
    "llama": "TEI serves Llama on CUDA in float16 only",
    "mistral": "TEI serves Mistral on CUDA in float16 with flash attention only",
    "qwen2": "TEI serves Qwen2 on CUDA in float16 with flash attention only",
    "qwen3": "TEI serves Qwen3 on CPU in float32 too",
    "gemma3_text": "TEI serves Gemma3 on CPU and CUDA in float32 only",
}


def engine_claims(layout: CheckpointLayout) -> dict[str, dict]:
    """What the layout lets each loader do, before anything is run: `{"status": "claimed" | "by format" |
    "unsupported", "note": ...}` per key of `ENGINES`. Verification turns "claimed" into "verified" (or fails)."""
    claims = {
        "transformers_remote": {"status": "claimed", "note": "LlamaEncoderModel: pool mask and pooler_output"},
        "sentence_transformers_remote": {"status": "claimed", "note": "queries and documents"},
    }
    if not layout.native:
        why = "model_type llama_encoder is our own code; write the checkpoint with --format native"
        claims.update(
            transformers={"status": "unsupported", "note": "needs trust_remote_code"},
            transformers_old={"status": "unsupported", "note": "refuses the unknown model type (fails loudly)"},
            sentence_transformers={"status": "unsupported", "note": "needs trust_remote_code"},
            vllm={"status": "unsupported", "note": why},
            tei={"status": "unsupported", "note": why},
        )
        return claims
    mean = layout.pooling_mode == "mean"
    instruction_pooled = "documents; queries pool the instruction tokens too (no prompt exclusion)" if mean else (
        "documents and queries")
    name = FAMILY_LABELS[layout.family]
    claims.update(
        transformers={"status": "claimed",
                      "note": f"stock bidirectional {name}Model; pool last_hidden_state yourself"},
        transformers_old={"status": "unsupported",
                          "note": "ignores is_causal: false and runs causally, silently: use trust_remote_code=True"},
        vllm={"status": "claimed", "note": instruction_pooled},
        tei={"status": "by format", "note": f"files checked against TEI's parsing rules, not run "
                                            f"({TEI_RUNTIME[layout.family]}); {instruction_pooled}"},
    )
    if layout.family == "gemma3_text":  # its switch is use_bidirectional_attention, which 4.56 and later read
        claims["transformers"]["note"] = "stock bidirectional Gemma3TextModel (transformers >= 4.57 too)"
        claims["transformers_old"] = {"status": "by format", "note": "stock Gemma3TextModel reads "
                                      "use_bidirectional_attention from 4.56 on (CI runs it on 4.57.6); not run here"}
    if layout.family not in VLLM_FAMILIES:
        claims["vllm"] = {"status": "unsupported", "note": f"not verified for {name} bases yet"}
    if layout.family not in TEI_FAMILIES:
        claims["tei"] = {"status": "unsupported", "note": f"TEI's rules for {name} are not checked yet"}
    if layout.window is not None and layout.family == "gemma3_text":  # vLLM's Gemma3 window is transformers'
        claims["tei"] = {"status": "unsupported", "note": (
            f"the local layers' window ({layout.window} positions either side) binds within the encoder's inputs, "
            "and TEI drops it for a batch of equal-length inputs (docs/ENGINES.md)")}
    elif layout.window is not None:
        why = (f"a sliding window of {layout.window} tokens binds within the encoder's inputs, and the engine "
               "applies another window (vLLM: one token narrower; TEI: left-only or refused; docs/ENGINES.md)")
        claims["vllm"] = {"status": "unsupported", "note": why}
        claims["tei"] = {"status": "unsupported", "note": why}
    if layout.sentence_transformers == "native":
        claims["sentence_transformers"] = {"status": "claimed", "note": "stock modules; queries and documents"}
    else:
        claims["sentence_transformers"] = {"status": "unsupported",
                                           "note": f"needs trust_remote_code: {layout.custom_reason}"}
    return claims


__all__ += ["ENGINES", "ENGINE_LABELS", "engine_claims"]
