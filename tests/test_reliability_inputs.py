"""Bad input is refused before anything is written, with a message that names the problem and the fix.

`convert` is run end to end on each bad base, adapter or output path, and must leave neither the output nor a
temporary sibling behind. Encode inputs go through `Encoder.encode`; `push` goes through the CLI against the local
fake Hub, so what is checked is what a user sees (exit code, stdout, stderr). docs/RELIABILITY.md lists every case.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.utils import _http as hub_http
from safetensors.numpy import save_file
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM

from llama_encoder.atomic import check_destination
from llama_encoder.cli import main as cli_main
from llama_encoder.conversion_scripts.convert import convert
from llama_encoder.encoding import Encoder
from llama_encoder.encoding.embed import embed_corpus
from tests.fake_hub import FakeHub, fake_hub_fixture  # noqa: F401 (registers the `fake_hub` fixture)
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms
from tests.test_base_model import write_gguf
from tests.test_lora_merge import save_lora_adapter
from tests.test_push import write_manifest
from tests.tiny import TINY_LLAMA, save_tiny_base

TOKEN = "hf_fake_write_token"  # what the fake_hub fixture accepts
REPO = "someone/tiny-encoder"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def lora_adapter(tiny_base, tmp_path_factory) -> Path:
    """A valid LoRA adapter for the tiny base; cases copy it and break one thing."""
    folder = tmp_path_factory.mktemp("adapters") / "good"
    save_lora_adapter(LlamaForCausalLM.from_pretrained(tiny_base), folder, seed=1, r=2, lora_alpha=4,
                      target_modules=["q_proj", "v_proj"])
    return folder


def _nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert not list(out.parent.glob(".tmp-*")), "a temporary sibling was left behind"


# --- convert: each case returns the keyword arguments that make the input bad -------------------------------------


def _copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _bert_base(tmp, base, adapter):
    BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128).save_pretrained(
        tmp / "bert")
    return {"base": str(tmp / "bert")}


def _gpt2_gguf(tmp, base, adapter):
    return {"gguf": write_gguf(tmp / "gpt2.gguf", "gpt2", tokenizer=True)}


def _adapter_with_more_layers(tmp, base, adapter):
    deeper = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 3}))
    save_lora_adapter(deeper, tmp / "deeper", seed=2, r=2, lora_alpha=4, target_modules=["q_proj"])
    return {"base": str(base), "adapters": [tmp / "deeper"]}


def _adapter_with_other_module_names(tmp, base, adapter):
    folder = tmp / "gpt2-lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"],
         "base_model_name_or_path": "openai-community/gpt2"}))
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    save_file({f"{prefix}.lora_A.weight": np.ones((2, 64), np.float32),
               f"{prefix}.lora_B.weight": np.ones((192, 2), np.float32)}, str(folder / "adapter_model.safetensors"))
    return {"base": str(base), "adapters": [folder]}


def _ia3_adapter(tmp, base, adapter):
    folder = _copy(adapter, tmp / "ia3")
    _edit_json(folder / "adapter_config.json", peft_type="IA3")
    return {"base": str(base), "adapters": [folder]}


def _dora_adapter(tmp, base, adapter):
    folder = _copy(adapter, tmp / "dora")
    _edit_json(folder / "adapter_config.json", use_dora=True)
    return {"base": str(base), "adapters": [folder]}


def _adapter_without_weights(tmp, base, adapter):
    folder = _copy(adapter, tmp / "no-weights")
    (folder / "adapter_model.safetensors").unlink()
    return {"base": str(base), "adapters": [folder]}


def _truncated_adapter(tmp, base, adapter):
    folder = _copy(adapter, tmp / "truncated")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return {"base": str(base), "adapters": [folder]}


def _second_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[1]


def _truncated_shard(tmp, base, adapter):
    folder = _copy(base, tmp / "base")
    shard = _second_shard(folder)
    shard.write_bytes(shard.read_bytes()[:-100])  # the header promises more bytes than the file has
    return {"base": str(folder)}


def _shard_with_bad_header(tmp, base, adapter):
    folder = _copy(base, tmp / "base")
    shard = _second_shard(folder)
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"{garbage" + data[16:])
    return {"base": str(folder)}


def _shard_missing_from_index(tmp, base, adapter):
    folder = _copy(base, tmp / "base")
    _second_shard(folder).unlink()
    return {"base": str(folder)}


def _tokenizer_missing(tmp, base, adapter):
    folder = _copy(base, tmp / "base")
    (folder / "tokenizer.json").unlink()
    return {"base": str(folder)}


def _output_is_a_file(tmp, base, adapter):
    (tmp / "encoder").write_text("not a folder")
    return {"base": str(base), "out": tmp / "encoder"}


CASES: dict[str, tuple[Callable, type[Exception], str]] = {
    "bert-base": (_bert_base, ValueError,
                  r"is a 'bert' model \(config.json model_type\); only the decoder families 'llama', 'mistral', "
                  r"'qwen2', 'qwen3', 'gemma3_text' .*Choose a base of one of those families"),
    "gpt2-gguf": (_gpt2_gguf, ValueError,
                  r"holds a 'gpt2' model \(general.architecture\); only GGUF files of the families llama, "
                  r"mistral, qwen2, qwen3, gemma3 .*Use a GGUF of one of those"),
    "adapter-more-layers": (_adapter_with_more_layers, ValueError,
                            r"does not fit this base model \(hidden_size=64, num_hidden_layers=2\): modules missing "
                            r"from the base \(1; the adapter reaches layer 2\): layers\.2\.self_attn\.q_proj\.weight\. "
                            r"It was trained on .*; convert with that base model"),
    "adapter-other-module-names": (_adapter_with_other_module_names, ValueError,
                                   r"does not fit this base model .*modules missing from the base \(1\): "
                                   r"transformer\.h\.0\.attn\.c_attn\.weight\. It was trained on "
                                   r"openai-community/gpt2; convert with that base model"),
    "adapter-ia3": (_ia3_adapter, ValueError,
                    r"describes a 'IA3' adapter; only LoRA adapters \(peft_type 'LORA'\) can be merged"),
    "adapter-dora": (_dora_adapter, ValueError,
                     r"Cannot merge the adapter at .*: DoRA \(use_dora=true\) .*merge it with peft "
                     r"\(merge_and_unload\) and convert the merged model instead"),
    "adapter-without-weights": (_adapter_without_weights, FileNotFoundError,
                                r"has adapter_config.json but no weights: expected adapter_model.safetensors "
                                r"\(or adapter_model.bin\) beside it"),
    "adapter-truncated": (_truncated_adapter, ValueError,
                          r"Cannot read .*adapter_model.safetensors: .*The file is truncated or corrupt; save or "
                          r"download it again"),
    "shard-truncated": (_truncated_shard, ValueError,
                        r"model-00002-of-\d+\.safetensors is not a readable safetensors file \(.*file not fully "
                        r"covered\)\. Download it again"),
    "shard-bad-header": (_shard_with_bad_header, ValueError,
                         r"model-00002-of-\d+\.safetensors is not a readable safetensors file \(.*invalid JSON in "
                         r"header.*\)\. Download it again"),
    "shard-missing-from-index": (_shard_missing_from_index, FileNotFoundError,
                                 r"is incomplete: model.safetensors.index.json names weight files that are missing "
                                 r"\(model-00002-of-\d+\.safetensors\)\. Download or copy the complete model again"),
    "tokenizer-missing": (_tokenizer_missing, FileNotFoundError,
                          r"has no tokenizer files \(tokenizer.json or tokenizer.model\)\. Save the model's tokenizer"),
    "output-is-a-file": (_output_is_a_file, NotADirectoryError,
                         r"exists and is a file, not a folder\. Choose another path or remove the file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_refuses_bad_input_before_writing(case, tiny_base, lora_adapter, tmp_path):
    make, error, message = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    kwargs = {"out": tmp_path / "encoder", **make(inputs, tiny_base, lora_adapter)}
    was_file = kwargs["out"].is_file()
    with pytest.raises(error, match=message):
        convert(**kwargs)
    if was_file:
        assert kwargs["out"].read_text() == "not a folder"
        assert not list(inputs.glob(".tmp-*"))
    else:
        _nothing_written(kwargs["out"])


@contextlib.contextmanager
def _unwritable_folder(path: Path) -> Iterator[Path]:
    """A folder nobody can create entries in: read-only permissions, or for root (which ignores them) the
    immutable attribute."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without chattr +i: nothing is unwritable")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_output_is_refused_before_any_work(tiny_base, tmp_path, tiny_checkpoint):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a cat\na dog\n")
    with _unwritable_folder(tmp_path / "locked") as locked:
        with pytest.raises(OSError):  # the folder really is unwritable for this process
            (locked / "probe").write_text("x")
        message = rf"Cannot write under {locked}: permission denied\. Choose a writable output path\."
        with pytest.raises(PermissionError, match=message):
            convert(out=locked / "encoder", base=str(tiny_base))
        with pytest.raises(PermissionError, match=message):
            convert(out=locked / "deeper" / "encoder", base=str(tiny_base))  # the nearest existing folder counts
        encoder = Encoder.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
        with pytest.raises(PermissionError, match=message):
            embed_corpus(encoder, corpus, locked / "embeddings", show_progress=False)
        assert list(locked.iterdir()) == []


def test_check_destination_names_each_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_destination(tmp_path / "file")
    with pytest.raises(IsADirectoryError, match="is a folder; give a file path instead"):
        check_destination(tmp_path / "folder", kind="file")
    with pytest.raises(FileExistsError, match=r"already exists\. Pass --overwrite \(overwrite=True\)"):
        check_destination(tmp_path / "folder")
    assert check_destination(tmp_path / "folder", overwrite=True) == tmp_path / "folder"
    assert check_destination(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


# --- encode inputs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint) -> Encoder:
    return Encoder.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.mark.parametrize(("inputs", "index"), [
    ([""], 0), (["a cat", "   \n\t"], 1), ([("Find the animal", "")], 0), (["a cat", ("Find", " ")], 1),
], ids=["empty", "blank", "pair-with-empty-text", "pair-with-blank-text"])
def test_empty_and_blank_texts_get_the_zero_vector_with_a_warning(encoder, inputs, index, caplog):
    """A corpus must not stop for one blank text: it gets the zero vector (cosine 0 with everything), the others
    what they get alone, and one warning counts the blanks."""
    with caplog.at_level(logging.WARNING):
        got = encoder.encode(inputs)
    assert [r.getMessage() for r in caplog.records if "blank" in r.getMessage()] == [
        f"1 of {len(inputs)} inputs are empty or blank; each gets the zero vector as its embedding."]
    assert np.array_equal(got[index], np.zeros(encoder.dimension, dtype=np.float32))
    others = [item for position, item in enumerate(inputs) if position != index]
    if others:
        np.testing.assert_array_equal(np.delete(got, index, axis=0), encoder.encode(others))  # batched alike


@pytest.mark.parametrize("item", [None, 3, b"bytes", ("instruction", None), ["a", "b", "c"], {"text": "a"}],
                         ids=["None", "int", "bytes", "pair-with-None", "triple", "dict"])
def test_non_strings_are_refused_naming_the_input(encoder, item):
    with pytest.raises(ValueError, match=rf"Input 1 is a {type(item).__name__}; give strings or \(instruction, "
                                         r"text\) pairs of strings"):
        encoder.encode(["fine", item])


def test_a_prompt_that_fills_max_length_is_refused(encoder):
    with pytest.raises(ValueError, match=r"Input 0 \('a cat'\) has no token to pool: its prompt fills max_length "
                                         r"\(3 tokens\), or the tokenizer drops all of its text\. Use a shorter "
                                         r"prompt or a larger max_length, or remove the input\."):
        encoder.encode(["a cat"], prompt="Instruct: find the animal\nQuery: ", max_length=3)


def test_texts_far_beyond_max_length_are_cut_to_it(encoder, caplog):
    limit = encoder.max_seq_length
    long_text = " ".join(["the cat sat on the mat and the dog ran in the park"] * (limit * 4))
    assert len(encoder.tokenizer(long_text)["input_ids"]) > 20 * limit
    with caplog.at_level(logging.WARNING):
        got = encoder.encode(["a short one", long_text])
    assert [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()] == [
        f"1 of 2 inputs were longer than {limit} tokens and were truncated."]
    # Independently: the tokenizer's own truncation, then a plain forward over every token.
    ids = encoder.tokenizer(long_text, truncation=True, max_length=limit, return_tensors="pt")["input_ids"]
    assert ids.shape == (1, limit)
    with torch.no_grad():
        expected = encoder.model(input_ids=ids).pooler_output[0].numpy()
    # the same tokens, batched beside a short text (padded) vs alone: equal up to summation order
    assert_equal_up_to_summation_order(got[1], expected, terms=encoder_terms(encoder.model, limit))


UNICODE_TEXTS = [
    "🐱🐶 the cat 👩‍👩‍👧 sat 🏳️‍🌈",  # emoji, zero-width joiners, variation selectors
    "القط جلس على الحصيرة",  # Arabic (right to left)
    "החתול ישב על השטיח the cat",  # Hebrew mixed with Latin
    "cat\x00dog\x00\x00",  # NUL characters
    "\u202ecat\u202c e\u0301 \ufeff\u200b",  # bidi override, combining accent, BOM and zero-width space
]


def test_unicode_edge_cases_embed_and_pool_exactly_the_text(encoder):
    got = encoder.encode(UNICODE_TEXTS, batch_tokens=10_000)  # one padded batch
    assert np.isfinite(got).all()
    assert_equal_up_to_summation_order(np.linalg.norm(got, axis=1), np.ones(len(got)),
                                       terms=2 * (encoder.dimension + 2), dtype=torch.float32, what="unit norm")
    instruction = "Finde 🐈 القط"
    prompt = encoder.instruction_prompt(instruction)
    terms = encoder_terms(encoder.model, max(len(encoder.tokenizer(prompt + text)["input_ids"])
                                             for text in UNICODE_TEXTS))
    for row, text in enumerate(UNICODE_TEXTS):  # padding next to other scripts changes nothing
        assert_equal_up_to_summation_order(got[row], encoder.encode([text])[0], terms=terms, what=repr(text))

    # Behind an instruction full of multi-byte characters, the pooled tokens are exactly the text's: a boundary
 # found by byte offsets instead of character offsets would land inside the instruction or the text.
    pairs = encoder.encode([(instruction, text) for text in UNICODE_TEXTS])
    for row, text in enumerate(UNICODE_TEXTS):
        ids = encoder.tokenizer(prompt + text)["input_ids"]
        decoded = [encoder.tokenizer.decode(ids[k:], clean_up_tokenization_spaces=False) for k in range(len(ids))]
        # The pooled tokens decode to the text, with the prompt's trailing space only where BPE merged it into the
        # text's first token (a lone space token is the prompt's), so the shortest such tail.
        first = max(k for k, tail in enumerate(decoded) if tail in (text, " " + text))
        assert encoder.tokenizer.decode(ids[:first], skip_special_tokens=True) + decoded[first] == prompt + text
        with torch.no_grad():
            states = encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(states[first:].mean(dim=0), dim=0).numpy()
        assert_equal_up_to_summation_order(pairs[row], expected, terms=terms, what=repr(text))


# --- push through the CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def verified_folder(tmp_path) -> Path:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_file({"embed_tokens.weight": np.ones((16, 8), np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama_encoder"}))
    write_manifest(folder)
    return folder


def _push(folder: Path, capfd) -> tuple[int, str, str]:
    code = cli_main(["push", str(folder), "--repo-id", REPO])
    out, err = capfd.readouterr()
    return code, out, err


def test_push_without_a_token_says_so_and_sends_nothing(fake_hub: FakeHub, verified_folder, capfd):
    code, out, err = _push(verified_folder, capfd)
    assert code == 1 and "Uploaded" not in out
    assert ("error: No Hugging Face token found, so nothing was pushed: log in with `hf auth login` or set the "
            "HF_TOKEN environment variable to a token with write access, then push again.") in err
    assert fake_hub.requests == []


def test_push_to_a_repo_the_token_cannot_write(fake_hub: FakeHub, verified_folder, capfd, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.deny_status = 403
    code, out, err = _push(verified_folder, capfd)
    assert code == 1 and "Uploaded" not in out
    assert (f"error: The token cannot write to {REPO} on {fake_hub.url} (HTTP 403 while creating the repo {REPO}): "
            "log in with a token that has write access to that repo") in err
    assert fake_hub.repos == {} and fake_hub.commits == []


def test_network_lost_during_the_upload_is_not_reported_as_success(fake_hub: FakeHub, verified_folder, capfd,
                                                                    monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    connect = socket.socket.connect

    def network_drops_after_the_lfs_batch(sock, address):
        if any(seen.route == "lfs_batch" for seen in fake_hub.requests):
            raise ConnectionRefusedError("network is down")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", network_drops_after_the_lfs_batch)
    # huggingface_hub retries the upload 5 times with 1 to 8 s waits (23 s in all): skip the waits, keep the tries.
    no_waits = types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None})
    monkeypatch.setattr(hub_http, "time", no_waits)
    code, out, err = _push(verified_folder, capfd)
    assert code == 1 and "Uploaded" not in out and "Commit:" not in out
    assert (f"error: The Hub endpoint {fake_hub.url} could not be reached while uploading to {REPO}, revision main "
            "(") in err
    assert ("the upload was interrupted and may not have been committed; push again to finish it (files already on "
            "the Hub are not sent twice). Check your network connection and the endpoint (HF_ENDPOINT).") in err
    assert fake_hub.commits == [] and fake_hub.lfs_objects == {}
    assert REPO in fake_hub.repos and fake_hub.files(REPO) == {}  # the repo exists, empty: nothing half-committed
