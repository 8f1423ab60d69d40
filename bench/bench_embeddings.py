"""OpenAI-compatible embeddings (issue #11) against the fault-injecting server of the tests (tests/fake_embeddings.py,
run as its own process, serving the bundled MiniLM's vectors), on AppleQA (query split, seed 0), through the real CLI:

1. `adapter train` and `adapter evaluate` with `--model openai:fake-minilm` give the local model's metrics, while the
   server answers 429 with Retry-After, 500, stalls past the timeout, bodies that are not JSON, dropped connections
   and shuffled `data` lists; a second run sends 0 embedding requests; the API key is in no file written.
2. `adapter embed` killed with SIGKILL mid-run, then run again: what is re-sent is at most what was in flight.
3. Client throughput at concurrency 1 and 8 against the model's own time inside the server.

    python bench/bench_embeddings.py [--shared ../shared] [--fault-rate 0.15] [--seed 0] [--parts 1,2,3]

Prints Markdown on stdout (BENCHMARKS.md quotes it). The machine is shared: times are noisy, ratios less so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-bench-NEVER-WRITTEN-5f3a9c"
MODEL = "openai:fake-minilm"
sys.path.insert(0, str(ROOT / "bench"))
from common import cli  # noqa: E402 -- bench/ is not a package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """tests/fake_embeddings.py in its own process (so its model does not share our interpreter)."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_embeddings.py"), "--port",
                                      str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, cwd=ROOT)
        assert "serving" in self.proc.stdout.readline()

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def metrics(path: Path) -> dict[str, float]:
    """Flat {"system/dim/metric": value} of a results JSON."""
    data = json.loads(path.read_text())
    return {f"{s}/{d}/{m}": v for s, by_d in data.items() for d, by_m in by_d.items() for m, v in by_m.items()}


def part_same_metrics(ds: Path, work: Path, env: dict[str, str], fault_rate: float, seed: int) -> list[str]:
    out = ["## 1. Same metrics as the local model, through faults", ""]
    local = [f"--cache-dir={work / 'cache-local'}"]
    t = time.monotonic()
    cli("train", str(ds), "--out", str(work / "local.safetensors"), *local, env=env)
    cli("evaluate", str(ds), "--adapter", str(work / "local.safetensors"), "--json", str(work / "local.json"),
        *local, env=env)
    local_s = time.monotonic() - t
    # A stall outlasts the timeout; the timeout outlasts a batch of 16 long chunks on a loaded 2-core machine (a
    # first run with 64 per request and 3 s failed every try of one batch, in one line, as it should).
    server = Server("--fault-rate", str(fault_rate), "--seed", str(seed), "--slow-seconds", "25",
                    "--retry-after", "1", "--shuffle", "--max-faults", "2")
    try:
        remote = [f"--cache-dir={work / 'cache-remote'}", "--model", MODEL, "--embedding-base-url", server.url,
                  "--set", "embedding.request_timeout=20", "--set", "embedding.batch_size=16",
                  "--set", "embedding.concurrency=4"]
        t = time.monotonic()
        cli("train", str(ds), "--out", str(work / "remote.safetensors"), *remote, env=env)
        cli("evaluate", str(ds), "--adapter", str(work / "remote.safetensors"), "--json", str(work / "remote.json"),
            *remote, env=env)
        remote_s = time.monotonic() - t
        first = server.stats()
        cli("train", str(ds), "--out", str(work / "again.safetensors"), *remote, env=env)
        cli("evaluate", str(ds), "--adapter", str(work / "again.safetensors"), "--json", str(work / "again.json"),
            *remote, env=env)
        second = server.stats()
    finally:
        server.close()
    a, b = metrics(work / "local.json"), metrics(work / "remote.json")
    a = {k.replace("local/", "adapter/"): v for k, v in a.items()}
    b = {k.replace("remote/", "adapter/"): v for k, v in b.items()}
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = max(abs(a[k] - b[k]) for k in a)
    n_metrics = len(a)
    faults = ", ".join(f"{k} {v}" for k, v in sorted(first["faults"].items()))
    files = [p for p in work.rglob("*") if p.is_file()]
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    auth_ok = first["auth"] == [f"Bearer {SECRET}"]
    out += [f"`adapter train` + `adapter evaluate` (base and adapter, every dim): local MiniLM {local_s:.0f} s; "
            f"`--model {MODEL}` against the server {remote_s:.0f} s, {first['requests']} requests "
            f"({first['good_requests']} answered in full; faults served: {faults}; every answer's `data` shuffled).",
            "",
            "| check | result |", "|---|---|",
            f"| largest |difference| over {n_metrics} metrics (base and adapter, every dim) | {worst:.2e} |",
            f"| base ndcg@10 at 384, local / remote | {a['base/384/ndcg@10']:.4f} / {b['base/384/ndcg@10']:.4f} |",
            f"| adapter ndcg@10 at 384, local / remote | {a['adapter/384/ndcg@10']:.4f} / "
            f"{b['adapter/384/ndcg@10']:.4f} |",
            f"| embedding requests sent by the second train + evaluate | {second['requests'] - first['requests']} |",
            f"| files (of {len(files)} written) holding the API key | {len(leaked)} |",
            f"| the key reached the server as the bearer token | {'yes' if auth_ok else 'NO'} |", ""]
    assert worst <= 1e-4 and second["requests"] == first["requests"] and not leaked and auth_ok
    return out


def part_kill(ds: Path, work: Path, env: dict[str, str]) -> list[str]:
    from adapter.cache import EmbeddingCache
    from adapter.data import load_dataset

    out = ["## 2. SIGKILL mid-embedding, then the same command again", ""]
    data = load_dataset(ds)
    texts = len(set(data.queries.values())) + len({data.doc_text(c) for c in data.corpus})
    batch, concurrency = 32, 4
    server = Server("--retry-after", "0")
    cache = work / "cache-kill"
    args = ["embed", str(ds), "--model", MODEL, "--embedding-base-url", server.url, f"--cache-dir={cache}",
            "--set", f"embedding.batch_size={batch}", "--set", f"embedding.concurrency={concurrency}"]
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "-q", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        deadline = time.monotonic() + 600
        while server.stats()["good_texts"] < texts // 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill = server.stats()
        folders = list((cache / "embeddings").iterdir())
        cached = len(EmbeddingCache(folders[0])) if folders else 0
        time.sleep(3)  # let the server finish what was in flight, so its counts are final
        before = server.stats()
        cli(*args, env=env)
        after = server.stats()
    finally:
        server.close()
    served_then = before["good_texts"] - 1  # the canary is one text
    resent = after["good_texts"] - before["good_texts"] - 1 - (texts - served_then)
    in_flight = served_then - cached
    out += ["| | texts |", "|---|---|",
            f"| distinct texts to embed (AppleQA queries and chunks) | {texts} |",
            f"| answered by the server when the run was killed | {at_kill['good_texts'] - 1} |",
            f"| in the cache after the kill | {cached} |",
            f"| answered but not cached (in flight when killed) | {in_flight} |",
            f"| sent by the second run (besides the canary) | {after['good_texts'] - before['good_texts'] - 1} |",
            f"| of those, sent before (re-sent) | {resent} |",
            f"| bound: requests in flight x texts per request | {concurrency} x {batch} = {concurrency * batch} |", ""]
    assert resent <= concurrency * batch and resent == in_flight
    return out


def part_throughput(ds: Path, n: int) -> list[str]:
    from adapter.backends import OpenAIBackend
    from adapter.config import EmbeddingConfig
    from adapter.data import load_dataset

    data = load_dataset(ds)
    texts = sorted({data.doc_text(c) for c in data.corpus} | set(data.queries.values()))[:n]
    out = ["## 3. Client throughput: the server's model is the bottleneck", "",
           f"{len(texts)} AppleQA texts, 32 per request, no limits, no faults, a fresh server each run (its model "
           "encodes one request at a time, as a one-GPU server does).", "",
           "| concurrency | wall s | texts/s | model busy (its encode time / wall) |", "|---|---|---|---|"]
    for concurrency in (1, 8):
        server = Server()
        try:
            cfg = EmbeddingConfig(base_url=server.url, batch_size=32, concurrency=concurrency,
                                  requests_per_minute=None, tokens_per_minute=None, request_timeout=120)
            backend = OpenAIBackend(MODEL, cfg, show_progress=False)
            t = time.perf_counter()
            backend.embed(texts)
            wall = time.perf_counter() - t
            busy = server.stats()["encode_seconds"] / wall
        finally:
            server.close()
        out.append(f"| {concurrency} | {wall:.1f} | {len(texts) / wall:.0f} | {busy:.0%} |")
    return [*out, ""]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--fault-rate", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="1,2,3", help="which parts to run, in this order (each printed as it ends)")
    p.add_argument("--throughput-texts", type=int, default=2048)
    a = p.parse_args()
    from common import appleqa, cli_env

    env = cli_env(OPENAI_API_KEY=SECRET)
    env.pop("OPENAI_BASE_URL", None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ds = appleqa(a.shared, work)
        print(f"# bench_embeddings (fault rate {a.fault_rate}, seed {a.seed})\n", flush=True)  # noqa: T201
        parts = {"1": lambda: part_same_metrics(ds, work, env, a.fault_rate, a.seed),
                 "2": lambda: part_kill(ds, work, env), "3": lambda: part_throughput(ds, a.throughput_texts)}
        for part in a.parts.split(","):
            print("\n".join(parts[part]()), flush=True)  # noqa: T201


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "embeddings")
