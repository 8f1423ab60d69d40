"""Benchmark for the query-side LoRA (issue #26): `adapter train --form lora` as it ships, beside the linear default,
`--objective seen` and a one-epoch full fine-tune, on the grid of bench_quality.py.

- Datasets: AppleQA (../shared/data/appleqa) and the bundled waterops; shapes: every question ("full") or a seeded
  2 per chunk; splits by query and by chunk, 20% held out; split seeds 0-4 (the subsample, the split and the
  training seed), exactly bench_quality.py's cells.
- LoRA: ``adapter.choice.train_on_vectors`` with ``train.form`` "lora" (or "auto": both forms compete), the cached
  query and chunk vectors and the questions' texts: its one-fold trial, the choice against the identity and the
  refit, as `adapter train` runs them. Every text embedded while it trains is counted (asserted 0).
- Linear default and `--objective seen`: read from bench/results/quality.json (bench_quality.py, the same cells).
- One-epoch full fine-tune (``--finetune``): ``adapter.finetune.finetune`` with finetune.epochs=1 at 128 tokens
  (bench_finetune.py's CPU sizing) on the same training questions, scored with the corpus re-embedded by it.
- ``--cost``: seconds per query of a merged LoRA encoder against the base, interleaved rounds, the best of each.

    python bench/bench_lora.py [--shared ../shared] [--datasets appleqa,waterops] [--scenarios query,chunk]
        [--shapes full,2] [--seeds 0,1,2,3,4] [--forms lora] [--finetune] [--cost] [--report]

Cells merge into bench/results/lora.json as they finish (a long run can stop and resume: ``--skip-done``).
``--report`` prints the Markdown table BENCHMARKS.md quotes: test ndcg@10 as a ratio to base, mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DIMS = (384, 256, 128, 64)
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
RESULTS = ROOT / "bench" / "results" / "lora.json"


def load(shared: Path, work: Path) -> tuple:
    """The encoder and both datasets as bench_quality's tuples plus the question texts and the dataset."""
    from adapter.data import convert, load_dataset, relevant
    from adapter.encoder import Encoder

    convert(shared / "data" / "appleqa" / "apple_QA_dataset.json", work / "appleqa")
    encoder = Encoder(MODEL, show_progress=False)
    out = {}
    for name, folder in (("appleqa", work / "appleqa"), ("waterops", ROOT / "data" / "waterops")):
        ds = load_dataset(folder)
        qrels = relevant(ds.split("all"))
        qids, cids = list(qrels), list(ds.corpus)
        out[name] = ((qids, encoder.encode_queries([ds.queries[q] for q in qids]), qrels, cids,
                      encoder.encode_documents([ds.doc_text(c) for c in cids])), {q: ds.queries[q] for q in qids}, ds)
    return encoder, out


def ratios(vectors, base_vectors, corpus, split, cids) -> dict[int, float]:
    from adapter.evaluate import evaluate

    base = evaluate(base_vectors, corpus, split.qrels, split.ids, cids, DIMS)
    got = evaluate(vectors, corpus, split.qrels, split.ids, cids, DIMS)
    return {str(d): got[d]["ndcg@10"] / base[d]["ndcg@10"] for d in DIMS}


def lora_cell(encoder, data, dname: str, shape: str, kind: str, seed: int, form: str, work: Path) -> dict:
    """`adapter train --form FORM` on one cell, scored on its test questions. For "lora": the trial and the refit
    run once (``adapter.choice.Trials``), and the choice is read for both objectives from the trial's row: what
    `--form lora` ships (the LoRA, or the identity when it does not clear validation), what `--objective seen`
    ships, and the LoRA refit itself (what `--recipe lora` ships)."""
    from bench_quality import scenario
    from sentence_transformers import SentenceTransformer

    from adapter.choice import LORA, QueryRoute, Trials, resolve_train, select, train_on_vectors
    from adapter.config import Config
    from adapter.lora import QueryLora

    arrays, texts, _ = data
    _, _, _, cids, corpus = arrays
    train, tests = scenario(arrays, shape, kind, seed)
    test = tests["test"]
    cfg = resolve_train(Config().replace(seed=seed, train={"form": form}))
    route = QueryRoute(encoder.model, {q: texts[q] for q in train.ids})
    calls = {"documents": 0}
    original = SentenceTransformer.encode_document

    def counted(self, sentences, *a, **k):  # any corpus text the fit would embed
        calls["documents"] += len(sentences) if isinstance(sentences, list) else 1
        return original(self, sentences, *a, **k)

    before = encoder.texts_encoded
    SentenceTransformer.encode_document = counted
    t, c = time.perf_counter(), time.process_time()
    try:
        if form == LORA:
            trials = Trials(train, corpus, cids, encoder.identity, cfg, route)
            trials.run_lora(None, None)
            rows = [dict(trials.fitted[LORA][0])]
            tc = cfg.train
            picks = {o: select([dict(r) for r in rows], o, tc.safety_z, tc.simpler_within) for o in ("both", "seen")}
            adapter = trials.refit(LORA).adapter
            recipe = LORA if picks["both"] is not None else "identity"
        else:
            r = train_on_vectors(train, corpus, cids, encoder.identity, cfg, progress=False, route=route)
            adapter, rows, recipe, picks = r.adapter, r.trials, r.recipe, {}
    finally:
        SentenceTransformer.encode_document = original
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    embedded = encoder.texts_encoded - before + calls["documents"]
    assert embedded == 0, f"training embedded {embedded} corpus texts"
    lora = isinstance(adapter, QueryLora)
    vectors = adapter.encode_queries([texts[q] for q in test.ids]) if lora else adapter.apply(test.vectors)
    path = adapter.save(work / f"{dname}-{shape}-{kind}-{seed}-{form}.safetensors", force=True)
    fitted = ratios(vectors, test.vectors, corpus, test, cids)
    ones = {d: 1.0 for d in fitted}
    shipped = {o: fitted if p is not None else ones for o, p in picks.items()} or {"both": fitted}
    return {"dataset": dname, "shape": shape, "scenario": kind, "seed": seed, "form": form, "recipe": recipe,
            "questions": len(train.ids), "test_questions": len(test.ids), "ratio": shipped["both"],
            "ratio_seen": shipped.get("seen"), "ratio_fitted": fitted, "trials": rows,
            "train_seconds": seconds, "train_cpu_seconds": cpu, "file_bytes": path.stat().st_size,
            "corpus_texts_embedded": embedded}


def finetune_cell(encoder, data, dname: str, shape: str, kind: str, seed: int, work: Path) -> dict:
    """A one-epoch full fine-tune on the cell's training questions, scored with the corpus re-embedded."""
    from bench_quality import scenario

    from adapter.config import Config
    from adapter.data import Dataset
    from adapter.encoder import Encoder
    from adapter.finetune import finetune

    arrays, texts, ds = data
    _, _, _, cids, corpus = arrays
    train, tests = scenario(arrays, shape, kind, seed)
    test = tests["test"]
    folder = work / f"ft-{dname}-{shape}-{kind}-{seed}"
    cell_ds = Dataset(ds.corpus, ds.queries, {"train": train.qrels, "test": test.qrels}, ds.titles, work / dname)
    cfg = Config().replace(seed=seed, finetune={"epochs": 1, "max_seq_length": 128})  # bench_finetune.py's CPU sizing
    t, c = time.perf_counter(), time.process_time()
    finetune(cell_ds, folder, cfg, progress=False)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    tuned = Encoder(str(folder), cache_dir=work / "ft-cache", show_progress=False)
    own = tuned.encode_documents([ds.doc_text(c) for c in cids])
    from adapter.evaluate import evaluate

    base = evaluate(test.vectors, corpus, test.qrels, test.ids, cids, DIMS)
    got = evaluate(tuned.encode_queries([texts[q] for q in test.ids]), own, test.qrels, test.ids, cids, DIMS)
    return {"dataset": dname, "shape": shape, "scenario": kind, "seed": seed, "form": "finetune-1",
            "ratio": {str(d): got[d]["ndcg@10"] / base[d]["ndcg@10"] for d in DIMS}, "train_seconds": seconds,
            "train_cpu_seconds": cpu}


def query_cost(encoder, queries: list[str], rounds: int = 5) -> dict:
    """Seconds per query of a merged LoRA encoder (the default shape, B random) and of the base, one query a call,
    interleaved rounds, the best of each."""
    import torch

    from adapter.config import LoraConfig
    from adapter.lora import encode_queries, lora_settings, merged, with_lora

    lora = with_lora(encoder.model, LoraConfig.r, lora_settings(LoraConfig(), encoder.model))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    lora = merged(lora)
    times: dict[str, list[float]] = {"base": [], "lora": []}
    for _ in range(rounds):
        for name, m in (("base", encoder.model), ("lora", lora)):
            t = time.perf_counter()
            for q in queries:
                encode_queries(m, [q])
            times[name].append((time.perf_counter() - t) / len(queries))
    base, ours = min(times["base"]), min(times["lora"])
    return {"queries": len(queries), "base_s_per_query": base, "lora_s_per_query": ours, "ratio": ours / base}


def key(c: dict) -> tuple:
    return c["dataset"], c["shape"], c["scenario"], c["seed"], c["form"]


def save(store: dict, path: Path) -> None:
    if path.exists():  # another run may have added cells meanwhile
        fresh = json.loads(path.read_text())
        mine = {key(c) for c in store["cells"]}
        store["cells"] = store["cells"] + [c for c in fresh["cells"] if key(c) not in mine]
        store["cost"] = store.get("cost") or fresh.get("cost")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(store, indent=1))
    tmp.replace(path)


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}x (1 seed)"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f}x ±{sd:.3f}"


def report(store: dict, quality: Path) -> None:
    """The table: per dataset, shape and split, each system's test ratio at 384 (mean ± sd over the seeds run) and
    at 64 (mean)."""
    from bench_quality import replay, shipped

    from adapter.choice import GAIN_Z

    q = {(c["dataset"], c["shape"], c["scenario"], c["seed"]): c for c in json.loads(quality.read_text())} \
        if quality.exists() else {}
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for c in store["cells"]:
        groups.setdefault((c["dataset"], c["shape"], c["scenario"]), {}).setdefault(c["form"], []).append(c)
    print("| data | per chunk | split | seeds | `--form lora` | the LoRA as fitted (`--recipe lora`) | "
          "linear default | linear, `--objective seen` | one-epoch fine-tune | LoRA shipped (default / seen) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for (d, shape, kind), forms in sorted(groups.items()):
        cells = sorted(forms.get("lora", []), key=lambda c: c["seed"])
        if not cells:
            continue
        seeds = [c["seed"] for c in cells]
        lin = [q[(d, shape, kind, s)] for s in seeds if (d, shape, kind, s) in q]
        systems = ([c["ratio"] for c in cells], [c["ratio_fitted"] for c in cells], [c["default"]["test"] for c in lin],
                   [shipped(c, replay(c, "seen", GAIN_Z))["test"] for c in lin],
                   [c["ratio"] for c in forms.get("finetune-1", [])])
        row = [d, shape, kind, ",".join(map(str, seeds))]
        for values in systems:  # at 384 with its spread, then at 64
            at = [[v[k] if k in v else v[int(k)] for v in values] for k in ("384", "64")]
            row.append(f"{fmt(at[0])} / {statistics.mean(at[1]):.3f}x" if values else "—")
        by_seen = sum(replay(c, "seen", GAIN_Z) == "lora" for c in cells)  # the LoRA's row under --objective seen
        row.append(f"{sum(c['recipe'] == 'lora' for c in cells)} / {by_seen} of {len(cells)}")
        print("| " + " | ".join(row) + " |")
    lora = [c for c in store["cells"] if c["form"] == "lora"]
    for kind in sorted({c["scenario"] for c in lora}):
        low = min(((v, c) for c in lora if c["scenario"] == kind for v in c["ratio"].values()), key=lambda x: x[0])
        print(f"\nLowest `--form lora` cell by {kind} (any data, shape, seed, dim): {low[0]:.3f}x "
              f"({low[1]['dataset']}, {low[1]['shape']}, seed {low[1]['seed']})", end="")
    print()
    if lora:
        print(f"\nLoRA training: at most {max(c['train_seconds'] for c in lora):.0f} s wall, "
              f"{max(c['train_cpu_seconds'] for c in lora):.0f} s CPU; files at most "
              f"{max(c['file_bytes'] for c in lora):,} bytes; corpus texts embedded: "
              f"{sum(c['corpus_texts_embedded'] for c in lora)}")
    if store.get("cost"):
        c = store["cost"]
        print(f"Query cost, merged LoRA / base: {c['ratio']:.3f}x ({c['lora_s_per_query'] * 1000:.1f} ms / "
              f"{c['base_s_per_query'] * 1000:.1f} ms per query, {c['queries']} queries one at a time)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--datasets", default="appleqa,waterops")
    p.add_argument("--scenarios", default="query,chunk")
    p.add_argument("--shapes", default="full,2")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--forms", default="lora", help="Training forms to run: lora, auto.")
    p.add_argument("--finetune", action="store_true", help="Also the one-epoch full fine-tune of each cell.")
    p.add_argument("--cost", action="store_true", help="Time a merged LoRA encoder against the base per query.")
    p.add_argument("--skip-done", action="store_true", help="Skip cells already in the results file.")
    p.add_argument("--report", action="store_true", help="Only print the table from the results file.")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--quality", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    a = p.parse_args()
    store = json.loads(a.json.read_text()) if a.json.exists() else {"cells": [], "cost": None}
    store.setdefault("cells", [])
    if a.report:
        report(store, a.quality)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    encoder, data = load(a.shared, work)
    if a.cost:
        store["cost"] = query_cost(encoder, list(data["appleqa"][1].values())[:100])
        save(store, a.json)
    done = {key(c) for c in store["cells"]}
    forms = a.forms.split(",") + (["finetune-1"] if a.finetune else [])
    for shape in a.shapes.split(","):
        for kind in a.scenarios.split(","):
            for dname in a.datasets.split(","):
                for seed in (int(s) for s in a.seeds.split(",")):
                    for form in forms:
                        if a.skip_done and (dname, shape, kind, seed, form) in done:
                            continue
                        cell = (finetune_cell(encoder, data[dname], dname, shape, kind, seed, work)
                                if form == "finetune-1" else
                                lora_cell(encoder, data[dname], dname, shape, kind, seed, form, work))
                        store["cells"] = [c for c in store["cells"] if key(c) != key(cell)] + [cell]
                        save(store, a.json)
                        r = cell["ratio"]
                        print(f"{dname} {shape} {kind} seed {seed} {form}: x{r['384']:.3f} @384, x{r['64']:.3f} @64, "
                              f"{cell.get('recipe', '')} {cell['train_seconds']:.0f} s", flush=True)
    report(store, a.quality)


if __name__ == "__main__":
    main()
