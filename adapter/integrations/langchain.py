"""LangChain ``Embeddings`` whose ``embed_query`` applies the adapter and whose ``embed_documents`` is the base model.
One object serves a vector store for both sides, so documents added later are indexed with base vectors, by
construction.

    from adapter.integrations.langchain import AdapterEmbeddings, AdapterServeEmbeddings

    embeddings = AdapterEmbeddings("adapter.safetensors")           # the model here: the bundled MiniLM, or model=...
    embeddings = AdapterServeEmbeddings("http://127.0.0.1:8080")    # or a running `adapter serve` (no torch here)
    store = InMemoryVectorStore(embedding=embeddings)                # any LangChain vector store
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from adapter.config import DEFAULT_MODEL, EmbeddingConfig
from adapter.errors import AdapterError
from adapter.integrations import SERVE_URL, AdaptedBackend, ServeClient
from adapter.model import LinearAdapter

if TYPE_CHECKING:
    from adapter.lora import QueryLora

try:
    from langchain_core.embeddings import Embeddings
except ImportError:  # pragma: no cover - the extra is missing
    raise AdapterError("the LangChain embeddings need langchain-core: pip install 'adapter[langchain]'") from None


class AdapterEmbeddings(Embeddings):
    """LangChain embeddings: adapted queries, untouched base documents (what the index already holds). The adapter
    file may be either form: a linear adapter, or a query LoRA (its queries run through the base with the LoRA
    merged; a local model only)."""

    def __init__(self, adapter: LinearAdapter | QueryLora | str | os.PathLike, model: str = DEFAULT_MODEL, *,
                 embedding: EmbeddingConfig | None = None, allow_other_model: bool = False):
        self.encoder = AdaptedBackend(adapter, model, embedding=embedding, allow_other_model=allow_other_model)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Base vectors, unit length: the same ones the index was built from."""
        return self.encoder.encode_document(list(texts)).tolist() if texts else []

    def embed_query(self, text: str) -> list[float]:
        """The adapted query vector, unit length."""
        return self.encoder.encode_query([text])[0].tolist()


class AdapterServeEmbeddings(Embeddings):
    """LangChain embeddings from a running `adapter serve`: ``embed_query`` from its ``/v1`` (adapted),
    ``embed_documents`` from its ``/documents/v1`` (base). Needs langchain-core and httpx only: no model here."""

    def __init__(self, base_url: str = SERVE_URL, *, model: str | None = None, api_key: str | None = None,
                 api_key_env: str | None = None, timeout: float = 60.0, batch_size: int = 256):
        self.client = ServeClient(base_url, model=model, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                                  batch_size=batch_size)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Base vectors from ``/documents/v1``: the same ones the index was built from."""
        return self.client.embed(texts, "document") if texts else []

    def embed_query(self, text: str) -> list[float]:
        """The adapted query vector from ``/v1``."""
        return self.client.embed([text], "query")[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self.client.aembed(texts, "document") if texts else []

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.client.aembed([text], "query"))[0]
