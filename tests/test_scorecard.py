"""`llama-encoder evaluate` as a scorecard: several STS and retrieval sets in one run, the table and the JSON equal
to the evaluators called directly, set names and per-set prompts, a stock Sentence Transformers baseline, and every
bad input refused before a model loads."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama_encoder.cli import main as cli_main
from llama_encoder.encoding import scorecard
from llama_encoder.encoding.encode import Encoder
from llama_encoder.encoding.evaluate import evaluate_retrieval, evaluate_sts, read_retrieval, retrieval_files
from llama_encoder.encoding.scorecard import EvalSet, format_table, split_name
from llama_encoder.readers import read_sts, sha256_file

STS_ROWS = [
    (5.0, "The cat sat on the mat.", "A cat sat on a mat."),
    (0.5, "The cat sat on the mat.", "Plants make sugar from light."),
    (2.0, "A dog ran in the park.", "The cat sat on the mat."),
    (3.5, "A dog ran in the park.", "A dog ran fast in the park."),
    (1.0, "Plants make sugar from light.", "The dog sat."),
]
STS_PROMPT = "Represent the sentence: "


def write_sts(path, rows=STS_ROWS):
    path.write_text("".join(f"main\tfile\t2017\t{i:04d}\t{score}\t{a}\t{b}\n" for i, (score, a, b) in
                            enumerate(rows)), encoding="utf-8")
    return path


def write_beir(folder, *, qrels_name="qrels.tsv"):
    """A small BEIR-style task: titled and untitled documents, graded judgements, a query with no relevant
    document (skipped) and a judged document missing from the corpus (never retrieved)."""
    folder.mkdir(parents=True)
    docs = ["cats purr on the mat", "dogs run in the park", "plants make sugar", "the sun gives light",
            "a cat chases a dog", "rain falls on the park", "sugar is sweet", "the mat is red", "birds sing at dawn",
            "the dog sat down", "light travels fast", "a park has trees"]
    corpus = [{"_id": f"d{i}", "title": "Animals" if i in (0, 4) else "", "text": text} for i, text in enumerate(docs)]
    queries = [{"_id": "q1", "text": "where do cats sit?"}, {"_id": "q2", "text": "what do plants make?"},
               {"_id": "q3", "text": "dogs in parks"}, {"_id": "q4", "text": "unjudged question"}]
    qrels = [("q1", "d0", 2), ("q1", "d7", 1), ("q2", "d2", 1), ("q2", "d99", 1), ("q3", "d1", 1), ("q3", "d9", 1),
             ("q3", "d5", 0), ("q4", "d3", 0)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / qrels_name).parent.mkdir(exist_ok=True)
    (folder / qrels_name).write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with one more saved prompt, `sts`."""
    folder = tmp_path_factory.mktemp("prompted") / "encoder"
    shutil.copytree(tiny_checkpoint, folder)
    config = folder / "config_sentence_transformers.json"
    saved = json.loads(config.read_text())
    saved["prompts"]["sts"] = STS_PROMPT
    config.write_text(json.dumps(saved, indent=2))
    return folder


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return Encoder.from_pretrained(checkpoint, device="cpu", dtype="float32")


def _evaluate(*args, capsys):
    code = cli_main(["evaluate", *map(str, args), "--device", "cpu", "--dtype", "float32"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_several_sets_in_one_run_equal_the_evaluators(checkpoint, encoder, tmp_path, capsys):
    dev, other = write_sts(tmp_path / "sts-dev.csv"), write_sts(tmp_path / "other.tsv", STS_ROWS[::-1][:4])
    beir = write_beir(tmp_path / "animals", qrels_name="qrels/test.tsv")
    loose = write_beir(tmp_path / "loose")
    out = tmp_path / "card.json"
    code, stdout, _ = _evaluate(
        checkpoint, "--sts", dev, "--sts", f"second={other}", "--retrieval", beir,
        "--retrieval", f"three={loose / 'corpus.jsonl'}", loose / "queries.jsonl", loose / "qrels.tsv",
        "--sts-prompt-name", "second=plain", "--json", out, "--format", "json", capsys=capsys)
    assert code == 0
    card = json.loads(out.read_text())
    assert json.loads(stdout) == card
    assert list(card["sets"]) == ["sts-dev", "second", "animals", "three"]

    expected = {
        "sts-dev": evaluate_sts(encoder, read_sts(dev), prompt=STS_PROMPT),  # the checkpoint's `sts` prompt
        "second": evaluate_sts(encoder, read_sts(other)),  # `plain`: none
    }
    query, document = encoder.prompts["query"], encoder.prompts["document"] or None
    for name, folder in (("animals", beir), ("three", loose)):
        expected[name] = evaluate_retrieval(encoder, *read_retrieval(*retrieval_files(folder)), query_prompt=query,
                                            document_prompt=document)
    for name, metrics in expected.items():
        entry = card["sets"][name]
        assert entry["metrics"].keys() == metrics.keys()
        for key, value in metrics.items():
            assert entry["metrics"][key] == pytest.approx(value, abs=1e-6), (name, key)
        assert entry["n"] == metrics.get("n", metrics.get("queries")) and entry["seconds"] > 0
    assert card["sets"]["animals"]["metrics"]["queries"] == 3 and card["sets"]["animals"]["metrics"]["skipped"] == 1
    assert card["sets"]["animals"]["metrics"]["recall@100"] == pytest.approx((1 + 1 / 2 + 1) / 3)  # d99 is missing

    assert card["sets"]["sts-dev"]["prompts"] == {"sentences": {"prompt_name": "sts", "prompt": STS_PROMPT}}
    assert card["sets"]["second"]["prompts"] == {"sentences": {"prompt_name": "plain", "prompt": None}}
    assert expected["sts-dev"]["spearman"] != pytest.approx(evaluate_sts(encoder, read_sts(dev))["spearman"],
                                                            abs=1e-6)  # the prompt changes the figure
    assert card["sets"]["animals"]["prompts"]["queries"] == {"prompt_name": "query", "prompt": query}
    assert [f["path"] for f in card["sets"]["three"]["files"]] == [str((loose / n).resolve()) for n in
                                                                   ("corpus.jsonl", "queries.jsonl", "qrels.tsv")]
    assert card["sets"]["animals"]["files"][2]["path"].endswith("animals/qrels/test.tsv")
    assert all(len(f["sha256"]) == 64 for entry in card["sets"].values() for f in entry["files"])
    assert card["model"] == str(checkpoint) and card["model_type"] == "llama_encoder" and card["dtype"] == "float32"
    assert card["dtype_choice"].startswith("float32 on cpu") and card["checkpoint_prompts"]["sts"] == STS_PROMPT
    assert card["host"]["device"] == "cpu" and card["host"]["logical_cpus"] >= 1
    assert {"python", "llama-encoder", "torch", "transformers", "sentence-transformers"} <= card["versions"].keys()

    # the table: one aligned row per set, figures x100
    code, table, _ = _evaluate(checkpoint, "--sts", dev, "--sts", f"second={other}", "--retrieval", beir,
                               "--retrieval", f"three={loose / 'corpus.jsonl'}", loose / "queries.jsonl",
                               loose / "qrels.tsv", "--sts-prompt-name", "second=plain", capsys=capsys)
    assert code == 0
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("set "))
    assert lines[header].split() == ["set", "kind", "prompt", "Spearman", "nDCG@10", "Recall@100", "n", "seconds"]
    rows = {line.split()[0]: line.split() for line in lines[header + 1 : header + 5]}
    assert rows["sts-dev"][1:4] == ["sts", "sts", f"{100 * expected['sts-dev']['spearman']:.2f}"]
    assert rows["second"][2] == "plain" and rows["second"][4:7] == ["-", "-", "4"]
    assert rows["animals"][1:6] == ["retrieval", "query", "-", f"{100 * expected['animals']['ndcg@10']:.2f}",
                                    f"{100 * expected['animals']['recall@100']:.2f}"]
    assert rows["three"][6] == "3"
    assert len({len(line) for line in lines[header : header + 5]}) <= 2  # aligned (the last column may end short)


def test_query_prompt_name_and_instruction(checkpoint, encoder, tmp_path, capsys):
    task = write_beir(tmp_path / "task")
    corpus, queries, qrels = read_retrieval(*retrieval_files(task))
    document = encoder.prompts["document"] or None
    code, stdout, stderr = _evaluate(checkpoint, "--retrieval", task, "--query-prompt-name", "sts", "--format",
                                     "json", capsys=capsys)
    assert code == 0, stderr
    entry = json.loads(stdout)["sets"]["task"]
    assert code == 0 and entry["prompts"]["queries"] == {"prompt_name": "sts", "prompt": STS_PROMPT}
    assert entry["metrics"]["ndcg@10"] == pytest.approx(evaluate_retrieval(
        encoder, corpus, queries, qrels, query_prompt=STS_PROMPT, document_prompt=document)["ndcg@10"], abs=1e-6)
    code, stdout, _ = _evaluate(checkpoint, "--retrieval", task, "--query-instruction", "Find the animal",
                                "--format", "json", capsys=capsys)
    entry = json.loads(stdout)["sets"]["task"]
    assert code == 0 and entry["prompts"]["queries"] == {"instruction": "Find the animal"}
    assert entry["prompt_label"] == "instruction"
    assert entry["metrics"]["ndcg@10"] == pytest.approx(evaluate_retrieval(
        encoder, corpus, queries, qrels, query_instruction="Find the animal", document_prompt=document)["ndcg@10"],
        abs=1e-6)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t: ["--sts", t / "absent.csv"], "No STS file at"),
        (lambda t: [], "Nothing to score"),
        (lambda t: ["--retrieval", t / "sts.csv", t / "sts.csv"], "a folder or three files"),
        (lambda t: ["--retrieval", t / "absent"], "No retrieval folder at"),
        (lambda t: ["--retrieval", t / "noqrels"], r"not a BEIR-style retrieval folder: it has no qrels.tsv or "
                                                   r"qrels.jsonl or qrels/test.tsv \(it has qrels/dev.tsv"),
        (lambda t: ["--retrieval", t / "task", "--retrieval", t / "task"], "Two sets are named 'task'"),
        (lambda t: ["--sts", t / "bad.csv"], r"bad.csv:2: the score 'five' is not a number"),
        (lambda t: ["--sts", t / "sts.csv", "--sts-prompt-name", "nope"], "has no prompt named 'nope'"),
        (lambda t: ["--sts", t / "sts.csv", "--sts-prompt-name", "other=sts"], "there is no sts set named 'other'"),
        (lambda t: ["--retrieval", t / "task", "--query-prompt-name", "sts=sts"], "no retrieval set named 'sts'"),
        (lambda t: ["--sts", t / "sts.csv", "--json", t / "sts.csv"], "already exists"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(checkpoint, tmp_path, capsys, monkeypatch, make_args, message):
    write_sts(tmp_path / "sts.csv")
    (tmp_path / "bad.csv").write_text("g\tf\t1\t1\t5.0\ta\tb\ng\tf\t1\t2\tfive\ta\tb\n")
    write_beir(tmp_path / "task")
    write_beir(tmp_path / "noqrels", qrels_name="qrels/dev.tsv")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(scorecard, "load_encoder", no_model)
    monkeypatch.setattr(Encoder, "from_pretrained", no_model)
    code, stdout, stderr = _evaluate(checkpoint, *make_args(tmp_path), capsys=capsys)
    assert code == 1 and stdout == ""
    assert re.search(message, stderr), stderr


def test_set_names_and_retrieval_layouts(tmp_path):
    assert split_name("dev=data/sts-dev.csv") == ("dev", "data/sts-dev.csv")
    assert split_name("data/a=b.csv") == (None, "data/a=b.csv")  # '=' inside a path, not a name
    odd = tmp_path / "x=y.csv"
    write_sts(odd)
    assert split_name(str(odd)) == (None, str(odd))
    assert EvalSet.sts(odd, name="n").name == "n"
    with pytest.raises(ValueError, match="name without '='"):
        EvalSet.sts(odd)  # it would read as SET=NAME in --sts-prompt-name
    task = write_beir(tmp_path / "beir", qrels_name="qrels/test.tsv")
    assert retrieval_files(task) == (task / "corpus.jsonl", task / "queries.jsonl", task / "qrels/test.tsv")
    (task / "qrels.jsonl").write_text('{"query-id": "q1", "corpus-id": "d0", "score": 1}\n')
    assert retrieval_files(task)[2] == task / "qrels.jsonl"  # a top-level qrels file comes first
    assert EvalSet.retrieval(task).name == "beir"
    with pytest.raises(ValueError, match="at most one of"):
        EvalSet.retrieval(task, prompt_name="query", instruction="x")


def test_format_table_aligns_numbers_right_and_marks_missing_figures():
    rows = [{"set": "a", "kind": "sts", "Spearman": 0.5, "n": 3, "seconds": 1.25},
            {"set": "longer", "kind": "retrieval", "Spearman": None, "n": 10570, "seconds": 100.0}]
    assert format_table(rows, ("set", "kind", "Spearman", "n", "seconds")).splitlines() == [
        "set     kind       Spearman      n  seconds",
        "a       sts           50.00      3      1.2",
        "longer  retrieval         -  10570    100.0",
    ]


def test_a_stock_sentence_transformers_model_is_scored_the_same_way(tmp_path, capsys):
    """A baseline such as all-MiniLM-L6-v2: stock modules, no remote code, scored by the same evaluators."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from tests.tiny import save_tiny_base

    base = save_tiny_base(tmp_path / "base")
    transformer = Transformer(str(base), max_seq_length=64)
    transformer.tokenizer.pad_token = transformer.tokenizer.eos_token
    stock = SentenceTransformer(modules=[transformer, Pooling(64, "mean")], device="cpu")
    stock.save(str(tmp_path / "stock"))
    sts = write_sts(tmp_path / "sts-dev.csv")
    code, stdout, _ = _evaluate(tmp_path / "stock", "--sts", sts, "--format", "json", capsys=capsys)
    assert code == 0
    card = json.loads(stdout)
    assert card["model_type"] == "sentence-transformers" and card["dtype"] == "float32"
    reference = SentenceTransformer(str(tmp_path / "stock"), device="cpu")

    class Plain:
        def encode(self, texts, **kwargs):
            return np.asarray(reference.encode(list(texts)), dtype=np.float32)

    expected = evaluate_sts(Plain(), read_sts(sts))
    assert card["sets"]["sts-dev"]["metrics"]["spearman"] == pytest.approx(expected["spearman"], abs=1e-6)
    assert card["sets"]["sts-dev"]["metrics"]["pearson"] == pytest.approx(expected["pearson"], abs=1e-6)


def test_the_scorecard_example_prints_recorded_baselines_beside_the_checkpoint(tmp_path):
    """examples/scorecard.py reads the manifest's `baselines` (or the older STS-only key) for the card's sets."""
    spec = importlib.util.spec_from_file_location("scorecard_example",
                                                  Path(__file__).parents[1] / "examples" / "scorecard.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    class Fixed:
        def encode(self, texts, **kwargs):
            return np.stack([np.random.default_rng(len(t) * 7 + ord(t[0])).normal(size=8) for t in texts])

    sts, squad = write_sts(tmp_path / "sts-dev.csv"), write_beir(tmp_path / "squad-dev-ir")
    card = scorecard.score_sets(Fixed(), [EvalSet.sts(sts), EvalSet.retrieval(squad)])
    baselines = {
        "measured_at": "2027-01-02T03:04:05+00:00", "host": {"cpu": "Test CPU", "logical_cpus": 2},
        "dtype": "float32", "device": "cpu", "models": {"MiniLM": "a baseline"},
        "sets": {"sts-dev": {"kind": "sts", "files": [{"name": "sts-dev.csv", "sha256": sha256_file(sts)}]},
                 "squad-dev-ir": {"kind": "retrieval", "files": [{"name": "corpus.jsonl", "sha256": "0" * 64}]}},
        "scores": {"sts-dev": {"MiniLM": {"spearman": 0.8672, "pearson": 0.85, "n": 5, "seconds": 1.5}},
                   "squad-dev-ir": {"MiniLM": {"ndcg@10": 0.5, "recall@100": 0.9, "n": 3, "seconds": 2.0}}},
    }
    rows, notes = example.recorded_rows({"baselines": baselines}, card)
    assert [(r["set"], r["model"], r["Spearman"], r["nDCG@10"], r["source"]) for r in rows] == [
        ("sts-dev", "MiniLM", 0.8672, None, "recorded"),
        ("squad-dev-ir", "MiniLM", None, 0.5, "recorded, other files"),  # its sha256 differs from these files
    ]
    assert notes == ["recorded: measured 2027-01-02 on Test CPU (2 CPUs), float32 on cpu, by "
                     "benchmarks/default_adapters.py"]
    table = format_table(rows, example.COLUMNS)
    assert "86.72" in table and "50.00" in table and "recorded, other files" in table

    rows, notes = example.recorded_rows({"baselines_sts_dev_spearman": {"MiniLM": 86.72}}, card)  # older manifest
    assert [(r["set"], r["model"], r["Spearman"]) for r in rows] == [("sts-dev", "MiniLM", pytest.approx(0.8672))]
    assert "no recorded retrieval baselines yet" in notes[0]
    rows, notes = example.recorded_rows({}, card)
    assert rows == [] and "no recorded baselines" in notes[0]
