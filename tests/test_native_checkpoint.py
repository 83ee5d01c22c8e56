"""The engine-native checkpoint layout (`--format native`): files, refusals, and that the stock loaders embed like
the encoder and unlike the causal model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer, LlamaModel

from llama_encoder.cli import build_parser
from llama_encoder.configuration_llama_encoder import DEFAULT_INSTRUCTION_TEMPLATE
from llama_encoder.conversion_scripts.convert import convert
from llama_encoder.conversion_scripts.layout import (
    NATIVE_POOLING,
    NOT_NATIVE,
    plan_layout,
    sentence_transformers_mismatch,
)
from llama_encoder.conversion_scripts.verify import max_cosine_distance
from llama_encoder.engines.tei import check_tei_folder
from llama_encoder.errors import InputError
from llama_encoder.modeling_llama_encoder import LlamaEncoderModel, tokenize_for_encoder
from tests.tiny import save_tiny_base

CLEAN_PROMPT = "Instruct: Find the animal\nQuery:\n"
SPACE_PROMPT = "Instruct: Find the animal\nQuery: "
TEXTS = ["the cat sat on the mat", "a dog", "x", "birds fly south in winter and return in spring"]
# One bidirectional encoder over <= 12 tokens, float32: a generous bound for summation-order differences in 1 - cos.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def native(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Native mean (clean prompt), native last_token, and a remote-code mean checkpoint of the same weights."""
    root = tmp_path_factory.mktemp("native")
    return {
        "mean": convert(out=root / "mean", base=str(tiny_base), query_prompt=CLEAN_PROMPT).out_dir,
        "last_token": convert(out=root / "last", base=str(tiny_base), pooling="last_token").out_dir,
        "remote": convert(out=root / "remote", base=str(tiny_base), query_prompt=CLEAN_PROMPT,
                          format="remote-code").out_dir,
    }


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _independent_embeddings(folder: Path, texts: list[str], prompt: str, pooling: str, causal: bool = False):
    """Stock LlamaModel, one text at a time (no padding, no mask), pooled by hand: the text's tokens for mean
    (the prompt's tokens found by the characters they cover), the last token for last_token."""
    model = LlamaModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    for text in texts:
        encoded = tokenizer(prompt + text, return_offsets_mapping=True)
        ids = torch.tensor([encoded["input_ids"]])
        with torch.no_grad():
            states = model(input_ids=ids, is_causal=causal).last_hidden_state[0]
        if pooling == "mean":
            keep = [end > len(prompt) for _, end in encoded["offset_mapping"]] if prompt else [True] * len(ids[0])
            pooled = states[torch.tensor(keep)].mean(0)
        else:
            pooled = states[-1]
        rows.append(F.normalize(pooled, dim=-1).numpy())
    return np.stack(rows)


def test_native_files_are_what_transformers_vllm_and_tei_read(native):
    for pooling, folder in (("mean", native["mean"]), ("last_token", native["last_token"])):
        config = _json(folder / "config.json")
        assert config["model_type"] == "llama" and config["is_causal"] is False
        assert config["use_bidirectional_attention"] is True and config["use_cache"] is False
        assert config["architectures"] == ["LlamaBidirectionalModel"]
        assert config["pooling"] == NATIVE_POOLING[pooling].vllm
        assert config["pooling_mode"] == pooling
        assert config["auto_map"]["AutoModel"] == "modeling_llama_encoder.LlamaEncoderModel"
        modules = _json(folder / "modules.json")
        assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                                 "sentence_transformers.models.Pooling",
                                                 "sentence_transformers.models.Normalize"]
        pooling_config = _json(folder / "1_Pooling" / "config.json")
        assert [key for key, value in pooling_config.items() if value is True and key != "include_prompt"] == [
            NATIVE_POOLING[pooling].st_key]
        assert pooling_config["include_prompt"] is NATIVE_POOLING[pooling].include_prompt
        assert _json(folder / "tokenizer_config.json")["padding_side"] == "right"
        assert not (folder / "chat_template.jinja").exists()
        assert "chat_template" not in _json(folder / "tokenizer_config.json")
        requirements = _json(folder / "config_sentence_transformers.json")["requirements"]
        assert requirements["transformers"]["specifier"] == ">=5.2"
        report = check_tei_folder(folder)
        assert report.loadable and report.pooling == NATIVE_POOLING[pooling].tei and report.bidirectional
        engines = _json(folder / "verification.json")["engines"]
        for key in ("transformers", "transformers_remote", "sentence_transformers", "sentence_transformers_remote"):
            assert engines[key]["status"] == "verified", (pooling, key)
        assert engines["tei"]["status"] == "by format"
        assert engines["transformers_old"]["status"] == "unsupported"
        card = (folder / "README.md").read_text(encoding="utf-8")
        assert "## Where it runs" in card and f'SentenceTransformer("{folder}")' in card
    remote = _json(native["remote"] / "config.json")
    assert remote["model_type"] == "llama_encoder"
    assert _json(native["remote"] / "verification.json")["engines"]["vllm"]["status"] == "unsupported"
    assert not check_tei_folder(native["remote"]).loadable


@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_stock_loaders_equal_remote_code_and_the_independent_bidirectional_embedding(native, pooling):
    folder = native[pooling]
    prompt = CLEAN_PROMPT if pooling == "mean" else _json(folder / "config_sentence_transformers.json")["prompts"][
        "query"]
    stock_st = SentenceTransformer(str(folder))
    remote_st = SentenceTransformer(str(folder), trust_remote_code=True)
    assert type(stock_st[0]).__module__.startswith("sentence_transformers.")
    for text_prompt in ("", prompt):
        independent = _independent_embeddings(folder, TEXTS, text_prompt, pooling)
        stock = stock_st.encode(TEXTS, prompt=text_prompt, convert_to_numpy=True)
        remote = remote_st.encode(TEXTS, prompt=text_prompt, convert_to_numpy=True)
        assert max_cosine_distance(stock, independent) <= TOLERANCE, text_prompt
        assert max_cosine_distance(remote, independent) <= TOLERANCE, text_prompt
        # not the causal model: the same weights with causal attention embed measurably differently
        causal = _independent_embeddings(folder, TEXTS, text_prompt, pooling, causal=True)
        assert max_cosine_distance(stock, causal) > 100 * TOLERANCE, text_prompt
    stock_model = AutoModel.from_pretrained(folder)
    assert type(stock_model) is LlamaModel and stock_model.config.is_causal is False


def test_remote_code_and_native_checkpoints_of_the_same_weights_embed_alike(native):
    remote = SentenceTransformer(str(native["remote"]), trust_remote_code=True)
    stock = SentenceTransformer(str(native["mean"]))
    for prompt in ("", CLEAN_PROMPT):
        assert max_cosine_distance(remote.encode(TEXTS, prompt=prompt), stock.encode(TEXTS, prompt=prompt)) <= TOLERANCE


def test_prompt_exclusion_check_agrees_with_sentence_transformers(native):
    """The conversion-time check says the space-ending prompt is inexact for mean pooling and the newline-ending one
    exact; stock Sentence Transformers' own prompt exclusion, run on the same folder, shows the same."""
    folder = native["mean"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert sentence_transformers_mismatch(tokenizer, CLEAN_PROMPT, "mean") is None
    assert sentence_transformers_mismatch(tokenizer, SPACE_PROMPT, "mean") is not None
    assert sentence_transformers_mismatch(tokenizer, SPACE_PROMPT, "last_token") is None
    model = LlamaEncoderModel.from_pretrained(folder).eval()
    stock = SentenceTransformer(str(folder))

    def ours(prompt):
        batch = tokenize_for_encoder(tokenizer, TEXTS, prompt)
        with torch.no_grad():
            return model(**batch).pooler_output.numpy()

    assert max_cosine_distance(stock.encode(TEXTS, prompt=CLEAN_PROMPT), ours(CLEAN_PROMPT)) <= TOLERANCE
    assert max_cosine_distance(stock.encode(TEXTS, prompt=SPACE_PROMPT), ours(SPACE_PROMPT)) > 100 * TOLERANCE


def test_a_plain_convert_is_native_for_stock_sentence_transformers(tiny_checkpoint):
    """No adapter trained instructions, so the query prompt takes the package's template, which ends in a newline:
    stock pooling is exact, and `convert --base B` needs no remote code anywhere."""
    assert DEFAULT_INSTRUCTION_TEMPLATE == "Instruct: {instruction}\nQuery:\n"
    assert _json(tiny_checkpoint / "config.json")["instruction_template"] == DEFAULT_INSTRUCTION_TEMPLATE
    prompts = _json(tiny_checkpoint / "config_sentence_transformers.json")["prompts"]
    assert prompts["query"].endswith("\nQuery:\n") and prompts["document"] == ""
    assert [m["type"] for m in _json(tiny_checkpoint / "modules.json")][:2] == [
        "sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling"]
    engines = _json(tiny_checkpoint / "verification.json")["engines"]
    assert engines["sentence_transformers"]["status"] == "verified"


def test_every_named_prompt_decides_whether_stock_pooling_is_exact(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.pad_token = tokenizer.eos_token  # as convert sets one
    clean = plan_layout(format="native", pooling_mode="mean", tokenizer=tokenizer,
                        prompts={"query": CLEAN_PROMPT, "document": "", "sts": "Instruct: Compare\nQuery:\n"})
    assert clean.sentence_transformers == "native"
    spaced = plan_layout(format="native", pooling_mode="mean", tokenizer=tokenizer,
                         prompts={"query": CLEAN_PROMPT, "document": "", "sts": "Instruct: Compare\nQuery: "})
    assert spaced.sentence_transformers == "custom" and "sts prompt" in spaced.custom_reason
    assert "query prompt" not in spaced.custom_reason


def test_an_inexact_prompt_keeps_the_custom_module_and_the_card_says_why(tiny_base, tmp_path):
    result = convert(out=tmp_path / "space", base=str(tiny_base), query_prompt="Instruct: Find\nQuery: x ")
    folder = result.out_dir
    assert _json(folder / "config.json")["model_type"] == "llama"  # engines still read it natively
    modules = _json(folder / "modules.json")
    assert [m["type"] for m in modules] == ["sentence_transformers_llama_encoder.LlamaEncoderTransformer"]
    assert (folder / "1_Pooling" / "config.json").is_file()  # TEI reads this path whatever modules.json says
    engines = result.verification["engines"]
    assert engines["sentence_transformers"]["status"] == "unsupported"
    assert "trust_remote_code" in engines["sentence_transformers"]["note"]
    assert engines["sentence_transformers_remote"]["status"] == "verified"
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "keeps its own Sentence Transformers module" in card and "trust_remote_code=True)" in card


@pytest.mark.parametrize("pooling", sorted(NOT_NATIVE))
def test_native_is_refused_for_pooling_no_engine_has_before_anything_is_written(tiny_base, tmp_path, pooling):
    with pytest.raises(InputError, match="--format remote-code"):
        convert(out=tmp_path / "out", base=str(tiny_base), pooling=pooling)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_native_refuses_left_padding_and_unknown_formats(tiny_base, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    with pytest.raises(InputError, match="pads on the right"):
        plan_layout(format="native", pooling_mode="mean", tokenizer=tokenizer, prompts={}, padding_side="left")
    with pytest.raises(InputError, match="--format must be one of"):
        plan_layout(format="onnx", pooling_mode="mean", tokenizer=tokenizer, prompts={})
    with pytest.raises(InputError, match="pads on the right"):
        convert(out=tmp_path / "out", base=str(tiny_base), padding_side="left")


def test_cli_default_format_is_native():
    args = build_parser().parse_args(["convert", "--out", "x"])
    assert args.format == "native" and args.vllm is None
    assert build_parser().parse_args(["convert", "--out", "x", "--format", "remote-code", "--no-vllm"]).vllm is False


def test_vllm_verification_asked_for_without_vllm_is_refused(native, monkeypatch):
    from llama_encoder.conversion_scripts.verify import verify_checkpoint
    from llama_encoder.errors import MissingDependencyError

    monkeypatch.delenv("LLAMA_ENCODER_VLLM_PYTHON", raising=False)
    with pytest.raises(MissingDependencyError, match="setup_vllm_env.sh"):
        verify_checkpoint(native["mean"], vllm=True, write_manifest=False)
