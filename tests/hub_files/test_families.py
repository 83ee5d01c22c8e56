"""Every decoder family the encoder is built from (Llama, Mistral, Qwen2, Qwen3, Gemma3), on every transformers
version CI runs: the encoder holds exactly the stock model's weights, equals an independent float64 bidirectional
forward pass (padding on either side, batch size 1, eager / sdpa / flex, a sliding window shorter than the input),
and stock `<Family>Model` with `is_causal: false` equals it where transformers honours that (>= 5.2) and is causal
before; stock `Gemma3TextModel` with `use_bidirectional_attention` equals it on every version."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from packaging.version import Version

from llama_encoder.configuration_llama_encoder import attention_window, encoder_layer_types
from tests.numeric import assert_equal_up_to_summation_order, llama_forward_terms
from tests.tiny import (
    TINY_FAMILIES,
    TINY_LLAMA,
    TINY_WINDOWS,
    random_padded_batch,
    tiny_family_config,
    tiny_family_encoder,
)

FAMILIES = list(TINY_FAMILIES)
HONOURS_IS_CAUSAL = Version(transformers.__version__) >= Version("5.2")
LENGTHS = [9, 5, 7]


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()  # flex attention compiles per shape; see test_attention.py
    yield


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * (offset + weight)


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float, factor: float = 1.0) -> torch.Tensor:
    """Rotary embedding of x (batch, seq, heads, dim) at integer positions (batch, seq), the half-split layout
    (`factor`: linear position scaling)."""
    dim = x.shape[-1]
    inverse = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim) / factor
    angles = positions.double()[..., None] * inverse  # (batch, seq, dim/2)
    cos, sin = torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None]
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _gemma3_settings(config) -> dict:
    """Gemma3's numbers as its config states them, in either spelling (4.57: rope_theta / rope_local_base_freq /
    rope_scaling; 5.x: rope_parameters per layer type): rotary bases and linear factor, query scale, window."""
    rope = config.rope_parameters if isinstance(getattr(config, "rope_parameters", None), dict) else {}
    full = rope.get("full_attention") or {"rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    local = rope.get("sliding_attention") or {"rope_theta": config.rope_local_base_freq}
    return {"full": float(full["rope_theta"]), "local": float(local["rope_theta"]),
            "factor": float(full.get("factor", 1.0)) if full.get("rope_type", "default") == "linear" else 1.0,
            "scale": config.query_pre_attn_scalar ** -0.5, "exclusive_window": config.sliding_window // 2 + 1}


def reference_forward(state: dict, config, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The bidirectional forward pass in float64, from the weights and the config alone: every real token attends
    to every real token (within `sliding_window` positions on sliding layers), positions count real tokens.
    Gemma3: embeddings times sqrt(hidden), (1 + w) RMSNorms, a norm after attention and around the GELU MLP, the
    local rotary base on sliding layers, queries scaled by `query_pre_attn_scalar`, window |d| < W // 2 + 1."""
    w = {name: tensor.double() for name, tensor in state.items()}
    gemma = config.base_model_type == "gemma3_text"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = config.rms_norm_eps
    if gemma:
        settings = _gemma3_settings(config)
    else:
        theta = float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"])
        settings = {"full": theta, "local": theta, "factor": 1.0, "scale": 1 / math.sqrt(head_dim),
                    "exclusive_window": (getattr(config, "sliding_window", None) or 0) + 1}
    offset = 1.0 if gemma else 0.0

    def norm(x, name):
        return _rms(x, w[name], eps, offset=offset)

    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    batch, seq = ids.shape
    keep = mask.bool()[:, None, None, :].expand(batch, 1, seq, seq)
    near = (positions[:, :, None] - positions[:, None, :]).abs()[:, None]
    x = w["embed_tokens.weight"][ids] * (math.sqrt(config.hidden_size) if gemma else 1.0)
    for index, kind in enumerate(encoder_layer_types(config)):
        p = f"layers.{index}."
        h = norm(x, p + "input_layernorm.weight")

        def project(name, width, h=h, p=p):
            out = h @ w[p + f"self_attn.{name}.weight"].T
            bias = w.get(p + f"self_attn.{name}.bias")
            return (out if bias is None else out + bias).view(batch, seq, width, head_dim)

        q, k, v = project("q_proj", heads), project("k_proj", kv_heads), project("v_proj", kv_heads)
        if p + "self_attn.q_norm.weight" in w:
            q, k = norm(q, p + "self_attn.q_norm.weight"), norm(k, p + "self_attn.k_norm.weight")
        sliding = kind == "sliding_attention"
        theta, factor = (settings["local"], 1.0) if sliding else (settings["full"], settings["factor"])
        q, k = _rotate(q, positions, theta, factor), _rotate(k, positions, theta, factor)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) * settings["scale"]
        allowed = keep & (near < settings["exclusive_window"]) if sliding else keep
        attended = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1) @ v
        out = attended.transpose(1, 2).reshape(batch, seq, heads * head_dim) @ w[p + "self_attn.o_proj.weight"].T
        if gemma:  # norm after attention, then before and after the GELU (tanh) MLP
            x = x + norm(out, p + "post_attention_layernorm.weight")
            h = norm(x, p + "pre_feedforward_layernorm.weight")
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            out = (torch.nn.functional.gelu(gate, approximate="tanh") * up) @ w[p + "mlp.down_proj.weight"].T
            x = x + norm(out, p + "post_feedforward_layernorm.weight")
            continue
        x = x + out
        h = norm(x, p + "post_attention_layernorm.weight")
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return norm(x, "norm.weight")


def _terms(config, seq_len: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    extra = 2 * head_dim  # Qwen3's and Gemma3's q/k norms
    if config.base_model_type == "gemma3_text":
        extra += 2 * config.hidden_size + 2  # its post-attention and post-MLP norms, the embedding scale
    return llama_forward_terms(config, seq_len) + config.num_hidden_layers * extra


def _stock_and_ours(stock, encoder, seed: int):
    """Last hidden states of a stock model (given positions counting real tokens, as the encoder counts them) and of
    the encoder on one right-padded random batch, and the mask of real tokens."""
    ids, mask = random_padded_batch(LENGTHS, "right", seed=seed)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = stock(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return theirs, ours, mask.bool(), ids


def _check_against_reference(encoder, ids, mask, what):
    with torch.no_grad():
        states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = reference_forward(encoder.state_dict(), encoder.config, ids, mask)
    real = mask.bool()
    assert_equal_up_to_summation_order(states[real], expected[real], terms=_terms(encoder.config, ids.shape[1]),
                                       dtype=torch.float32, what=what)
    return states


@pytest.mark.parametrize("family", FAMILIES)
def test_the_encoder_is_built_of_the_family_layer_with_exactly_its_weights(family):
    base, encoder = tiny_family_encoder(family)
    assert encoder.config.base_model_type == family
    assert type(encoder.layers[0]).__name__.endswith("DecoderLayer")
    assert family == "llama" or type(encoder.layers[0]) is type(base.layers[0])
    assert all(not layer.self_attn.is_causal for layer in encoder.layers)
    assert set(encoder.state_dict()) == set(base.state_dict())
    if family == "qwen2":
        assert encoder.layers[0].self_attn.q_proj.bias is not None and encoder.layers[0].self_attn.o_proj.bias is None
    if family == "qwen3":
        assert "layers.0.self_attn.q_norm.weight" in encoder.state_dict()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_the_independent_bidirectional_forward(family, padding_side, backend):
    _, encoder = tiny_family_encoder(family, attn_implementation=backend)
    ids, mask = random_padded_batch(LENGTHS, padding_side, seed=3)
    states = _check_against_reference(encoder, ids, mask, f"{family} {padding_side} {backend}")
    # batch size 1: each row alone gives its own states (no padding anywhere)
    for row, length in enumerate(LENGTHS):
        real = mask[row].bool()
        alone_ids = ids[row, real][None]
        with torch.no_grad():
            alone = encoder(input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids)).last_hidden_state[0]
        assert_equal_up_to_summation_order(alone, states[row, real], terms=_terms(encoder.config, length),
                                           dtype=torch.float32, what=f"{family} row {row} alone")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_last_token_changes_the_first_token_state(family):
    _, encoder = tiny_family_encoder(family, attn_implementation="sdpa")
    ids, mask = random_padded_batch([9], "right", seed=4)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] - 3 + 1) % (TINY_LLAMA["vocab_size"] - 3) + 3
    with torch.no_grad():
        delta = encoder(input_ids=ids).last_hidden_state[0, 0] - encoder(input_ids=changed).last_hidden_state[0, 0]
    assert delta.abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex_attention"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", list(TINY_WINDOWS))
def test_a_sliding_window_shorter_than_the_input_keeps_the_family_window(family, padding_side, backend):
    _, encoder = tiny_family_encoder(family, attn_implementation=backend, **TINY_WINDOWS[family])
    window = attention_window(encoder.config)
    assert window < max(LENGTHS) - 1 and "sliding_attention" in encoder.layer_types
    ids, mask = random_padded_batch(LENGTHS, padding_side, seed=5)
    _check_against_reference(encoder, ids, mask, f"{family} window {window} {padding_side} {backend}")
    # the window binds: a token further than `window` from the first token, changed, leaves the first sliding
    # layer's view of it alone but not the full-attention model's (checked by the reference above); and the
    # windowed model differs from the same weights without a window
    _, unwindowed = tiny_family_encoder(family, attn_implementation=backend)
    with torch.no_grad():
        a = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        b = unwindowed(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (a - b)[mask.bool()].abs().max() > 1e-3


def test_a_sliding_window_refuses_flash_attention_when_it_binds():
    from llama_encoder.modeling_llama_encoder import bidirectional_attention_mask

    mask = torch.ones(1, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="sliding window of 3 tokens.*sdpa"):
        bidirectional_attention_mask(mask, "flash_attention_2", torch.float32, window=3)
    assert bidirectional_attention_mask(mask, "flash_attention_2", torch.float32, window=8) is None  # never binds
    padded = torch.tensor([[1] * 7 + [0] * 2])
    assert bidirectional_attention_mask(padded, "flash_attention_2", torch.float32, window=8) is padded


@pytest.mark.parametrize("family", FAMILIES + [f"{name}-window" for name in TINY_WINDOWS])
def test_stock_model_with_is_causal_false_is_bidirectional_exactly_where_transformers_honours_it(family):
    name, _, windowed = family.partition("-")
    window = TINY_WINDOWS[name] if windowed else {}
    base, encoder = tiny_family_encoder(name, attn_implementation="sdpa", **window)
    if name == "gemma3_text":  # its switch is use_bidirectional_attention (read at build), honoured from 4.56 on
        from transformers import AutoModel

        base = AutoModel.from_config(tiny_family_config(name, use_bidirectional_attention=True,
                                                        attn_implementation="sdpa", **window)).eval()
        base.load_state_dict(encoder.state_dict(), strict=True)
    else:
        base.config.is_causal = False
    stock, ours, real, ids = _stock_and_ours(base, encoder, seed=6)
    if HONOURS_IS_CAUSAL or name == "gemma3_text":
        assert_equal_up_to_summation_order(stock[real], ours[real], terms=_terms(encoder.config, ids.shape[1]),
                                           dtype=torch.float32, what=f"stock {family}")
    else:  # transformers < 5.2 ignores is_causal: the first token never sees the rest
        with torch.no_grad():
            first_alone = base(input_ids=ids[:1, :1]).last_hidden_state[0, 0]
        assert_equal_up_to_summation_order(stock[0, 0], first_alone, terms=_terms(encoder.config, 1),
                                           dtype=torch.float32, what=f"causal stock {family}")
        assert (stock[0, 0] - ours[0, 0]).abs().max() > 1e-3


def test_gemma3_runs_the_stock_layers_in_inference():
    _, encoder = tiny_family_encoder("gemma3_text", attn_implementation="sdpa")
    encoder.eval()
    with torch.no_grad():
        assert not encoder._can_take_fast_path(False, {})  # its four norms per layer are not in the fast path


@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "gemma3_text"])
def test_inference_fast_path_equals_the_stock_layers(family):
    _, encoder = tiny_family_encoder(family, attn_implementation="sdpa")
    ids, mask = random_padded_batch(LENGTHS, "right", seed=8)
    with torch.no_grad():
        fast = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.enable_grad():  # autograd on: the stock decoder layers run
        stock = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    real = mask.bool()
    assert_equal_up_to_summation_order(fast[real], stock[real], terms=_terms(encoder.config, ids.shape[1]),
                                       dtype=torch.float32, what=f"fast path {family}")


@pytest.mark.parametrize("pooling_mode", ["mean", "latent_attention"])
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma3_text"])
def test_trust_remote_code_loads_the_family_checkpoint_in_a_fresh_process(family, pooling_mode, tmp_path):
    """The checkpoint's own code (the remote-code fallback: any transformers from 4.57) builds the family's
    bidirectional encoder, from a native config (the family's model_type) or, for latent attention, the remote-code
    one (model_type llama_encoder with base_model_type)."""
    import json

    from llama_encoder.conversion_scripts.layout import native_config_dict
    from tests.hub_files.test_hub_loading import _load_in_fresh_process

    _, encoder = tiny_family_encoder(family, pooling_mode=pooling_mode)
    folder = tmp_path / "checkpoint"
    encoder.save_pretrained(folder)
    if pooling_mode == "mean":
        config = {**native_config_dict(encoder.config), "dtype": "float32"}
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        assert config["model_type"] == family
    else:
        assert json.loads((folder / "config.json").read_text())["base_model_type"] == family
    ids, mask = random_padded_batch(LENGTHS, "right", seed=9)
    with torch.no_grad():
        expected = encoder(input_ids=ids, attention_mask=mask).pooler_output
    embeddings, loaded_class = _load_in_fresh_process(folder, ids, mask, tmp_path)
    assert loaded_class.endswith(".LlamaEncoderModel")
    assert torch.equal(torch.from_numpy(embeddings), expected)


@pytest.mark.parametrize("window", ["default", "binding"])
def test_stock_transformers_loads_a_native_gemma3_checkpoint_bidirectionally(window, tmp_path):
    """A native Gemma3 config.json (flat rotary bases, un-halved window, use_bidirectional_attention and no
    is_causal) read by stock `AutoModel` without remote code, on 4.57 as on 5.x: the same model as ours, local
    window included, and not the causal one."""
    import json

    from transformers import AutoModel

    from llama_encoder.conversion_scripts.layout import native_config_dict

    _, encoder = tiny_family_encoder("gemma3_text", attn_implementation="sdpa",
                                     **(TINY_WINDOWS["gemma3_text"] if window == "binding" else {}))
    folder = tmp_path / "checkpoint"
    encoder.save_pretrained(folder)
    config = {**native_config_dict(encoder.config), "dtype": "float32"}
    config.pop("auto_map")  # stock classes only
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    stock = AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert type(stock).__name__ == "Gemma3TextModel" and stock.config.use_bidirectional_attention is True
    assert stock.config.sliding_window == config["sliding_window"] // 2 + 1  # halved on load, as transformers does
    theirs, ours, real, ids = _stock_and_ours(stock, encoder, seed=10)
    assert_equal_up_to_summation_order(theirs[real], ours[real], terms=_terms(encoder.config, ids.shape[1]),
                                       dtype=torch.float32, what=f"stock gemma3 {window}")
    causal = AutoModel.from_pretrained(folder, use_bidirectional_attention=False).eval()
    with torch.no_grad():
        first = causal(input_ids=ids[:1, :1]).last_hidden_state[0, 0]
    assert (first - ours[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean", "last_token", "bos", "latent_attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pooling_excludes_the_instruction_tokens_for_every_family(family, pooling_mode):
    """An instruction is attended to (it changes the text tokens' states) but not pooled: `pooler_output` is the
    pooling of the text tokens' own states, computed here by hand from `last_hidden_state` (float64)."""
    _, encoder = tiny_family_encoder(family, pooling_mode=pooling_mode, attn_implementation="sdpa")
    encoder.config.normalize_embeddings = False
    ids, mask = random_padded_batch([9, 6], "right", seed=11)
    pool_mask = mask.clone()
    pool_mask[:, :3] = 0  # the first three tokens of each row are the instruction
    with torch.no_grad():
        out = encoder(input_ids=ids, attention_mask=mask, pool_mask=pool_mask)
        without = encoder(input_ids=ids[:, 3:], attention_mask=mask[:, 3:]).last_hidden_state
    states = out.last_hidden_state.double()
    if pooling_mode == "latent_attention":
        with torch.no_grad():
            states = encoder.latent_attention(out.last_hidden_state).double()
    expected = []
    for row in range(ids.shape[0]):
        picked = states[row, pool_mask[row].bool()]  # the text tokens, in order
        if pooling_mode in ("mean", "latent_attention"):
            expected.append(picked.mean(dim=0))
        elif pooling_mode == "weighted_mean":
            weights = torch.arange(1, len(picked) + 1, dtype=torch.float64)
            expected.append((weights[:, None] * picked).sum(dim=0) / weights.sum())
        elif pooling_mode == "last_token":
            expected.append(picked[-1])
        else:
            expected.append(picked[0])
    expected = torch.stack(expected)
    hidden = encoder.config.hidden_size
    assert_equal_up_to_summation_order(out.pooler_output, expected, terms=2 * ids.shape[1] + hidden,
                                       dtype=torch.float32, what=f"{family} {pooling_mode}")
    # attended to: the text tokens' states differ from the same text encoded without the instruction
    real = mask[:, 3:].bool()
    assert (out.last_hidden_state[:, 3:][real] - without[real]).abs().max() > 1e-3
