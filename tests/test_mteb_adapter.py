"""The MTEB 2.x adapter: per-task prompts by MTEB's keys, its DataLoader batches, and MTEB's own evaluation of local
tasks built from files equal to `llama-encoder evaluate` on the same files, offline."""

from __future__ import annotations

import json
import shutil
import socket
from types import SimpleNamespace

import numpy as np
import pytest

from llama_encoder.encoding import MTEBEncoder
from llama_encoder.encoding.encode import Encoder
from llama_encoder.encoding.scorecard import EvalSet, score_sets
from tests.test_scorecard import STS_PROMPT, write_beir, write_sts

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Plants make sugar from light.", "cat", "light"]
INSTRUCTION = "Find the animal"


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint, tmp_path_factory) -> Encoder:
    """The tiny checkpoint, with a saved `sts` prompt besides `query` and `document`."""
    folder = tmp_path_factory.mktemp("mteb") / "encoder"
    shutil.copytree(tiny_checkpoint, folder)
    config = folder / "config_sentence_transformers.json"
    saved = json.loads(config.read_text())
    saved["prompts"]["sts"] = STS_PROMPT
    config.write_text(json.dumps(saved))
    return Encoder.from_pretrained(folder, device="cpu", dtype="float32")


def _task(name: str, kind: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, type=kind)


def test_prompts_follow_mteb_keys_and_default_to_evaluates(encoder):
    model = MTEBEncoder(encoder)
    assert model.prompt_for("SciFact", "Retrieval", "query") == {"prompt_name": "query"}
    assert model.prompt_for("SciFact", "Retrieval", "document") == {"prompt_name": "document"}
    assert model.prompt_for("STSBenchmark", "STS", None) == {"prompt_name": "sts"}  # the checkpoint's, as evaluate
    assert model.prompt_for("Banking77", "Classification", None) == {}  # no prompt of its own: as it is
    assert MTEBEncoder(encoder, prompt_names={"STS": "plain"}).prompt_for("STSBenchmark", "STS", None) == {}

    model = MTEBEncoder(encoder, prompt_names={"STS": "sts", "SciFact-query": "sts"},
                        instructions={"Retrieval": INSTRUCTION, "Banking77": "Classify the intent"})
    assert model.prompt_for("STSBenchmark", "STS", None) == {"prompt_name": "sts"}
    assert model.prompt_for("SciFact", "Retrieval", "query") == {"prompt_name": "sts"}  # task name beats task type
    assert model.prompt_for("NFCorpus", "Retrieval", "query") == {"instruction": INSTRUCTION}
    assert model.prompt_for("NFCorpus", "Retrieval", "document") == {"prompt_name": "document"}  # no instruction
    assert model.prompt_for("Banking77", "Classification", None) == {"instruction": "Classify the intent"}
    assert model.prompt_for("TwitterSemEval", "PairClassification", None) == {}
    with pytest.raises(ValueError, match="prompt_type must be query, document or None"):
        model.prompt_for("SciFact", "Retrieval", "passage")


def test_unknown_prompt_names_and_double_keys_are_refused(encoder):
    with pytest.raises(ValueError, match=r"has no prompt named 'absent' \(asked for PairClassification\); its "
                                         r"prompts: query, document"):
        MTEBEncoder(encoder, prompt_names={"PairClassification": "absent"})
    with pytest.raises(ValueError, match="STS: given both a prompt name and an instruction"):
        MTEBEncoder(encoder, prompt_names={"STS": "sts"}, instructions={"STS": "x"})


def test_encode_takes_mteb_batches_and_routes_prompts(encoder):
    model = MTEBEncoder(encoder, instructions={"AnimalRetrieval": INSTRUCTION})
    queries = encoder.encode(TEXTS, instruction=INSTRUCTION)
    documents = encoder.encode(TEXTS, prompt_name="document")
    assert np.abs(queries - encoder.encode_queries(TEXTS)).max() > 1e-3  # so a wrong route cannot pass
    batches = [{"text": TEXTS[:3]}, {"text": TEXTS[3:], "id": ["x", "y"]}]
    query_type = SimpleNamespace(value="query")  # as MTEB's PromptType enum
    got = model.encode(batches, task_metadata=_task("AnimalRetrieval", "Retrieval"), hf_split="test",
                       hf_subset="default", prompt_type=query_type)
    np.testing.assert_array_equal(got, queries)
    np.testing.assert_array_equal(model.encode(TEXTS, task_metadata=_task("AnimalRetrieval", "Retrieval"),
                                               prompt_type="document"), documents)
    np.testing.assert_array_equal(model.encode(TEXTS, task_metadata=_task("Other", "Retrieval"), prompt_type="query"),
                                  encoder.encode_queries(TEXTS))
    with pytest.raises(ValueError, match="no 'text' field"):
        model.encode([{"image": [None]}], prompt_type="document")


def test_batch_size_caps_rows_per_forward_call(encoder, monkeypatch):
    rows = []
    forward = encoder.model.forward

    def counting_forward(input_ids, **kwargs):
        rows.append(input_ids.shape[0])
        return forward(input_ids, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", counting_forward)
    MTEBEncoder(encoder).encode([TEXTS[0]] * 5)
    assert rows == [5]  # so the cap below is what splits them
    rows.clear()
    MTEBEncoder(encoder).encode([TEXTS[0]] * 5, batch_size=2)
    assert rows == [2, 2, 1]


@pytest.fixture()
def offline(monkeypatch):
    """No network at all: MTEB must evaluate local tasks without downloading anything."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("sts_prompt", [None, "plain"])  # the default (the checkpoint's `sts`), and none
def test_mteb_scores_local_tasks_like_evaluate(encoder, tmp_path, offline, sts_prompt):
    mteb = pytest.importorskip("mteb", minversion="2")
    from llama_encoder.encoding.mteb_adapter import local_retrieval_task, local_sts_task

    sts = write_sts(tmp_path / "sts-dev.csv")
    beir = write_beir(tmp_path / "animals", qrels_name="qrels/test.tsv")
    model = MTEBEncoder(encoder, prompt_names={"STS": sts_prompt} if sts_prompt else None)
    result = mteb.evaluate(model, [local_sts_task(sts), local_retrieval_task(beir)], cache=None, co2_tracker=False,
                           show_progress_bar=False)
    scores = {task.task_name: task.scores["test"][0] for task in result.task_results}

    card = score_sets(encoder, [EvalSet.sts(sts, prompt_name=sts_prompt), EvalSet.retrieval(beir)])
    ours_sts, ours_retrieval = card["sets"]["sts-dev"]["metrics"], card["sets"]["animals"]["metrics"]
    # STS: the same cosine and Spearman (scipy's, ties averaged like ours) on float32 embeddings
    assert scores["sts-dev"]["cosine_spearman"] == pytest.approx(ours_sts["spearman"], abs=1e-6)
    assert scores["sts-dev"]["cosine_pearson"] == pytest.approx(ours_sts["pearson"], abs=1e-6)
    # retrieval: pytrec_eval's nDCG and recall on the same ranking; MTEB rounds its means to 5 decimals
    for mteb_key, our_key in (("ndcg_at_10", "ndcg@10"), ("recall_at_100", "recall@100"),
                              ("recall_at_10", "recall@10"), ("ndcg_at_100", "ndcg@100")):
        assert scores["animals"][mteb_key] == pytest.approx(ours_retrieval[our_key], abs=5e-6), mteb_key
    assert 0 < ours_retrieval["recall@100"] < 1  # a judged document is missing from the corpus: both count it
    assert result.model_name == "llama-encoder/encoder"
