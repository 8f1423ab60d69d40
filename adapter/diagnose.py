"""Where an adapter helps and where it hurts, on arrays: the base's headroom, test questions about chunks the adapter
trained on against questions about chunks it never saw, and the questions that moved most with the chunks that moved.

Every ranking goes through the one ranking function (``adapter.evaluate.search``); per-question scores come from the
one judge (``evaluate(..., per_query=True)``), so these numbers agree with the report's tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from adapter.data import Dataset, Qrels, fingerprint, relevant
from adapter.evaluate import PRIMARY_METRIC, search

if TYPE_CHECKING:
    from adapter.systems import System

HEADROOM_K = 100  # how deep the base's ranking is read for headroom: "never in the top 100"
MOVERS = 5  # questions listed each way


def _ranks(query_vectors: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """(n, min(k, N)) corpus rows of each query's top ``k`` (ties broken by row, as the judge does by id order)."""
    return search(query_vectors, corpus, k)[1]


def headroom(query_vectors: np.ndarray, corpus: np.ndarray, qrels: Qrels, query_ids: Sequence[str],
             corpus_ids: Sequence[str], k: int = HEADROOM_K) -> dict[str, Any]:
    """How much a query-side change can gain at most: the base's recall@k, and the share of questions whose relevant
    chunks base never ranks in its top ``k`` (those a reranker over the top ``k`` cannot save either)."""
    row = {c: i for i, c in enumerate(corpus_ids)}
    top = _ranks(query_vectors, corpus, k)
    recall, never = [], []
    for i, q in enumerate(query_ids):
        rel = {row[c] for c in qrels[q]}
        found = len(rel & set(top[i].tolist()))
        recall.append(found / len(rel))
        never.append(found == 0)
    return {"k": min(k, len(corpus_ids)), "recall": float(np.mean(recall)), "never": float(np.mean(never)),
            "queries": len(query_ids)}


def seen_unseen(base: np.ndarray, system: np.ndarray, qrels: Qrels, query_ids: Sequence[str],
                trained_chunks: set[str]) -> dict[str, dict[str, float]]:
    """Per-question scores (aligned with ``query_ids``) of base and a system, split into questions whose relevant
    chunks all had training questions ("seen") and questions about chunks none of which had ("unseen")."""
    out = {}
    for name, keep in (("seen", lambda r: set(r) <= trained_chunks), ("unseen", lambda r: not set(r) & trained_chunks)):
        mask = np.array([keep(qrels[q]) for q in query_ids], dtype=bool)
        if mask.any():
            b, s = float(base[mask].mean()), float(system[mask].mean())
            out[name] = {"queries": int(mask.sum()), "base": b, "system": s, "change": (s - b) / b if b else 0.0}
    return out


def movers(base_vectors: np.ndarray, base_corpus: np.ndarray, system_vectors: np.ndarray, system_corpus: np.ndarray,
           base: np.ndarray, system: np.ndarray, qrels: Qrels, query_ids: Sequence[str], corpus_ids: Sequence[str],
           *, n: int = MOVERS, k: int = HEADROOM_K) -> dict[str, list[dict[str, Any]]]:
    """The ``n`` questions whose score rose most and the ``n`` that fell most (ties by question order), each with
    its relevant chunks' ranks under base and the system (None: below the top ``k``) and both systems' top chunk.
    Each side searches its own corpus vectors (an adapter shares the base's; a fine-tuned model has its own)."""
    delta = np.asarray(system, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    order = np.argsort(-delta, kind="stable")
    picks = {"up": [i for i in order[:n] if delta[i] > 0], "down": [i for i in order[::-1][:n] if delta[i] < 0]}
    rows = sorted({i for p in picks.values() for i in p})
    if not rows:
        return {"up": [], "down": []}
    top_b = _ranks(base_vectors[rows], base_corpus, k)
    top_s = _ranks(system_vectors[rows], system_corpus, k)
    at = {r: j for j, r in enumerate(rows)}
    row = {c: i for i, c in enumerate(corpus_ids)}

    def rank(top: np.ndarray, c: str) -> int | None:
        hit = np.flatnonzero(top == row[c])
        return int(hit[0]) + 1 if len(hit) else None

    def describe(i: int) -> dict[str, Any]:
        j = at[i]
        return {"query_id": query_ids[i], "base": float(base[i]), "system": float(system[i]),
                "delta": float(delta[i]),
                "chunks": [{"id": c, "base_rank": rank(top_b[j], c), "system_rank": rank(top_s[j], c)}
                           for c in sorted(qrels[query_ids[i]])],
                "top_base": corpus_ids[top_b[j][0]], "top_system": corpus_ids[top_s[j][0]]}

    return {way: [describe(i) for i in p] for way, p in picks.items()}


def insights(dataset: Dataset, systems: Mapping[str, System], per_query: dict, split: str) -> dict[str, Any]:
    """Headroom of the base, and for each system scored at the base's full dim (none when the base was not): seen
    against unseen test questions (when it records the training split it learned from, and that split is this
    dataset's), its validation estimates, and the questions that moved most with their text. ``systems`` and
    ``per_query`` are compare's (``adapter.systems.build_systems`` and ``score(..., per_query=True)``)."""
    qrels = relevant(dataset.split(split))
    qids = list(qrels)
    texts = [dataset.queries[q] for q in qids]
    base_system = systems["base"]
    full = base_system.encoder.dim
    base_q = base_system.encode_queries(texts)
    cids, corpus = base_system.corpus.read(dataset, base_system.encoder)
    out: dict[str, Any] = {"headroom": headroom(base_q, corpus, qrels, qids, cids), "systems": {}}
    if full not in per_query["base"]:  # scored at smaller dims only (--dims 128,64): nothing to compare at full
        return out
    base = per_query["base"][full][PRIMARY_METRIC]
    snippet = lambda c: " ".join(dataset.doc_text(c).split())[:160]  # noqa: E731
    for name, system in systems.items():
        if name == "base" or full not in per_query[name] or system.encoder.dim != full:
            continue
        sys_cids, sys_corpus = system.corpus.read(dataset, system.encoder)
        if list(sys_cids) != list(cids):
            continue
        score = per_query[name][full][PRIMARY_METRIC]
        moved = movers(base_q, corpus, system.encode_queries(texts), sys_corpus, base, score, qrels, qids, cids)
        for m in (m for way in moved.values() for m in way):
            m["text"] = dataset.queries[m["query_id"]]
            m["top_base_text"], m["top_system_text"] = snippet(m["top_base"]), snippet(m["top_system"])
        entry: dict[str, Any] = {"movers": moved}
        meta = system.meta
        trained_on, fp = meta.get("trained_on"), meta.get("data_fingerprint")
        if trained_on in dataset.qrels and fp and fingerprint(dataset, trained_on) == fp:
            trained = {c for r in relevant(dataset.split(trained_on)).values() for c in r}
            entry["seen_unseen"] = seen_unseen(base, score, qrels, qids, trained)
            entry["trained_chunks"] = len(trained)
        for key in ("recipe", "objective", "coverage", "estimates"):
            if meta.get(key) is not None:
                entry[key] = meta[key]
        out["systems"][name] = entry
    return out
