"""STS and retrieval metrics against hand-computed values, the readers' formats and file:line errors, and the
evaluators with a real (tiny, in-memory) Encoder and through the CLI."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from llama_encoder.cli import main as cli_main
from llama_encoder.encoding.evaluate import (
    evaluate_retrieval,
    evaluate_sts,
    ndcg_at_k,
    pearson,
    read_retrieval,
    recall_at_k,
    spearman,
    top_k,
)
from llama_encoder.readers import read_sts


class FakeEncoder:
    """Embeddings chosen by the test (a lookup from text to vector); records what each call was given."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors
        self.calls = []

    def encode(self, texts, **kwargs):
        self.calls.append({"texts": list(texts), **kwargs})
        return np.array([self.vectors[text] for text in texts], dtype=np.float32)


def _angle(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# correlations


def test_pearson_and_spearman_equal_hand_values():
    # means 2.5; deviations (-1.5, -.5, .5, 1.5) and (-.5, -1.5, 1.5, .5): 3 / sqrt(5 * 5)
    assert pearson([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    # rank differences (1, -1, 1, -1): 1 - 6 * 4 / (4 * 15)
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    # deviations (-1, 0, 1) and (-5/3, -2/3, 7/3): 4 / sqrt(2 * 78/9)
    assert pearson([0, 1, 2], [0, 1, 4]) == pytest.approx(4 / math.sqrt(2 * 78 / 9))
    # monotone but not linear: ranks agree exactly
    assert spearman([0, 1, 2], [0, 1, 4]) == pytest.approx(1.0)
    # ties: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4); deviations (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5)
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # ties on both sides: x ranks (1.5, 1.5, 3), y ranks (1, 2.5, 2.5); deviations (-.5, -.5, 1), (-1, .5, .5)
    assert spearman([7, 7, 9], [1, 5, 5]) == pytest.approx(0.75 / math.sqrt(1.5 * 1.5))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_correlations_equal_scipy_on_tied_and_random_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 4, size=25).astype(float), rng.normal(size=25)  # x has many ties
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)
        assert spearman(y, x) == pytest.approx(spearman(x, y))


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([1, 1, 1], [1, 2, 3], "one of the sequences is constant"),
        ([1, 2], [1, 2, 3], "same length; got 2 and 3"),
        ([1], [1], "at least 2 pairs"),
        ([1, float("nan"), 3], [1, 2, 3], "NaN or infinite"),
    ],
)
def test_correlations_refuse_undefined_input(x, y, message):
    for correlation in (pearson, spearman):
        with pytest.raises(ValueError, match=message):
            correlation(x, y)


# STS


def test_read_sts_benchmark_format(tmp_path):
    path = tmp_path / "sts-dev.csv"
    path.write_text(
        "main-captions\tMSRvid\t2012test\t0000\t5.000\tA man with a hard hat is dancing.\tA man wearing a hard "
        "hat is dancing.\n"
        'main-forums\tanswers-forums\t2015\t0001\t0.600\tHe said "no.\tShe wrote "yes" twice.\n'  # unbalanced quote
        "main-news\theadlines\t2016\t0012\t4\tDriver backs up\tDriver reverses\tEurope Media Monitor\tEMM\n"
        "\n",
        encoding="utf-8",
    )
    assert read_sts(path) == [
        ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0),
        ('He said "no.', 'She wrote "yes" twice.', 0.6),
        ("Driver backs up", "Driver reverses", 4.0),
    ]


def test_read_sts_files_with_a_header(tmp_path):
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('sentence1,score,sentence2,extra\n"one, two",3.5,"say ""hi""",x\n', encoding="utf-8-sig")
    assert read_sts(csv_file) == [("one, two", 'say "hi"', 3.5)]
    tsv_file = tmp_path / "stsbenchmark.tsv"
    tsv_file.write_text('split\tscore\tsentence1\tsentence2\ntest\t1.25\tA "quote\tB\n', encoding="utf-8")
    assert read_sts(tsv_file) == [('A "quote', "B", 1.25)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("g\tf\t2012\t1\t5.0\ta\tb\n\ng\tf\t2012\t2\tfive\ta\tb\n", r"bad.csv:3: the score 'five' is not a number"),
        ("g\tf\t2012\t1\t5.0\ta\tb\ng\tf\t2012\t1\tnan\ta\tb\n", r"bad.csv:2: the score 'nan'"),
        ("g\tf\t2012\t1\t5.0\tonly one sentence\n", r"bad.csv:1: expected 7 tab-separated fields .*found 6"),
        ("score,sentence1,sentence2\n1,a,b\n2,a\n", r"bad.csv:3: expected 3 fields as the header says; found 2"),
        ("\n\n", r"bad.csv holds no STS pairs"),
    ],
)
def test_read_sts_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_sts(path)


def test_read_sts_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No STS file at"):
        read_sts(tmp_path / "absent.csv")


def test_evaluate_sts_correlates_cosine_with_gold_and_encodes_each_sentence_once():
    # cosines of "a" with b, c, d, e: 1, 0, -1, 0.6 (3-4-5 triangle); cosine of b with b: 1
    encoder = FakeEncoder({"a": [2, 0], "b": [5, 0], "c": [0, 1], "d": [-1, 0], "e": [3, 4]})
    pairs = [("a", "b", 5.0), ("a", "c", 0.0), ("a", "d", 1.0), ("a", "e", 4.0)]
    result = evaluate_sts(encoder, pairs, prompt="P: ", batch_tokens=99)
    # cosine ranks (4, 2, 1, 3), gold ranks (4, 1, 2, 3): d = (0, 1, -1, 0), 1 - 6 * 2 / (4 * 15)
    assert result["spearman"] == pytest.approx(0.8)
    cosine, gold = np.array([1, 0, -1, 0.6]), np.array([5.0, 0.0, 1.0, 4.0])
    cosine, gold = cosine - cosine.mean(), gold - gold.mean()
    assert result["pearson"] == pytest.approx(cosine @ gold / math.sqrt((cosine @ cosine) * (gold @ gold)))
    assert result["n"] == 4
    assert encoder.calls == [
        {"texts": ["a", "b", "c", "d", "e"], "prompt": "P: ", "batch_tokens": 99, "show_progress": None}
    ]


def test_evaluate_sts_refuses_a_broken_encoder():
    pairs = [("a", "b", 1.0), ("a", "c", 2.0)]
    with pytest.raises(ValueError, match=r"NaN or infinite embeddings for 1 of 3 sentences"):
        evaluate_sts(FakeEncoder({"a": [1, 0], "b": [float("nan"), 0], "c": [0, 1]}), pairs)

    class OneRowShort(FakeEncoder):
        def encode(self, texts, **kwargs):
            return super().encode(texts, **kwargs)[:-1]

    with pytest.raises(ValueError, match=r"shape \(2, 2\) for 3 sentences"):
        evaluate_sts(OneRowShort({"a": [1, 0], "b": [1, 1], "c": [0, 1]}), pairs)
    with pytest.raises(ValueError, match="constant"):
        evaluate_sts(FakeEncoder({"a": [1, 0], "b": [1, 0], "c": [2, 0]}), pairs)


# retrieval metrics


def test_ndcg_and_recall_equal_hand_values():
    relevant = {"d1": 2, "d3": 1, "d9": 1, "d7": 0, "d8": -1}
    ranked = ["d3", "d8", "d1", "d7"]
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, relevant, 4) == pytest.approx((1 / math.log2(2) + 2 / math.log2(4)) / ideal)
    assert ndcg_at_k(ranked, relevant, 1) == pytest.approx(1 / 2)  # ideal DCG@1 is the grade 2 document
    assert ndcg_at_k(["d1", "d3", "d9"], relevant, 3) == pytest.approx(1.0)
    assert recall_at_k(ranked, relevant, 4) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, relevant, 1) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranked, {"d7": 0}, 4) == 0.0 and recall_at_k(ranked, {"d7": 0}, 4) == 0.0


def test_top_k_blockwise_equals_the_known_order_and_breaks_ties_by_index():
    docs = np.array([_angle(a) for a in (0, 30, 60, 90, 35, 200)], dtype=np.float32) * [[1], [2], [1], [3], [1], [1]]
    queries = np.array([_angle(10), _angle(80), _angle(50)], dtype=np.float32)
    expected = [[0, 1, 4, 2, 3, 5], [3, 2, 4, 1, 0, 5], [2, 4, 1, 3, 0, 5]]  # by angle between query and document
    for query_block, doc_block in ((1, 1), (2, 4), (8, 64)):
        assert top_k(queries, docs, 10, query_block=query_block, doc_block=doc_block).tolist() == expected
        assert top_k(queries, docs, 3, query_block=query_block, doc_block=doc_block).tolist() == [
            row[:3] for row in expected
        ]
    # exactly tied documents (scores 0 1 1 0 1) across the k-th place and across blocks: the lowest indices win
    tied = np.array([[0, 1], [1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    for doc_block in (1, 2, 3, 8):
        for k, best in ((1, [1]), (2, [1, 2]), (4, [1, 2, 4, 0])):
            assert top_k(np.array([[1, 0]], dtype=np.float32), tied, k, doc_block=doc_block).tolist() == [best]
    # many ties (selection and sorting algorithms are free to reorder equal keys on large inputs)
    many = np.eye(2, dtype=np.float32)[np.random.default_rng(0).integers(0, 2, size=600)]
    hits = np.flatnonzero(many[:, 0] == 1)
    for doc_block in (100, 1000):
        got = top_k(np.array([[1, 0], [0, 1]], dtype=np.float32), many, 250, doc_block=doc_block)
        assert got[0].tolist() == hits[:250].tolist()
        assert got[1].tolist() == np.r_[np.flatnonzero(many[:, 1] == 1), hits][:250].tolist()
        # k ends exactly where the tied block ends: no tie across the k-th place, many inside the top k
        assert top_k(np.array([[1, 0]], dtype=np.float32), many, len(hits), doc_block=doc_block)[0].tolist() == (
            hits.tolist()
        )


RETRIEVAL_VECTORS = {
    **{f"doc {i}": _angle(angle) for i, angle in enumerate((0, 30, 60, 90), start=1)},
    "near 10": _angle(10),  # ranks doc 1, 2, 3, 4
    "near 80": _angle(80),  # ranks doc 4, 3, 2, 1
    "unjudged": _angle(45),
    "zero only": _angle(45),
}


def test_evaluate_retrieval_equals_hand_computed_ndcg_and_recall():
    corpus = {f"d{i}": f"doc {i}" for i in range(1, 5)}
    queries = {"q1": "near 10", "q2": "near 80", "q3": "unjudged", "q4": "zero only"}
    # q2's d9 is not in the corpus: relevant, never retrieved; q4 has no relevant document
    qrels = {"q1": {"d3": 2, "d4": 1}, "q2": {"d4": 1, "d1": 2, "d9": 1}, "q4": {"d1": 0}}
    encoder = FakeEncoder(RETRIEVAL_VECTORS)
    result = evaluate_retrieval(encoder, corpus, queries, qrels, query_instruction="Find", document_prompt="D: ",
                                k_values=(3, 1, 10), batch_tokens=77)
    log2 = math.log2
    ideal1, ideal2 = 2 + 1 / log2(3), 2 + 1 / log2(3) + 1 / log2(4)
    expected = {
        "ndcg@1": (0 + 1 / 2) / 2,  # q1: d1 (not relevant); q2: d4 (grade 1) against ideal grade 2
        "recall@1": (0 + 1 / 3) / 2,
        "ndcg@3": ((2 / log2(4)) / ideal1 + (1 / log2(2)) / ideal2) / 2,  # q1: d1 d2 d3; q2: d4 d3 d2
        "recall@3": (1 / 2 + 1 / 3) / 2,
        "ndcg@10": ((2 / log2(4) + 1 / log2(5)) / ideal1 + (1 + 2 / log2(5)) / ideal2) / 2,  # the whole corpus
        "recall@10": (1 + 2 / 3) / 2,
        "queries": 2,
        "skipped": 2,
    }
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        assert result[name] == pytest.approx(value), name
    assert encoder.calls == [
        {"texts": ["doc 1", "doc 2", "doc 3", "doc 4"], "prompt": "D: ", "batch_tokens": 77, "show_progress": None},
        {"texts": ["near 10", "near 80"], "instruction": "Find", "prompt": None, "batch_tokens": 77,
         "show_progress": None},
    ]


def test_evaluate_retrieval_refuses_unusable_input():
    corpus, queries = {"d1": "doc 1"}, {"q1": "near 10"}
    encoder = FakeEncoder(RETRIEVAL_VECTORS)
    with pytest.raises(ValueError, match="No query has a relevant document"):
        evaluate_retrieval(encoder, corpus, queries, {"q1": {"d1": 0}, "q9": {"d1": 1}})
    with pytest.raises(ValueError, match="k_values must be positive integers"):
        evaluate_retrieval(encoder, corpus, queries, {"q1": {"d1": 1}}, k_values=(0, 10))
    with pytest.raises(ValueError, match="corpus is empty"):
        evaluate_retrieval(encoder, {}, queries, {"q1": {"d1": 1}})


# retrieval files


def _write_task(tmp_path, qrels_name="qrels.tsv", qrels_text="query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\t3\t2\n"):
    corpus = [{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": "d2", "title": "", "text": "dogs bark"},
              {"_id": 3, "text": "birds sing"}]
    queries = [{"_id": "q1", "text": "cat sounds"}, {"_id": "q2", "text": "bird songs"}, {"_id": "q3", "text": "x"}]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n")
    (tmp_path / "queries.jsonl").write_text("\n\n".join(json.dumps(r) for r in queries))
    (tmp_path / qrels_name).write_text(qrels_text)
    return tmp_path / "corpus.jsonl", tmp_path / "queries.jsonl", tmp_path / qrels_name


def test_read_retrieval_tsv_and_jsonl_qrels(tmp_path):
    corpus, queries, qrels = read_retrieval(*_write_task(tmp_path))
    assert corpus == {"d1": "Cats cats purr", "d2": "dogs bark", "3": "birds sing"}
    assert queries == {"q1": "cat sounds", "q2": "bird songs", "q3": "x"}
    assert qrels == {"q1": {"d1": 1}, "q2": {"3": 2}}
    jsonl = '{"query-id": "q1", "corpus-id": "d1", "score": 1}\n\n{"query-id": "q2", "corpus-id": 3, "score": 2.0}\n'
    assert read_retrieval(*_write_task(tmp_path, "qrels.jsonl", jsonl))[2] == qrels


def test_read_retrieval_warns_about_judged_documents_missing_from_the_corpus(tmp_path, caplog):
    files = _write_task(tmp_path, qrels_text="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td7\t1\n")
    with caplog.at_level(logging.WARNING, logger="llama_encoder.encoding.evaluate"):
        assert read_retrieval(*files)[2] == {"q1": {"d1": 1, "d7": 1}}
    assert "1 judged document(s)" in caplog.text and "'d7'" in caplog.text


@pytest.mark.parametrize(
    ("target", "content", "message"),
    [
        ("corpus", '{"_id": "d1", "text": "ok"}\n\n{"_id": "d2"\n', r"corpus.jsonl:3: not valid JSON"),
        ("corpus", '{"_id": "d1", "text": "ok"}\n{"_id": "d2"}\n', r"corpus.jsonl:2: missing field\(s\) text"),
        ("corpus", '["d1", "ok"]\n', r"corpus.jsonl:1: expected a JSON object .* found a list"),
        ("corpus", '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n',
         r"corpus.jsonl:2: _id 'd1' already appeared on line 1"),
        ("corpus", '{"_id": "d1", "text": 5}\n', r"corpus.jsonl:1: text must be a string"),
        ("corpus", '{"_id": null, "text": "a"}\n', r"corpus.jsonl:1: _id must be a string or an integer"),
        ("queries", '{"_id": "q1"}\n', r"queries.jsonl:1: missing field\(s\) text"),
        ("qrels.tsv", "query\tdoc\tscore\nq1\td1\t1\n", r"qrels.tsv:1: expected the header"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n\nq2 d1 1\n", r"qrels.tsv:4: expected 3 tab-separated"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t0.5\n", r"qrels.tsv:2: the score '0.5' is not an integer"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n", r"qrels.tsv:3: .* judged 1 before and 2"),
        ("qrels.jsonl", '{"query-id": "q1", "corpus-id": "d1"}\n', r"qrels.jsonl:1: missing field\(s\) score"),
        ("qrels.tsv", "query-id\tcorpus-id\tscore\n", r"qrels.tsv holds no judgements"),
    ],
)
def test_retrieval_readers_name_file_and_line(tmp_path, target, content, message):
    corpus, queries, qrels = _write_task(tmp_path, qrels_name=target if target.startswith("qrels") else "qrels.tsv")
    {"corpus": corpus, "queries": queries}.get(target, qrels).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_retrieval(corpus, queries, qrels)


def test_read_retrieval_missing_file(tmp_path):
    corpus, queries, qrels = _write_task(tmp_path)
    with pytest.raises(FileNotFoundError, match="No qrels file at"):
        read_retrieval(corpus, queries, tmp_path / "absent.tsv")


# with a real Encoder


def test_evaluators_with_a_real_encoder():
    from llama_encoder.encoding import Encoder
    from tests.tiny import TINY_CORPUS, tiny_bpe_tokenizer, tiny_encoder

    tokenizer = tiny_bpe_tokenizer(TINY_CORPUS)
    tokenizer.pad_token = tokenizer.eos_token
    encoder = Encoder(tiny_encoder(vocab_size=len(tokenizer)), tokenizer)
    texts = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "the cat"]
    pairs = [(texts[0], texts[3], 4.0), (texts[1], texts[2], 1.0), (texts[0], texts[1], 2.0)]
    embedded = encoder.encode(texts)
    cosine = [embedded[i] @ embedded[j] / np.linalg.norm(embedded[i]) / np.linalg.norm(embedded[j])
              for i, j in ((0, 3), (1, 2), (0, 1))]
    assert evaluate_sts(encoder, pairs)["spearman"] == pytest.approx(spearman(cosine, [4.0, 1.0, 2.0]))

    corpus, queries = {f"d{i}": text for i, text in enumerate(texts)}, {"q": "where is the cat?"}
    qrels = {"q": {"d0": 1, "d3": 1}}
    query = encoder.encode(["where is the cat?"], instruction="Find the animal")[0]
    ranked = [f"d{i}" for i in np.argsort(-(embedded @ query) / np.linalg.norm(embedded, axis=1), kind="stable")]
    result = evaluate_retrieval(encoder, corpus, queries, qrels, query_instruction="Find the animal", k_values=(2,))
    assert result["ndcg@2"] == pytest.approx(ndcg_at_k(ranked, qrels["q"], 2))
    assert result["recall@2"] == pytest.approx(recall_at_k(ranked, qrels["q"], 2))


def test_evaluate_cli_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    sts = tmp_path / "sts.csv"
    sts.write_text("g\tf\t1\t1\t5.0\tThe cat sat on the mat.\tA cat sat on a mat.\n"
                   "g\tf\t1\t2\t0.5\tThe cat sat on the mat.\tPlants make sugar from light.\n"
                   "g\tf\t1\t3\t2.0\tA dog ran in the park.\tThe cat sat on the mat.\n")
    assert cli_main(["evaluate", str(tiny_checkpoint), "--sts", str(sts), "--device", "cpu", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)["sets"]["sts"]["metrics"]
    assert result["n"] == 3 and -1 <= result["spearman"] <= 1
    files = _write_task(tmp_path)
    assert cli_main(["evaluate", str(tiny_checkpoint), "--retrieval", *map(str, files), "--device", "cpu",
                     "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)["sets"][tmp_path.name]["metrics"]
    assert result["queries"] == 2 and result["skipped"] == 1 and result["recall@100"] == pytest.approx(1.0)
