"""benchmarks/llm2vec_speed.py: where its documents come from, its option checks, what its profile records, and one
end-to-end run on tiny random checkpoints (no llm2vec venv: its ratios then read "-").

The end-to-end runs start a worker process per path (each imports torch and transformers: a few seconds) and time
one round of a handful of texts; nothing is measured that depends on the host. The vLLM run needs a vLLM
interpreter (`vllm_python` fixture: skipped without one, failed under LLAMA_ENCODER_REQUIRE_VLLM=1) and one vLLM
start-up; it runs in scripts/test.sh's vLLM step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
speed = pytest.importorskip("llm2vec_speed")

SCRIPT = Path(speed.__file__).resolve()
LONG = "word " * 300  # 1500 characters


# ------------------------------------------------------------------------------------------------------ documents

def test_documents_are_read_from_text_training_and_beir_files(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first text\n\n  second text  \nthird\n")
    assert list(speed.iter_documents(txt)) == ["first text", "  second text  ", "third"]
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"answer {i}", "negatives": ["no"]}) + "\n"
                                for i in range(3)) + "\n")
    assert list(speed.iter_documents(training)) == ["answer 0", "answer 1", "answer 2"]
    beir = tmp_path / "corpus.jsonl"
    beir.write_text("".join(json.dumps({"_id": f"d{i}", "title": "T", "text": f"paragraph {i}"}) + "\n"
                            for i in range(2)))
    assert list(speed.iter_documents(beir)) == ["paragraph 0", "paragraph 1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*neither a `positive` nor a `text`"):
        list(speed.iter_documents(bad))
    with pytest.raises(ValueError, match=r"\.txt .* or a \.jsonl"):
        list(speed.iter_documents(tmp_path / "docs.csv"))


def test_selection_takes_the_first_distinct_long_texts_in_file_order():
    texts = ["short", LONG + "a", LONG + "a", "  " + LONG + "b  ", "tiny", LONG + "c", LONG + "d"]
    chosen = speed.select_documents(texts, 3, min_chars=1000)
    assert chosen == [LONG + "a", LONG + "b", LONG + "c"]  # stripped, so " b " repeats nothing but is kept once
    assert chosen == speed.select_documents(iter(texts), 3, min_chars=1000)  # deterministic, any iterable
    assert len(set(chosen)) == 3 and all(len(text) >= 1000 for text in chosen)
    assert speed.select_documents(texts, 10, min_chars=1000) == [LONG + x for x in "abcd"]
    assert speed.select_documents(texts, 10, min_chars=0)[:2] == ["short", LONG + "a"]


def test_documents_fall_back_to_synthetic_texts_and_say_so(tmp_path):
    texts, source = speed.read_documents(tmp_path / "missing.jsonl", 5, 1000)
    assert source.startswith("SYNTHETIC") and "missing.jsonl not found" in source
    assert texts == speed.synthetic_documents(5) and len(set(texts)) == 5
    assert all(len(text) > 300 for text in texts)
    assert speed.read_documents(None, 2, 1000)[1].startswith("SYNTHETIC: 2 long texts")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": LONG + str(i)}) + "\n" for i in range(3)))
    texts, source = speed.read_documents(corpus, 5, 1000)
    assert texts == [LONG + str(i) for i in range(3)]
    assert "first 3 distinct texts of >= 1000 characters" in source and "only 3 qualify" in source
    with pytest.raises(ValueError, match="no text of at least 5000 characters"):
        speed.read_documents(corpus, 5, 5000)


def test_token_statistics_count_the_padding_of_the_batches_llm2vec_forms():
    texts = ["a" * 10, "a" * 50, "a" * 30, "a" * 20]  # by characters: 50, 30 | 20, 10
    lengths, full = [3, 10, 6, 4], [3, 700, 6, 4]
    stats = speed.token_stats(lengths, full, texts, batch_size=2, max_length=10)
    assert stats["padded_tokens"] == 2 * 10 + 2 * 4 and stats["tokens"] == 23 and stats["batches"] == 2
    assert stats["cut_at_max_length"] == 1 and stats["tokens_before_cut"] == 713 and stats["max_tokens"] == 10


# ---------------------------------------------------------------------------------------------------- the options

def _args(*argv):
    return speed.build_parser().parse_args(list(argv))


def test_the_options_are_checked():
    assert speed.check_args(_args()) == []
    assert speed.check_args(_args("--paths", "st-remote@HEAD:bf16", "vllm:bf16", "llm2vec", "--texts",
                                  "documents")) == []
    problems = speed.check_args(_args("--documents", "0", "--max-length", "0", "--paths", "nope", "--bf16", "bad"))
    assert any("--documents must be at least 1" in p for p in problems)
    assert any("--max-length must be at least 1" in p for p in problems)
    assert any("unknown path 'nope'" in p for p in problems)
    assert any("--bf16 bad: not a path" in p for p in problems)
    assert any("unknown path 'encoder@HEAD'" in p for p in speed.check_args(_args("--paths", "encoder@HEAD")))
    assert any("unknown path 'encoder:fp16'" in p for p in speed.check_args(_args("--paths", "encoder:fp16")))
    assert any("named twice" in p for p in speed.check_args(_args("--paths", "encoder", "encoder:fp32")))
    assert any("names a kind twice" in p for p in speed.check_args(_args("--texts", "documents", "documents")))
    assert any(".txt (one text per line)" in p for p in speed.check_args(_args("--documents-file", "d.csv")))
    assert speed.check_args(_args("--documents-file", "d.csv", "--texts", "sentences")) == []
    with pytest.raises(SystemExit):
        _args("--texts", "paragraphs")
    assert speed.parse_path_specs(["st-remote@HEAD", "vllm:bf16", "encoder:fp32"]) == [
        ("st-remote@HEAD", "st-remote", "HEAD", "fp32"), ("vllm:bf16", "vllm", "", "bf16"),
        ("encoder", "encoder", "", "fp32")]
    with pytest.raises(SystemExit):  # main refuses before loading anything
        speed.main(["--documents", "0"])


def test_help_explains_every_option():
    parser = speed.build_parser()
    for action in parser._actions:
        if action.option_strings and action.help != "==SUPPRESS==":
            assert action.help and len(action.help) > 20, action.option_strings
    text = parser.format_help()
    for option in ("--texts", "--documents-file", "--documents", "--min-document-chars", "--max-length",
                   "--vllm-python", "--profile", "--json", "--sts-file", "--sentences", "--native-checkpoint"):
        assert option in text
    for path in speed.ALL_PATHS:
        assert f"  {path} " in speed.__doc__, path


# ------------------------------------------------------------------------------------------------------ profiling

def test_an_sdpa_call_is_described_by_its_mask_and_heads():
    query, key = torch.zeros(4, 9, 7, 8), torch.zeros(4, 3, 7, 8)
    padding = torch.ones(4, 7, dtype=torch.bool)
    broadcast = padding[:, None, None, :].expand(4, 1, 7, 7)
    assert speed.describe_sdpa_call(query, key, broadcast, False, False) == (
        "bool mask (B, 1, L, L), broadcast view; not causal; 3 K/V heads for 9 query heads; float32")
    assert speed.describe_sdpa_call(query, torch.zeros(4, 9, 7, 8), broadcast.float().contiguous(), False, False) \
        .startswith("float32 mask (B, 1, L, L); not causal; 9 K/V heads for 9 query heads")
    assert speed.describe_sdpa_call(query, key, None, True, True).startswith(
        "no mask; causal; enable_gqa (3 K/V heads for 9)")
    calls = {}
    with speed._sdpa_recorder(calls):
        torch.nn.functional.scaled_dot_product_attention(query, query, query, attn_mask=broadcast)
        torch.nn.functional.scaled_dot_product_attention(query, key, key, enable_gqa=True)
    assert list(calls.values()) == [1, 1] and torch.nn.functional.scaled_dot_product_attention.__name__ != "recorded"


def test_module_kinds_split_a_stock_llama_layer():
    from transformers import LlamaConfig, LlamaModel

    from tests.tiny import TINY_LLAMA

    model = LlamaModel(LlamaConfig(**TINY_LLAMA))
    kinds = {}

    def walk(module, parent):
        kind = speed.module_kind(module, parent)
        kinds[type(module).__name__ if not isinstance(module, torch.nn.Linear) else f"Linear<{parent}>"] = kind
        for child in module.children():
            walk(child, kind or parent)

    walk(model, None)
    assert kinds["LlamaModel"].startswith("model body")
    assert kinds["LlamaAttention"] == "attention" and kinds["LlamaMLP"] == "MLP"
    assert kinds["Linear<attention>"] == "attention: q/k/v/o projections"
    assert kinds["Linear<MLP>"] == "MLP: gate/up/down projections"
    assert kinds["LlamaRMSNorm"] == "norms" and kinds["Embedding"] == "embedding lookup"
    assert kinds["LlamaRotaryEmbedding"] == "rotary cos/sin" and kinds["LlamaDecoderLayer"].startswith("decoder")
    path = speed._Path(lambda kind: None, lambda kind: None, root=model)
    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 5))
    with torch.inference_mode():
        result = speed._profile_modules(path, lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert {"attention: q/k/v/o projections", "norms", "embedding lookup", speed.OUTSIDE_MODULES} <= set(
        result["modules"])
    assert result["calls"]["attention: q/k/v/o projections"] == 4 * TINY_LLAMA["num_hidden_layers"]
    assert sum(result["modules"].values()) == pytest.approx(result["wall_s"], rel=1e-6)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_the_native_copy_cuts_at_max_length(tmp_path):
    native = tmp_path / "native"
    (native / "1_Pooling").mkdir(parents=True)
    (native / "config.json").write_text("{}")
    (native / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192, "do_lower_case": False}))
    folder = Path(speed.prepare_native(native, tmp_path / "work", 512))
    assert json.loads((folder / "sentence_bert_config.json").read_text()) == {"max_seq_length": 512,
                                                                               "do_lower_case": False}
    assert (folder / "config.json").is_symlink() and (folder / "1_Pooling").is_symlink()
    assert json.loads((native / "sentence_bert_config.json").read_text())["max_seq_length"] == 8192
    assert Path(speed.prepare_native(native, tmp_path / "work", 64)) == folder  # again: rewritten, not appended


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny base (head_dim 32, which vLLM's CPU attention accepts) converted twice: remote code and native."""
    from llama_encoder.conversion_scripts.convert import convert
    from tests.tiny import save_tiny_base

    root = tmp_path_factory.mktemp("speed")
    base = save_tiny_base(root / "base", num_attention_heads=2, num_key_value_heads=1)
    remote = convert(out=root / "remote", base=str(base)).out_dir
    native = convert(out=root / "native", base=str(base), format="native", vllm=False).out_dir  # no vLLM start
    documents = root / "documents.jsonl"
    documents.write_text("".join(json.dumps({"query": "q", "positive": f"{LONG} number {i}.", "negatives": []})
                                 + "\n" for i in range(4)))
    return Path(remote), Path(native), documents


def _run(tmp_path, tiny_pair, *extra, timeout=240):
    remote, native, documents = tiny_pair
    out = tmp_path / "speed.json"
    command = [sys.executable, str(SCRIPT), "--checkpoint", str(remote), "--native-checkpoint", str(native),
               "--sts-file", str(tmp_path / "no-sts.csv"), "--sentences", "6", "--documents-file", str(documents),
               "--documents", "3", "--max-length", "64", "--batch-size", "2", "--rounds", "1", "--warmup", "0",
               "--bf16", "--llm2vec-python", str(tmp_path / "no-llm2vec-python"), "--workdir", str(tmp_path / "w"),
               "--json", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def test_a_tiny_run_times_both_kinds_on_every_local_path(tmp_path, tiny_pair):
    stdout, data = _run(tmp_path, tiny_pair, "--paths", "llm2vec", "st-remote", "st-native", "encoder",
                        "--profile")
    assert set(data["kinds"]) == {"sentences", "documents"}
    assert data["skipped"]["llm2vec"].startswith("no ") and data["cosine_reference"] == "st-remote"
    documents = data["kinds"]["documents"]
    assert documents["texts"] == 3 and documents["max_tokens"] == 64 and documents["cut_at_max_length"] == 3
    assert "first 3 distinct texts" in documents["source"]
    assert data["kinds"]["sentences"]["source"].startswith("built-in list")
    for kind, results in data["kinds"].items():
        rows = {row["path"]: row for row in results["rows"]}
        assert set(rows) == {"st-remote", "st-native", "encoder"}, kind
        assert all(row["vs_llm2vec_best"] is None and len(row["seconds"]) == 1 for row in rows.values())
        for label in ("st-native", "encoder"):  # the same tokens, cut at the same length
            assert rows[label]["cosine_min"] > 0.9999, (kind, label)
        profiles = results["profiles"]
        assert set(profiles) == set(rows)
        assert "by_module" in profiles["st-native"]
        assert "by_module" not in profiles["st-remote"]  # hooks would turn its fast path off
        assert any("scaled_dot_product" in op for op in profiles["st-native"]["attention_kernels"])
        assert profiles["st-native"]["sdpa_calls"]
    assert data["host_line"].startswith("host: ")
    lines = stdout.rstrip().splitlines()
    assert lines[-1] == data["host_line"] and f"wrote {tmp_path / 'speed.json'}" in lines
    assert "documents (3 texts" in stdout and "  encoder                  - (-)" in stdout
    assert "by module (one more encode with forward hooks" in stdout and "sdpa given: " in stdout


@pytest.mark.integration  # real vLLM: runs in scripts/test.sh's vLLM step (-m integration), skipped in the main run
def test_a_tiny_run_through_vllm(tmp_path, tiny_pair, vllm_python):
    stdout, data = _run(tmp_path, tiny_pair, "--paths", "st-native", "vllm", "--vllm-python", vllm_python,
                        "--threads", "1", timeout=600)
    assert not data["skipped"], data["skipped"]
    for kind, results in data["kinds"].items():
        rows = {row["path"]: row for row in results["rows"]}
        assert rows["vllm"]["vllm"]["max_model_len"] == 64 and rows["vllm"]["vllm"]["dtype"] == "float32"
        assert rows["vllm"]["cosine_min"] > 0.9999, kind  # against st-native: same tokens, same pooling
    assert "vllm 0." in stdout
