"""A process that uses one embedding cache as `adapter embed` does, with vectors a pure function of each key, for
tests/test_faults.py and bench/bench_faults.py:

    python tests/cache_worker.py FOLDER SEED ROUNDS [BATCH]

Each round opens the cache afresh, takes a seeded overlapping share of a fixed universe of keys, stores the missing
ones a few at a time (one shard per put, so merges happen often) and reads them all back, checking every vector.
Prints one JSON line per round: {"round", "stored", "read"}.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from adapter.cache import EmbeddingCache

DIM = 8
UNIVERSE = [hashlib.sha256(f"text {i}".encode()).digest()[:16] for i in range(400)]


def vector(key: bytes) -> np.ndarray:
    """What the 'model' embeds for a key: the same unit vector every time, in every process."""
    v = np.random.default_rng(int.from_bytes(key[:8], "little")).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def main() -> None:
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
