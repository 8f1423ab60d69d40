"""Benchmark for question synthesis (issue #5): N chunks against the fault-injecting server (tests/fake_llm.py) with
about a fifth of requests failing in assorted ways, run through the real CLI twice: once in one go, and once killed
with SIGKILL halfway and run again. Checks that every chunk is answered, once, with no duplicate questions, and that
both folders hold the same bytes.

    python bench/bench_generate.py [--chunks 200] [--fault-rate 0.2] [--seed 0] [--kill-at 100]

Prints a Markdown report on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fake_llm import FakeLLM  # noqa: E402

CLI_OPTIONS = ["--set", "llm.concurrency=8", "--set", "llm.requests_per_minute=1200", "--set", "llm.request_timeout=2"]


def write_corpus(folder: Path, n: int, seed: int) -> None:
    """``n`` chunks of 60 English words each, drawn from the default encoder's vocabulary."""
    from adapter.config import Config
    from adapter.encoder import resolve_model

    vocab_file = Path(resolve_model(Config().encoder.model)) / "vocab.txt"
    vocab = [w for w in vocab_file.read_text().split() if re.fullmatch(r"[a-z]{5,12}", w)]
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(n):
            sentences = [" ".join(rng.sample(vocab, 12)).capitalize() + "." for _ in range(5)]
            f.write(json.dumps({"_id": f"chunk-{i}", "text": " ".join(sentences)}) + "\n")


def journal_ids(folder: Path) -> list[str]:
    path = folder / "generation.jsonl"
    return [json.loads(line)["_id"] for line in path.read_text().splitlines()] if path.exists() else []


def served(llm: FakeLLM) -> str:
    faults = llm.faults_seen()
    total = len(llm.requests)
    parts = ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))
    return f"{sum(faults.values())} of {total} ({sum(faults.values()) / max(total, 1):.0%}): {parts}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=100, help="SIGKILL once the journal holds this many chunks")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    one, two = work / "one", work / "two"
    write_corpus(one, args.chunks, args.seed)
    write_corpus(two, args.chunks, args.seed)
    server = {"questions": 20, "fault_rate": args.fault_rate, "seed": args.seed, "delay": 0.1, "slow_seconds": 3.0,
              "retry_after": "1", "near_duplicates": True}

    def command(folder: Path, url: str) -> list[str]:
        return [sys.executable, str(ROOT / "cli.py"), "-q", "generate", str(folder), "--base-url", url, *CLI_OPTIONS,
                "--cache-dir", str(folder / "cache")]  # each run embeds into a cold cache of its own

    def finish(proc: subprocess.Popen, folder: Path, start: float) -> tuple[float, float]:
        """Seconds until every chunk is in the journal (the asking), then until the process exits (dedup, write)."""
        while len(journal_ids(folder)) < args.chunks and proc.poll() is None:
            time.sleep(0.01)
        asked = time.perf_counter() - start
        assert proc.wait() == 0, "generate failed"
        return asked, time.perf_counter() - start

    # One go.
    with FakeLLM(**server) as llm:
        t = time.perf_counter()
        proc = subprocess.Popen(command(one, llm.url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        asked_one, t_one = finish(proc, one, t)
        served_one = served(llm)
        planted = sum(a[-1].lower().rstrip("?") == a[0].lower().rstrip("?")
                      for a in (llm.answer(json.loads(line)["text"])
                                for line in (one / "corpus.jsonl").read_text().splitlines()))
    summary_one = json.loads((one / "generate.json").read_text())

    # Killed, then resumed.
    with FakeLLM(**server) as llm:
        t = time.perf_counter()
        proc = subprocess.Popen(command(two, llm.url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while len(journal_ids(two)) < args.kill_at:
            assert proc.poll() is None, "the run ended before the kill"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t_killed = time.perf_counter() - t
        killed_at = len(journal_ids(two))
        t = time.perf_counter()
        proc = subprocess.Popen(command(two, llm.url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        asked_resumed, t_resumed = finish(proc, two, t)
        served_two = served(llm)
    summary_two = json.loads((two / "generate.json").read_text())

    # Checks.
    from adapter.data import load_dataset
    from adapter.encoder import Encoder

    ids = journal_ids(two)
    same = all((one / p).read_bytes() == (two / p).read_bytes() for p in ("queries.jsonl", "qrels/all.tsv"))
    ds = load_dataset(two)
    answered = {c for rels in ds.qrels["all"].values() for c in rels}
    texts = list(ds.queries.values())
    vectors = Encoder(cache_dir=two / "cache", show_progress=False).encode_queries(texts)
    sims = vectors @ vectors.T
    sims[range(len(texts)), range(len(texts))] = 0
    per_chunk = Counter(qid.rsplit("_q", 1)[0] for qid in ds.queries)

    cmd = f"python bench/bench_generate.py --chunks {args.chunks} --fault-rate {args.fault_rate} --seed {args.seed} " \
          f"--kill-at {args.kill_at}"
    print(f"Command: `{cmd}` (each run: `adapter -q generate DIR --base-url URL {' '.join(CLI_OPTIONS)}`)\n")
    print("| run | asking (until all chunks are in the journal) | wall time in all | requests and faults served "
          "(server side) | retries (client side, the last process) |")
    print("| --- | ---: | ---: | --- | --- |")
    reasons = ", ".join(f"{k} {v}" for k, v in summary_one["retry_reasons"].items())
    print(f"| one go | {asked_one:.1f} s | {t_one:.1f} s | {served_one} | {summary_one['retries']} of "
          f"{summary_one['requests']} requests: {reasons} |")
    reasons = ", ".join(f"{k} {v}" for k, v in summary_two["retry_reasons"].items())
    print(f"| killed at {killed_at}/{args.chunks} chunks, then resumed | {t_killed:.1f} s + {asked_resumed:.1f} s | "
          f"{t_killed:.1f} s + {t_resumed:.1f} s | {served_two} | {summary_two['retries']} of "
          f"{summary_two['requests']} requests: {reasons} |")
    print()
    print(f"- chunks answered: one go {summary_one['done']}/{args.chunks}, failed {len(summary_one['failed'])}; "
          f"resumed {summary_two['done']}/{args.chunks} ({summary_two['already_done']} from the killed run), "
          f"failed {len(summary_two['failed'])}; every chunk in qrels: {len(answered) == args.chunks}")
    print(f"- journal after resume: {len(ids)} entries, {len(set(ids))} distinct chunks")
    print(f"- questions written: {summary_two['questions']} of {args.chunks * 20}; near-duplicates dropped "
          f"{summary_two['near_duplicates']} (server planted {planted}); questions per chunk "
          f"{min(per_chunk.values())}-{max(per_chunk.values())}")
    print(f"- duplicate question texts: {len(texts) - len(set(texts))}; highest cosine between two kept questions: "
          f"{sims.max():.3f} (threshold 0.95)")
    print(f"- one go and killed+resumed give byte-identical queries.jsonl and qrels/all.tsv: {same}")


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "generate")
