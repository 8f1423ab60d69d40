"""Kill a run mid-way, then run it again: the one helper behind every kill-and-resume test.

``kill_and_resume`` does it to a real process with SIGKILL (the CLI, a cache writer); ``die_after_first_save`` does
it inside a trainer (fine-tune, reranker) at its first checkpoint, where a signal could not be aimed. The waits are
counted polls, not clocks: a slow machine makes a test slower, never wrong."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kill_and_resume(cmd: list[str], ready: Callable[[], bool], *, env: dict[str, str], log: Path,
                    between: Callable[[], None] | None = None, must_land: bool = True, poll_s: float = 0.01,
                    polls: int = 12_000, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``cmd`` (its output to ``log``), poll ``ready`` until it holds, SIGKILL the process, call ``between``
    (to look at what the kill left, or to free a held server), then run the same command again to the end.

    With ``must_land`` the kill must come mid-run: the process still running when ``ready`` holds, and killed by the
    signal; without it (a kill at a random point) the run may already have ended. Returns the second run, whose
    exit status 0 is asserted."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            for _ in range(polls):  # a liveness bound only: `ready` or the process's end decides
                if ready() or proc.poll() is not None:
                    break
                time.sleep(poll_s)
            else:
                pytest.fail(f"not ready after {polls} polls: {log.read_text()[-2000:]}")
            if must_land:
                assert proc.poll() is None, f"the run ended before the kill: {log.read_text()[-2000:]}"
        finally:
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
    if must_land:
        assert code == -signal.SIGKILL, log.read_text()[-2000:]
    if between is not None:
        between()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    return again


def die_after_first_save(trainer: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next run of ``trainer`` (``adapter.finetune`` or ``adapter.rerank_train``) raise RuntimeError("killed")
    just after it saves its first checkpoint, as a kill there would stop it; ``monkeypatch.undo()`` lets the next run
    resume from that checkpoint."""
    real_clock = trainer.clock_callback

    def dying_clock(before: float):
        clock = real_clock(before)
        save = clock.on_save

        def on_save(*args, **kwargs):
            save(*args, **kwargs)
            raise RuntimeError("killed")

        clock.on_save = on_save
        return clock

    monkeypatch.setattr(trainer, "clock_callback", dying_clock)
