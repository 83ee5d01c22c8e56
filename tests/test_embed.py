"""Corpus embedding: order and ids, input errors, process splits, resume after SIGKILL, changed runs refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llama_encoder.cli import main as cli_main
from llama_encoder.encoding import Encoder
from llama_encoder.encoding.embed import embed_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "mat", "park", "light", "sugar", "plants", "ran", "sat", "the"]
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 9)) for i in range(37)]


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint) -> Encoder:
    return Encoder.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture()
def corpus_txt(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def _shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def _load(folder: Path) -> tuple[list[str], np.ndarray]:
    ids, rows = [], []
    for npy in sorted(folder.glob("shard-*.npy")):
        rows.append(np.load(npy))
        ids += json.loads(npy.with_name(npy.name.replace(".npy", ".ids.json")).read_text())
    return ids, np.concatenate(rows)


def test_txt_corpus_equals_encode_in_order(encoder, corpus_txt, tmp_path):
    summary = embed_corpus(encoder, corpus_txt, tmp_path / "out", shard_size=8, show_progress=False)
    assert summary["num_shards"] == 5 and summary["manifest"] and len(summary["computed"]) == 5
    ids, embeddings = _load(tmp_path / "out")
    assert ids == [str(i) for i in range(len(TEXTS))]
    np.testing.assert_allclose(embeddings, encoder.encode(TEXTS), atol=1e-5)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_records"] == len(TEXTS) and [s["num_records"] for s in manifest["shards"]] == [8] * 4 + [5]
    assert manifest["dimension"] == encoder.dimension


def test_jsonl_corpus_with_ids_and_an_instruction(encoder, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"doc": f"d{i}", "body": t}) for i, t in enumerate(TEXTS[:10])) + "\n\n")
    embed_corpus(encoder, path, tmp_path / "out", id_field="doc", text_field="body", shard_size=4,
                 instruction="Find the animal", show_progress=False)
    ids, embeddings = _load(tmp_path / "out")
    assert ids == [f"d{i}" for i in range(10)]
    np.testing.assert_allclose(embeddings, encoder.encode(TEXTS[:10], instruction="Find the animal"), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.txt", "one\n\nthree\n", r"c.txt:2: empty line"),
        ("c.jsonl", '{"id": 1, "text": "a"}\n{"id": 2, "text": "b"\n', r"c.jsonl:2: not valid JSON"),
        ("c.jsonl", '{"id": 1, "text": "a"}\n{"id": 2}\n', r"c.jsonl:2: missing field 'text'"),
        ("c.jsonl", '{"id": 1, "text": 5}\n', r"c.jsonl:1: field 'text' must be a non-empty string"),
        ("c.csv", "a,b\n", r"give a .txt file"),
        ("c.txt", "", r"holds no records"),
    ],
)
def test_bad_corpus_is_refused_before_anything_is_written(encoder, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        embed_corpus(encoder, path, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_two_processes_write_the_same_bytes_as_one(encoder, corpus_txt, tmp_path):
    embed_corpus(encoder, corpus_txt, tmp_path / "one", shard_size=8, show_progress=False)
    first = embed_corpus(encoder, corpus_txt, tmp_path / "two", shard_size=8, shard_index=1, num_shards=2,
                         show_progress=False)
    assert first["computed"] == ["shard-00001", "shard-00003"] and not first["manifest"]
    second = embed_corpus(encoder, corpus_txt, tmp_path / "two", shard_size=8, shard_index=0, num_shards=2,
                          show_progress=False)
    assert second["manifest"]
    assert _shard_files(tmp_path / "two") == _shard_files(tmp_path / "one")
    assert (tmp_path / "two" / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()


def test_torchrun_environment_picks_the_slice(encoder, corpus_txt, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    summary = embed_corpus(encoder, corpus_txt, tmp_path / "out", shard_size=8, show_progress=False)
    assert summary["computed"] == ["shard-00002"]


def test_resume_skips_finished_shards_and_changed_runs_are_refused(encoder, corpus_txt, tmp_path):
    out = tmp_path / "out"
    embed_corpus(encoder, corpus_txt, out, shard_size=8, shard_index=0, num_shards=2, show_progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.name_or_path, self.model = inner.name_or_path, inner.model

        def encode(self, texts, **kwargs):
            self.calls += 1
            return self.inner.encode(texts, **kwargs)

    counting = Counting(encoder)
    summary = embed_corpus(counting, corpus_txt, out, shard_size=8, show_progress=False)
    assert summary["skipped"] == ["shard-00000", "shard-00002", "shard-00004"] and counting.calls == 2
    assert {n: out.joinpath(n).stat().st_mtime_ns for n in before} == before
    with pytest.raises(ValueError, match=r"different run \(changed: .*shard_size"):
        embed_corpus(encoder, corpus_txt, out, shard_size=4, show_progress=False)
    summary = embed_corpus(encoder, corpus_txt, out, shard_size=4, overwrite=True, show_progress=False)
    assert summary["num_shards"] == 10 and len(summary["computed"]) == 10


# The child embeds slowly (a pause per shard) so the parent can kill it between shards.
CHILD = textwrap.dedent(
    """
    import sys, time
    from llama_encoder.encoding import Encoder
    from llama_encoder.encoding.embed import embed_corpus
    encoder = Encoder.from_pretrained(sys.argv[1], device="cpu")
    encode = encoder.encode
    def slow(texts, **kwargs):
        time.sleep(0.4)
        return encode(texts, **kwargs)
    encoder.encode = slow
    embed_corpus(encoder, sys.argv[2], sys.argv[3], shard_size=4, show_progress=False)
    """
)


def test_resume_after_sigkill_gives_byte_identical_shards(tiny_checkpoint, encoder, corpus_txt, tmp_path):
    embed_corpus(encoder, corpus_txt, tmp_path / "reference", shard_size=4, show_progress=False)
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_checkpoint), str(corpus_txt), str(out)],
                             cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.npy"))) < 2:
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child made no progress"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    finished = len(list(out.glob("shard-*.npy")))
    assert 2 <= finished < 10, "killed too late to test resuming"
    assert not (out / "manifest.json").exists()

    summary = embed_corpus(encoder, corpus_txt, out, shard_size=4, show_progress=False)
    assert len(summary["skipped"]) == finished and summary["manifest"]
    assert not list(out.glob(".tmp-*"))
    assert _shard_files(out) == _shard_files(tmp_path / "reference")


def test_embed_cli(tiny_checkpoint, corpus_txt, tmp_path, capsys):
    code = cli_main(["embed", str(tiny_checkpoint), str(corpus_txt), str(tmp_path / "out"), "--shard-size", "16",
                     "--prompt-name", "query", "--device", "cpu"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_shards"] == 3 and summary["manifest"] is True
