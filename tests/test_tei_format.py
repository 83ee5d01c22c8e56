"""The TEI file-format checker (docs/ENGINES.md, rules 1-24) on tiny native folders: the native layout passes with no
errors for mean and last_token, for every decoder family (llama, mistral, qwen2, qwen3), and breaking exactly one rule
gives exactly that rule's finding.

Each folder holds a tiny byte-level BPE tokenizer (trained once per module), a config.json dict and a safetensors
file. The Llama folder's config is hand-built and its weights are zeros with the names and shapes TEI's Llama path
loads; each family's folder (`write_family_folder`) holds the config.json our writer (`native_config_dict`) writes for
a tiny stock base of the family, with the fixes the writer still has to make (`WRITER_PATCHES`), and the tiny
encoder's own weights. Nothing touches the network.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llama_encoder.configuration_llama_encoder import BASE_FAMILIES
from llama_encoder.engines.tei import (
    RUNTIME_NOTES,
    TEI_CHECKED_FAMILIES,
    TEI_SOURCE_COMMIT,
    TeiReport,
    check_tei_folder,
    tei_family,
    tei_rules_implemented,
)
from llama_encoder.errors import InputError, MissingInputError, NotAFolderError
from tests.tiny import TINY_CORPUS, tiny_bpe_tokenizer, tiny_family_encoder

QUERY_PROMPT = "Instruct: Given a query, retrieve relevant passages that answer the query\nQuery: "
SIZES = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
HEAD = SIZES["hidden_size"] // SIZES["num_attention_heads"]
POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "last_token": "pooling_mode_lasttoken"}
VLLM_POOLING = {"mean": "avg", "last_token": "last"}


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """tokenizer.json and tokenizer_config.json of a tiny BPE tokenizer that adds a BOS (like Llama's), with the pad
    token and padding side the converter writes."""
    tokenizer = tiny_bpe_tokenizer(TINY_CORPUS)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    folder = tmp_path_factory.mktemp("tei-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def _weights(config: dict, *, prefix: str = "") -> dict[str, torch.Tensor]:
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * HEAD
    shapes = {"embed_tokens.weight": (config["vocab_size"], hidden), "norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({
            f"layers.{i}.self_attn.q_proj.weight": (hidden, hidden),
            f"layers.{i}.self_attn.k_proj.weight": (kv, hidden),
            f"layers.{i}.self_attn.v_proj.weight": (kv, hidden),
            f"layers.{i}.self_attn.o_proj.weight": (hidden, hidden),
            f"layers.{i}.mlp.gate_proj.weight": (inter, hidden),
            f"layers.{i}.mlp.up_proj.weight": (inter, hidden),
            f"layers.{i}.mlp.down_proj.weight": (hidden, inter),
            f"layers.{i}.input_layernorm.weight": (hidden,),
            f"layers.{i}.post_attention_layernorm.weight": (hidden,),
        })
    return {prefix + name: torch.zeros(shape) for name, shape in shapes.items()}


def tokenizer_vocab(tokenizer_folder: Path) -> int:
    return len(json.loads((tokenizer_folder / "tokenizer.json").read_text())["model"]["vocab"])


def llama_config(vocab: int, pooling_mode: str = "mean") -> dict:
    """The hand-built native Llama config.json at SIZES."""
    return {
        "architectures": ["LlamaBidirectionalModel"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_llama_encoder.LlamaEncoderConfig",
                     "AutoModel": "modeling_llama_encoder.LlamaEncoderModel"},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "dtype": "float32", "head_dim": HEAD,
        "hidden_act": "silu", "initializer_range": 0.02, "is_causal": False, "max_position_embeddings": 64,
        "mlp_bias": False, "model_type": "llama", "normalize_embeddings": True, "pooling": VLLM_POOLING[pooling_mode],
        "pooling_mode": pooling_mode, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
        "use_bidirectional_attention": True, "use_cache": False, "vocab_size": vocab, **SIZES,
    }


def write_native_folder(folder: Path, tokenizer_folder: Path, pooling_mode: str = "mean", *,
                        config: dict | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """The native layout of docs/ENGINES.md at tiny sizes (include_prompt true, so that no rule warns): a hand-built
    Llama config.json and zero weights, unless `config` and `weights` are given."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    if config is None:
        config = llama_config(tokenizer_vocab(folder), pooling_mode)
    write_json(folder / "config.json", config)
    save_file(_weights(config) if weights is None else weights, folder / "model.safetensors")
    pooling = {"word_embedding_dimension": config["hidden_size"], "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True}
    pooling[POOLING_FLAGS[pooling_mode]] = True
    write_json(folder / "1_Pooling" / "config.json", pooling)
    write_json(folder / "2_Normalize" / "config.json",
               {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    write_json(folder / "sentence_bert_config.json", {
        "max_seq_length": 64, "do_lower_case": False, "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
    })
    write_json(folder / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": {"query": QUERY_PROMPT, "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine",
    })
    return folder


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))


def edit_json(path: Path, edit) -> None:
    """Apply `edit` (which changes the parsed value in place) to a JSON file."""
    value = json.loads(path.read_text())
    edit(value)
    write_json(path, value)


def kinds(report: TeiReport) -> set[tuple[int, str]]:
    return {(finding.rule, finding.level) for finding in report.findings}


@pytest.fixture
def native(tmp_path, tokenizer_folder):
    return write_native_folder(tmp_path / "native", tokenizer_folder)


@pytest.mark.parametrize("pooling_mode, tei_pooling", [("mean", "mean"), ("last_token", "last-token")])
def test_the_native_layout_passes_with_no_findings(tmp_path, tokenizer_folder, pooling_mode, tei_pooling):
    report = check_tei_folder(write_native_folder(tmp_path / "native", tokenizer_folder, pooling_mode))
    assert report.findings == [] and report.loadable
    assert report.pooling == tei_pooling and report.bidirectional is True


def _set(key, value):
    return lambda config: config.__setitem__(key, value)


def _drop(key):
    return lambda config: config.pop(key)


# (rule, level, file, edit): each edit breaks exactly that rule of a passing native folder.
JSON_BREAKS = {
    "model_type llama_encoder": (1, "error", "config.json", _set("model_type", "llama_encoder")),
    "model_type gemma3 (multimodal)": (1, "error", "config.json", _set("model_type", "gemma3")),
    "model_type bidirectional_pplx_qwen3": (1, "error", "config.json", _set("model_type", "bidirectional_pplx_qwen3")),
    "classifier architecture": (2, "error", "config.json", _set("architectures", ["LlamaForSequenceClassification"])),
    "empty architectures": (2, "error", "config.json", _set("architectures", [])),
    "auto_map list value": (2, "error", "config.json", lambda c: c["auto_map"].update(AutoTokenizer=[None, "x.Fast"])),
    "no use_bidirectional_attention": (3, "error", "config.json", _drop("use_bidirectional_attention")),
    "use_bidirectional_attention false": (3, "error", "config.json", _set("use_bidirectional_attention", False)),
    "no rms_norm_eps": (4, "error", "config.json", _drop("rms_norm_eps")),
    "float max_position_embeddings": (4, "error", "config.json", _set("max_position_embeddings", 64.0)),
    "unknown hidden_act": (4, "error", "config.json", _set("hidden_act", "quick_gelu")),
    "exact gelu": (4, "warning", "config.json", _set("hidden_act", "gelu")),
    "eos_token_id list": (5, "error", "config.json", _set("eos_token_id", [2, 1])),
    "negative pad_token_id": (5, "error", "config.json", _set("pad_token_id", -1)),
    "rope_scaling set": (6, "error", "config.json", _set("rope_scaling", {"rope_type": "linear", "factor": 2.0})),
    "rope_type llama3": (6, "error", "config.json", _set("rope_parameters", {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})),
    "no rope_theta": (6, "error", "config.json", _drop("rope_parameters")),
    "rope_parameters without rope_type": (6, "error", "config.json", _set("rope_parameters", {"rope_theta": 1e5})),
    "head_dim not hidden/heads": (7, "error", "config.json", _set("head_dim", 2 * HEAD)),
    "attention_bias true": (8, "error", "config.json", _set("attention_bias", True)),
    "mlp_bias null": (8, "error", "config.json", _set("mlp_bias", None)),
    "sliding_window set": (9, "error", "config.json", _set("sliding_window", 4096)),
    "compact pooling format": (12, "error", "1_Pooling/config.json", lambda p: (p.clear(), p.update(
        embedding_dimension=SIZES["hidden_size"], pooling_mode="mean", include_prompt=True))),
    "pooling_mode_lasttoken null": (12, "error", "1_Pooling/config.json", _set("pooling_mode_lasttoken", None)),
    "no pooling flag true": (13, "error", "1_Pooling/config.json", _set("pooling_mode_mean_tokens", False)),
    "last-token file for a mean checkpoint": (13, "error", "1_Pooling/config.json", lambda p: p.update(
        pooling_mode_mean_tokens=False, pooling_mode_lasttoken=True)),
    "weighted_mean checkpoint": (13, "error", "config.json", _set("pooling_mode", "weighted_mean")),
    "unknown pooling_mode": (13, "error", "config.json", _set("pooling_mode", "max")),
    "include_prompt false": (14, "warning", "1_Pooling/config.json", _set("include_prompt", False)),
    "no max_seq_length": (15, "error", "sentence_bert_config.json", _drop("max_seq_length")),
    "string max_seq_length": (15, "error", "sentence_bert_config.json", _set("max_seq_length", "64")),
    "max_seq_length over positions": (15, "error", "sentence_bert_config.json", _set("max_seq_length", 65)),
    "null prompt": (16, "error", "config_sentence_transformers.json", lambda c: c["prompts"].update(query=None)),
    "custom module type": (17, "warning", "modules.json", lambda m: m[0].update(
        type="sentence_transformers_llama_encoder.LlamaEncoderTransformer")),
    "Dense module": (18, "warning", "modules.json", lambda m: m.insert(2, {
        "idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})),
    "not normalised": (19, "warning", "config.json", _set("normalize_embeddings", False)),
}


@pytest.mark.parametrize("case", JSON_BREAKS)
def test_breaking_one_rule_gives_exactly_its_finding(native, case):
    rule, level, name, edit = JSON_BREAKS[case]
    edit_json(native / name, edit)
    report = check_tei_folder(native)
    assert kinds(report) == {(rule, level)}, [f.message for f in report.findings]
    assert report.loadable is (level == "warning")
    assert all(finding.message and finding.source for finding in report.findings)


def test_a_remote_code_model_type_says_to_convert_natively(native):
    edit_json(native / "config.json", _set("model_type", "llama_encoder"))
    (finding,) = check_tei_folder(native).errors
    assert finding.rule == 1 and "--format native" in finding.message


def test_a_causal_config_is_reported_as_not_bidirectional(native):
    edit_json(native / "config.json", _drop("use_bidirectional_attention"))
    assert check_tei_folder(native).bidirectional is False


def test_cls_wins_over_mean(native):
    edit_json(native / "1_Pooling" / "config.json", _set("pooling_mode_cls_token", True))
    report = check_tei_folder(native)
    assert report.pooling == "cls"
    assert kinds(report) == {(13, "error")}


def test_the_compact_pooling_format_gives_no_pooling(native):
    write_json(native / "1_Pooling" / "config.json",
               {"embedding_dimension": SIZES["hidden_size"], "pooling_mode": "mean", "include_prompt": True})
    report = check_tei_folder(native)
    assert report.pooling is None and "compact format" in report.errors[0].message


def test_the_pooling_mode_argument_overrides_config_json(native):
    assert kinds(check_tei_folder(native, pooling_mode="last_token")) == {(13, "error")}
    assert kinds(check_tei_folder(native, pooling_mode="eos")) == {(13, "error")}
    assert check_tei_folder(native, pooling_mode="mean").findings == []


def test_a_checkpoint_without_pooling_mode_warns(native):
    edit_json(native / "config.json", _drop("pooling_mode"))
    assert kinds(check_tei_folder(native)) == {(13, "warning")}


@pytest.mark.parametrize("what", ["config.json missing", "config.json not JSON", "config.json NaN"])
def test_an_unreadable_config_json_is_rule_1(native, what):
    path = native / "config.json"
    if what == "config.json missing":
        path.unlink()
    else:
        path.write_text("{not json" if what == "config.json not JSON" else path.read_text()[:-2] + ', "x": NaN}')
    report = check_tei_folder(native)
    assert (1, "error") in kinds(report) and report.bidirectional is False


def test_prefixed_weight_names_are_an_error(native):
    config = json.loads((native / "config.json").read_text())
    save_file(_weights(config, prefix="model."), native / "model.safetensors")
    report = check_tei_folder(native)
    assert kinds(report) == {(10, "error")}
    assert "`model.` prefix" in report.errors[0].message


def test_a_wrong_shape_is_an_error(native):
    config = json.loads((native / "config.json").read_text())
    weights = _weights(config)
    weights["layers.1.self_attn.k_proj.weight"] = torch.zeros(2 * HEAD, SIZES["hidden_size"])
    save_file(weights, native / "model.safetensors")
    report = check_tei_folder(native)
    assert kinds(report) == {(10, "error")} and "layers.1.self_attn.k_proj.weight" in report.errors[0].message


def test_a_missing_tensor_is_an_error_and_an_extra_one_a_warning(native):
    config = json.loads((native / "config.json").read_text())
    weights = _weights(config)
    del weights["layers.1.mlp.down_proj.weight"]
    save_file(weights, native / "model.safetensors")
    assert kinds(check_tei_folder(native)) == {(10, "error")}
    weights = {**_weights(config), "latent_attention.latents": torch.zeros(4, 8)}
    save_file(weights, native / "model.safetensors")
    assert kinds(check_tei_folder(native)) == {(10, "warning")}


def test_bias_tensors_are_an_error(native):
    config = json.loads((native / "config.json").read_text())
    save_file({**_weights(config), "layers.0.self_attn.q_proj.bias": torch.zeros(8)}, native / "model.safetensors")
    assert kinds(check_tei_folder(native)) == {(8, "error")}


def test_sharded_weights_are_read_from_the_index(native):
    config = json.loads((native / "config.json").read_text())
    weights = _weights(config)
    (native / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({key: weights[key] for key in keys}, native / shard)
    write_json(native / "model.safetensors.index.json",
               {"weight_map": {key: shard for shard, keys in shards.items() for key in keys}})
    assert check_tei_folder(native).findings == []
    (native / "model-00002-of-00002.safetensors").unlink()
    assert kinds(check_tei_folder(native)) == {(10, "error")}


def test_no_weights_is_an_error(native):
    (native / "model.safetensors").unlink()
    assert kinds(check_tei_folder(native)) == {(10, "error")}


def test_a_missing_pooling_config_is_an_error(native):
    (native / "1_Pooling" / "config.json").unlink()
    report = check_tei_folder(native)
    assert kinds(report) == {(11, "error")} and report.pooling is None


def test_no_sentence_bert_config_is_fine(native):
    (native / "sentence_bert_config.json").unlink()
    assert check_tei_folder(native).findings == []


@pytest.mark.parametrize("what", ["missing", "not JSON", "FixedLength pre-tokenizer"])
def test_a_tokenizer_json_tei_cannot_load_is_an_error(native, what):
    path = native / "tokenizer.json"
    if what == "missing":
        path.unlink()
    elif what == "not JSON":
        path.write_text('{"version": "1.0", ')
    else:
        edit_json(path, _set("pre_tokenizer", {"type": "Sequence", "pretokenizers": [
            {"type": "FixedLength", "length": 5}]}))
    assert kinds(check_tei_folder(native)) == {(20, "error")}


def _add_token_only_in_tokenizer_config(folder: Path, token: str) -> None:
    """Declare an added special token in tokenizer_config.json only: transformers adds it on load, tokenizer.json
    (what TEI reads) does not know it."""
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])

    def edit(config):
        config.setdefault("added_tokens_decoder", {})[str(vocab)] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}
        config["extra_special_tokens"] = [token]

    edit_json(folder / "tokenizer_config.json", edit)


def test_a_prompt_tokenised_differently_by_tei_is_an_error(native):
    _add_token_only_in_tokenizer_config(native, "<|query|>")
    assert check_tei_folder(native).findings == []  # no prompt uses the token yet
    edit_json(native / "config_sentence_transformers.json",
              lambda c: c["prompts"].update(query="<|query|> " + QUERY_PROMPT))
    report = check_tei_folder(native)
    assert kinds(report) == {(21, "error")}
    assert "prompt 'query'" in report.errors[0].message


def test_the_prompts_argument_replaces_the_files_prompts(native):
    _add_token_only_in_tokenizer_config(native, "<|query|>")
    report = check_tei_folder(native, prompts={"search": "<|query|> "})
    assert kinds(report) == {(21, "error")} and "prompt 'search'" in report.errors[0].message
    assert check_tei_folder(native, prompts={"search": "search: "}).findings == []


def test_to_dict_is_json_and_names_the_source(native):
    edit_json(native / "1_Pooling" / "config.json", _set("include_prompt", False))
    summary = json.loads(json.dumps(check_tei_folder(native).to_dict()))
    assert summary["tei_commit"] == TEI_SOURCE_COMMIT and summary["loadable"] is True
    assert summary["pooling"] == "mean" and summary["bidirectional"] is True
    assert [(f["rule"], f["level"]) for f in summary["findings"]] == [(14, "warning")]
    assert summary["findings"][0]["source"] and summary["runtime"]["rule"] == 22


def test_unusable_input_raises(tmp_path, native):
    with pytest.raises(MissingInputError, match="There is no folder"):
        check_tei_folder(tmp_path / "absent")
    with pytest.raises(NotAFolderError):
        check_tei_folder(native / "config.json")
    with pytest.raises(InputError, match="pooling_mode must be one of"):
        check_tei_folder(native, pooling_mode="avg")
    with pytest.raises(InputError, match="prompts must map"):
        check_tei_folder(native, prompts={"query": None})


# The decoder families: each family's native folder holds what our writer writes for a tiny stock base of the family.

# Where a tiny stock base of the family differs from tests.tiny's (what the writer meets in published bases): stock
# MistralConfig (and Mistral-7B-v0.1) has sliding_window 4096, stock Qwen3Config has eos_token_id null.
STOCK_BASES = {"llama": {}, "mistral": {"sliding_window": 4096}, "qwen2": {}, "qwen3": {"eos_token_id": None}}
# The config.json changes TEI needs that `native_config_dict` does not make yet: EXPECTED FROM THE WRITER
# (layout.native_config_dict), applied here in its stead. Without them the folder fails exactly `WRITER_RULES`.
WRITER_PATCHES = {
    "llama": {},
    # TEI's Mistral applies sliding_window as a left-only window (rule 9): null when the window never binds.
    "mistral": {"sliding_window": None},
    "qwen2": {},
    # TEI's Qwen3Config requires one integer eos_token_id (rule 24): the tokenizer's EOS id (tiny_bpe_tokenizer: 2).
    "qwen3": {"eos_token_id": 2},
}
WRITER_RULES = {"llama": set(), "mistral": {(9, "error")}, "qwen2": set(), "qwen3": {(24, "error")}}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# The rules whose TEI source differs per family: their findings must cite the family's own TEI files.
FAMILY_SOURCED_RULES = {3, 4, 6, 7, 8, 9, 10, 23, 24}


@functools.cache
def _family_checkpoint(family: str, pooling_mode: str, vocab: int, overrides: tuple) -> tuple[str, dict]:
    """(config.json text as `native_config_dict` writes it, the tiny encoder's weights) for a tiny stock base."""
    from llama_encoder.conversion_scripts.layout import native_config_dict

    _, encoder = tiny_family_encoder(family, pooling_mode=pooling_mode, vocab_size=vocab,
                                     **{**STOCK_BASES[family], **dict(overrides)})
    weights = {name: tensor.detach().clone().contiguous() for name, tensor in encoder.state_dict().items()}
    return json.dumps(native_config_dict(encoder.config)), weights


def family_checkpoint(tokenizer_folder: Path, family: str, pooling_mode: str = "mean", *, patched: bool = True,
                      **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    """A fresh (config dict, weights dict) of `family`'s native checkpoint, with WRITER_PATCHES applied unless
    `patched` is false; `overrides` change the tiny base's config."""
    text, weights = _family_checkpoint(family, pooling_mode, tokenizer_vocab(tokenizer_folder),
                                       tuple(sorted(overrides.items())))
    config = json.loads(text)
    if patched:
        config.update(WRITER_PATCHES[family])
    return config, dict(weights)


def write_family_folder(folder: Path, tokenizer_folder: Path, family: str, pooling_mode: str = "mean", *,
                        patched: bool = True, **overrides) -> Path:
    config, weights = family_checkpoint(tokenizer_folder, family, pooling_mode, patched=patched, **overrides)
    return write_native_folder(folder, tokenizer_folder, pooling_mode, config=config, weights=weights)


def _save_weights(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file(weights, folder / "model.safetensors")


@pytest.mark.parametrize("pooling_mode, tei_pooling", [("mean", "mean"), ("last_token", "last-token")])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_familys_native_folder_passes_with_no_findings(tmp_path, tokenizer_folder, family, pooling_mode,
                                                            tei_pooling):
    report = check_tei_folder(write_family_folder(tmp_path / family, tokenizer_folder, family, pooling_mode))
    assert report.findings == [], [f.message for f in report.findings]
    assert report.loadable and report.family == family
    assert report.pooling == tei_pooling and report.bidirectional is True


@pytest.mark.parametrize("family", FAMILIES)
def test_the_writers_unpatched_config_fails_only_what_the_writer_must_fix(tmp_path, tokenizer_folder, family):
    """What `native_config_dict` writes today, for a stock base of the family: at most the rules WRITER_PATCHES
    fixes fail (none, once the writer makes the patches itself)."""
    report = check_tei_folder(write_family_folder(tmp_path / family, tokenizer_folder, family, patched=False))
    assert kinds(report) <= WRITER_RULES[family], [f.message for f in report.findings]


def test_tei_family_names_the_rules_a_config_gets():
    assert TEI_CHECKED_FAMILIES == tuple(BASE_FAMILIES)  # every decoder family we convert has its TEI rules
    for model_type, family in {"llama": "llama", "llama_bidirec": "llama", "mistral": "mistral", "qwen2": "qwen2",
                               "qwen3": "qwen3", "gemma3_text": "gemma3_text"}.items():
        assert tei_family({"model_type": model_type}) == family and tei_rules_implemented({"model_type": model_type})
    for config in ({"model_type": "llama_encoder", "base_model_type": "qwen2"}, {"model_type": "gemma3"},
                   {"model_type": "bidirectional_pplx_qwen3"}, {"model_type": None}, {}, {"model_type": ["qwen3"]}):
        assert tei_family(config) is None and not tei_rules_implemented(config)


@pytest.mark.parametrize("family", FAMILIES)
def test_to_dict_states_the_familys_runtime(tmp_path, tokenizer_folder, family):
    summary = check_tei_folder(write_family_folder(tmp_path / family, tokenizer_folder, family)).to_dict()
    runtime = summary["runtime"]
    assert summary["family"] == family and runtime["rule"] == 22 and runtime["note"] == RUNTIME_NOTES[family]
    assert runtime["cpu"] is (family == "qwen3")  # only TEI's Qwen3 runs on CPU
    assert "lib.rs:" in runtime["source"] and ("CPU" in runtime["note"])


def _update(**values):
    return lambda config: config.update(values)


# (family, rule, level, edit of config.json): each edit breaks exactly that rule of the family's passing folder.
FAMILY_BREAKS = {
    "mistral sliding_window 4096": ("mistral", 9, "error", _set("sliding_window", 4096)),
    "mistral sliding_window not an integer": ("mistral", 9, "error", _set("sliding_window", 4096.0)),
    "mistral no initializer_range": ("mistral", 4, "error", _drop("initializer_range")),
    "mistral head_dim not hidden/heads": ("mistral", 7, "error", _set("head_dim", 32)),
    "mistral no use_bidirectional_attention": ("mistral", 3, "error", _drop("use_bidirectional_attention")),
    "mistral rope_scaling set": ("mistral", 6, "error", _set("rope_scaling", {"type": "linear", "factor": 2.0})),
    "mistral pad_token_id list": ("mistral", 5, "error", _set("pad_token_id", [0, 2])),
    "mistral classifier architecture": ("mistral", 2, "error",
                                        _set("architectures", ["MistralForSequenceClassification"])),
    "qwen2 no is_causal": ("qwen2", 3, "error", _drop("is_causal")),
    "qwen2 is_causal true": ("qwen2", 3, "error", _set("is_causal", True)),
    "qwen2 is_causal null": ("qwen2", 3, "error", _set("is_causal", None)),
    "qwen2 no use_sliding_window": ("qwen2", 23, "error", _drop("use_sliding_window")),
    "qwen2 use_sliding_window null": ("qwen2", 23, "error", _set("use_sliding_window", None)),
    "qwen2 use_sliding_window true": ("qwen2", 23, "error", _set("use_sliding_window", True)),
    "qwen2 sliding_window not an integer": ("qwen2", 23, "error", _set("sliding_window", "4096")),
    "qwen2 head_dim not hidden/heads": ("qwen2", 7, "error", _set("head_dim", 32)),
    "qwen2 rope_scaling set": ("qwen2", 6, "error", _set("rope_scaling", {"rope_type": "yarn", "factor": 4.0})),
    "qwen2 no rms_norm_eps": ("qwen2", 4, "error", _drop("rms_norm_eps")),
    "qwen2 remote-code auto_map": ("qwen2", 21, "error",
                                   lambda c: c["auto_map"].update(AutoModel="modeling_qwen.Qwen2Model")),
    "qwen3 no attention_bias": ("qwen3", 24, "error", _drop("attention_bias")),
    "qwen3 attention_bias null": ("qwen3", 24, "error", _set("attention_bias", None)),
    "qwen3 eos_token_id null": ("qwen3", 24, "error", _set("eos_token_id", None)),
    "qwen3 eos_token_id list": ("qwen3", 24, "error", _set("eos_token_id", [2, 1])),
    "qwen3 no eos_token_id": ("qwen3", 24, "error", _drop("eos_token_id")),
    "qwen3 num_labels not an integer": ("qwen3", 24, "error", _set("num_labels", "2")),
    "qwen3 no use_sliding_window": ("qwen3", 23, "error", _drop("use_sliding_window")),
    "qwen3 use_sliding_window true": ("qwen3", 23, "error", _set("use_sliding_window", True)),
    "qwen3 use_bidirectional_attention false": ("qwen3", 3, "error", _set("use_bidirectional_attention", False)),
    "qwen3 use_bidirectional_attention not a boolean": ("qwen3", 3, "error",
                                                        _set("use_bidirectional_attention", "true")),
    "qwen3 head_dim not an integer": ("qwen3", 7, "error", _set("head_dim", "16")),
    "qwen3 rope_scaling set": ("qwen3", 6, "error", _set("rope_scaling", {"rope_type": "linear", "factor": 2.0})),
    "qwen3 rope_type yarn": ("qwen3", 6, "error", _set("rope_parameters", {
        "rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})),
    "qwen3 no rope_theta": ("qwen3", 6, "error", _drop("rope_parameters")),
}


@pytest.mark.parametrize("case", FAMILY_BREAKS)
def test_breaking_one_family_rule_gives_exactly_its_finding(tmp_path, tokenizer_folder, case):
    family, rule, level, edit = FAMILY_BREAKS[case]
    folder = write_family_folder(tmp_path / family, tokenizer_folder, family)
    edit_json(folder / "config.json", edit)
    report = check_tei_folder(folder)
    assert kinds(report) == {(rule, level)}, [f.message for f in report.findings]
    assert report.loadable is (level == "warning") and report.family == family
    for finding in report.findings:
        assert finding.message and finding.source
        if finding.rule in FAMILY_SOURCED_RULES:
            assert family in finding.source, (finding.rule, finding.source)  # e.g. flash_qwen2.rs, models/qwen3.rs


# (family, edit of config.json): keys the family's TEI model does not read, so the folder still passes.
FAMILY_IGNORED = {
    "mistral eos_token_id list": ("mistral", _set("eos_token_id", [2, 1])),
    "mistral no is_causal": ("mistral", _drop("is_causal")),
    "mistral attention_bias true": ("mistral", _set("attention_bias", True)),  # MistralModel has no biases anyway
    "qwen2 no use_bidirectional_attention": ("qwen2", _drop("use_bidirectional_attention")),
    "qwen2 use_bidirectional_attention false": ("qwen2", _set("use_bidirectional_attention", False)),
    "qwen2 no initializer_range": ("qwen2", _drop("initializer_range")),
    "qwen2 eos_token_id list": ("qwen2", _set("eos_token_id", [2, 1])),
    "qwen2 attention_bias false": ("qwen2", _set("attention_bias", False)),  # Qwen2 always has q/k/v biases
    "qwen2 sliding_window with use_sliding_window false": ("qwen2", _set("sliding_window", 32768)),
    "qwen3 no is_causal": ("qwen3", _drop("is_causal")),
    "qwen3 no initializer_range": ("qwen3", _drop("initializer_range")),
    "qwen3 bos_token_id list": ("qwen3", _set("bos_token_id", [1, 2])),
    "qwen3 sliding_window with use_sliding_window false": ("qwen3", _set("sliding_window", 4096)),
    "qwen3 no head_dim": ("qwen3", _drop("head_dim")),  # tiny head_dim is hidden/heads
}


@pytest.mark.parametrize("case", FAMILY_IGNORED)
def test_keys_a_family_does_not_read_do_not_matter(tmp_path, tokenizer_folder, case):
    family, edit = FAMILY_IGNORED[case]
    folder = write_family_folder(tmp_path / family, tokenizer_folder, family)
    edit_json(folder / "config.json", edit)
    report = check_tei_folder(folder)
    assert report.findings == [], [f.message for f in report.findings]


def test_qwen2_reads_is_causal_not_use_bidirectional_attention(tmp_path, tokenizer_folder):
    folder = write_family_folder(tmp_path / "qwen2", tokenizer_folder, "qwen2")
    edit_json(folder / "config.json", _update(use_bidirectional_attention=True))
    edit_json(folder / "config.json", _drop("is_causal"))
    report = check_tei_folder(folder)
    assert report.bidirectional is False and kinds(report) == {(3, "error")}
    assert "ignores `use_bidirectional_attention`" in report.errors[0].message
    assert "`is_causal: false`" in report.errors[0].message


def test_a_mistral_window_is_reported_as_left_only(tmp_path, tokenizer_folder):
    folder = write_family_folder(tmp_path / "mistral", tokenizer_folder, "mistral", patched=False)
    (finding,) = check_tei_folder(folder).errors
    assert finding.rule == 9 and "left-only" in finding.message and "`sliding_window: null`" in finding.message
    assert "flash_attn.rs:74-80" in finding.source


def test_a_qwen3_eos_list_names_the_fix(tmp_path, tokenizer_folder):
    folder = write_family_folder(tmp_path / "qwen3", tokenizer_folder, "qwen3")
    edit_json(folder / "config.json", _set("eos_token_id", [2, 1]))
    (finding,) = check_tei_folder(folder).errors
    assert finding.rule == 24 and "eos_token_id" in finding.message and "one of them" in finding.message


def test_a_remote_code_config_is_rule_1_and_checked_as_its_base_family(tmp_path, tokenizer_folder):
    folder = write_family_folder(tmp_path / "qwen2", tokenizer_folder, "qwen2")
    edit_json(folder / "config.json", _update(model_type="llama_encoder", base_model_type="qwen2"))
    report = check_tei_folder(folder)
    assert kinds(report) == {(1, "error")} and report.family == "qwen2"  # the q/k/v biases pass as Qwen2's
    assert 'model_type "qwen2"' in report.errors[0].message


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_weights_may_carry_the_model_prefix(tmp_path, tokenizer_folder, family):
    folder = write_family_folder(tmp_path / family, tokenizer_folder, family)
    _, weights = family_checkpoint(tokenizer_folder, family)
    _save_weights(folder, {"model." + name: tensor for name, tensor in weights.items()})
    assert check_tei_folder(folder).findings == []
    # TEI prefixes every name when model.embed_tokens.weight exists: the unprefixed layers are then not found
    mixed = {("model." + name if name == "embed_tokens.weight" else name): tensor for name, tensor in weights.items()}
    _save_weights(folder, mixed)
    report = check_tei_folder(folder)
    assert kinds(report) == {(10, "error")}
    assert any("unprefixed" in f.message and "with the prefix or all without" in f.message for f in report.errors)


def test_mistral_weights_may_not_carry_the_model_prefix(tmp_path, tokenizer_folder):
    folder = write_family_folder(tmp_path / "mistral", tokenizer_folder, "mistral")
    _, weights = family_checkpoint(tokenizer_folder, "mistral")
    _save_weights(folder, {"model." + name: tensor for name, tensor in weights.items()})
    report = check_tei_folder(folder)
    assert kinds(report) == {(10, "error")} and "`model.` prefix" in report.errors[0].message


# (family, change of the weights dict, findings): the tensors each family's TEI model loads, and no others.
WEIGHT_BREAKS = {
    "qwen2 without a q_proj bias": ("qwen2", lambda w: w.pop("layers.0.self_attn.q_proj.bias"), {(10, "error")}),
    "qwen2 with an o_proj bias": ("qwen2", lambda w: w.update({"layers.1.self_attn.o_proj.bias": torch.zeros(64)}),
                                  {(8, "error")}),
    "qwen2 with a wrong k_proj bias": ("qwen2", lambda w: w.update({"layers.0.self_attn.k_proj.bias": torch.zeros(64)}),
                                       {(10, "error")}),
    "qwen3 without q_norm": ("qwen3", lambda w: w.pop("layers.1.self_attn.q_norm.weight"), {(10, "error")}),
    "qwen3 with a wrong k_norm": ("qwen3", lambda w: w.update({"layers.0.self_attn.k_norm.weight": torch.zeros(64)}),
                                  {(10, "error")}),
    "qwen3 with a q_proj bias": ("qwen3", lambda w: w.update({"layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
                                 {(8, "error")}),
    "qwen3 with a stray linear.weight": ("qwen3", lambda w: w.update({"linear.weight": torch.zeros(4, 64)}),
                                         {(10, "warning")}),
    "mistral with a q_proj bias": ("mistral", lambda w: w.update({"layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
                                   {(8, "error")}),
    "mistral without norm": ("mistral", lambda w: w.pop("norm.weight"), {(10, "error")}),
}


@pytest.mark.parametrize("case", WEIGHT_BREAKS)
def test_each_family_loads_its_own_tensors(tmp_path, tokenizer_folder, case):
    family, change, expected = WEIGHT_BREAKS[case]
    folder = write_family_folder(tmp_path / family, tokenizer_folder, family)
    _, weights = family_checkpoint(tokenizer_folder, family)
    change(weights)
    _save_weights(folder, weights)
    report = check_tei_folder(folder)
    assert kinds(report) == expected, [f.message for f in report.findings]
    assert all(family in f.source for f in report.findings)


def test_a_qwen3_projection_tei_would_apply_is_rule_24(tmp_path, tokenizer_folder):
    folder = write_family_folder(tmp_path / "qwen3", tokenizer_folder, "qwen3")
    _, weights = family_checkpoint(tokenizer_folder, "qwen3")
    _save_weights(folder, {**weights, "linear.weight": torch.zeros(4, 64)})
    edit_json(folder / "config.json", _set("num_labels", 4))
    report = check_tei_folder(folder)
    assert kinds(report) == {(24, "error")} and "projection" in report.errors[0].message


def test_qwen3s_head_dim_is_honoured_and_the_others_is_not(tmp_path, tokenizer_folder):
    """A head_dim other than hidden_size / num_attention_heads: TEI's Qwen3 reads it, TEI's Mistral and Qwen2 do not
    (q_proj is asked for as hidden x hidden)."""
    qwen3 = write_family_folder(tmp_path / "qwen3", tokenizer_folder, "qwen3", head_dim=32)
    assert check_tei_folder(qwen3).findings == []
    for family in ("mistral", "qwen2"):
        folder = write_family_folder(tmp_path / family, tokenizer_folder, family, head_dim=32)
        assert kinds(check_tei_folder(folder)) == {(7, "error"), (10, "error")}


def test_qwen3_attention_biases_are_not_servable(tmp_path, tokenizer_folder):
    """transformers' Qwen3 with attention_bias has an o_proj bias, which TEI never loads."""
    folder = write_family_folder(tmp_path / "qwen3", tokenizer_folder, "qwen3", attention_bias=True)
    report = check_tei_folder(folder)
    assert kinds(report) == {(8, "error")}
    assert any("o_proj" in f.message for f in report.errors)


# Gemma3 (`gemma3_text`): a hand-built config.json in the flat form every engine reads alike (transformers 4.57 and 5.x,
# vLLM, TEI): flat rope_theta / rope_local_base_freq / rope_scaling, no rope_parameters, `_sliding_window_pattern`
# beside layer_types, the un-halved sliding_window, use_bidirectional_attention and no is_causal. Zero weights with
# the names and shapes TEI's Gemma3 loads.
GEMMA3_SIZES = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=4)
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention"] * 2  # every second layer global


def gemma3_config(vocab: int, pooling_mode: str = "mean", **changes) -> dict:
    """The native Gemma3 config.json at GEMMA3_SIZES; its window (128, so |i - j| <= 64) never binds within the
    64 tokens sentence_bert_config.json allows."""
    config = {
        "architectures": ["Gemma3TextModel"], "model_type": "gemma3_text", "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "dtype": "float32",
        "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02, "layer_types": GEMMA3_LAYER_TYPES,
        "max_position_embeddings": 64, "query_pre_attn_scalar": 4, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "sliding_window": 128, "_sliding_window_pattern": 2, "sliding_window_pattern": 2,
        "tie_word_embeddings": True, "use_bidirectional_attention": True, "use_cache": False, "vocab_size": vocab,
        "pooling_mode": pooling_mode, "normalize_embeddings": True, **GEMMA3_SIZES,
    }
    config.update(changes)
    return config


def gemma3_weights(config: dict, *, prefix: str = "") -> dict[str, torch.Tensor]:
    hidden, inter, head = config["hidden_size"], config["intermediate_size"], GEMMA3_SIZES["head_dim"]
    queries, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    shapes = {"embed_tokens.weight": (config["vocab_size"], hidden), "norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        layer = f"layers.{i}."
        shapes.update({
            layer + "self_attn.q_proj.weight": (queries, hidden), layer + "self_attn.k_proj.weight": (kv, hidden),
            layer + "self_attn.v_proj.weight": (kv, hidden), layer + "self_attn.o_proj.weight": (hidden, queries),
            layer + "self_attn.q_norm.weight": (head,), layer + "self_attn.k_norm.weight": (head,),
            layer + "mlp.gate_proj.weight": (inter, hidden), layer + "mlp.up_proj.weight": (inter, hidden),
            layer + "mlp.down_proj.weight": (hidden, inter),
            **{layer + f"{norm}.weight": (hidden,) for norm in (
                "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")},
        })
        if config.get("attention_bias") is True:
            shapes.update({layer + "self_attn.q_proj.bias": (queries,), layer + "self_attn.k_proj.bias": (kv,),
                           layer + "self_attn.v_proj.bias": (kv,), layer + "self_attn.o_proj.bias": (hidden,)})
    return {prefix + name: torch.zeros(shape) for name, shape in shapes.items()}


def write_gemma3_folder(folder: Path, tokenizer_folder: Path, pooling_mode: str = "mean", **changes) -> Path:
    config = gemma3_config(tokenizer_vocab(tokenizer_folder), pooling_mode, **changes)
    return write_native_folder(folder, tokenizer_folder, pooling_mode, config=config, weights=gemma3_weights(config))


@pytest.mark.parametrize("pooling_mode, tei_pooling", [("mean", "mean"), ("last_token", "last-token")])
def test_the_native_gemma3_folder_passes_with_no_findings(tmp_path, tokenizer_folder, pooling_mode, tei_pooling):
    report = check_tei_folder(write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder, pooling_mode))
    assert report.findings == [], [f.message for f in report.findings]
    assert report.loadable and report.family == "gemma3_text"
    assert report.pooling == tei_pooling and report.bidirectional is True


def test_gemma3s_runtime_is_float32_on_cpu_and_cuda(tmp_path, tokenizer_folder):
    runtime = check_tei_folder(write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder)).to_dict()["runtime"]
    assert runtime["cpu"] is True and runtime["note"] == RUNTIME_NOTES["gemma3_text"]
    assert "float32 only" in runtime["note"] and "CPU" in runtime["note"] and "CUDA" in runtime["note"]
    assert "lib.rs:322-332" in runtime["source"] and "454-465" in runtime["source"]


# The config.json transformers 5 writes for Gemma3: rope bases per layer type, no flat keys.
NESTED_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}


def _nested_rope(config):
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
        config.pop(key)
    config["rope_parameters"] = NESTED_ROPE


# (rule, level, edit of config.json): each edit breaks exactly that rule of the passing Gemma3 folder.
GEMMA3_BREAKS = {
    "no use_bidirectional_attention": (3, "error", _drop("use_bidirectional_attention")),
    "use_bidirectional_attention false": (3, "error", _set("use_bidirectional_attention", False)),
    "use_bidirectional_attention not a boolean": (3, "error", _set("use_bidirectional_attention", "true")),
    "classifier architecture": (2, "error", _set("architectures", ["Gemma3ForSequenceClassification"])),
    "no hidden_activation": (4, "error", _drop("hidden_activation")),
    "unknown hidden_activation": (4, "error", _set("hidden_activation", "gelu_fast")),
    "exact gelu": (4, "warning", _set("hidden_activation", "gelu")),
    "no query_pre_attn_scalar": (4, "error", _drop("query_pre_attn_scalar")),
    "float query_pre_attn_scalar": (4, "error", _set("query_pre_attn_scalar", 4.0)),
    "no rms_norm_eps": (4, "error", _drop("rms_norm_eps")),
    "no vocab_size": (4, "error", _drop("vocab_size")),
    "pad_token_id null": (5, "error", _set("pad_token_id", None)),
    "no pad_token_id": (5, "error", _drop("pad_token_id")),
    "pad_token_id list": (5, "error", _set("pad_token_id", [0, 2])),
    "no rope_local_base_freq": (6, "error", _drop("rope_local_base_freq")),
    "rope_local_base_freq a string": (6, "error", _set("rope_local_base_freq", "10000")),
    "no rope_theta": (6, "error", _drop("rope_theta")),
    "rope_parameters per layer type (transformers 5)": (6, "error", _nested_rope),
    "rope_parameters per layer type beside the flat keys": (6, "error", _set("rope_parameters", NESTED_ROPE)),
    "rope_scaling linear 8 (Gemma3 4B and larger)": (6, "error", _set("rope_scaling", {
        "rope_type": "linear", "factor": 8.0})),
    "rope_parameters rope_type linear": (6, "error", _set("rope_parameters", {
        "rope_theta": 1000000.0, "rope_type": "linear", "factor": 8.0})),
    "head_dim not an integer": (7, "error", _set("head_dim", "4")),
    "no attention_bias": (8, "error", _drop("attention_bias")),
    "attention_bias null": (8, "error", _set("attention_bias", None)),
    "no _sliding_window_pattern": (9, "error", _drop("_sliding_window_pattern")),
    "_sliding_window_pattern 0": (9, "error", _set("_sliding_window_pattern", 0)),
    "_sliding_window_pattern a float": (9, "error", _set("_sliding_window_pattern", 2.0)),
    "_sliding_window_pattern not that of layer_types": (9, "error", _set("_sliding_window_pattern", 6)),
    "layer_types not every pattern-th layer global": (9, "error", _set("layer_types", [
        "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])),
    "sliding_window null": (9, "error", _set("sliding_window", None)),
    "sliding_window a float": (9, "error", _set("sliding_window", 128.0)),
    "a binding sliding_window": (9, "warning", _set("sliding_window", 6)),
    "gemma3 not normalised": (19, "warning", _set("normalize_embeddings", False)),
}


@pytest.mark.parametrize("case", GEMMA3_BREAKS)
def test_breaking_one_gemma3_rule_gives_exactly_its_finding(tmp_path, tokenizer_folder, case):
    rule, level, edit = GEMMA3_BREAKS[case]
    folder = write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder)
    edit_json(folder / "config.json", edit)
    report = check_tei_folder(folder)
    assert kinds(report) == {(rule, level)}, [f.message for f in report.findings]
    assert report.loadable is (level == "warning") and report.family == "gemma3_text"
    for finding in report.findings:
        assert finding.message and finding.source
        if finding.level == "error" and finding.rule in FAMILY_SOURCED_RULES:  # gelu's warning cites linear.rs
            assert "gemma3" in finding.source, (finding.rule, finding.source)


# Edits of config.json that TEI's Gemma3 does not read (or reads the same way): the folder still passes.
GEMMA3_IGNORED = {
    "eos_token_id list (as Gemma3 bases have)": _set("eos_token_id", [1, 106]),
    "no layer_types (transformers derives them from sliding_window_pattern)": _drop("layer_types"),
    "no sliding_window_pattern (transformers reads layer_types)": _drop("sliding_window_pattern"),
    "hidden_act junk (Gemma3Config reads hidden_activation)": _set("hidden_act", "not-an-activation"),
    "no head_dim (hidden_size / heads is 4)": _drop("head_dim"),
    "rope_parameters flat instead of rope_theta": lambda c: (c.pop("rope_theta"), c.update(
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})),
    "no initializer_range": _drop("initializer_range"),
    "attention_bias true with its biases": _set("attention_bias", True),  # weights rewritten in the test
}


@pytest.mark.parametrize("case", GEMMA3_IGNORED)
def test_keys_gemma3_does_not_read_do_not_matter(tmp_path, tokenizer_folder, case):
    folder = write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder)
    edit_json(folder / "config.json", GEMMA3_IGNORED[case])
    _save_weights(folder, gemma3_weights(json.loads((folder / "config.json").read_text())))
    report = check_tei_folder(folder)
    assert report.findings == [], [f.message for f in report.findings]


def test_gemma3s_nested_rope_parameters_name_the_flat_form(tmp_path, tokenizer_folder):
    folder = write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder)
    edit_json(folder / "config.json", _nested_rope)
    messages = " ".join(f.message for f in check_tei_folder(folder).errors)
    assert "per layer type" in messages and "rope_local_base_freq" in messages and "no rope_parameters" in messages


def test_gemma3s_binding_window_is_transformers_but_dropped_in_equal_length_batches(tmp_path, tokenizer_folder):
    folder = write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder, sliding_window=6)
    (finding,) = check_tei_folder(folder).warnings
    assert finding.rule == 9 and "|i - j| <= 3" in finding.message and "same length" in finding.message
    # a window that covers every input TEI accepts (max_seq_length 64: |i - j| <= 63) does not bind
    edit_json(folder / "config.json", _set("sliding_window", 126))
    assert check_tei_folder(folder).findings == []
    edit_json(folder / "config.json", _set("sliding_window", 124))
    assert kinds(check_tei_folder(folder)) == {(9, "warning")}


def test_gemma3s_pattern_is_checked_against_layer_types(tmp_path, tokenizer_folder):
    folder = write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder)
    edit_json(folder / "config.json", _set("_sliding_window_pattern", 6))  # transformers 5.24's default
    (finding,) = check_tei_folder(folder).errors
    assert finding.rule == 9 and "layers 1, 3" in finding.message and "ignores layer_types" in finding.message


# (change of the weights dict, findings): the tensors TEI's Gemma3 loads, and no others.
GEMMA3_WEIGHT_BREAKS = {
    "without pre_feedforward_layernorm": (lambda w: w.pop("layers.2.pre_feedforward_layernorm.weight"),
                                          {(10, "error")}),
    "without post_feedforward_layernorm": (lambda w: w.pop("layers.0.post_feedforward_layernorm.weight"),
                                           {(10, "error")}),
    "without k_norm": (lambda w: w.pop("layers.3.self_attn.k_norm.weight"), {(10, "error")}),
    "a q_norm of hidden_size": (lambda w: w.update({"layers.0.self_attn.q_norm.weight": torch.zeros(8)}),
                                {(10, "error")}),
    "a q_proj bias without attention_bias": (lambda w: w.update({
        "layers.0.self_attn.q_proj.bias": torch.zeros(8)}), {(8, "error")}),
    "an extra tensor": (lambda w: w.update({"latent_attention.latents": torch.zeros(4, 8)}), {(10, "warning")}),
    "gamma for weight in a norm": (lambda w: w.update({
        "norm.gamma": w.pop("norm.weight")}), set()),  # TEI's Gemma3RMSNorm takes either
    "an lm_head": (lambda w: w.update({"lm_head.weight": torch.zeros(4, 8)}), set()),
}


@pytest.mark.parametrize("case", GEMMA3_WEIGHT_BREAKS)
def test_gemma3_loads_its_own_tensors(tmp_path, tokenizer_folder, case):
    change, expected = GEMMA3_WEIGHT_BREAKS[case]
    folder = write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder)
    weights = gemma3_weights(json.loads((folder / "config.json").read_text()))
    change(weights)
    _save_weights(folder, weights)
    report = check_tei_folder(folder)
    assert kinds(report) == expected, [f.message for f in report.findings]
    assert all("gemma3" in f.source for f in report.findings)


def test_gemma3_weights_may_not_carry_the_model_prefix(tmp_path, tokenizer_folder):
    folder = write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder)
    _save_weights(folder, gemma3_weights(json.loads((folder / "config.json").read_text()), prefix="model."))
    report = check_tei_folder(folder)
    assert kinds(report) == {(10, "error")} and "`model.` prefix" in report.errors[0].message
    assert "Gemma3TextModel" in report.errors[0].message


def test_gemma3_attention_biases_include_o_proj(tmp_path, tokenizer_folder):
    """With attention_bias, transformers' Gemma3 has q/k/v/o biases and TEI's loads all four."""
    folder = write_gemma3_folder(tmp_path / "gemma3", tokenizer_folder, attention_bias=True)
    assert check_tei_folder(folder).findings == []
    weights = gemma3_weights(json.loads((folder / "config.json").read_text()))
    weights.pop("layers.1.self_attn.o_proj.bias")
    _save_weights(folder, weights)
    report = check_tei_folder(folder)
    assert kinds(report) == {(10, "error")} and "layers.1.self_attn.o_proj.bias" in report.errors[0].message
