"""What the bench scripts share: AppleQA converted and split the documented way, its chunks' base vectors (what a
team's index holds), and the CLI run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from adapter.data import Dataset

ROOT = Path(__file__).resolve().parents[1]


def appleqa(shared: Path, work: Path, by: str = "query") -> Path:
    """AppleQA from ../shared as a dataset folder under ``work``, split by ``by`` with seed 0 and 20% held out."""
    from adapter.data import convert, split_dataset

    out = work / f"appleqa-{by}"
    convert(shared / "data" / "appleqa" / "apple_QA_dataset.json", out, force=True)  # the bench's own folder: rerun
    split_dataset(out, by=by, test_fraction=0.2, seed=0)
    return out


def appleqa_chunk_vectors(shared: Path, work: Path, cache: Path) -> tuple[Path, Dataset, list[str], np.ndarray]:
    """AppleQA split by query (seed 0) under ``work``, loaded, its corpus ids, and their base vectors from the
    bundled MiniLM (cached in ``cache``): the vectors a team's existing index holds."""
    from adapter.data import load_dataset
    from adapter.encoder import Encoder

    ds = appleqa(shared, work)
    data = load_dataset(ds)
    ids = list(data.corpus)
    vectors = Encoder(cache_dir=cache, show_progress=False).encode_documents([data.doc_text(c) for c in ids])
    return ds, data, ids, vectors


def cli_env(**extra: str) -> dict[str, str]:
    """The environment the CLI runs in: this checkout's code, offline."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """`adapter ARGS` in a subprocess, its output captured; a failure stops the benchmark with that output."""
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if check and r.returncode:
        raise SystemExit(f"adapter {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r
