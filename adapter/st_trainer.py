"""What the two sentence-transformers fine-tunes share (the encoder's, ``adapter.finetune``, and the reranker's,
``adapter.rerank_train``): the output folder and its checkpoints, the wall clock across resumes, the quiet progress
bar, the epoch-selection arguments and the install of the kept model.

A run's checkpoints live in ``OUT/checkpoints`` with a ``run.json`` naming what they were trained for; running the
same command again after a crash resumes from the last complete one (its clock file, written last, marks it
complete); once the model is installed in ``OUT`` the checkpoints go.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter.data import atomic_write, ensure_dir
from adapter.errors import AdapterError

if TYPE_CHECKING:
    from sentence_transformers.base.model import BaseModel

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the trainer's checkpoints, removed once the model is installed
RUN_FILE = "run.json"  # in CHECKPOINTS: what the checkpoints were trained for; a resume must match it
CLOCK_FILE = "wall_seconds.json"  # in each checkpoint, written last: marks it complete and carries the wall time


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: unreadable ({type(e).__name__}); delete it to start afresh") from None


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints whose clock file was written (the last thing saved), oldest first."""
    found = [p for p in folder.glob("checkpoint-*") if (p / CLOCK_FILE).is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def prepare_out(out: Path, run: dict[str, Any], *, main: bool) -> Path | None:
    """Check ``out`` and return the checkpoint to resume from (None: start afresh).

    Accepted: a missing or empty folder, or one holding checkpoints of this same run (same base model, data and
    settings). Refused, with nothing touched: a folder holding a model, checkpoints of another run, or anything else.
    Rank 0 (``main``) records the run; other ranks only read.
    """
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    ckpt = out / CHECKPOINTS
    if (out / "modules.json").is_file():
        raise AdapterError(f"{out}: already holds a model; choose another --out folder")
    if ckpt.is_dir() and (ckpt / RUN_FILE).is_file():
        before = read_json(ckpt / RUN_FILE)
        if before != run:
            changed = sorted(k for k in {*before, *run} if before.get(k) != run.get(k))
            raise AdapterError(f"{out}: holds checkpoints of another fine-tune (different {', '.join(changed)}); "
                               "choose another --out folder")
        done = complete_checkpoints(ckpt)
        if done:
            logger.info("resuming from %s", done[-1])
        return done[-1] if done else None
    if out.is_dir() and any(out.iterdir()):
        raise AdapterError(f"{out}: folder is not empty and holds no checkpoints of a fine-tune; choose an empty "
                           "or new --out folder")
    if main:
        ensure_dir(ckpt)
        with atomic_write(ckpt / RUN_FILE) as f:
            json.dump(run, f, indent=2)
    return None


def clock_callback(before: float):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Training wall time across resumes, written into every checkpoint once it is complete."""

        def __init__(self) -> None:
            self.start = time.perf_counter()

        def seconds(self) -> float:
            return before + time.perf_counter() - self.start

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                with atomic_write(folder / CLOCK_FILE) as f:
                    json.dump({"seconds": self.seconds()}, f)

    return Clock()


def quiet_progress_callback():
    from transformers.trainer_callback import ProgressCallback

    class Bar(ProgressCallback):
        """The trainer's bar without its dump of every logged metric; the evaluator logs one line per epoch."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")

    return Bar


def epoch_selection_args(metric: str, progress: bool, seed: int) -> dict[str, Any]:
    """Trainer arguments both fine-tunes share (the encoder's and the reranker's): validate and save every epoch,
    keep the best by ``metric`` and the last, a quiet log."""
    return {"eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 2,  # the best and the last
            "load_best_model_at_end": True, "metric_for_best_model": metric, "greater_is_better": True,
            "logging_steps": 0.02,  # at most ~50 points on the loss curve
            "report_to": "none", "disable_tqdm": not progress, "seed": seed}


def install(model: BaseModel, out: Path, files: dict[str, str]) -> None:
    """Save the model beside ``out``'s checkpoints, move it in file by file (``modules.json`` last: it is what makes
    the folder a model), then drop the checkpoints."""
    tmp = out / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted install of this same run
    model.save(str(tmp), create_model_card=False)
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    last = ("config.json", "modules.json")
    for entry in sorted(tmp.iterdir(), key=lambda p: last.index(p.name) + 1 if p.name in last else 0):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
    shutil.rmtree(out / CHECKPOINTS)
