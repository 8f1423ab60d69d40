"""LlamaIndex ``BaseEmbedding`` whose query embedding applies the adapter and whose text embedding is the base model.
One object serves ``VectorStoreIndex`` for both sides, so nodes inserted later are indexed with base vectors, by
construction.

    from adapter.integrations.llamaindex import AdapterEmbedding, AdapterServeEmbedding

    Settings.embed_model = AdapterEmbedding("adapter.safetensors")         # the model here: the bundled MiniLM
    Settings.embed_model = AdapterServeEmbedding("http://127.0.0.1:8080")  # or a running `adapter serve`, no torch
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from adapter.config import DEFAULT_MODEL, EmbeddingConfig
from adapter.errors import AdapterError
from adapter.integrations import SERVE_URL, AdaptedBackend, ServeClient
from adapter.model import LinearAdapter

if TYPE_CHECKING:
    from adapter.lora import QueryLora

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from pydantic import PrivateAttr
except ImportError:  # pragma: no cover - the extra is missing
    raise AdapterError("the LlamaIndex embedding needs llama-index-core: pip install 'adapter[llamaindex]'") from None


class AdapterEmbedding(BaseEmbedding):
    """LlamaIndex embeddings: adapted query embeddings, untouched base text embeddings (what the index holds). The
    adapter file may be either form (a query LoRA needs a local model). The async methods run the model in a worker
    thread, never on the event loop."""

    _encoder: Any = PrivateAttr()

    def __init__(self, adapter: LinearAdapter | QueryLora | str | os.PathLike, model: str = DEFAULT_MODEL, *,
                 embedding: EmbeddingConfig | None = None, allow_other_model: bool = False, **kwargs: Any):
        kwargs.setdefault("model_name", model)
        super().__init__(**kwargs)
        self._encoder = AdaptedBackend(adapter, model, embedding=embedding, allow_other_model=allow_other_model)

    @classmethod
    def class_name(cls) -> str:
        return "AdapterEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._encoder.encode_query([query])[0].tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._encoder.encode_document([text])[0].tolist()

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._encoder.encode_document(texts).tolist() if texts else []

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


class AdapterServeEmbedding(BaseEmbedding):
    """LlamaIndex embeddings from a running `adapter serve`: query embeddings from its ``/v1`` (adapted), text
    embeddings from its ``/documents/v1`` (base). Needs llama-index-core and httpx only: no model here."""

    _client: Any = PrivateAttr()

    def __init__(self, base_url: str = SERVE_URL, *, model: str | None = None, api_key: str | None = None,
                 api_key_env: str | None = None, timeout: float = 60.0, **kwargs: Any):
        kwargs.setdefault("model_name", model or "adapter-serve")
        kwargs.setdefault("embed_batch_size", 100)
        super().__init__(**kwargs)
        self._client = ServeClient(base_url, model=model, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                                   batch_size=self.embed_batch_size)

    @classmethod
    def class_name(cls) -> str:
        return "AdapterServeEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._client.embed([query], "query")[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await self._client.aembed([query], "query"))[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._client.embed([text], "document")[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._client.aembed([text], "document"))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._client.embed(texts, "document") if texts else []

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await self._client.aembed(texts, "document") if texts else []
