"""The on-disk embedding cache: each text embedded once per model, across all commands and runs, at any scale.

It lives under ``<cache root>/embeddings/<model fingerprint>/`` as immutable shards (``*.shard``). A shard is one
file: a 4096-byte JSON header (rows, dimension, CRC-32 of the rest), then the sorted 16-byte text keys as two
uint64 columns (``hi``, ``lo``), then the float32 unit vectors in key order, then one uint64 checksum per row (of
its key and vector). Opening a cache reads each shard's header and memory-maps the file: O(shards), no Python
object per key, nothing else read. A lookup is a numpy ``searchsorted`` in each shard's ``hi`` column; a read
copies only the rows asked for (the pages they lie on) and checks each row against its checksum the first time
this process reads it, so a damaged vector is named, never returned, at a cost in proportion to what is read.

Any number of processes may read and write one cache at once, and any of them may be killed at any point:

- a shard is written beside its name, fsync'd and renamed into place, so it is whole or absent (a kill leaves at
  most a hidden ``.*.tmp`` file, swept up later); a shard is never changed once it has its name;
- past ``MAX_SHARDS`` shards a write merges the ``MERGE_WIDTH`` smallest into one (size-tiered, log-structured:
  each vector is rewritten about once per eightfold growth of the cache, a write never rewrites the whole cache).
  The merged shard is renamed into place before any shard it replaces is unlinked, so every key is in some shard
  at every moment. Merging holds ``.lock`` exclusively (another process that would merge skips); readers and
  writers take no lock: a reader keeps reading the files it mapped even after they are unlinked, and a reader
  that finds a listed shard gone (merged away since it listed the folder) lists the folder again;
- a cache of another layout (``*.npz`` shards) or a shard of another version is refused in one line naming it:
  delete it, and its texts are embedded again.

A damaged shard (unreadable header, wrong size, wrong dimension, a row that does not match its checksum, or a CRC
mismatch, which is checked whenever a shard is read whole: merging, ``verify``) is named in a one-line error that
says to delete it; the texts it held are embedded again on the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import secrets
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from adapter.data import ensure_dir
from adapter.errors import AdapterError

logger = logging.getLogger(__name__)

KEY_BYTES = 16  # 128-bit text keys: collisions are out of reach for any corpus
SUFFIX = ".shard"
FORMAT = "adapter-embedding-cache-shard"
VERSION = 2  # a checksum per row, checked as rows are read; the only version read
HEADER_BYTES = 4096  # JSON padded with spaces: one page, so the sections behind it start page-aligned
MAX_SHARDS = 32  # past this many shards a write merges some, so opening stays a few dozen header reads
MERGE_WIDTH = 8  # how many of the smallest shards one merge takes (the fan-out of the size tiers)
CHUNK_ROWS = 1 << 16  # rows written or merged at a time: memory stays bounded whatever the shard sizes
PREFETCH_ROWS = 64  # a read of more rows than this asks the kernel for all their pages at once (cold disk: ~5x)
LOCK_FILE = ".lock"  # flock'd exclusively while merging
STALE_TMP_SECONDS = 3600  # a hidden temporary shard older than this was left by a killed writer
RELIST_TRIES = 20  # a reader lists the folder at most this often for one open (each time a merge won the race)
SUM_ROWS = 1024  # rows whose checksums are computed at a time: temporaries stay a few MB whatever the read's size


def _damaged(path: Path, why: str) -> AdapterError:
    return AdapterError(f"{path}: damaged embedding cache shard ({why}); delete it and its texts are embedded again")


def _weights(n: int) -> np.ndarray:
    """``n`` fixed odd 64-bit multipliers (splitmix64 of 1..n): a row's checksum is the sum of its words times these,
    modulo 2^64, so any change to one word always changes it (an odd multiplier is invertible)."""
    x = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x | np.uint64(1)


def row_sums(hi: np.ndarray, lo: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """One uint64 checksum per row of its key (``hi``, ``lo``) and its float32 vector's bits, vectorised."""
    n, dim = vectors.shape
    w = _weights(dim + 2)
    out = np.empty(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in range(0, n, SUM_ROWS):
            words = np.ascontiguousarray(vectors[a:a + SUM_ROWS], dtype="<f4").view("<u4").astype(np.uint64)
            out[a:a + SUM_ROWS] = ((words * w[2:]).sum(axis=1, dtype=np.uint64) + hi[a:a + SUM_ROWS] * w[0]
                                   + lo[a:a + SUM_ROWS] * w[1])
    return out


def _split_keys(keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """16-byte keys as two uint64 columns (hi, lo): the order shards are sorted in and searched by."""
    raw = np.frombuffer(b"".join(keys), dtype="<u8")
    if raw.size != 2 * len(keys):
        raise ValueError(f"cache keys must be {KEY_BYTES} bytes each")
    pairs = raw.reshape(-1, 2)
    return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


class _Shard:
    """One shard file, memory-mapped read-only: ``hi``, ``lo`` (rows,) uint64, ``vectors`` (rows, dim) float32 and
    ``sums`` (rows,) uint64."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:  # FileNotFoundError passes: merged away since the folder was listed
            head = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
            try:
                meta = json.loads(head.decode("utf-8"))
                ok = meta.get("format") == FORMAT
                self.rows, self.dim, self.crc = int(meta["rows"]), int(meta["dim"]), int(meta["crc32"])
                version = meta.get("version")
            except (ValueError, KeyError, TypeError, AttributeError):
                ok = False
            if not ok or len(head) < HEADER_BYTES:
                raise _damaged(path, "not an embedding cache shard header")
            if version != VERSION:
                raise AdapterError(f"{path}: embedding cache shard version {version!r}, which this version of adapter "
                                   f"does not read (it reads {VERSION}); delete it and its texts are embedded again")
            expected = HEADER_BYTES + self.rows * (2 * 8 + 8 + 4 * self.dim)
            if self.rows <= 0 or self.dim <= 0 or size != expected:
                raise _damaged(path, f"{size} bytes, its header promises {expected}")
            self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        n = self.rows
        self.hi = np.frombuffer(self._map, dtype="<u8", count=n, offset=HEADER_BYTES)
        self.lo = np.frombuffer(self._map, dtype="<u8", count=n, offset=HEADER_BYTES + 8 * n)
        self._vectors_at = HEADER_BYTES + 16 * n
        self.vectors = np.frombuffer(self._map, dtype="<f4", count=n * self.dim,
                                     offset=self._vectors_at).reshape(n, self.dim)
        self.sums = np.frombuffer(self._map, dtype="<u8", count=n, offset=self._vectors_at + 4 * n * self.dim)
        self._checked: np.ndarray | None = None  # rows whose checksum this process has checked (made on first read)
        self.advise(mmap.MADV_RANDOM)  # no readahead: rows are read a few at a time

    def advise(self, advice: int) -> None:
        """``madvise`` the vectors' pages: MADV_RANDOM to read rows, MADV_SEQUENTIAL to read the shard whole."""
        start = self._vectors_at // mmap.PAGESIZE * mmap.PAGESIZE
        with contextlib.suppress(OSError, AttributeError, ValueError):  # a hint only (not on every platform)
            self._map.madvise(advice, start, len(self._map) - start)

    def find(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Row of each (hi, lo) key in this shard, -1 where absent."""
        pos = np.searchsorted(self.hi, hi)
        safe = np.minimum(pos, self.rows - 1)
        same_hi = (pos < self.rows) & (self.hi[safe] == hi)
        rows = np.where(same_hi & (self.lo[safe] == lo), safe, -1)
        for i in np.flatnonzero(same_hi & (rows < 0)):  # two keys share their first 8 bytes: look among those
            end = int(np.searchsorted(self.hi, hi[i], side="right"))
            at = int(pos[i]) + int(np.searchsorted(self.lo[pos[i]:end], lo[i]))
            if at < end and self.lo[at] == lo[i]:
                rows[i] = at
        return rows

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of ``rows`` (sorted ascending), touching only the pages they lie on, each checked against its
        checksum the first time this process reads it."""
        if len(rows) > PREFETCH_ROWS:  # queue every page's read at once instead of one fault after another
            row_bytes, page = 4 * self.dim, mmap.PAGESIZE
            starts = (self._vectors_at + rows * row_bytes) // page * page
            ends = self._vectors_at + (rows + 1) * row_bytes
            sums_at = self._vectors_at + row_bytes * self.rows  # and the pages of their checksums
            at = np.unique((sums_at + 8 * rows) // page * page)
            starts, ends = np.concatenate([starts, at]), np.concatenate([ends, at + page])
            with contextlib.suppress(OSError, AttributeError, ValueError):
                for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                    self._map.madvise(mmap.MADV_WILLNEED, s, min(e, len(self._map)) - s)
        out = self.vectors[rows]
        self._check(rows, out)
        return out

    def _check(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        if self._checked is None:
            self._checked = np.zeros(self.rows, dtype=bool)
        new = np.flatnonzero(~self._checked[rows])
        if not len(new):
            return
        at, unseen = (rows, vectors) if len(new) == len(rows) else (rows[new], vectors[new])  # no copy when all new
        bad = np.flatnonzero(row_sums(self.hi[at], self.lo[at], unseen) != self.sums[at])
        if len(bad):
            raise _damaged(self.path, f"{len(bad)} of the {len(new)} rows read do not match their checksums, "
                                      f"first row {int(at[bad[0]])}")
        self._checked[at] = True

    def verify(self) -> None:
        """Check the CRC-32 of everything behind the header (reads the whole file)."""
        self.advise(mmap.MADV_SEQUENTIAL)
        crc, step = 0, 1 << 24
        for start in range(HEADER_BYTES, len(self._map), step):
            crc = zlib.crc32(self._map[start:start + step], crc)
        self.advise(mmap.MADV_RANDOM)
        if crc != self.crc:
            raise _damaged(self.path, "CRC mismatch")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_shard(folder: Path, hi: np.ndarray, lo: np.ndarray, rows_of: Callable[[int, int], np.ndarray], dim: int,
                *, tag: str = "") -> Path:
    """Write one shard of ``len(hi)`` keys, sorted and unique, whose vectors ``rows_of(start, stop)`` gives in that
    order a chunk at a time; beside its name, fsync'd, then renamed into place (whole or absent)."""
    n = len(hi)
    path = folder / f"{time.time_ns()}-{os.getpid()}{tag}{SUFFIX}"
    tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any file
    except OSError as e:
        raise AdapterError(f"{folder}: cannot write here ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)  # the real header, with the CRC, goes in last
            hi, lo = np.ascontiguousarray(hi, dtype="<u8"), np.ascontiguousarray(lo, dtype="<u8")
            sums = np.empty(n, dtype="<u8")
            crc = 0
            for part in (hi, lo):
                data = part.tobytes()
                crc = zlib.crc32(data, crc)
                f.write(data)
            for start in range(0, n, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, n)
                block = np.ascontiguousarray(rows_of(start, stop), dtype="<f4")
                if block.shape != (stop - start, dim):
                    raise ValueError(f"vectors must be ({n}, {dim}), got a block of {block.shape}")
                sums[start:stop] = row_sums(hi[start:stop], lo[start:stop], block)
                data = block.tobytes()
                crc = zlib.crc32(data, crc)
                f.write(data)
            data = sums.tobytes()
            crc = zlib.crc32(data, crc)
            f.write(data)
            header = json.dumps({"format": FORMAT, "version": VERSION, "rows": n, "dim": dim, "crc32": crc})
            f.seek(0)
            f.write(header.encode().ljust(HEADER_BYTES - 1) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise AdapterError(f"{folder}: cannot write an embedding cache shard ({e.strerror})") from None
        raise
    _fsync_dir(folder)
    return path


def _sorted_unique(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Positions that sort (hi, lo) keys, keeping the first of equal keys."""
    order = np.lexsort((lo, hi))
    h, l_ = hi[order], lo[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = (h[1:] != h[:-1]) | (l_[1:] != l_[:-1])
    return order[keep]


class EmbeddingCache:
    """Immutable memory-mapped shards of unit vectors keyed by a 16-byte hash of (role tag, text)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._shards: list[_Shard] = []
        self._open()

    # ------------------------------------------------------------------------------------------------ the folder

    @contextlib.contextmanager
    def _lock(self, blocking: bool = True) -> Iterator[bool]:
        """Hold ``.lock`` exclusively; yields False (holding nothing) when not ``blocking`` and another has it."""
        try:
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise AdapterError(f"{self.folder}: cannot open the cache's lock file ({e.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def _names(self, suffix: str) -> list[Path]:
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(suffix) and not n.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise AdapterError(f"{self.folder}: cannot list the embedding cache ({e.strerror})") from None
        return [self.folder / n for n in names]

    def _open(self) -> None:
        """Map every shard in the folder (a cache of the old ``*.npz`` layout refused); list again if one vanished."""
        old = self._names(".npz")
        if old:
            raise AdapterError(f"{old[0]}: an embedding cache shard of the old layout (*.npz), which this version of "
                               f"adapter does not read; delete {self.folder} and its texts are embedded again")
        held = {s.path: s for s in self._shards}
        for _ in range(RELIST_TRIES):
            try:
                self._shards = [held.get(p) or _Shard(p) for p in self._names(SUFFIX)]
                return
            except FileNotFoundError:  # merged away since the folder was listed: the merged shard is there now
                continue
        raise AdapterError(f"{self.folder}: shards kept being merged away while opening the cache; run again")

    # ------------------------------------------------------------------------------------------------ reading

    def _locate(self, keys: Sequence[bytes], shards: list[_Shard]) -> tuple[np.ndarray, np.ndarray]:
        """For each key, the index in ``shards`` of a shard holding it (-1: none) and its row there."""
        hi, lo = _split_keys(keys)
        shard_of = np.full(len(keys), -1, dtype=np.int64)
        row_of = np.zeros(len(keys), dtype=np.int64)
        todo = np.argsort(hi, kind="stable")  # searched in key order: each shard's key pages are read in order
        for s, shard in enumerate(shards):
            if not len(todo):
                break
            rows = shard.find(hi[todo], lo[todo])
            found = rows >= 0
            shard_of[todo[found]], row_of[todo[found]] = s, rows[found]
            todo = todo[~found]
        return shard_of, row_of

    def contains(self, keys: Sequence[bytes]) -> np.ndarray:
        """Boolean mask: which keys the cache holds (one vectorised search per shard)."""
        if not len(keys):
            return np.zeros(0, dtype=bool)
        return self._locate(keys, self._shards)[0] >= 0

    def __contains__(self, key: bytes) -> bool:
        return bool(self.contains([key])[0])

    def __len__(self) -> int:
        """Distinct keys held (two processes may have stored the same text; a merge keeps one)."""
        if len(self._shards) <= 1:
            return sum(s.rows for s in self._shards)
        hi = np.concatenate([s.hi for s in self._shards])
        lo = np.concatenate([s.lo for s in self._shards])
        return len(_sorted_unique(hi, lo))

    def get(self, keys: Sequence[bytes], dim: int) -> np.ndarray:
        """Vectors for keys that are all present, in order, as one (n, dim) float32 array."""
        shards = self._shards  # this list is replaced, never changed in place: indices into it stay valid
        shard_of, row_of = self._locate(keys, shards)
        if (shard_of < 0).any():  # stored by another process since this one opened the cache: look again
            self._open()
            shards = self._shards
            shard_of, row_of = self._locate(keys, shards)
            if (shard_of < 0).any():
                raise AdapterError(f"{self.folder}: a cached vector vanished ({int((shard_of < 0).sum())} keys "
                                   "not found); run again")
        out = np.empty((len(keys), dim), dtype=np.float32)
        for s in np.unique(shard_of).tolist():
            shard = shards[s]
            if shard.dim != dim:
                raise _damaged(shard.path, f"vectors of dimension {shard.dim}, expected {dim}")
            dst = np.flatnonzero(shard_of == s)
            order = np.argsort(row_of[dst], kind="stable")  # ascending rows: pages read in file order
            out[dst[order]] = shard.read(row_of[dst][order])
        return out

    def verify(self) -> None:
        """Read every shard whole and check its CRC (a damaged one is named)."""
        for shard in self._shards:
            shard.verify()

    # ------------------------------------------------------------------------------------------------ writing

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store new vectors as one shard, written atomically; merge the smallest shards when there are too many."""
        if not len(keys):
            return
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"{len(keys)} keys but vectors of shape {vectors.shape}")
        ensure_dir(self.folder)
        hi, lo = _split_keys(keys)
        order = _sorted_unique(hi, lo)
        path = write_shard(self.folder, hi[order], lo[order], lambda a, b: vectors[order[a:b]], vectors.shape[1])
        try:
            self._shards = [*self._shards, _Shard(path)]
        except FileNotFoundError:  # another process merged it away already: the merged shard holds its keys
            self._open()
        if len(self._names(SUFFIX)) > MAX_SHARDS:
            self._merge()
            self._open()  # drop the maps of shards merged away (by this process or another)
        elif len(self._shards) > 2 * MAX_SHARDS:  # others merged away shards this process still maps
            self._open()

    def _merge(self) -> None:
        """Merge the ``MERGE_WIDTH`` smallest shards into one, under the exclusive lock (skipped if another
        process is merging); the merged shard is in place before any shard it replaces is unlinked."""
        with self._lock(blocking=False) as held:
            if not held:
                return
            paths = self._names(SUFFIX)  # listed again under the lock: another process may have merged already
            if len(paths) <= MAX_SHARDS:
                return
            try:
                shards = [_Shard(p) for p in paths]
            except FileNotFoundError:  # deleted by hand meanwhile: leave it to the next write
                return
            picked = sorted(shards, key=lambda s: (s.rows, s.path.name))[:MERGE_WIDTH]
            for shard in picked:
                shard.verify()
                shard.advise(mmap.MADV_SEQUENTIAL)
            dims = {s.dim for s in picked}
            if len(dims) > 1:
                raise AdapterError(f"{self.folder}: shards of dimensions {sorted(dims)} in one cache; delete the "
                                   "folder and its texts are embedded again")
            hi = np.concatenate([s.hi for s in picked])
            lo = np.concatenate([s.lo for s in picked])
            source = np.concatenate([np.full(s.rows, i, dtype=np.int32) for i, s in enumerate(picked)])
            offset = np.cumsum([0] + [s.rows for s in picked[:-1]])
            keep = _sorted_unique(hi, lo)

            def rows_of(a: int, b: int) -> np.ndarray:
                take = keep[a:b]
                out = np.empty((len(take), picked[0].dim), dtype=np.float32)
                for i, shard in enumerate(picked):
                    mine = source[take] == i
                    out[mine] = shard.vectors[take[mine] - offset[i]]
                return out

            write_shard(self.folder, hi[keep], lo[keep], rows_of, picked[0].dim, tag="-merged")
            for shard in picked:
                shard.path.unlink(missing_ok=True)
            logger.info("merged %d cache shards (%d vectors) in %s", len(picked), len(keep), self.folder)
            self._sweep()

    def _sweep(self) -> None:
        """Delete hidden temporary shards that killed writers left behind long ago."""
        now = time.time()
        for tmp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()
