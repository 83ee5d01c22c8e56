"""STS and retrieval metrics against hand-computed values, readers' formats and errors, the evaluate CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from llama_encoder.cli import main as cli_main
from llama_encoder.encoding.evaluate import (
    evaluate_retrieval,
    evaluate_sts,
    ndcg_at_k,
    pearson,
    read_retrieval,
    read_sts,
    recall_at_k,
    spearman,
)


class FakeEncoder:
    """Embeddings chosen by the test: a lookup from text to vector; records the prompts it was given."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors
        self.calls = []

    def encode(self, texts, *, prompt=None, instruction=None, **kwargs):
        self.calls.append({"texts": list(texts), "prompt": prompt, "instruction": instruction})
        return np.array([self.vectors[t] for t in texts], dtype=np.float32)


def test_correlations_match_hand_values_and_scipy():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]
    # Spearman by hand: rank differences d = (1, -1, 1, -1), 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 24/60
    assert spearman(x, y) == pytest.approx(0.6)
    assert pearson(x, y) == pytest.approx(0.6)  # same values as ranks here
    tied_x, tied_y = [1.0, 2.0, 2.0, 3.0, 5.0], [1.0, 3.0, 2.0, 2.0, 4.0]
    assert spearman(tied_x, tied_y) == pytest.approx(stats.spearmanr(tied_x, tied_y).statistic)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)


def test_read_sts_benchmark_format(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text(
        'main-captions\tMSRvid\t2012test\t0000\t5.000\tA man said "hi".\tA man greeted.\n'
        "main-news\theadlines\t2016\t0012\t4\tDriver backs up\tDriver reverses\tSource A\tSource B\n",
        encoding="utf-8",
    )
    assert read_sts(path) == [('A man said "hi".', "A man greeted.", 5.0), ("Driver backs up", "Driver reverses", 4.0)]
    header = tmp_path / "pairs.csv"
    header.write_text('score,sentence1,sentence2\n3.5,"one, two",three\n', encoding="utf-8")
    assert read_sts(header) == [("one, two", "three", 3.5)]


def test_read_sts_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("g\tf\t2012\t1\t5.0\ta\tb\ng\tf\t2012\t2\tfive\ta\tb\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: the score 'five'"):
        read_sts(bad)
    short = tmp_path / "short.csv"
    short.write_text("g\tf\t2012\t1\t5.0\tonly one sentence\n")
    with pytest.raises(ValueError, match=r"short.csv:1: expected 7 tab-separated fields"):
        read_sts(short)


def test_evaluate_sts_uses_cosine_and_encodes_each_sentence_once():
    vectors = {"a": [1, 0], "b": [1, 1], "c": [0, 1], "d": [-1, 0.2]}
    encoder = FakeEncoder(vectors)
    pairs = [("a", "b", 4.0), ("a", "c", 1.0), ("b", "c", 3.0), ("a", "d", 0.0), ("b", "b", 5.0)]
    result = evaluate_sts(encoder, pairs, prompt="P: ")
    cosines = [np.dot(vectors[x], vectors[y]) / np.linalg.norm(vectors[x]) / np.linalg.norm(vectors[y])
               for x, y, _ in pairs]
    gold = [s for _, _, s in pairs]
    assert result["n"] == 5
    assert result["spearman"] == pytest.approx(stats.spearmanr(cosines, gold).statistic)
    assert result["pearson"] == pytest.approx(stats.pearsonr(cosines, gold).statistic)
    assert encoder.calls == [{"texts": ["a", "b", "c", "d"], "prompt": "P: ", "instruction": None}]


def test_ndcg_and_recall_by_hand():
    relevant = {"d1": 2, "d3": 1, "d9": 1}
    ranked = ["d3", "d2", "d1"]
    dcg = 1 / math.log2(2) + 0 + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, relevant, 3) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(ranked, relevant, 1) == pytest.approx((1 / 1) / (2 / 1))
    assert recall_at_k(ranked, relevant, 3) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, relevant, 1) == pytest.approx(1 / 3)


def _write_retrieval(tmp_path):
    corpus = [{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": "d2", "text": "dogs bark"},
              {"_id": "d3", "text": "birds sing"}]
    queries = [{"_id": "q1", "text": "cat sounds"}, {"_id": "q2", "text": "bird songs"}, {"_id": "q3", "text": "x"}]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus))
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(r) for r in queries))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t2\nq2\td2\t1\n")
    return tmp_path / "corpus.jsonl", tmp_path / "queries.jsonl", tmp_path / "qrels.tsv"


def test_evaluate_retrieval_on_a_known_ranking(tmp_path):
    corpus, queries, qrels = read_retrieval(*_write_retrieval(tmp_path))
    assert corpus["d1"] == "Cats cats purr" and set(qrels) == {"q1", "q2"}
    vectors = {"Cats cats purr": [1, 0, 0], "dogs bark": [0, 1, 0], "birds sing": [0, 0, 1],
               "cat sounds": [0.9, 0.3, 0.1],   # ranks d1, d2, d3
               "bird songs": [0.1, 0.5, 0.4]}   # ranks d2, d3, d1
    encoder = FakeEncoder(vectors)
    result = evaluate_retrieval(encoder, corpus, queries, qrels, query_prompt="Q: ", k_values=(1, 2))
    q2_ndcg2 = (1 / math.log2(2) + 2 / math.log2(3)) / (2 / math.log2(2) + 1 / math.log2(3))
    assert result["queries"] == 2 and result["skipped"] == 1
    assert result["ndcg@1"] == pytest.approx((1.0 + 1 / 2) / 2)
    assert result["recall@1"] == pytest.approx((1.0 + 1 / 2) / 2)
    assert result["ndcg@2"] == pytest.approx((1.0 + q2_ndcg2) / 2)
    assert result["recall@2"] == pytest.approx(1.0)
    assert encoder.calls[1] == {"texts": ["cat sounds", "bird songs"], "prompt": "Q: ", "instruction": None}


def test_retrieval_readers_name_file_and_line(tmp_path):
    corpus, queries, qrels = _write_retrieval(tmp_path)
    corpus.write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2"\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: not valid JSON"):
        read_retrieval(corpus, queries, qrels)
    corpus.write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: missing field\(s\) text"):
        read_retrieval(corpus, queries, qrels)
    corpus.write_text('{"_id": "d1", "text": "ok"}\n')
    with pytest.raises(ValueError, match=r"qrels.tsv:3: document 'd3' is not in"):
        read_retrieval(corpus, queries, qrels)


def test_evaluate_cli_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    sts = tmp_path / "sts.csv"
    sts.write_text("g\tf\t1\t1\t5.0\tThe cat sat on the mat.\tA cat sat on a mat.\n"
                   "g\tf\t1\t2\t0.5\tThe cat sat on the mat.\tPlants make sugar from light.\n"
                   "g\tf\t1\t3\t2.0\tA dog ran in the park.\tThe cat sat on the mat.\n")
    assert cli_main(["evaluate", str(tiny_checkpoint), "--sts", str(sts), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3 and -1 <= result["spearman"] <= 1
    files = _write_retrieval(tmp_path)
    assert cli_main(["evaluate", str(tiny_checkpoint), "--retrieval", *map(str, files), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["queries"] == 2 and 0 <= result["ndcg@10"] <= 1 and result["recall@100"] == pytest.approx(1.0)
