"""The LangChain and LlamaIndex embeddings, through the real packages: queries adapted, documents the base vectors,
and each used by its framework's own vector store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adapter.model import LinearAdapter
from tests.conftest import CHUNKS

QUERY = "fire hydrant stuck and won't open, who do i tell"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def adapter_file(tiny, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapter.backends import make_backend

    identity = make_backend(tiny, show_progress=False).identity
    a = LinearAdapter.identity(tiny.get_embedding_dimension(), identity)
    a.weight = (np.eye(a.dim) + 0.3 * np.random.default_rng(0).standard_normal((a.dim, a.dim))).astype(np.float32)
    return a.save(tmp_path_factory.mktemp("integrations") / "adapter.safetensors")


def expected(tiny, adapter_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(adapted query vector, base document vectors) computed by hand."""
    q = LinearAdapter.load(adapter_file).apply(tiny.encode_query([QUERY], normalize_embeddings=True))[0]
    return q, tiny.encode_document(list(CHUNKS.values()), normalize_embeddings=True)


def test_langchain_embeddings_adapt_queries_only(tiny, tiny_model_dir, adapter_file):
    pytest.importorskip("langchain_core", reason="adapter[langchain] is not installed")
    from langchain_core.vectorstores import InMemoryVectorStore

    from adapter.integrations.langchain import AdapterEmbeddings

    emb = AdapterEmbeddings(adapter_file, str(tiny_model_dir))
    q, docs = expected(tiny, adapter_file)
    np.testing.assert_allclose(emb.embed_query(QUERY), q, atol=1e-6)
    np.testing.assert_allclose(emb.embed_documents(list(CHUNKS.values())), docs, atol=1e-6)
    assert emb.embed_documents([]) == []
    store = InMemoryVectorStore.from_texts(list(CHUNKS.values()), embedding=emb)
    hits = store.similarity_search_with_score(QUERY, k=len(CHUNKS))
    by_hand = sorted(zip(docs @ q, CHUNKS.values(), strict=True), reverse=True)
    assert [d.page_content for d, _ in hits] == [t for _, t in by_hand]  # the store ranks with the adapted query
    np.testing.assert_allclose([s for _, s in hits], [s for s, _ in by_hand], atol=1e-5)


def test_llamaindex_embedding_adapts_queries_only(tiny, tiny_model_dir, adapter_file):
    pytest.importorskip("llama_index.core", reason="adapter[llamaindex] is not installed")
    import asyncio

    from llama_index.core import Document, VectorStoreIndex

    from adapter.integrations.llamaindex import AdapterEmbedding

    emb = AdapterEmbedding(adapter_file, str(tiny_model_dir))
    q, docs = expected(tiny, adapter_file)
    np.testing.assert_allclose(emb.get_query_embedding(QUERY), q, atol=1e-6)
    np.testing.assert_allclose(asyncio.run(emb.aget_query_embedding(QUERY)), q, atol=1e-6)
    np.testing.assert_allclose(emb.get_text_embedding_batch(list(CHUNKS.values())), docs, atol=1e-6)
    np.testing.assert_allclose(emb.get_text_embedding(CHUNKS["burst"]), docs[0], atol=1e-6)
    index = VectorStoreIndex.from_documents([Document(text=t, id_=cid) for cid, t in CHUNKS.items()],
                                            embed_model=emb)
    nodes = index.as_retriever(similarity_top_k=3).retrieve(QUERY)
    top = np.argsort(-(docs @ q))[:3]
    assert [n.node.get_content() for n in nodes] == [list(CHUNKS.values())[i] for i in top]
    np.testing.assert_allclose([n.score for n in nodes], (docs @ q)[top], atol=1e-5)


def test_both_refuse_an_adapter_of_another_model(tiny_model_dir, tmp_path):
    from adapter.errors import AdapterError
    from adapter.integrations.langchain import AdapterEmbeddings
    from adapter.integrations.llamaindex import AdapterEmbedding

    other = LinearAdapter.identity(32, "some-other-model@0123456789ab").save(tmp_path / "other.safetensors")
    for cls in (AdapterEmbeddings, AdapterEmbedding):
        with pytest.raises(AdapterError, match="trained on some-other-model"):
            cls(other, str(tiny_model_dir))


def test_both_wrap_an_openai_compatible_server_too(tiny, tmp_path, monkeypatch):
    from fake_embeddings import FakeEmbeddings

    from adapter.backends import OpenAIBackend
    from adapter.config import EmbeddingConfig
    from adapter.integrations.langchain import AdapterEmbeddings
    from adapter.integrations.llamaindex import AdapterEmbedding

    monkeypatch.setenv("FAKE_EMBED_KEY", "k")
    with FakeEmbeddings(tiny, fault_rate=0.3, faults=("500", "429"), max_faults=1, retry_after="0") as fake:
        cfg = EmbeddingConfig(base_url=fake.url, api_key_env="FAKE_EMBED_KEY", retry_base_delay=0.01,
                              retry_max_delay=0.05)
        a = LinearAdapter.identity(32, OpenAIBackend("openai:fake-minilm", cfg).identity)
        a.weight = (np.eye(32) + 0.3 * np.random.default_rng(1).standard_normal((32, 32))).astype(np.float32)
        path = a.save(tmp_path / "remote.safetensors")
        q = a.apply(tiny.encode([QUERY], normalize_embeddings=True))[0]
        docs = tiny.encode(list(CHUNKS.values()), normalize_embeddings=True)
        lc = AdapterEmbeddings(path, "openai:fake-minilm", embedding=cfg)
        li = AdapterEmbedding(path, "openai:fake-minilm", embedding=cfg)
        np.testing.assert_allclose(lc.embed_query(QUERY), q, atol=1e-5)
        np.testing.assert_allclose(lc.embed_documents(list(CHUNKS.values())), docs, atol=1e-5)
        np.testing.assert_allclose(li.get_query_embedding(QUERY), q, atol=1e-5)
        np.testing.assert_allclose(li.get_text_embedding_batch(list(CHUNKS.values())), docs, atol=1e-5)


def test_llamaindex_async_text_embeddings_run_off_the_event_loop(tiny_model_dir, adapter_file):
    """Every async method of AdapterEmbedding runs the model in a worker thread (the text one used to run it on the
    event loop's own thread, stalling everything else on the loop)."""
    pytest.importorskip("llama_index.core", reason="adapter[llamaindex] is not installed")
    import asyncio
    import threading

    from adapter.integrations.llamaindex import AdapterEmbedding

    emb = AdapterEmbedding(adapter_file, str(tiny_model_dir))
    backend = emb._encoder.backend
    seen: list[int] = []
    embed = backend.embed

    def recording(texts, role="document", **kw):
        seen.append(threading.get_ident())
        return embed(texts, role, **kw)

    backend.embed = recording

    async def scenario() -> int:
        await emb.aget_query_embedding(QUERY)
        await emb.aget_text_embedding(QUERY)
        await emb.aget_text_embedding_batch([QUERY, "another"])
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert len(seen) == 3 and loop_thread not in seen


def test_both_embed_queries_through_a_lora_and_documents_through_the_base(tiny, tiny_model_dir, lora_files):
    """A query-LoRA file: embed_query is its adapted encoder (QueryLora.encode_queries), embed_documents the base."""
    import asyncio

    from adapter.integrations import AdaptedBackend
    from adapter.integrations.langchain import AdapterEmbeddings
    from adapter.integrations.llamaindex import AdapterEmbedding
    from adapter.lora import QueryLora

    q = QueryLora.load(lora_files[0]).encode_queries([QUERY], tiny)[0]
    docs = tiny.encode_document(list(CHUNKS.values()), normalize_embeddings=True)
    assert not np.allclose(q, tiny.encode_query([QUERY], normalize_embeddings=True)[0], atol=1e-3)
    lc = AdapterEmbeddings(lora_files[0], str(tiny_model_dir))
    np.testing.assert_allclose(lc.embed_query(QUERY), q, atol=1e-5)
    np.testing.assert_allclose(lc.embed_documents(list(CHUNKS.values())), docs, atol=1e-6)
    li = AdapterEmbedding(lora_files[0], str(tiny_model_dir))
    np.testing.assert_allclose(li.get_query_embedding(QUERY), q, atol=1e-5)
    np.testing.assert_allclose(asyncio.run(li.aget_query_embedding(QUERY)), q, atol=1e-5)
    np.testing.assert_allclose(li.get_text_embedding_batch(list(CHUNKS.values())), docs, atol=1e-6)
    backend = AdaptedBackend(QueryLora.load(lora_files[1]), str(tiny_model_dir))  # a loaded LoRA too
    np.testing.assert_allclose(backend.encode_query([QUERY])[0],
                               QueryLora.load(lora_files[1]).encode_queries([QUERY], tiny)[0], atol=1e-5)


def test_a_lora_with_a_remote_model_is_refused_in_one_line(lora_files, monkeypatch):
    from adapter.config import EmbeddingConfig
    from adapter.errors import AdapterError
    from adapter.integrations.langchain import AdapterEmbeddings

    monkeypatch.setenv("FAKE_EMBED_KEY", "k")
    cfg = EmbeddingConfig(base_url="http://127.0.0.1:9/v1", api_key_env="FAKE_EMBED_KEY")
    with pytest.raises(AdapterError, match="needs a local sentence-transformers model") as e:
        AdapterEmbeddings(lora_files[0], "openai:fake-minilm", embedding=cfg)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ against a live `adapter serve`

SERVE_NAME = "tiny-bert"


@pytest.fixture(scope="module")
def tiny_serve(tiny, adapter_file):
    """`adapter serve` on the tiny model and adapter, in a thread on 127.0.0.1."""
    pytest.importorskip("fastapi", reason="adapter[serve] is not installed")
    from test_serve import running

    from adapter.backends import SentenceTransformerBackend
    from adapter.config import ServeConfig
    from adapter.serve import EmbeddingService

    backend = SentenceTransformerBackend(tiny, show_progress=False)
    service = EmbeddingService(backend, adapter_file, ServeConfig(served_model_names=(SERVE_NAME,)))
    with running(service) as url:
        yield url


def test_serve_clients_talk_http_without_torch(tiny, adapter_file, tiny_serve):
    """The HTTP classes, in a fresh interpreter: the vectors of both sides equal the in-process ones, and neither
    torch nor sentence-transformers was imported."""
    import json
    import os
    import subprocess
    import sys

    code = f"""
import asyncio, json, sys
from adapter.integrations.langchain import AdapterServeEmbeddings
from adapter.integrations.llamaindex import AdapterServeEmbedding
lc, li = AdapterServeEmbeddings({tiny_serve!r}), AdapterServeEmbedding({tiny_serve + "/v1"!r})
out = {{"lc_q": lc.embed_query({QUERY!r}), "lc_d": lc.embed_documents({list(CHUNKS.values())!r}),
       "lc_aq": asyncio.run(lc.aembed_query({QUERY!r})), "li_q": li.get_query_embedding({QUERY!r}),
       "li_d": li.get_text_embedding_batch({list(CHUNKS.values())!r}),
       "li_ad": asyncio.run(li.aget_text_embedding({CHUNKS["burst"]!r})),
       "heavy": [m for m in ("torch", "sentence_transformers", "transformers") if m in sys.modules]}}
print(json.dumps(out))
"""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    q, docs = expected(tiny, adapter_file)
    assert out["heavy"] == []
    for key in ("lc_q", "lc_aq", "li_q"):
        np.testing.assert_allclose(out[key], q, atol=1e-6)
    for key in ("lc_d", "li_d"):
        np.testing.assert_allclose(out[key], docs, atol=1e-6)
    np.testing.assert_allclose(out["li_ad"], docs[0], atol=1e-6)


def test_serve_clients_fail_in_one_line(tiny_serve):
    from adapter.errors import AdapterError
    from adapter.integrations.langchain import AdapterServeEmbeddings

    with pytest.raises(AdapterError, match=r"HTTP 404 \(The model 'nope' does not exist"):
        AdapterServeEmbeddings(tiny_serve, model="nope").embed_query(QUERY)
    with socket_closed_port() as port, pytest.raises(AdapterError, match="cannot reach `adapter serve`"):
        AdapterServeEmbeddings(f"http://127.0.0.1:{port}", timeout=5).embed_documents(["a"])
    with pytest.raises(AdapterError, match="not an http"):
        AdapterServeEmbeddings("127.0.0.1:8080")


def socket_closed_port():
    """A context holding a bound, never listening port: connections to it are refused."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def held():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            yield s.getsockname()[1]

    return held()


# ---------------------------------------------------------------------------- LangChain's own standard suites

try:
    import inspect

    from langchain_tests.integration_tests import EmbeddingsIntegrationTests
    from langchain_tests.unit_tests import EmbeddingsUnitTests

    for _name, _fn in vars(EmbeddingsIntegrationTests).items():  # their async tests, for pytest-asyncio's strict mode
        if _name.startswith("test_") and inspect.iscoroutinefunction(_fn):
            pytest.mark.asyncio(_fn)
except ImportError:  # the suites are a dev extra: their tests are skipped below
    EmbeddingsIntegrationTests = EmbeddingsUnitTests = object

SUITES = EmbeddingsUnitTests is not object
LIVE: dict[str, object] = {}  # filled by the fixture below, read by the suites' params


@pytest.fixture(scope="module")
def _live(tiny_model_dir, adapter_file, tiny_serve, lora_files):
    LIVE.update(model=str(tiny_model_dir), adapter=adapter_file, url=tiny_serve, lora=lora_files[0])


class _InProcess:
    @property
    def embeddings_class(self):
        from adapter.integrations.langchain import AdapterEmbeddings

        return AdapterEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"adapter": LIVE["adapter"], "model": LIVE["model"]}


class _InProcessLora(_InProcess):
    @property
    def embedding_model_params(self) -> dict:
        return {"adapter": LIVE["lora"], "model": LIVE["model"]}


class _OverHTTP:
    @property
    def embeddings_class(self):
        from adapter.integrations.langchain import AdapterServeEmbeddings

        return AdapterServeEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"base_url": LIVE["url"]}


def suites(cls: type) -> type:
    return pytest.mark.skipif(not SUITES, reason="langchain-tests is not installed")(pytest.mark.usefixtures("_live")(
        cls))


@suites
class TestAdapterEmbeddingsUnit(_InProcess, EmbeddingsUnitTests):
    pass


@suites
class TestAdapterEmbeddingsIntegration(_InProcess, EmbeddingsIntegrationTests):
    pass


@suites
class TestAdapterEmbeddingsLoraUnit(_InProcessLora, EmbeddingsUnitTests):
    pass


@suites
class TestAdapterEmbeddingsLoraIntegration(_InProcessLora, EmbeddingsIntegrationTests):
    pass


@suites
class TestAdapterServeEmbeddingsUnit(_OverHTTP, EmbeddingsUnitTests):
    pass


@suites
class TestAdapterServeEmbeddingsIntegration(_OverHTTP, EmbeddingsIntegrationTests):
    pass


# ------------------------------------------------------------- every documented client setup, on AppleQA questions


@pytest.fixture(scope="module")
def appleqa_live(minilm, tmp_path_factory):
    """AppleQA's chunks and its first 20 test questions (split by query, seed 0), the bundled MiniLM behind a live
    `adapter serve` with a near-identity adapter, and the ranking each recommended setup must give: top 10 by
    ``LinearAdapter.apply`` on the base query vectors against the base chunk vectors."""
    from tests.conftest import APPLEQA

    if not APPLEQA.is_file():
        pytest.skip(f"AppleQA is not at {APPLEQA} (../shared/data)")
    pytest.importorskip("fastapi", reason="adapter[serve] is not installed")
    from client_setups import Live, intended
    from test_serve import running, tiktoken_cache

    from adapter.backends import SentenceTransformerBackend
    from adapter.config import ServeConfig
    from adapter.data import convert, load_dataset, split_dataset
    from adapter.serve import EmbeddingService

    work = tmp_path_factory.mktemp("appleqa")
    convert(APPLEQA, work / "ds")
    split_dataset(work / "ds", by="query", test_fraction=0.2, seed=0)
    ds = load_dataset(work / "ds")
    ids = list(ds.corpus)
    texts = [ds.doc_text(c) for c in ids]
    questions = [ds.queries[q] for q in list(ds.split("test"))[:20]]
    backend = Memo(SentenceTransformerBackend(minilm, show_progress=False))
    a = LinearAdapter.identity(backend.dim, backend.identity)
    a.weight = (np.eye(a.dim) + 0.1 * np.random.default_rng(0).standard_normal((a.dim, a.dim))).astype(np.float32)
    path = a.save(work / "adapter.safetensors")
    base_q, base_d = backend.embed(questions, "query"), backend.embed(texts, "document")  # the server's own, memoised
    want = intended(a, base_q, base_d, ids, 10)
    base = intended(LinearAdapter.identity(a.dim, backend.identity), base_q, base_d, ids, 10)
    assert want != base  # the adapter moves these rankings: a setup that skips it cannot pass
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))  # the stock LangChain client's token ids, offline
        service = EmbeddingService(backend, path, ServeConfig(served_model_names=("all-MiniLM-L6-v2",)))
        with running(service) as url:
            yield Live(url, "all-MiniLM-L6-v2", path, str(gt_model_dir())), ids, texts, questions, want


class Memo:
    """A backend that embeds each (text, role) once: the setups differ in how clients route texts, not in the model,
    so the server need not embed the same 215 chunks for each of them."""

    def __init__(self, backend):
        self.backend, self.seen = backend, {}

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def embed(self, texts, role="document", **kw):
        tag = self.backend.role_tag(role)  # MiniLM has no prompts: a text's vector is the same for both roles
        todo = [t for t in dict.fromkeys(texts) if (tag, t) not in self.seen]
        if todo:
            self.seen.update(((tag, t), v) for t, v in zip(todo, self.backend.embed(todo, role), strict=True))
        return np.stack([self.seen[tag, t] for t in texts])


def gt_model_dir() -> Path:
    from adapter.backends import resolve_model

    return Path(resolve_model("all-MiniLM-L6-v2"))


def _setup_names(recommended: bool) -> list[str]:
    """The setups that talk to `adapter serve` (the in-process classes are checked on the tiny model above, and on
    AppleQA by bench/bench_serve.py)."""
    from client_setups import SETUPS

    return [name for name, (rec, _) in SETUPS.items() if rec == recommended and "in process" not in name]


@pytest.mark.parametrize("setup", _setup_names(True))
def test_each_recommended_setup_ranks_as_the_adapter_does(appleqa_live, setup):
    """Top 10 of 20 AppleQA test questions, through the framework's own store and search, equal to
    ``LinearAdapter.apply`` on base: stock clients (both LangChain token settings) and ours."""
    from client_setups import SETUPS

    if "LangChain" in setup or "any client" in setup:
        pytest.importorskip("langchain_openai" if "OpenAI" in setup else "langchain_core")
    if "OpenAILike" in setup:
        pytest.importorskip("llama_index.embeddings.openai_like")
    live, ids, texts, questions, want = appleqa_live
    assert SETUPS[setup][1](live, ids, texts, questions, 10) == want


def test_the_one_object_at_v1_setups_rank_otherwise(appleqa_live):
    """What the README warns against: one stock object at /v1 indexes adapted documents (silently, no error)."""
    pytest.importorskip("langchain_openai")
    from client_setups import SETUPS

    live, ids, texts, questions, want = appleqa_live
    for name in _setup_names(False):
        if "OpenAILike" in name and not _has("llama_index.embeddings.openai_like"):
            continue
        assert SETUPS[name][1](live, ids, texts, questions, 10) != want, name


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_langchain_default_client_sends_token_ids_and_gets_the_same_vectors(appleqa_live):
    """``OpenAIEmbeddings`` with only base_url, api_key and model: it sends tiktoken ids (cl100k, from the files
    found locally), and the vectors equal those of the string path within 1e-6."""
    pytest.importorskip("langchain_openai")
    from client_setups import lc_openai

    live, _, texts, questions, _ = appleqa_live
    default = lc_openai(live, "/v1")
    assert default.check_embedding_ctx_length  # the default: token ids on the wire
    strings = lc_openai(live, "/v1", check_embedding_ctx_length=False)
    np.testing.assert_allclose(default.embed_documents(questions), strings.embed_documents(questions), atol=1e-6)
    docs = lc_openai(live, "/documents/v1")
    np.testing.assert_allclose(docs.embed_documents(texts[:20]), lc_openai(
        live, "/documents/v1", check_embedding_ctx_length=False).embed_documents(texts[:20]), atol=1e-6)
