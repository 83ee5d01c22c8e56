"""LoRA adapters in peft's layout: the merge arithmetic, reading and refusing adapters, checking them against a base."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from llama_encoder.weights.lora import (
    LoraAdapter,
    LoraModule,
    merge_lora_delta,
    read_adapter,
    validate_adapter_against,
)
from tests.numeric import assert_within_rounding_steps, lora_merge_error, round_to
from tests.tiny import TINY_LATENTS, TINY_LLAMA


def tiny_llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def randomize_lora(peft_model, seed: int) -> None:
    """peft starts lora_B at zero; random non-zero pairs make every merge visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def save_lora_adapter(model, folder: Path, *, seed: int, **lora_kwargs):
    """Wrap `model` in a LoRA adapter with random weights, save it with peft and return the peft model."""
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(folder)
    return peft_model


def peft_merged_state(peft_model) -> dict[str, torch.Tensor]:
    """peft's own merge, with the base model's names mapped to the encoder's."""
    merged = peft_model.merge_and_unload().state_dict()
    return {
        key.removeprefix("model."): value.clone() for key, value in merged.items() if not key.startswith("lm_head.")
    }


def assert_matches_peft(ours: torch.Tensor, peft: torch.Tensor, weight: torch.Tensor, adapters, name: str) -> None:
    """Our float32 merge of `adapters` into `weight` and peft's each lie within lora_merge_error of the exact sum,
    so within twice that of each other (exactly equal where no adapter targets `name`). When `ours` was then cast
    to a lower precision, it must be the rounding of a value within that distance of peft's."""
    modules = [adapter.modules[name] for adapter in adapters if name in adapter.modules]
    error = 2 * lora_merge_error(weight, modules)
    assert_within_rounding_steps(ours, peft, steps=0, error=error, what=name)


def assert_state_matches_peft(state: dict, expected: dict, base_state: dict, adapters) -> None:
    """Every tensor of `expected` (peft's float32 merge of `adapters` into `base_state`, encoder names) in `state`,
    as far as float32 merging allows (assert_matches_peft): exact where no adapter targets it or it is not in the
    base (a pooling head). `base_state` may use the causal LM's names (`model.` prefix)."""
    weights = {key.removeprefix("model."): value for key, value in base_state.items()}
    for name, tensor in expected.items():
        assert_matches_peft(state[name], tensor, weights.get(name, tensor), adapters, name)


def _weight_shapes(model) -> dict[str, tuple[int, ...]]:
    return {key.removeprefix("model."): tuple(value.shape) for key, value in model.state_dict().items()}


def test_merge_lora_delta_matches_hand_computation():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=generator)
    lora_a = torch.randn(2, 5, generator=generator)
    lora_b = torch.randn(3, 2, generator=generator)
    expected = [
        [
            weight[i, j].item() + 0.75 * sum(lora_b[i, k].item() * lora_a[k, j].item() for k in range(2))
            for j in range(5)
        ]
        for i in range(3)
    ]
    merged = merge_lora_delta(weight, lora_a, lora_b, 0.75)
    # float32 addmm: within (r + 4) * 2**-24 of the magnitudes of the exact value (Python's float64 sums above err
    # by ~2**-52, far inside that)
    error = lora_merge_error(weight, [LoraModule(lora_a, lora_b, 0.75)])
    assert_within_rounding_steps(merged, expected, steps=0, error=error, what="merge")
    assert not torch.equal(merged, weight), "the input weight must not be changed in place"

    transposed = merge_lora_delta(weight.T.contiguous(), lora_a, lora_b, 0.75, fan_in_fan_out=True)
    assert_within_rounding_steps(transposed, torch.tensor(expected, dtype=torch.float64).T, steps=0, error=error.T,
                                 what="fan_in_fan_out merge")


def test_merge_lora_delta_keeps_dtype_and_adds_in_float32():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 64, generator=generator).bfloat16()
    lora_a = torch.randn(256, 64, generator=generator).bfloat16()
    lora_b = torch.randn(64, 256, generator=generator).bfloat16()
    merged = merge_lora_delta(weight, lora_a, lora_b, 0.01)
    assert merged.dtype == torch.bfloat16
    # bfloat16 products are exact in float64; the float64 matmul's own rounding (r * 2**-53) is far below float32's
    exact = weight.double() + 0.01 * (lora_b.double() @ lora_a.double())
    # The float32 sum is within (r + 4) * 2**-24 of the magnitudes of the exact value, and rounding is monotonic:
    # the result is the bfloat16 rounding of a value in that interval (one step from round(exact) at most, where
    # the interval straddles a halfway point; any number of steps near zero, where steps are tiny).
    error = lora_merge_error(weight, [LoraModule(lora_a, lora_b, 0.01)])
    ambiguous = round_to(exact - error, torch.bfloat16) != round_to(exact + error, torch.bfloat16)
    assert ambiguous.sum() < 0.1 * exact.numel()  # so the check pins 90% of the elements to round(exact) exactly
    assert_within_rounding_steps(merged, exact, steps=0, error=error, what="float32 merge, one bfloat16 rounding")
    # The check above can fail: rounding the delta to bfloat16 before adding lands further away.
    in_bfloat16 = weight + ((lora_b @ lora_a) * 0.01).bfloat16()
    with pytest.raises(AssertionError, match="rounding steps"):
        assert_within_rounding_steps(in_bfloat16, exact, steps=0, error=error)


def test_merge_lora_delta_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same r"):
        merge_lora_delta(torch.zeros(4, 4), torch.zeros(2, 4), torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="another size"):
        merge_lora_delta(torch.zeros(4, 6), torch.zeros(2, 4), torch.zeros(4, 2), 1.0)


def test_read_adapter_maps_causal_lm_keys_and_matches_peft_merge(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base_state = {key.removeprefix("model."): value.clone() for key, value in base.state_dict().items()}
    peft_model = save_lora_adapter(
        base, tmp_path / "adapter", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    adapter = read_adapter(tmp_path / "adapter")

    expected_names = {
        f"layers.{layer}.{module}.weight"
        for layer in range(TINY_LLAMA["num_hidden_layers"])
        for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    assert set(adapter.modules) == expected_names
    assert all(module.scaling == 2.0 for module in adapter.modules.values())
    assert adapter.pooling_head == {} and adapter.pooling_config is None

    merged = peft_merged_state(peft_model)
    for name, weight in base_state.items():
        if name.startswith("lm_head."):
            continue
        assert_matches_peft(adapter.merge_into(name, weight), merged[name], weight, [adapter], name)
    assert not torch.allclose(
        merged["layers.0.self_attn.q_proj.weight"], base_state["layers.0.self_attn.q_proj.weight"]
    )


def test_read_adapter_llm2vec_layout_on_base_model(tmp_path):
    """LLM2Vec's McGill-NLP adapters were trained on LlamaModel: keys lack the inner `model.`."""
    torch.manual_seed(0)
    base = LlamaModel(tiny_llama_config())
    base_state = {key: value.clone() for key, value in base.state_dict().items()}
    peft_model = save_lora_adapter(base, tmp_path / "mntp", seed=2, r=4, lora_alpha=16, target_modules=["k_proj"])
    saved_keys = load_file(tmp_path / "mntp" / "adapter_model.safetensors")
    assert "base_model.model.layers.0.self_attn.k_proj.lora_A.weight" in saved_keys
    config_file = tmp_path / "mntp" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "meta-llama/Meta-Llama-3-8B-Instruct"
    config_file.write_text(json.dumps(config))

    adapter = read_adapter(tmp_path / "mntp")
    assert adapter.base_model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert set(adapter.modules) == {"layers.0.self_attn.k_proj.weight", "layers.1.self_attn.k_proj.weight"}
    merged = peft_merged_state(peft_model)
    name = "layers.1.self_attn.k_proj.weight"
    assert_matches_peft(adapter.merge_into(name, base_state[name]), merged[name], base_state[name], [adapter], name)


def test_rslora_with_rank_and_alpha_patterns_matches_peft(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base_state = {key.removeprefix("model."): value.clone() for key, value in base.state_dict().items()}
    peft_model = save_lora_adapter(
        base,
        tmp_path / "rs",
        seed=3,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "o_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"o_proj": 3},
    )
    adapter = read_adapter(tmp_path / "rs")
    assert adapter.modules["layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(8 / math.sqrt(4))
    assert adapter.modules["layers.1.self_attn.q_proj.weight"].scaling == pytest.approx(8 / math.sqrt(2))
    assert adapter.modules["layers.0.self_attn.o_proj.weight"].scaling == pytest.approx(3 / math.sqrt(4))
    merged = peft_merged_state(peft_model)
    for name in adapter.modules:
        assert_matches_peft(adapter.merge_into(name, base_state[name]), merged[name], base_state[name], [adapter],
                             name)


def _write_lora(tmp_path: Path, name: str = "adapter", **lora_kwargs) -> Path:
    torch.manual_seed(0)
    save_lora_adapter(LlamaForCausalLM(tiny_llama_config()), tmp_path / name, seed=4, r=2, **lora_kwargs)
    return tmp_path / name


def test_dora_is_refused(tmp_path):
    folder = _write_lora(tmp_path, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        read_adapter(folder)


def test_modules_to_save_is_refused_naming_the_tensors(tmp_path):
    folder = _write_lora(tmp_path, target_modules=["q_proj"], modules_to_save=["norm"])
    with pytest.raises(ValueError, match=r"not LoRA pairs \(modules_to_save=\['norm'\]\).*norm\.weight"):
        read_adapter(folder)


def test_other_peft_types_are_refused_by_name(tmp_path):
    peft_model = get_peft_model(
        LlamaForCausalLM(tiny_llama_config()),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    peft_model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="'IA3' adapter"):
        read_adapter(tmp_path / "ia3")


def test_pickled_adapter_needs_allow_pickle(tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_lora(peft_model, 5)
    peft_model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        read_adapter(tmp_path / "pickled")

    adapter = read_adapter(tmp_path / "pickled", allow_pickle=True)
    expected = dict(peft_model.named_parameters())[
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"
    ]
    # read back from the bytes peft wrote: no arithmetic, so bit for bit
    torch.testing.assert_close(adapter.modules["layers.1.self_attn.q_proj.weight"].lora_b, expected.detach(), rtol=0,
                               atol=0)


def test_missing_weights_and_missing_pair_half_are_reported(tmp_path):
    folder = _write_lora(tmp_path, target_modules=["q_proj"])
    weights = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights.*adapter_model.safetensors"):
        read_adapter(folder)

    del weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no lora_B for model.layers.0.self_attn.q_proj"):
        read_adapter(folder)


def test_config_rank_must_match_the_weights(tmp_path):
    folder = _write_lora(tmp_path, target_modules=["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rank r=8"):
        read_adapter(folder)


def test_pooling_head_and_config_are_read(tmp_path):
    folder = _write_lora(tmp_path, target_modules=["q_proj"])
    head = {"latent_attention.latents": torch.randn(TINY_LATENTS["latent_attention_num_latents"], 64)}
    save_file(head, folder / "pooling_head.safetensors")
    pooling_config = {"pooling_mode": "latent_attention", **TINY_LATENTS}
    (folder / "pooling_config.json").write_text(json.dumps(pooling_config))
    adapter = read_adapter(folder)
    assert adapter.pooling_config == pooling_config
    torch.testing.assert_close(adapter.pooling_head["latent_attention.latents"], head["latent_attention.latents"],
                               rtol=0, atol=0)  # read back from the file: bit for bit

    save_file({"lm_head.weight": torch.zeros(2, 2)}, folder / "pooling_head.safetensors")
    with pytest.raises(ValueError, match="only hold the latent-attention head.*lm_head.weight"):
        read_adapter(folder)
    (folder / "pooling_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pooling_head.safetensors is missing"):
        read_adapter(folder)


def test_validate_names_size_and_missing_layers(tmp_path):
    folder = _write_lora(tmp_path, target_modules=["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/two-layer-model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    adapter = read_adapter(folder)

    same = tiny_llama_config()
    validate_adapter_against(adapter, same.to_dict(), _weight_shapes(LlamaModel(same)))

    one_layer = tiny_llama_config(num_hidden_layers=1)
    with pytest.raises(
        ValueError,
        match=r"num_hidden_layers=1.*reaches layer 1.*layers\.1\.self_attn\.q_proj\.weight.*org/two-layer-model",
    ):
        validate_adapter_against(adapter, one_layer.to_dict(), _weight_shapes(LlamaModel(one_layer)))

    wider = tiny_llama_config(hidden_size=128, intermediate_size=256)
    with pytest.raises(
        ValueError, match=r"hidden_size=128.*shape mismatches \(2\).*adapter \(64, 64\) vs base \(128, 128\)"
    ):
        validate_adapter_against(adapter, wider.to_dict(), _weight_shapes(LlamaModel(wider)))


def test_lm_head_lora_is_dropped_unless_tied(tmp_path):
    folder = _write_lora(tmp_path, target_modules=["q_proj", "lm_head"])
    adapter = read_adapter(folder)
    assert adapter.ignored_modules == ("lm_head",)
    assert all(name.startswith("layers.") for name in adapter.modules)
    untied = tiny_llama_config()
    validate_adapter_against(adapter, untied.to_dict(), _weight_shapes(LlamaModel(untied)))
    tied = tiny_llama_config(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties to embed_tokens"):
        validate_adapter_against(adapter, tied.to_dict(), _weight_shapes(LlamaModel(tied)))


def test_adapter_dataclass_merges_only_its_targets():
    weight = torch.randn(4, 4)
    adapter = LoraAdapter(path=Path("x"), config={}, modules={})
    assert adapter.merge_into("layers.0.self_attn.q_proj.weight", weight) is weight
