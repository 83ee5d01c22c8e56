"""Evaluation: STS (Spearman and Pearson of cosine similarity) and BEIR-style retrieval (nDCG@k, Recall@k).

The evaluators take any object with an `encode(inputs, *, prompt=None, instruction=None, batch_tokens=...,
show_progress=None)` method that returns float32 embeddings in input order, such as `Encoder`.
Correlations and metrics are returned raw, in [-1, 1] or [0, 1]; papers and leaderboards report them x100.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import InputError, MissingInputError
from ..readers import jsonl_records

logger = logging.getLogger(__name__)

QRELS_FIELDS = ("query-id", "corpus-id", "score")
QRELS_NAMES = ("qrels.tsv", "qrels.jsonl", "qrels/test.tsv")
"""Where a retrieval folder's judgements are looked for, in this order (the last is BEIR's own layout)."""


class SupportsEncode(Protocol):
    """Anything that embeds a list of texts, like `Encoder`."""

    def encode(self, inputs: Sequence[str], **kwargs: Any) -> np.ndarray: ...


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`; tied values share the average of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(values)]  # exclusive
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(starts_group) - 1]
    return ranks


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise InputError(f"Correlation needs two sequences of the same length; got {len(x)} and {len(y)}.")
    if len(x) < 2:
        raise InputError(f"Correlation needs at least 2 pairs; got {len(x)}.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError("Correlation got NaN or infinite values; check the embeddings and gold scores.")
    return x, y


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences, in [-1, 1]. Raises ValueError when either is constant
    (the correlation is undefined then)."""
    x, y = _paired(x, y)
    x, y = x - x.mean(), y - y.mean()
    norm = math.sqrt((x @ x) * (y @ y))
    if norm == 0:
        raise InputError(
            "Correlation is undefined: one of the sequences is constant (e.g. the encoder gives every sentence the "
            "same embedding, or all gold scores are equal)."
        )
    return float(np.clip((x @ y) / norm, -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences, in [-1, 1]: Pearson of their ranks, ties getting
    their average rank (as scipy.stats.spearmanr)."""
    x, y = _paired(x, y)
    return pearson(_average_ranks(x), _average_ranks(y))


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return (a * b).sum(axis=1)


def _embed(encoder: SupportsEncode, texts: list[str], what: str, **kwargs: Any) -> np.ndarray:
    """`encoder.encode(texts, **kwargs)` as a float32 matrix, checked to have one finite row per text."""
    embeddings = np.asarray(encoder.encode(texts, **kwargs), dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(texts):
        raise InputError(
            f"The encoder returned an array of shape {embeddings.shape} for {len(texts)} {what}; "
            "it must return one embedding row per input, in input order."
        )
    bad = int((~np.isfinite(embeddings).all(axis=1)).sum())
    if bad:
        raise InputError(
            f"The encoder returned NaN or infinite embeddings for {bad} of {len(texts)} {what}; "
            "encode in float32 (e.g. dtype='float32') or check the checkpoint."
        )
    return embeddings


def evaluate_sts(
    encoder: SupportsEncode,
    pairs: Sequence[tuple[str, str, float]],
    *,
    prompt: str | None = None,
    batch_tokens: int = 16384,
    show_progress: bool | None = None,
) -> dict[str, float | int]:
    """Score an encoder on STS `pairs` of `(sentence1, sentence2, gold score)`.

    Each distinct sentence is encoded once (behind `prompt`, if given). Returns `spearman` and `pearson`, the raw
    correlations in [-1, 1] between the cosine similarity of each pair's embeddings and its gold score (reports
    multiply by 100; Spearman is the headline STS figure), and `n`, the number of pairs.
    """
    if len(pairs) < 2:
        raise InputError(f"STS needs at least 2 pairs to correlate; got {len(pairs)}.")
    sentences = list(dict.fromkeys(sentence for a, b, _ in pairs for sentence in (a, b)))
    row = {sentence: index for index, sentence in enumerate(sentences)}
    embeddings = _embed(encoder, sentences, "sentences", prompt=prompt, batch_tokens=batch_tokens,
                        show_progress=show_progress)
    similarity = _cosine_rows(embeddings[[row[a] for a, _, _ in pairs]], embeddings[[row[b] for _, b, _ in pairs]])
    gold = [score for _, _, score in pairs]
    result = {"spearman": spearman(similarity, gold), "pearson": pearson(similarity, gold), "n": len(pairs)}
    logger.info("STS on %d pairs: Spearman %.2f, Pearson %.2f (x100)", len(pairs), 100 * result["spearman"],
                100 * result["pearson"])
    return result


def _id(value: Any, path: Path, line: int, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{path}:{line}: {field} must be a string or an integer; found {value!r}.")
    return str(value)


def _text(value: Any, path: Path, line: int, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{path}:{line}: {field} must be a string; found {type(value).__name__}.")
    return value


def _read_texts(path: Path, *, with_title: bool) -> dict[str, str]:
    """id -> text of a BEIR corpus (`title` + " " + `text` when a title is given) or queries file."""
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, record in jsonl_records(path, ("_id", "text")):
        key = _id(record["_id"], path, line, "_id")
        if key in first_line:
            raise InputError(f"{path}:{line}: _id {key!r} already appeared on line {first_line[key]}; ids must be "
                             "unique.")
        text = _text(record["text"], path, line, "text")
        title = record.get("title") if with_title else None
        if title:
            text = f"{_text(title, path, line, 'title')} {text}"
        texts[key], first_line[key] = text, line
    if not texts:
        raise InputError(f"{path} holds no records; check that it is the right file.")
    return texts


def _qrels_rows(path: Path) -> Iterator[tuple[int, Any, Any, Any]]:
    """`(line number, query id, document id, score)` for each judgement in a qrels tsv or jsonl file."""
    if path.suffix == ".jsonl":
        for line, record in jsonl_records(path, QRELS_FIELDS):
            yield line, record["query-id"], record["corpus-id"], record["score"]
        return
    if not path.is_file():
        raise MissingInputError(f"No qrels file at {path}; give a tsv with a query-id, corpus-id, score header.")
    with path.open(encoding="utf-8-sig") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
        if [field.strip() for field in header[:3]] != list(QRELS_FIELDS):
            raise InputError(f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score' of a BEIR qrels "
                             f"file; found {header!r}.")
        for line, text in enumerate(handle, start=2):
            if not text.strip():
                continue
            fields = text.rstrip("\r\n").split("\t")
            if len(fields) < 3:
                raise InputError(f"{path}:{line}: expected 3 tab-separated fields (query-id, corpus-id, score); "
                                 f"found {len(fields)}.")
            yield line, fields[0], fields[1], fields[2]


def _relevance(value: Any, path: Path, line: int) -> int:
    """An integer relevance grade from a qrels score such as 1, "2" or "1.0"."""
    try:
        grade = float(value)
    except (TypeError, ValueError):
        grade = math.nan
    if isinstance(value, bool) or not math.isfinite(grade) or grade != int(grade):
        raise InputError(f"{path}:{line}: the score {value!r} is not an integer relevance grade (0, 1, 2, ...).")
    return int(grade)


def retrieval_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[Path, Path, Path]:
    """The `(corpus, queries, qrels)` files of a retrieval task: `path` is a BEIR-style folder (corpus.jsonl,
    queries.jsonl and the first of QRELS_NAMES found) or the three files. Raises MissingInputError naming what is
    missing, before anything is read."""
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(item) for item in path]
    if len(paths) == 3:
        for what, file in zip(("corpus", "queries", "qrels"), paths, strict=True):
            if not file.is_file():
                raise MissingInputError(f"No {what} file at {file}; give the corpus, queries and qrels files.")
        return paths[0], paths[1], paths[2]
    if len(paths) != 1:
        raise InputError(f"A retrieval task is a folder or three files (corpus, queries, qrels); got {len(paths)} "
                         "paths.")
    folder = paths[0]
    if not folder.is_dir():
        raise MissingInputError(f"No retrieval folder at {folder}; give a folder with corpus.jsonl, queries.jsonl "
                                f"and {' or '.join(QRELS_NAMES)}, or the three files.")
    missing = [name for name in ("corpus.jsonl", "queries.jsonl") if not (folder / name).is_file()]
    qrels = next((folder / name for name in QRELS_NAMES if (folder / name).is_file()), None)
    if qrels is None:
        others = sorted(f"qrels/{file.name}" for file in folder.glob("qrels/*") if file.is_file())
        hint = f" (it has {', '.join(others)}: give the three files to score one of those)" if others else ""
        missing.append(" or ".join(QRELS_NAMES) + hint)
    if missing:
        raise MissingInputError(f"{folder} is not a BEIR-style retrieval folder: it has no {'; no '.join(missing)}.")
    return folder / "corpus.jsonl", folder / "queries.jsonl", qrels


def read_retrieval(
    corpus_path: str | os.PathLike, queries_path: str | os.PathLike, qrels_path: str | os.PathLike
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """Read a BEIR-style retrieval task.

    Takes corpus.jsonl (`_id`, optional `title`, `text`), queries.jsonl (`_id`, `text`) and qrels: a tsv with the
    header `query-id corpus-id score`, or a `.jsonl` file with those keys. Returns `(corpus, queries, qrels)`:
    document id -> text (title + " " + text when there is a title), query id -> text, and query id -> {document
    id: integer relevance}. Judged documents missing from the corpus are kept (they still count as relevant, as
    in BEIR) with a warning. Raises ValueError naming file:line for a malformed line.
    """
    corpus_path, queries_path, qrels_path = Path(corpus_path), Path(queries_path), Path(qrels_path)
    corpus = _read_texts(corpus_path, with_title=True)
    queries = _read_texts(queries_path, with_title=False)
    qrels: dict[str, dict[str, int]] = {}
    for line, query_value, doc_value, score in _qrels_rows(qrels_path):
        query_id = _id(query_value, qrels_path, line, "query-id")
        doc_id = _id(doc_value, qrels_path, line, "corpus-id")
        grade = _relevance(score, qrels_path, line)
        judged = qrels.setdefault(query_id, {})
        if judged.get(doc_id, grade) != grade:
            raise InputError(f"{qrels_path}:{line}: ({query_id!r}, {doc_id!r}) was judged {judged[doc_id]} before "
                             f"and {grade} here; keep one judgement per pair.")
        judged[doc_id] = grade
    if not qrels:
        raise InputError(f"{qrels_path} holds no judgements; check that it is the right file.")
    missing_docs = {doc for judged in qrels.values() for doc in judged if doc not in corpus}
    if missing_docs:
        logger.warning("%d judged document(s) of %s are not in %s (e.g. %r); they count as relevant but can never "
                       "be retrieved.", len(missing_docs), qrels_path, corpus_path, sorted(missing_docs)[0])
    missing_queries = [query for query in qrels if query not in queries]
    if missing_queries:
        logger.warning("%d query id(s) of %s are not in %s (e.g. %r); they are left out.", len(missing_queries),
                       qrels_path, queries_path, missing_queries[0])
    return corpus, queries, qrels


def top_k(query_embeddings: np.ndarray, doc_embeddings: np.ndarray, k: int, *, query_block: int = 1024,
          doc_block: int = 16384) -> np.ndarray:
    """Row indices of each query's `k` (at most the corpus size) most cosine-similar documents, best first; equal
    scores are ordered by document index. Scores are computed `query_block` x `doc_block` at a time, so memory
    stays bounded whatever the corpus size. Returns an int64 array `(queries, min(k, documents))`."""
    if k < 1:
        raise InputError(f"k must be at least 1; got {k}.")
    queries = query_embeddings / np.linalg.norm(query_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    docs = doc_embeddings / np.linalg.norm(doc_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    k = min(k, len(docs))
    result = np.empty((len(queries), k), dtype=np.int64)
    for q_start in range(0, len(queries), query_block):
        block_queries = queries[q_start : q_start + query_block]
        best_scores = np.empty((len(block_queries), 0), dtype=np.float32)
        best_ids = np.empty((len(block_queries), 0), dtype=np.int64)
        for d_start in range(0, len(docs), doc_block):
            scores = block_queries @ docs[d_start : d_start + doc_block].T
            ids = np.broadcast_to(np.arange(d_start, d_start + scores.shape[1]), scores.shape)
            scores, ids = np.concatenate([best_scores, scores], axis=1), np.concatenate([best_ids, ids], axis=1)
            if scores.shape[1] > k:
                keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                kth = np.take_along_axis(scores, keep, axis=1).min(axis=1, keepdims=True)
                # argpartition picks arbitrarily among scores tied at the k-th place: sort those (rare) rows fully
                for row in np.flatnonzero((scores >= kth).sum(axis=1) > k):
                    keep[row] = np.lexsort((ids[row], -scores[row]))[:k]
                scores, ids = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(ids, keep, axis=1)
            best_scores, best_ids = scores, ids
        order = np.lexsort((best_ids, -best_scores), axis=1)
        result[q_start : q_start + query_block] = np.take_along_axis(best_ids, order, axis=1)
    return result


def ndcg_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    """nDCG@k of one ranking: gain = relevance grade (grades <= 0 gain nothing), discount log2(rank + 1), divided by
    the DCG of the ideal ranking of all judged documents; 0 when none is relevant."""
    dcg = sum(max(relevant.get(doc, 0), 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((grade for grade in relevant.values() if grade > 0), reverse=True)[:k]
    idcg = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    """Recall@k of one ranking: relevant documents (grade > 0) in the top k / all relevant ones; 0 when none is."""
    positives = {doc for doc, grade in relevant.items() if grade > 0}
    return len(positives.intersection(ranked[:k])) / len(positives) if positives else 0.0


def positive_queries(queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> list[str]:
    """The ids of the queries that retrieval is scored on: those with at least one relevant document (grade > 0),
    in the queries' order."""
    return [query for query in queries if any(grade > 0 for grade in qrels.get(query, {}).values())]


def evaluate_retrieval(
    encoder: SupportsEncode,
    corpus: dict[str, str],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    *,
    query_instruction: str | None = None,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    k_values: Sequence[int] = (10, 100),
    batch_tokens: int = 16384,
    show_progress: bool | None = None,
) -> dict[str, float | int]:
    """Score an encoder on a retrieval task (as returned by `read_retrieval`) by exact cosine search.

    Documents are encoded behind `document_prompt`, queries behind `query_instruction` (through the encoder's
    instruction template) or `query_prompt`. Every query with at least one relevant document (grade > 0) is
    ranked against the whole corpus. Returns the mean `ndcg@k` and `recall@k` over those queries for each k
    (raw, in [0, 1]; reports multiply by 100), `queries` (how many were evaluated) and `skipped` (queries without
    a relevant document, left out of the means).
    """
    if not k_values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in k_values):
        raise InputError(f"k_values must be positive integers such as (10, 100); got {k_values!r}.")
    k_values = sorted(set(k_values))
    if not corpus:
        raise InputError("The corpus is empty; there is nothing to retrieve.")
    evaluated = positive_queries(queries, qrels)
    if not evaluated:
        raise InputError("No query has a relevant document (score > 0) in the qrels; check that the queries and "
                         "qrels belong to the same task.")
    doc_ids = list(corpus)
    doc_embeddings = _embed(encoder, [corpus[doc] for doc in doc_ids], "documents", prompt=document_prompt,
                            batch_tokens=batch_tokens, show_progress=show_progress)
    query_embeddings = _embed(encoder, [queries[query] for query in evaluated], "queries",
                              instruction=query_instruction, prompt=query_prompt, batch_tokens=batch_tokens,
                              show_progress=show_progress)
    if query_embeddings.shape[1] != doc_embeddings.shape[1]:
        raise InputError(f"Query embeddings have {query_embeddings.shape[1]} dimensions but document embeddings "
                         f"{doc_embeddings.shape[1]}; encode both with the same model.")
    rankings = [[doc_ids[i] for i in row] for row in top_k(query_embeddings, doc_embeddings, k_values[-1])]
    ranked_and_judged = list(zip(rankings, (qrels[query] for query in evaluated), strict=True))
    result: dict[str, float | int] = {}
    for k in k_values:
        result[f"ndcg@{k}"] = float(np.mean([ndcg_at_k(r, judged, k) for r, judged in ranked_and_judged]))
        result[f"recall@{k}"] = float(np.mean([recall_at_k(r, judged, k) for r, judged in ranked_and_judged]))
    result["queries"], result["skipped"] = len(evaluated), len(queries) - len(evaluated)
    logger.info("Retrieval over %d documents for %d queries (%d without a relevant document skipped): %s",
                len(corpus), len(evaluated), result["skipped"],
                ", ".join(f"{name} {100 * value:.2f}" for name, value in result.items() if "@" in name))
    return result
