"""Configuration of a bidirectional Llama encoder (a Hub file: imports only transformers).

This file is copied into every checkpoint the package writes, so it is the single source of truth for the
encoder's defaults: pooling mode, latent-attention sizes, normalisation and the instruction template.
"""

from transformers import LlamaConfig

POOLING_MODES = ("mean", "weighted_mean", "eos", "last_token", "bos", "latent_attention")

# The decoder families an encoder is built from: config `model_type` -> (transformers module, decoder layer class).
# Every one has Llama's tensor names and layout (embed_tokens, layers.N.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}
# _proj, norm); what differs lives in the layer: Qwen2 adds q/k/v biases, Qwen3 per-head q/k RMSNorms, Mistral and
# Qwen2 may set a sliding window. Gemma3 (text) differs beyond the layer as well: a scaled embedding, (1 + w)
# RMSNorms (four per layer), a rotary base per layer type and its own bidirectional window rule; its layers take a
# stock `Gemma3TextConfig` (`gemma3_text_config`). A checkpoint keeps its base's family in `base_model_type`.
BASE_FAMILIES = {
    "llama": ("llama", "LlamaDecoderLayer"),
    "mistral": ("mistral", "MistralDecoderLayer"),
    "qwen2": ("qwen2", "Qwen2DecoderLayer"),
    "qwen3": ("qwen3", "Qwen3DecoderLayer"),
    "gemma3_text": ("gemma3", "Gemma3DecoderLayer"),
}
# Gemma3's default local layout: every sixth layer global (full attention), the others sliding.
GEMMA3_DEFAULT_PATTERN = 6

# How a task instruction is written before a text (E5 / NV-Embed's query format); the instruction part is attended to
# but excluded from pooling. It ends in a newline: with byte-level BPE a trailing space merges into the text's first
# token, so stock Sentence Transformers (which drops as many tokens as the prompt has on its own) would not pool
# exactly the encoder's tokens.
DEFAULT_INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery:\n"
# The template of earlier versions, which adapters trained then were trained with.
LEGACY_INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: "
# The config entries that size the latent-attention head (saved beside a trained head, read back with it).
LATENT_ATTENTION_KEYS = (
    "latent_attention_num_latents",
    "latent_attention_num_heads",
    "latent_attention_head_dim",
    "latent_attention_mlp_dim",
)
# Entries of an encoder config that are not the base family's (dropped where a stock family config is built).
_ENCODER_ONLY_KEYS = (
    "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "is_causal",
    "base_model_type", "pooling_mode", "normalize_embeddings", "instruction_template", "hidden_act",
    *LATENT_ATTENTION_KEYS,
)


def encoder_layer_types(config) -> list[str]:
    """Each decoder layer's attention span, `"full_attention"` or `"sliding_attention"`, as the base family defines
    it: the config's `layer_types` where it has them (Qwen2/Qwen3: sliding from `max_window_layers` on when
    `use_sliding_window`), else Gemma3's `sliding_window_pattern` (every n-th layer full), else every layer sliding
    when the config sets a `sliding_window` (Mistral), else full. A layer is sliding only while `sliding_window` is
    set."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types and _family(config) == "gemma3_text":
        pattern = _gemma3_pattern(config)
        types = ["sliding_attention" if (index + 1) % pattern else "full_attention"
                 for index in range(config.num_hidden_layers)]
    if not types:
        types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    return [kind if kind == "sliding_attention" and window else "full_attention" for kind in types]


def attention_window(config) -> int | None:
    """The sliding layers' bidirectional window as the largest `|query position - key position|` a query sees, or
    None without sliding layers. Mistral and Qwen: `sliding_window` itself (stock transformers' bidirectional
    window). Gemma3: half the `sliding_window` its config holds (`|d| < W // 2 + 1`, the rule of transformers'
    `use_bidirectional_attention`, of vLLM and of TEI), the local window centred on the query."""
    window = getattr(config, "sliding_window", None)
    if window is None or "sliding_attention" not in encoder_layer_types(config):
        return None
    return window // 2 if _family(config) == "gemma3_text" else window


def is_native_bidirectional(config_dict: dict) -> bool:
    """Whether a saved config is a bidirectional checkpoint of a base family (an engine-native checkpoint): the
    family's `model_type` with `is_causal: false`, or for Gemma3 `use_bidirectional_attention: true` (the flag its
    engines read; its checkpoints carry no `is_causal`, on which stock transformers would use another window)."""
    model_type = config_dict.get("model_type")
    if model_type == "gemma3_text":
        return config_dict.get("use_bidirectional_attention") is True
    return model_type in BASE_FAMILIES and config_dict.get("is_causal") is False


def _family(config) -> str:
    return getattr(config, "base_model_type", None) or getattr(config, "model_type", "llama")


def _gemma3_pattern(config) -> int:
    return getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", None) or (
        GEMMA3_DEFAULT_PATTERN
    )


def gemma3_rope(config) -> tuple[float, float, dict | None]:
    """A Gemma3 config's rotary settings as `(global rope_theta, local rope_theta, global rope scaling or None)`,
    read from either spelling transformers has used: flat `rope_theta` / `rope_local_base_freq` / `rope_scaling`
    (up to 4.57 and in Hub configs) or `rope_parameters` per layer type (5.x). The local layers never scale."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope:  # 5.x (LlamaConfig also writes a flat rope_parameters from rope_theta)
        full = rope.get("full_attention", rope)
        local = rope.get("sliding_attention", {})
        scaling = {key: value for key, value in full.items() if key != "rope_theta"}
    else:  # 4.57: rope_scaling is the global layers' scaling (on 5.x it is an alias of rope_parameters)
        full, local, scaling = {}, {}, getattr(config, "rope_scaling", None)
    theta = full.get("rope_theta") or getattr(config, "rope_theta", None) or 1_000_000.0
    local_theta = local.get("rope_theta") or getattr(config, "rope_local_base_freq", None) or 10_000.0
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), float(local_theta), scaling


def gemma3_text_config(config):
    """The stock `Gemma3TextConfig` of a Gemma3 encoder config, bidirectional (`use_bidirectional_attention`), for
    the family's own layers, embedding, norms and rotary embeddings on any transformers version from 4.57: the
    rotary bases are passed in the spelling the installed version reads, and `sliding_window` as the config holds it
    (the un-halved W; the stock config halves it for its exclusive bound)."""
    from transformers import Gemma3TextConfig, __version__

    theta, local_theta, scaling = gemma3_rope(config)
    values = {
        key: value
        for key, value in config.to_dict().items()
        if key not in _ENCODER_ONLY_KEYS and not key.startswith("rope_") and key != "_sliding_window_pattern"
    }
    values.update(
        use_bidirectional_attention=True,
        layer_types=encoder_layer_types(config) if values.get("sliding_window") else values.get("layer_types"),
        sliding_window_pattern=_gemma3_pattern(config),
    )
    if values.get("sliding_window") is None:  # no window at all: every layer global (the stock config needs an int)
        values["sliding_window"] = 2 * config.max_position_embeddings
        values["layer_types"] = ["full_attention"] * config.num_hidden_layers
    if int(__version__.split(".")[0]) >= 5:  # rope_parameters per layer type
        values["rope_parameters"] = {
            "full_attention": {"rope_type": "default", **(scaling or {}), "rope_theta": theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        }
    else:
        values.update(rope_theta=theta, rope_local_base_freq=local_theta, rope_scaling=scaling)
    family = Gemma3TextConfig(**values)
    family._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return family


def fill_instruction_template(template: str, instruction: str) -> str:
    """The prompt `instruction` becomes under `template` (its `{instruction}` placeholder replaced; no other
    formatting, so braces in the instruction are kept as written)."""
    return template.replace("{instruction}", instruction)


class LlamaEncoderConfig(LlamaConfig):
    r"""A `LlamaConfig` for an encoder: attention is always bidirectional (`is_causal` is saved as `false`).

    Args:
        pooling_mode (`str`, defaults to `"mean"`):
            How token states become one sentence embedding: `"mean"`, `"weighted_mean"` (weights 1..n over the n
            pooled tokens, later tokens heavier), `"eos"` / `"last_token"` (the last pooled token; with `"eos"` the
            encoder's callers append the EOS token to every input), `"bos"` (the first pooled token) or
            `"latent_attention"` (NV-Embed's latent attention layer followed by a masked mean).
        normalize_embeddings (`bool`, defaults to `True`):
            Whether the sentence embedding (`pooler_output`) is L2-normalised.
        latent_attention_num_latents (`int`, defaults to 512):
            Rows of the trainable latent array that supplies keys and values.
        latent_attention_num_heads (`int`, defaults to 8):
            Heads of the cross-attention from token states to latents.
        latent_attention_head_dim (`int`, *optional*):
            Width of each head; defaults to `hidden_size // latent_attention_num_heads`.
        latent_attention_mlp_dim (`int`, *optional*):
            Inner width of the GELU-gated MLP; defaults to `4 * hidden_size`.
        instruction_template (`str`, defaults to `"Instruct: {instruction}\nQuery:\n"`):
            How an instruction is written before a query; its tokens are attended to but not pooled. A converted
            checkpoint holds the template its adapters were trained with.
        base_model_type (`str`, defaults to `"llama"`):
            The decoder family of the base (a key of `BASE_FAMILIES`): which decoder layer the encoder is built of.
            The family's own config entries (e.g. `sliding_window`, `layer_types`, `head_dim`) are kept as given.
    """

    model_type = "llama_encoder"

    def __init__(
        self,
        pooling_mode: str = "mean",
        normalize_embeddings: bool = True,
        latent_attention_num_latents: int = 512,
        latent_attention_num_heads: int = 8,
        latent_attention_head_dim: int | None = None,
        latent_attention_mlp_dim: int | None = None,
        instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
        base_model_type: str = "llama",
        **kwargs,
    ):
        if base_model_type not in BASE_FAMILIES:
            raise ValueError(
                f"base_model_type must be one of {', '.join(BASE_FAMILIES)}; got {base_model_type!r}."
            )
        if pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode must be one of {', '.join(POOLING_MODES)}; got {pooling_mode!r}.")
        if "{instruction}" not in instruction_template:
            raise ValueError(
                f"instruction_template must contain the placeholder '{{instruction}}'; got {instruction_template!r}."
            )
        if kwargs.pop("is_causal", False):
            raise ValueError("LlamaEncoderConfig is bidirectional; is_causal=True is not supported.")
        self.pooling_mode = pooling_mode
        self.normalize_embeddings = normalize_embeddings
        self.latent_attention_num_latents = latent_attention_num_latents
        self.latent_attention_num_heads = latent_attention_num_heads
        self.latent_attention_head_dim = latent_attention_head_dim
        self.latent_attention_mlp_dim = latent_attention_mlp_dim
        self.instruction_template = instruction_template
        self.base_model_type = base_model_type
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)
        # Set after the parent's init so no version of LlamaConfig can reset it.
        self.is_causal = False

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """The saved config, read as an encoder config also when it is an engine-native checkpoint's (the base
        family's `model_type`, e.g. `llama` or `qwen3`, with `is_causal: false`, which stock transformers >= 5.2
        loads as that family's bidirectional model): `trust_remote_code=True` then builds this class, with the
        family in `base_model_type`, without a model-type mismatch warning."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if is_native_bidirectional(config_dict):
            model_type = config_dict["model_type"]
            config_dict = {**config_dict, "model_type": cls.model_type, "base_model_type": model_type}
        return config_dict, kwargs

    def instruction_prompt(self, instruction: str) -> str:
        """The prompt written before a query with this task `instruction`, e.g. `Instruct: ...\nQuery:\n`."""
        return fill_instruction_template(self.instruction_template, instruction)

    @property
    def latent_head_dim(self) -> int:
        """The latent-attention head width in use: `latent_attention_head_dim`, else `hidden_size // num_heads`."""
        return self.latent_attention_head_dim or self.hidden_size // self.latent_attention_num_heads

    @property
    def latent_mlp_dim(self) -> int:
        """The latent-attention MLP's inner width in use: `latent_attention_mlp_dim`, else `4 * hidden_size`."""
        return self.latent_attention_mlp_dim or 4 * self.hidden_size

    def latent_attention_settings(self) -> dict:
        """The entries of `LATENT_ATTENTION_KEYS`, as saved beside a trained head."""
        return {key: getattr(self, key) for key in LATENT_ATTENTION_KEYS}

    def to_dict(self):
        output = super().to_dict()
        output["is_causal"] = False
        return output


__all__ = [
    "BASE_FAMILIES",
    "DEFAULT_INSTRUCTION_TEMPLATE",
    "GEMMA3_DEFAULT_PATTERN",
    "LATENT_ATTENTION_KEYS",
    "LEGACY_INSTRUCTION_TEMPLATE",
    "POOLING_MODES",
    "LlamaEncoderConfig",
    "attention_window",
    "encoder_layer_types",
    "fill_instruction_template",
    "gemma3_rope",
    "gemma3_text_config",
    "is_native_bidirectional",
]
