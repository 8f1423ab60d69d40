"""Benchmark for issue #16's answer benchmark: `adapter rag` end to end on AppleQA (split by query, seed 0), base
against the default adapter, against the tests' own chat-completions server on 127.0.0.1 (tests/fake_llm.py) whose
reader answers right exactly when the gold chunk is in the context, with injected faults of every kind at
--fault-rate and a SIGKILL once --kill-at replies are journalled; then the same command again to finish.

    python bench/bench_rag.py [--shared ../shared] [--work DIR] [--limit 200] [-k 5] [--fault-rate 0.2]
                              [--kill-at 150]

Checks and prints: every (system, question) answered and graded once, no reply asked for twice (beyond the requests
in flight at the kill), the API key in no file, and the per-system accuracy table with intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
KEY = "sk-bench-rag-do-not-write-me-7431"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-rag"))
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--fault-rate", type=float, default=0.2)
    p.add_argument("--kill-at", type=int, default=150, help="SIGKILL the first run once this many replies are in.")
    p.add_argument("--concurrency", type=int, default=8)
    a = p.parse_args()
    from common import appleqa

    from adapter.data import load_dataset
    from tests.fake_llm import FakeLLM

    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    data, cache, out = work / "appleqa-query", work / "cache", work / "rag"
    if not (data / "qrels" / "train.tsv").is_file():
        appleqa(a.shared, work)
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    adapter = data / "adapter.safetensors"
    if not adapter.is_file():
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "-q", "train", str(data), "--out", str(adapter),
                        "--cache-dir", str(cache)], env=env, check=True)
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    ds = load_dataset(data)
    gold = {ds.queries[q]: ds.doc_text(next(iter(r))) for q, r in ds.qrels["all"].items()}
    with FakeLLM(rag_gold=gold, fault_rate=a.fault_rate, retry_after="1", slow_seconds=3.0, delay=0.02,
                 seed=0) as fake:
        cmd = [sys.executable, str(ROOT / "cli.py"), "-q", "rag", str(data), "--llm-model", "fake-reader",
               "--judge-model", "fake-judge", "--base-url", fake.url, "--adapter", str(adapter), "-k", str(a.k),
               "--limit", str(a.limit), "--out", str(out), "--set", f"llm.concurrency={a.concurrency}",
               "--set", "llm.request_timeout=2", "--set", "llm.max_retries=8", "--cache-dir", str(cache)]
        t0 = time.perf_counter()
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        journal = out / "rag-journal.jsonl"
        while first.poll() is None:
            if journal.is_file() and journal.read_bytes().count(b"\n") >= a.kill_at:
                first.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        first.wait()
        killed = first.returncode == -signal.SIGKILL
        in_journal = journal.read_bytes().count(b"\n")
        before = len(fake.requests)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if second.returncode:
            sys.exit(f"the resumed run failed:\n{second.stdout}\n{second.stderr[-3000:]}")
        faults = fake.faults_seen()
        requests = list(fake.requests)

    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    keys = [e["key"] for e in entries]
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    summary = json.loads((out / "rag.json").read_text())
    systems = list(summary["systems"])
    pairs = {(r["system"], r["query_id"]) for r in rows}
    good = sum(q.fault is None for q in requests)
    leaked = [str(f) for f in work.rglob("*") if f.is_file() and f.stat().st_size < 50_000_000
              and KEY.encode() in f.read_bytes()]
    checks = {
        "first run SIGKILLed mid-run": killed and in_journal < len(entries),
        "every (system, question) answered and graded once": len(rows) == len(pairs) == len(systems) * a.limit
        and all(r["grade"] is not None for r in rows),
        "every reply journalled once (no duplicate keys)": len(keys) == len(set(keys)),
        f"nothing asked twice: good replies {good} <= journal {len(entries)} + {a.concurrency} in flight":
            len(entries) <= good <= len(entries) + a.concurrency,
        "the API key in no file under the work folder": not leaked,
    }
    served = sum(faults.values())
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(faults.items()))
    print(f"`adapter rag` on AppleQA (split by query, seed 0), {a.limit} test questions (seeded sample), k={a.k}, "
          f"systems {', '.join(systems)}; fake reader and judge on 127.0.0.1 with fault rate {a.fault_rate:.0%}: "
          f"{len(requests)} requests, {served} faults served ({kinds}); first run SIGKILLed after {in_journal} "
          "journalled replies, the same command again finished the rest "
          f"({len(requests) - before} requests); {seconds:.0f} s in all, embedding cached.\n")
    for name, ok in checks.items():
        print(f"- {'PASS' if ok else 'FAIL'}: {name}")
    print()
    from adapter.report import rag_table

    print(rag_table(summary))
    if not all(checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "rag")
