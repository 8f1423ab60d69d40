"""Framework embeddings with the adapter on the query side: LangChain (``adapter.integrations.langchain``) and
LlamaIndex (``adapter.integrations.llamaindex``). Queries are adapted; documents get the untouched base vectors, the
ones the index already holds, so nothing is re-embedded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from adapter.config import DEFAULT_MODEL
from adapter.model import LinearAdapter


class QueryDocumentEncoder(Protocol):
    """What the wrappers call: adapted query vectors and base document vectors, (n, d) float32, unit length."""

    def encode_query(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_document(self, texts: Sequence[str]) -> np.ndarray: ...


def adapted_encoder(adapter: LinearAdapter | str | os.PathLike, model: str = DEFAULT_MODEL, *,
                    allow_other_model: bool = False) -> QueryDocumentEncoder:
    """The adapter file in front of ``model`` (a sentence-transformers name or path), checked against it."""
    from adapter.export import AdaptedEncoder

    return AdaptedEncoder(adapter, model, allow_other_model=allow_other_model)
