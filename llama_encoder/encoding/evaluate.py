"""Evaluation: STS (Spearman and Pearson of cosine similarity) and retrieval (nDCG@k, Recall@k).

Works with any object that has `encode(inputs, *, prompt=None, instruction=None, batch_tokens=..., show_progress=...)`
returning float32 embeddings in input order, such as `Encoder`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def read_sts(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """STS pairs `(sentence1, sentence2, score)` from the STS Benchmark's tab-separated files (genre, file, year,
    id, score, sentence1, sentence2[, extra fields]; no header) or from a csv with a header naming `score`,
    `sentence1` and `sentence2`. Errors name file:line."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as handle:
        first = handle.readline()
        handle.seek(0)
        header = [field.strip().lower() for field in next(csv.reader([first]))]
        if {"score", "sentence1", "sentence2"} <= set(header):
            rows = csv.DictReader(handle)
            pairs = []
            for line, row in enumerate(rows, start=2):
                pairs.append((row["sentence1"], row["sentence2"], _score(row["score"], path, line)))
            return _nonempty(pairs, path)
        pairs = []
        for line, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or row == [""]:
                continue
            if len(row) < 7:
                raise ValueError(
                    f"{path}:{line}: expected 7 tab-separated fields (genre, file, year, id, score, sentence1, "
                    f"sentence2); found {len(row)}. Use the STS Benchmark format or a csv with a score, sentence1, "
                    "sentence2 header."
                )
            pairs.append((row[5], row[6], _score(row[4], path, line)))
    return _nonempty(pairs, path)


def _score(value: str, path: Path, line: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path}:{line}: the score {value!r} is not a number.") from None


def _nonempty(pairs: list, path: Path) -> list:
    if not pairs:
        raise ValueError(f"{path} holds no STS pairs.")
    return pairs


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return (a * b).sum(axis=1)


def evaluate_sts(encoder, pairs: Sequence[tuple[str, str, float]], *, prompt: str | None = None,
                 batch_tokens: int = 16384) -> dict:
    """Spearman and Pearson correlations (in [-1, 1]; reports usually multiply by 100) between the cosine
    similarity of each pair's embeddings and its gold score. Each distinct sentence is encoded once."""
    if not pairs:
        raise ValueError("No STS pairs to evaluate.")
    sentences = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    index = {s: i for i, s in enumerate(sentences)}
    embeddings = np.asarray(encoder.encode(sentences, prompt=prompt, batch_tokens=batch_tokens, show_progress=False))
    left = embeddings[[index[a] for a, _, _ in pairs]]
    right = embeddings[[index[b] for _, b, _ in pairs]]
    similarity, gold = _cosine(left, right), [score for _, _, score in pairs]
    return {"spearman": spearman(similarity, gold), "pearson": pearson(similarity, gold), "n": len(pairs)}


def _read_jsonl(path: Path, required: Sequence[str]) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line}: not valid JSON ({exc.msg}).") from None
            missing = [field for field in required if field not in record]
            if not isinstance(record, dict) or missing:
                raise ValueError(f"{path}:{line}: missing field(s) {', '.join(missing) or 'all'}.")
            records.append(record)
    return records


def read_retrieval(corpus_path, queries_path, qrels_path) -> tuple[dict[str, str], dict[str, str],
                                                                   dict[str, dict[str, int]]]:
    """A BEIR-style task: corpus.jsonl (`_id`, optional `title`, `text`), queries.jsonl (`_id`, `text`) and qrels
    (tsv with a `query-id corpus-id score` header, or jsonl with those keys). Returns `(corpus, queries, qrels)`:
    id -> text (title and text joined), id -> text, query id -> {document id: relevance}."""
    corpus_path, queries_path, qrels_path = Path(corpus_path), Path(queries_path), Path(qrels_path)
    corpus = {}
    for record in _read_jsonl(corpus_path, ("_id", "text")):
        title = record.get("title") or ""
        corpus[str(record["_id"])] = f"{title} {record['text']}".strip() if title else record["text"]
    queries = {str(r["_id"]): r["text"] for r in _read_jsonl(queries_path, ("_id", "text"))}
    qrels: dict[str, dict[str, int]] = {}
    if qrels_path.suffix == ".jsonl":
        rows = [(r["query-id"], r["corpus-id"], r["score"], line) for line, r in
                enumerate(_read_jsonl(qrels_path, ("query-id", "corpus-id", "score")), start=1)]
    else:
        with qrels_path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
                raise ValueError(f"{qrels_path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score'.")
            rows = []
            for line, row in enumerate(reader, start=2):
                if len(row) < 3:
                    raise ValueError(f"{qrels_path}:{line}: expected query-id, corpus-id and score.")
                rows.append((row[0], row[1], row[2], line))
    for query_id, doc_id, score, line in rows:
        try:
            relevance = int(float(score))
        except ValueError:
            raise ValueError(f"{qrels_path}:{line}: the score {score!r} is not a number.") from None
        if str(doc_id) not in corpus:
            raise ValueError(f"{qrels_path}:{line}: document {doc_id!r} is not in {corpus_path}.")
        qrels.setdefault(str(query_id), {})[str(doc_id)] = relevance
    return corpus, queries, qrels


def _top_k(query_embeddings: np.ndarray, doc_embeddings: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Indices of each query's k most cosine-similar documents, best first; documents scored blockwise."""
    queries = query_embeddings / np.linalg.norm(query_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    docs = doc_embeddings / np.linalg.norm(doc_embeddings, axis=1, keepdims=True).clip(min=1e-12)
    k = min(k, len(docs))
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(docs), block):
        scores = queries @ docs[start : start + block].T
        ids = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        scores, ids = np.concatenate([best_scores, scores], 1), np.concatenate([best_ids, ids], 1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    return best_ids


def ndcg_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((r for r in relevant.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(rank + 2) for rank, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    positives = {doc for doc, r in relevant.items() if r > 0}
    return len(positives & set(ranked[:k])) / len(positives)


def evaluate_retrieval(encoder, corpus: dict[str, str], queries: dict[str, str], qrels: dict[str, dict[str, int]],
                       *, query_instruction: str | None = None, query_prompt: str | None = None,
                       k_values: Sequence[int] = (10, 100), batch_tokens: int = 16384) -> dict:
    """Exact cosine retrieval of every judged query over the corpus: mean `ndcg@k` and `recall@k` for each k,
    plus `queries` (evaluated) and `skipped` (queries without a relevant document)."""
    judged = [q for q in queries if any(r > 0 for r in qrels.get(q, {}).values())]
    if not judged:
        raise ValueError("No query has a relevant document in the qrels; nothing to evaluate.")
    doc_ids = list(corpus)
    doc_embeddings = np.asarray(encoder.encode([corpus[d] for d in doc_ids], batch_tokens=batch_tokens,
                                               show_progress=False))
    query_embeddings = np.asarray(encoder.encode([queries[q] for q in judged], instruction=query_instruction,
                                                 prompt=query_prompt, batch_tokens=batch_tokens, show_progress=False))
    top = _top_k(query_embeddings, doc_embeddings, max(k_values))
    result = {"queries": len(judged), "skipped": len(queries) - len(judged)}
    for k in k_values:
        ranked = [[doc_ids[i] for i in row] for row in top]
        result[f"ndcg@{k}"] = float(np.mean([ndcg_at_k(r, qrels[q], k) for r, q in zip(ranked, judged, strict=True)]))
        result[f"recall@{k}"] = float(np.mean([recall_at_k(r, qrels[q], k) for r, q in zip(ranked, judged,
                                                                                             strict=True)]))
    return result
