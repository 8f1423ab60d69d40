"""Bad input and faults, measured (issue #13): the fuzz table over every command, two `adapter embed` processes sharing
one cache past the merge threshold, and `adapter embed` killed with SIGKILL at random points; and the security
audit's inputs (#24): what each crafted file or reply costs in memory and time.

    python bench/bench_faults.py [--model NAME] [--rounds 20] [--kills 10] [--parts fuzz,concurrent,kills,audit]

Everything runs the real CLI in subprocesses (`python -m cli ...`), as a user would. Prints markdown tables. The
default model is the tests' tiny BERT, built here: what is measured (exits, files, cache contents) does not depend on
the model, and each of the ~200 runs then costs start-up time only; pass --model for the bundled MiniLM.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapter.data import load_dataset, save_dataset  # noqa: E402
from tests.fault_cases import Drip, build_workspace, cases, run_case  # noqa: E402

WATEROPS = ROOT / "data" / "waterops"
EMBEDDED = re.compile(r"(\d+) texts embedded, (\d+) already cached")


def cli(*argv: str, cache: Path, model: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADAPTER_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "cli", "-q", *argv, "--model", model], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{r.stderr[-2000:]}")
    return r


def fuzz(work: Path, model: str) -> dict[str, str]:
    cache = work / "fuzz-cache"
    w = build_workspace(work / "ws", model, cache)
    rows: dict[str, Counter] = {}
    bad = []
    start = time.perf_counter()
    for case in cases():
        o = run_case(case, w, cache)
        c = rows.setdefault(case.command, Counter())
        c["cases"] += 1
        c["clean"] += o.clean
        c["traceback"] += o.traceback
        c["left"] += bool(o.left)
        c["changed"] += bool(o.changed)
        c["exit 0"] += o.code == 0
        c["long"] += o.lines > 3
        c["secret"] += secret_shown(o)
        if not o.clean:
            bad.append((case, o))
    total = sum(rows.values(), Counter())
    print(f"\n### Fuzz table ({total['cases']} cases, {time.perf_counter() - start:.0f} s, model {Path(model).name})\n")
    print("| command | cases | clean one-line errors | tracebacks | exit 0 | > 3 lines on stderr | partial or new "
          "files left | existing files changed | secret on stderr |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, c in [*rows.items(), ("**all**", total)]:
        print(f"| {name} | {c['cases']} | {c['clean']} | {c['traceback']} | {c['exit 0']} | {c['long']} | {c['left']} "
              f"| {c['changed']} | {c['secret']} |")
    for case, o in bad:
        last = next((line for line in reversed(o.stderr.splitlines()) if line.strip()), "")
        print(f"\nnot clean: {case.command}: {case.what}: exit {o.code}, traceback {o.traceback}, {o.lines} lines, "
              f"left {o.left[:3]}, changed {o.changed[:3]}: {last[:200]}")
    return w


# security audit: trust and secrets (#24). Its cases (tests/fault_cases.py, the block of that name) are in cases()
# above: a crafted reranker folder whose code ran leaves its marker file (counted as a new file left), and a password
# that reached stderr is counted here.


def secret_shown(o) -> bool:
    """Whether a case's secret (a password in a URL or a DSN it was given) is on its stderr."""
    return bool(o.case.hidden) and o.case.hidden in o.stderr


def subsets(work: Path, rounds: int) -> list[tuple[Path, Path]]:
    """For each round, two overlapping slices of waterops (all chunks, a window of queries each, half shared)."""
    ds = load_dataset(WATEROPS)
    qids = list(ds.queries)
    out = []
    step = max(1, (len(qids) - 120) // max(1, rounds))
    for r in range(rounds):
        pair = []
        for p, lo in enumerate((r * step, r * step + 40)):
            keep = qids[lo:lo + 80]
            part = type(ds)(corpus=ds.corpus, queries={q: ds.queries[q] for q in keep},
                            qrels={"all": {q: ds.qrels["all"][q] for q in keep if q in ds.qrels["all"]}},
                            titles=ds.titles)
            pair.append(save_dataset(part, work / "slices" / f"r{r}-p{p}"))
        out.append(tuple(pair))
    return out


def concurrent(work: Path, model: str, rounds: int) -> None:
    from adapter.encoder import Encoder

    cache, single = work / "shared-cache", work / "single-cache"
    pairs = subsets(work, rounds)
    env = {**os.environ, "ADAPTER_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    errors, max_shards, start = 0, 0, time.perf_counter()
    for a, b in pairs:
        procs = [subprocess.Popen([sys.executable, "-m", "cli", "-q", "embed", str(d), "--model", model], env=env,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in (a, b)]
        for p in procs:
            out, err = p.communicate(timeout=1200)
            errors += p.returncode != 0
            if p.returncode != 0:
                print(f"embed failed: {err[-500:]}")
        folder = next((cache / "embeddings").iterdir())
        max_shards = max(max_shards, len(list(folder.glob("*.shard"))))
    union = work / "slices" / "union"
    ds = load_dataset(WATEROPS)
    seen = {q for a, b in pairs for d in (a, b) for q in load_dataset(d).queries}
    save_dataset(type(ds)(corpus=ds.corpus, queries={q: ds.queries[q] for q in ds.queries if q in seen},
                          qrels={"all": {q: r for q, r in ds.qrels["all"].items() if q in seen}}, titles=ds.titles),
                 union)
    third = EMBEDDED.search(cli("embed", str(union), cache=cache, model=model).stdout)
    cli("embed", str(union), cache=single, model=model)
    u = load_dataset(union)
    texts = [u.doc_text(c) for c in u.corpus]
    shared_enc = Encoder(model, cache_dir=cache, show_progress=False)
    single_enc = Encoder(model, cache_dir=single, show_progress=False)
    diff = max(float(np.abs(shared_enc.encode_queries(list(u.queries.values()))
                            - single_enc.encode_queries(list(u.queries.values()))).max()),
               float(np.abs(shared_enc.encode_documents(texts) - single_enc.encode_documents(texts)).max()))
    assert shared_enc.texts_encoded == single_enc.texts_encoded == 0
    print(f"\n### Two `adapter embed` processes, one cache, {rounds} rounds ({time.perf_counter() - start:.0f} s)\n")
    print("| rounds | processes per round | failed runs | most shards seen (merge past 32) | texts in the union | "
          "third run embedded | max abs difference vs a single-process cache |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {rounds} | 2 | {errors} | {max_shards} | {len(u.queries) + len(u.corpus)} | {third.group(1)} | "
          f"{diff:.2e} |")


def shard_names(folder: Path) -> set[str]:
    """Shard files under a cache root now (every model's folder; hidden temporaries excluded)."""
    from adapter.cache import SUFFIX

    return {p.name for p in (folder / "embeddings").glob(f"*/[!.]*{SUFFIX}")}


def run_watching(cmd: list[str], env: dict[str, str], cache: Path, kill_after: int | None = None,
                 wait: float = 0.0) -> tuple[list[float], float, str]:
    """Run ``cmd``, polling ``cache`` for shard files every millisecond; with ``kill_after``, SIGKILL it ``wait``
    seconds after that many distinct shard files have appeared. Returns (the seconds at which each shard file first
    appeared, seconds until the kill or the end, what it printed)."""
    seen: dict[str, float] = {}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while p.poll() is None and (kill_after is None or len(seen) < kill_after):
        for name in shard_names(cache) - seen.keys():
            seen[name] = time.perf_counter() - t0
        time.sleep(0.001)
    if kill_after is not None and p.poll() is None:
        time.sleep(wait)
        p.send_signal(signal.SIGKILL)
    out = p.communicate()[0]
    return sorted(seen.values()), time.perf_counter() - t0, out


def kills(work: Path, model: str, n: int) -> None:
    """Each kill once N shard files have appeared (N random below a full run's count), then a random part of the
    time the timing run took from shard N to shard N+1: kills land between two shards, not while the model loads."""
    from adapter.cache import EmbeddingCache

    env_base = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cli", "-q", "embed", str(WATEROPS), "--model", model]
    timing = work / "kill-timing"
    times, whole, out = run_watching(cmd, {**env_base, "ADAPTER_CACHE": str(timing)}, timing)
    total, shards = int(EMBEDDED.search(out).group(1)), len(times)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        cache = work / f"kill-{i}"
        after = rng.randint(1, max(1, shards - 1))
        wait = rng.uniform(0, times[after] - times[after - 1]) if after < shards else 0.0
        _, at, _ = run_watching(cmd, {**env_base, "ADAPTER_CACHE": str(cache)}, cache, kill_after=after, wait=wait)
        folders = list((cache / "embeddings").glob("*")) if (cache / "embeddings").is_dir() else []
        cached = sum(len(EmbeddingCache(f)) for f in folders)  # opens, or raises naming a shard
        rerun = EMBEDDED.search(cli("embed", str(WATEROPS), cache=cache, model=model).stdout)
        embedded, already = int(rerun.group(1)), int(rerun.group(2))
        rows.append((i, after, wait, at, cached, embedded, already,
                     embedded + already == total and already == cached))
    print(f"\n### `adapter embed` killed with SIGKILL at {n} random points (a full run takes {whole:.1f} s, "
          f"{total} texts, {shards} shard files, at {', '.join(f'{t:.1f}' for t in times)} s)\n")
    print("| kill | after shard | then waited (s) | killed at (s) | vectors in the cache after the kill (it opens) | "
          "rerun embedded | rerun found cached | rerun embedded exactly what was missing |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, after, wait, at, cached, embedded, already, ok in rows:
        print(f"| {i} | {after} | {wait:.2f} | {at:.1f} | {cached} | {embedded} | {already} | {ok} |")
    mid = sum(0 < row[4] < total for row in rows)
    print(f"\n{mid} of {n} kills landed mid-run (some texts cached, some not).")


# ---------------------------------------------------------------------------------------------------------------
# security audit: sizes, deadlines, integrity (#24)


def _peak(argv: list[str], env: dict[str, str]) -> tuple[int, float, int, str]:
    """Run the CLI; its exit code, seconds, peak resident memory (bytes, the child's own) and last stderr line."""
    start = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "cli", *argv], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    last = next((line for line in reversed(err.splitlines()) if line.strip()), "")
    return p.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024, last


def _parse_cost(parse, text: str) -> tuple[float, int, str]:
    """Seconds of ``parse(text)``, then its tracemalloc peak (bytes) in a second run (tracing slows it), and how it
    ended."""
    import tracemalloc

    def run() -> str:
        try:
            parse(text)
        except ValueError as e:
            return f"{type(e).__name__}: {str(e)[:60]}"
        return "parsed"

    start = time.perf_counter()
    how = run()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, how


def audit(work: Path, model: str, w: dict[str, str] | None) -> None:
    """What each crafted input of the audit costs now: the CLI's peak memory and time on each file, the parsers'
    on each reply, and `generate --set llm.request_timeout=5` against a server sending a byte a second."""
    from adapter.generate import parse_questions
    from adapter.rag import parse_grade
    from tests.conftest import write_dataset

    cache = work / "fuzz-cache"
    w = w or build_workspace(work / "ws", model, cache)
    env = {**os.environ, "ADAPTER_CACHE": str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    audit_dir = Path(w["audit"])
    rows = []
    for what, name, argv, before in (
            ("adapter declaring 30000x30000 in a sparse file", "sparse.safetensors",
             ["search", "pump", "--store", f"faiss:{w['index']}", "--adapter", "{}", "--model", model], "7.1 GiB"),
            ("FAISS file claiming 2.5 GB", "bomb.faiss", ["search", "pump", "--store", "faiss:{}", "--adapter",
                                                          w["adapter"], "--model", model], "2.6 GiB"),
            ("adapter metadata nested 10^5 deep", "nested.safetensors",
             ["search", "pump", "--store", f"faiss:{w['index']}", "--adapter", "{}", "--model", model],
             "RecursionError"),
            ("(baseline: the workspace's own adapter and index)", w["adapter"],
             ["search", "pump", "--store", f"faiss:{w['index']}", "--adapter", "{}", "--model", model], "")):
        path = audit_dir / name
        code, seconds, peak, last = _peak([a.format(path) for a in argv], env)
        st = path.stat()
        rows.append((what, f"{st.st_size:,} bytes ({st.st_blocks * 512:,} on disk)", code, f"{seconds:.1f}",
                     f"{peak / 2**20:.0f} MiB", before, last[:90]))
    ds = write_dataset(work / "drip-ds", {"test": ["q_burst"]})
    (ds / "corpus.jsonl").write_text(json.dumps({"_id": "c", "text": "Valves isolate a burst main."}) + "\n")
    with Drip("body", gap=1.0, connections=2) as server:
        code, seconds, peak, last = _peak(["generate", str(ds), "--base-url", server.url,
                                           "--set", "llm.request_timeout=5", "--set", "llm.max_retries=0",
                                           "--set", "llm.concurrency=1"],
                                          {**env, "OPENAI_API_KEY": "none"})
    rows.append(("`generate --set llm.request_timeout=5`, a server sending a byte a second",
                 f"{len(server.response):,} bytes in "
                 f"{len(server.response)} s", code, f"{seconds:.1f}", f"{peak / 2**20:.0f} MiB", "61 s",
                 f"the server got out {sum(server.sent)} of {len(server.response)} bytes"))
    deep = "[" * 40 + "1, " * 1_600_000 + "1" + "]" * 40  # 4.8 MB, a bracket at every level restarting the decode
    for what, parse, text, before in (("judge reply of 60,000 `{`", parse_grade, "{" * 60_000, "2.4 GiB"),
                                      ("judge reply of 200,000 `{`", parse_grade, "{" * 200_000, "~20 GB"),
                                      ("4.8 MB generate answer, 40 levels deep", lambda t: parse_questions(t, 3),
                                       deep, "33-58 s"),
                                      ("4.8 MB generate answer of prose and braces", lambda t: parse_questions(t, 3),
                                       'a {"b": [1, "c"], ' * 270_000, "")):
        seconds, peak, how = _parse_cost(parse, text)
        rows.append((what, f"{len(text):,} characters", "-", f"{seconds:.2f}", f"{peak / 2**20:.1f} MiB (Python)",
                     before, how))
    print("\n### Security audit (#24): what each crafted input costs now\n")
    print("| input | size | exit | seconds | peak memory | before (issue #24) | how it ended |")
    print("|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="[default: the tests' tiny BERT, built here]")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--parts", default="fuzz,concurrent,kills,audit", help="which parts to run, comma-separated")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    from adapter.encoder import resolve_model

    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        work = Path(tmp)
        if args.model is None:
            from tests.conftest import build_tiny_model

            model = str(build_tiny_model(work / "tiny"))
        else:
            model = resolve_model(args.model)
        w = fuzz(work, model) if "fuzz" in parts else None
        if "concurrent" in parts:
            concurrent(work, model, args.rounds)
        if "kills" in parts:
            kills(work, model, args.kills)
        if "audit" in parts:
            audit(work, model, w)
    print(f"\n(machine: {os.cpu_count()} cores, shared; {json.dumps({'model': args.model or 'tiny BERT'})})")


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "faults")
