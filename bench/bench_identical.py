"""Does a change leave what `adapter train` writes alone? Every adapter file the default and each named recipe write on
AppleQA and waterops (split seeds 0-2, split by query and by chunk), compared with the files an earlier checkout wrote.

Each run writes its files and a manifest (the tensors' SHA-256 and the metadata without wall times) under ``--out``;
``--against DIR`` compares with another run's folder: a file is "identical" when its tensors and its metadata are the
same bytes, otherwise the largest absolute difference of any tensor is printed.

    python bench/bench_identical.py --out runs/identical-new [--against runs/identical-old] [--shared ../shared]
                                    [--seeds 0,1,2] [--datasets appleqa,waterops]

The result goes to bench/results/identical.json when ``--against`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timeless(value):
    """The metadata without wall times (the only thing two runs of the same code may differ in)."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if not str(k).endswith("seconds")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def _recipes() -> list[str]:
    from adapter.choice import AUTO_RECIPES

    return list(AUTO_RECIPES)


def _dataset(name: str, shared: Path, work: Path, by: str, seed: int) -> Path:
    from adapter.data import convert, split_dataset

    out = work / f"{name}-{by}-{seed}"
    if out.exists():
        shutil.rmtree(out)
    if name == "appleqa":
        convert(shared / "data" / "appleqa" / "apple_QA_dataset.json", out)
    else:
        shutil.copytree(ROOT / "data" / name, out)
    split_dataset(out, by=by, test_fraction=0.2, seed=seed)
    return out


def run(args: argparse.Namespace) -> dict:
    from adapter.choice import train_adapter
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.encoder import Encoder
    from adapter.model import LinearAdapter

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = Encoder(show_progress=False)
    manifest = {}
    for name in args.datasets.split(","):
        for by in ("query", "chunk"):
            for seed in (int(s) for s in args.seeds.split(",")):
                data = load_dataset(_dataset(name, Path(args.shared), out / "data", by, seed))
                for recipe in ["default", *_recipes()]:
                    cfg = Config().replace(seed=seed, **({} if recipe == "default" else {"recipe": recipe}))
                    t = time.perf_counter()
                    result = train_adapter(data, cfg, encoder=encoder, progress=False)
                    key = f"{name}-{by}-{seed}-{recipe}"
                    path = result.adapter.save(out / f"{key}.safetensors", force=True)
                    saved = LinearAdapter.load(path)
                    manifest[key] = {
                        "tensors": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in saved.tensors().items()},
                        "metadata": hashlib.sha256(json.dumps(_timeless(saved.metadata), sort_keys=True)
                                                   .encode()).hexdigest(),
                        "recipe": result.recipe}
                    print(f"{key}: {result.recipe} ({time.perf_counter() - t:.0f} s)", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def compare(new: Path, old: Path) -> dict:
    import numpy as np

    from adapter.model import LinearAdapter

    a, b = (json.loads((p / "manifest.json").read_text()) for p in (new, old))
    rows = {}
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            rows[key] = {"status": "missing in " + ("new" if key not in a else "old")}
            continue
        if a[key] == b[key]:
            rows[key] = {"status": "identical"}
            continue
        x, y = LinearAdapter.load(new / f"{key}.safetensors"), LinearAdapter.load(old / f"{key}.safetensors")
        tx, ty = x.tensors(), y.tensors()
        diff = max((float(np.max(np.abs(tx[k].astype(np.float64) - ty[k]))) for k in tx if k in ty
                    and tx[k].shape == ty[k].shape), default=float("inf"))
        rows[key] = {"status": "tensors differ" if a[key]["tensors"] != b[key]["tensors"] else "metadata differs",
                     "max_abs_diff": diff,
                     "metadata_keys_differ": sorted(k for k in set(x.metadata) | set(y.metadata)
                                                    if _timeless(x.metadata.get(k)) != _timeless(y.metadata.get(k)))}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--against")
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--datasets", default="appleqa,waterops")
    p.add_argument("--compare-only", action="store_true", help="compare --out with --against without training")
    args = p.parse_args()
    if not args.compare_only:
        run(args)
    if args.against:
        rows = compare(Path(args.out), Path(args.against))
        same = sum(r["status"] == "identical" for r in rows.values())
        print(f"\n{same} of {len(rows)} adapter files identical (tensors and metadata, wall times aside)")
        for key, r in rows.items():
            if r["status"] != "identical":
                print(f"- {key}: {r}")
        results = ROOT / "bench" / "results"
        results.mkdir(exist_ok=True)
        (results / "identical.json").write_text(json.dumps({"files": len(rows), "identical": same, "rows": rows},
                                                           indent=1) + "\n")


if __name__ == "__main__":
    main()
