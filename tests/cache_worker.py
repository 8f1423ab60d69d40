"""A process that uses one embedding cache as `adapter embed` does, with vectors a pure function of each key, for
tests/test_cache.py and bench/bench_faults.py:

    python tests/cache_worker.py FOLDER SEED ROUNDS [BATCH]
    python tests/cache_worker.py kill-merge FOLDER POINT

Each round opens the cache afresh, takes a seeded overlapping share of a fixed universe of keys, stores the missing
ones a few at a time (one shard per put, so merges happen often) and reads them all back, checking every vector.
Prints one JSON line per round: {"round", "stored", "read"}.

``kill-merge`` stores one key per shard until a merge starts, and SIGKILLs itself at POINT of that merge:
``writing`` (halfway through the merged shard's vectors), ``renamed`` (the merged shard just renamed into place,
no shard it replaces deleted yet) or ``unlinking`` (after deleting the third of them).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import numpy as np

from adapter.cache import EmbeddingCache

DIM = 8
UNIVERSE = [hashlib.sha256(f"text {i}".encode()).digest()[:16] for i in range(400)]


def vector(key: bytes) -> np.ndarray:
    """What the 'model' embeds for a key: the same unit vector every time, in every process."""
    v = np.random.default_rng(int.from_bytes(key[:8], "little")).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def kill_merge(folder: str, point: str) -> None:
    """Fill the cache one key per shard until a merge runs, and die by SIGKILL at ``point`` of it."""
    import adapter.cache as cache

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "writing":
        real_write = cache.write_shard

        def write_shard(folder, hi, lo, rows_of, dim, *, tag=""):
            if tag != "-merged":
                return real_write(folder, hi, lo, rows_of, dim, tag=tag)
            return real_write(folder, hi, lo, lambda a, b: die() if a else rows_of(a, b), dim, tag=tag)

        cache.CHUNK_ROWS = 2  # several chunks, so the kill lands with part of the vectors written
        cache.write_shard = write_shard
    elif point == "renamed":
        real_replace = os.replace

        def replace(src, dst):
            real_replace(src, dst)
            if "-merged" in str(dst):
                die()

        cache.os.replace = replace
    elif point == "unlinking":
        unlinked = []
        real_unlink = cache.Path.unlink

        def unlink(self, missing_ok=False):
            real_unlink(self, missing_ok=missing_ok)
            unlinked.append(self)
            if len(unlinked) == 3:
                die()

        cache.Path.unlink = unlink
    else:
        raise SystemExit(f"unknown point {point!r}")
    store = EmbeddingCache(folder)
    for key in UNIVERSE:
        if key not in store:
            store.put([key], vector(key)[None])
    raise SystemExit("stored every key and no merge ran")


def main() -> None:
    if sys.argv[1] == "kill-merge":
        kill_merge(sys.argv[2], sys.argv[3])
        return
    folder, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        cache = EmbeddingCache(folder)
        keys = [UNIVERSE[i] for i in rng.choice(len(UNIVERSE), size=60, replace=False)]
        missing = [k for k in keys if k not in cache]
        for start in range(0, len(missing), batch):
            part = missing[start:start + batch]
            cache.put(part, np.stack([vector(k) for k in part]))
        got = cache.get(keys, DIM)
        expected = np.stack([vector(k) for k in keys])
        if not np.array_equal(got, expected):
            raise SystemExit(f"round {r}: vectors read back differ from those stored")
        sys.stdout.write(json.dumps({"round": r, "stored": len(missing), "read": len(keys)}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
