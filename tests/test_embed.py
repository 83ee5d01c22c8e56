"""Corpus embedding: order and ids, input errors, process splits, resume after SIGKILL, changed runs refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llama_encoder.cli import main as cli_main
from llama_encoder.encoding import Encoder
from llama_encoder.encoding.embed import embed_corpus
from tests.numeric import assert_equal_up_to_summation_order, encoder_terms

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "mat", "park", "light", "sugar", "plants", "ran", "sat", "the"]
TEXTS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 9)) for i in range(37)]


class FakeEncoder:
    """Stands in for `Encoder` where the model does not matter: an embedding is a hash of prompt + text."""

    prompts = {"query": "query: ", "document": ""}

    def __init__(self, name: str = "fake-model"):
        self.name_or_path = name
        self.calls: list[list[str]] = []

    def instruction_prompt(self, instruction: str) -> str:
        return f"Instruct: {instruction}\nQuery: "

    def encode(self, texts, *, prompt="", batch_tokens=16384, show_progress=None):
        self.calls.append(list(texts))
        return np.stack([fake_embedding(prompt + text) for text in texts])


def fake_embedding(text: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint8).astype(np.float32) / 255


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint) -> Encoder:
    return Encoder.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


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
    out = tmp_path / "out"
    summary = embed_corpus(encoder, corpus_txt, out, shard_size=8, show_progress=False)
    assert summary["num_shards"] == 5 and summary["manifest"] and len(summary["computed"]) == 5
    ids, embeddings = _load(out)
    assert ids == [str(i) for i in range(len(TEXTS))]
    assert embeddings.dtype == np.float32
    # shards of 8 are batched otherwise than one call over all texts: equal up to summation order
    assert_equal_up_to_summation_order(embeddings, encoder.encode(TEXTS),
                                       terms=encoder_terms(encoder.model, encoder.max_seq_length))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_records"] == len(TEXTS) and manifest["shard_size"] == 8
    assert manifest["dimension"] == encoder.dimension and manifest["dtype"] == "float32"
    assert manifest["input_sha256"] == hashlib.sha256(corpus_txt.read_bytes()).hexdigest()
    assert manifest["model"] == str(Path(encoder.name_or_path).resolve()) and manifest["prompt"] == ""
    assert [s["num_records"] for s in manifest["shards"]] == [8] * 4 + [5]
    assert [s["sha256"] for s in manifest["shards"]] == [
        hashlib.sha256((out / f"shard-{i:05d}.npy").read_bytes()).hexdigest() for i in range(5)
    ]
    assert json.loads((out / "run.json").read_text())["input"] == str(corpus_txt)


def test_jsonl_corpus_with_ids_and_an_instruction(encoder, tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"doc": f"d{i}" if i % 2 else i, "body": t}) for i, t in enumerate(TEXTS[:10])]
    path.write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n\n")  # blank lines are skipped
    embed_corpus(encoder, path, tmp_path / "out", id_field="doc", text_field="body", shard_size=4,
                 instruction="Find the animal", show_progress=False)
    ids, embeddings = _load(tmp_path / "out")
    assert ids == [f"d{i}" if i % 2 else str(i) for i in range(10)]
    assert_equal_up_to_summation_order(embeddings, encoder.encode(TEXTS[:10], instruction="Find the animal"),
                                       terms=encoder_terms(encoder.model, encoder.max_seq_length))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["prompt"] == encoder.instruction_prompt(
        "Find the animal")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.txt", b"one\ntw\xffo\n", r"c.txt:2: not valid UTF-8"),
        ("c.jsonl", b'{"id": 1, "text": "a"}\n\n{"id": 2, "text": "b"\n', r"c.jsonl:3: not valid JSON"),
        ("c.jsonl", b'{"id": 1, "text": "a"}\n{"id": 2}\n', r"c.jsonl:2: missing field 'text'"),
        ("c.jsonl", b'{"text": "a"}\n', r"c.jsonl:1: missing field 'id'"),
        ("c.jsonl", b'{"id": 1, "text": 5}\n', r"c.jsonl:1: field 'text' must be a string; got 5"),
        ("c.jsonl", b'{"id": null, "text": "a"}\n', r"c.jsonl:1: field 'id' must be a string or an integer"),
        ("c.jsonl", b'[1, "a"]\n', r"c.jsonl:1: expected a JSON object"),
        ("c.csv", b"a,b\n", r"give a .txt file"),
        ("c.txt", b"", r"holds no records"),
    ],
)
def test_bad_corpus_is_refused_before_anything_is_written(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        embed_corpus(FakeEncoder(), path, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_blank_records_are_embedded_counted_and_warned_about_once(tmp_path, caplog):
    """A blank text is a record like any other (the encoder gives it the zero vector): ids stay aligned with the
    lines, and the corpus check says how many there are and where."""
    txt = tmp_path / "c.txt"
    txt.write_text("one\n\n  \t\nfour\n", encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(["a", "", " ", "b"])))
    for path, ids in ((txt, ["0", "1", "2", "3"]), (jsonl, ["d0", "d1", "d2", "d3"])):
        encoder = FakeEncoder()
        caplog.clear()
        summary = embed_corpus(encoder, path, tmp_path / f"out-{path.suffix[1:]}", shard_size=2, show_progress=False)
        assert summary["num_records"] == 4 and summary["num_blank"] == 2 and summary["manifest"]
        assert [r.getMessage() for r in caplog.records if "blank" in r.getMessage()] == [
            f"{path}: 2 of 4 records are empty or blank (lines 2, 3); each gets the zero vector as its embedding."]
        assert [text for call in encoder.calls for text in call] == (
            ["one", "", "  \t", "four"] if path is txt else ["a", "", " ", "b"])
        assert _load(tmp_path / f"out-{path.suffix[1:]}")[0] == ids


def test_bad_options_are_refused_before_anything_is_written(corpus_txt, tmp_path):
    cases = [
        ({"prompt": "a", "instruction": "b"}, "at most one of prompt"),
        ({"prompt_name": "passage"}, r"No prompt named 'passage'; this checkpoint has \['document', 'query'\]"),
        ({"shard_size": 0}, "shard_size must be a positive integer"),
        ({"shard_index": 2, "num_shards": 2}, r"shard_index must be in \[0, num_shards\)"),
        ({"shard_index": 0}, "Give both shard_index and num_shards"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            embed_corpus(FakeEncoder(), corpus_txt, tmp_path / "out", show_progress=False, **options)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed_corpus(FakeEncoder(), tmp_path / "missing.txt", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_byte_order_mark_is_not_part_of_the_first_text(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffhello\r\nworld\r\n".encode())
    embed_corpus(FakeEncoder(), path, tmp_path / "out", show_progress=False)
    np.testing.assert_array_equal(_load(tmp_path / "out")[1], np.stack([fake_embedding("hello"),
                                                                        fake_embedding("world")]))


def test_two_processes_write_the_same_bytes_as_one(encoder, corpus_txt, tmp_path):
    embed_corpus(encoder, corpus_txt, tmp_path / "one", shard_size=8, show_progress=False)
    first = embed_corpus(encoder, corpus_txt, tmp_path / "two", shard_size=8, shard_index=1, num_shards=2,
                         show_progress=False)
    assert first["computed"] == ["shard-00001", "shard-00003"] and not first["manifest"]
    assert not (tmp_path / "two" / "manifest.json").exists()
    second = embed_corpus(encoder, corpus_txt, tmp_path / "two", shard_size=8, shard_index=0, num_shards=2,
                          show_progress=False)
    assert second["computed"] == ["shard-00000", "shard-00002", "shard-00004"] and second["manifest"]
    assert _shard_files(tmp_path / "two") == _shard_files(tmp_path / "one")
    assert (tmp_path / "two" / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()


def test_processes_starting_together_share_a_new_folder(corpus_txt, tmp_path):
    # Several attempts, since who creates the folder first is up to the scheduler.
    embed_corpus(FakeEncoder(), corpus_txt, tmp_path / "one", shard_size=4, show_progress=False)
    for attempt in range(4):
        out, start, errors, summaries = tmp_path / f"together-{attempt}", threading.Barrier(3), [], []

        def run(rank, out=out, start=start, errors=errors, summaries=summaries):
            start.wait()
            try:
                summaries.append(embed_corpus(FakeEncoder(), corpus_txt, out, shard_size=4, shard_index=rank,
                                              num_shards=3, show_progress=False))
            except Exception as exc:  # collected so the assertion below shows it
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert sorted(name for s in summaries for name in s["computed"]) == [f"shard-{i:05d}" for i in range(10)]
        assert any(s["manifest"] for s in summaries)
        assert _shard_files(out) == _shard_files(tmp_path / "one")
        assert (out / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()


def test_torchrun_environment_picks_the_slice(corpus_txt, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    fake = FakeEncoder()
    summary = embed_corpus(fake, corpus_txt, tmp_path / "out", shard_size=8, show_progress=False)
    assert summary["computed"] == ["shard-00002"] and (summary["process_index"], summary["num_processes"]) == (2, 3)
    assert fake.calls == [TEXTS[16:24]]


def test_resume_skips_finished_shards(corpus_txt, tmp_path):
    out = tmp_path / "out"
    embed_corpus(FakeEncoder(), corpus_txt, out, shard_size=8, shard_index=0, num_shards=2, show_progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert len(before) == 6
    # What a run killed while writing shard 1 leaves: a temporary file, and the ids without the embeddings.
    (out / ".tmp-shard-00001.npy-x1y2").write_bytes(b"half a shard")
    (out / "shard-00001.ids.json").write_text("[]")

    fake = FakeEncoder()
    summary = embed_corpus(fake, corpus_txt, out, shard_size=8, show_progress=False)
    assert summary["skipped"] == ["shard-00000", "shard-00002", "shard-00004"]
    assert summary["computed"] == ["shard-00001", "shard-00003"] and summary["manifest"]
    assert fake.calls == [TEXTS[8:16], TEXTS[24:32]]
    assert {n: out.joinpath(n).stat().st_mtime_ns for n in before} == before
    assert not list(out.glob(".tmp-*"))
    ids, embeddings = _load(out)
    assert ids == [str(i) for i in range(len(TEXTS))]
    np.testing.assert_array_equal(embeddings, np.stack([fake_embedding(t) for t in TEXTS]))

    again = FakeEncoder()
    summary = embed_corpus(again, corpus_txt, out, shard_size=8, show_progress=False)
    assert again.calls == [] and len(summary["skipped"]) == 5 and summary["manifest"]


def _change_input(corpus: Path) -> None:
    corpus.write_text(corpus.read_text().replace("cat", "cow"))


@pytest.mark.parametrize(
    ("change", "changed"),
    [
        ({"shard_size": 4}, "shard_size"),
        ({"prompt": "passage: "}, "prompt"),
        ({"prompt_name": "query"}, "prompt"),
        ({"encoder": FakeEncoder("another-model")}, "model"),
        (_change_input, "input_sha256"),
    ],
)
def test_a_changed_run_is_refused_unless_overwrite(corpus_txt, tmp_path, change, changed):
    out = tmp_path / "out"
    embed_corpus(FakeEncoder(), corpus_txt, out, shard_size=8, show_progress=False)
    options = {"shard_size": 8, "show_progress": False}
    if callable(change):
        change(corpus_txt)
    else:
        options.update(change)
    encoder = options.pop("encoder", FakeEncoder())
    with pytest.raises(ValueError, match=rf"different run \(changed: [a-z_, ]*\b{changed}\b"):
        embed_corpus(encoder, corpus_txt, out, **options)
    summary = embed_corpus(encoder, corpus_txt, out, overwrite=True, **options)
    assert len(summary["computed"]) == summary["num_shards"] and summary["manifest"]
    run = json.loads((out / "run.json").read_text())
    assert run["shard_size"] == options["shard_size"] and run["input_sha256"] == hashlib.sha256(
        corpus_txt.read_bytes()).hexdigest()


def test_the_same_prompt_by_name_or_text_resumes(corpus_txt, tmp_path):
    out = tmp_path / "out"
    embed_corpus(FakeEncoder(), corpus_txt, out, shard_size=8, prompt_name="query", shard_index=0, num_shards=2,
                 show_progress=False)
    fake = FakeEncoder()
    summary = embed_corpus(fake, corpus_txt, out, shard_size=8, prompt="query: ", show_progress=False)
    assert len(summary["skipped"]) == 3 and summary["manifest"]
    assert all(len(call) == 8 for call in fake.calls) and len(fake.calls) == 2
    np.testing.assert_array_equal(_load(out)[1], np.stack([fake_embedding("query: " + t) for t in TEXTS]))


def test_foreign_folders_are_refused(corpus_txt, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not empty and holds no run.json .*--overwrite"):
        embed_corpus(FakeEncoder(), corpus_txt, tmp_path / "notes", show_progress=False)
    assert (tmp_path / "notes" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        embed_corpus(FakeEncoder(), corpus_txt, tmp_path / "file", show_progress=False)
    (tmp_path / "empty").mkdir()
    assert embed_corpus(FakeEncoder(), corpus_txt, tmp_path / "empty", show_progress=False)["manifest"]


def test_a_damaged_shard_is_named_when_the_manifest_is_written(corpus_txt, tmp_path):
    out = tmp_path / "out"
    embed_corpus(FakeEncoder(), corpus_txt, out, shard_size=8, shard_index=0, num_shards=2, show_progress=False)
    np.save(out / "shard-00002.npy", np.zeros((7, 32), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shard-00002.npy holds float32 \(7, 32\) with 8 ids; expected float32 "
                                         r"\(8, 32\)\. Delete that shard"):
        embed_corpus(FakeEncoder(), corpus_txt, out, shard_size=8, shard_index=1, num_shards=2, show_progress=False)
    assert not (out / "manifest.json").exists()


# The child embeds slowly (a pause per shard) so the parent can kill it between shards.
CHILD = textwrap.dedent(
    """
    import sys, time
    from llama_encoder.encoding import Encoder
    from llama_encoder.encoding.embed import embed_corpus
    encoder = Encoder.from_pretrained(sys.argv[1], device="cpu", dtype="float32")
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
    child.stderr.close()
    finished = {p.name for p in out.glob("shard-*.npy")}
    assert 2 <= len(finished) < 10, "killed too late to test resuming"
    assert not (out / "manifest.json").exists()
    mtimes = {name: (out / name).stat().st_mtime_ns for name in finished}

    summary = embed_corpus(encoder, corpus_txt, out, shard_size=4, show_progress=False)
    assert {f"{name}.npy" for name in summary["skipped"]} == finished and summary["manifest"]
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == mtimes
    assert not list(out.glob(".tmp-*"))
    assert _shard_files(out) == _shard_files(tmp_path / "reference")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "reference" / "manifest.json").read_bytes()


def test_embed_cli(tiny_checkpoint, corpus_txt, tmp_path, capsys):
    code = cli_main(["embed", str(tiny_checkpoint), str(corpus_txt), str(tmp_path / "out"), "--shard-size", "16",
                     "--prompt-name", "query", "--device", "cpu"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_shards"] == 3 and summary["manifest"] is True
