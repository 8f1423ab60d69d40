"""Embedding backends against a real OpenAI-compatible server on 127.0.0.1 (tests/fake_embeddings.py) that serves the
bundled MiniLM's vectors and injects faults: order, formats, dimensions, prefixes, batching, limits, faults, bad
answers and bad endpoints."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
from fake_embeddings import MODEL, FakeEmbeddings

from adapter.backends import OpenAIBackend, SentenceTransformerBackend, make_backend
from adapter.config import EmbeddingConfig
from adapter.errors import AdapterError

TEXTS = [f"note {i}: the valve on main {i % 7} was closed for repair" for i in range(40)]
FAST = {"requests_per_minute": None, "tokens_per_minute": None, "request_timeout": 30.0, "retry_base_delay": 0.01,
        "retry_max_delay": 1.0}


def backend(server: FakeEmbeddings, model: str = MODEL, **overrides) -> OpenAIBackend:
    return OpenAIBackend(f"openai:{model}", EmbeddingConfig(base_url=server.url, **{**FAST, **overrides}),
                         show_progress=False)


def local(minilm, texts: list[str]) -> np.ndarray:
    return minilm.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_vectors_match_the_local_model_in_order_despite_shuffled_answers(minilm, encoding_format: str):
    with FakeEmbeddings(minilm, shuffle=True) as server:
        b = backend(server, batch_size=8, concurrency=3, encoding_format=encoding_format)
        vectors = b.embed(TEXTS)
    assert {r.encoding_format for r in server.requests} == {encoding_format}
    assert vectors.shape == (40, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, local(minilm, TEXTS), atol=1e-5)
    assert (b.stats.requests, b.dim, len(server.arrivals)) == (5, 384, 5)
    assert b.tokens == sum(r.tokens for r in server.requests) > 0  # the server's own count


def test_dimensions_are_sent_and_prefixes_prepended(minilm):
    with FakeEmbeddings(minilm) as server:
        b = backend(server, dimensions=128, query_prefix="query: ", document_prefix="passage: ")
        queries, documents = b.embed(TEXTS[:3], "query"), b.embed(TEXTS[:3], "document")
    assert {r.dimensions for r in server.requests} == {128}
    full = local(minilm, ["query: " + t for t in TEXTS[:3]])[:, :128]
    np.testing.assert_allclose(queries, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)
    assert np.linalg.norm(documents, axis=1) == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(queries, documents)
    plain = backend(server)
    assert len({b.fingerprint, plain.fingerprint, backend(server, dimensions=64).fingerprint}) == 3
    assert plain.fingerprint == backend(server).fingerprint  # the same server, model and settings: the same cache


@pytest.mark.parametrize("fault", ["429", "500", "slow", "notjson", "drop"])
def test_each_fault_is_retried_and_the_vectors_are_right(minilm, fault: str):
    with FakeEmbeddings(minilm, slow_seconds=4.0, retry_after="0") as server:
        b = backend(server, batch_size=10, concurrency=1, request_timeout=3.0)  # generous: the machine is shared
        server.push(None, fault, fault)  # the second batch meets the fault twice
        vectors = b.embed(TEXTS)
    np.testing.assert_allclose(vectors, local(minilm, TEXTS), atol=1e-5)
    assert (b.stats.requests, b.stats.retries) == (6, 2)


def test_retry_after_pauses_the_next_request(minilm, backoff_delays):
    with FakeEmbeddings(minilm, retry_after="1") as server:
        b = backend(server, batch_size=40, requests_per_minute=60_000)
        server.push("429")
        b.embed(TEXTS)
    first, second = sorted(server.requests, key=lambda r: r.start)
    assert first.status == 429 and len(server.requests) == 2
    assert backoff_delays == [1.0]  # the server's Retry-After; backoff alone would wait about 0.01 s


def test_a_batch_too_large_is_halved_and_later_batches_sent_smaller(minilm, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    with FakeEmbeddings(minilm, max_inputs=12) as server:
        b = backend(server, batch_size=20, concurrency=1)
        vectors = b.embed(TEXTS)
    np.testing.assert_allclose(vectors, local(minilm, TEXTS), atol=1e-5)
    sizes = [r.inputs for r in sorted(server.requests, key=lambda r: r.start)]
    assert sizes == [20, 10, 10, 10, 10]  # one refusal, then the lowered batch size from the start
    assert "HTTP 400 for a batch of 20 texts" in caplog.text and b.batch_limit == 10


LIMIT_WORDINGS = [  # (status, message, the server's limit): servers say "too many" in their own words, or not at all
    (413, "batch size {n} > maximum allowed batch size {max}", 32),  # Text Embeddings Inference
    (400, "at most {max} inputs", 20),
    (422, None, 12),  # an empty body
    (400, "Request rejected", 7),
]


@pytest.mark.parametrize(("status", "message", "limit"), LIMIT_WORDINGS)
def test_batch_limits_are_found_whatever_the_server_says(minilm, status, message, limit):
    """The run completes and the limit is found within a factor 2, with at most log2(batch) refused requests on top
    of the batches at the size found (the old code read the message, and stopped on three of these four)."""
    import math

    texts = [f"pipe {i} of the network, inspected in week {i % 52}" for i in range(100)]
    with FakeEmbeddings(minilm, max_inputs=limit, batch_error=(status, message)) as server:
        b = backend(server, batch_size=128, concurrency=1)
        vectors = b.embed(texts)
    np.testing.assert_allclose(vectors, local(minilm, texts), atol=1e-5)
    refused = sum(r.inputs > limit for r in server.requests)
    assert refused == b.refused <= math.ceil(math.log2(100))
    assert limit // 2 <= b.largest_ok <= limit and b.batch_limit <= limit
    assert len(server.requests) <= math.ceil(100 / b.largest_ok) + math.ceil(math.log2(100))
    assert all(r.status == 200 for r in server.requests if r.inputs <= limit)


def test_batch_limits_are_found_with_requests_in_flight(minilm):
    texts = [f"valve {i} closed" for i in range(200)]
    with FakeEmbeddings(minilm, max_inputs=16, batch_error=(422, None)) as server:
        b = backend(server, batch_size=64, concurrency=4)
        vectors = b.embed(texts)
    np.testing.assert_allclose(vectors, local(minilm, texts), atol=1e-5)
    assert b.largest_ok == 16 and b.refused <= 4 * 2  # each batch in flight at the first refusal: 64 -> 32 -> 16


def test_one_text_too_long_is_one_line(minilm):
    too_long = (r"HTTP 400 for one text of about \d+ tokens \(Requested \d+ tokens, max 5 tokens per request\); if it "
                r"is too long for fake-minilm, chunk the corpus smaller")
    with FakeEmbeddings(minilm, max_tokens=5) as server, pytest.raises(AdapterError, match=too_long):
        backend(server, batch_size=4).embed(TEXTS[:4])


@pytest.mark.parametrize(("fault", "message"), [
    ("short", r"returned 9 embeddings for 10 texts; refusing"),
    ("baddim", r"fake-minilm returned 383, 384-dimensional vectors in one answer; refusing"),
])
def test_a_wrong_answer_is_refused_in_one_line_without_retries(minilm, fault: str, message: str):
    with FakeEmbeddings(minilm) as server:
        server.push(fault)
        b = backend(server, batch_size=10, concurrency=1)
        with pytest.raises(AdapterError, match=message):
            b.embed(TEXTS)
        assert b.stats.retries == 0 and server.faults_seen() == {fault: 1}


def test_a_dimension_other_than_the_one_asked_for_is_refused(minilm):
    with FakeEmbeddings(minilm) as server:
        b = backend(server)
        b.dim = 256  # as if the cache held 256-dimensional vectors of this model
        with pytest.raises(AdapterError, match="returned 384-dimensional vectors where 256 were expected"):
            b.embed(TEXTS[:2])


def test_a_bad_key_and_an_unknown_model_fail_at_once_naming_endpoint_and_status(minilm):
    with FakeEmbeddings(minilm) as server:
        server.push("401")
        b = backend(server, retry_base_delay=1.0)
        with pytest.raises(AdapterError, match=rf"^{server.url}: HTTP 401 embedding 40 texts with fake-minilm "
                                               r"\(Incorrect API key provided\)$"):
            b.embed(TEXTS, "query")
        other = backend(server, model="nope", retry_base_delay=1.0)
        with pytest.raises(AdapterError, match=rf"^{server.url}: HTTP 404 .*\(The model `nope` does not exist\)$"):
            other.embed(TEXTS)
        assert b.stats.retries == other.stats.retries == 0  # failed at once: nothing asked again


def test_a_closed_port_fails_in_one_line_within_the_timeout():
    with socket.socket() as s:  # bound, never listening: connections are refused, and no one else can take the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        b = OpenAIBackend(f"openai:{MODEL}", EmbeddingConfig(base_url=f"http://127.0.0.1:{port}/v1",
                                                             request_timeout=3), show_progress=False)
        with pytest.raises(AdapterError, match=rf"^http://127.0.0.1:{port}/v1: cannot connect"):
            b.embed(TEXTS)
    assert b.stats.retries == 0  # refused is final: no backoff, no second try


def test_concurrency_and_requests_per_minute_are_bounded(minilm):
    with FakeEmbeddings(minilm, delay=0.2) as server:
        backend(server, batch_size=4, concurrency=3).embed(TEXTS)
    assert server.max_inflight == 3
    with FakeEmbeddings(minilm) as server:
        backend(server, batch_size=4, concurrency=4, requests_per_minute=600).embed(TEXTS)  # a start every 0.1 s
    starts = sorted(r.start for r in server.requests)
    assert len(starts) == 10 and starts[-1] - starts[0] >= 0.8  # 0.9 s planned; the span, not one gap: a shared
    #                                                              machine delays single arrivals by tens of ms


def test_each_finished_batch_is_handed_over_as_it_arrives(minilm):
    seen: list[tuple[list[int], np.ndarray]] = []
    with FakeEmbeddings(minilm) as server:
        vectors = backend(server, batch_size=16, concurrency=2).embed(
            TEXTS, on_batch=lambda positions, v: seen.append((positions.tolist(), v)))
    assert sorted(len(p) for p, _ in seen) == [8, 16, 16]
    assert sorted(i for p, _ in seen for i in p) == list(range(40))
    for positions, v in seen:
        np.testing.assert_array_equal(v, vectors[positions])


def test_the_key_comes_from_the_named_variable_and_is_never_logged(minilm, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture):
    secret = "sk-embed-DO-NOT-LEAK-0987654321"
    monkeypatch.setenv("MY_EMBED_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with FakeEmbeddings(minilm) as server:
        server.push("500")
        backend(server, api_key_env="MY_EMBED_KEY").embed(TEXTS)
    assert {r.auth for r in server.requests} == {f"Bearer {secret}"}
    assert secret not in caplog.text


@pytest.mark.parametrize(("overrides", "message"), [
    ({"batch_size": 0}, "embedding.batch_size must be at least 1, got 0"),
    ({"concurrency": 0}, "embedding.concurrency must be at least 1, got 0"),
    ({"dimensions": 0}, "embedding.dimensions must be at least 1, got 0"),
    ({"base_url": "127.0.0.1:8000"}, r"127.0.0.1:8000: not an http\(s\) URL"),
])
def test_bad_settings_are_one_line(overrides: dict, message: str):
    with pytest.raises(AdapterError, match=message):
        OpenAIBackend("openai:m", EmbeddingConfig(**{"base_url": "http://127.0.0.1:9/v1", **overrides}))


def test_make_backend_picks_by_name(minilm):
    assert isinstance(make_backend(minilm, show_progress=False), SentenceTransformerBackend)
    assert isinstance(make_backend("openai:x", EmbeddingConfig(base_url="http://127.0.0.1:9/v1")), OpenAIBackend)
    with pytest.raises(AdapterError, match="needs the model's name after 'openai:'"):
        make_backend("openai:", EmbeddingConfig(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(AdapterError, match="embedding.dimensions applies to openai: models"):
        make_backend(minilm, EmbeddingConfig(dimensions=64))


def test_local_prefixes_replace_the_models_prompt(minilm):
    b = SentenceTransformerBackend(minilm, show_progress=False, query_prefix="query: ")
    np.testing.assert_allclose(b.embed(TEXTS[:2], "query"), local(minilm, ["query: " + t for t in TEXTS[:2]]),
                               atol=1e-5)
    np.testing.assert_allclose(b.embed(TEXTS[:2], "document"), local(minilm, TEXTS[:2]), atol=1e-5)
    assert b.fingerprint != SentenceTransformerBackend(minilm, show_progress=False).fingerprint


# ---------------------------------------------------------------------------------------------------------- Encoder


def remote(server: FakeEmbeddings, cache, **overrides):
    from adapter.encoder import Encoder

    return Encoder(f"openai:{MODEL}", cache_dir=cache, show_progress=False,
                   embedding=EmbeddingConfig(base_url=server.url, **{**FAST, **overrides}))


def test_the_encoder_caches_a_remote_model_and_a_rerun_sends_nothing(minilm, tmp_path):
    from adapter.encoder import Encoder

    with FakeEmbeddings(minilm, shuffle=True) as server:
        enc = remote(server, tmp_path, batch_size=8)
        assert enc.dim == 384 and len(server.arrivals) == 1  # the canary told the dimension
        vectors = enc.encode_documents(TEXTS)
        assert enc.texts_encoded == 40 and len(server.arrivals) == 6
        again = remote(server, tmp_path, batch_size=8)  # a new run
        assert again.dim == 384
        np.testing.assert_array_equal(again.encode_documents(TEXTS), vectors)
        assert again.texts_encoded == 0 and len(server.arrivals) == 6  # not even the canary
    np.testing.assert_allclose(vectors, Encoder(minilm, cache_dir=tmp_path / "local", show_progress=False)
                               .encode_documents(TEXTS), atol=1e-5)
    assert enc.identity.startswith("openai_fake-minilm@") and enc.model is None


@pytest.mark.parametrize("together", [False, True])
def test_finished_batches_survive_a_failure_and_a_rerun_sends_only_the_rest(minilm, tmp_path, monkeypatch, together):
    """``together``: the finished batch and the failed one are seen done at once (a loaded machine's calling thread
    wakes late); the finished one is still stored before the failure is raised."""
    if together:
        import concurrent.futures

        import adapter.backends

        monkeypatch.setattr(adapter.backends, "wait", lambda fs, return_when=None: concurrent.futures.wait(fs))
    with FakeEmbeddings(minilm) as server:
        enc = remote(server, tmp_path, batch_size=10, concurrency=1)
        server.push(None, None, None, "401")  # the canary, two batches, then a fatal error
        with pytest.raises(AdapterError, match="HTTP 401"):
            enc.encode_documents(TEXTS)
        kept = len(enc.cache)  # the two batches before the 401, and the fourth if it ran before the stop
        assert kept in (20, 30)
        before = len(server.arrivals)
        again = remote(server, tmp_path, batch_size=10, concurrency=1)
        again.encode_documents(TEXTS)
        sent = server.arrivals[before:]
    assert sent == [1] + [10] * ((40 - kept) // 10)  # the canary, then only the batches missing
    assert again.texts_encoded == 40 - kept


class Rolled:
    """A provider's "same" model that now gives other vectors (each one's components rotated by one)."""

    def __init__(self, model):
        self.model = model

    def encode(self, texts, **kw):
        return np.roll(self.model.encode(texts, **kw), 1, axis=1)


def test_a_provider_that_changed_the_model_is_refused_by_the_canary(minilm, tmp_path, tiny_model_dir):
    from adapter.encoder import load_model

    with FakeEmbeddings(minilm) as server:
        remote(server, tmp_path).encode_documents(TEXTS[:5])
        server.swap_model = Rolled(minilm)
        with pytest.raises(AdapterError, match=r"^openai:fake-minilm: the canary text gives cosine -?0\.\d+ with the "
                                               r"cached vector: the provider's model has changed since"):
            remote(server, tmp_path).encode_documents(TEXTS[5:10])
        server.swap_model = load_model(str(tiny_model_dir))
        with pytest.raises(AdapterError, match="the canary text gives 32-dimensional vectors, the cache 384"):
            remote(server, tmp_path).encode_documents(TEXTS[5:10])
        n = len(server.arrivals)
        enc = remote(server, tmp_path)
        assert enc.encode_documents(TEXTS[:5]).shape == (5, 384) and len(server.arrivals) == n  # cached: no check
    assert (tmp_path / "embeddings" / enc.fingerprint / "canary.json").is_file()


def test_the_key_is_in_no_file_of_the_cache(minilm, tmp_path, monkeypatch: pytest.MonkeyPatch):
    secret = "sk-cache-DO-NOT-LEAK-1122334455"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with FakeEmbeddings(minilm) as server:
        remote(server, tmp_path).encode_queries(TEXTS)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not any(secret.encode() in p.read_bytes() for p in files)


def test_cli_evaluate_with_an_openai_model_matches_the_local_model(minilm, tiny_dataset, tmp_path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    import json

    from click.testing import CliRunner

    from cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-cli")
    runs = {}
    with FakeEmbeddings(minilm, shuffle=True) as server:
        server.push("500", "429")
        for name, extra in (("local", []), ("remote", ["--model", f"openai:{MODEL}", "--embedding-base-url",
                                                        server.url, "--set", "embedding.batch_size=4"])):
            out = tmp_path / f"{name}.json"
            r = CliRunner().invoke(main, ["evaluate", str(tiny_dataset), "--dims", "384,64", "--json", str(out),
                                          "--cache-dir", str(tmp_path / name), *extra])
            assert r.exit_code == 0, r.output
            runs[name] = json.loads(out.read_text())
        n = len(server.arrivals)
        r = CliRunner().invoke(main, ["evaluate", str(tiny_dataset), "--dims", "384", "--cache-dir",
                                      str(tmp_path / "remote"), "--model", f"openai:{MODEL}",
                                      "--embedding-base-url", server.url])
        assert r.exit_code == 0 and len(server.arrivals) == n  # a second run: every vector from the cache
        r = CliRunner().invoke(main, ["evaluate", str(tiny_dataset), "--model", "openai:nope", "--cache-dir",
                                      str(tmp_path / "x"), "--embedding-base-url", server.url])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "HTTP 404" in r.output, r.output
    for dim in ("384", "64"):
        for metric, value in runs["local"]["base"][dim].items():
            assert runs["remote"]["base"][dim][metric] == pytest.approx(value, abs=1e-6), (dim, metric)


# ------------------------------------------------------------------------ Infinity: a real upstream, not our fake


@pytest.fixture(scope="module")
def infinity():
    """Infinity serving the bundled MiniLM from its folder (its own virtualenv; .ci/run installs it)."""
    from fake_embeddings import Infinity

    from adapter.backends import resolve_model

    if (reason := Infinity.missing()) is not None:
        pytest.skip(reason)
    with Infinity(resolve_model("all-MiniLM-L6-v2"), name="minilm") as server:
        yield server


def test_infinity_gives_the_local_models_vectors(minilm, infinity):
    b = OpenAIBackend("openai:minilm", EmbeddingConfig(base_url=infinity.url, **FAST, batch_size=16, concurrency=2),
                      show_progress=False)
    for fmt in ("float", "base64"):
        b.cfg = EmbeddingConfig(base_url=infinity.url, **FAST, batch_size=16, concurrency=2, encoding_format=fmt)
        np.testing.assert_allclose(b.embed(TEXTS), local(minilm, TEXTS), atol=1e-5)
    assert b.stats.retries == 0 and b.refused == 0


def test_cli_evaluate_through_infinity_matches_the_local_model(minilm, infinity, tiny_dataset, tmp_path):
    import json

    from click.testing import CliRunner

    from cli import main

    runs = {}
    for name, extra in (("local", []), ("infinity", ["--model", "openai:minilm", "--embedding-base-url",
                                                      infinity.url])):
        out = tmp_path / f"{name}.json"
        r = CliRunner().invoke(main, ["evaluate", str(tiny_dataset), "--dims", "384", "--json", str(out),
                                      "--cache-dir", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(out.read_text())["base"]["384"]
    for metric, value in runs["local"].items():
        assert runs["infinity"][metric] == pytest.approx(value, abs=1e-6), metric


def test_serve_upstream_mode_in_front_of_infinity(minilm, infinity, tmp_path):
    pytest.importorskip("fastapi", reason="adapter[serve] is not installed")
    import httpx
    from test_serve import running

    from adapter.config import ServeConfig
    from adapter.model import LinearAdapter
    from adapter.serve import EmbeddingService

    remote = OpenAIBackend("openai:minilm", EmbeddingConfig(base_url=infinity.url, **FAST), show_progress=False)
    a = LinearAdapter.identity(384, remote.identity)
    a.weight = (np.eye(384) + 0.1 * np.random.default_rng(0).standard_normal((384, 384))).astype(np.float32)
    path = a.save(tmp_path / "a.safetensors")
    with running(EmbeddingService(remote, path, ServeConfig())) as url:
        q = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS[:5], "model": "minilm", "encoding_format": "float"},
                       timeout=60)
        d = httpx.post(f"{url}/documents/v1/embeddings", json={"input": TEXTS[:5], "model": "minilm",
                                                               "encoding_format": "float"}, timeout=60)
        other = httpx.post(f"{url}/v1/embeddings", json={"input": "a", "model": "text-embedding-3-small"})
    base = local(minilm, TEXTS[:5])
    np.testing.assert_allclose([e["embedding"] for e in q.json()["data"]], a.apply(base), atol=1e-5)
    np.testing.assert_allclose([e["embedding"] for e in d.json()["data"]], base, atol=1e-5)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
