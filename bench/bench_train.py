"""Benchmark for the query adapter (issue #3) on AppleQA with the bundled MiniLM, defaults only unless a row says
otherwise: quality on a query split and a chunk split, the identity-penalty trade-off, speed against the seed
notebook's recipe, file sizes, and the cost of applying the adapter to one query.

    python bench/bench_train.py [--shared ../shared] [--skip-speed] [--skip-tradeoff]

Prints Markdown on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def test_scores(ds, encoder, adapter) -> tuple[dict, dict]:
    from adapter.config import Config
    from adapter.pipeline import evaluate_dataset

    r = evaluate_dataset(ds, Config().replace(split="test", dims=(encoder.dim,)), encoder=encoder,
                         adapters={"adapter": adapter})
    return r["base"][encoder.dim], r["adapter"][encoder.dim]


def quality(folders: dict[str, Path], encoder, tradeoff: bool) -> None:
    from adapter.choice import train_adapter
    from adapter.config import Config
    from adapter.data import load_dataset

    print("### Defaults on both splits (test set, dim 384)\n")
    print("| split | base ndcg@10 | adapter ndcg@10 | ratio | base accuracy@10 | adapter accuracy@10 | epoch won |"
          " training loop |")
    print("|---|---|---|---|---|---|---|---|")
    for by, folder in folders.items():
        ds = load_dataset(folder)
        r = train_adapter(ds, Config(), encoder=encoder, progress=False)
        b, a = test_scores(ds, encoder, r.adapter)
        print(f"| by {by} | {b['ndcg@10']:.4f} | {a['ndcg@10']:.4f} | {a['ndcg@10'] / b['ndcg@10']:.3f}x | "
              f"{b['accuracy@10']:.4f} | {a['accuracy@10']:.4f} | {r.best_epoch} | {r.seconds:.2f} s |")
    print()
    if not tradeoff:
        return
    print("### Trade-off: seen chunks against unseen chunks\n")
    print("Test ndcg@10 as a ratio to base. *Query split*: test questions about chunks the adapter trained on. "
          "*Chunk split, guarded*: unseen chunks, with the default validation carved by chunk (as the split was). "
          "*Chunk split, unguarded*: the same adapter settings selected on a query-carved validation slice, which "
          "is what happens when validation does not mirror the unseen-chunk case.\n")
    print("| setting | query split | chunk split, guarded | chunk split, unguarded |")
    print("|---|---|---|---|")
    rows = [("identity penalty 0 (default)", {}), ("identity penalty 0.001", {"identity_penalty": 0.001}),
            ("identity penalty 0.01", {"identity_penalty": 0.01}), ("identity penalty 0.1", {"identity_penalty": 0.1}),
            ("rank 16", {"rank": 16}),
            ("rank 64", {"rank": 64}), ("seed settings: margin 1.0, 1 negative", {"margin": 1.0,
                                                                                 "negatives_per_query": 1})]
    for name, over in rows:
        cells = []
        for by, guard in (("query", True), ("chunk", True), ("chunk", False)):
            ds = load_dataset(folders[by])
            if not guard:
                (folders[by] / "split.json").rename(folders[by] / "split.json.off")  # validation falls back to query
            try:
                r = train_adapter(ds, Config().replace(**over), encoder=encoder, progress=False)
            finally:
                if not guard:
                    (folders[by] / "split.json.off").rename(folders[by] / "split.json")
            b, a = test_scores(ds, encoder, r.adapter)
            cells.append(f"{a['ndcg@10'] / b['ndcg@10']:.3f}x")
        print(f"| {name} | {' | '.join(cells)} |")
    print()


def seed_recipe_seconds(model, ds, n_batches: int = 3, batch: int = 32) -> tuple[float, int]:
    """The seed notebook's loop: every triplet's three texts encoded one at a time, every epoch. Times
    ``n_batches`` batches and returns (seconds per batch, batches per epoch)."""
    import numpy as np
    import torch

    from adapter.data import relevant

    qrels = relevant(ds.split("train"))
    pairs = [(q, c) for q, rels in qrels.items() for c in rels]
    cids = list(ds.corpus)
    rng = np.random.default_rng(0)
    weight = torch.nn.Parameter(torch.eye(384))
    opt = torch.optim.AdamW([weight], lr=3e-3)
    loss_fn = torch.nn.TripletMarginLoss(margin=1.0)
    t = time.perf_counter()
    for b in range(n_batches):
        anchors, positives, negatives = [], [], []
        for q, c in pairs[b * batch:(b + 1) * batch]:
            neg = cids[rng.integers(len(cids))]
            for text, out in ((ds.queries[q], anchors), (ds.doc_text(c), positives), (ds.doc_text(neg), negatives)):
                out.append(torch.from_numpy(model.encode(text, convert_to_numpy=True)))
        a = torch.nn.functional.normalize(torch.stack(anchors) @ weight, dim=-1)
        loss = loss_fn(a, torch.stack(positives), torch.stack(negatives))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / n_batches, -(-len(pairs) // batch)


def speed(folders: dict[str, Path], model, encoder) -> None:
    from adapter.choice import train_adapter
    from adapter.config import Config
    from adapter.data import load_dataset

    ds = load_dataset(folders["query"])
    # the loop first: right after multi-threaded encoding, idle OpenMP workers still spin and slow a 1-thread loop
    loops = [train_adapter(ds, Config(), encoder=encoder, progress=False).seconds for _ in range(3)]
    per_batch, batches = seed_recipe_seconds(model, ds)
    seed_total = per_batch * batches * 30
    cache = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    out = cache / "a.safetensors"
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "-q", "train", str(folders["query"]), "--out", str(out),
                    "--set", "train.epochs=30", "--cache-dir", str(cache)], check=True, cwd=ROOT, capture_output=True)
    cold = time.perf_counter() - t
    shutil.rmtree(cache)
    print("### Speed (30 epochs, AppleQA query split)\n")
    print("| | wall time |")
    print("|---|---|")
    print(f"| seed recipe: 3 texts encoded one at a time per triplet, every epoch ({per_batch:.2f} s per batch of 32 "
          f"x {batches} batches x 30 epochs, extrapolated from 3 timed batches) | {seed_total:,.0f} s |")
    print(f"| `adapter train --epochs 30`, cold cache, end to end (process start, model load, embedding every text "
          f"once, training, writing) | {cold:.1f} s ({seed_total / cold:,.0f}x faster) |")
    print(f"| training loop alone on a warm cache (best of 3; runs: {', '.join(f'{s:.2f}' for s in loops)}) | "
          f"{min(loops):.2f} s |\n")


def size_and_latency(folders: dict[str, Path], model, encoder) -> None:
    import numpy as np

    from adapter.choice import train_adapter
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.model import LinearAdapter

    ds = load_dataset(folders["query"])
    work = Path(tempfile.mkdtemp(prefix="bench-size-"))
    print("### File size and query-time cost\n")
    print("| adapter | file size | test ndcg@10 |")
    print("|---|---|---|")
    full = None
    for name, over, dtype in (("full 384x384, float32", {}, "float32"), ("rank 16, float32", {"rank": 16}, "float32"),
                              ("rank 16, float16", {"rank": 16}, "float16")):
        r = train_adapter(ds, Config().replace(**over), encoder=encoder, progress=False)
        path = r.adapter.save(work / f"{len(over)}{dtype}.safetensors", dtype=dtype)
        loaded = LinearAdapter.load(path)
        full = full or loaded
        _, a = test_scores(ds, encoder, loaded)
        print(f"| {name} | {path.stat().st_size / 1024:.1f} KiB ({path.stat().st_size:,} bytes) | "
              f"{a['ndcg@10']:.4f} |")
    query = ds.queries[next(iter(ds.split("test")))]
    enc_t, app_t = [], []
    for _ in range(200):
        t = time.perf_counter()
        v = model.encode_query([query], normalize_embeddings=True, convert_to_numpy=True)
        enc_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        full.apply(v)
        app_t.append(time.perf_counter() - t)
    e, a = statistics.median(enc_t), statistics.median(app_t)
    assert np.isfinite(a)
    print(f"\nOne query, median of 200: encoding {e * 1000:.2f} ms, applying the full adapter (numpy) "
          f"{a * 1e6:.1f} µs = {a / e:.2%} of encoding.\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-tradeoff", action="store_true")
    a = p.parse_args()
    from adapter.encoder import Encoder, load_model

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    from common import appleqa

    folders = {by: appleqa(a.shared, work, by) for by in ("query", "chunk")}
    model = load_model()
    encoder = Encoder(model, cache_dir=work / "cache", show_progress=False)
    print(f"AppleQA ({a.shared / 'data/appleqa'}), all-MiniLM-L6-v2, seed 0, 20% held out.\n")
    quality(folders, encoder, tradeoff=not a.skip_tradeoff)
    if not a.skip_speed:
        speed(folders, model, encoder)
    size_and_latency(folders, model, encoder)


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "train")
