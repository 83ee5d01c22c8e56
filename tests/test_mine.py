"""Hard-negative mining (`mine_negatives`, `llama-encoder mine`) with a tiny checkpoint: every mined negative is checked
against scores recomputed here with the model, and the mined set against a ranking computed here with numpy."""

import dataclasses
import json
import random
from collections import defaultdict

import numpy as np
import pytest

from llama_encoder.cli import build_parser, main
from llama_encoder.configuration_llama_encoder import fill_instruction_template
from llama_encoder.errors import InputError
from llama_encoder.training import mine
from llama_encoder.training.data import Triple, read_supervised
from llama_encoder.training.mine import MiningSettings, mine_negatives, read_corpus

WORDS = ("cat dog park mat light sugar plant river stone cloud rain sun moon star tree bird fish road house car "
         "boat hill snow wind").split()
TEMPLATE = "Instruct: {instruction}\nQuery:\n"  # the tiny checkpoint's (asserted below)
TOLERANCE = 1e-5  # batch composition changes float32 sums in the last bits


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from sentence_transformers import SentenceTransformer

    st_model = SentenceTransformer(str(tiny_checkpoint), trust_remote_code=True, device="cpu")
    assert mine.instruction_template(st_model) == TEMPLATE
    return st_model


@pytest.fixture(scope="module")
def pool():
    """40 distinct short documents."""
    rng = random.Random(0)
    docs: dict[str, None] = {}
    while len(docs) < 40:
        docs[" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))] = None
    return list(docs)


class Vectors:
    """Normalised embeddings of texts behind a prompt, each computed once (the checks below score often)."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def __call__(self, texts, prompt):
        missing = [text for text in dict.fromkeys(texts) if (prompt, text) not in self.cache]
        if missing:
            found = self.model.encode(missing, prompt=prompt, normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=False)
            self.cache.update(((prompt, text), vector) for text, vector in zip(missing, found, strict=True))
        return np.stack([self.cache[(prompt, text)] for text in texts])

    def cosine(self, query, prompt, documents):
        """Cosine similarity of `query` (behind `prompt`) to each document (behind no prompt)."""
        return self(documents, "") @ self([query], prompt)[0]


@pytest.fixture(scope="module")
def vectors(model):
    return Vectors(model)


def prompt_for(instruction, default=""):
    return fill_instruction_template(TEMPLATE, instruction) if instruction else default


def ranked_positive(vectors, pool, query, prompt, rank):
    """The pool document at `rank` (0: closest; -1: farthest) for `query` behind `prompt`."""
    return pool[int(np.argsort(-vectors.cosine(query, prompt, pool), kind="stable")[rank])]


def expected_negatives(vectors, triples, corpus, settings, default_prompt=""):
    """The negatives each record should get (None: dropped), computed here: per prompt, the window of the range_max
    + (positives + 1) closest distinct documents, the query's positives and the query text removed, the rules
    applied, the range_min best skipped, the next num_negatives taken."""
    documents = list(dict.fromkeys([t.positive for t in triples] + [n for t in triples for n in t.negatives]
                                   + list(corpus)))
    doc_embeddings = vectors(documents, "")
    positives = defaultdict(set)
    for t in triples:
        positives[t.query].add(t.positive)
    widest = defaultdict(int)
    for t in triples:
        key = prompt_for(t.instruction, default_prompt)
        widest[key] = max(widest[key], len(positives[t.query]))
    result = {}
    for t in triples:
        prompt = prompt_for(t.instruction, default_prompt)
        scores = doc_embeddings @ vectors([t.query], prompt)[0]
        positive = min(scores[documents.index(p)] for p in positives[t.query])
        window = np.argsort(-scores, kind="stable")[: settings.range_max + widest[prompt] + 1]
        kept = []
        for index in window:
            score, text = scores[index], documents[index]
            if text in positives[t.query] or text == t.query:
                continue
            if settings.relative_margin is not None and score > positive - abs(positive) * settings.relative_margin:
                continue
            if settings.absolute_margin is not None and score > positive - settings.absolute_margin:
                continue
            if settings.max_score is not None and score > settings.max_score:
                continue
            kept.append(text)
        chosen = kept[settings.range_min: settings.range_max][: settings.num_negatives]
        result[t] = tuple(chosen) if len(chosen) == settings.num_negatives else None
    return result


def mixed_triples(vectors, pool, rank=3):
    """Ten queries under three prompts (two instructions and none); each positive is the pool document at `rank`
    for its query, except the last query's, the farthest one (so no candidate passes the margins)."""
    triples = []
    for i, word in enumerate(WORDS[:10]):
        instruction = ("Find the place", "Find the thing", None)[i % 3]
        query = f"where is the {word}"
        position = -1 if i == 9 else rank
        triples.append(Triple(query, ranked_positive(vectors, pool, query, prompt_for(instruction), position),
                              negatives=(pool[i],), instruction=instruction))
    return triples


def check_rules(vectors, triples, mined, settings):
    """(a): each mined negative scores below its positive by the margins, recomputed here; none is a positive."""
    positives = defaultdict(set)
    for t in triples:
        positives[t.query].add(t.positive)
    for t in mined:
        prompt = prompt_for(t.instruction)
        scores = vectors.cosine(t.query, prompt, [t.positive, *t.negatives])
        assert len(t.negatives) == settings.num_negatives == len(set(t.negatives))
        assert not set(t.negatives) & positives[t.query]
        for negative_score in scores[1:]:
            if settings.relative_margin is not None:
                assert negative_score <= (1 - settings.relative_margin) * scores[0] + TOLERANCE
            if settings.absolute_margin is not None:
                assert negative_score <= scores[0] - settings.absolute_margin + TOLERANCE


@pytest.mark.parametrize("rule", [dict(relative_margin=0.05), dict(relative_margin=None, absolute_margin=0.1)])
def test_mined_negatives_pass_the_margin_rules(model, vectors, pool, rule):
    triples = mixed_triples(vectors, pool)
    settings = MiningSettings(num_negatives=3, **rule)
    model.train()
    mined = mine_negatives(model, triples, corpus=pool, settings=settings, show_progress=False)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert 0 < len(mined) < len(triples)  # the last query's positive is its farthest document: dropped
    check_rules(vectors, triples, mined, settings)
    # the rule removed candidates that outscore the mined ones (else this test would not test it)
    for t in mined:
        scores = vectors.cosine(t.query, prompt_for(t.instruction), pool)
        assert max(scores[[pool.index(n) for n in t.negatives]]) < scores.max() - TOLERANCE


@pytest.mark.parametrize("settings", [
    MiningSettings(num_negatives=3, range_max=8),
    MiningSettings(num_negatives=2, range_min=2, range_max=9, relative_margin=None, absolute_margin=0.02,
                   max_score=0.9),
    MiningSettings(num_negatives=2, range_max=7, relative_margin=0.1),
])
def test_mined_negatives_are_the_best_survivors_in_range(model, vectors, pool, settings, caplog):
    triples = mixed_triples(vectors, pool)
    expected = expected_negatives(vectors, triples, pool[10:], settings)
    with caplog.at_level("WARNING", logger="llama_encoder"):
        mined = mine_negatives(model, triples, corpus=pool[10:], settings=settings, show_progress=False)
    assert {t.query: t.negatives for t in mined} == {t.query: n for t, n in expected.items() if n is not None}
    assert [t.query for t in mined] == [t.query for t in triples if expected[t] is not None]  # input order
    dropped = sum(negatives is None for negatives in expected.values())
    assert dropped >= 1 and f"Dropped {dropped} of {len(triples)} records" in caplog.text


def test_random_sampling_draws_from_the_survivors_reproducibly(model, vectors, pool):
    triples = mixed_triples(vectors, pool)[:9]
    settings = MiningSettings(num_negatives=2, range_max=10, relative_margin=None, sampling_strategy="random", seed=3)
    eligible = expected_negatives(vectors, triples, pool, dataclasses.replace(settings, num_negatives=10,
                                                                           sampling_strategy="top"))
    first = mine_negatives(model, triples, corpus=pool, settings=settings, show_progress=False)
    again = mine_negatives(model, triples, corpus=pool, settings=settings, show_progress=False)
    assert first == again and len(first) == len(triples)
    for t, source in zip(first, triples, strict=True):
        assert set(t.negatives) <= set(eligible[source])
    top = expected_negatives(vectors, triples, pool, dataclasses.replace(settings, sampling_strategy="top"))
    assert any(t.negatives != top[source] for t, source in zip(first, triples, strict=True))


def test_instruction_goes_to_queries_only(model, vectors, pool, monkeypatch):
    triples = mixed_triples(vectors, pool)[:9]
    calls = []
    for name in ("encode_query", "encode_document"):
        original = getattr(model, name)

        def spy(texts, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, kwargs.get("prompt"), tuple(texts)))
            return _original(texts, *args, **kwargs)

        monkeypatch.setattr(model, name, spy)
    mine_negatives(model, triples, corpus=pool, settings=MiningSettings(relative_margin=None),
                   query_prompt="Search: ", show_progress=False)
    documents = [(prompt, text) for name, prompt, texts in calls if name == "encode_document" for text in texts]
    assert {prompt for prompt, _ in documents} == {""} and set(pool) <= {text for _, text in documents}
    queries = {(prompt, text) for name, prompt, texts in calls if name == "encode_query" for text in texts}
    # each query behind its own instruction (template-filled), else the verbatim prompt: never the saved one
    assert queries == {(prompt_for(t.instruction, "Search: "), t.query) for t in triples}
    assert len({prompt for prompt, _ in queries}) == 3


def test_instruction_changes_the_mined_negatives(model, vectors, pool):
    triples = [Triple(f"where is the {word}", pool[i]) for i, word in enumerate(WORDS[:8])]
    settings = MiningSettings(num_negatives=3, relative_margin=None)
    plain = mine_negatives(model, triples, corpus=pool, settings=settings, show_progress=False)
    instructed = mine_negatives(model, triples, corpus=pool, settings=settings, instruction="Find the place",
                                show_progress=False)
    prompt = prompt_for("Find the place")
    assert [t.negatives for t in plain] == list(expected_negatives(vectors, triples, pool, settings).values())
    assert [t.negatives for t in instructed] == list(expected_negatives(vectors, triples, pool, settings,
                                                                        prompt).values())
    assert [t.negatives for t in plain] != [t.negatives for t in instructed]
    assert all(t.instruction is None for t in instructed)  # the record is written as it came


def test_positives_of_a_query_are_never_its_negatives(model, vectors, pool):
    query, a, b = "where is the river", "Find the place", "Find the thing"
    top = np.argsort(-vectors.cosine(query, prompt_for(a), pool), kind="stable")
    p1, p2, p3 = (pool[i] for i in top[:3])  # the three closest documents under prompt a
    triples = [Triple(query, p1, instruction=a), Triple(query, p2, instruction=a), Triple(query, p3, instruction=b),
               Triple("where is the moon", pool[5])]
    settings = MiningSettings(num_negatives=3, relative_margin=None)
    mined = mine_negatives(model, triples, corpus=pool + [p1, p2], settings=settings, show_progress=False)
    assert len(mined) == 4
    for t in mined[:3]:
        assert not {p1, p2, p3} & set(t.negatives) and len(t.negatives) == 3
    # under prompt a the three closest non-positives, although p3 (a positive under prompt b) outranks them
    assert mined[0].negatives == mined[1].negatives == tuple(pool[i] for i in top[3:6])


def test_nothing_passes_names_the_settings(model, vectors, pool):
    triples = mixed_triples(vectors, pool)[::3][:3]  # one prompt
    with pytest.raises(InputError, match=r"--max-score \(now -0.99\)"):
        mine_negatives(model, triples, corpus=pool, settings=MiningSettings(max_score=-0.99), show_progress=False)
    with pytest.raises(InputError, match="add documents with --corpus"):
        mine_negatives(model, triples[:1], settings=MiningSettings(num_negatives=2), show_progress=False)


@pytest.mark.parametrize(("values", "message"), [
    (dict(num_negatives=0), r"num_negatives \(--num-negatives\) must be a whole number of at least 1"),
    (dict(range_min=-1), r"range_min \(--range-min\)"),
    (dict(range_min=5, range_max=5), "must be smaller than range_max"),
    (dict(num_negatives=5, range_min=2, range_max=6), "does not fit in the 4 candidates"),
    (dict(relative_margin=1.0), r"relative_margin \(--relative-margin\) must be a number in \[0, 1\)"),
    (dict(absolute_margin=-0.1), r"absolute_margin \(--absolute-margin\)"),
    (dict(relative_margin=float("nan")), "relative_margin"),
    (dict(min_score=0.5, max_score=0.2), "min_score .* must be below max_score"),
    (dict(sampling_strategy="best"), "one of top, random"),
    (dict(batch_size=0), r"batch_size \(--batch-size\)"),
])
def test_bad_settings_are_refused(values, message):
    with pytest.raises(InputError, match=message):
        MiningSettings(**values).validate()


def test_settings_from_a_mapping_name_unknown_keys():
    assert MiningSettings.from_mapping({"range_max": 20}).range_max == 20
    with pytest.raises(InputError, match="recipe nq: unknown mining setting.*margin"):
        MiningSettings.from_mapping({"margin": 0.1}, where="recipe nq")


def test_corpus_readers(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("one doc\n\ntwo doc\n")
    beir = tmp_path / "corpus.jsonl"
    beir.write_text(json.dumps({"_id": "1", "title": "Cats", "text": "sit on mats"}) + "\n"
                    + json.dumps({"_id": "2", "text": "dogs run"}) + "\n")
    assert read_corpus([text, beir]) == ["one doc", "two doc", "Cats sit on mats", "dogs run"]
    beir.write_text(json.dumps({"_id": "1", "text": ""}) + "\n")
    with pytest.raises(InputError, match="corpus.jsonl:1: text must be a non-empty string"):
        read_corpus(beir)


# --- command line --------------------------------------------------------------------------------------------------


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mine", "--help"])
    text = capsys.readouterr().out
    options = ["--model", "--data", "--corpus", "--out", "--overwrite", "--instruction", "--device", "--batch-size",
               "--no-progress"] + ["--" + item.name.replace("_", "-") for item in dataclasses.fields(MiningSettings)]
    for option in options:
        assert f"  {option}" in text, option
    parser = build_parser()._subparsers._group_actions[0].choices["mine"]
    assert all(action.help for action in parser._actions)


@pytest.fixture
def inputs(tmp_path, pool):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"where is the {w}", "positive": pool[i],
                                        **({"instruction": "Find it"} if i % 2 else {})}) + "\n"
                            for i, w in enumerate(WORDS[:6])))
    table = tmp_path / "pairs.csv"
    table.write_text("query,positive,negative\nwhere is the moon,\"" + pool[20] + "\"," + pool[21] + "\n")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": text}) + "\n" for i, text in enumerate(pool[8:])))
    return data, table, corpus


def test_cli_mines_and_writes_what_training_reads(tiny_checkpoint, inputs, tmp_path, capsys):
    data, table, corpus = inputs
    out = tmp_path / "mined.jsonl"
    argv = ["mine", "--model", str(tiny_checkpoint), "--data", str(data), "--data", str(table), "--corpus",
            str(corpus), "--out", str(out), "--num-negatives", "2", "--relative-margin", "none", "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["queries"] == summary["written"] == 7 and summary["dropped"] == 0
    assert summary["negatives_per_query"] == 2 and summary["seconds"] > 0
    triples = read_supervised(out).triples
    assert [(t.query, t.instruction) for t in triples] == [
        *[(f"where is the {w}", "Find it" if i % 2 else None) for i, w in enumerate(WORDS[:6])],
        ("where is the moon", None)]
    assert all(len(t.negatives) == 2 and t.positive not in t.negatives for t in triples)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pairs.jsonl", "pairs.csv", "corpus.jsonl",
                                                                 "mined.jsonl"])  # no temporary file left
    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert read_supervised(out).triples == triples


@pytest.mark.parametrize(("change", "message"), [
    ("out_exists", "already exists. Pass --overwrite"),
    ("missing_data", "No training data at .*nope.jsonl"),
    ("sts", "holds scored pairs .*STS"),
    ("out_is_input", "is also an input"),
    ("bad_record", r"pairs.jsonl:2: missing field 'positive'"),
    ("missing_corpus", "No corpus at .*nope.txt"),
    ("bad_setting", r"relative_margin \(--relative-margin\) must be a number in \[0, 1\)"),
    ("missing_model", "No checkpoint at"),
    ("not_jsonl", "must end in .jsonl"),
])
def test_cli_refuses_before_loading_the_model(tiny_checkpoint, inputs, tmp_path, capsys, monkeypatch, change,
                                              message):
    import re

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(mine, "_load_model", no_loading)
    data, _, corpus = inputs
    out = tmp_path / "mined.jsonl"
    options = {"--model": str(tiny_checkpoint), "--data": str(data), "--corpus": str(corpus), "--out": str(out)}
    extra = []
    if change == "out_exists":
        out.write_text("keep me\n")
    elif change == "missing_data":
        options["--data"] = str(tmp_path / "nope.jsonl")
    elif change == "sts":
        sts = tmp_path / "sts.csv"
        sts.write_text("score,sentence1,sentence2\n4.5,a cat,a kitten\n")
        options["--data"] = str(sts)
    elif change == "out_is_input":
        options["--out"] = str(data)
    elif change == "bad_record":
        data.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n" + json.dumps({"query": "q2"}) + "\n")
    elif change == "missing_corpus":
        options["--corpus"] = str(tmp_path / "nope.txt")
    elif change == "bad_setting":
        extra = ["--relative-margin", "1.5"]
    elif change == "missing_model":
        options["--model"] = str(tmp_path / "no-model")
    elif change == "not_jsonl":
        options["--out"] = str(tmp_path / "mined.txt")
    argv = ["mine", *[x for pair in options.items() for x in pair], *extra]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert re.search(message, error), error
    if change == "out_exists":
        assert out.read_text() == "keep me\n"
