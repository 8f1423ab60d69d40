"""Benchmark for `adapter train`'s default across data shapes (issue #22): the default and `--objective seen`, as
`adapter train` ships them, beside every recipe fitted on all training questions with no choice (what `--recipe NAME`
ships, and the hindsight-best single recipe), on a grid of datasets x shapes x splits x seeds.

- Datasets: AppleQA (../shared/data/appleqa, 20 questions per chunk) and the bundled waterops (11 per chunk).
- Shapes: a seeded 1, 2 or 5 questions of each chunk (what LlamaIndex's generator and most tutorials write), or all.
- Splits: ``query`` (20% of the questions held out: test questions about chunks the adapter trained on), ``chunk``
  (20% of the chunks held out whole: chunks it never saw), ``cov50`` (training questions for half the chunks only:
  20% of their questions held out as ``covered``, and every question about the other half as ``uncovered``).
- Split seeds 0-4: the subsample, the split and `adapter train`'s own seed.

Each cell runs `adapter train`'s own ``train_on_vectors`` on the cached vectors (nothing is embedded twice), replays
its choice for `--objective seen` and for other gain thresholds on the same cross-fitted trial rows (``select``),
and fits every recipe on every training question for the no-choice rows.

    python bench/bench_quality.py [--shared ../shared] [--seeds 0,1,2,3,4] [--shapes 1,2,5,full] [--jobs 2]
                                  [--json bench/results/quality.json] [--from-json FILE] [--set epochs=20 ...]
                                  [--speed]

Prints Markdown on stdout (BENCHMARKS.md quotes it): test ndcg@10 as a ratio to base, mean ± sd over the seeds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIMS = (384, 256, 128, 64)
SCENARIOS = ("query", "chunk", "cov50")
SHAPES = ("1", "2", "5", "full")
GAIN_ZS = (1.0, 1.5, 2.0, 2.5)  # the gain thresholds the choice is replayed with (the default is train.GAIN_Z)


def load(shared: Path, work: Path) -> dict[str, tuple]:
    """Both datasets as (query ids, query vectors, qrels, corpus ids, corpus vectors), embedded once (cached)."""
    from adapter.data import convert, load_dataset, relevant
    from adapter.encoder import Encoder

    convert(shared / "data" / "appleqa" / "apple_QA_dataset.json", work / "appleqa")
    encoder = Encoder("sentence-transformers/all-MiniLM-L6-v2", show_progress=False)
    out = {}
    for name, folder in (("appleqa", work / "appleqa"), ("waterops", ROOT / "data" / "waterops")):
        ds = load_dataset(folder)
        qrels = relevant(ds.split("all"))
        qids, cids = list(qrels), list(ds.corpus)
        out[name] = (qids, encoder.encode_queries([ds.queries[q] for q in qids]), qrels, cids,
                     encoder.encode_documents([ds.doc_text(c) for c in cids]))
    return out


def subsample(qrels: dict, shape: str, seed: int) -> dict:
    """A seeded ``shape`` questions of each chunk (questions grouped by their first relevant chunk), or all."""
    import numpy as np

    if shape == "full":
        return qrels
    rng = np.random.default_rng(seed)
    by_chunk: dict = {}
    for q in qrels:
        by_chunk.setdefault(min(qrels[q]), []).append(q)
    keep = set()
    for c in sorted(by_chunk):
        qs = by_chunk[c]
        keep.update(qs[i] for i in rng.permutation(len(qs))[:int(shape)])
    return {q: r for q, r in qrels.items() if q in keep}


def scenario(data: tuple, shape: str, kind: str, seed: int) -> tuple:
    """(train Split, {test name: Split}) for one shape, split and seed."""
    import numpy as np

    from adapter.data import partition_qrels
    from adapter.train import Split

    qids, vectors, qrels, cids, _ = data
    qrels = subsample(qrels, shape, seed)
    row = {q: i for i, q in enumerate(qids)}

    def split(part: dict) -> Split:
        ids = list(part)
        return Split(vectors[[row[q] for q in ids]], ids, part)

    if kind in ("query", "chunk"):
        parts, _ = partition_qrels(qrels, by=kind, test_fraction=0.2, seed=seed)
        return split(parts["train"]), {"test": split(parts["test"])}
    chunks = sorted({c for r in qrels.values() for c in r})
    rng = np.random.default_rng(seed)
    covered = set(np.array(chunks, dtype=object)[rng.permutation(len(chunks))[:round(0.5 * len(chunks))]])
    inside = {q: r for q, r in qrels.items() if set(r) <= covered}
    outside = {q: r for q, r in qrels.items() if not set(r) & covered}
    parts, _ = partition_qrels(inside, by="query", test_fraction=0.2, seed=seed)
    return split(parts["train"]), {"covered": split(parts["test"]), "uncovered": split(outside)}


def _test_scores(adapter, corpus, cids, tests: dict) -> dict:
    """{test name: {dim: ratio of ndcg@10 to base}}."""
    from adapter.evaluate import evaluate

    out = {}
    for name, s in tests.items():
        base = evaluate(s.vectors, corpus, s.qrels, s.ids, cids, DIMS)
        vec = s.vectors if adapter is None else adapter.apply(s.vectors)
        got = evaluate(vec, corpus, s.qrels, s.ids, cids, DIMS)
        out[name] = {d: got[d]["ndcg@10"] / base[d]["ndcg@10"] for d in DIMS}
    return out


def run_cell(args: tuple) -> dict:
    """`adapter train`'s default on one (dataset, shape, split, seed), and every recipe fitted on all of it."""
    import torch

    from adapter.choice import AUTO_RECIPES, recipe_config, train_on_vectors
    from adapter.config import Config
    from adapter.train import fit

    torch.set_num_threads(1)
    data, dname, shape, kind, seed, overrides = args
    _, _, _, cids, corpus = data
    cfg = Config().replace(seed=seed, **overrides)
    train, tests = scenario(data, shape, kind, seed)
    t, c = time.perf_counter(), time.process_time()
    r = train_on_vectors(train, corpus, cids, "bench", cfg, progress=False)
    cell = {"dataset": dname, "shape": shape, "scenario": kind, "seed": seed, "questions": len(train.ids),
            "train_seconds": time.perf_counter() - t, "train_cpu": time.process_time() - c, "recipe": r.recipe,
            "trials": r.trials, "default": _test_scores(r.adapter, corpus, cids, tests), "fixed": {}}
    for name in AUTO_RECIPES:
        fixed = r.adapter if name == r.recipe else fit(train, None, corpus, cids, "bench", recipe_config(cfg, name),
                                                       progress=False).adapter
        cell["fixed"][name] = _test_scores(fixed, corpus, cids, tests)
    return cell


def replay(cell: dict, objective: str, gain_z: float) -> str:
    """The recipe `adapter train` ships on this cell under ``objective`` and ``gain_z``: ``select`` over its rows."""
    from adapter.choice import select
    from adapter.config import Config

    tc = Config().train
    rows = [dict(t) for t in cell["trials"]]
    pick = select(rows, objective, tc.safety_z, tc.simpler_within, gain_z=gain_z)
    return "identity" if pick is None else rows[pick]["recipe"]


def shipped(cell: dict, name: str) -> dict:
    """{test: {dim: ratio}} of what a recipe name ships on the cell ("identity": 1.0 everywhere)."""
    if name == "identity":
        return {t: {d: 1.0 for d in DIMS} for t in cell["default"]}
    return cell["fixed"][name]


def fmt(values: list[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f}x ±{s:.3f}"


def groups(cells: list[dict]) -> dict[tuple, list[dict]]:
    """(dataset, shape, scenario) -> its cells over seeds, in grid order."""
    out: dict = {}
    for c in cells:
        out.setdefault((c["dataset"], c["shape"], c["scenario"]), []).append(c)
    return out


def report(cells: list[dict], overrides: dict) -> None:
    from adapter.choice import AUTO_RECIPES, GAIN_Z

    seeds = sorted({c["seed"] for c in cells})
    label = {"query": "by query", "chunk": "by chunk", "cov50": "50% coverage"}
    print(f"Seeds {','.join(map(str, seeds))}; overrides {overrides or 'none'}; all-MiniLM-L6-v2; test ndcg@10 as "
          "a ratio to base, mean ±sd over seeds. *Best fixed*: the recipe whose no-choice fit scores best on test "
          "(mean over seeds), known only in hindsight; *share*: the default's gain as a share of its gain.\n")
    print("### At dim 384\n")
    print("| dataset | questions per chunk | split | test | default | `--objective seen` | best fixed (hindsight) | "
          "share | default's lowest cell (any seed, any dim) | best fixed's lowest cell | identity shipped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (dname, shape, kind), group in groups(cells).items():
        for test in group[0]["default"]:
            default = [c["default"][test][384] for c in group]
            seen = [shipped(c, replay(c, "seen", GAIN_Z))[test][384] for c in group]
            fixed = {n: statistics.mean(c["fixed"][n][test][384] for c in group) for n in AUTO_RECIPES}
            best = max(fixed, key=fixed.get)
            share = (statistics.mean(default) - 1) / (fixed[best] - 1) if fixed[best] > 1 else float("nan")
            low = min((c["default"][test][d], d, c["seed"]) for c in group for d in DIMS)
            low_fixed = min(c["fixed"][best][test][d] for c in group for d in DIMS)
            ids = sum(c["recipe"] == "identity" for c in group)
            print(f"| {dname} | {shape} | {label[kind]} | {test} | {fmt(default)} | {fmt(seen)} | {best} "
                  f"{fixed[best]:.3f}x | {share:.0%} | {low[0]:.3f}x (dim {low[1]}, seed {low[2]}) | "
                  f"{low_fixed:.3f}x | {ids} of {len(group)} |")
    print("\n### The default at every dim (mean ±sd over seeds)\n")
    print("| dataset | questions per chunk | split | test | " + " | ".join(map(str, DIMS)) + " |")
    print("|---|---|---|---|" + "---|" * len(DIMS))
    for (dname, shape, kind), group in groups(cells).items():
        for test in group[0]["default"]:
            print(f"| {dname} | {shape} | {label[kind]} | {test} | "
                  + " | ".join(fmt([c["default"][test][d] for c in group]) for d in DIMS) + " |")
    print(f"\n### The choice replayed with other gain thresholds (default {GAIN_Z:g} s.e.): mean at dim 384, and the "
          "lowest cell at any seed and dim\n")
    print("| dataset | questions per chunk | split | test | " + " | ".join(f"z {z:g}" for z in GAIN_ZS) + " |")
    print("|---|---|---|---|" + "---|" * len(GAIN_ZS))
    for (dname, shape, kind), group in groups(cells).items():
        for test in group[0]["default"]:
            out = []
            for z in GAIN_ZS:
                got = [shipped(c, replay(c, "both", z))[test] for c in group]
                out.append(f"{statistics.mean(g[384] for g in got):.3f}x ({min(g[d] for g in got for d in DIMS):.3f}x)")
            print(f"| {dname} | {shape} | {label[kind]} | {test} | " + " | ".join(out) + " |")
    print("\n### What the default shipped (count over seeds) and its training time\n")
    print("| dataset | questions per chunk | split | training questions | shipped | CPU s (mean) |")
    print("|---|---|---|---|---|---|")
    for (dname, shape, kind), group in groups(cells).items():
        picks = [c["recipe"] for c in group]
        print(f"| {dname} | {shape} | {label[kind]} | {statistics.mean(c['questions'] for c in group):.0f} | "
              + ", ".join(f"{n} {picks.count(n)}" for n in dict.fromkeys(picks))
              + f" | {statistics.mean(c['train_cpu'] for c in group):.1f} |")
    print()


def speed(data: dict, rounds: int = 3) -> None:
    """`adapter train`'s training (folds, choice, refit; embedding excluded) on AppleQA by query, seed 0: wall and CPU
    seconds of each round (CPU seconds / 2 is the wall time on 2 idle cores)."""
    from adapter.choice import train_on_vectors
    from adapter.config import Config

    d = data["appleqa"]
    train, _ = scenario(d, "full", "query", 0)
    rows = []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        r = train_on_vectors(train, d[4], d[3], "bench", Config(), progress=False)
        rows.append((time.perf_counter() - w, time.process_time() - c))
    folds = r.estimates["seen"]["folds"]
    print(f"### Training time, AppleQA by query ({len(train.ids)} questions; {folds} folds; embedding excluded)\n")
    print("| wall s (each round) | CPU s (each round) | CPU s / 2 cores |")
    print("|---|---|---|")
    print(f"| {', '.join(f'{w:.1f}' for w, _ in rows)} | {', '.join(f'{c:.1f}' for _, c in rows)} | "
          f"{min(c for _, c in rows) / 2:.1f} |\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--datasets", default="appleqa,waterops")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "quality.json",
                   help="Every cell's numbers (default bench/results/quality.json).")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Config override (JSON value).")
    p.add_argument("--from-json", type=Path, default=None, help="Render the tables from a --json file, run nothing.")
    p.add_argument("--speed", action="store_true", help="Only time `adapter train`'s training on AppleQA.")
    a = p.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.from_json:
        cells = json.loads(a.from_json.read_text())
        for c in cells:  # JSON keys are strings: the dims back to ints
            for scores in (c["default"], *c["fixed"].values()):
                for test, by_dim in scores.items():
                    scores[test] = {int(d): v for d, v in by_dim.items()}
        report(cells, overrides)
        return
    data = load(a.shared, Path(tempfile.mkdtemp(prefix="bench-quality-")))
    if a.speed:
        speed(data)
        return
    jobs = [(data[dn], dn, shape, kind, int(seed), overrides) for dn in a.datasets.split(",")
            for shape in a.shapes.split(",") for kind in a.scenarios.split(",") for seed in a.seeds.split(",")]
    jobs.sort(key=lambda j: j[2] != "full")  # the largest cells first, so the processes finish together
    t = time.perf_counter()
    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        cells = list(pool.map(run_cell, jobs))
    order = {(dn, s, k): i for i, (dn, s, k) in enumerate((dn, s, k) for dn in a.datasets.split(",")
                                                            for s in a.shapes.split(",")
                                                            for k in a.scenarios.split(","))}
    cells.sort(key=lambda c: (order[(c["dataset"], c["shape"], c["scenario"])], c["seed"]))
    print(f"{len(cells)} cells in {time.perf_counter() - t:.0f} s on {a.jobs} processes.\n")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(cells))
    tmp.replace(a.json)
    report(cells, overrides)


if __name__ == "__main__":
    main()
