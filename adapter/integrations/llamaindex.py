"""A LlamaIndex ``BaseEmbedding`` whose query embedding applies the adapter and whose text embedding is the base model.

    from adapter.integrations.llamaindex import AdapterEmbedding

    Settings.embed_model = AdapterEmbedding("adapter.safetensors")   # the bundled MiniLM, or model="..."
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from adapter.config import DEFAULT_MODEL, EmbeddingConfig
from adapter.errors import AdapterError
from adapter.integrations import AdaptedBackend
from adapter.model import LinearAdapter

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from pydantic import PrivateAttr
except ImportError:  # pragma: no cover - the extra is missing
    raise AdapterError("the LlamaIndex embedding needs llama-index-core: pip install 'adapter[llamaindex]'") from None


class AdapterEmbedding(BaseEmbedding):
    """LlamaIndex embeddings: adapted query embeddings, untouched base text embeddings (what the index holds)."""

    _encoder: Any = PrivateAttr()

    def __init__(self, adapter: LinearAdapter | str | os.PathLike, model: str = DEFAULT_MODEL, *,
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

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._encoder.encode_document(texts).tolist() if texts else []

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
