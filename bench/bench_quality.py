"""Benchmark for adapter recipes and their choice (issue #12): every recipe, and `adapter train`'s own choice under
each objective, scored on a grid of scenarios, each as the mean and spread over split seeds (never seed 0 alone).

Scenarios, on AppleQA (../shared/data/appleqa) and the bundled waterops:
- ``query``: 20% of the questions held out; the test questions are about chunks the adapter trained on (seen).
- ``chunk``: 20% of the chunks held out whole; the test questions are about chunks it never saw (unseen).
- ``cov25`` / ``cov50``: training questions for only 25% / 50% of the chunks (a query log that covers part of the
  index): 20% of the covered chunks' questions are held out (``covered``) and every question about an uncovered chunk
  is scored too (``uncovered``).

Each scenario embeds nothing (the texts are embedded once, through the cache) and trains on the cached vectors.
For every recipe the script does what `adapter train` does: carve the seen and unseen validation slices, train the
recipe on the rest, score both slices (the trial), and refit it on every training question (what would ship).
`adapter train`'s choice is then the trial rows run through the same ``select`` with the same refit, so the "auto"
rows are exactly what the command ships (``--verify`` checks that against ``train_on_vectors`` on one scenario).

    python bench/bench_quality.py [--shared ../shared] [--seeds 0,1,2,3,4] [--jobs 2] [--json runs/quality.json]
                                  [--set epochs=20 ...] [--verify] [--speed]

Prints Markdown on stdout (BENCHMARKS.md quotes it). Test ndcg@10 as a ratio to base, mean ± standard deviation
over the seeds.
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
SCENARIOS = ("query", "chunk", "cov25", "cov50")
Z_VALUES = (0.0, 0.5, 1.0, 2.0)  # the safety margins the "both" rows are replayed with
WITHIN_VALUES = (0.0, 2.0, 2.5, 3.0, 4.0)  # ... and the "within noise of the best" widths
FORMER_AUTO = ("pull-0.3", "pull-0.1", "lowrank", "pull-0.03", "pull-0.01")  # the auto set before uncovered pulls


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


def scenario(data: tuple, kind: str, seed: int) -> tuple:
    """(train Split, {test name: Split}) for one scenario and split seed."""
    import numpy as np

    from adapter.data import partition_qrels
    from adapter.train import Split

    qids, vectors, qrels, cids, _ = data
    row = {q: i for i, q in enumerate(qids)}

    def split(part: dict) -> Split:
        ids = list(part)
        return Split(vectors[[row[q] for q in ids]], ids, part)

    if kind in ("query", "chunk"):
        parts, _ = partition_qrels(qrels, by=kind, test_fraction=0.2, seed=seed)
        return split(parts["train"]), {"test": split(parts["test"])}
    share = {"cov25": 0.25, "cov50": 0.5}[kind]
    chunks = sorted({c for r in qrels.values() for c in r})
    rng = np.random.default_rng(seed)
    covered = set(np.array(chunks, dtype=object)[rng.permutation(len(chunks))[:round(share * len(chunks))]])
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
    """Every recipe (trial and refit) and the seed's former default on one (dataset, scenario, seed)."""
    import torch

    from adapter.config import Config
    from adapter.data import partition_qrels
    from adapter.train import RECIPES, _fit, _Slice, _subset, carve, coverage_of, held_out_rows, recipe_config

    torch.set_num_threads(1)
    data, dname, kind, seed, overrides, recipes = args
    _, _, _, cids, corpus = data
    cfg = Config().replace(seed=seed, **overrides)
    train, tests = scenario(data, kind, seed)
    dims = list(DIMS)
    cell = {"dataset": dname, "scenario": kind, "seed": seed, "recipes": {},
            "coverage": coverage_of(train.qrels, cids)["share"]}

    # the former default: triplet, best epoch on a slice carved like the split (by query, or by chunk for "chunk")
    by = "chunk" if kind == "chunk" else "query"
    parts, _ = partition_qrels(train.qrels, by=by, test_fraction=cfg.split.val_fraction, seed=seed)
    old = cfg.replace(loss="triplet", epoch_choice="best", matryoshka=False, rank=None, identity_penalty=0.0,
                      epochs=30)
    t = time.perf_counter()
    r = _fit(_subset(train, parts["train"]), _subset(train, parts["test"]), corpus, cids, "bench", old, False)
    cell["former"] = {"test": _test_scores(r.adapter, corpus, cids, tests), "seconds": time.perf_counter() - t}

    inner, seen, unseen, _ = carve(train, cfg)
    outside = held_out_rows(unseen, cids)
    slices = {"seen": _Slice.of(seen, corpus, cids, dims), "unseen": _Slice.of(unseen, corpus, cids, dims)}
    watch = seen or unseen
    for name in recipes:
        rc = recipe_config(cfg, name)
        t = time.perf_counter()
        r = _fit(inner, watch, corpus, cids, "bench", rc, False, outside=outside)
        trial_s = time.perf_counter() - t
        row = {k: s.estimate(r.adapter, corpus, cids, dims) if s else None for k, s in slices.items()}
        t = time.perf_counter()
        shipped = r.adapter if rc.train.epoch_choice == "best" else _fit(train, None, corpus, cids, "bench", rc,
                                                                   False).adapter
        row.update(recipe=name, trial_seconds=trial_s, refit_seconds=time.perf_counter() - t,
                   test=_test_scores(shipped, corpus, cids, tests))
        cell["recipes"][name] = row
    assert set(recipes) <= set(RECIPES)
    return cell


def choose(cell: dict, names: list[str], objective: str, z: float, within: float, rule: str = "auto") -> str:
    """The recipe `adapter train` ships on this cell: its ``select`` over the trial rows of ``names`` (in the
    order `adapter train` tries them). ``rule`` "dims": the unseen-chunk change judged at every dim alone;
    "former": the set and order before the uncovered pulls (``FORMER_AUTO``)."""
    from adapter.train import select

    if rule == "former":
        names = [n for n in FORMER_AUTO if n in cell["recipes"]]
    rows = [dict(cell["recipes"][n]) for n in names]
    pick = select(rows, objective, z, within, worst_dim=rule == "dims")
    return "identity" if pick is None else names[pick]


def fmt(values: list[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f}x ±{s:.3f}"


def columns(cells: list[dict]) -> list[tuple[str, str, str]]:
    """(dataset, scenario, test name) in table order."""
    seen = []
    for c in cells:
        for t in next(iter(c["recipes"].values()))["test"]:
            key = (c["dataset"], c["scenario"], t)
            if key not in seen:
                seen.append(key)
    return seen


def system_scores(cells: list[dict], system: str, names: list[str]) -> dict:
    """{(dataset, scenario, test): {dim: [ratio per seed]}} for a recipe, "former", or
    "auto-<objective>-<z>-<within>"."""
    out: dict = {}
    for c in cells:
        if system == "former":
            test = c["former"]["test"]
        elif system.startswith(("auto/", "former/", "dims/")):
            rule, objective, z, within = system.split("/")
            pick = choose(c, names, objective, float(z), float(within), rule)
            test = ({t: {d: 1.0 for d in DIMS} for t in c["former"]["test"]} if pick == "identity"
                    else c["recipes"][pick]["test"])
        else:
            test = c["recipes"][system]["test"]
        for t, by_dim in test.items():
            for d, v in by_dim.items():
                out.setdefault((c["dataset"], c["scenario"], t), {}).setdefault(int(d), []).append(v)
    return out


def report(cells: list[dict], names: list[str], recipes: list[str], cfg, seeds: list[int], overrides: dict) -> None:
    cols = columns(cells)
    label = {"query": "by query", "chunk": "by chunk", "cov25": "25% coverage", "cov50": "50% coverage"}
    head = [f"{d} {label[s]}" + ("" if t == "test" else f", {t}") for d, s, t in cols]
    z0, w0 = cfg.train.safety_z, cfg.train.simpler_within
    default, seen = f"auto/both/{z0:g}/{w0:g}", "auto/seen/0/0"
    variants = [v for w in WITHIN_VALUES for z in Z_VALUES if (v := f"auto/both/{z:g}/{w:g}") != default]
    former_rule, dims_rule = "former/both/0.5/2", f"dims/both/{z0:g}/{w0:g}"
    systems = ["former", *recipes, default, seen, former_rule, dims_rule, *dict.fromkeys(variants)]
    names_shown = {"former": "former default (triplet, best of 30 epochs on a slice carved like the split)",
                   default: f"**`adapter train` (the default: objective both, z {z0:g}, within {w0:g} s.e.)**",
                   seen: "**`adapter train --objective seen`**",
                   former_rule: "`adapter train` as before #12's second pass (its 5 recipes in their order, z 0.5, "
                                "within 2 s.e.)",
                   dims_rule: f"`adapter train`, unseen chunks judged at every dim alone (z {z0:g}, within "
                              f"{w0:g} s.e.)"}
    for v in variants:
        _, _, z, w = v.split("/")
        names_shown[v] = f"`adapter train`, objective both, z {z}, within {w} s.e."
    scores = {s: system_scores(cells, s, names) for s in systems}
    print(f"Seeds {','.join(map(str, seeds))}; overrides {overrides or 'none'}; all-MiniLM-L6-v2; test ndcg@10 "
          "as a ratio to base, mean ±sd over seeds.\n")
    print("### At dim 384\n")
    print("| system | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for s in systems:
        print(f"| {names_shown.get(s, s)} | " + " | ".join(fmt(scores[s][c][384]) for c in cols) + " |")
    print("\n### Worst dim (the lowest of the four dims' means; 384/256/128/64)\n")
    print("| system | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for s in systems:
        cells_txt = []
        for c in cols:
            means = {d: statistics.mean(v) for d, v in scores[s][c].items()}
            worst = min(means, key=means.get)
            cells_txt.append(f"{means[worst]:.3f}x @{worst}")
        print(f"| {names_shown.get(s, s)} | " + " | ".join(cells_txt) + " |")
    print(f"\n### The default ({names_shown[default].strip('*')}) at every dim\n")
    print("| dim | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for d in DIMS:
        print(f"| {d} | " + " | ".join(fmt(scores[default][c][d]) for c in cols) + " |")
    print("\n### What the default chose, per dataset and scenario (count over seeds)\n")
    print("| dataset | scenario | `both` (default) | `seen` |")
    print("|---|---|---|---|")
    for dname in dict.fromkeys(c["dataset"] for c in cells):
        for kind in dict.fromkeys(c["scenario"] for c in cells):
            group = [c for c in cells if c["dataset"] == dname and c["scenario"] == kind]
            picks = {}
            for obj, z, w in (("both", z0, w0), ("seen", 0.0, 0.0)):
                chosen = [choose(c, names, obj, z, w) for c in group]
                picks[obj] = ", ".join(f"{n} {chosen.count(n)}" for n in dict.fromkeys(chosen))
            print(f"| {dname} | {label[kind]} | {picks['both']} | {picks['seen']} |")
    print("\n### Training time per recipe (seconds, mean over every cell; one torch thread each)\n")
    print("| recipe | trial (on the fit part) | refit (every training question) |")
    print("|---|---|---|")
    print(f"| former default | {statistics.mean(c['former']['seconds'] for c in cells):.2f} | — |")
    for n in names:
        trial = statistics.mean(c["recipes"][n]["trial_seconds"] for c in cells)
        refit = statistics.mean(c["recipes"][n]["refit_seconds"] for c in cells)
        print(f"| {n} | {trial:.2f} | {refit:.2f} |")
    total = statistics.mean(sum(c["recipes"][n]["trial_seconds"] for n in names) for c in cells)
    print(f"\nAll trials of `adapter train` run one after another: {total:.1f} s per cell on average "
          "(it runs them on two threads, then refits the chosen one).\n")


def verify(data: dict, overrides: dict) -> None:
    """`adapter train`'s own function ships what the replayed choice says, on AppleQA by query, seed 1."""
    import numpy as np

    from adapter.config import Config
    from adapter.train import AUTO_RECIPES, train_on_vectors

    d = data["appleqa"]
    cell = run_cell((d, "appleqa", "query", 1, overrides, list(AUTO_RECIPES)))
    train, tests = scenario(d, "query", 1)
    r = train_on_vectors(train, d[4], d[3], "bench", Config().replace(seed=1, **overrides), progress=False)
    want = choose(cell, list(AUTO_RECIPES), "both", Config().train.safety_z, Config().train.simpler_within)
    got = _test_scores(r.adapter, d[4], d[3], tests)["test"]
    expected = cell["recipes"][want]["test"]["test"] if want != "identity" else {k: 1.0 for k in DIMS}
    assert r.recipe == want, (r.recipe, want)
    assert np.allclose([got[k] for k in DIMS], [expected[k] for k in DIMS]), (got, expected)
    print(f"verified: train_on_vectors chose {r.recipe} and shipped the replayed scores\n")


def speed(data: dict, rounds: int = 3) -> None:
    """`adapter train`'s training (trials, choice, refit: embedding excluded) against the former default's loop, side by
    side on AppleQA by query (seed 0), alternating, wall and CPU time (CPU seconds / 2 is the wall time on 2 idle
    cores; a shared machine inflates wall time, not CPU time)."""
    from adapter.config import Config
    from adapter.data import partition_qrels
    from adapter.train import AUTO_RECIPES, _subset, fit, train_on_vectors

    d = data["appleqa"]
    train, _ = scenario(d, "query", 0)
    cfg = Config()
    parts, _ = partition_qrels(train.qrels, by="query", test_fraction=cfg.split.val_fraction, seed=0)
    former = cfg.replace(recipe="manual", loss="triplet", epoch_choice="best", epochs=30)
    rows = {f"`adapter train` (default: {len(AUTO_RECIPES)} recipe trials on 2 threads, choice, refit)": [],
            "former default (triplet, 30 epochs, best on validation)": []}
    for _ in range(rounds):
        for name in rows:
            w, c = time.perf_counter(), time.process_time()
            if name.startswith("former"):
                fit(_subset(train, parts["train"]), _subset(train, parts["test"]), d[4], d[3], "bench", former,
                    progress=False)
            else:
                train_on_vectors(train, d[4], d[3], "bench", cfg, progress=False)
            rows[name].append((time.perf_counter() - w, time.process_time() - c))
    print("### Training time, AppleQA by query (embedding excluded; machine shared, so compare the ratio)\n")
    print("| training | wall s (each round) | CPU s (each round) | CPU s / 2 cores |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {', '.join(f'{w:.1f}' for w, _ in r)} | {', '.join(f'{c:.1f}' for _, c in r)} | "
              f"{min(c for _, c in r) / 2:.1f} |")
    new, old = (min(c for _, c in r) for r in rows.values())
    print(f"\nCPU time ratio, default against former default: {new / old:.1f}x\n")


def main() -> None:
    from adapter.config import Config
    from adapter.train import AUTO_RECIPES, RECIPES

    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--datasets", default="appleqa,waterops")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="Also write every cell's numbers here.")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Config override (JSON value).")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--speed", action="store_true", help="Only the training-time comparison.")
    p.add_argument("--from-json", type=Path, default=None, help="Render the tables from a --json file, run nothing.")
    a = p.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    seeds = [int(s) for s in a.seeds.split(",")]
    recipes = a.recipes.split(",")
    names = [n for n in AUTO_RECIPES if n in recipes]  # in the order adapter train tries them
    if a.from_json:
        cells = json.loads(a.from_json.read_text())
        print(f"{len(cells)} cells read from {a.from_json}.\n")
        report(cells, names, recipes, Config().replace(**overrides), sorted({c["seed"] for c in cells}), overrides)
        return
    data = load(a.shared, Path(tempfile.mkdtemp(prefix="bench-quality-")))
    if a.speed:
        speed(data)
        return
    if a.verify:
        verify(data, overrides)
    jobs = [(data[dn], dn, kind, seed, overrides, recipes) for dn in a.datasets.split(",")
            for kind in a.scenarios.split(",") for seed in seeds]
    t = time.perf_counter()
    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        cells = list(pool.map(run_cell, jobs))
    print(f"{len(cells)} cells in {time.perf_counter() - t:.0f} s on {a.jobs} processes (machine shared).\n")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(cells))
    report(cells, names, recipes, Config().replace(**overrides), seeds, overrides)


if __name__ == "__main__":
    main()
