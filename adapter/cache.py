"""The on-disk embedding cache: each text embedded once per model, across all commands and runs.

It lives under ``<cache root>/embeddings/<model fingerprint>/`` as append-only shards (``*.npz``: 16-byte text keys
and full-dimension float32 unit vectors); when a dataset grows only the new texts are embedded.

Any number of processes may read and write one cache at once, and any of them may be killed at any point:

- a shard is written beside its name and renamed into place, so it is whole or absent (a kill leaves at most a
  hidden ``.*.tmp`` file, swept up later);
- merging shards (past ``MAX_SHARDS``) holds an exclusive lock on ``.lock`` and merges exactly the shards it read,
  writing the merged shard before deleting any of them; listing and indexing shards holds the shared lock, so a
  reader never sees a folder halfway through a merge;
- a reader whose shard was merged away since it indexed it (by another process) indexes the folder again and reads
  the vectors from the merged shard.

A damaged shard (bad zip or CRC, wrong shapes or dimension) is named in a one-line error that says to delete it; the
texts it held are embedded again on the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from adapter.data import atomic_write, ensure_dir
from adapter.errors import AdapterError, one_line

KEY_BYTES = 16  # 128-bit text keys: collisions are out of reach for any corpus
MAX_SHARDS = 32  # merge shards past this many so start-up stays one read per shard
LOCK_FILE = ".lock"  # flock'd: shared while indexing, exclusive while merging
STALE_TMP_SECONDS = 3600  # a hidden temporary shard older than this was left by a killed writer
REINDEX_TRIES = 5  # a reader re-indexes at most this often for one read (each time another merge won the race)


class EmbeddingCache:
    """Append-only on-disk store of unit vectors keyed by a 16-byte hash of (role tag, text)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._where: dict[bytes, tuple[Path, int]] = {}
        self._loaded: dict[Path, np.ndarray] = {}
        self._reindex()

    @contextlib.contextmanager
    def _lock(self, kind: int) -> Iterator[None]:
        """Hold ``fcntl.LOCK_SH`` or ``LOCK_EX`` on the folder's lock file (nothing when the folder is not there)."""
        if not self.folder.is_dir():
            yield
            return
        try:
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise AdapterError(f"{self.folder}: cannot open the cache's lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else []

    def _reindex(self) -> None:
        """Index every shard in the folder afresh (under the shared lock: never halfway through a merge)."""
        where: dict[bytes, tuple[Path, int]] = {}
        with self._lock(fcntl.LOCK_SH):
            for shard in self._shards():
                try:
                    keys = self._read(shard, "keys")
                except FileNotFoundError:  # deleted by hand since it was listed
                    continue
                for row, key in enumerate(keys):
                    where[key.tobytes()] = (shard, row)
        self._where, self._loaded = where, {}

    def _read(self, shard: Path, name: str, dim: int | None = None) -> np.ndarray:
        """One array of a shard, checked; a damaged shard is named. FileNotFoundError passes (merged away)."""
        try:
            with np.load(shard) as z:
                array = z[name]
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise AdapterError(f"{shard}: damaged embedding cache shard ({one_line(e)}); delete it and its texts "
                               "are embedded again") from None
        if name == "keys":
            ok = array.dtype == np.uint8 and array.ndim == 2 and array.shape[1] == KEY_BYTES
            want = f"uint8 keys of {KEY_BYTES} bytes"
        else:
            ok = array.dtype == np.float32 and array.ndim == 2 and (dim is None or array.shape[1] == dim)
            want = f"float32 vectors of dimension {dim}"
        if not ok:
            raise AdapterError(f"{shard}: damaged embedding cache shard ({name} are {array.dtype} {array.shape}, "
                               f"expected {want}); delete it and its texts are embedded again")
        return array

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def get(self, keys: Sequence[bytes], dim: int) -> np.ndarray:
        """Vectors for keys that are all present, in order, as one (n, dim) float32 array."""
        for _ in range(REINDEX_TRIES):
            try:
                return self._get(keys, dim)
            except FileNotFoundError:  # another process merged a shard away: its vectors are in the merged one
                self._reindex()
            except KeyError as e:
                raise AdapterError(f"{self.folder}: a cached vector vanished ({one_line(e)}); run again") from None
        raise AdapterError(f"{self.folder}: shards kept being merged away while reading; run again")

    def _get(self, keys: Sequence[bytes], dim: int) -> np.ndarray:
        out = np.empty((len(keys), dim), dtype=np.float32)
        by_shard: dict[Path, tuple[list[int], list[int]]] = {}
        for i, key in enumerate(keys):
            shard, row = self._where[key]
            dst, src = by_shard.setdefault(shard, ([], []))
            dst.append(i)
            src.append(row)
        for shard, (dst, src) in by_shard.items():
            if shard not in self._loaded:
                vectors = self._read(shard, "vectors", dim)
                if len(vectors) != len(self._read(shard, "keys")):
                    raise AdapterError(f"{shard}: damaged embedding cache shard (keys and vectors differ in "
                                       "number); delete it and its texts are embedded again")
                self._loaded[shard] = vectors
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
        for row, key in enumerate(keys):
            self._where[key] = (shard, row)
        if len(self._shards()) > MAX_SHARDS:
            self._compact()

    def _compact(self) -> None:
        """Merge every shard into one, under the exclusive lock; then index the folder afresh."""
        with self._lock(fcntl.LOCK_EX):
            shards = self._shards()  # listed again under the lock: another process may have merged already
            if len(shards) > MAX_SHARDS:
                merged: dict[bytes, np.ndarray] = {}
                for shard in shards:
                    keys, vectors = self._read(shard, "keys"), self._read(shard, "vectors")
                    if len(keys) != len(vectors):
                        raise AdapterError(f"{shard}: damaged embedding cache shard (keys and vectors differ in "
                                           "number); delete it and its texts are embedded again")
                    merged.update(zip((k.tobytes() for k in keys), vectors, strict=True))
                target = self.folder / f"{time.time_ns()}-{os.getpid()}-merged.npz"
                with atomic_write(target, "wb") as f:  # whole before any shard it replaces is deleted
                    np.savez(f, keys=np.frombuffer(b"".join(merged), dtype=np.uint8).reshape(-1, KEY_BYTES),
                             vectors=np.stack(list(merged.values())))
                for shard in shards:
                    shard.unlink(missing_ok=True)
            self._sweep()
        self._reindex()

    def _sweep(self) -> None:
        """Delete hidden temporary shards that killed writers left behind long ago."""
        now = time.time()
        for tmp in self.folder.glob(".*.npz.*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()
