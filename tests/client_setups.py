"""The ways an app can point its embeddings client at `adapter serve`, each as it would really be written: stock
clients (LangChain's ``OpenAIEmbeddings``, LlamaIndex's ``OpenAILikeEmbedding``, the openai client) and ours, one
object for both sides or two. Each setup indexes the chunks through its framework's own vector store and ranks the
questions with the framework's own search; ``SETUPS`` maps a name to (recommended, function). A recommended setup
must rank exactly as ``LinearAdapter.apply`` on base does; the others show what getting it wrong costs.

Shared by tests/test_integrations.py (20 AppleQA questions) and bench/bench_serve.py (every test question).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEY = "unused"  # the server runs without --api-key-env in these setups
CLIENTS = 8  # questions searched at once, as an app's concurrent users would (the server batches them)


def each(fn: Callable[[str], list[str]], questions: list[str]) -> list[list[str]]:
    """``fn`` on every question, ``CLIENTS`` at a time, results in order."""
    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(fn, questions))


@dataclass(frozen=True)
class Live:
    """A running `adapter serve` (``url``: its root), the name it serves, and the adapter and model it serves (for
    the in-process classes)."""

    url: str
    name: str
    adapter: Path
    model: str


Ranker = Callable[[Live, list[str], list[str], list[str], int], list[list[str]]]


def langchain_store(embedding, ids: list[str], texts: list[str]):
    from langchain_core.vectorstores import InMemoryVectorStore

    return InMemoryVectorStore.from_texts(texts, embedding=embedding, ids=ids)


def lc_one(make: Callable[[Live], object]) -> Ranker:
    """One LangChain Embeddings object for the store and the queries (``similarity_search``)."""

    def rank(live, ids, texts, questions, k):
        store = langchain_store(make(live), ids, texts)
        return each(lambda q: [d.id for d in store.similarity_search(q, k=k)], questions)

    return rank


def lc_openai(live: Live, path: str, **options):
    from langchain_openai import OpenAIEmbeddings

    return OpenAIEmbeddings(model=live.name, base_url=live.url + path, api_key=KEY, **options)


def lc_two(check_embedding_ctx_length: bool) -> Ranker:
    """LangChain's OpenAIEmbeddings twice: the store built through /documents/v1, queries embedded through /v1 and
    searched by vector."""

    def rank(live, ids, texts, questions, k):
        docs = lc_openai(live, "/documents/v1", check_embedding_ctx_length=check_embedding_ctx_length)
        queries = lc_openai(live, "/v1", check_embedding_ctx_length=check_embedding_ctx_length)
        store = langchain_store(docs, ids, texts)
        return each(lambda q: [d.id for d in store.similarity_search_by_vector(queries.embed_query(q), k=k)],
                    questions)

    return rank


def llama_index(embed_model, ids: list[str], texts: list[str]):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    return VectorStoreIndex([TextNode(text=t, id_=i) for i, t in zip(ids, texts, strict=True)],
                            embed_model=embed_model)


def li_one(make: Callable[[Live], object]) -> Ranker:
    """One LlamaIndex embed model for the index and the retriever."""

    def rank(live, ids, texts, questions, k):
        retriever = llama_index(make(live), ids, texts).as_retriever(similarity_top_k=k)
        return each(lambda q: [n.node.node_id for n in retriever.retrieve(q)], questions)

    return rank


def li_openai_like(live: Live, path: str):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    return OpenAILikeEmbedding(model_name=live.name, api_base=live.url + path, api_key=KEY, embed_batch_size=100)


def li_two(live, ids, texts, questions, k):
    """LlamaIndex: the index built with a /documents/v1 client, ``as_retriever(embed_model=<a /v1 client>)``."""
    index = llama_index(li_openai_like(live, "/documents/v1"), ids, texts)
    retriever = index.as_retriever(similarity_top_k=k, embed_model=li_openai_like(live, "/v1"))
    return each(lambda q: [n.node.node_id for n in retriever.retrieve(q)], questions)


def openai_two(live, ids, texts, questions, k):
    """The openai client twice, ranked with numpy: the app's own code."""
    from openai import OpenAI

    def vectors(path: str, inputs: list[str]) -> np.ndarray:
        client = OpenAI(base_url=live.url + path, api_key=KEY, max_retries=0)
        out = []
        for lo in range(0, len(inputs), 256):
            r = client.embeddings.create(model=live.name, input=inputs[lo:lo + 256])
            out += [d.embedding for d in r.data]
        return np.asarray(out, dtype=np.float32)

    scores = vectors("/v1", questions) @ vectors("/documents/v1", texts).T
    return [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def _lc_serve(live):
    from adapter.integrations.langchain import AdapterServeEmbeddings

    return AdapterServeEmbeddings(live.url)


def _lc_local(live):
    from adapter.integrations.langchain import AdapterEmbeddings

    return AdapterEmbeddings(live.adapter, live.model)


def _li_serve(live):
    from adapter.integrations.llamaindex import AdapterServeEmbedding

    return AdapterServeEmbedding(live.url)


def _li_local(live):
    from adapter.integrations.llamaindex import AdapterEmbedding

    return AdapterEmbedding(live.adapter, live.model)


SETUPS: dict[str, tuple[bool, Ranker]] = {  # name -> (recommended by the README, how it ranks)
    "LangChain AdapterServeEmbeddings(url), one object": (True, lc_one(_lc_serve)),
    "LangChain AdapterEmbeddings (model in process), one object": (True, lc_one(_lc_local)),
    "LangChain OpenAIEmbeddings x2 (/documents/v1 indexes, /v1 queries), defaults": (True, lc_two(True)),
    "LangChain OpenAIEmbeddings x2, check_embedding_ctx_length=False": (True, lc_two(False)),
    "LangChain OpenAIEmbeddings, one object at /v1": (False, lc_one(lambda live: lc_openai(live, "/v1"))),
    "LlamaIndex AdapterServeEmbedding(url), one object": (True, li_one(_li_serve)),
    "LlamaIndex AdapterEmbedding (model in process), one object": (True, li_one(_li_local)),
    "LlamaIndex OpenAILikeEmbedding x2 (index /documents/v1, as_retriever(embed_model=/v1))": (True, li_two),
    "LlamaIndex OpenAILikeEmbedding, one object at /v1": (False, li_one(lambda live: li_openai_like(live, "/v1"))),
    "openai client x2 (/documents/v1 and /v1)": (True, openai_two),
    "any client, one object at /documents/v1 (the base model: no adapter)": (
        False, lc_one(lambda live: lc_openai(live, "/documents/v1", check_embedding_ctx_length=False))),
}


def intended(adapter, base_queries: np.ndarray, base_docs: np.ndarray, ids: list[str], k: int) -> list[list[str]]:
    """The ranking each recommended setup must give: ``LinearAdapter.apply`` on the base query vectors against the
    base chunk vectors, top ``k``."""
    scores = adapter.apply(base_queries) @ base_docs.T
    return [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]
