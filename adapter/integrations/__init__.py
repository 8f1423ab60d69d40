"""Bolting the adapter on where the queries are embedded: `adapter serve` (``adapter.serve``), LangChain
(``adapter.integrations.langchain``) and LlamaIndex (``adapter.integrations.llamaindex``). Queries are adapted;
documents get the untouched base vectors, the ones the index already holds, so nothing is re-embedded.

``AdaptedBackend`` is what they share: an embedding backend (a local sentence-transformers model, or ``openai:NAME``
behind any OpenAI-compatible server, with its retries and limits) and an adapter checked against it. Nothing here
writes to the embedding cache: live queries are embedded, used and forgotten.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from adapter.backends import Backend, make_backend
from adapter.config import DEFAULT_MODEL, EmbeddingConfig
from adapter.errors import AdapterError
from adapter.model import LinearAdapter


def checked_adapter(adapter: LinearAdapter | str | os.PathLike, backend: Backend, *,
                    allow_other_model: bool = False) -> LinearAdapter:
    """The adapter (loaded when a path), refused in one line unless it fits the backend's model and dimension."""
    source = "adapter" if isinstance(adapter, LinearAdapter) else str(adapter)
    loaded = adapter if isinstance(adapter, LinearAdapter) else LinearAdapter.load(adapter)
    if backend.dim is not None and loaded.dim != backend.dim:
        raise AdapterError(f"{source}: adapter is {loaded.dim}-dimensional, {backend.name} gives {backend.dim}")
    loaded.check_base_model(backend.identity, allow_other_model=allow_other_model, source=source)
    return loaded


class AdaptedBackend:
    """An adapter in front of an embedding backend: ``encode_query`` adapted, ``encode_document`` the base vectors,
    (n, d) float32, unit length."""

    def __init__(self, adapter: LinearAdapter | str | os.PathLike, model: str = DEFAULT_MODEL, *,
                 embedding: EmbeddingConfig | None = None, allow_other_model: bool = False,
                 backend: Backend | None = None):
        self.backend = backend or make_backend(model, embedding, show_progress=False)
        self.adapter = checked_adapter(adapter, self.backend, allow_other_model=allow_other_model)

    def encode_query(self, texts: Sequence[str]) -> np.ndarray:
        """Adapted query vectors."""
        return self.adapter.apply(self.backend.embed(list(texts), "query"))

    def encode_document(self, texts: Sequence[str]) -> np.ndarray:
        """Base document vectors: the index side, unchanged."""
        return self.backend.embed(list(texts), "document")
