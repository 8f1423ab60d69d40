"""The main job on the bundled data and model: split, embed, train an adapter, optionally fine-tune, compare.

It is what `adapter demo` runs and what a newcomer sees first, so it uses only the public pieces a user would call.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from adapter.config import DEMO_OUT, Config
from adapter.data import atomic_write, convert, ensure_dir, load_dataset, split_dataset
from adapter.errors import AdapterError

logger = logging.getLogger(__name__)

BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data" / "waterops"
MARKER = "demo.json"  # written into every demo folder, so a rerun may replace it and nothing else
DEMO_FINETUNE = {"finetune": {"epochs": 1, "max_seq_length": 128, "grad_accum": 1}}  # a few CPU minutes, not an hour


@dataclass
class DemoResult:
    """Where the demo put things, and what the comparison measured."""

    out: Path
    adapter: Path
    report: Path
    finetuned: Path | None
    comparison: object  # adapter.report.Comparison
    seconds: float


def _claim(out: Path) -> None:
    """Make ``out`` ours: a new or empty folder, or one a previous demo wrote (then cleared)."""
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise AdapterError(f"{out}: not empty and not written by `adapter demo`; choose another --out")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    ensure_dir(out)


def run_demo(out: str | os.PathLike = DEMO_OUT, cfg: Config | None = None, *, with_finetune: bool = False,
             data: str | os.PathLike = BUNDLED_DATA, progress: bool = True) -> DemoResult:
    """Split the bundled dataset by query, train an adapter on the cached embeddings, fine-tune the encoder when
    asked, and write the side-by-side report; returns where everything is."""
    from adapter.choice import train_adapter
    from adapter.encoder import Encoder
    from adapter.pipeline import compare

    cfg = cfg or Config()
    data, out = Path(data), Path(out)
    if not (data / "corpus.jsonl").is_file():
        raise AdapterError(f"{data}: bundled data not found (run from a source checkout of the project)")
    t0 = time.perf_counter()
    _claim(out)
    with atomic_write(out / MARKER) as f:
        json.dump({"config": cfg.to_dict(), "with_finetune": with_finetune}, f, indent=2)
    convert(data, out / "data", force=True)
    split_dataset(out / "data", cfg)
    ds = load_dataset(out / "data")
    logger.info("1/3 training the adapter")
    encoder = Encoder.from_config(cfg, show_progress=progress)
    adapter_path = train_adapter(ds, cfg, encoder=encoder, progress=progress).adapter.save(out / "adapter.safetensors",
                                                                                    dtype=cfg.train.dtype)
    finetuned = None
    if with_finetune:
        from adapter.finetune import finetune

        logger.info("2/3 fine-tuning the encoder (short CPU run: %s)", DEMO_FINETUNE)
        finetuned = out / "finetuned"
        finetune(ds, finetuned, cfg.replace(**DEMO_FINETUNE), progress=progress)
    logger.info("3/3 comparing on %d test questions", len(ds.split(cfg.evaluate.split)))
    comparison = compare(ds, out / "report", cfg, adapters=[str(adapter_path)],
                         finetuned=[str(finetuned)] if finetuned else [], progress=progress)
    return DemoResult(out, adapter_path, out / "report" / "report.md", finetuned, comparison,
                      time.perf_counter() - t0)
