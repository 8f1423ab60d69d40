"""Benchmark for issue #4: the query adapter beside a full Matryoshka fine-tune on AppleQA with the bundled MiniLM,
through the real CLI: convert, split by query (seed 0), train the adapter (defaults), fine-tune (sized for a CPU:
one epoch at 128 tokens unless told otherwise), then `adapter compare` for the side-by-side report.

    python bench/bench_finetune.py [--shared ../shared] [--work DIR] [--epochs 1] [--max-seq-length 128]
                                   [--grad-accum N]

Prints Markdown on stdout (BENCHMARKS.md quotes it); the report folder is left in WORK/report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], log: list[tuple[str, float, str]]) -> str:
    """Run `adapter ARGS` (this checkout's cli.py), time it end to end, keep its output."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"failed: adapter {shlex.join(args)}\n{r.stdout}\n{r.stderr}")
    log.append(("adapter " + shlex.join(args), seconds, r.stdout.strip()))
    return r.stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--work", type=Path, default=None, help="Folder for the dataset, models and report [default: a "
                   "new temporary folder].")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=None, help="[default: the project's default]")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    data, cache = work / "appleqa", work / "cache"
    adapter, ft, report = data / "adapter.safetensors", work / "minilm-appleqa-ft", work / "report"
    log: list[tuple[str, float, str]] = []

    run(["-q", "convert", str(a.shared / "data" / "appleqa" / "apple_QA_dataset.json"), "--out", str(data),
         "--force"], log)
    run(["-q", "split", str(data), "--by", "query", "--seed", "0"], log)
    run(["-q", "train", str(data), "--out", str(adapter), "--force", "--cache-dir", str(cache)], log)
    extra = ["--set", f"finetune.grad_accum={a.grad_accum}"] if a.grad_accum else []
    run(["-q", "finetune", str(data), "--out", str(ft), "--epochs", str(a.epochs), "--set",
         f"finetune.max_seq_length={a.max_seq_length}", *extra], log)
    run(["-q", "compare", str(data), "--adapter", str(adapter), "--finetuned", str(ft), "--out", str(report),
         "--cache-dir", str(cache)], log)

    results = json.loads((report / "results.json").read_text())
    summary = json.loads((report / "summary.json").read_text())
    systems = summary["systems"]
    names = list(results)
    base, adp, fin = names[0], names[1], names[2]
    print(f"AppleQA (`{a.shared / 'data/appleqa'}`), all-MiniLM-L6-v2, split by query with seed 0: "
          f"{summary['queries']} test queries, {summary['chunks']} chunks. Machine: {os.cpu_count()} CPU cores, "
          f"no GPU, Python {platform.python_version()}.\n")
    print("Commands, in order, with their end-to-end wall time (process start, model load and embedding included):\n")
    for cmd, seconds, _ in log:
        print(f"- `{cmd}`: {seconds:.1f} s")
    print()
    print((report / "report.md").read_text().split("## Plots")[0].split("\n", 2)[2])
    print("### What the adapter buys against the fine-tune\n")
    print("| dim | base | adapter | fine-tune | share of the fine-tune's ndcg@10 gain the adapter recovers |")
    print("|---:|---:|---:|---:|---:|")
    for d in results[base]:
        b, x, f = (results[s][d]["ndcg@10"] for s in (base, adp, fin))
        share = f"{(x - b) / (f - b):.0%}" if f != b else "n/a"
        print(f"| {d} | {b:.4f} | {x:.4f} | {f:.4f} | {share} |")
    ta, tf = systems[adp]["train_seconds"], systems[fin]["train_seconds"]
    print(f"\nTraining wall time: adapter {ta:.1f} s, fine-tune {tf:.1f} s: the adapter takes {ta / tf:.1%} of the "
          f"fine-tune's training time ({tf / ta:.0f}x less).\n")
    head_to_head(data, adapter, ft, cache, [int(d) for d in results[base]])


def head_to_head(data: Path, adapter: Path, ft: Path, cache: Path, dims: list[int]) -> None:
    """Adapter against fine-tune directly: the paired bootstrap of their per-query ndcg@10 difference (cached)."""
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.encoder import Encoder
    from adapter.evaluate import paired_bootstrap
    from adapter.model import LinearAdapter
    from adapter.systems import build_systems, score

    ds = load_dataset(data)
    cfg = Config().replace(cache_dir=str(cache))
    built = build_systems(cfg, encoder=Encoder.from_config(cfg, show_progress=False),
                          adapters={"adapter": LinearAdapter.load(adapter)}, finetuned=[ft], progress=False)
    systems = {"adapter": built["adapter"], "fine-tune": built[Path(ft).resolve().name]}
    per = score(ds, systems, dims=dims, per_query=True)
    print("### Adapter against fine-tune, paired (ndcg@10 of adapter minus fine-tune, 95% bootstrap, 1,000 "
          "resamples, seed 0)\n")
    print("| dim | difference | 95% CI |")
    print("|---:|---:|---:|")
    for d in dims:
        change, low, high = paired_bootstrap(per["fine-tune"][d]["ndcg@10"], per["adapter"][d]["ndcg@10"])
        print(f"| {d} | {change:+.4f} | [{low:+.4f}, {high:+.4f}] |")


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "finetune")
