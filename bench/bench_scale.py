"""Benchmark for training and evaluation at scale (issue #14, parts 2-3).

Parts (``--parts``, default all):
- ``choice``: does validating on a sample of questions (``train.val_budget``) choose what the full validation chooses?
  On AppleQA and waterops, split by query, seeds 0-4: the winning epoch of the best-epoch recipe (triplet, 30 epochs)
  and the recipe ``adapter train`` ships, each with every validation question and with slices sampled down to 200
  questions (what the default budget leaves at 10^6 chunks) and to 100 (the floor).
- ``grid``: cost growth on synthetic vectors (d = 384) with planted relevance: ``adapter train`` through the CLI with
  ``--corpus-vectors`` (a memory-mapped .npy), 10^4 and 10^5 training questions against 10^5 and 10^6 chunks, 30
  epochs; wall time and peak memory of each run (a child process each, so the peak is its own).
- ``appleqa``: AppleQA's training questions with its 215 chunk vectors hidden among 10^6 random unit vectors, given
  as ``--corpus-vectors``; ``adapter train`` 30 epochs, and test ndcg@10 of base and adapter against the 215 alone
  and against the 10^6.
- ``evaluator``: the judge at 10^6 chunks, 1,000 queries over 4 dims, beside raw ``faiss.knn`` for the same dims.

    python bench/bench_scale.py [--parts choice,grid,appleqa,evaluator] [--shared ../shared] [--seeds 0,1,2,3,4]
                                [--cells 10000x100000,...] [--work DIR]

Prints Markdown on stdout (BENCHMARKS.md quotes it). Timed parts should run under ``flock /work/coord/bench.lock``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DIMS = (384, 256, 128, 64)
SAMPLES = (200, 100)  # validation questions per slice: what the default budget leaves at 10^6 chunks, and the floor


# ------------------------------------------------------------------------------------------------ choice


def choice(shared: Path, seeds: list[int]) -> None:
    from bench_quality import load, scenario

    from adapter.config import Config
    from adapter.train import bounded, carve, fit, train_on_vectors

    data = load(shared, Path(tempfile.mkdtemp(prefix="bench-scale-")))
    print("### Validating on a sample of questions: the same choice?\n")
    print("Split by query (20% test), seeds " + ",".join(map(str, seeds)) + ". *Winning epoch*: the triplet recipe "
          "with the best of 30 epochs kept (`--recipe triplet`), trained once; its epoch picked on the seen slice "
          "with every question, and on a seeded sample of it. *Recipe*: what `adapter train` (the default, auto) "
          "ships when both slices are scored in full, and when each is sampled (`val_budget` = sample x chunks, so "
          "the same sample sizes a 10^6-chunk corpus gets). Regret: the full validation's ndcg@10 of the full pick "
          "minus that of the sample's pick.\n")
    print("| dataset | seed | slices (seen, unseen) | winning epoch: full | " +
          " | ".join(f"sample {n}: epoch (regret)" for n in SAMPLES) + " | recipe: full | " +
          " | ".join(f"sample {n}" for n in SAMPLES) + " |")
    print("|---" * (5 + 2 * len(SAMPLES)) + "|")
    same_epoch = same_recipe = total = 0
    for name, d in data.items():
        _, _, _, cids, corpus = d
        for seed in seeds:
            train, _ = scenario(d, "query", seed)
            cfg = Config().replace(seed=seed)
            inner, seen, unseen, _ = carve(train, cfg)
            best = cfg.replace(recipe="triplet", epochs=30)
            full = fit(inner, seen, corpus, cids, "bench", best, progress=False)
            curve = {h["epoch"]: h["ndcg@10"] for h in full.history}
            picks = []
            for n in SAMPLES:
                small = best.replace(val_budget=n * len(cids))
                r = fit(inner, bounded(seen, len(cids), small), corpus, cids, "bench", small, progress=False)
                picks.append(r.best_epoch)
            recipe_full = train_on_vectors(train, corpus, cids, "bench", cfg, progress=False).recipe
            recipes = [train_on_vectors(train, corpus, cids, "bench", cfg.replace(val_budget=n * len(cids)),
                                        progress=False).recipe for n in SAMPLES]
            total += len(SAMPLES)
            same_epoch += sum(p == full.best_epoch for p in picks)
            same_recipe += sum(r == recipe_full for r in recipes)
            cells = [f"{p} ({curve[full.best_epoch] - curve[p]:+.4f})" for p in picks]
            print(f"| {name} | {seed} | {len(seen.ids)}, {len(unseen.ids)} | {full.best_epoch} | " +
                  " | ".join(cells) + f" | {recipe_full} | " + " | ".join(recipes) + " |")
    print(f"\nSame winning epoch as the full validation: {same_epoch} of {total}; same recipe: {same_recipe} of "
          f"{total}.\n")


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="choice,grid,appleqa,evaluator")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--seeds", default="0,1,2,3,4")
    a = p.parse_args()
    parts = a.parts.split(",")
    print(f"Machine: {os.cpu_count()} CPU cores, shared with other sessions (load average at start "
          f"{os.getloadavg()[0]:.1f}).\n")
    if "choice" in parts:
        choice(a.shared, [int(s) for s in a.seeds.split(",")])


if __name__ == "__main__":
    main()
