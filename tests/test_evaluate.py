import math

import numpy as np
import pytest
import torch

from adapter.errors import AdapterError
from adapter.evaluate import METRICS, evaluate, search


def onehot_case():
    """Four chunks over keyword axes: d0=e0, d1=e1, d2=e2, d3=(e0+e1)/sqrt2; query A=e0, query B=e2."""
    corpus = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]], dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    qrels = {"A": {"d3": 1}, "B": {"d1": 1, "d2": 1}}
    return queries, corpus, qrels, ["A", "B"], ["d0", "d1", "d2", "d3"]


def test_metrics_by_hand():
    # A: d0 (1.0), d3 (0.71), then d1, d2 tied at 0 -> relevant d3 at rank 2.
    # B: d2 (1.0), then d0, d1, d3 tied at 0 and ordered by id -> relevant at ranks 1 and 3.
    queries, corpus, qrels, qids, cids = onehot_case()
    m = evaluate(queries, corpus, qrels, qids, cids)[4]
    expected = {
        "accuracy@1": (0 + 1) / 2, "accuracy@3": 1.0, "accuracy@5": 1.0, "accuracy@10": 1.0,
        "precision@1": (0 + 1) / 2, "precision@3": (1 / 3 + 2 / 3) / 2, "precision@5": (1 / 5 + 2 / 5) / 2,
        "precision@10": (1 / 10 + 2 / 10) / 2,
        "recall@1": (0 + 1 / 2) / 2, "recall@3": 1.0, "recall@5": 1.0, "recall@10": 1.0,
        # A: dcg 1/log2(3), ideal 1.  B: dcg 1 + 1/log2(4), ideal 1 + 1/log2(3)
        "ndcg@10": (1 / math.log2(3) + 1.5 / (1 + 1 / math.log2(3))) / 2,
        "mrr@10": (1 / 2 + 1) / 2,
        "map@100": (1 / 2 + (1 + 2 / 3) / 2) / 2,
    }
    assert list(m) == list(METRICS)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key


def test_ties_are_broken_by_corpus_id_not_row():
    corpus = np.ones((3, 2), dtype=np.float32) / np.sqrt(2)  # identical vectors: every score ties
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    ids = ["c", "a", "b"]
    m = evaluate(query, corpus, {"q": {"a": 1}}, ["q"], ids)[2]
    assert m["accuracy@1"] == 1.0  # "a" ranks first although it is row 1
    m = evaluate(query, corpus, {"q": {"c": 1}}, ["q"], ids)[2]
    assert m["mrr@10"] == pytest.approx(1 / 3)  # "c" ranks last although it is row 0


def test_blocked_search_equals_one_block():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(1000, 16)).astype(np.float32)
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    one = search(queries, corpus, 20, dim=12)
    many = search(queries, corpus, 20, dim=12, corpus_block=64, query_block=5)
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_allclose(one[0], many[0], rtol=1e-6)
    # and it is the exact top-20 of the truncated, renormalised vectors
    q = queries[:, :12] / np.linalg.norm(queries[:, :12], axis=1, keepdims=True)
    c = corpus[:, :12] / np.linalg.norm(corpus[:, :12], axis=1, keepdims=True)
    np.testing.assert_array_equal(one[1], np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :20])


def test_small_corpus_pads_with_misses():
    # Four chunks, searched 100 deep: ranks 5-100 are misses, so precision@10 still divides by 10. At dim 2 the
    # vectors are d0=(1,0), d1=(0,1), d2=(0,0), d3=(1,1)/sqrt2; A=(1,0) ranks d0, d3, d1, d2 (relevant d3 2nd);
    # B=(0,0) ties everything, ordered by id: d0, d1, d2, d3 (relevant d1, d2 at 2nd and 3rd).
    queries, corpus, qrels, qids, cids = onehot_case()
    m = evaluate(queries, corpus, qrels, qids, cids, dims=[4, 2])
    assert list(m) == [4, 2]
    expected = {
        "accuracy@1": 0.0, "accuracy@3": 1.0, "accuracy@5": 1.0, "accuracy@10": 1.0,
        "precision@1": 0.0, "precision@3": (1 / 3 + 2 / 3) / 2, "precision@5": (1 / 5 + 2 / 5) / 2,
        "precision@10": (1 / 10 + 2 / 10) / 2,
        "recall@1": 0.0, "recall@3": 1.0, "recall@5": 1.0, "recall@10": 1.0,
        "ndcg@10": (1 / math.log2(3) + (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))) / 2,
        "mrr@10": (1 / 2 + 1 / 2) / 2,
        "map@100": (1 / 2 + (1 / 2 + 2 / 3) / 2) / 2,
    }
    for key, value in expected.items():
        assert m[2][key] == pytest.approx(value, abs=1e-9), key


class _FakeModel:
    """Stands in for a SentenceTransformer in sentence-transformers' own evaluator: returns fixed query vectors."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode_query(self, sentences, truncate_dim=None, **kwargs):
        out = torch.tensor(np.stack([self.vectors[s] for s in sentences]))
        return out[:, :truncate_dim] if truncate_dim else out


@pytest.mark.parametrize("dim", [32, 8])
def test_agrees_with_sentence_transformers_evaluator(dim):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    rng = np.random.default_rng(1)
    n_corpus, n_queries = 300, 60
    corpus = rng.normal(size=(n_corpus, 32)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.normal(size=(n_queries, 32)).astype(np.float32)
    cids = [f"doc{i:03d}" for i in rng.permutation(n_corpus)]  # ids not in row order
    qids = [f"q{i}" for i in range(n_queries)]
    qrels = {q: {cids[j]: 1 for j in rng.choice(n_corpus, size=rng.integers(1, 4), replace=False)} for q in qids}
    qrels["q0"] = {}  # a query without relevant docs is skipped by both

    ours = evaluate(queries, corpus, qrels, qids, cids, dims=[dim])[dim]
    ev = InformationRetrievalEvaluator(
        queries={q: q for q in qids}, corpus={c: c for c in cids},
        relevant_docs={q: set(r) for q, r in qrels.items() if r}, score_functions={"cos": cos_sim},
        truncate_dim=dim, write_csv=False)
    theirs = ev.compute_all_metrics(_FakeModel(dict(zip(qids, queries, strict=True))),
                                    corpus_embeddings=torch.tensor(corpus[:, :dim]))["cos"]
    for metric in METRICS:
        name, k = metric.split("@")
        assert ours[metric] == pytest.approx(theirs[f"{name}@k"][int(k)], abs=1e-9), metric


def test_bad_input():
    queries, corpus, qrels, qids, cids = onehot_case()
    with pytest.raises(AdapterError, match="outside"):
        evaluate(queries, corpus, qrels, qids, cids, dims=[8])
    with pytest.raises(AdapterError, match="not in the corpus"):
        evaluate(queries, corpus, {"A": {"nope": 1}}, qids, cids)
    with pytest.raises(AdapterError, match="no query"):
        evaluate(queries, corpus, {}, qids, cids)
