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
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DIMS = (384, 256, 128, 64)
SAMPLES = (200, 100)  # validation questions per slice: what the default budget leaves at 10^6 chunks, and the floor
D = 384
THETA, SIGMA = np.deg2rad(75.0), 1.0  # planted: question = chunk @ M + noise of norm ~SIGMA, M = cos I + sin R
BLOCK = 100_000  # rows generated at a time


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


# ------------------------------------------------------------------------------------------------ synthetic data


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(work: Path, n_chunks: int, n_questions: int, seed: int = 0) -> Path:
    """A dataset folder whose corpus.jsonl names the ``n_questions`` judged chunks (one question each), with every
    chunk's vector in ``corpus.npy`` / ``ids.txt`` (judged chunks first, in corpus.jsonl's order, so the file is used
    as it is) and the questions' vectors in ``questions.npy``. Relevance is planted: a question is its chunk seen
    through a fixed partial rotation M plus noise, so the base ranks it poorly and a linear map (M's inverse) fixes
    it. Nothing here is text the model embeds: the bench's encoder hands back these vectors."""
    folder = work / f"synthetic-{n_chunks}-{n_questions}"
    if (folder / "done").exists():
        return folder
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    corpus = np.lib.format.open_memmap(folder / "corpus.npy", mode="w+", dtype=np.float32, shape=(n_chunks, D))
    for s in range(0, n_chunks, BLOCK):
        corpus[s:s + BLOCK] = _unit(rng, min(BLOCK, n_chunks - s))
    corpus.flush()
    rot = np.linalg.qr(np.random.default_rng(1234).standard_normal((D, D)))[0].astype(np.float32)
    m = (np.cos(THETA) * np.eye(D) + np.sin(THETA) * rot).astype(np.float32)
    q = np.empty((n_questions, D), dtype=np.float32)
    for s in range(0, n_questions, BLOCK):
        e = min(n_questions, s + BLOCK)
        x = corpus[s:e] @ m + SIGMA / np.sqrt(D) * rng.standard_normal((e - s, D), dtype=np.float32)
        q[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.save(folder / "questions.npy", q)
    del corpus
    (folder / "ids.txt").write_text("".join(f"c{i}\n" for i in range(n_chunks)))
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"c{i}", "text": f"chunk {i}"}) + "\n" for i in range(n_questions))
    with open(folder / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"q{i}", "text": f"question {i}"}) + "\n" for i in range(n_questions))
    with open(folder / "qrels" / "train.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"q{i}\tc{i}\t1\n" for i in range(n_questions))
    (folder / "done").touch()
    return folder


class VectorEncoder:
    """The encoder ``train_adapter`` is given here: question i's text ("question i") is ``questions[i]``."""

    name = identity = "synthetic/planted-384"
    dim = D

    def __init__(self, questions: np.ndarray):
        self.questions = questions

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.questions[[int(t.split()[1]) for t in texts]]


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def train_child(folder: Path, epochs: int) -> None:
    """One `adapter train` run (train_adapter with --corpus-vectors) in this process: print its numbers as JSON."""
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.stores import StoreSource
    from adapter.train import train_adapter

    t = time.perf_counter()
    ds = load_dataset(folder)
    source = StoreSource(vectors=str(folder / "corpus.npy"), ids=str(folder / "ids.txt"))
    enc = VectorEncoder(np.load(folder / "questions.npy"))
    r = train_adapter(ds, Config().replace(epochs=epochs), encoder=enc, corpus=source, progress=False)
    wall = time.perf_counter() - t
    print(json.dumps({"wall": wall, "peak_gib": _peak_gib(), "train_seconds": r.seconds, "recipe": r.recipe,
                      "estimates": r.estimates, "trials": [(t["recipe"], t["seconds"]) for t in r.trials]}))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gain(e: dict | None) -> str:
    return "n/a" if not e else f"{e['base']:.3f} -> {e['adapter']:.3f} ({e['queries']} of {e['held_out']})"


def grid(work: Path, cells: list[tuple[int, int]], epochs: int) -> None:
    print(f"### Training cost against the corpus (synthetic, d = {D}, {epochs} epochs)\n")
    print("`train_adapter` (what `adapter train --corpus-vectors corpus.npy --corpus-ids ids.txt --epochs "
          f"{epochs}` runs) with the default recipe choice (5 trials and a refit), one child process per cell; the "
          "corpus .npy is memory-mapped. Wall time includes reading the dataset and the vectors; peak memory is the "
          "child's maximum resident set (the mapped corpus pages it touched count). Validation: seen and unseen "
          "slices, ndcg@10 at full dim base -> adapter (questions scored of those held out).\n")
    print("| questions | chunks | wall (s) | training (s) | peak memory (GiB) | shipped | seen | unseen |")
    print("|---|---|---|---|---|---|---|---|")
    for n_q, n_c in cells:
        folder = synthetic(work, n_c, n_q)
        r = run_child("--train-child", str(folder), str(epochs))
        e = r["estimates"]
        print(f"| {n_q:,} | {n_c:,} | {r['wall']:.0f} | {r['train_seconds']:.0f} | {r['peak_gib']:.2f} | "
              f"{r['recipe']} | {_gain(e.get('seen'))} | {_gain(e.get('unseen'))} |", flush=True)
    print()


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="choice,grid,appleqa,evaluator")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--cells", default="10000x100000,100000x100000,10000x1000000,100000x1000000",
                   help="QUESTIONSxCHUNKS, comma-separated")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--work", type=Path, default=None, help="Where synthetic data is written (kept for reruns).")
    p.add_argument("--train-child", nargs=2)
    a = p.parse_args()
    if a.train_child:
        return train_child(Path(a.train_child[0]), int(a.train_child[1]))
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    parts = a.parts.split(",")
    print(f"Machine: {os.cpu_count()} CPU cores, shared with other sessions (load average at start "
          f"{os.getloadavg()[0]:.1f}).\n")
    if "choice" in parts:
        choice(a.shared, [int(s) for s in a.seeds.split(",")])
    if "grid" in parts:
        grid(work, [tuple(int(x) for x in c.split("x")) for c in a.cells.split(",")], a.epochs)


if __name__ == "__main__":
    main()
