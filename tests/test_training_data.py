"""Training data readers: what they return, and the file:line errors for bad records."""

import json

import pytest

from llama_encoder.training.data import ScoredPair, Triple, read_supervised, read_texts


def test_texts_skip_blank_lines_and_keep_order(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first\n\n  \nsecond\r\nthird")
    assert read_texts(path) == ["first", "second", "third"]


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "holds no text"), ("\n \n\n", "holds no text"), ("ok\nbad\x00line\n", r"t.txt:2: the line holds a NUL")],
)
def test_bad_text_files(tmp_path, content, message):
    path = tmp_path / "t.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_texts(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No training data at .*nope.txt"):
        read_texts(tmp_path / "nope.txt")


def test_jsonl_triples(tmp_path):
    path = tmp_path / "d.jsonl"
    records = [{"query": "q1", "positive": "p1", "negatives": ["n1"], "instruction": "Find"},
               {"query": "q2", "positive": "p2", "negatives": ["n2"]}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    data = read_supervised(path)
    assert data.triples == [Triple("q1", "p1", ("n1",), "Find"), Triple("q2", "p2", ("n2",), None)]
    assert data.pairs == []


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"query": "q", "positive": "p"}', "{not json"], r"d.jsonl:2: not valid JSON"),
        (['{"query": "q"}'], r"d.jsonl:1: missing field 'positive'"),
        (['{"query": "", "positive": "p"}'], r"d.jsonl:1: query must be a non-empty string"),
        (['{"query": "q", "positive": 3}'], r"d.jsonl:1: positive must be a non-empty string"),
        (['["q", "p"]'], r"d.jsonl:1: expected a JSON object"),
        (['{"query": "q", "positive": "p", "negatives": [1]}'], r"d.jsonl:1: negatives must be a list"),
        (['{"query": "q", "positive": "p", "negatives": ["a"]}', '{"query": "q", "positive": "p"}'],
         r"different numbers of hard negatives \(\[0, 1\]\)"),
        ([""], "holds no training records"),
    ],
)
def test_bad_jsonl_records(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_supervised(path)


def test_csv_triples_and_a_missing_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('query,positive,negative\n"where, then?",here,there\nq2,p2,n2\n')
    assert read_supervised(path).triples[0] == Triple("where, then?", "here", ("there",), None)
    path.write_text("query,answer\nq,a\n")
    with pytest.raises(ValueError, match=r"d.csv:1: the header must name query and positive"):
        read_supervised(path, data_format="csv")


def test_sts_pairs_and_threshold(tmp_path):
    path = tmp_path / "sts.tsv"
    rows = ["main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.",
            "main-captions\tMSRvid\t2012test\t0004\t2.500\tA man is playing.\tA man plays a flute.",
            "main-captions\tMSRvid\t2012test\t0005\t4.000\tA cat.\tThe cat."]
    path.write_text("\n".join(rows) + "\n")
    data = read_supervised(path)
    assert data.pairs[1] == ScoredPair("A man is playing.", "A man plays a flute.", 2.5)
    kept = read_supervised(path, positive_threshold=4.0)
    assert kept.pairs == [] and [t.query for t in kept.triples] == ["A plane is taking off.", "A cat."]
    with pytest.raises(ValueError, match="No pair is scored at or above --positive-threshold 5.5"):
        read_supervised(path, positive_threshold=5.5)
    path.write_text(rows[0] + "\nbroken line\n")
    with pytest.raises(ValueError, match=r"sts.tsv:2: expected 7 tab-separated fields"):
        read_supervised(path)
