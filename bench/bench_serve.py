"""Benchmark for `adapter serve` (issue #15): the real CLI serving the bundled MiniLM on 127.0.0.1, loaded by the
openai client.

1. Throughput and latency under a bounded load (W concurrent workers for S seconds, one waterops question per
   request) against two servers side by side: micro-batching on (the defaults) and off (``--max-batch 1``).
2. What the adapter adds: the same server's /v1 (adapted) against /documents/v1 (base), one request at a time,
   alternating; and ``LinearAdapter.apply`` on one vector timed alone.
3. Every reply of the load compared with ``LinearAdapter.apply`` on the base vectors computed here.
4. Hot reload under the same load (4 questions per request): the adapter file replaced N times; every reply must
   equal, row by row, the adapter its ``x-adapter-version`` header names.
5. H malformed or hostile requests (bad JSON, huge bodies, wrong types, bad Unicode, wrong tokens): each must be a 4xx
   with a JSON error; the server's RSS before and after, and a good request afterwards.

6. Upstream mode (``--model openai:...``) against the tests' fault-injecting embeddings server: a load through
   faults, then an upstream that answers 401, then one that fails every request past the backend's retries.

    python bench/bench_serve.py [--seconds 30] [--workers 32] [--reloads 10] [--hostile 1000] [--fault-rate 0.2]

Prints a Markdown report on stdout (BENCHMARKS.md quotes it). The adapters are random near-identity matrices with
the MiniLM's fingerprint: serving cost and correctness do not depend on what an adapter learned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
KEY_ENV, KEY = "BENCH_SERVE_KEY", "bench-key-0123"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
sys.path.insert(0, str(ROOT / "tests"))  # fake_embeddings: the tests' own faulty OpenAI-compatible server
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(path: Path, identity: str, seed: int):
    """A near-identity 384x384 adapter, written beside ``path`` and renamed into place (how a trainer ships one)."""
    from adapter.model import LinearAdapter

    rng = np.random.default_rng(seed)
    a = LinearAdapter.identity(384, identity)
    a.weight = (np.eye(384) + 0.1 * rng.standard_normal((384, 384))).astype(np.float32)
    tmp = path.with_name(f".{path.name}.{seed}.tmp")
    a.save(tmp)
    os.replace(tmp, path)
    return a


class Server:
    """`adapter serve` in a subprocess, through the real CLI."""

    def __init__(self, adapter: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), KEY_ENV: KEY}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--adapter", str(adapter), "--port",
                                      str(self.port), "--api-key-env", KEY_ENV, *extra], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180) -> Server:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=5).json()

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def load(url: str, texts: list[str], seconds: float, workers: int, *, per_request: int = 1,
               during=None) -> dict:
    """``workers`` openai clients sending requests back to back for ``seconds``; latencies, errors, replies."""
    import httpx
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=workers + 4)))
    latencies: list[float] = []
    errors: Counter = Counter()
    replies: list[tuple[list[str], str | None, np.ndarray]] = []
    end = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w * per_request
        while time.perf_counter() < end:
            batch = [texts[(i + j) % len(texts)] for j in range(per_request)]
            i += workers * per_request
            t0 = time.perf_counter()
            try:
                raw = await client.embeddings.with_raw_response.create(input=batch, model=MODEL)
                r = raw.parse()
            except Exception as e:  # counted, never raised: the load goes on
                errors[type(e).__name__] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            replies.append((batch, raw.headers.get("x-adapter-version"),
                            np.asarray([d.embedding for d in r.data], np.float32)))

    start, cpu = time.perf_counter(), time.process_time()
    tasks = [asyncio.create_task(worker(w)) for w in range(workers)]
    if during is not None:
        await during
    await asyncio.gather(*tasks)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    await client.close()
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": dict(errors), "wall": wall, "rps": len(latencies) / wall,
            "latencies": latencies, "client_cpu": cpu,
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"), "replies": replies}


def interleaved(servers: dict[str, Server], texts: list[str], seconds: float, workers: int, slices: int) -> dict:
    """The same load on each server in turn, ``slices`` slices each adding up to ``seconds``, so background load on
    a shared machine falls on both alike; results pooled per server."""
    pooled: dict[str, dict] = {}
    for _ in range(slices):
        for name, server in servers.items():
            r = asyncio.run(load(server.url, texts, seconds / slices, workers))
            p = pooled.setdefault(name, {"latencies": [], "errors": Counter(), "wall": 0.0, "replies": [],
                                         "client_cpu": 0.0})
            p["latencies"] += r["latencies"]
            p["client_cpu"] += r["client_cpu"]
            p["errors"].update(r["errors"])
            p["wall"] += r["wall"]
            p["replies"] += r["replies"]
    for p in pooled.values():
        lat = np.array(p["latencies"]) * 1000
        p.update(requests=len(lat), rps=len(lat) / p["wall"], p50=float(np.percentile(lat, 50)),
                 p99=float(np.percentile(lat, 99)), errors=dict(p["errors"]))
    return pooled


def adapter_added_latency(url: str, texts: list[str], pairs: int) -> dict:
    """p50 of /v1 and /documents/v1 for the same texts, one request at a time, alternating which goes first."""
    from openai import OpenAI

    q = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    d = OpenAI(base_url=f"{url}/documents/v1", api_key=KEY, max_retries=0)
    times: dict[str, list[float]] = {"query": [], "document": []}
    for i in range(pairs):
        order = [("query", q), ("document", d)] if i % 2 == 0 else [("document", d), ("query", q)]
        for role, client in order:
            t0 = time.perf_counter()
            client.embeddings.create(input=[texts[i % len(texts)]], model=MODEL)
            times[role].append(time.perf_counter() - t0)
    med = {role: statistics.median(v) * 1000 for role, v in times.items()}
    diffs = [(a - b) * 1000 for a, b in zip(times["query"], times["document"], strict=True)]
    return {"p50_query": med["query"], "p50_document": med["document"], "p50_paired_diff": statistics.median(diffs)}


def model_alone(model, texts: list[str], sizes=(1, 32), rounds: int = 5) -> dict[int, float]:
    """Median ms per text of the model itself (one thread, as the servers run it) at each batch size: the most that
    batching can give on this machine right now is their ratio."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for size in sizes:
        runs = []
        for r in range(rounds):
            batch = [texts[(r * size + j) % len(texts)] for j in range(size)]
            t0 = time.perf_counter()
            model.encode_query(batch, batch_size=size, normalize_embeddings=True, show_progress_bar=False)
            runs.append((time.perf_counter() - t0) / size)
        out[size] = statistics.median(runs) * 1000
    torch.set_num_threads(threads)
    return out


def time_apply(adapter) -> float:
    """Median microseconds of ``LinearAdapter.apply`` on one (1, 384) vector."""
    x = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32)
    x /= np.linalg.norm(x)
    runs = []
    for _ in range(2000):
        t0 = time.perf_counter()
        adapter.apply(x)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1e6


def check_replies(replies, base: dict[str, np.ndarray], adapters: dict[str, object]) -> dict:
    """Largest |reply - adapter.apply(base)| per row, with the adapter the header names; and how far the nearest
    other adapter is (a mixed reply would match another adapter on some row)."""
    worst, mixed, unknown, closest_other = 0.0, 0, 0, float("inf")
    for batch, version, got in replies:
        if version not in adapters:
            unknown += 1
            continue
        x = np.stack([base[t] for t in batch])
        want = adapters[version].apply(x)
        err = np.abs(got - want).max(axis=1)
        worst = max(worst, float(err.max()))
        for v, other in adapters.items():
            if v != version:
                gap = np.abs(got - other.apply(x)).max(axis=1)
                closest_other = min(closest_other, float(gap.min()))
                mixed += int((gap <= err).any())
    return {"max_abs_diff": worst, "rows_closer_to_another_adapter": mixed, "unknown_version": unknown,
            "nearest_other_adapter": closest_other}


def hostile_requests(n: int, seed: int) -> list[tuple[str, str, dict, bytes | None, str]]:
    """``n`` requests (method, path, headers, body, kind) that must each get a 4xx."""
    rng = random.Random(seed)
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    huge = b'{"input": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    kinds = {
        "truncated JSON": lambda: json.dumps({"input": ["a", "b"]}).encode()[: rng.randint(1, 15)],
        "random bytes": lambda: rng.randbytes(rng.randint(1, 400)),
        "nested 100k deep": lambda: b"[" * 100_000,
        "body over 8 MiB": lambda: huge,
        "JSON not an object": lambda: json.dumps(rng.choice([[1, 2], "input", 3.5, None, True])).encode(),
        "input missing": lambda: b'{"model": "m"}',
        "input wrong type": lambda: json.dumps({"input": rng.choice([3, 2.5, None, True, {"a": 1}, [None], [["x"]],
                                                                      ["ok", 5], [{"t": "x"}]])}).encode(),
        "token arrays": lambda: json.dumps({"input": rng.choice([[1, 2, 3], [[101, 2054], [7592]]])}).encode(),
        "empty input": lambda: json.dumps({"input": rng.choice(["", [], ["a", ""]])}).encode(),
        "2049 inputs": lambda: json.dumps({"input": ["q"] * 2049}).encode(),
        "input over 100k chars": lambda: json.dumps({"input": "ü" * 100_001}).encode(),
        "lone surrogate": lambda: rng.choice([b'{"input": "\\ud800"}', b'{"input": ["ok", "a\\udfffb"]}']),
        "invalid UTF-8": lambda: b'{"input": "' + rng.choice([b"\xc0\xaf", b"\xff\xfe", b"\xed\xa0\x80",
                                                               b"\xf8\x88\x80\x80\x80"]) + b'"}',
        "NaN dimensions": lambda: b'{"input": "a", "dimensions": NaN}',
        "bad dimensions": lambda: json.dumps({"input": "a", "dimensions": rng.choice([0, -1, 385, 10**30, "64",
                                                                                      1.5, True])}).encode(),
        "bad encoding_format": lambda: json.dumps({"input": "a", "encoding_format": rng.choice(
            ["int8", "", 1, "FLOAT", ["float"]])}).encode(),
        "model not a string": lambda: json.dumps({"input": "a", "model": rng.choice([1, [], {}])}).encode(),
        "wrong token": None, "no token": None, "wrong method": None, "unknown path": None,
    }
    names = list(kinds)
    out = []
    for i in range(n):
        kind = names[i % len(names)]
        path = rng.choice(["/v1/embeddings", "/documents/v1/embeddings"])
        if kind == "wrong token":
            out.append(("POST", path, {"authorization": rng.choice(["Bearer nope", f"Basic {KEY}", KEY])},
                        b'{"input": "a"}', kind))
        elif kind == "no token":
            out.append(("POST", path, {}, b'{"input": "a"}', kind))
        elif kind == "wrong method":
            out.append((rng.choice(["GET", "PUT", "DELETE"]), path, auth, None, kind))
        elif kind == "unknown path":
            out.append(("POST", rng.choice(["/v2/embeddings", "/v1/embedding", "/../etc/passwd", "/v1/chat"]), auth,
                        b'{"input": "a"}', kind))
        else:
            out.append(("POST", path, auth, kinds[kind](), kind))
    return out


async def send_hostile(url: str, requests: list, concurrency: int = 8) -> dict:
    import httpx

    bad: list[str] = []
    statuses: Counter = Counter()
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        async def one(method, path, headers, body, kind):
            async with sem:
                try:
                    r = await c.request(method, path, headers=headers, content=body)
                except httpx.HTTPError as e:
                    bad.append(f"{kind}: {type(e).__name__}")
                    return
                statuses[r.status_code] += 1
                try:
                    ok_body = isinstance(r.json()["error"]["message"], str)
                except (ValueError, KeyError, TypeError):
                    ok_body = False
                if not (400 <= r.status_code < 500 and ok_body) or "Traceback" in r.text:
                    bad.append(f"{kind}: {r.status_code} {r.text[:80]}")
        await asyncio.gather(*(one(*req) for req in requests))
    return {"statuses": dict(sorted(statuses.items())), "bad": bad}


def fmt_errors(errors: dict) -> str:
    return str(sum(errors.values())) + (f" ({', '.join(f'{k} {v}' for k, v in errors.items())})" if errors else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--reloads", type=int, default=10)
    p.add_argument("--hostile", type=int, default=1000)
    p.add_argument("--slices", type=int, default=6, help="turns each server's load is cut into, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (1: the machine is shared)")
    p.add_argument("--pairs", type=int, default=300, help="one-at-a-time request pairs for the adapter's cost")
    p.add_argument("--fault-rate", type=float, default=0.2, help="upstream mode: share of upstream answers faulted")
    p.add_argument("--upstream-workers", type=int, default=8)
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    from adapter.backends import make_backend
    from adapter.encoder import load_model
    from adapter.serve import adapter_version

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "waterops" / "queries.jsonl").open()]
    model = load_model(MODEL)
    identity = make_backend(model, show_progress=False).identity
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    first = {name: make_adapter(work / f"{name}.safetensors", identity, seed=0) for name in ("on", "off")}
    t0 = time.perf_counter()
    threads = ("--threads", str(args.threads))
    servers = {"on": Server(work / "on.safetensors", *threads),
               "off": Server(work / "off.safetensors", "--max-batch", "1", *threads)}
    for s in servers.values():
        s.wait()
    startup = time.perf_counter() - t0
    print(f"# adapter serve: {args.workers} workers x {args.seconds:g} s, MiniLM on {os.cpu_count()} cores, "
          f"{args.threads} torch thread(s) per server (servers up in {startup:.0f} s; load average before "
          f"{os.getloadavg()[0]:.1f})\n")
    try:
        results = interleaved(servers, texts, args.seconds, args.workers, args.slices)
        for name in results:
            results[name]["mean_batch"] = (servers[name].metric("adapter_serve_batch_texts_sum")
                                           / servers[name].metric("adapter_serve_batch_texts_count"))
        base = dict(zip(texts, model.encode_query(texts, batch_size=64, normalize_embeddings=True,
                                                   convert_to_numpy=True), strict=True))
        version = adapter_version(first["on"])
        checks = {name: check_replies(results[name]["replies"], base, {version: first[name]}) for name in results}

        print(f"## Throughput and latency (one question per request, openai client, base64 replies; {args.slices} "
              "alternating slices per server)\n")
        print("| micro-batching | requests | errors | requests/s | p50 ms | p99 ms | texts per model call (mean) "
              "| max abs diff vs LinearAdapter.apply |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, label in (("on", "on (5 ms window, 64 texts)"), ("off", "off (--max-batch 1)")):
            r = results[name]
            print(f"| {label} | {r['requests']} | {fmt_errors(r['errors'])} | {r['rps']:.1f} | {r['p50']:.1f} | "
                  f"{r['p99']:.1f} | {r['mean_batch']:.1f} | {checks[name]['max_abs_diff']:.1e} |")
        print(f"\nBatching gives {results['on']['rps'] / results['off']['rps']:.1f}x the throughput of one request at "
              "a time.")
        alone = model_alone(model, texts)
        print(f"- The model alone, in this process, one thread: {alone[1]:.1f} ms per text one at a time, "
              f"{alone[32]:.1f} ms per text in batches of 32: at most {alone[1] / alone[32]:.1f}x from batching now.")
        for name in ("on", "off"):
            r = results[name]
            server = servers[name].metric("adapter_serve_request_seconds_sum") / servers[name].metric(
                "adapter_serve_request_seconds_count") * 1000
            print(f"- batching {name}: server-side mean latency {server:.0f} ms; the load generator itself used "
                  f"{r['client_cpu'] / r['requests'] * 1000:.1f} ms of CPU per request")
        print()

        cost = adapter_added_latency(servers["on"].url, texts, args.pairs)
        apply_us = time_apply(first["on"])
        print(f"## What the adapter adds ({args.pairs} request pairs, one at a time, same server)\n")
        print(f"- p50 /v1 (adapted) {cost['p50_query']:.2f} ms, /documents/v1 (base) {cost['p50_document']:.2f} ms; "
              f"median paired difference {cost['p50_paired_diff'] * 1000:+.0f} µs")
        inside = servers["on"].metric("adapter_serve_adapter_seconds_sum") / servers["on"].metric(
            "adapter_serve_adapter_seconds_count") * 1e6
        print(f"- inside the server, applying the adapter (the only step /documents/v1 skips): mean {inside:.0f} µs "
              "per reply over every /v1 request so far (the server's own adapter_serve_adapter_seconds)")
        print(f"- `LinearAdapter.apply` on one 384-d vector alone: median {apply_us:.1f} µs\n")

        versions = {version: first["on"]}
        path = work / "on.safetensors"

        async def replace_files() -> None:
            gap = args.seconds / (args.reloads + 1)
            for seed in range(1, args.reloads + 1):
                await asyncio.sleep(gap)
                a = await asyncio.to_thread(make_adapter, path, identity, seed)
                versions[adapter_version(a)] = a

        async def reload_run() -> dict:
            return await load(servers["on"].url, texts, args.seconds, args.workers, per_request=4,
                              during=replace_files())

        reload = asyncio.run(reload_run())
        time.sleep(1.5)
        health = servers["on"].health()["adapter"]
        rcheck = check_replies(reload["replies"], base, versions)
        seen = Counter(v for _, v, _ in reload["replies"])
        print(f"## Hot reload under load ({args.reloads} replacements in {args.seconds:g} s, 4 questions per "
              "request)\n")
        print(f"- requests {reload['requests']}, errors {fmt_errors(reload['errors'])}, {reload['rps']:.1f} "
              f"requests/s, p50 {reload['p50']:.1f} ms, p99 {reload['p99']:.1f} ms")
        print(f"- server reloads: {health['reloads']}; adapter versions seen in replies: {len(seen)} of "
              f"{len(versions)}; replies with an unknown version: {rcheck['unknown_version']}")
        print(f"- every row against the adapter its header names: max abs diff {rcheck['max_abs_diff']:.1e}; rows "
              f"as close to another adapter: {rcheck['rows_closer_to_another_adapter']} (the nearest other adapter "
              f"was {rcheck['nearest_other_adapter']:.3f} away)\n")

        hostile = hostile_requests(args.hostile, seed=0)
        srv = servers["on"]
        rss0 = srv.rss_mib()
        first_round = asyncio.run(send_hostile(srv.url, hostile))
        rss1 = srv.rss_mib()
        second_round = asyncio.run(send_hostile(srv.url, hostile_requests(args.hostile, seed=1)))
        rss2 = srv.rss_mib()
        import httpx

        after = httpx.post(f"{srv.url}/v1/embeddings", json={"input": "still there?"},
                           headers={"authorization": f"Bearer {KEY}"}, timeout=30)
        kinds = Counter(k for *_, k in hostile)
        print(f"## {args.hostile} malformed or hostile requests, twice ({len(kinds)} kinds, 8 at a time)\n")
        print(f"- kinds: {', '.join(kinds)}")
        for label, r in (("first round", first_round), ("second round", second_round)):
            print(f"- {label}: statuses {r['statuses']}; not a 4xx with a JSON error: {len(r['bad'])}"
                  + (f" ({'; '.join(r['bad'][:5])})" if r["bad"] else ""))
        print(f"- server RSS: {rss0:.0f} MiB before, {rss1:.0f} MiB after the first round, {rss2:.0f} MiB after the "
              f"second")
        print(f"- a good request afterwards: HTTP {after.status_code}\n")
    finally:
        for s in servers.values():
            s.stop()
    upstream_mode(model, texts, work, args)
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.1f} (2 cores shared with other work).")


def upstream_mode(model, texts: list[str], work: Path, args: argparse.Namespace) -> None:
    """`adapter serve --model openai:...` in front of the tests' fault-injecting embeddings server (MiniLM's vectors):
    a load through faults the backend's retries absorb, then an upstream that fails outright."""
    import httpx
    from fake_embeddings import FakeEmbeddings

    from adapter.backends import OpenAIBackend
    from adapter.config import EmbeddingConfig
    from adapter.serve import adapter_version

    faults = ("429", "500", "slow", "notjson", "shuffle", "drop")
    os.environ[UPSTREAM_KEY_ENV] = "upstream-key"
    with FakeEmbeddings(model, fault_rate=args.fault_rate, faults=faults, slow_seconds=2.0, retry_after="1") as fake:
        remote = OpenAIBackend("openai:fake-minilm", EmbeddingConfig(base_url=fake.url, api_key_env=UPSTREAM_KEY_ENV))
        path = work / "upstream.safetensors"
        adapter = make_adapter(path, remote.identity, seed=0)
        server = Server(path, "--model", "openai:fake-minilm", "--embedding-base-url", fake.url,
                        "--embedding-api-key-env", UPSTREAM_KEY_ENV, "--embedding-timeout", "1",
                        "--embedding-rpm", "100000", "--embedding-tpm", "100000000").wait()
        try:
            r = asyncio.run(load(server.url, texts, args.seconds, args.upstream_workers))
            served = fake.faults_seen()
            base = dict(zip(texts, model.encode(texts, batch_size=64, normalize_embeddings=True,
                                                convert_to_numpy=True), strict=True))
            check = check_replies(r["replies"], base, {adapter_version(adapter): adapter})
            upstream_requests = len(fake.requests)
            print(f"## Upstream mode: `--model openai:fake-minilm` against a faulty server ({args.upstream_workers} "
                  f"workers x {args.seconds:g} s)\n")
            print(f"- upstream requests {upstream_requests}, faults served {sum(served.values())} "
                  f"({sum(served.values()) / max(upstream_requests, 1):.0%}: "
                  f"{', '.join(f'{k} {v}' for k, v in sorted(served.items()))})")
            print(f"- client requests {r['requests']}, client-visible errors {fmt_errors(r['errors'])}, "
                  f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms (retries wait 1 s and more, a 429's Retry-After "
                  "1 s, a stall 1 s)")
            print(f"- replies against LinearAdapter.apply on the upstream's own vectors: max abs diff "
                  f"{check['max_abs_diff']:.1e}")

            fake.push("401")
            t0 = time.perf_counter()
            fatal = httpx.post(f"{server.url}/v1/embeddings", json={"input": "a"},
                               headers={"authorization": f"Bearer {KEY}"}, timeout=120)
            fatal_s = time.perf_counter() - t0
            fake.fault_rate, fake.faults, fake.max_faults = 1.0, ("500",), None
            t0 = time.perf_counter()

            async def outage() -> list:
                async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                             headers={"authorization": f"Bearer {KEY}"}) as c:
                    return await asyncio.gather(*(c.post("/v1/embeddings", json={"input": f"outage {i}"})
                                                  for i in range(4)))

            down = asyncio.run(outage())
            down_s = time.perf_counter() - t0
            fake.fault_rate = 0.0
            after = httpx.post(f"{server.url}/v1/embeddings", json={"input": "back"},
                               headers={"authorization": f"Bearer {KEY}"}, timeout=120)
            shapes = all(isinstance(d.json().get("error", {}).get("message"), str) for d in (fatal, *down))
            print(f"- upstream answers 401 (fatal, never retried): HTTP {fatal.status_code} after {fatal_s:.1f} s: "
                  f"{fatal.json()['error']['message']!r}")
            print(f"- upstream down (every answer a 500): {len(down)} requests, HTTP "
                  f"{sorted({d.status_code for d in down})} after {down_s:.0f} s of retries: "
                  f"{down[0].json()['error']['message']!r}")
            print(f"- all in OpenAI's error shape: {shapes}; upstream healthy again: HTTP {after.status_code}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
