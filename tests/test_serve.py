"""`adapter serve`: the OpenAI schema through the real openai client, bad requests, auth, micro-batches, hot reload,
metrics. Servers run on 127.0.0.1 with the tiny local BERT; every wait is bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="adapter[serve] is not installed")
pytest.importorskip("uvicorn", reason="adapter[serve] is not installed")

import uvicorn  # noqa: E402

from adapter.backends import SentenceTransformerBackend  # noqa: E402
from adapter.config import ServeConfig  # noqa: E402
from adapter.encoder import truncate  # noqa: E402
from adapter.model import LinearAdapter  # noqa: E402
from adapter.serve import (  # noqa: E402
    AdapterSlot,
    EmbeddingService,
    MicroBatcher,
    adapter_version,
    create_app,
    fair_shares,
    uvicorn_config,
)

TEXTS = ["how do you shut off a broken water pipe", "chlorine level at the reservoir", "é 😀 \u200b zero-width"]


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> SentenceTransformerBackend:
    return SentenceTransformerBackend(str(tiny_model_dir), show_progress=False)


def tokens(backend: SentenceTransformerBackend, texts: list[str]) -> int:
    return sum(len(ids) for ids in backend.model.tokenizer(texts)["input_ids"])


def make_adapter(backend: SentenceTransformerBackend, path: Path, seed: int) -> LinearAdapter:
    """A full adapter near the identity (seeded), written atomically to ``path``."""
    rng = np.random.default_rng(seed)
    a = LinearAdapter.identity(backend.dim, backend.identity)
    a.weight = (np.eye(backend.dim) + 0.3 * rng.standard_normal((backend.dim, backend.dim))).astype(np.float32)
    tmp = path.with_name(f".{path.name}.{seed}.tmp")
    a.save(tmp)
    os.replace(tmp, path)
    return a


@contextlib.contextmanager
def running(service: EmbeddingService, api_key: str | None = None):
    """Serve ``service`` with uvicorn in a thread on a socket bound here to a free 127.0.0.1 port (handed over still
    bound, so no other process can take the port in between); yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_app(service, api_key=api_key), service.cfg))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60  # a liveness bound only
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def adapter_file(backend: SentenceTransformerBackend, tmp_path: Path) -> Path:
    path = tmp_path / "adapter.safetensors"
    make_adapter(backend, path, seed=1)
    return path


NAME = "tiny-bert"  # the name the tests' clients send; the tiny model's own is a temporary path
SERVED = ServeConfig(served_model_names=(NAME,))


@pytest.fixture
def url(backend: SentenceTransformerBackend, adapter_file: Path):
    cfg = ServeConfig(max_body_bytes=64 * 1024, max_inputs=16, max_input_chars=2000, reload_interval=0.05,
                      served_model_names=(NAME, "text-embedding-3-small"))
    with running(EmbeddingService(backend, adapter_file, cfg)) as u:
        yield u


def test_openai_client_gets_adapted_queries_and_base_documents(backend, adapter_file, url):
    from openai import OpenAI

    adapter = LinearAdapter.load(adapter_file)
    base_q = backend.model.encode_query(TEXTS, normalize_embeddings=True)
    base_d = backend.model.encode_document(TEXTS, normalize_embeddings=True)
    queries = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    docs = OpenAI(base_url=f"{url}/documents/v1", api_key="unused", max_retries=0)
    for fmt in ("float", "base64"):
        r = queries.embeddings.create(input=TEXTS, model="tiny-bert", encoding_format=fmt)
        got = np.array([d.embedding for d in r.data]) if fmt == "float" else np.stack(
            [np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in r.data])
        assert [d.index for d in r.data] == [0, 1, 2]
        np.testing.assert_allclose(got, adapter.apply(base_q), atol=1e-6)
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens(backend, TEXTS)
    default = queries.embeddings.create(input=TEXTS[0], model="tiny-bert")  # the client asks for base64 itself
    np.testing.assert_allclose(default.data[0].embedding, adapter.apply(base_q[:1])[0], atol=1e-6)
    r = docs.embeddings.create(input=TEXTS, model="tiny-bert", encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), base_d, atol=1e-6)
    assert not np.allclose(base_d, adapter.apply(base_q), atol=1e-3)  # the two endpoints really differ
    r = queries.embeddings.create(input=TEXTS, model="tiny-bert", dimensions=8, encoding_format="float")
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, truncate(adapter.apply(base_q), 8), atol=1e-6)  # adapt, then cut, renormalise
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    models = queries.models.list()
    assert [m.id for m in models.data] == [NAME, "text-embedding-3-small"]
    assert queries.models.retrieve("text-embedding-3-small").id == "text-embedding-3-small"
    assert r.model == "tiny-bert"  # the name asked for comes back


def body(**fields) -> bytes:
    return json.dumps({"model": NAME, **fields}).encode()


BAD = [  # (body bytes, expected status, a word the message must hold)
    (b"{not json", 400, "JSON"),
    (b"[" * 50_000, 400, "JSON"),  # nested past the parser's recursion limit
    (b'{"input": "\\ud800", "model": "tiny-bert"}', 400, "surrogate"),
    (b"\xff\xfe\xfa", 400, "JSON"),
    (b'"just a string"', 400, "object"),
    (b'{"model": "tiny-bert"}', 400, "required"),
    (body(input=[]), 400, "empty"),
    (body(input=""), 400, "empty"),
    (body(input=["ok", ""]), 400, "input[1]"),
    (body(input=[[1, 2], ["x"]]), 400, "token ids"),
    (body(input=[[1, 2], []]), 400, "token ids"),
    (body(input=[[1, -2]]), 400, "token ids"),
    (body(input=["ok", [1, 2]]), 400, "mixed"),
    (body(input={"a": 1}), 400, "string"),
    (body(input=[None]), 400, "string"),
    (json.dumps({"input": ["a"], "model": 5}).encode(), 400, "model"),
    (json.dumps({"input": ["a"]}).encode(), 400, "'model' is required"),
    (json.dumps({"input": ["a"], "model": ""}).encode(), 400, "'model' is required"),
    (body(input="a", dimensions=0), 400, "dimensions"),
    (body(input="a", dimensions=33), 400, "dimensions"),  # the tiny model is 32-dimensional
    (body(input="a", dimensions="8"), 400, "dimensions"),
    (body(input="a", dimensions=True), 400, "dimensions"),
    (body(input="a", encoding_format="int8"), 400, "encoding_format"),
    (body(input="a", input_type="passage"), 400, "input_type"),
    (body(input=["a"] * 17), 400, "at most 16"),
    (body(input="x" * 2001), 400, "characters"),
    (body(input="x" * 70_000), 413, "limit"),
]


def test_bad_requests_are_4xx_in_openai_shape_and_the_server_goes_on(url):
    with httpx.Client(base_url=url, timeout=10) as c:
        for body, status, word in BAD:
            for path in ("/v1/embeddings", "/documents/v1/embeddings"):
                r = c.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == status, (body[:40], r.text)
                err = r.json()["error"]
                assert word in err["message"] and err["type"] == "invalid_request_error", err
                assert "Traceback" not in r.text
        chunked = c.post("/v1/embeddings", content=iter([b'{"model": "tiny-bert", "input": "', b"x" * 70_000,
                                                         b'"}']))  # no length
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]["message"]
        for method, path, status in (("GET", "/v1/embeddings", 405), ("POST", "/v2/embeddings", 404),
                                     ("GET", "/nowhere", 404)):
            r = c.request(method, path)
            assert r.status_code == status and "error" in r.json()
        assert c.post("/v1/embeddings", json={"input": "still answering", "model": NAME}).status_code == 200
        metrics = c.get("/metrics").text
    assert 'adapter_serve_requests_total{endpoint="/v1/embeddings",status="400"} 26.0' in metrics
    assert 'adapter_serve_requests_total{endpoint="/v1/embeddings",status="413"} 2.0' in metrics
    assert 'adapter_serve_errors_total{endpoint="/v1/embeddings",type="invalid_request_error"} 28.0' in metrics
    assert "adapter_serve_request_seconds_bucket" in metrics and "adapter_serve_batch_texts_count" in metrics


def test_bearer_auth_from_an_environment_variable(backend, adapter_file):
    service = EmbeddingService(backend, adapter_file, SERVED)
    with running(service, api_key="s3cret") as url, httpx.Client(base_url=url) as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                        {"authorization": "Basic s3cret"}):
            for path in ("/v1/embeddings", "/documents/v1/embeddings"):
                r = c.post(path, json={"input": "a", "model": NAME}, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models", headers=headers).status_code == 401
        ok = c.post("/v1/embeddings", json={"input": "a", "model": NAME}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def test_serve_refuses_an_unset_key_variable_in_one_line(adapter_file, monkeypatch):
    from click.testing import CliRunner

    from cli import main

    monkeypatch.delenv("NO_SUCH_SERVE_KEY", raising=False)
    r = CliRunner().invoke(main, ["serve", "--adapter", str(adapter_file), "--api-key-env", "NO_SUCH_SERVE_KEY"])
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0 and "NO_SUCH_SERVE_KEY" in r.output


def test_serve_checks_its_numbers_before_loading_anything(adapter_file):
    from click.testing import CliRunner

    from cli import main

    for option, value, words in (("--set", "serve.max_batch=0", "serve.max_batch must be >= 1"),
                                 ("--set", "serve.batch_window_ms=nan", "serve.batch_window_ms takes a finite number"),
                                 ("--port", "70000", "--port"), ("--threads", "0", "--threads"),
                                 ("--set", "serve.max_body_bytes=-1", "serve.max_body_bytes must be >= 1")):
        r = CliRunner().invoke(main, ["serve", "--adapter", str(adapter_file), option, value])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_serve_refuses_an_adapter_of_another_model_in_one_line(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from cli import main

    other = LinearAdapter.identity(32, "some-other-model@0123456789ab").save(tmp_path / "other.safetensors")
    r = CliRunner().invoke(main, ["serve", "--adapter", str(other), "--model", str(tiny_model_dir)])
    assert r.exit_code == 1 and "trained on some-other-model" in r.output and "Traceback" not in r.output


def test_a_broken_model_is_a_500_in_openai_shape_without_a_traceback(backend, adapter_file, caplog):
    class Broken(SentenceTransformerBackend):
        def embed(self, texts, role):
            raise RuntimeError("CUDA error: device-side assert triggered\nwith a second line")

    broken = Broken(backend.model, show_progress=False)
    with running(EmbeddingService(broken, adapter_file, SERVED)) as url, caplog.at_level(logging.ERROR,
                                                                                         "adapter.serve"):
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "a", "model": NAME})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "Traceback" not in r.text and "second line" not in r.text
    assert any("RuntimeError: CUDA error" in m for m in caplog.messages)


# ----------------------------------------------------------------------------------------------- micro-batching


def test_micro_batches_gather_concurrent_requests_under_the_cap():
    calls: list[list[str]] = []

    def fn(texts: list[str]) -> tuple[np.ndarray, list[int]]:
        calls.append(texts)
        if "boom" in texts:
            raise ValueError("boom")
        return np.array([[float(t)] for t in texts]), [1] * len(texts)

    async def scenario(max_batch: int, requests: list[list[str]]) -> list:
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(fn, pool, window=0.05, max_batch=max_batch)
            b.start()
            out = await asyncio.gather(*(b.submit(r) for r in requests), return_exceptions=True)
            await b.stop()
        return out

    reqs = [["1"], ["2", "3"], ["4"], ["5", "6", "7"]]
    out = asyncio.run(scenario(3, reqs))
    assert calls == [["1", "2", "4"], ["3", "5", "6"], ["7"]]  # each call shared fairly, large requests split
    for r, (vectors, tokens) in zip(reqs, out, strict=True):  # each request gets its own rows back, in order
        assert vectors[:, 0].tolist() == [float(t) for t in r] and tokens == [1] * len(r)
    calls.clear()
    asyncio.run(scenario(64, reqs))
    assert calls == [["1", "2", "3", "4", "5", "6", "7"]]
    calls.clear()
    asyncio.run(scenario(1, reqs))
    assert calls == [[t] for t in "1234567"]  # max_batch 1: one text a call, in arrival order
    calls.clear()
    out = asyncio.run(scenario(64, [["1"], ["boom"]]))
    assert all(isinstance(o, ValueError) for o in out)  # a failed call fails each request in it


def test_fair_shares():
    assert fair_shares([1, 2, 1, 3], 3) == [1, 1, 1, 0]
    assert fair_shares([512, 1], 64) == [63, 1]
    assert fair_shares([2, 100, 100], 64) == [2, 31, 31]
    assert fair_shares([5, 5], 64) == [5, 5]
    assert fair_shares([0, 3], 2) == [0, 2]


def test_a_one_text_request_waits_at_most_one_model_call_behind_a_huge_one():
    """512 texts arrive, then one text while the first model call runs: the one text is in the second call, and no
    call holds more than max_batch texts (the old batcher ran the 512 in one call and the one text after it)."""
    calls: list[list[str]] = []
    running_first, release = threading.Event(), threading.Event()

    def fn(texts: list[str]) -> tuple[np.ndarray, list[int]]:
        calls.append(texts)
        if len(calls) == 1:
            running_first.set()
            assert release.wait(30)  # a liveness bound only
        return np.array([[float(len(t))] for t in texts]), [1] * len(texts)

    async def scenario() -> tuple:
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(fn, pool, window=0.0, max_batch=8)
            b.start()
            huge = asyncio.ensure_future(b.submit(["x" * (i % 5 + 1) for i in range(512)]))
            assert await asyncio.to_thread(running_first.wait, 30)
            small = asyncio.ensure_future(b.submit(["small one"]))
            await asyncio.sleep(0)  # queued behind the running call
            release.set()
            out = await asyncio.gather(huge, small)
            await b.stop()
        return out

    (huge, _), (small, _) = asyncio.run(scenario())
    assert max(len(c) for c in calls) <= 8 and sum(len(c) for c in calls) == 513
    assert "small one" in calls[1]
    assert huge[:, 0].tolist() == [float(i % 5 + 1) for i in range(512)] and small[0, 0] == 9.0


class HeldFirstCall:
    """The backend with its first model call held until every one of ``n`` requests is in it or queued behind it,
    so the test knows the rest arrived while the model was busy, however loaded the machine (a timing window alone
    cannot promise that)."""

    def __init__(self, backend: SentenceTransformerBackend, n: int):
        self.backend, self.n, self.held, self.service = backend, n, False, None

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def embed(self, texts: list[str], role: str = "document", **kw) -> np.ndarray:
        if not self.held:
            self.held = True
            deadline = time.monotonic() + 60
            while len(texts) + self.service.batchers[role]._queued_texts < self.n and time.monotonic() < deadline:
                time.sleep(0.005)
        return self.backend.embed(texts, role, **kw)


def test_concurrent_clients_share_model_calls(backend, adapter_file):
    held = HeldFirstCall(backend, 8)
    held.service = service = EmbeddingService(held, adapter_file, ServeConfig(batch_window_ms=5, max_batch=64,
                                                                                   served_model_names=(NAME,)))
    with running(service) as url:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda t: httpx.post(f"{url}/v1/embeddings", json={"input": t, "model": NAME},
                                                             timeout=60),
                                    [f"question {i}" for i in range(8)]))
        metrics = httpx.get(f"{url}/metrics").text
    assert all(r.status_code == 200 for r in replies)
    calls = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("adapter_serve_batch_texts_count")))
    assert calls <= 2  # the first call, then everything that queued while it ran, in one


# --------------------------------------------------------------------------------------------------- hot reload


def test_reload_swaps_a_valid_file_and_refuses_a_broken_one(backend, tmp_path, caplog):
    path = tmp_path / "a.safetensors"
    make_adapter(backend, path, seed=1)
    slot = AdapterSlot(path, backend)
    first = slot.current
    assert not slot.poll()  # unchanged
    new = make_adapter(backend, path, seed=2)
    assert slot.poll() and slot.current is not first
    np.testing.assert_array_equal(slot.current.adapter.weight, new.weight)
    good = slot.current
    with caplog.at_level(logging.WARNING, "adapter.serve"):
        for broken in (b"not a safetensors file", path.read_bytes()[:100]):
            tmp = tmp_path / "broken.tmp"
            tmp.write_bytes(broken)
            os.replace(tmp, path)
            assert not slot.poll() and slot.current is good
            assert not slot.poll()  # refused once: no log line per look
        other = LinearAdapter.identity(16, backend.identity)  # the wrong dimension
        other.save(tmp_path / "other.safetensors")
        os.replace(tmp_path / "other.safetensors", path)
        assert not slot.poll() and slot.current is good
        path.unlink()
        assert not slot.poll() and slot.current is good
    refusals = [m for m in caplog.messages if "still serving" in m]
    assert len(refusals) == 4 and all("\n" not in m for m in refusals), refusals
    assert slot.reloads == {"ok": 1, "refused": 4}
    make_adapter(backend, path, seed=3)
    assert slot.poll() and slot.reloads["ok"] == 2


def test_replies_under_reloads_come_whole_from_one_adapter(backend, adapter_file):
    """Clients hammer the server while the file is replaced; each reply equals the adapter its header names."""
    adapters = {1: LinearAdapter.load(adapter_file)}
    cfg = ServeConfig(reload_interval=0.02, batch_window_ms=2, served_model_names=(NAME,))

    versions = {adapter_version(adapters[1]): adapters[1]}
    base = backend.model.encode_query(TEXTS, normalize_embeddings=True)
    stop = threading.Event()
    seen: list[tuple[str, np.ndarray]] = []
    failures: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=20) as c:
            while not stop.is_set():
                r = c.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "float", "model": NAME})
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                seen.append((r.headers["x-adapter-version"], np.array([d["embedding"] for d in r.json()["data"]])))

    with running(EmbeddingService(backend, adapter_file, cfg)) as url:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for seed in range(2, 7):
            a = make_adapter(backend, adapter_file, seed)
            versions[adapter_version(a)] = a
            deadline = time.monotonic() + 60  # a liveness bound only: a loaded machine polls late
            while httpx.get(f"{url}/health").json()["adapter"]["version"] != adapter_version(a):
                assert time.monotonic() < deadline, "reload not seen within 60 s"
                time.sleep(0.02)
        time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures
    assert len({v for v, _ in seen}) >= 3  # the clients did see several adapters
    for version, got in seen:
        np.testing.assert_allclose(got, versions[version].apply(base), atol=1e-5)


# ------------------------------------------------------------------------------------------------ upstream mode


@contextlib.contextmanager
def upstream(tiny_backend: SentenceTransformerBackend, tmp_path: Path, monkeypatch, **fake_options):
    """A faulty OpenAI-compatible embeddings server of the tests' own serving the tiny model, and `adapter serve`
    in front of it through the OpenAI backend; yields (fake, serve URL, adapter)."""
    from fake_embeddings import FakeEmbeddings

    from adapter.backends import OpenAIBackend
    from adapter.config import EmbeddingConfig

    monkeypatch.setenv("FAKE_EMBED_KEY", "upstream-key")
    with FakeEmbeddings(tiny_backend.model, retry_after="0", **fake_options) as fake:
        cfg = EmbeddingConfig(base_url=fake.url, api_key_env="FAKE_EMBED_KEY", max_retries=3, retry_base_delay=0.01,
                              retry_max_delay=0.05, request_timeout=2, requests_per_minute=None,
                              tokens_per_minute=None)
        remote = OpenAIBackend("openai:fake-minilm", cfg, show_progress=False)
        path = tmp_path / "upstream.safetensors"
        a = LinearAdapter.identity(tiny_backend.dim, remote.identity)
        a.weight = make_adapter(tiny_backend, tmp_path / "w.safetensors", seed=7).weight
        a.save(path)
        with running(EmbeddingService(remote, path, ServeConfig(upstream_concurrency=4))) as url:
            yield fake, url, a


def test_upstream_mode_forwards_through_the_backend_and_rides_out_faults(backend, tmp_path, monkeypatch):
    from openai import OpenAI

    faults = ("429", "500", "notjson", "shuffle", "drop")
    with upstream(backend, tmp_path, monkeypatch, fault_rate=0.5, faults=faults, max_faults=2) as (fake, url, a):
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        docs = OpenAI(base_url=f"{url}/documents/v1", api_key="unused", max_retries=0)
        for i in range(12):
            texts = [f"{t} {i}" for t in TEXTS]
            base = backend.model.encode(texts, normalize_embeddings=True)
            r = client.embeddings.create(input=texts, model="fake-minilm", encoding_format="float")
            np.testing.assert_allclose(np.array([d.embedding for d in r.data]), a.apply(base), atol=1e-5)
            r = docs.embeddings.create(input=texts, model="fake-minilm", encoding_format="float")
            np.testing.assert_allclose(np.array([d.embedding for d in r.data]), base, atol=1e-5)
        assert sum(fake.faults_seen().values()) >= 5  # faults were served, and no client saw one
        assert all(r.auth == "Bearer upstream-key" for r in fake.requests)


def test_upstream_failing_past_its_retries_is_a_502_in_openai_shape(backend, tmp_path, monkeypatch):
    with upstream(backend, tmp_path, monkeypatch) as (fake, url, _), httpx.Client(base_url=url, timeout=20) as c:
        fake.push("500", "500", "500", "500")  # the first try and all 3 retries
        r = c.post("/v1/embeddings", json={"input": "a", "model": "fake-minilm"})
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["type"] == "upstream_error" and "HTTP 500" in err["message"] and "127.0.0.1" not in err["message"]
        fake.push("401")  # fatal upstream: no retries, at once
        n = len(fake.requests)
        r = c.post("/documents/v1/embeddings", json={"input": "a", "model": "fake-minilm"})
        assert r.status_code == 502 and "401" in r.json()["error"]["message"] and len(fake.requests) == n + 1
        assert c.post("/v1/embeddings", json={"input": "a", "model": "fake-minilm"}).status_code == 200  # recovers
        metrics = c.get("/metrics").text
    assert 'adapter_serve_errors_total{endpoint="/v1/embeddings",type="upstream_error"} 1.0' in metrics


# ------------------------------------------------------------------------------------- drop-in details (#23, #24)


def tiktoken_cache() -> Path:
    """The tiktoken files llama-index-core ships (cl100k_base, o200k_base): token ids decode offline."""
    pytest.importorskip("tiktoken", reason="tiktoken is not installed")
    llama = pytest.importorskip("llama_index.core", reason="llama-index-core (which ships tiktoken's files) is absent")
    folder = Path(llama.__file__).parent / "_static" / "tiktoken_cache"
    if not folder.is_dir():
        pytest.skip("llama-index-core ships no tiktoken cache")
    return folder


def test_model_names_as_openai_compatible_servers_have_them(backend, adapter_file):
    from openai import NotFoundError, OpenAI

    cfg = ServeConfig(served_model_names=("text-embedding-3-small", "tiny"))
    with running(EmbeddingService(backend, adapter_file, cfg)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.embeddings.create(input="a", model="text-embedding-3-small").model == "text-embedding-3-small"
        for name in ("no-such-model", "text-embedding-3-large", backend.name):
            with pytest.raises(NotFoundError) as e:
                client.embeddings.create(input="a", model=name)
            err = e.value.body
            assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error" and err["param"] == \
                "model" and "text-embedding-3-small, tiny" in err["message"]
        assert [m.id for m in client.models.list().data] == ["text-embedding-3-small", "tiny"]
        assert client.models.retrieve("tiny").model_dump()["owned_by"] == "adapter"
        with pytest.raises(NotFoundError):
            client.models.retrieve("gpt-4")
        r = httpx.get(f"{url}/documents/v1/models/tiny")
        assert r.status_code == 200 and r.json()["id"] == "tiny"


def test_served_names_default_to_the_models_own():
    from adapter.serve import served_names

    class B:
        name = "sentence-transformers/all-MiniLM-L6-v2"

    assert served_names(B(), ServeConfig()) == ["sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"]
    B.name, B.model_name = "openai:text-embedding-3-small", "text-embedding-3-small"
    assert served_names(B(), ServeConfig()) == ["text-embedding-3-small"]
    assert served_names(B(), ServeConfig(served_model_names=("a", "b", "a"))) == ["a", "b"]


def test_input_type_picks_the_side_on_either_path(backend, adapter_file, url):
    adapter = LinearAdapter.load(adapter_file)
    adapted = adapter.apply(backend.model.encode_query(TEXTS, normalize_embeddings=True))
    base = backend.model.encode_document(TEXTS, normalize_embeddings=True)
    for path in ("/v1/embeddings", "/documents/v1/embeddings"):
        for input_type, want in (("query", adapted), ("search_query", adapted), ("document", base),
                                 ("search_document", base)):
            r = httpx.post(url + path, json={"input": TEXTS, "model": NAME, "input_type": input_type,
                                             "encoding_format": "float"})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], want, atol=1e-6)
            assert ("x-adapter-version" in r.headers) == (want is adapted)


def test_token_ids_are_decoded_with_tiktoken(backend, adapter_file, monkeypatch):
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    cfg = ServeConfig(served_model_names=(NAME, "text-embedding-3-small", "gpt-4o"))
    with running(EmbeddingService(backend, adapter_file, cfg)) as url:
        def post(input, model=NAME):  # noqa: A002 -- OpenAI's field name
            return httpx.post(f"{url}/v1/embeddings", json={"input": input, "model": model,
                                                             "encoding_format": "float"}, timeout=60)

        strings = np.array([d["embedding"] for d in post(TEXTS).json()["data"]])
        for model, encoding in ((NAME, "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
                                ("gpt-4o", "o200k_base")):  # the encoding the client's tiktoken picks for the name
            enc = tiktoken.get_encoding(encoding)
            r = post([enc.encode(t) for t in TEXTS], model)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], strings, atol=1e-6)
            assert r.json()["usage"]["prompt_tokens"] == tokens(backend, TEXTS)
        one = post(tiktoken.get_encoding("cl100k_base").encode(TEXTS[0]))  # one input as a flat list of ids
        np.testing.assert_allclose(one.json()["data"][0]["embedding"], strings[0], atol=1e-6)
        r = post([[1, 2, 10**9]])
        assert r.status_code == 400 and "outside cl100k_base" in r.json()["error"]["message"]


@pytest.mark.parametrize("missing", ["tiktoken", "encoding"])
def test_token_ids_without_tiktoken_name_the_client_setting(backend, adapter_file, monkeypatch, missing):
    import sys

    if missing == "tiktoken":
        monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails
    else:
        import tiktoken

        def offline(name):  # what tiktoken does without its file and without the network
            raise ConnectionError(f"cannot fetch {name}.tiktoken")

        monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with running(EmbeddingService(backend, adapter_file, SERVED)) as url:
        for _ in range(2):  # the second time from the remembered failure
            r = httpx.post(f"{url}/v1/embeddings", json={"input": [[9906, 1917]], "model": NAME})
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert "check_embedding_ctx_length=False" in message and "cl100k_base" in message
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "text", "model": NAME}).status_code == 200


def test_gzip_bodies_are_inflated_within_the_limit(backend, adapter_file, url):
    import gzip
    import zlib

    want = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "model": NAME}).json()["data"]
    raw = json.dumps({"input": TEXTS, "model": NAME}).encode()
    for encoding, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        r = httpx.post(f"{url}/v1/embeddings", content=data, headers={"content-encoding": encoding,
                                                                     "content-type": "application/json"})
        assert r.status_code == 200 and r.json()["data"] == want, r.text
    bomb = gzip.compress(b'{"input": "' + b"a" * 50_000_000 + b'"}')  # 50 MB inflated, 49 KB on the wire
    assert len(bomb) < 64 * 1024
    r = httpx.post(f"{url}/v1/embeddings", content=bomb, headers={"content-encoding": "gzip"})
    assert r.status_code == 413 and "inflates past the limit" in r.json()["error"]["message"]
    for data, encoding, status in ((raw, "gzip", 400), (gzip.compress(raw)[:-20], "gzip", 400), (raw, "br", 415)):
        r = httpx.post(f"{url}/v1/embeddings", content=data, headers={"content-encoding": encoding})
        assert r.status_code == status and "error" in r.json(), r.text


def test_health_answers_head_and_shows_no_path(adapter_file, url):
    r = httpx.head(f"{url}/health")
    assert r.status_code == 200 and r.content == b""
    health = httpx.get(f"{url}/health")
    assert health.json()["adapter"]["file"] == adapter_file.name
    assert str(adapter_file.parent) not in health.text and "/" not in health.json()["adapter"]["file"]


def test_cors_only_when_asked(backend, adapter_file, url):
    preflight = {"origin": "http://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    r = httpx.options(f"{url}/v1/embeddings", headers=preflight)
    assert "access-control-allow-origin" not in r.headers  # off by default
    cfg = ServeConfig(cors_origins=("http://app.example",), served_model_names=(NAME,))
    with running(EmbeddingService(backend, adapter_file, cfg), api_key="k3y-for-cors") as cors:
        r = httpx.options(f"{cors}/v1/embeddings", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(f"{cors}/v1/embeddings", json={"input": "a", "model": NAME},
                       headers={"origin": "http://app.example", "authorization": "Bearer k3y-for-cors"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-adapter-version" in r.headers["access-control-expose-headers"]
        other = httpx.options(f"{cors}/v1/embeddings", headers={**preflight, "origin": "http://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"


def test_idle_half_open_connections_are_closed_within_the_header_timeout(backend, adapter_file):
    """300 loopback connections that send half a request head (and one that sends nothing) are each closed by the
    server; uvicorn alone keeps them open for ever. A complete request still gets its answer afterwards."""
    import selectors

    cfg = ServeConfig(header_timeout=0.5, served_model_names=(NAME,))
    with running(EmbeddingService(backend, adapter_file, cfg)) as url:
        port = int(url.rsplit(":", 1)[1])
        socks = []
        try:
            for i in range(300):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                if i:
                    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appli")
                socks.append(s)
            sel = selectors.DefaultSelector()
            for s in socks:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            open_ = set(socks)
            deadline = time.monotonic() + 60  # a liveness bound only: the server closes them after 0.5 s
            while open_ and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=1):
                    try:
                        data = key.fileobj.recv(4096)
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        open_.discard(key.fileobj)
            assert not open_, f"{len(open_)} of 300 half-open connections still open"
        finally:
            for s in socks:
                s.close()
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "still serving", "model": NAME})
        assert r.status_code == 200


def test_an_upstream_echoing_its_key_leaks_it_nowhere(backend, tmp_path, monkeypatch, caplog):
    """The key sits in a variable whose name says nothing of secrets; the upstream repeats it in its 401; neither the
    502 body nor any log line holds it."""
    from fake_embeddings import FakeEmbeddings

    from adapter.backends import OpenAIBackend
    from adapter.config import EmbeddingConfig

    secret = "zq8Xy72-plain-upstream-value"
    monkeypatch.setenv("MY_UPSTREAM_AUTH", secret)
    caplog.set_level(logging.INFO)
    with FakeEmbeddings(backend.model) as fake:
        cfg = EmbeddingConfig(base_url=fake.url, api_key_env="MY_UPSTREAM_AUTH", max_retries=0)
        remote = OpenAIBackend("openai:fake-minilm", cfg, show_progress=False)
        path = LinearAdapter.identity(backend.dim, remote.identity).save(tmp_path / "a.safetensors")
        with running(EmbeddingService(remote, path)) as url:
            fake.push("echo401")
            r = httpx.post(f"{url}/v1/embeddings", json={"input": "a", "model": "fake-minilm"})
        assert fake.faults_seen() == {"echo401": 1} and fake.requests[0].auth == f"Bearer {secret}"
    assert r.status_code == 502 and "Incorrect API key provided: ***" in r.text, r.text
    assert secret not in r.text and secret not in caplog.text
    assert any("upstream failed" in m and "***" in m for m in caplog.messages)


def test_serve_options_reach_the_config(adapter_file, monkeypatch):
    from click.testing import CliRunner

    import adapter.serve
    from cli import main

    seen = {}
    monkeypatch.setattr(adapter.serve, "serve", lambda path, cfg, **kw: seen.update(cfg=cfg.serve))
    r = CliRunner().invoke(main, ["serve", "--adapter", str(adapter_file), "--served-model-name", "a",
                                  "--served-model-name", "text-embedding-3-small", "--cors-origin", "*",
                                  "--set", "serve.header_timeout=2.5"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"].served_model_names == ("a", "text-embedding-3-small")
    assert seen["cfg"].cors_origins == ("*",) and seen["cfg"].header_timeout == 2.5
    r = CliRunner().invoke(main, ["serve", "--adapter", str(adapter_file), "--set", "serve.header_timeout=0"])
    assert r.exit_code == 2 and "serve.header_timeout must be > 0" in r.output


# ------------------------------------------------------------------------------------------------------- query LoRA


def place(src: Path, path: Path) -> None:
    """Put a copy of ``src`` at ``path`` atomically (as a deploy replaces the served file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, path)


def lora_vectors(path: Path, backend: SentenceTransformerBackend, texts: list[str]) -> np.ndarray:
    from adapter.lora import QueryLora

    return QueryLora.load(path).encode_queries(texts, backend.model)


def test_a_lora_file_serves_its_encoders_queries_and_base_documents(backend, lora_files, tmp_path):
    from openai import OpenAI

    path = tmp_path / "lora.safetensors"
    place(lora_files[0], path)
    expected = lora_vectors(path, backend, TEXTS)
    base_d = backend.model.encode_document(TEXTS, normalize_embeddings=True)
    assert not np.allclose(expected, backend.model.encode_query(TEXTS, normalize_embeddings=True), atol=1e-3)
    with running(EmbeddingService(backend, path, SERVED)) as url:
        queries = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = queries.embeddings.create(input=TEXTS, model=NAME, encoding_format="float")
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), expected, atol=1e-5)
        assert r.usage.prompt_tokens == tokens(backend, TEXTS)
        docs = OpenAI(base_url=f"{url}/documents/v1", api_key="unused", max_retries=0)
        r = docs.embeddings.create(input=TEXTS, model=NAME, encoding_format="float")
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), base_d, atol=1e-6)
        r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS[:1], "model": NAME, "input_type": "document"})
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], base_d[0], atol=1e-6)
        assert "x-adapter-version" not in r.headers  # a document reply involves no adapter
        r = httpx.post(f"{url}/documents/v1/embeddings", json={"input": TEXTS[1:], "model": NAME,
                                                               "input_type": "query", "dimensions": 8})
        np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], truncate(expected[1:], 8), atol=1e-5)
        health = httpx.get(f"{url}/health").json()["adapter"]
        assert health["form"] == "lora" and r.headers["x-adapter-version"] == health["version"]


def test_a_remote_backend_refuses_a_lora_in_one_line(backend, lora_files, tmp_path, monkeypatch, caplog):
    """At start, and as a replacement of a linear file on reload (the linear one serves on)."""
    from adapter.backends import OpenAIBackend
    from adapter.config import EmbeddingConfig
    from adapter.errors import AdapterError

    monkeypatch.setenv("FAKE_EMBED_KEY", "k")
    remote = OpenAIBackend("openai:fake-minilm", EmbeddingConfig(base_url="http://127.0.0.1:9/v1",
                                                                 api_key_env="FAKE_EMBED_KEY"), show_progress=False)
    with pytest.raises(AdapterError, match="needs a local sentence-transformers model") as e:
        EmbeddingService(remote, lora_files[0], SERVED)
    assert "\n" not in str(e.value) and str(lora_files[0]) in str(e.value)
    path = tmp_path / "a.safetensors"
    LinearAdapter.identity(backend.dim, remote.identity).save(path)
    slot = AdapterSlot(path, remote)
    first = slot.current
    place(lora_files[0], path)
    with caplog.at_level(logging.WARNING, "adapter.serve"):
        assert not slot.poll() and slot.current is first
    assert slot.reloads == {"ok": 0, "refused": 1}
    assert any("needs a local" in m and "\n" not in m for m in caplog.messages)


def test_reload_switches_between_forms(backend, lora_files, tmp_path):
    """linear -> LoRA -> another LoRA -> linear under one server: each reply equals the adapter its header names, and
    the batchers of LoRAs no longer served are stopped."""
    path = tmp_path / "served.safetensors"
    linear = make_adapter(backend, path, seed=1)
    cfg = ServeConfig(reload_interval=0.02, served_model_names=(NAME,))
    service = EmbeddingService(backend, path, cfg)
    base = backend.model.encode_query(TEXTS, normalize_embeddings=True)

    def query(url: str) -> tuple[str, np.ndarray]:
        r = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS, "model": NAME, "encoding_format": "float"})
        assert r.status_code == 200, r.text
        return r.headers["x-adapter-version"], np.array([d["embedding"] for d in r.json()["data"]])

    def swap(url: str, version: str) -> None:
        deadline = time.monotonic() + 60  # a liveness bound only: a loaded machine polls late
        while httpx.get(f"{url}/health").json()["adapter"]["version"] != version:
            assert time.monotonic() < deadline, "reload not seen within 60 s"
            time.sleep(0.02)

    with running(service) as url:
        version, got = query(url)
        assert version == adapter_version(linear)
        np.testing.assert_allclose(got, linear.apply(base), atol=1e-5)
        for seed in (0, 1):
            from adapter.lora import QueryLora

            lora = QueryLora.load(lora_files[seed])
            place(lora_files[seed], path)
            swap(url, adapter_version(lora))
            version, got = query(url)
            assert version == adapter_version(lora)
            np.testing.assert_allclose(got, lora_vectors(lora_files[seed], backend, TEXTS), atol=1e-5)
        linear = make_adapter(backend, path, seed=2)
        swap(url, adapter_version(linear))
        version, got = query(url)
        assert version == adapter_version(linear)
        np.testing.assert_allclose(got, linear.apply(base), atol=1e-5)
        deadline = time.monotonic() + 60
        while service.lora_batchers:  # retired by the watcher once idle
            assert time.monotonic() < deadline, "LoRA batchers not retired within 60 s"
            time.sleep(0.02)
    assert service.slot.reloads == {"ok": 3, "refused": 0}
