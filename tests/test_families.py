"""Mistral, Qwen2, Qwen3 and Gemma3 bases through the package: convert writes a native checkpoint that keeps the
base's model_type (stock AutoModel loads it as that family's bidirectional model, verified in a fresh process), the
three training objectives train on it and their adapters merge like peft, and sliding windows are kept where they
bind and dropped where they cannot (Gemma3's local layers are always kept: they have their own rotary base)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

from llama_encoder.conversion_scripts.convert import convert
from llama_encoder.encoding.encode import Encoder
from llama_encoder.training.arguments import TrainingArguments
from llama_encoder.training.model import load_training_model
from llama_encoder.training.run import train
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.tiny import TINY_WINDOWS, save_tiny_base

FAMILIES = ["mistral", "qwen2", "qwen3", "gemma3_text"]
STOCK_CLASSES = {"mistral": "MistralModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model",
                 "gemma3_text": "Gemma3TextModel"}
TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "The cat ran.",
         "A dog sat on the mat in the park.", "Light.", "Sugar from plants is sweet.", "Where is the cat?"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_base(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"{request.param}-base")
    return request.param, save_tiny_base(folder, family=request.param)


def _engines(out) -> dict:
    return json.loads((out / "verification.json").read_text())["engines"]


def _stock_mean(folder, texts) -> torch.Tensor:
    """Mean-pooled, L2-normalised last_hidden_state of stock AutoModel (no remote code), right-padded."""
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1), type(model).__name__


def test_convert_writes_a_native_checkpoint_of_the_family(family_base, tmp_path):
    family, base = family_base
    out = tmp_path / "encoder"
    # a query prompt ending in a newline: stock Sentence Transformers modules pool exactly the encoder's tokens
    convert(base=str(base), out=out, vllm=False, max_seq_length=128, query_prompt="Instruct: Find the cat\nQuery:\n")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["use_bidirectional_attention"] is True
    assert "base_model_type" not in config
    if family == "gemma3_text":  # no is_causal (stock 5.x would widen the local window); rotary bases written flat
        assert "is_causal" not in config and "rope_parameters" not in config
        assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 1e4)
        assert config["_sliding_window_pattern"] == config["sliding_window_pattern"] == 2
    else:
        assert config["is_causal"] is False
    engines = _engines(out)
    for loader in ("transformers", "transformers_remote", "sentence_transformers", "sentence_transformers_remote"):
        assert engines[loader]["status"] == "verified", (loader, engines[loader])
    # stock 4.57 to 5.1 ignore is_causal; Gemma3's use_bidirectional_attention they read (tests/hub_files)
    assert engines["transformers_old"]["status"] == ("by format" if family == "gemma3_text" else "unsupported")
    assert engines["tei"]["status"] == "by format"

    # stock transformers, no remote code: the family's own model, bidirectional, pooled here by hand
    stock, class_name = _stock_mean(out, TEXTS[:4])
    assert class_name == STOCK_CLASSES[family]
    ours = torch.from_numpy(Encoder.from_pretrained(out, device="cpu", dtype="float32").encode(TEXTS[:4]))
    encoder = Encoder.from_pretrained(out, device="cpu", dtype="float32")
    assert encoder.model.config.base_model_type == family
    assert_equal_up_to_summation_order(ours, stock, terms=encoder_terms(encoder.model, 16), what=family)


def _args(base, tmp_path, **overrides) -> TrainingArguments:
    values = dict(objective="mntp", out=str(tmp_path / "adapter"), data=[], base=str(base), max_steps=3,
                  batch_size=4, show_progress=False, lr=5e-3, lora_dropout=0.0)
    values.update(overrides)
    return TrainingArguments(**values)


def test_the_three_objectives_train_and_their_adapters_merge_like_peft(family_base, tmp_path):
    family, base = family_base
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    sts = tmp_path / "sts.csv"
    rows = [f"{(i * 7) % 6},{TEXTS[i % 8]},{TEXTS[(i * 3 + 1) % 8]}" for i in range(16)]
    sts.write_text("score,sentence1,sentence2\n" + "\n".join(rows) + "\n")

    mntp, simcse, supervised = tmp_path / "mntp", tmp_path / "simcse", tmp_path / "supervised"
    for summary in (
        train(_args(base, tmp_path, out=str(mntp), data=[str(texts)])),
        train(_args(base, tmp_path, objective="simcse", out=str(simcse), adapters=[str(mntp)], data=[str(texts)])),
        train(_args(base, tmp_path, objective="supervised", out=str(supervised), adapters=[str(mntp)],
                    data=[str(sts)], pooling="latent_attention")),
    ):
        assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["final_loss"]))

    result = convert(out=tmp_path / "encoder", base=str(base), adapters=[mntp, supervised], format="remote-code")
    assert json.loads((result.out_dir / "config.json").read_text())["base_model_type"] == family
    # independently: MNTP merged by our loader, the supervised adapter merged by peft, the trained head loaded
    from safetensors.torch import load_file

    reference = load_training_model(base=str(base), adapters=[mntp], pooling="latent_attention")
    model = PeftModel.from_pretrained(reference.peft_model.unload(), supervised).merge_and_unload().eval()
    model.load_state_dict(load_file(supervised / "pooling_head.safetensors"), strict=False)
    expected = Encoder(model, reference.tokenizer).encode(TEXTS[:3])
    converted = Encoder.from_pretrained(result.out_dir, device="cpu", dtype="float32").encode(TEXTS[:3])
    assert_equal_up_to_summation_order(converted, expected, terms=encoder_terms(model, 32) + 2 * (16 + 4))


@pytest.mark.parametrize("family", [family for family in TINY_WINDOWS if family != "gemma3_text"])
def test_a_window_that_binds_is_kept_and_the_unverified_engines_are_refused(family, tmp_path):
    base = save_tiny_base(tmp_path / "base", family=family, **TINY_WINDOWS[family])
    out = tmp_path / "encoder"
    convert(base=str(base), out=out, vllm=False, max_seq_length=128)
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == TINY_WINDOWS[family]["sliding_window"]
    engines = _engines(out)
    assert engines["transformers"]["status"] == "verified"  # stock's bidirectional window equals ours
    for engine in ("vllm", "tei"):
        assert engines[engine]["status"] == "unsupported" and "sliding window of 3 tokens" in engines[engine]["note"]
    card = (out / "README.md").read_text()
    assert "sliding window of 3 tokens" in card


def test_a_gemma3_window_that_binds_is_kept_for_vllm_and_refused_for_tei(tmp_path):
    base = save_tiny_base(tmp_path / "base", family="gemma3_text", **TINY_WINDOWS["gemma3_text"])
    out = tmp_path / "encoder"
    convert(base=str(base), out=out, vllm=False, max_seq_length=128)
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 6 and config["layer_types"] == ["sliding_attention", "full_attention"]
    engines = _engines(out)
    assert engines["transformers"]["status"] == "verified"  # stock Gemma3TextModel's window |d| < 6 // 2 + 1
    assert engines["vllm"]["status"] == "not checked"  # claimed: vLLM's Gemma3 window is transformers' (test_vllm)
    assert engines["tei"]["status"] == "unsupported" and "3 positions either side" in engines["tei"]["note"]


def test_a_gemma3_window_that_never_binds_is_kept_as_written_and_the_gemma_notice_is_carried(tmp_path):
    base = save_tiny_base(tmp_path / "base", family="gemma3_text")  # Gemma3's default window, 4096
    (base / "README.md").write_text("---\nlicense: gemma\n---\n# tiny gemma\n")
    out = tmp_path / "encoder"
    convert(base=str(base), out=out, vllm=False, max_seq_length=128)
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 4096 and "sliding_attention" in config["layer_types"]
    assert _engines(out)["tei"]["status"] == "by format"
    # the Gemma Terms of Use (3.1): a NOTICE file, and the card says the model is a modified Gemma
    notice = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
    assert (out / "NOTICE").read_text().strip() == notice
    card = (out / "README.md").read_text()
    assert 'license: "gemma"' in card and notice in card and "modified Gemma model" in card
    assert "NOTICE" in json.loads((out / "verification.json").read_text())["files"]


@pytest.mark.parametrize("family", [family for family in TINY_WINDOWS if family != "gemma3_text"])
def test_a_window_that_never_binds_is_written_as_full_attention(family, tmp_path):
    window = {**TINY_WINDOWS[family], "sliding_window": 200}
    base = save_tiny_base(tmp_path / "base", family=family, **window)
    out = tmp_path / "encoder"
    convert(base=str(base), out=out, vllm=False, max_seq_length=128)
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] is None
    assert not config.get("use_sliding_window") and set(config.get("layer_types") or ["full_attention"]) == {
        "full_attention"}
    assert _engines(out)["tei"]["status"] == "by format"


def test_a_base_of_another_family_is_refused_naming_the_families(tmp_path):
    from llama_encoder.errors import InputError

    folder = tmp_path / "gemma2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 64}))
    with pytest.raises(InputError, match=r"'gemma2' model.*'llama', 'mistral', 'qwen2', 'qwen3', 'gemma3_text'"):
        convert(base=str(folder), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_gemma3_layout_integer_follows_the_layer_types_the_encoder_runs():
    """TEI reads Gemma3's layout only from `_sliding_window_pattern`; a config can carry a stale default (6) beside
    its own layer_types, so the writer derives the integer from the layer types."""
    from llama_encoder.conversion_scripts.layout import native_config_dict
    from tests.tiny import tiny_family_encoder

    _, encoder = tiny_family_encoder("gemma3_text", num_hidden_layers=6,
                                     layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
    encoder.config._sliding_window_pattern = 6
    encoder.config.sliding_window_pattern = 6
    config = native_config_dict(encoder.config)
    assert config["_sliding_window_pattern"] == config["sliding_window_pattern"] == 3
    assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"] * 2
