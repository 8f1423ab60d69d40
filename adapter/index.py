"""Bolt an adapter onto an existing vector index: queries go through the adapter, documents and the index do not."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from adapter.config import DEFAULT_MODEL, AdapterError
from adapter.data import atomic_write
from adapter.encoder import _display_name, load_model, model_fingerprint
from adapter.model import LinearAdapter

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


class AdaptedEncoder:
    """A sentence-transformers model with an adapter on the query side only.

    ``encode_query`` returns adapted unit vectors; ``encode_document`` returns the untouched base vectors, exactly
    those already in your index, so nothing is re-embedded.
    """

    def __init__(self, adapter: LinearAdapter | str | os.PathLike, model: str | SentenceTransformer = DEFAULT_MODEL,
                 *, allow_other_model: bool = False):
        self.adapter = adapter if isinstance(adapter, LinearAdapter) else LinearAdapter.load(adapter)
        self.model = load_model(model) if isinstance(model, str) else model
        name = model if isinstance(model, str) else "model"
        identity = f"{_display_name(name)}@{model_fingerprint(self.model)}"
        source = str(adapter) if not isinstance(adapter, LinearAdapter) else "adapter"
        self.adapter.check_base_model(identity, allow_other_model=allow_other_model, source=source)

    def encode_document(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Base document vectors, unit length (the index side: unchanged)."""
        return self.model.encode_document(texts, normalize_embeddings=True, convert_to_numpy=True, **kwargs)

    def encode_query(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Adapted query vectors, unit length."""
        base = self.model.encode_query(texts, normalize_embeddings=True, convert_to_numpy=True, **kwargs)
        return self.adapter.apply(base)


def write_index(vectors: np.ndarray, path: str | os.PathLike, ids: np.ndarray | None = None) -> Path:
    """Write an exact inner-product FAISS index of (unit) vectors; ``ids`` (int64) are stored when given."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    if ids is not None:
        index = faiss.IndexIDMap2(index)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    else:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(faiss.serialize_index(index).tobytes())
    return path


def read_index(path: str | os.PathLike) -> faiss.Index:
    """Read a FAISS index file with a one-line error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: file not found")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise AdapterError(f"{path}: not a readable FAISS index ({reason[:160]})") from None


def search_index(index: faiss.Index, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query from the index, with the index's own int64 ids; -1 ids are dropped by the
    caller. The query vectors must have the index's dimension."""
    if k < 1:
        raise AdapterError(f"-k must be at least 1, got {k}")
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.shape[1] != index.d:
        raise AdapterError(f"index holds {index.d}-dimensional vectors, queries have {q.shape[1]}")
    scores, ids = index.search(q, k)
    return scores, ids
