"""Benchmark for the spine (issue #2): agreement with and speed against sentence-transformers' evaluators on AppleQA,
the embed-once cache, and peak memory on a synthetic 1,000,000 x 384 corpus.

    python bench/bench_evaluate.py [--shared ../shared] [--skip-memory]

Prints a Markdown report on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DIMS = [384, 256, 128, 64]


def agreement_and_speed(shared: Path) -> None:
    from common import appleqa
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
        SequentialEvaluator,
    )

    from adapter.config import Config
    from adapter.data import load_dataset, relevant
    from adapter.encoder import Encoder, load_model
    from adapter.evaluate import METRICS
    from adapter.pipeline import evaluate_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    ds = load_dataset(appleqa(shared, work))
    qrels = relevant(ds.split("test"))
    model = load_model()  # both sides start from a loaded model

    t = time.perf_counter()
    evaluators = [InformationRetrievalEvaluator(
        queries={q: ds.queries[q] for q in qrels}, corpus={c: ds.doc_text(c) for c in ds.corpus},
        relevant_docs={q: set(r) for q, r in qrels.items()}, truncate_dim=d, name=f"dim_{d}", write_csv=False,
        batch_size=64) for d in DIMS]
    theirs = SequentialEvaluator(evaluators)(model)
    t_st = time.perf_counter() - t

    cache = work / "cache"
    t = time.perf_counter()
    cold_enc = Encoder(model, cache_dir=cache, show_progress=False)
    cfg = Config().replace(split="test", dims=tuple(DIMS))
    cold = evaluate_dataset(ds, cfg, encoder=cold_enc)["base"]
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    warm_enc = Encoder(model, cache_dir=cache, show_progress=False)
    warm = evaluate_dataset(ds, cfg, encoder=warm_enc)["base"]
    t_warm = time.perf_counter() - t

    diffs = [abs(cold[d][m] - theirs[f"dim_{d}_cosine_{m}"]) for d in DIMS for m in METRICS]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"AppleQA, split by query (seed 0): {len(ds.corpus)} chunks, {len(qrels)} test queries, dims {DIMS}\n")
    print("| | sentence-transformers SequentialEvaluator | adapter evaluate (cold cache) | adapter evaluate (warm) |")
    print("|---|---|---|---|")
    print(f"| wall time (s) | {t_st:.2f} | {t_cold:.2f} | {t_warm:.3f} |")
    print(f"| speed-up | 1.0x | {t_st / t_cold:.1f}x | {t_st / t_warm:.0f}x |")
    print(f"| texts embedded | {4 * (len(qrels) + len(ds.corpus))} | {cold_enc.texts_encoded} | "
          f"{warm_enc.texts_encoded} |\n")
    print(f"Largest |difference| over {len(diffs)} metric values (13 metrics x 4 dims): {diffs[worst]:.2e} "
          f"({DIMS[worst // len(METRICS)]}/{METRICS[worst % len(METRICS)]}); "
          f"values equal to 1e-9: {sum(d <= 1e-9 for d in diffs)}/{len(diffs)}; warm-cache results identical to "
          f"cold: {warm == cold}\n")
    print("| dim | ndcg@10 | mrr@10 | accuracy@10 | map@100 |")
    print("|---|---|---|---|---|")
    for d in DIMS:
        print(f"| {d} | {cold[d]['ndcg@10']:.4f} | {cold[d]['mrr@10']:.4f} | {cold[d]['accuracy@10']:.4f} | "
              f"{cold[d]['map@100']:.4f} |")
    print()


def memory_child(n_corpus: int, n_queries: int) -> None:
    """Runs in its own process so its peak resident memory is its own."""
    import numpy as np

    from adapter.evaluate import evaluate

    rng = np.random.default_rng(0)
    corpus = np.empty((n_corpus, 384), dtype=np.float32)
    for s in range(0, n_corpus, 10_000):  # fill in blocks so generation itself stays small
        block = rng.standard_normal((min(10_000, n_corpus - s), 384), dtype=np.float32)
        corpus[s:s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    queries = rng.standard_normal((n_queries, 384), dtype=np.float32)
    cids = [f"d{i:07d}" for i in range(n_corpus)]
    qids = [f"q{i}" for i in range(n_queries)]
    qrels = {q: {cids[j]: 1} for q, j in zip(qids, rng.integers(0, n_corpus, n_queries), strict=True)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    t = time.perf_counter()
    evaluate(queries, corpus, qrels, qids, cids, dims=DIMS)
    took = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"{peak:.2f} {base:.2f} {took:.1f}")


def memory(n_corpus: int = 1_000_000, n_queries: int = 1000) -> None:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(n_corpus), str(n_queries)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    peak, before, took = (float(x) for x in out[-3:])
    print(f"Synthetic corpus {n_corpus:,} x 384 float32 ({n_corpus * 384 * 4 / 1024 ** 3:.2f} GiB of vectors), "
          f"{n_queries:,} queries, dims {DIMS}: evaluate took {took:.1f} s; peak resident memory of the whole "
          f"process {peak:.2f} GiB = {peak * 1.073741824:.2f} GB (before evaluating, with the vectors and ids made: "
          f"{before:.2f} GiB).\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-child", nargs=2, type=int)
    a = p.parse_args()
    if a.memory_child:
        return memory_child(*a.memory_child)
    agreement_and_speed(a.shared)
    if not a.skip_memory:
        memory()


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "evaluate", children=("--memory-child",))
