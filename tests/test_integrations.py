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
