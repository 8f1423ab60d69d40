"""Benchmark for the query-side LoRA fine-tune (issue #26, the experiment in bench/query_lora.py): on AppleQA and
waterops, split by query and by chunk, at full data and at a few questions per chunk, test ndcg@10 as a ratio to base
at every dim, the training seconds, the file's bytes, and the corpus texts embedded during training (asserted 0). The
epoch is chosen on a validation split carved from the training questions (the same kind of split, 20%), never on
test.

    python bench/bench_lora.py [--shared ../shared] [--datasets appleqa,waterops] [--scenarios query,chunk]
        [--shapes full,2] [--seeds 0] [--rank 8] [--lr 3e-4] [--epochs 3] [--batch-size 32] [--cost]

Each cell is merged into bench/results/lora.json (keyed by dataset, shape, scenario, seed and settings) as it
finishes, so a long run can be stopped and resumed. ``--cost`` times the merged encoder against the base per query.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
# the linear default's test ratios at dims 384 (by query, full and 2 per chunk), for the table
LINEAR = {("appleqa", "full", "query"): 1.372, ("waterops", "full", "query"): 1.122,
          ("appleqa", "2", "query"): 1.118, ("waterops", "2", "query"): 1.037}


def load(shared: Path, work: Path):
    """The encoder and both datasets as (queries {id: text}, qrels, corpus ids, corpus vectors), embedded once."""
    from adapter.data import convert, load_dataset, relevant
    from adapter.encoder import Encoder

    convert(shared / "data" / "appleqa" / "apple_QA_dataset.json", work / "appleqa")
    encoder = Encoder(MODEL, show_progress=False)
    out = {}
    for name, folder in (("appleqa", work / "appleqa"), ("waterops", ROOT / "data" / "waterops")):
        ds = load_dataset(folder)
        qrels = relevant(ds.split("all"))
        cids = list(ds.corpus)
        out[name] = ({q: ds.queries[q] for q in qrels}, qrels, cids,
                     encoder.encode_documents([ds.doc_text(c) for c in cids]))
    return encoder, out


def run_cell(encoder, data, dname: str, shape: str, kind: str, seed: int, cfg, work: Path) -> dict:
    """One (dataset, shape, split, seed): fit on train minus a validation carve, score test against base."""
    from bench_quality import subsample
    from query_lora import encode_queries, fit_query_lora, merged, save_query_lora
    from sentence_transformers import SentenceTransformer

    from adapter.data import partition_qrels
    from adapter.evaluate import evaluate

    queries, qrels, cids, corpus = data
    qrels = subsample(qrels, shape, seed)
    parts, _ = partition_qrels(qrels, by=kind, test_fraction=0.2, seed=seed)
    inner, _ = partition_qrels(parts["train"], by=kind, test_fraction=0.2, seed=seed)  # validation from train only
    fit_qrels, val_qrels, test = inner["train"], inner["test"], parts["test"]

    # every way a corpus text could be embedded during the fit, counted
    calls = {"encode_document": 0}
    original = SentenceTransformer.encode_document

    def counted(self, *a, **k):
        calls["encode_document"] += 1
        return original(self, *a, **k)

    before = encoder.texts_encoded
    SentenceTransformer.encode_document = counted
    try:
        result = fit_query_lora(encoder.model, queries, fit_qrels, corpus, cids, val=val_qrels, cfg=cfg, seed=seed,
                                base_model=MODEL)
    finally:
        SentenceTransformer.encode_document = original
    embedded = encoder.texts_encoded - before + calls["encode_document"]
    assert embedded == 0, f"the fit embedded {embedded} corpus texts"

    path = save_query_lora(result, work / f"{dname}-{shape}-{kind}-{seed}.safetensors", force=True)
    test_ids = list(test)
    texts = [queries[q] for q in test_ids]
    base_vec = encoder.encode_queries(texts)  # the cache's base vectors (what the index is searched with today)
    lora_vec = encode_queries(merged(result.model), texts)
    base = evaluate(base_vec, corpus, test, test_ids, cids, DIMS)
    got = evaluate(lora_vec, corpus, test, test_ids, cids, DIMS)
    return {"dataset": dname, "shape": shape, "scenario": kind, "seed": seed,
            "train_questions": len(fit_qrels), "val_questions": len(val_qrels), "test_questions": len(test_ids),
            "ratio": {d: got[d]["ndcg@10"] / base[d]["ndcg@10"] for d in DIMS},
            "test_ndcg": {d: got[d]["ndcg@10"] for d in DIMS}, "base_ndcg": {d: base[d]["ndcg@10"] for d in DIMS},
            "best_epoch": result.best_epoch, "history": result.history, "train_seconds": result.seconds,
            "train_cpu_seconds": result.cpu_seconds,
            "file_bytes": path.stat().st_size, "corpus_texts_embedded": embedded}


def query_cost(encoder, queries: list[str], cfg, rounds: int = 3) -> dict:
    """Seconds per query of the merged LoRA encoder and of the base, interleaved rounds, the fastest of each."""
    from query_lora import encode_queries, merged, with_lora

    lora = merged(with_lora(encoder.model, cfg))
    times: dict[str, list[float]] = {"base": [], "lora": []}
    for _ in range(rounds):
        for name, m in (("base", encoder.model), ("lora", lora)):
            t = time.perf_counter()
            encode_queries(m, queries)
            times[name].append((time.perf_counter() - t) / len(queries))
    base, ours = min(times["base"]), min(times["lora"])
    return {"queries": len(queries), "base_s_per_query": base, "lora_s_per_query": ours, "ratio": ours / base}


def main() -> None:
    from query_lora import LoraTrainConfig

    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--datasets", default="appleqa,waterops")
    p.add_argument("--scenarios", default="query,chunk")
    p.add_argument("--shapes", default="full,2")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rank", type=int, default=LoraTrainConfig.rank)
    p.add_argument("--lr", type=float, default=LoraTrainConfig.lr)
    p.add_argument("--epochs", type=int, default=LoraTrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=LoraTrainConfig.batch_size)
    p.add_argument("--targets", default=",".join(LoraTrainConfig.target_modules))
    p.add_argument("--layers", default="", help="Encoder layers given LoRA, comma-separated (default: all).")
    p.add_argument("--cost", action="store_true", help="Also time the merged encoder against the base per query.")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "lora.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("adapter.query_lora").setLevel(logging.INFO)
    cfg = LoraTrainConfig(rank=a.rank, alpha=2.0 * a.rank, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size,
                          target_modules=tuple(a.targets.split(",")),
                          layers=tuple(int(x) for x in a.layers.split(",")) if a.layers else None)
    settings = {"rank": cfg.rank, "alpha": cfg.alpha, "lr": cfg.lr, "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "targets": list(cfg.target_modules),
                "layers": list(cfg.layers) if cfg.layers else None}
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    encoder, data = load(a.shared, work)
    store = json.loads(a.json.read_text()) if a.json.exists() else {"cells": [], "cost": None}
    if a.cost:
        qs = list(data["appleqa"][0].values())[:512]
        store["cost"] = {"settings": settings, **query_cost(encoder, qs, cfg)}
        print(json.dumps(store["cost"]))
    for dname in a.datasets.split(","):
        for kind in a.scenarios.split(","):
            for shape in a.shapes.split(","):
                for seed in (int(s) for s in a.seeds.split(",")):
                    cell = run_cell(encoder, data[dname], dname, shape, kind, seed, cfg, work)
                    cell["settings"] = settings
                    key = lambda c: (c["dataset"], c["shape"], c["scenario"], c["seed"], json.dumps(c["settings"]))  # noqa: E731
                    if a.json.exists():  # another run may have added cells meanwhile
                        store["cells"] = json.loads(a.json.read_text())["cells"]
                    store["cells"] = [c for c in store["cells"] if key(c) != key(cell)] + [cell]
                    a.json.parent.mkdir(parents=True, exist_ok=True)
                    a.json.write_text(json.dumps(store, indent=1))
                    r = cell["ratio"]
                    print(f"{dname} {shape} {kind} seed {seed}: x{r[384]:.3f} @384, x{r[64]:.3f} @64; epoch "
                          f"{cell['best_epoch']}, val {[round(h.get('ndcg@10', 0), 4) for h in cell['history']]}, "
                          f"{cell['train_seconds']:.0f} s ({cell['train_cpu_seconds']:.0f} CPU s), "
                          f"{cell['file_bytes']} bytes "
                          f"(linear default x{LINEAR.get((dname, shape, kind), float('nan')):.3f})", flush=True)


if __name__ == "__main__":
    main()
