"""Benchmark for `adapter serve` (issues #15, #23): the real CLI serving the bundled MiniLM on 127.0.0.1.

1. ``speed``: `adapter serve` against a peer serving the same model on the same machine under the same load, side
   by side in one run: Infinity (``infinity-emb``, from $INFINITY_VENV). W concurrent openai clients for S seconds, one
   question per request, cut into slices that alternate between the servers; throughput ratio, p50/p99, errors,
   replies against ``LinearAdapter.apply`` (ours) and the base model (the peer); then what the adapter adds, /v1
   against /documents/v1 of the same server, one request at a time.
2. ``clients``: every client setup of tests/client_setups.py (stock LangChain, LlamaIndex and openai clients, and
   ours; one object and two) against a live `adapter serve` with an adapter trained on AppleQA (`adapter train`,
   defaults): top-10 equal to ``LinearAdapter.apply`` on base for the first 20 test questions, and hit@10 on every
   test question.
3. ``wire``: LangChain's default ``OpenAIEmbeddings`` (token ids) against its string path; model names.
4. ``limits``: `--model openai:` against four servers that word their batch limit differently.
5. ``reload``: hot reload under the load (4 questions per request); every reply must equal, row by row, the adapter
   its ``x-adapter-version`` header names.
6. ``hostile``: H malformed or hostile requests, twice: each must be a 4xx with a JSON error; RSS before and after.
7. ``upstream``: `adapter serve --model openai:...` against the tests' fault-injecting embeddings server.

    python bench/bench_serve.py [--parts speed,clients,wire,limits,reload,hostile,upstream] [--seconds 30]

Prints a Markdown report on stdout (BENCHMARKS.md quotes it). The speed, reload and hostile parts use random
near-identity adapters with MiniLM's fingerprint: serving cost and correctness do not depend on what an adapter
learned; the clients part trains a real one, since it measures what a wrong setup costs in retrieval.
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
sys.path.insert(0, str(ROOT / "tests"))  # fake_embeddings, client_setups: the tests' own servers and setups
sys.path.insert(0, str(ROOT))
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SHARED = ROOT.parent / "shared"


def tiktoken_dir() -> str | None:
    """The tiktoken files llama-index-core ships, so token-id requests decode offline."""
    try:
        import llama_index.core
    except ImportError:
        return None
    folder = Path(llama_index.core.__file__).parent / "_static" / "tiktoken_cache"
    return str(folder) if folder.is_dir() else None


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

    def __init__(self, adapter: Path, *extra: str, auth: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), KEY_ENV: KEY}
        extra = ("--api-key-env", KEY_ENV, *extra) if auth else extra
        if tiktoken_dir():
            env.setdefault("TIKTOKEN_CACHE_DIR", tiktoken_dir())
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--adapter", str(adapter), "--port",
                                      str(self.port), *extra], cwd=ROOT, env=env,
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
               during=None, model: str = MODEL) -> dict:
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
                raw = await client.embeddings.with_raw_response.create(input=batch, model=model)
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


def interleaved(servers: dict, texts: list[str], seconds: float, workers: int, slices: int) -> dict:
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
    m = b'"model": "' + MODEL.encode() + b'", '
    huge = b'{' + m + b'"input": "' + b"a" * (9 * 1024 * 1024) + b'"}'

    def js(**fields) -> bytes:
        return json.dumps({"model": MODEL, **fields}).encode()

    import gzip

    bomb = gzip.compress(b'{"input": "' + b"a" * (64 * 1024 * 1024) + b'"}')  # 64 MiB inflated, 64 KiB sent
    kinds = {
        "truncated JSON": lambda: js(input=["a", "b"])[: rng.randint(1, 15)],
        "random bytes": lambda: rng.randbytes(rng.randint(1, 400)),
        "nested 100k deep": lambda: b"[" * 100_000,
        "body over 8 MiB": lambda: huge,
        "gzip bomb": lambda: bomb,
        "JSON not an object": lambda: json.dumps(rng.choice([[1, 2], "input", 3.5, None, True])).encode(),
        "input missing": lambda: js(),
        "model missing or unknown": lambda: json.dumps({"input": "a", **rng.choice([{}, {"model": ""}, {
            "model": "text-embedding-3-small"}, {"model": "no-such-model"}])}).encode(),
        "input wrong type": lambda: js(input=rng.choice([3, 2.5, None, True, {"a": 1}, [None], [["x"]], ["ok", 5],
                                                         [{"t": "x"}]])),
        "bad token ids": lambda: js(input=rng.choice([[[1, -2]], [[1, 2], []], [[10**9]], [["a", 1]], [1, [2]]])),
        "empty input": lambda: js(input=rng.choice(["", [], ["a", ""]])),
        "2049 inputs": lambda: js(input=["q"] * 2049),
        "input over 100k chars": lambda: js(input="ü" * 100_001),
        "lone surrogate": lambda: rng.choice([b'{' + m + b'"input": "\\ud800"}',
                                              b'{' + m + b'"input": ["ok", "a\\udfffb"]}']),
        "invalid UTF-8": lambda: b'{' + m + b'"input": "' + rng.choice([b"\xc0\xaf", b"\xff\xfe", b"\xed\xa0\x80",
                                                                        b"\xf8\x88\x80\x80\x80"]) + b'"}',
        "NaN dimensions": lambda: b'{' + m + b'"input": "a", "dimensions": NaN}',
        "bad dimensions": lambda: js(input="a", dimensions=rng.choice([0, -1, 385, 10**30, "64", 1.5, True])),
        "bad encoding_format": lambda: js(input="a", encoding_format=rng.choice(["int8", "", 1, "FLOAT",
                                                                                 ["float"]])),
        "bad input_type": lambda: js(input="a", input_type=rng.choice(["passage", "", 1, "QUERY"])),
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
                        js(input="a"), kind))
        elif kind == "no token":
            out.append(("POST", path, {}, js(input="a"), kind))
        elif kind == "gzip bomb":
            out.append(("POST", path, {**auth, "content-encoding": "gzip"}, bomb, kind))
        elif kind == "wrong method":
            out.append((rng.choice(["GET", "PUT", "DELETE"]), path, auth, None, kind))
        elif kind == "unknown path":
            out.append(("POST", rng.choice(["/v2/embeddings", "/v1/embedding", "/../etc/passwd", "/v1/chat"]), auth,
                        js(input="a"), kind))
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


class Peer:
    """The peer `adapter serve` is measured against: Infinity serving the same MiniLM folder from its own virtualenv
    ($INFINITY_VENV, as .ci/run installs it); without it the bench stops, saying why."""

    def __init__(self, model_dir: str, threads: int | None):
        from fake_embeddings import Infinity

        self.reason = Infinity.missing()
        self.server = None
        if self.reason is None:
            self.name = "Infinity 0.0.78 (infinity-emb, torch engine, --batch-size 32)"
            self.server = Infinity(model_dir, name=MODEL)
            self.server.__enter__()
            self.url = self.server.url.removesuffix("/v1")
            self.pid = self.server.proc.pid
        else:
            raise SystemExit(f"the peer cannot run: {self.reason}")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.server is not None:
            self.server.__exit__()


def speed(args: argparse.Namespace, model, texts: list[str], identity: str, work: Path) -> dict:
    """`adapter serve` (defaults) against the peer on the same model, the same load, alternating slices."""
    from adapter.backends import resolve_model
    from adapter.serve import adapter_version

    adapter = make_adapter(work / "speed.safetensors", identity, seed=0)
    threads = ("--threads", str(args.threads)) if args.threads else ()
    t0 = time.perf_counter()
    ours = Server(work / "speed.safetensors", *threads).wait()
    peer = Peer(resolve_model(MODEL), args.threads)
    startup = time.perf_counter() - t0
    print(f"## Serving speed: `adapter serve` against {peer.name}, same model, same machine, same load\n")
    print(f"{args.workers} concurrent openai clients (`AsyncOpenAI`, base64 replies as it asks by default), one "
          f"waterops question per request, {args.seconds:g} s per server in {args.slices} slices that "
          f"alternate between the two; torch threads: {args.threads or 'each server its default'}; {os.cpu_count()} "
          f"cores; servers up in {startup:.0f} s.\n")
    try:
        pooled = interleaved({"adapter serve": ours, "peer": peer}, texts, args.seconds, args.workers, args.slices)
        base = dict(zip(texts, model.encode_query(texts, batch_size=64, normalize_embeddings=True,
                                                   convert_to_numpy=True), strict=True))
        identity_check = check_replies([(b, "base", v) for b, _, v in pooled["peer"]["replies"]], base,
                                       {"base": _Identity()})
        ours_check = check_replies(pooled["adapter serve"]["replies"], base, {adapter_version(adapter): adapter})
        print("| server | requests | errors | requests/s | p50 ms | p99 ms | max abs diff vs reference |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, check, ref in (("adapter serve", ours_check, "LinearAdapter.apply on base"),
                                 ("peer", identity_check, "the base model")):
            r = pooled[name]
            label = "`adapter serve` /v1 (adapted)" if name == "adapter serve" else peer.name
            print(f"| {label} | {r['requests']} | {fmt_errors(r['errors'])} | {r['rps']:.1f} | {r['p50']:.1f} | "
                  f"{r['p99']:.1f} | {check['max_abs_diff']:.1e} ({ref}) |")
        ratio = pooled["adapter serve"]["rps"] / pooled["peer"]["rps"]
        print(f"\nThroughput ratio, `adapter serve` / peer: **{ratio:.2f}x**; p50 {pooled['adapter serve']['p50']:.0f} "
              f"against {pooled['peer']['p50']:.0f} ms, p99 {pooled['adapter serve']['p99']:.0f} against "
              f"{pooled['peer']['p99']:.0f} ms.")
        mean_batch = ours.metric("adapter_serve_batch_texts_sum") / ours.metric("adapter_serve_batch_texts_count")
        print(f"- `adapter serve`: {mean_batch:.1f} texts per model call (mean); RSS {ours.rss_mib():.0f} MiB, peer "
              f"{peer.rss_mib():.0f} MiB")
        alone = model_alone(model, texts)
        print(f"- the model alone, in the bench process, one thread: {alone[1]:.1f} ms per text one at a time, "
              f"{alone[32]:.1f} ms per text in batches of 32 ({alone[1] / alone[32]:.1f}x from batching)")
        cost = adapter_added_latency(ours.url, texts, args.pairs)
        inside = ours.metric("adapter_serve_adapter_seconds_sum") / ours.metric("adapter_serve_adapter_seconds_count")
        print(f"- what the adapter adds ({args.pairs} request pairs one at a time, same server): p50 /v1 "
              f"{cost['p50_query']:.2f} ms, /documents/v1 {cost['p50_document']:.2f} ms, median paired difference "
              f"**{cost['p50_paired_diff'] * 1000:+.0f} µs**; inside the server, applying it takes "
              f"{inside * 1e6:.0f} µs per reply (mean over every /v1 request); `LinearAdapter.apply` on one "
              f"vector alone {time_apply(adapter):.1f} µs\n")
        return {"ratio": ratio, "added_us": cost["p50_paired_diff"] * 1000}
    finally:
        ours.stop()
        peer.stop()


class _Identity:
    """The reference for the peer's replies: the base vectors themselves."""

    @staticmethod
    def apply(x: np.ndarray) -> np.ndarray:
        return x


def clients(args: argparse.Namespace, work: Path) -> None:
    """Each client setup against a live `adapter serve` with an adapter trained on AppleQA: top-10 equal to the
    intended ranking on the first 20 test questions, and hit@10 on every test question."""
    from client_setups import SETUPS, Live, intended
    from common import appleqa, cli, cli_env

    from adapter.backends import resolve_model
    from adapter.data import load_dataset
    from adapter.encoder import load_model
    from adapter.model import LinearAdapter

    if not (SHARED / "data" / "appleqa" / "apple_QA_dataset.json").is_file():
        print("## Client setups: skipped (AppleQA is not in ../shared/data)\n")
        return
    ds_dir = appleqa(SHARED, work)
    env = cli_env(ADAPTER_CACHE=str(work / "cache"))
    t0 = time.perf_counter()
    cli("train", str(ds_dir), "--out", str(work / "appleqa.safetensors"), "--force", env=env)
    train_s = time.perf_counter() - t0
    ds = load_dataset(ds_dir)
    test = ds.split("test")
    qids = list(test)
    ids = list(ds.corpus)
    texts = [ds.doc_text(c) for c in ids]
    questions = [ds.queries[q] for q in qids]
    model = load_model(MODEL)
    adapter = LinearAdapter.load(work / "appleqa.safetensors")
    base_q = model.encode_query(questions, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    base_d = model.encode_document(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    want = intended(adapter, base_q, base_d, ids, 10)
    base = intended(_Identity(), base_q, base_d, ids, 10)

    def hit10(ranked: list[list[str]]) -> float:
        return float(np.mean([any(c in test[q] and test[q][c] > 0 for c in top) for q, top in
                              zip(qids, ranked, strict=True)]))

    server = Server(work / "appleqa.safetensors", "--served-model-name", "all-MiniLM-L6-v2", auth=False).wait()
    live = Live(server.url, "all-MiniLM-L6-v2", work / "appleqa.safetensors", str(resolve_model(MODEL)))
    print(f"## Client setups against `adapter serve` (AppleQA split by query, seed 0: {len(ids)} chunks, "
          f"{len(qids)} test questions; the adapter from `adapter train` with its defaults, {train_s:.0f} s)\n")
    print(f"Intended (`LinearAdapter.apply` on base, numpy): hit@10 {hit10(want):.3f}; the base model alone "
          f"{hit10(base):.3f}.\n")
    print("| client setup | README recommends | top-10 = intended, first 20 questions | top-10 = intended, all "
          f"{len(qids)} | hit@10, all {len(qids)} | seconds |")
    print("| --- | :---: | :---: | ---: | ---: | ---: |")
    try:
        for name, (recommended, rank) in SETUPS.items():
            t0 = time.perf_counter()
            try:
                got = rank(live, ids, texts, questions, 10)
            except Exception as e:  # a setup that cannot run is a row that says so
                print(f"| {name} | {'yes' if recommended else 'no'} | error: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]} | | | |")
                continue
            same20 = sum(g == w for g, w in zip(got[:20], want[:20], strict=True))
            same = sum(g == w for g, w in zip(got, want, strict=True))
            print(f"| {name} | {'yes' if recommended else 'no'} | {'yes' if same20 == 20 else 'no'} ({same20}/20) | "
                  f"{same}/{len(qids)} | {hit10(got):.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
    finally:
        server.stop()
    print()


def wire(texts: list[str], identity: str, work: Path) -> None:
    """LangChain's default client (token ids) against its string path, and model names, on a live server."""
    import httpx
    from client_setups import Live, lc_openai

    path = work / "wire.safetensors"
    make_adapter(path, identity, seed=3)
    server = Server(path, "--served-model-name", "all-MiniLM-L6-v2", "--served-model-name", "text-embedding-3-small",
                    auth=False).wait()
    try:
        print("## What stock clients send\n")
        for name in ("all-MiniLM-L6-v2", "text-embedding-3-small"):
            live = Live(server.url, name, path, MODEL)
            tokens = lc_openai(live, "/v1").embed_documents(texts[:100])
            strings = lc_openai(live, "/v1", check_embedding_ctx_length=False).embed_documents(texts[:100])
            print(f"- LangChain `OpenAIEmbeddings(model={name!r}, base_url=..., api_key=...)` (token ids on the wire, "
                  f"cl100k_base from the files tiktoken finds, offline) against `check_embedding_ctx_length=False` "
                  f"(strings), 100 questions: max abs diff {np.abs(np.array(tokens) - np.array(strings)).max():.1e}")
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": "a", "model": "text-embedding-3-large"})
        print(f"- a name the server was not given: HTTP {r.status_code} `{r.text}`")
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": "a", "model": "text-embedding-3-small"})
        print(f"- with `--served-model-name text-embedding-3-small`, that name: HTTP {r.status_code}\n")
    finally:
        server.stop()


def limits(model) -> None:
    """`--model openai:` against four servers that word their batch limit differently: requests sent, refusals,
    the size found, against the bound (batches at the size found + log2 of the batch size)."""
    import math

    from fake_embeddings import FakeEmbeddings

    from adapter.backends import OpenAIBackend
    from adapter.config import EmbeddingConfig

    wordings = [(413, "batch size {n} > maximum allowed batch size {max}", 32, "Text Embeddings Inference's 413"),
                (400, "at most {max} inputs", 20, '400 "at most N inputs"'), (422, None, 12, "422, empty body"),
                (400, "Request rejected", 7, '400 "Request rejected"')]
    texts = [f"pipe {i} of the network, inspected in week {i % 52}" for i in range(1000)]
    want = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    print("## Batch limits found without reading the message (`--model openai:`, 1,000 texts, batch size 128, "
          "one request in flight)\n")
    print("| server says | its limit | requests | refused | size found | bound: ceil(texts/found) + log2(128) | "
          "max abs diff vs local |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for status, message, limit, label in wordings:
        with FakeEmbeddings(model, max_inputs=limit, batch_error=(status, message)) as server:
            b = OpenAIBackend("openai:fake-minilm", EmbeddingConfig(
                base_url=server.url, batch_size=128, concurrency=1, requests_per_minute=None,
                tokens_per_minute=None), show_progress=False)
            got = b.embed(texts)
        bound = math.ceil(len(texts) / b.largest_ok) + math.ceil(math.log2(128))
        print(f"| {label} | {limit} | {len(server.requests)} | {b.refused} | {b.largest_ok} | {bound} | "
              f"{np.abs(got - want).max():.1e} |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="speed,clients,wire,limits,reload,hostile,upstream")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--reloads", type=int, default=10)
    p.add_argument("--hostile", type=int, default=1000)
    p.add_argument("--slices", type=int, default=6, help="turns each server's load is cut into, alternating")
    p.add_argument("--threads", type=int, default=None, help="torch threads per server [default: each its own]")
    p.add_argument("--pairs", type=int, default=300, help="one-at-a-time request pairs for the adapter's cost")
    p.add_argument("--fault-rate", type=float, default=0.2, help="upstream mode: share of upstream answers faulted")
    p.add_argument("--upstream-workers", type=int, default=8)
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if tiktoken_dir():  # LangChain's default client tokenizes here, offline
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", tiktoken_dir())

    from adapter.backends import make_backend
    from adapter.encoder import load_model

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "waterops" / "queries.jsonl").open()]
    model = load_model(MODEL)
    identity = make_backend(model, show_progress=False).identity
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    print(f"# adapter serve: {os.cpu_count()} cores\n")
    if "speed" in parts:
        speed(args, model, texts, identity, work)
    if "clients" in parts:
        clients(args, work)
    if "wire" in parts:
        wire(texts, identity, work)
    if "limits" in parts:
        limits(model)
    if parts & {"reload", "hostile"}:
        first = make_adapter(work / "on.safetensors", identity, seed=0)
        srv = Server(work / "on.safetensors").wait()
        try:
            base = dict(zip(texts, model.encode_query(texts, batch_size=64, normalize_embeddings=True,
                                                       convert_to_numpy=True), strict=True))
            if "reload" in parts:
                reload_part(args, srv, texts, base, first, identity, work)
            if "hostile" in parts:
                hostile_part(args, srv)
        finally:
            srv.stop()
    if "upstream" in parts:
        upstream_mode(model, texts, work, args)


def reload_part(args, srv: Server, texts, base, first, identity: str, work: Path) -> None:
    from adapter.serve import adapter_version

    versions = {adapter_version(first): first}
    path = work / "on.safetensors"

    async def replace_files() -> None:
        gap = args.seconds / (args.reloads + 1)
        for seed in range(1, args.reloads + 1):
            await asyncio.sleep(gap)
            a = await asyncio.to_thread(make_adapter, path, identity, seed)
            versions[adapter_version(a)] = a

    async def reload_run() -> dict:
        return await load(srv.url, texts, args.seconds, args.workers, per_request=4, during=replace_files())

    reload = asyncio.run(reload_run())
    time.sleep(1.5)
    health = srv.health()["adapter"]
    rcheck = check_replies(reload["replies"], base, versions)
    seen = Counter(v for _, v, _ in reload["replies"])
    print(f"## Hot reload under load ({args.reloads} replacements in {args.seconds:g} s, {args.workers} clients, 4 "
          "questions per request)\n")
    print(f"- requests {reload['requests']}, errors {fmt_errors(reload['errors'])}, {reload['rps']:.1f} "
          f"requests/s, p50 {reload['p50']:.1f} ms, p99 {reload['p99']:.1f} ms")
    print(f"- server reloads: {health['reloads']}; adapter versions seen in replies: {len(seen)} of "
          f"{len(versions)}; replies with an unknown version: {rcheck['unknown_version']}")
    print(f"- every row against the adapter its header names: max abs diff {rcheck['max_abs_diff']:.1e}; rows "
          f"as close to another adapter: {rcheck['rows_closer_to_another_adapter']} (the nearest other adapter "
          f"was {rcheck['nearest_other_adapter']:.3f} away)\n")


def hostile_part(args, srv: Server) -> None:
    import httpx

    hostile = hostile_requests(args.hostile, seed=0)
    rss0 = srv.rss_mib()
    first_round = asyncio.run(send_hostile(srv.url, hostile))
    rss1 = srv.rss_mib()
    second_round = asyncio.run(send_hostile(srv.url, hostile_requests(args.hostile, seed=1)))
    rss2 = srv.rss_mib()
    after = httpx.post(f"{srv.url}/v1/embeddings", json={"input": "still there?", "model": MODEL},
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
                        "--set", f"embedding.api_key_env={UPSTREAM_KEY_ENV}", "--set", "embedding.request_timeout=1",
                        "--set", "embedding.requests_per_minute=100000",
                        "--set", "embedding.tokens_per_minute=100000000").wait()
        try:
            r = asyncio.run(load(server.url, texts, args.seconds, args.upstream_workers, model="fake-minilm"))
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
            fatal = httpx.post(f"{server.url}/v1/embeddings", json={"input": "a", "model": "fake-minilm"},
                               headers={"authorization": f"Bearer {KEY}"}, timeout=120)
            fatal_s = time.perf_counter() - t0
            fake.fault_rate, fake.faults, fake.max_faults = 1.0, ("500",), None
            t0 = time.perf_counter()

            async def outage() -> list:
                async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                             headers={"authorization": f"Bearer {KEY}"}) as c:
                    return await asyncio.gather(*(c.post("/v1/embeddings", json={"input": f"outage {i}",
                                                                                  "model": "fake-minilm"})
                                                  for i in range(4)))

            down = asyncio.run(outage())
            down_s = time.perf_counter() - t0
            fake.fault_rate = 0.0
            after = httpx.post(f"{server.url}/v1/embeddings", json={"input": "back", "model": "fake-minilm"},
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
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "serve")
