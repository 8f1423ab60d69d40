"""What the bench scripts share: AppleQA converted and split the documented way, its chunks' base vectors (what a
team's index holds), and the CLI run as a user runs it."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

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


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy, so a benchmark's printed report can also be saved."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.kept = out, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def markdown_tables(text: str) -> list[dict]:
    """Every Markdown table in ``text`` as {"caption", "columns", "rows"}: the caption is the nearest non-blank line
    above the table, each row a dict keyed by the header's cells (values as printed)."""
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    lines, tables, i = text.splitlines(), [], 0
    while i < len(lines):
        if (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and set(lines[i + 1].replace("|", "").strip()) <= set("-: ") and "-" in lines[i + 1]):
            columns = cells(lines[i])
            caption = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            j, rows = i + 2, []
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                rows.append(dict(zip(columns, cells(lines[j]), strict=False)))
                j += 1
            tables.append({"caption": caption, "columns": columns, "rows": rows})
            i = j
        else:
            i += 1
    return tables


def machine() -> dict[str, object]:
    """The machine a run measured, in words a reader can compare: cores, memory, GPU, library versions."""
    import platform

    info: dict[str, object] = {"cpu_cores": os.cpu_count(), "python": platform.python_version()}
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def run_and_save(main: Callable[[], object], name: str, children: tuple[str, ...] = ()) -> None:
    """Run a benchmark's ``main`` and write everything it printed to bench/results/<name>.json: the command, the
    machine, the Markdown report and its tables parsed, and whatever ``main`` returned. BENCHMARKS.md quotes the
    latest run; git keeps the earlier ones. A child run (any flag in ``children`` on the command line) only runs."""
    if any(flag in sys.argv for flag in children):
        main()
        return
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        returned = main()
    finally:
        sys.stdout = tee.out
    output = tee.kept.getvalue().replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    result = {"command": " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
              "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "machine": machine(), "output": output, "tables": markdown_tables(output)}
    if returned is not None:
        result["returned"] = returned
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)  # a run killed half way leaves the previous results whole
    print(f"(results written to bench/results/{name}.json)", file=sys.stderr)
