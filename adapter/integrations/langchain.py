"""A LangChain ``Embeddings`` whose ``embed_query`` applies the adapter and whose ``embed_documents`` is the base model.

    from adapter.integrations.langchain import AdapterEmbeddings

    embeddings = AdapterEmbeddings("adapter.safetensors")           # the bundled MiniLM, or model="..."
    store = InMemoryVectorStore(embedding=embeddings)                # any LangChain vector store
"""

from __future__ import annotations

import os

from adapter.config import DEFAULT_MODEL, EmbeddingConfig
from adapter.errors import AdapterError
from adapter.integrations import AdaptedBackend
from adapter.model import LinearAdapter

try:
    from langchain_core.embeddings import Embeddings
except ImportError:  # pragma: no cover - the extra is missing
    raise AdapterError("the LangChain embeddings need langchain-core: pip install 'adapter[langchain]'") from None


class AdapterEmbeddings(Embeddings):
    """LangChain embeddings: adapted queries, untouched base documents (what the index already holds)."""

    def __init__(self, adapter: LinearAdapter | str | os.PathLike, model: str = DEFAULT_MODEL, *,
                 embedding: EmbeddingConfig | None = None, allow_other_model: bool = False):
        self.encoder = AdaptedBackend(adapter, model, embedding=embedding, allow_other_model=allow_other_model)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Base vectors, unit length: the same ones the index was built from."""
        return self.encoder.encode_document(list(texts)).tolist() if texts else []

    def embed_query(self, text: str) -> list[float]:
        """The adapted query vector, unit length."""
        return self.encoder.encode_query([text])[0].tolist()
