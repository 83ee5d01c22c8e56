"""Every decoder family the encoder is built from (Llama, Mistral, Qwen2, Qwen3), on every transformers version CI
runs: the encoder holds exactly the stock model's weights, equals an independent float64 bidirectional forward pass
(padding on either side, batch size 1, eager / sdpa / flex, a sliding window shorter than the input), and stock
`<Family>Model` with `is_causal: false` equals it where transformers honours that (>= 5.2) and is causal before."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from packaging.version import Version

from llama_encoder.configuration_llama_encoder import encoder_layer_types
from tests.numeric import assert_equal_up_to_summation_order, llama_forward_terms
from tests.tiny import TINY_FAMILIES, TINY_LLAMA, TINY_WINDOWS, random_padded_batch, tiny_family_encoder

FAMILIES = list(TINY_FAMILIES)
HONOURS_IS_CAUSAL = Version(transformers.__version__) >= Version("5.2")
LENGTHS = [9, 5, 7]


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()  # flex attention compiles per shape; see test_attention.py
    yield


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x (batch, seq, heads, dim) at integer positions (batch, seq), the half-split layout."""
    dim = x.shape[-1]
    inverse = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[..., None] * inverse  # (batch, seq, dim/2)
    cos, sin = torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None]
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def reference_forward(state: dict, config, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The bidirectional forward pass in float64, from the weights and the config alone: every real token attends
    to every real token (within `sliding_window` positions on sliding layers), positions count real tokens."""
    w = {name: tensor.double() for name, tensor in state.items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps, theta = config.rms_norm_eps, float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"])
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    batch, seq = ids.shape
    keep = mask.bool()[:, None, None, :].expand(batch, 1, seq, seq)
    near = (positions[:, :, None] - positions[:, None, :]).abs()[:, None]
    x = w["embed_tokens.weight"][ids]
    for index, kind in enumerate(encoder_layer_types(config)):
        p = f"layers.{index}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)

        def project(name, width, h=h, p=p):
            out = h @ w[p + f"self_attn.{name}.weight"].T
            bias = w.get(p + f"self_attn.{name}.bias")
            return (out if bias is None else out + bias).view(batch, seq, width, head_dim)

        q, k, v = project("q_proj", heads), project("k_proj", kv_heads), project("v_proj", kv_heads)
        if p + "self_attn.q_norm.weight" in w:
            q, k = _rms(q, w[p + "self_attn.q_norm.weight"], eps), _rms(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = _rotate(q, positions, theta), _rotate(k, positions, theta)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        allowed = keep & (near <= config.sliding_window) if kind == "sliding_attention" else keep
        attended = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1) @ v
        x = x + attended.transpose(1, 2).reshape(batch, seq, heads * head_dim) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return _rms(x, w["norm.weight"], eps)


def _terms(config, seq_len: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return llama_forward_terms(config, seq_len) + config.num_hidden_layers * 2 * head_dim  # + Qwen3's q/k norms


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
    window = encoder.config.sliding_window
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
    base, encoder = tiny_family_encoder(name, attn_implementation="sdpa", **(TINY_WINDOWS[name] if windowed else {}))
    base.config.is_causal = False
    ids, mask = random_padded_batch(LENGTHS, "right", seed=6)
    with torch.no_grad():
        ours = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        stock = base(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    if HONOURS_IS_CAUSAL:
        assert_equal_up_to_summation_order(stock[real], ours[real], terms=_terms(encoder.config, ids.shape[1]),
                                           dtype=torch.float32, what=f"stock {family}")
    else:  # transformers < 5.2 ignores is_causal: the first token never sees the rest
        with torch.no_grad():
            first_alone = base(input_ids=ids[:1, :1]).last_hidden_state[0, 0]
        assert_equal_up_to_summation_order(stock[0, 0], first_alone, terms=_terms(encoder.config, 1),
                                           dtype=torch.float32, what=f"causal stock {family}")
        assert (stock[0, 0] - ours[0, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
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
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
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
