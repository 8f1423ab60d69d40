"""The frozen encoder: any embedding model (``adapter.backends``), each text embedded once, cached on disk.

Vectors are cached full-dimension by ``adapter.cache.EmbeddingCache`` under the backend's fingerprint; Matryoshka
dimensions are taken at read time by ``truncate`` (first ``dim`` components, renormalised).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adapter.backends import (
    BUNDLED_NAMES,
    Role,
    load_model,
    make_backend,
    model_fingerprint,
    resolve_model,
)
from adapter.cache import KEY_BYTES, EmbeddingCache
from adapter.config import DEFAULT_MODEL, Config, EmbeddingConfig, EncoderConfig, cache_root
from adapter.data import atomic_write, ensure_dir
from adapter.errors import AdapterError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["BUNDLED_NAMES", "Encoder", "Role", "load_model", "model_fingerprint", "resolve_model", "truncate"]

logger = logging.getLogger(__name__)

CANARY_FILE = "canary.json"  # beside a remote model's cached vectors: the canary text's vector when they were made
CANARY_TEXT = "Canary: the quick brown fox checks that the embedding model is still the one it was."


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """First ``dim`` components of each row, renormalised to unit length (a Matryoshka dimension)."""
    if dim > vectors.shape[1]:
        raise AdapterError(f"dimension {dim} is above the vectors' dimension {vectors.shape[1]}")
    out = np.array(vectors[:, :dim], dtype=np.float32, order="C", copy=True)  # never a view: callers' arrays stay
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, np.maximum(norms, 1e-12), out=out)
    return out


class Encoder:
    """A frozen embedding model whose vectors are cached on disk, full dimension, unit length: a sentence-transformers
    model run here, or ``openai:NAME`` behind any OpenAI-compatible ``/v1/embeddings`` (``adapter.backends``).

    ``encode_queries`` / ``encode_documents`` return (n, d) float32 arrays; only texts the cache has not seen reach
    the backend, and each finished batch is stored at once, so a killed run loses only what was in flight.
    ``texts_encoded`` counts the texts embedded, so callers and tests can see what a run really sent. For a remote
    model a canary text is embedded before the first new text of each run and compared with the one cached beside
    the vectors: a provider that changed the model under the same name is refused instead of mixing two models'
    vectors in one cache. ``model`` is the local sentence-transformers model (None for a remote one).
    """

    def __init__(self, model: str | SentenceTransformer = DEFAULT_MODEL, *, cache_dir: str | os.PathLike | None = None,
                 batch_size: int = EncoderConfig.batch_size, device: str | None = None, show_progress: bool = True,
                 embedding: EmbeddingConfig | None = None, base_url: str | None = None,
                 dimensions: int | None = None, api_key_env: str | None = None, query_prefix: str | None = None,
                 document_prefix: str | None = None, processes: int | None = None,
                 devices: str | Sequence[str] | None = None, pool_min_texts: int = EncoderConfig.pool_min_texts):
        given = {"base_url": base_url, "dimensions": dimensions, "api_key_env": api_key_env,
                 "query_prefix": query_prefix, "document_prefix": document_prefix}
        settings = dataclasses.replace(embedding or EmbeddingConfig(),
                                       **{k: v for k, v in given.items() if v is not None})
        self.backend = make_backend(model, settings, batch_size=batch_size, device=device,
                                    show_progress=show_progress, processes=processes, devices=devices,
                                    pool_min_texts=pool_min_texts)
        self.name = self.backend.name
        self.model: SentenceTransformer | None = getattr(self.backend, "model", None)
        self.show_progress = show_progress
        self.fingerprint = self.backend.fingerprint
        self.identity = self.backend.identity
        self.cache = EmbeddingCache(cache_root(cache_dir) / "embeddings" / self.fingerprint)
        self.texts_encoded = 0
        self.canary_min_cosine = settings.canary_min_cosine
        self._canary_checked = False

    @classmethod
    def from_config(cls, cfg: Config, *, show_progress: bool = True) -> Encoder:
        """The encoder ``cfg.encoder`` and ``cfg.embedding`` describe: model, cache folder, batch size, processes or
        devices, and for a remote model its server, dimensions, prefixes and limits."""
        e = cfg.encoder
        return cls(e.model, cache_dir=e.cache_dir, batch_size=e.batch_size, show_progress=show_progress,
                   embedding=cfg.embedding, processes=e.processes, devices=e.devices, pool_min_texts=e.pool_min_texts)

    @property
    def dim(self) -> int:
        """The vectors' dimension; a remote model without ``dimensions`` tells it in its first answer (or the
        cached canary does)."""
        if self.backend.dim is None:
            stored = self._stored_canary()
            if stored is not None:
                self.backend.dim = len(stored)
            else:
                self._check_canary()
        assert self.backend.dim is not None
        return self.backend.dim

    # ---------------------------------------------------------------------------------------------- canary

    @property
    def _canary_path(self) -> Path:
        return self.cache.folder / CANARY_FILE

    def _stored_canary(self) -> np.ndarray | None:
        try:
            return np.asarray(json.loads(self._canary_path.read_text())["vector"], dtype=np.float32)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise AdapterError(f"{self._canary_path}: unreadable canary; delete it (the next run writes it "
                               "again)") from None

    def _check_canary(self) -> None:
        """Once per run, before a remote model embeds anything: its vector for ``CANARY_TEXT`` must match the
        cached one (the first run stores it)."""
        if not self.backend.remote or self._canary_checked:
            return
        vector = self.backend.embed([CANARY_TEXT], "document")[0]
        stored = self._stored_canary()
        if stored is None:
            ensure_dir(self.cache.folder)
            with atomic_write(self._canary_path) as f:
                json.dump({"text": CANARY_TEXT, "model": self.name, "vector": vector.tolist()}, f)
        else:
            cosine = float(vector @ stored) if len(stored) == len(vector) else float("nan")
            if not cosine >= self.canary_min_cosine:
                what = (f"{len(vector)}-dimensional vectors, the cache {len(stored)}-dimensional ones"
                        if len(stored) != len(vector) else f"cosine {cosine:.4f} with the cached vector")
                raise AdapterError(f"{self.name}: the canary text gives {what}: the provider's model has changed "
                                   f"since {self.cache.folder} was filled; refusing to mix two models' vectors "
                                   "(use another --cache-dir, or delete that folder)")
        self._canary_checked = True

    # ---------------------------------------------------------------------------------------------- encoding

    def _keys(self, texts: Sequence[str], role: Role) -> list[bytes]:
        tag = self.backend.role_tag(role).encode()
        try:
            return [hashlib.sha256(tag + b"\0" + t.encode()).digest()[:KEY_BYTES] for t in texts]
        except (UnicodeEncodeError, AttributeError):
            _check_texts(texts, role)
            raise


    def encode(self, texts: Sequence[str], role: Role = "document") -> np.ndarray:
        """Unit vectors for ``texts`` (n, d); new texts are embedded once and stored batch by batch as they finish,
        the rest read from disk."""
        keys = self._keys(texts, role)
        missing: dict[bytes, str] = {}
        for key, text, cached in zip(keys, texts, self.cache.contains(keys), strict=True):
            if not cached and key not in missing:
                missing[key] = text
        if missing:
            self._check_canary()
            logger.info("embedding %d new %s texts with %s (%d cached)", len(missing), role, self.identity,
                        len(texts) - len(missing))
            new_keys = list(missing)

            def store(positions: np.ndarray, vectors: np.ndarray) -> None:
                self.cache.put([new_keys[i] for i in positions], vectors)
                self.texts_encoded += len(positions)

            self.backend.embed(list(missing.values()), role, on_batch=store)
        return self.cache.get(keys, self.dim)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Cached query vectors (the model's query prompt or the query prefix, if any)."""
        return self.encode(texts, "query")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Cached document vectors (the model's document prompt or the document prefix, if any)."""
        return self.encode(texts, "document")


def _check_texts(texts: Sequence[str], role: Role) -> None:
    """A one-line error naming the first text that cannot be embedded: not a string, or not valid Unicode (a lone
    surrogate such as ``"\\ud83d"``, which json.loads accepts but no model or cache can take)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise AdapterError(f"{role} texts[{i}] (of {len(texts)}) is {type(t).__name__}, not a string")
        try:
            t.encode()
        except UnicodeEncodeError as e:
            raise AdapterError(f"{role} texts[{i}] (of {len(texts)}) holds a lone surrogate {t[e.start]!r} at "
                               f"character {e.start} (not valid Unicode): {t[:40]!r}") from None
