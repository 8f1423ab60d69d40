"""The on-disk embedding cache: each text embedded once per model, across all commands and runs.

It lives under ``<cache root>/embeddings/<model fingerprint>/`` as append-only shards (``*.npz``: 16-byte text keys
and full-dimension float32 unit vectors); when a dataset grows only the new texts are embedded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapter.data import atomic_write, ensure_dir
from adapter.errors import AdapterError

KEY_BYTES = 16  # 128-bit text keys: collisions are out of reach for any corpus
MAX_SHARDS = 32  # merge shards past this many so start-up stays one read per shard


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
