"""Benchmark for issue #16: a cross-encoder reranker on top of base and of the adapter, beside the fine-tune, on
AppleQA split by query (seed 0), through the real CLI:

    convert + split -> adapter train (defaults) -> adapter rerank-train (from the bundled MiniLM's backbone, a new
    one-logit head, hard negatives mined under base, a training-time budget) -> adapter finetune (one CPU epoch) ->
    adapter compare --reranker (top-20 reranked) on the test questions, or a seeded sample of them (--test-sample)

    python bench/bench_rerank.py [--shared ../shared] [--work DIR] [--train-seconds 900] [--max-seq-length 128]
                                 [--test-sample 300] [--dims 384] [--skip-finetune]

Stages whose output is already in WORK are not run again (so a long run can be continued). Prints Markdown on
stdout (BENCHMARKS.md quotes it); the compare report is left in WORK/report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_finetune import run  # noqa: E402  (adapter ARGS through this checkout's cli.py, timed)


def test_sample(data: Path, n: int | None, seed: int = 0) -> str:
    """A qrels split of a seeded sample of n test questions (the whole test split when n is None)."""
    import numpy as np

    from adapter.data import load_dataset, write_qrels

    if n is None:
        return "test"
    test = load_dataset(data).split("test")
    keep = sorted(np.random.default_rng(seed).choice(sorted(test), size=min(n, len(test)), replace=False).tolist())
    write_qrels(data / "qrels" / f"test{n}.tsv", {q: test[q] for q in keep})
    return f"test{n}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-rerank"))
    p.add_argument("--train-seconds", type=float, default=900, help="The reranker's training budget (wall time).")
    p.add_argument("--max-seq-length", type=int, default=128, help="Question + chunk tokens the cross-encoder reads.")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--val-queries", type=int, default=50)
    p.add_argument("--train-queries", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="Torch threads (OMP_NUM_THREADS) for every stage: on a "
                   "shared machine one thread measured 2.3x the pairs per second of two.")
    p.add_argument("--test-sample", type=int, default=None, help="Score a seeded sample of this many test questions.")
    p.add_argument("--dims", default="384")
    p.add_argument("--skip-finetune", action="store_true")
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the CLI subprocesses' torch thread count
    from common import appleqa

    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    log: list[tuple[str, float, str]] = []
    data = work / "appleqa-query"
    if not (data / "qrels" / "train.tsv").is_file():
        appleqa(a.shared, work)
    adapter, reranker, ft, report = data / "adapter.safetensors", work / "reranker", work / "minilm-ft", work / "report"
    if not adapter.is_file():
        run(["-q", "train", str(data), "--out", str(adapter), "--cache-dir", str(cache)], log)
    if not (reranker / "modules.json").is_file():
        extra = (["--lr", str(a.lr)] if a.lr else []) + (["--train-queries", str(a.train_queries)]
                                                         if a.train_queries else [])
        run(["-q", "rerank-train", str(data), "--out", str(reranker), "--cache-dir", str(cache), "--max-seq-length",
             str(a.max_seq_length), "--max-train-seconds", str(a.train_seconds), "--negatives", str(a.negatives),
             "--val-queries", str(a.val_queries), "--epochs", "1", *extra], log)
    if not a.skip_finetune and not (ft / "modules.json").is_file():
        run(["-q", "finetune", str(data), "--out", str(ft), "--epochs", "1", "--max-seq-length", "128"], log)
    split = test_sample(data, a.test_sample)
    finetuned = [] if a.skip_finetune else ["--finetuned", str(ft)]
    run(["-q", "compare", str(data), "--out", str(report), "--force", "--adapter", str(adapter), *finetuned,
         "--reranker", str(reranker), "--rerank-k", "20", "--split", split, "--dims", a.dims, "--cache-dir",
         str(cache)], log)

    meta = json.loads((reranker / "rerank.json").read_text())
    if "val_base" not in meta:  # written before rerank.json took the project's by-dim schema: same values
        meta["val_base"], meta["val_best"] = {"384": meta["val_first_stage"]}, {"384": meta["val_best"]}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs "
          f"while this ran (load average at the end: {load}); times are wall times on it.\n")
    print("```text")
    for command, seconds, out in log:
        print(f"$ {command}    # {seconds:.0f} s")
        if out:
            print(out)
    print("```\n")
    print(f"Reranker: {meta['rows']:,} training rows from {meta['train_queries']:,} questions, stopped at epoch "
          f"{meta['best_epoch']:.2f} by the {a.train_seconds:.0f} s budget; {meta['train_seconds']:.0f} s of training; "
          f"validation ndcg@10 (first stage alone) {meta['val_base']['384']['ndcg@10']:.4f} -> reranked "
          f"{meta['val_best']['384']['ndcg@10']:.4f} on {meta['val_queries']} questions.\n")
    print((report / "report.md").read_text())


if __name__ == "__main__":
    main()
