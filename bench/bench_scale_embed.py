"""Embedding at scale on CPU (issue #14 part 3): the bundled MiniLM over every query and chunk of AppleQA and waterops,
as one float32 process (the reference), other thread settings, sentence-transformers' multi-process pool (the
product's `--processes 2` path: adapter.backends.SentenceTransformerBackend with a pool) and dynamic int8 quantisation
(torch.ao.quantization.quantize_dynamic on every nn.Linear). For each: texts/s, minimum and mean cosine to the float32
vectors, and test ndcg@10 of the base model (no adapter) on both datasets, query split, seeds 0..4, with the vectors
that variant made.

    flock /work/coord/bench.lock nice -n 10 python bench/bench_scale_embed.py [--shared ../shared] [--seeds 0,1,2,3,4]

Prints Markdown on stdout (BENCHMARKS.md quotes it). No cache is used: every variant embeds every text. The machine
is shared: times are noisy, ratios measured side by side in one run less so.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def datasets(shared: Path, work: Path, seeds: list[int]) -> dict[str, list[Path]]:
    """AppleQA and waterops as dataset folders, one per split seed (query split, 20% test)."""
    from adapter.data import convert, split_dataset

    out: dict[str, list[Path]] = {"AppleQA": [], "waterops": []}
    for seed in seeds:
        apple = work / f"appleqa-{seed}"
        convert(shared / "data" / "appleqa" / "apple_QA_dataset.json", apple)
        water = work / f"waterops-{seed}"
        shutil.copytree(ROOT / "data" / "waterops", water)
        for name, folder in (("AppleQA", apple), ("waterops", water)):
            split_dataset(folder, by="query", test_fraction=0.2, seed=seed)
            out[name].append(folder)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--queries", type=int, default=1200, help="queries per dataset, a seeded sample (0: all); test "
                    "ndcg@10 is over the sampled queries in each seed's test split")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]

    import torch

    from adapter.backends import SentenceTransformerBackend, load_model
    from adapter.data import load_dataset
    from adapter.evaluate import evaluate

    work = Path(tempfile.mkdtemp(prefix="bench-scale-embed-"))
    try:
        folders = datasets(a.shared, work, seeds)
        first = {name: load_dataset(fs[0]) for name, fs in folders.items()}
        # every text once: MiniLM has no prompts, so a query's vector is its text's document vector
        texts: list[str] = []
        spans: dict[str, tuple[list[str], list[str], slice, slice]] = {}
        for name, ds in first.items():
            qids, cids = list(ds.queries), list(ds.corpus)
            if 0 < a.queries < len(qids):
                keep = np.random.default_rng(0).choice(len(qids), a.queries, replace=False)
                qids = [qids[i] for i in sorted(keep)]
            q0 = len(texts)
            texts += [ds.queries[q] for q in qids]
            c0 = len(texts)
            texts += [ds.doc_text(c) for c in cids]
            spans[name] = (qids, cids, slice(q0, c0), slice(c0, len(texts)))
        model = load_model()
        ref = SentenceTransformerBackend(model, show_progress=False)
        assert ref.role_tag("query") == ref.role_tag("document"), "the model has prompts: embed roles apart"
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

        def in_process(m, threads: int):
            backend = SentenceTransformerBackend(model, show_progress=False)
            backend.model = m  # a quantised model has no fingerprint of its own; nothing here is cached

            def run() -> np.ndarray:
                torch.set_num_threads(threads)
                return backend.embed(texts)
            return run

        def pooled(n: int):
            backend = SentenceTransformerBackend(model, show_progress=False, pool=["cpu"] * n, pool_min_texts=0)

            def run() -> np.ndarray:
                torch.set_num_threads(2)
                return backend.embed(texts)
            return run

        cores = len(os.sched_getaffinity(0))
        variants = [("float32, 1 process x 2 threads (reference)", in_process(model, 2)),
                    ("float32, 1 process x 1 thread", in_process(model, 1)),
                    (f"float32, 2 processes x {max(1, cores // 2)} thread (`--processes 2`, pool start included)",
                     pooled(2)),
                    ("dynamic int8, 1 process x 2 threads", in_process(int8, 2)),
                    ("dynamic int8, 1 process x 1 thread", in_process(int8, 1))]
        in_process(model, 2)()  # warm-up: first-call allocations and page faults do not count against the reference
        t = time.perf_counter()
        pool = model.start_multi_process_pool(["cpu", "cpu"])
        model.stop_multi_process_pool(pool)
        pool_start = time.perf_counter() - t

        rows = []
        reference: np.ndarray | None = None
        ref_ndcg: dict[str, np.ndarray] = {}
        for label, run in variants:
            t = time.perf_counter()
            vectors = run()
            seconds = time.perf_counter() - t
            if reference is None:
                reference = vectors
            cos = (vectors * reference).sum(1)
            ndcg: dict[str, np.ndarray] = {}
            for name, (qids, cids, qs, cs) in spans.items():
                values = []
                for folder in folders[name]:
                    ds = load_dataset(folder)
                    test = ds.split("test")
                    values.append(evaluate(vectors[qs], vectors[cs], test, qids, cids)[vectors.shape[1]]["ndcg@10"])
                ndcg[name] = np.array(values)
            if not ref_ndcg:
                ref_ndcg = ndcg
            rows.append((label, seconds, cos, ndcg))
            print(f"done: {label} {seconds:.1f} s", file=sys.stderr, flush=True)
        torch.set_num_threads(2)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sizes = {name: (len(q), len(c)) for name, (q, c, _, _) in spans.items()}
    described = ", ".join(f"{name} {q} queries (of {len(first[name].queries)}, a seeded sample) and all {c} chunks"
                          for name, (q, c) in sizes.items())
    print(f"{len(texts)} texts: {described}; batch 64, {cores} cores; torch {torch.__version__}. Starting and "
          f"stopping a pool of 2 CPU workers alone: {pool_start:.1f} s.\n")
    print("| variant | seconds | texts/s | speed vs reference | min cosine | mean cosine | AppleQA test ndcg@10 "
          "seed 0 (Δ) | Δ mean ± sd, seeds " + a.seeds + " | waterops test ndcg@10 seed 0 (Δ) | Δ mean ± sd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_seconds = rows[0][1]
    for label, seconds, cos, ndcg in rows:
        cells = []
        for name in ("AppleQA", "waterops"):
            d = ndcg[name] - ref_ndcg[name]
            sd = d.std(ddof=1) if len(d) > 1 else 0.0
            cells += [f"{ndcg[name][0]:.4f} ({d[0]:+.4f})", f"{d.mean():+.4f} ± {sd:.4f}"]
        print(f"| {label} | {seconds:.1f} | {len(texts) / seconds:.0f} | {base_seconds / seconds:.2f}x | "
              f"{cos.min():.4f} | {cos.mean():.4f} | " + " | ".join(cells) + " |")
    worst = {label: max(abs(ndcg[n] - ref_ndcg[n]).max() for n in ndcg) for label, _, _, ndcg in rows}
    print()
    for label, w in worst.items():
        if "int8" in label:
            verdict = "within" if w <= 0.005 else "outside"
            print(f"- {label}: largest |Δ test ndcg@10| over both datasets and every seed {w:.4f}: {verdict} the 0.005 "
                  "bound.")


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "scale_embed")
