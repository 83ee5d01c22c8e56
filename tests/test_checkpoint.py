"""Checkpoint files, the Sentence Transformers module and verification, on tiny random encoders and a tiny
byte-level BPE tokenizer (with a BOS post-processor and a chat template, like real Llama tokenizers).

Fresh-process loading is expensive (seconds per interpreter), so one subprocess checks every pooling mode with both
padding sides; the other subprocesses verify a good checkpoint, a tampered one, and run the model card's snippets.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Transformer
from transformers import PreTrainedTokenizerFast

from llama_encoder import POOLING_MODES
from llama_encoder.configuration_llama_encoder import LEGACY_INSTRUCTION_TEMPLATE
from llama_encoder.conversion_scripts.checkpoint import (
    HUB_FILES,
    default_prompts,
    write_checkpoint,
    write_model_card,
    write_sentence_transformers_files,
    write_tokenizer,
)
from llama_encoder.conversion_scripts.manifest import write_verification_manifest
from llama_encoder.conversion_scripts.push import check_verified_folder
from llama_encoder.conversion_scripts.verify import (
    DEFAULT_SENTENCES,
    compute_reference_embeddings,
    embed_in_fresh_process,
    max_cosine_distance,
    verify_checkpoint,
)
from llama_encoder.errors import VerificationError
from llama_encoder.modeling_llama_encoder import tokenize_for_encoder
from tests.numeric import assert_equal_up_to_summation_order, cosine_distance_bound, encoder_terms
from tests.tiny import tiny_bpe_tokenizer, tiny_encoder

SENTENCES = list(DEFAULT_SENTENCES)
ADAPTERS = [{"name": "mntp-lora", "r": 16, "alpha": 32}, {"name": "simcse-lora", "r": 8, "alpha": 16}]
CHAT_TEMPLATE = "{% for m in messages %}<|begin|>{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
# Embeddings equal up to summation order (tests/numeric.py) over inputs of up to 64 tokens, for the costliest pooling
# (latent attention, the tiny sizes): unit vectors of 64 elements are at most this cosine distance apart (~1e-6).
TOLERANCE = cosine_distance_bound(encoder_terms(tiny_encoder(0, pooling_mode="latent_attention"), 64), 64)


@pytest.fixture(scope="module")
def query_prompt() -> str:
    return default_prompts(_model(None).config)["query"]


@pytest.fixture(scope="module")
def tokenizer(query_prompt) -> PreTrainedTokenizerFast:
    """The tiny tokenizer without a pad token (write_tokenizer must supply one)."""
    return tiny_bpe_tokenizer(SENTENCES + [query_prompt + sentence for sentence in SENTENCES], CHAT_TEMPLATE)


def _model(tokenizer, pooling_mode: str = "mean", seed: int = 0):
    """A tiny encoder trained (as it were) with the earlier template, whose prompts end in a space: the byte-level
    trap the checkpoint's own module must handle (`tokenizer`: None for the config's default vocabulary)."""
    vocab = {} if tokenizer is None else {"vocab_size": len(tokenizer)}
    return tiny_encoder(seed, pooling_mode=pooling_mode, instruction_template=LEGACY_INSTRUCTION_TEMPLATE, **vocab)


def _reference_tokenizer(tokenizer, padding_side: str = "right") -> PreTrainedTokenizerFast:
    reference = copy.deepcopy(tokenizer)
    reference.pad_token = reference.eos_token
    reference.padding_side = padding_side
    return reference


def _write(folder: Path, model, tokenizer, **overrides) -> Path:
    folder.mkdir(parents=True)
    options = dict(
        out_dir=folder, tokenizer=tokenizer, model_id=str(folder), base_name="HuggingFaceTB/SmolLM2-135M",
        license="apache-2.0", merged_adapters=ADAPTERS, weights_written=False, format="remote-code",
    )
    return write_checkpoint(model, **{**options, **overrides})


def _references(model, tokenizer, query_prompt, padding_side="right") -> dict[str, np.ndarray]:
    # batch_size=1: nothing is padded, so the checkpoint's padded batches are compared with unpadded inputs.
    reference_tokenizer = _reference_tokenizer(tokenizer, padding_side)
    return {
        "plain": compute_reference_embeddings(model, reference_tokenizer, SENTENCES, "", batch_size=1),
        "query": compute_reference_embeddings(model, reference_tokenizer, SENTENCES, query_prompt, batch_size=1),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_pooling_mode_loads_without_the_package_and_matches_the_model(tmp_path, tokenizer, query_prompt):
    cases, folders = [], []
    for pooling_mode in POOLING_MODES:
        model = _model(tokenizer, pooling_mode, seed=len(cases))
        for padding_side in ("left", "right"):
            folders.append(_write(tmp_path / f"{pooling_mode}-{padding_side}", model, tokenizer,
                                  padding_side=padding_side))
            cases.append((pooling_mode, padding_side, _references(model, tokenizer, query_prompt, padding_side)))

    results = embed_in_fresh_process(folders, sentences=SENTENCES, prompts={"plain": "", "query": query_prompt})

    for (pooling_mode, padding_side, expected), result in zip(cases, results, strict=True):
        case = f"{pooling_mode}/{padding_side}"
        info = result["info"]
        assert info["llama_encoder_imported"] == [], case
        assert info["automodel_class"].startswith("transformers_modules."), case
        assert info["sentence_transformers_module"].endswith(
            "sentence_transformers_llama_encoder.LlamaEncoderTransformer"
        ), case
        for name in ("plain", "query"):
            assert result["automodel"][name].shape == (len(SENTENCES), 64), case
            assert max_cosine_distance(result["automodel"][name], expected[name]) <= TOLERANCE, (case, name)
            assert max_cosine_distance(result["sentence_transformers"][name], expected[name]) <= TOLERANCE, (case, name)
        # The prompt matters, so equal query embeddings cannot come from ignoring it on both sides.
        assert max_cosine_distance(expected["plain"], expected["query"]) > 1e-3, case


def _independent_pool_mask(tokenizer, prompt: str, text: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + text and a pool mask built by decoding: a token is pooled once the decoded prefix up to
    and including it reaches past the prompt's characters (no offsets involved)."""
    ids = tokenizer(prompt + text)["input_ids"]
    decoded_lengths = [len(tokenizer.decode(ids[: end + 1], skip_special_tokens=True)) for end in range(len(ids))]
    return ids, [int(length > len(prompt)) for length in decoded_lengths]


def test_prompt_tokens_are_attended_to_but_not_pooled(tmp_path, tokenizer, query_prompt):
    model = _model(tokenizer, "mean")
    folder = _write(tmp_path / "ckpt", model, tokenizer)
    text = "the capital of France is Paris."  # "Ġthe" is one token of the tiny vocabulary
    ids, pool_mask = _independent_pool_mask(tokenizer, query_prompt, text)
    prompt_alone = tokenizer(query_prompt)["input_ids"]
    # The byte-level trap is present: counting the prompt's own tokens would drop the text's first token.
    assert pool_mask.index(1) == len(prompt_alone) - 1
    assert tokenizer.convert_ids_to_tokens(prompt_alone)[-1] == "Ġ"

    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        expected = model(input_ids=input_ids, pool_mask=torch.tensor([pool_mask])).pooler_output[0].numpy()
        pooled_everything = model(input_ids=input_ids).pooler_output[0].numpy()
    st_model = SentenceTransformer(str(folder), trust_remote_code=True)
    embedding = st_model.encode_query([text])  # the saved "query" prompt

    assert max_cosine_distance(embedding, expected[None]) <= TOLERANCE
    assert max_cosine_distance(embedding, pooled_everything[None]) > 1e-3


def test_sentence_transformers_never_applies_the_chat_template(tmp_path, tokenizer, query_prompt):
    model = _model(tokenizer, "last_token")
    folder = _write(tmp_path / "ckpt", model, tokenizer)
    plain_ids = tokenizer(SENTENCES[1])["input_ids"]
    templated = tokenizer.apply_chat_template([{"role": "user", "content": SENTENCES[1]}], tokenize=True)
    templated_ids = templated["input_ids"] if isinstance(templated, dict) else templated
    assert list(templated_ids) != plain_ids  # the template would change the tokens
    # A stock Transformer module on this folder would route text through the chat template ...
    trusted = {"trust_remote_code": True}
    stock = Transformer(str(folder), model_kwargs=trusted, config_kwargs=trusted)
    assert "message" in stock.modality_config

    # ... the checkpoint's module does not.
    st_model = SentenceTransformer(str(folder), trust_remote_code=True)
    assert st_model.modalities == ["text"]
    features = st_model.preprocess(SENTENCES[1:2])
    assert features["input_ids"][0].tolist() == plain_ids
    expected = _references(model, tokenizer, query_prompt)
    assert max_cosine_distance(st_model.encode(SENTENCES), expected["plain"]) <= TOLERANCE
    assert max_cosine_distance(st_model.encode(SENTENCES, prompt=query_prompt), expected["query"]) <= TOLERANCE


def test_sentence_transformers_configuration_round_trips(tmp_path, tokenizer, query_prompt):
    model = _model(tokenizer, "weighted_mean")
    folder = _write(tmp_path / "ckpt", model, tokenizer, max_seq_length=48)
    st_model = SentenceTransformer(str(folder), trust_remote_code=True)
    assert st_model.max_seq_length == 48
    assert st_model.prompts["query"] == query_prompt
    assert st_model.similarity_fn_name == "cosine"

    resaved = tmp_path / "resaved"
    st_model.save(str(resaved))
    for name in ("modules.json", "sentence_bert_config.json"):
        assert json.loads((resaved / name).read_text()) == json.loads((folder / name).read_text()), name
    saved_model_config = json.loads((resaved / "config_sentence_transformers.json").read_text())
    assert saved_model_config["prompts"] == {"query": query_prompt, "document": ""}
    assert saved_model_config["default_prompt_name"] is None
    for name in HUB_FILES:
        assert _sha256(resaved / name) == _sha256(folder / name), name

    reloaded = SentenceTransformer(str(resaved), trust_remote_code=True)
    assert reloaded.max_seq_length == 48
    assert_equal_up_to_summation_order(reloaded.encode_query(SENTENCES), st_model.encode_query(SENTENCES),
                                       terms=encoder_terms(model, 48))


def test_max_seq_length_truncates_like_tokenize_for_encoder(tmp_path, tokenizer):
    model = _model(tokenizer, "eos")
    folder = _write(tmp_path / "ckpt", model, tokenizer, max_seq_length=6)
    st_model = SentenceTransformer(str(folder), trust_remote_code=True)
    features = st_model.preprocess(SENTENCES[:2])
    expected = tokenize_for_encoder(_reference_tokenizer(tokenizer), SENTENCES[:2], max_length=6, append_eos=True)
    assert features["input_ids"].shape[1] == 6
    for key in ("input_ids", "attention_mask", "pool_mask"):
        assert torch.equal(features[key], expected[key]), key
    assert st_model.preprocess(SENTENCES[:2], max_length=4)["input_ids"].shape[1] == 4  # the trainer's override
    with pytest.raises(ValueError, match="plain strings"):
        st_model.preprocess([("a query", "a document")])
    with pytest.raises(ValueError, match="no processing_kwargs"):
        st_model.preprocess(SENTENCES[:1], processing_kwargs={"text": {"max_length": 4}})


def test_config_json_makes_a_bidirectional_auto_model(tmp_path, tokenizer):
    folder = _write(tmp_path / "ckpt", _model(tokenizer, "latent_attention"), tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llama_encoder.LlamaEncoderConfig",
        "AutoModel": "modeling_llama_encoder.LlamaEncoderModel",
    }
    assert config["model_type"] == "llama_encoder"
    assert config["is_causal"] is False
    assert config["pooling_mode"] == "latent_attention"
    assert config["architectures"] == ["LlamaEncoderModel"]
    assert config["dtype"] == "float32"
    assert set(load_file(folder / "model.safetensors")) == set(_model(tokenizer, "latent_attention").state_dict())
    for name in HUB_FILES:
        package_file = Path(__file__).resolve().parent.parent / "llama_encoder" / name
        assert (folder / name).read_bytes() == package_file.read_bytes(), name


def test_weights_written_elsewhere_are_described_by_the_config(tmp_path, tokenizer):
    config = _model(tokenizer).config
    config.dtype = torch.bfloat16  # as a streaming merger that wrote bf16 shards would set it
    folder = _write(tmp_path / "ckpt", None, tokenizer, weights_written=True, config=config)
    assert not (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert getattr(config, "auto_map", None) is None  # the caller's config is left as it was


def test_tokenizer_gets_eos_padding_and_records_its_padding_side(tmp_path, tokenizer, caplog):
    folder = tmp_path / "tok"
    folder.mkdir()
    with caplog.at_level(logging.WARNING, logger="llama_encoder.conversion_scripts.checkpoint"):
        write_tokenizer(tokenizer, folder, padding_side="left", max_seq_length=32)
    assert "no pad token" in caplog.text
    assert tokenizer.pad_token is None and tokenizer.padding_side == "right"  # the caller's tokenizer is untouched
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved["padding_side"] == "left"
    assert saved["pad_token"] == "<|end|>"
    assert saved["model_max_length"] == 32
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "is_local" not in saved
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_verification_lists_every_file_and_the_card_reports_it(tmp_path, tokenizer, query_prompt):
    model = _model(tokenizer, "bos")
    folder = _write(tmp_path / "ckpt", model, tokenizer)
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("kept in the manifest\n")
    expected = _references(model, tokenizer, query_prompt)

    report = verify_checkpoint(folder, expected=expected, write_manifest=False)
    assert report["passed"] and report["max_cosine_distance"] <= 1e-4
    assert {(check["name"], check.get("prompt")) for check in report["checks"]} >= {
        ("automodel_vs_sentence_transformers", "plain"), ("automodel_vs_reference", "query"),
        ("sentence_transformers_vs_reference", "query"), ("hub_files_match_package", None),
    }
    card_options = dict(
        config=model.config, model_id=str(folder), base_name="HuggingFaceTB/SmolLM2-135M", license="apache-2.0",
        merged_adapters=ADAPTERS, prompts=default_prompts(model.config), max_seq_length=256,
    )
    write_model_card(folder, **card_options, verification=report)
    write_verification_manifest(folder, report)

    manifest = json.loads((folder / "verification.json").read_text())
    on_disk = {
        path.relative_to(folder).as_posix(): {"sha256": _sha256(path), "size": path.stat().st_size}
        for path in folder.rglob("*")
        if path.is_file() and path.name != "verification.json"
    }
    assert manifest["files"] == on_disk
    assert "extra/notes.txt" in manifest["files"] and "README.md" in manifest["files"]
    assert manifest["format"] == 1 and manifest["passed"] is True
    assert check_verified_folder(folder)["files"] == on_disk  # what push accepts
    readme = (folder / "README.md").read_text()
    assert f"{report['max_cosine_distance']:.3g}" in readme


def test_tampered_weights_fail_verification(tmp_path, tokenizer, query_prompt):
    model = _model(tokenizer, "mean")
    folder = _write(tmp_path / "ckpt", model, tokenizer)
    weights = load_file(folder / "model.safetensors")
    weights["layers.1.mlp.down_proj.weight"] += 0.5 * torch.randn_like(weights["layers.1.mlp.down_proj.weight"])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(VerificationError, match="automodel_vs_reference .*sentence_transformers_vs_reference"):
        verify_checkpoint(folder, expected=_references(model, tokenizer, query_prompt))
    assert not (folder / "verification.json").exists()


def test_tampered_code_fails_verification_before_loading(tmp_path, tokenizer):
    folder = _write(tmp_path / "ckpt", _model(tokenizer), tokenizer)
    modeling = folder / "modeling_llama_encoder.py"
    modeling.write_text(modeling.read_text().replace("p=2, dim=-1", "p=1, dim=-1"))
    with pytest.raises(VerificationError, match="modeling_llama_encoder.py"):
        verify_checkpoint(folder, timeout=1)  # fails on the file check, before any process starts
    assert not (folder / "verification.json").exists()


def test_model_card_metadata_and_snippets_run_as_written(tmp_path, tokenizer):
    model = _model(tokenizer, "weighted_mean")
    folder = _write(tmp_path / "ckpt", model, tokenizer)
    readme = (folder / "README.md").read_text()
    _, front_matter, body = readme.split("---\n", 2)
    metadata = yaml.safe_load(front_matter)
    assert metadata == {
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "library_name": "sentence-transformers",
        "license": "apache-2.0",
        "pipeline_tag": "feature-extraction",
        "tags": ["llama-encoder", "sentence-transformers", "feature-extraction", "llm2vec"],
    }
    assert "| 1 | mntp-lora | 16 | 32 |" in body and "| 2 | simcse-lora | 8 | 16 |" in body
    assert body.index("mntp-lora") < body.index("simcse-lora")
    for name in HUB_FILES:
        assert f"| `{name}` | `{_sha256(folder / name)}` |" in body
    assert json.dumps(default_prompts(model.config)["query"]) in body

    snippets = [block for block in re.findall(r"```python\n(.*?)```", body, re.S) if "import" in block]
    assert len(snippets) == 2
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    outputs = []
    for snippet in snippets:  # python -I from an unrelated folder: llama_encoder is not importable
        run = subprocess.run([sys.executable, "-I", "-c", snippet], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append(run.stdout.strip())
    # Both print a (1, 2) query-document similarity tensor; the two ways of embedding must agree.
    sentence_transformers_scores, automodel_scores = (
        np.array([float(x) for x in re.findall(r"-?\d+\.\d+(?:e[+-]\d+)?", output)]) for output in outputs
    )
    assert sentence_transformers_scores.shape == (2,)
    # torch prints 4 decimals: prints of two values equal up to summation order (~1e-7 apart) are at most one unit
    # of the last decimal apart
    assert np.abs(np.round(sentence_transformers_scores * 1e4) - np.round(automodel_scores * 1e4)).max() <= 1


def test_inputs_are_validated(tmp_path, tokenizer):
    model = _model(tokenizer)
    with pytest.raises(ValueError, match="lacks alpha"):
        _write(tmp_path / "a", model, tokenizer, merged_adapters=[{"name": "x", "r": 4}])
    with pytest.raises(ValueError, match="weights_written=True"):
        _write(tmp_path / "b", None, tokenizer)
    folder = tmp_path / "c"
    folder.mkdir()
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        write_sentence_transformers_files(folder, model.config, prompts=None, max_seq_length=512)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_tokenizer(tokenizer, tmp_path / "missing")


def test_max_cosine_distance():
    rows = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert max_cosine_distance(rows, rows * 3) == pytest.approx(0.0, abs=1e-12)
    assert max_cosine_distance(rows, np.array([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert max_cosine_distance(rows, np.array([[-1.0, 0.0], [0.0, 1.0]])) == pytest.approx(2.0)
    assert max_cosine_distance(rows, np.array([[np.nan, 0.0], [0.0, 1.0]])) == 2.0
    with pytest.raises(ValueError, match="shapes"):
        max_cosine_distance(rows, rows[:1])


@pytest.mark.integration
def test_real_smollm2_checkpoint_verifies(tmp_path):
    from llama_encoder import LlamaEncoderConfig, LlamaEncoderModel
    from llama_encoder.weights.base_model import resolve_base

    base = resolve_base()
    settings = {
        key: value for key, value in base.config.to_dict().items()
        if key not in ("model_type", "architectures", "transformers_version", "auto_map")
    }
    model = LlamaEncoderModel(LlamaEncoderConfig(**settings, pooling_mode="mean")).eval()
    weights = {key.removeprefix("model."): value for key, value in base.state_dict.items() if key != "lm_head.weight"}
    model.load_state_dict(weights, strict=True)
    assert base.tokenizer.chat_template  # the Instruct tokenizer has one; the checkpoint must not use it
    folder = _write(tmp_path / "ckpt", model, base.tokenizer, base_name=base.name, license=base.license,
                    merged_adapters=[])
    query_prompt = default_prompts(model.config)["query"]
    expected = {
        "plain": compute_reference_embeddings(model, base.tokenizer, SENTENCES, ""),
        "query": compute_reference_embeddings(model, base.tokenizer, SENTENCES, query_prompt),
    }
    report = verify_checkpoint(folder, expected=expected)
    assert report["passed"] and report["max_cosine_distance"] <= 1e-4
    assert check_verified_folder(folder)["passed"] is True
