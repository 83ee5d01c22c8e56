"""benchmarks/mix_ablations.py: the dev subset it scores on and the recipes of its variants."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
mix_ablations = pytest.importorskip("mix_ablations")


def _beir(folder: Path, paragraphs: int, questions_per_paragraph: int) -> None:
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"p{i}", "title": "", "text": f"paragraph {i}"})
                                                 + "\n" for i in range(paragraphs)))
    queries = [(f"q{i}_{j}", f"p{i}") for i in range(paragraphs) for j in range(questions_per_paragraph)]
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": f"question {q}"}) + "\n"
                                                  for q, _ in queries))
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t1\n" for q, p in queries))


def test_the_dev_subset_keeps_whole_runs_of_paragraphs_and_only_their_questions(tmp_path):
    _beir(tmp_path / "dev", paragraphs=100, questions_per_paragraph=3)
    subset = mix_ablations.dev_subset(tmp_path / "dev", tmp_path / "subset", runs=3, run_length=10, queries=40)
    corpus = [json.loads(line)["_id"] for line in (subset / "corpus.jsonl").read_text().splitlines()]
    numbers = [int(doc[1:]) for doc in corpus]
    assert len(numbers) == 30 and len(set(numbers)) == 30
    runs = [numbers[i:i + 10] for i in range(0, 30, 10)]  # each run: ten consecutive paragraphs from a run boundary
    assert all(run == list(range(run[0], run[0] + 10)) and run[0] % 10 == 0 for run in runs)
    queries = [json.loads(line)["_id"] for line in (subset / "queries.jsonl").read_text().splitlines()]
    assert len(queries) == 40 == len(set(queries))
    qrels = [line.split("\t") for line in (subset / "qrels.tsv").read_text().splitlines()[1:]]
    assert sorted(q for q, _, _ in qrels) == sorted(queries)  # each kept question with its one relevant paragraph
    assert all(doc in corpus and q.split("_")[0][1:] == doc[1:] for q, doc, _ in qrels)
    again = mix_ablations.dev_subset(tmp_path / "dev", tmp_path / "again", runs=3, run_length=10, queries=40)
    assert all((again / f).read_bytes() == (subset / f).read_bytes() for f in ("corpus.jsonl", "qrels.tsv"))


def test_each_variant_changes_one_ingredient_of_the_reference_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("squad-2400-mined.jsonl", "nq-train-600-mined.jsonl"):
        (tmp_path / "data" / name).write_text("")
    reference = mix_ablations.recipe(tmp_path, negatives=True, instruction=True)["datasets"]
    assert [d["max_negatives"] for d in reference] == [1, 1]
    assert {d["prompt_name"] for d in reference} == {"query"}
    no_negatives = mix_ablations.recipe(tmp_path, negatives=False, instruction=True)["datasets"]
    assert [{**d, "max_negatives": 1} for d in no_negatives] == reference
    no_instructions = mix_ablations.recipe(tmp_path, negatives=True, instruction=False)["datasets"]
    assert no_instructions == [{k: v for k, v in d.items() if k not in ("prompt_name", "instruction")}
                               for d in reference]
    (tmp_path / "data" / "nq-train-600-mined.jsonl").unlink()
    with pytest.raises(mix_ablations.BenchmarkError, match="default_adapters.py train"):
        mix_ablations.recipe(tmp_path, negatives=True, instruction=True)


def test_seeds_name_their_runs_and_the_spread_is_taken_per_variant():
    assert mix_ablations.run_name("reference", mix_ablations.TRAIN_SEED) == "reference"
    assert mix_ablations.run_name("no-negatives", 7) == "no-negatives-seed7"
    variants = {"reference": {"ndcg@10": 0.60}, "reference-seed7": {"ndcg@10": 0.62},
                "reference-seed13": {"ndcg@10": 0.59}, "no-negatives": {"ndcg@10": 0.61},
                "no-negatives-seed7": {"ndcg@10": 0.605}, "mntp-only": {"ndcg@10": 0.55}}
    assert mix_ablations.spreads(variants) == pytest.approx({"reference": 0.03, "no-negatives": 0.005})


def test_the_manifest_scales_scores_to_percent_and_keeps_counts():
    """benchmarks/default_adapters.py: a scorecard set's figures as the manifest stores them."""
    default_adapters = pytest.importorskip("default_adapters")
    metrics = {"ndcg@10": 0.684612, "recall@100": 0.979943, "queries": 10570, "skipped": 0}
    assert default_adapters.percent_scores(metrics) == {"ndcg@10": 68.46, "recall@100": 97.99, "queries": 10570,
                                                        "skipped": 0}
    assert default_adapters.percent_scores({"spearman": 0.87344, "n": 1500}) == {"spearman": 87.34, "n": 1500}
