"""Benchmark for issue #16: a cross-encoder reranker on top of base and of the adapter, beside the fine-tune, on
AppleQA split by query (seed 0), through the real CLI:

    convert + split -> adapter train (defaults) -> adapter rerank-train (from the bundled MiniLM's backbone with the
    project's default head and loss, hard negatives mined under the adapter or base, a training-time budget, under
    --lock) -> adapter finetune (one CPU epoch; or --finetuned, a folder the same command made earlier) -> adapter
    compare --reranker (top-20 reranked) on the test questions, or a seeded sample of them (--test-sample)

    python bench/bench_rerank.py [--shared ../shared] [--work DIR] [--train-seconds 640] [--max-seq-length 128]
                                 [--train-queries 1800] [--val-queries 200] [--threads 2] [--prior-weight W]
                                 [--base-share S] [--negatives-under adapter] [--lock /work/coord/bench.lock]
                                 [--finetuned DIR]
                                 [--test-sample N] [--dims 384] [--skip-finetune]

Stages whose output is already in WORK are not run again (so a long run can be continued). Prints Markdown on
stdout (BENCHMARKS.md quotes it); the compare report is left in WORK/report.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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


def reused_finetune(folder: Path, data: Path) -> Path:
    """``folder``, a fine-tune made earlier by this script's own `adapter finetune` command, checked to be trained on
    the same training split (its finetune.json's data fingerprint) with the same settings."""
    from adapter.data import fingerprint, load_dataset

    meta = json.loads((folder / "finetune.json").read_text())
    want = fingerprint(load_dataset(data), "train")
    if meta["data_fingerprint"] != want or meta["finetune_epochs"] != 1 or meta["max_seq_length"] != 128:
        sys.exit(f"{folder}: not this script's fine-tune of this training split (fingerprint "
                 f"{meta['data_fingerprint']} against {want}, {meta['finetune_epochs']} epoch(s), "
                 f"max_seq_length {meta['max_seq_length']})")
    return folder


@contextlib.contextmanager
def held(lock: Path | None):
    """An exclusive flock on ``lock`` (None: nothing), so that two timed runs never overlap."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-rerank"))
    p.add_argument("--train-seconds", type=float, default=640, help="The reranker's training budget (wall time of "
                   "the steps; with loading and the validation passes the command fits in 15 minutes).")
    p.add_argument("--max-seq-length", type=int, default=128, help="Question + chunk tokens the cross-encoder reads.")
    p.add_argument("--negatives", type=int, default=None, help="[default: the project's]")
    p.add_argument("--lr", type=float, default=None, help="[default: the project's]")
    p.add_argument("--prior-weight", type=float, default=None, help="[default: the project's]")
    p.add_argument("--base-share", type=float, default=None, help="[default: the project's]")
    p.add_argument("--val-queries", type=int, default=200)
    p.add_argument("--train-queries", type=int, default=1800, help="A seeded sample sized so one epoch (its warmup "
                   "and decay) fits the budget on an idle machine; the budget stops it earlier on a slower one.")
    p.add_argument("--negatives-under", choices=["adapter", "base"], default="adapter", help="The first stage the "
                   "hard negatives are mined under and the fusion weight is chosen for.")
    p.add_argument("--lock", type=Path, default=None, help="Hold this flock while the reranker trains.")
    p.add_argument("--finetuned", type=Path, default=None, help="Use this folder, made earlier by this script's "
                   "`adapter finetune` command on the same split, instead of fine-tuning again.")
    p.add_argument("--threads", type=int, default=2, help="Torch threads (OMP_NUM_THREADS) for every stage: on the "
                   "idle 2-core machine two threads measured 1.33x the training steps per second of one (on a loaded "
                   "one, one thread was faster).")
    p.add_argument("--test-sample", type=int, default=None, help="Score a seeded sample of this many test questions "
                   "[default: all of them].")
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
        extra = ((["--set", f"rerank.lr={a.lr}"] if a.lr else [])
                 + (["--set", f"rerank.negatives={a.negatives}"] if a.negatives else [])
                 + (["--set", f"rerank.prior={a.prior_weight}"] if a.prior_weight is not None else [])
                 + (["--set", f"rerank.base_share={a.base_share}"] if a.base_share is not None else [])
                 + (["--set", f"rerank.train_queries={a.train_queries}"] if a.train_queries else [])
                 + (["--adapter", str(adapter)] if a.negatives_under == "adapter" else []))
        with held(a.lock):
            run(["-q", "rerank-train", str(data), "--out", str(reranker), "--cache-dir", str(cache),
                 "--set", f"rerank.max_seq_length={a.max_seq_length}",
                 "--set", f"rerank.max_train_seconds={a.train_seconds}", "--set", f"rerank.val_queries={a.val_queries}",
                 "--epochs", "1", *extra], log)
    if a.finetuned:
        ft = reused_finetune(a.finetuned, data)
    elif not a.skip_finetune and not (ft / "modules.json").is_file():
        run(["-q", "finetune", str(data), "--out", str(ft), "--epochs", "1", "--set", "finetune.max_seq_length=128"],
            log)
    split = test_sample(data, a.test_sample)
    finetuned = [] if a.skip_finetune else ["--finetuned", str(ft)]
    run(["-q", "compare", str(data), "--out", str(report), "--force", "--adapter", str(adapter), *finetuned,
         "--reranker", str(reranker), "--set", "rerank.k=20", "--split", split, "--dims", a.dims, "--cache-dir",
         str(cache)], log)

    meta = json.loads((reranker / "rerank.json").read_text())
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other jobs "
          f"while this ran (load average at the end: {load}); times are wall times on it.\n")
    print("```text")
    for command, seconds, out in log:
        print(f"$ {command}    # {seconds:.0f} s")
        if out:
            print(out)
    print("```\n")
    if a.finetuned:
        took = json.loads((ft / "finetune.json").read_text())["train_seconds"]
        print(f"The fine-tune column is {ft}, made earlier by this script's own command (`adapter -q finetune DATA "
              f"--out {ft} --epochs 1 --max-seq-length 128`, {took:.0f} s of training), checked to be trained on "
              "this same training split.\n")
    start = (meta.get("val_start") or {}).get("384", {}).get("ndcg@10")
    alone = (meta.get("val_alone") or {}).get("384", {}).get("ndcg@10")
    steps = meta["best_step"]
    print(f"Reranker: {meta['rows']:,} training lists from {meta['train_queries']:,} questions (hard negatives "
          f"under {a.negatives_under}), kept epoch {meta['best_epoch']:.2f} (step {steps}) of a "
          f"{a.train_seconds:.0f} s budget; {meta['train_seconds']:.0f} s of training; validation ndcg@10 on "
          f"{meta['val_queries']} questions: first stage alone {meta['val_base']['384']['ndcg@10']:.4f}, the "
          f"untrained start {start if start is None else f'{start:.4f}'}, the trained reranker alone "
          f"{alone if alone is None else f'{alone:.4f}'}, fused with the first stage's score at weight "
          f"{meta['fusion_weight']:g} (chosen there) {meta['val_best']['384']['ndcg@10']:.4f}.\n")
    for key, v in (meta.get("stages") or {}).items():
        print(f"- validation under {key}: first stage {v['first_stage']:.4f}, reranked and fused at weight "
              f"{v['fusion']:g} (chosen on these lists) {v['reranked']:.4f}, the reranker alone {v['alone']:.4f}")
    print(f"\nTraining prior weight: {meta.get('prior_weight', 0):g} (the loss ranked by score + that x the first "
          "stage's standardised score).\n")
    print((report / "report.md").read_text())


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "rerank")
