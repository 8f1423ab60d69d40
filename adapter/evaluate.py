"""The one judge: exact inner-product search (``search``) and sentence-transformers' IR metrics, at every Matryoshka
dim.

It is fed arrays (query vectors, corpus vectors, qrels), never text, and imports neither the trainer nor the
fine-tuner, so every system (base, adapter, fine-tuned, any other model) is scored the same way. Metric names and
definitions follow sentence-transformers' InformationRetrievalEvaluator: ``accuracy@k``, ``precision@k``,
``recall@k`` for k in 1/3/5/10, ``ndcg@10``, ``mrr@10``, ``map@100``; only queries with a positive judgement count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from adapter.config import PRIMARY_METRIC, Config, ReportConfig, default_dims
from adapter.data import Qrels, relevant
from adapter.encoder import truncate
from adapter.errors import AdapterError

logger = logging.getLogger(__name__)

CORPUS_BLOCK, QUERY_BLOCK = 16384, 1024  # exact search scores this many chunks x queries at once
AT_K = (1, 3, 5, 10)  # cut-offs for accuracy, precision and recall
MRR_K, NDCG_K, MAP_K = 10, 10, 100
METRICS = (*(f"{m}@{k}" for m in ("accuracy", "precision", "recall") for k in AT_K),
           f"ndcg@{NDCG_K}", f"mrr@{MRR_K}", f"map@{MAP_K}")
TOP_K = max(*AT_K, MRR_K, NDCG_K, MAP_K)  # how deep every query is searched

Results = dict[int, dict[str, float]]  # dim -> metric -> value


class Reorder(Protocol):
    """A second stage (``adapter.rerank.ListReranker``): reorders the first ``k`` of each query's ranked corpus rows,
    given the first stage's scores of those rows too (a reranker may fuse them with its own)."""

    k: int  # how many of the first stage's candidates it reorders

    def __call__(self, query_ids: Sequence[str], rows: np.ndarray, scores: np.ndarray) -> np.ndarray: ...


def resolve_dims(dims: Sequence[int] | None, full_dim: int) -> list[int]:
    """Validate requested Matryoshka dims against the model (default: full dim and the standard ones below)."""
    if not dims:
        return list(default_dims(full_dim))
    for d in dims:
        if d <= 0:
            raise AdapterError(f"evaluate.dims: {d} is not a positive dimension")
        if d > full_dim:
            raise AdapterError(f"evaluate.dims: {d} is above the model's dimension {full_dim}")
    return list(dict.fromkeys(dims))


def search(queries: np.ndarray, corpus: np.ndarray, k: int, *, dim: int | None = None,
           tie_rank: np.ndarray | None = None, corpus_block: int = CORPUS_BLOCK,
           query_block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product; the project's one ranking function.

    Both sides are truncated to ``dim`` and renormalised block by block, so memory stays flat however large the
    corpus (a memory-mapped one is only read). Each (query block x corpus block) is one matrix product and a
    ``torch.topk``: the same exhaustive search as ``faiss.knn``, whose per-score heap made it 3-4x slower on these
    blocks (bench/bench_scale.py times both). Equal scores are ordered by ``tie_rank`` of the corpus row (default:
    row number), lowest first. Returns (scores, rows), each (n_queries, min(k, n_corpus)).
    """
    n_corpus = corpus.shape[0]
    dim = dim or corpus.shape[1]
    k = min(k, n_corpus)
    if tie_rank is None:
        tie_rank = np.arange(n_corpus)
    q_all = truncate(queries, dim)
    out_scores = np.empty((len(q_all), k), dtype=np.float32)
    out_rows = np.empty((len(q_all), k), dtype=np.int64)
    with torch.inference_mode():
        for qs in range(0, len(q_all), query_block):
            q = torch.from_numpy(q_all[qs:qs + query_block])  # (Bq, dim)
            best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
            best_r = np.empty((len(q), 0), dtype=np.int64)
            for cs in range(0, n_corpus, corpus_block):
                block = torch.from_numpy(truncate(corpus[cs:cs + corpus_block], dim))  # (Bc, dim)
                fetch = min(k + 8, len(block))  # a little extra so ties at the cut-off are kept for the tie-break
                s, r = torch.topk(q @ block.T, fetch, dim=1)  # (Bq, fetch) each
                s = np.concatenate([best_s, s.numpy()], axis=1)
                r = np.concatenate([best_r, r.numpy() + cs], axis=1)
                order = np.lexsort((tie_rank[r], -s), axis=1)[:, :k + 8]
                best_s, best_r = np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)
            out_scores[qs:qs + query_block], out_rows[qs:qs + query_block] = best_s[:, :k], best_r[:, :k]
    return out_scores, out_rows


def id_rank(corpus_ids: Sequence[str]) -> np.ndarray:
    """Each corpus row's rank by id: the judge's tie-break (``search``'s ``tie_rank``), as in sentence-transformers."""
    rank = np.empty(len(corpus_ids), dtype=np.int64)
    rank[np.argsort(np.asarray(corpus_ids, dtype=object), kind="stable")] = np.arange(len(corpus_ids))
    return rank


def is_relevant(codes: np.ndarray, relevant_codes: np.ndarray) -> np.ndarray:
    """Membership of (query row, corpus row) pair codes ``q * n_corpus + c`` in the sorted, unique codes of the
    relevant pairs: a binary search, so no sort per call as ``np.isin`` does. The judge and the trainer's negative
    sampling share it."""
    at = np.minimum(np.searchsorted(relevant_codes, codes), len(relevant_codes) - 1)
    return relevant_codes[at] == codes


def metrics_from_hits(hits: np.ndarray, n_relevant: np.ndarray, *, per_query: bool = False) -> dict[str, float]:
    """IR metrics from a (n_queries, depth) boolean matrix of ranked hits and each query's count of relevant docs.

    ``per_query=True`` returns each metric's (n_queries,) float64 values instead of their mean (for paired tests).
    """
    agg = (lambda v: np.asarray(v, dtype=np.float64)) if per_query else (lambda v: float(v.mean()))  # noqa: E731
    depth = hits.shape[1]
    if depth < TOP_K:  # a corpus smaller than the search depth: pad with misses
        hits = np.pad(hits, ((0, 0), (0, TOP_K - depth)))
    h = hits.astype(np.float64)
    out: dict[str, float] = {}
    for k in AT_K:
        n_hit = h[:, :k].sum(1)
        out[f"accuracy@{k}"] = agg(n_hit > 0)
        out[f"precision@{k}"] = agg(n_hit / k)
        out[f"recall@{k}"] = agg(n_hit / n_relevant)
    discounts = 1.0 / np.log2(np.arange(2, NDCG_K + 2))  # (NDCG_K,)
    dcg = h[:, :NDCG_K] @ discounts
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, NDCG_K) - 1]
    out[f"ndcg@{NDCG_K}"] = agg(dcg / ideal)
    first = np.where(hits[:, :MRR_K].any(1), hits[:, :MRR_K].argmax(1), -1)
    out[f"mrr@{MRR_K}"] = agg(np.where(first >= 0, 1.0 / (np.maximum(first, 0) + 1), 0.0))
    precision_at = np.cumsum(h[:, :MAP_K], 1) / np.arange(1, MAP_K + 1)
    out[f"map@{MAP_K}"] = agg((precision_at * h[:, :MAP_K]).sum(1) / np.minimum(MAP_K, n_relevant))
    return {m: out[m] for m in METRICS}


def evaluate_ranked(ranked: Sequence[Sequence[str]], qrels: Qrels, query_ids: Sequence[str], *,
                    per_query: bool = False) -> dict[str, float]:
    """The judge's metrics of rankings made elsewhere (a store's own search): each of ``query_ids`` (every one with a
    positive judgement) with its corpus ids, best first; the first ``TOP_K`` count and an id naming no relevant chunk
    is a miss. ``per_query`` as in ``evaluate``."""
    qrels = relevant(qrels)
    found = np.zeros((len(query_ids), TOP_K), dtype=bool)
    for i, (q, names) in enumerate(zip(query_ids, ranked, strict=True)):
        top = list(names)[:TOP_K]
        found[i, :len(top)] = [n in qrels[q] for n in top]
    return metrics_from_hits(found, np.array([len(qrels[q]) for q in query_ids]), per_query=per_query)


def evaluate(query_vectors: np.ndarray, corpus_vectors: np.ndarray, qrels: Qrels, query_ids: Sequence[str],
             corpus_ids: Sequence[str], dims: Sequence[int] | None = None, *, per_query: bool = False,
             rerank: Reorder | None = None, tie_rank: np.ndarray | None = None) -> Results:
    """Score one system: its query and corpus vectors (rows in the order of the ids) against ``qrels``.

    Returns ``{dim: {metric: value}}`` for each dimension in ``dims`` (default: the full dimension). Ties are broken
    by corpus id, as in sentence-transformers. ``per_query=True``: each value is instead an (n,) array over the scored
    queries (those of ``query_ids`` with a positive judgement, in that order), whose mean is the metric.
    ``rerank``: a second stage reorders each query's first ``rerank.k`` results before they are scored.
    ``tie_rank``: ``id_rank(corpus_ids)`` when the caller scores many times against one corpus (seconds at 10^6 ids).
    """
    full = corpus_vectors.shape[1]
    if query_vectors.shape[1] != full:
        raise AdapterError(f"query vectors have dimension {query_vectors.shape[1]}, corpus vectors {full}")
    if len(query_vectors) != len(query_ids) or len(corpus_vectors) != len(corpus_ids):
        raise AdapterError("vector counts do not match id counts")
    dims = list(dims or [full])
    for d in dims:
        if not 0 < d <= full:
            raise AdapterError(f"dimension {d} is outside 1..{full} (the vectors' dimension)")
    qrels = relevant(qrels)
    q_row = {q: i for i, q in enumerate(query_ids)}
    scored = [q for q in query_ids if q in qrels]
    if not scored:
        raise AdapterError("no query has a relevant document in the qrels")
    needed = {c for q in scored for c in qrels[q]}  # rows of judged chunks only: no million-entry dict
    c_row = {c: i for i, c in enumerate(corpus_ids) if c in needed}
    missing = next((c for q in scored for c in qrels[q] if c not in c_row), None)
    if missing is not None:
        raise AdapterError(f"qrels name corpus id {missing!r} that is not in the corpus")
    queries = query_vectors[[q_row[q] for q in scored]]
    # relevant (query, corpus row) pairs as single integers, for a vectorised membership test
    n = len(corpus_ids)
    pairs = np.unique(np.array([i * n + c_row[c] for i, q in enumerate(scored) for c in qrels[q]], dtype=np.int64))
    n_relevant = np.array([len(qrels[q]) for q in scored])
    tie_rank = id_rank(corpus_ids) if tie_rank is None else tie_rank
    results: Results = {}
    depth = max(TOP_K, rerank.k) if rerank is not None else TOP_K
    for d in dims:
        scores, rows = search(queries, corpus_vectors, depth, dim=d, tie_rank=tie_rank)
        if rerank is not None:
            rows = rerank(scored, rows, scores)[:, :TOP_K]
        hits = is_relevant(np.arange(len(scored))[:, None] * n + rows, pairs)
        results[d] = metrics_from_hits(hits, n_relevant, per_query=per_query)
        logger.debug("dim %d: %s %.4f over %d queries", d, PRIMARY_METRIC, np.mean(results[d][PRIMARY_METRIC]),
                     len(scored))
    return results


def paired_bootstrap(base: np.ndarray, system: np.ndarray, *, samples: int = ReportConfig.bootstrap_samples,
                     seed: int = Config.seed, level: float = ReportConfig.level) -> tuple[float, float, float]:
    """Mean per-query change (system − base) and its percentile interval: the queries are resampled with replacement
    ``samples`` times, the same resample for both systems (paired). Returns (change, low, high)."""
    delta = np.asarray(system, dtype=np.float64) - np.asarray(base, dtype=np.float64)  # (n,)
    if delta.ndim != 1 or not len(delta):
        raise AdapterError("paired bootstrap needs two equal-length, non-empty lists of per-query values")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for s in range(0, samples, 256):  # blocks keep memory at 256 x n indices
        idx = rng.integers(0, len(delta), size=(min(256, samples - s), len(delta)))
        means[s:s + len(idx)] = delta[idx].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(delta.mean()), float(low), float(high)
