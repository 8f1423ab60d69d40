"""`adapter evaluate --store-search` on a store too large to read out (issue #11): a 1,000,000-vector FAISS IVF-PQ file
built here (AppleQA's 215 chunk vectors under their corpus ids, and 999,785 distractors: each a chunk vector with
noise, renormalised, so every chunk has thousands of near neighbours), scored with AppleQA's test queries (query
split, seed 0) through the index's own search. Peak memory (each process's own max RSS, as the kernel counts it for
the one child GNU time runs: never this script, which holds the index it built) of:

- `adapter evaluate` of the same dataset with no store: what the command costs on its own;
- a Python process that only loads the index: the loaded index's own size;
- `adapter evaluate --index FILE --store-search`: scored through the index's search;
- `adapter evaluate --index FILE`: every vector read out (what --store-search avoids).

and the recall@10 of the index's own search against exact search over the float vectors it was built from (kept
block by block while building: the test queries' exact top-10).

    python bench/bench_store_search.py [--shared ../shared] [--n 1000000] [--nlist 1024] [--pq 48]

Prints Markdown on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
BLOCK = 100_000


def build(path: Path, ids: list[str], chunks, n: int, nlist: int, pq: int, seed: int, queries
          ) -> tuple[float, object]:
    """The IVF-PQ file, trained on a sample, filled a block at a time (the full float array never exists here); and,
    block by block, each query's exact top-10 ids by inner product over the float vectors before PQ coded them."""
    import faiss
    import numpy as np

    rng = np.random.default_rng(seed)
    d = chunks.shape[1]
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.empty((len(queries), 0), dtype=np.int64)

    def distractors(count: int):
        base = chunks[rng.integers(0, len(chunks), count)]
        v = base + rng.normal(scale=0.045, size=base.shape).astype(np.float32)  # cosine ~0.7 to its chunk
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def add(vectors, block_ids) -> None:
        nonlocal best_s, best_i
        index.add_with_ids(vectors, block_ids)
        s, r = faiss.knn(queries, vectors, min(10, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        s, i = np.concatenate([best_s, s], 1), np.concatenate([best_i, block_ids[r]], 1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)

    t = time.monotonic()
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(np.concatenate([chunks, distractors(min(n, 60 * nlist))]))
    add(chunks, np.array([int(i) for i in ids], dtype=np.int64))
    next_id = 10**7  # distractor ids: far from any corpus id
    left = n - len(chunks)
    while left > 0:
        count = min(BLOCK, left)
        add(distractors(count), np.arange(next_id, next_id + count, dtype=np.int64))
        next_id += count
        left -= count
    faiss.write_index(index, str(path))
    return time.monotonic() - t, best_i


def recall_at_10(path: Path, queries, exact, nprobe: int) -> float:
    """Mean share of each query's exact top-10 (float vectors) that the index's own search finds, at ``nprobe``."""
    import faiss
    import numpy as np

    index = faiss.read_index(str(path))
    faiss.extract_index_ivf(index).nprobe = nprobe
    _, got = index.search(queries, 10)
    return float(np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got.tolist(), exact.tolist(), strict=True)]))


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Max RSS of a child process in MB (GNU time's %M, in KB), and its output."""
    r = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    kb = int(re.search(r"PEAK_KB (\d+)", r.stderr).group(1))
    return kb / 1024, r.stdout + r.stderr


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--pq", type=int, default=48, help="PQ sub-quantizers (bytes per vector)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-read-out", action="store_true", help="do not run the read-everything comparison")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from common import appleqa_chunk_vectors, cli_env

    from adapter.config import StoreConfig
    from adapter.encoder import Encoder

    env = cli_env()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = work / "cache"
        ds, data, ids, chunks = appleqa_chunk_vectors(a.shared, work, cache)
        queries = Encoder(cache_dir=cache, show_progress=False).encode_queries(
            [data.queries[q] for q in data.split("test")])  # what evaluate scores (and now finds cached)
        index = work / "big.faiss"
        build_s, exact = build(index, ids, chunks, a.n, a.nlist, a.pq, a.seed, queries)
        recall = {nprobe: recall_at_10(index, queries, exact, nprobe) for nprobe in (StoreConfig.nprobe, a.nlist)}
        size_mb = index.stat().st_size / 2**20
        cli = [sys.executable, str(ROOT / "cli.py"), "-q", "evaluate", str(ds), f"--cache-dir={cache}"]
        alone, _ = peak_rss_mb(cli + ["--dims", "384"], env)
        load_only, _ = peak_rss_mb([sys.executable, "-c", f"import faiss; faiss.read_index({str(index)!r})"], env)
        bare, _ = peak_rss_mb([sys.executable, "-c", "import faiss"], env)
        t = time.monotonic()
        searched, out = peak_rss_mb(cli + ["--store", "faiss:" + str(index), "--store-search"], env)
        search_s = time.monotonic() - t
        read_out = None
        if not a.skip_read_out:
            read_out, _ = peak_rss_mb(cli + ["--store", "faiss:" + str(index), "--dims", "384"], env)
    index_mb = load_only - bare
    lines = [f"# bench_store_search: {a.n:,} vectors, IVF{a.nlist},PQ{a.pq} (file {size_mb:.0f} MB, built in "
             f"{build_s:.0f} s)", "",
             "| process | peak RSS MB |", "|---|---|",
             f"| `adapter evaluate` with no store (the command alone) | {alone:.0f} |",
             f"| Python loading the index only, less Python with faiss alone (the loaded index's own size) | "
             f"{index_mb:.0f} |",
             f"| `adapter evaluate --index FILE --store-search` ({search_s:.0f} s) | {searched:.0f} |"]
    if read_out is not None:
        lines.append(f"| `adapter evaluate --index FILE` (every vector read out) | {read_out:.0f} |")
    bound = alone + index_mb + 300
    lines += ["", f"--store-search peaked at {searched:.0f} MB: {searched - alone:+.0f} MB against the command alone, "
              f"whose peak plus the loaded index ({index_mb:.0f} MB) plus 300 MB is the issue's bound, {bound:.0f} MB: "
              + ("within it." if searched <= bound else "OVER it.")
              + (f" Reading the vectors out instead added {read_out - alone:.0f} MB." if read_out else ""), "",
              f"Recall@10 of the index's own search against exact search over the {a.n:,} float vectors it was built "
              f"from, all {len(queries)} test queries: {recall[StoreConfig.nprobe]:.4f} at nprobe "
              f"{StoreConfig.nprobe} (what --store-search uses), {recall[a.nlist]:.4f} with every list probed (what "
              "PQ coding alone loses). The recall line in the output below is against the index's own exhaustive "
              "search (every list), over its PQ codes.", "",
              "Its output:", "", "```", *[line for line in out.splitlines() if not line.startswith("PEAK_KB")],
              "```"]
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "store_search")
