"""Tiny adapters (issue #7): file size against test ndcg@10 on AppleQA's query split (seed 0) with the bundled
MiniLM. Every row trains with the defaults, changing only --rank and --dtype, exactly as
`adapter train DIR --out FILE [--rank R] [--dtype float16]` does, then loads the file back and scores it. The default
loss ("auto") is triplet for the full matrix and InfoNCE for the low-rank form; a second table trains the low-rank
rows with `--loss triplet` to show why.

    python bench/bench_tiny.py [--shared ../shared] [--cache-dir DIR] [--seeds 0,1,2,3,4]

Prints Markdown on stdout (BENCHMARKS.md quotes it) and writes every row to bench/results/tiny.json. --seeds repeats
the full and the rank-16 float16 rows with other training seeds (the split stays seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
ROWS = [("full 384×384", None), ("rank 64", 64), ("rank 32", 32), ("rank 16", 16), ("rank 8", 8)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache to reuse [default: a fresh one]")
    p.add_argument("--seeds", default="0", help="training seeds for the rank-16 float16 row")
    a = p.parse_args()

    from common import appleqa

    from adapter.choice import train_adapter
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.encoder import Encoder
    from adapter.model import LinearAdapter
    from adapter.pipeline import evaluate_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    ds = load_dataset(appleqa(a.shared, work))
    encoder = Encoder("sentence-transformers/all-MiniLM-L6-v2", cache_dir=a.cache_dir or work / "cache",
                      show_progress=False)

    def score(path: Path) -> float:
        r = evaluate_dataset(ds, Config().replace(split="test", dims=(384,)), encoder=encoder,
                             adapters={"a": LinearAdapter.load(path)})
        return r["base"][384]["ndcg@10"], r["a"][384]["ndcg@10"]

    out: dict = {"dataset": "AppleQA, split by query, seed 0", "test_queries": len(ds.split("test")), "runs": []}

    def run(rank: int | None, dtype: str, seed: int = 0, **over) -> tuple[int, float, float, int]:
        cfg = Config().replace(rank=rank, dtype=dtype, seed=seed, train=over)
        result = train_adapter(ds, cfg, encoder=encoder, progress=False)
        name = "-".join(map(str, (f"r{rank}", dtype, seed, *over.values())))  # a --loss triplet row beside its twin
        path = result.adapter.save(work / f"{name}.safetensors", dtype=cfg.train.dtype, force=True)  # seed 0 twice
        base, adapted = score(path)
        out["runs"].append({"rank": rank, "dtype": dtype, "seed": seed, **over, "bytes": path.stat().st_size,
                            "recipe": result.recipe, "base_ndcg@10": base, "ndcg@10": adapted,
                            "best_epoch": result.best_epoch})
        return path.stat().st_size, base, adapted, result.best_epoch

    print(f"AppleQA (query split, seed 0, {len(ds.split('test'))} test queries), all-MiniLM-L6-v2, defaults except "
          "rank and dtype.\n")
    print("| adapter | dtype | file size | test ndcg@10 | gain over base | share of the full float32 gain | "
          "epoch won |")
    print("|---|---|---|---|---|---|---|")
    full_gain = None
    for name, rank in ROWS:
        for dtype in ("float32", "float16"):
            size, base, adapted, epoch = run(rank, dtype)
            full_gain = full_gain if full_gain is not None else adapted - base
            print(f"| {name} | {dtype} | {size / 1000:.1f} KB ({size:,} bytes) | {adapted:.4f} | "
                  f"{adapted - base:+.4f} | {(adapted - base) / full_gain:.0%} | {epoch} |")
    print(f"\nBase (no adapter): test ndcg@10 {base:.4f}.\n")
    print("The low-rank rows again with `--set train.loss=triplet` (the full matrix's loss), float16:\n")
    print("| adapter | test ndcg@10 | share of the full float32 gain | epoch won |")
    print("|---|---|---|---|")
    for name, rank in ROWS[1:]:
        _, base, adapted, epoch = run(rank, "float16", loss="triplet")
        print(f"| {name} | {adapted:.4f} | {(adapted - base) / full_gain:.0%} | {epoch} |")
    seeds = [int(s) for s in a.seeds.split(",")]
    if seeds != [0]:
        print("\nOther training seeds (same split): rank 16 float16 against the full float32 adapter of that seed.\n")
        print("| seed | full ndcg@10 | rank 16 float16 ndcg@10 | its file size | share of that seed's full gain |")
        print("|---|---|---|---|---|")
        for seed in seeds:
            _, base, full, _ = run(None, "float32", seed)
            size, _, tiny, _ = run(16, "float16", seed)
            print(f"| {seed} | {full:.4f} | {tiny:.4f} | {size:,} bytes | {(tiny - base) / (full - base):.0%} |")
            out.setdefault("rank16_float16_share_by_seed", {})[seed] = (tiny - base) / (full - base)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "tiny.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
