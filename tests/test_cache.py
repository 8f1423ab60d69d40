"""The embedding cache (adapter/cache.py): memory-mapped sorted shards that open in O(shards), a size-tiered merge
that never blocks readers, any number of concurrent processes, kill -9 at any point (a merge included), damaged
shards named, old ``.npz`` caches and version-1 shards refused; and where the cache lives (``cache_root``)."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import adapter.cache as cache
from adapter.cache import EmbeddingCache
from adapter.config import cache_root
from adapter.errors import AdapterError
from tests.cache_worker import DIM, UNIVERSE, vector
from tests.processes import kill_and_resume

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("cache_worker.py")
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}


def _vectors(keys):
    return np.stack([vector(k) for k in keys])


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.shard"))


def _put_one_by_one(store: EmbeddingCache, keys) -> None:
    for key in keys:
        store.put([key], _vectors([key]))


# ---------------------------------------------------------------------------------------------------------- round trip


def test_round_trip_in_any_order_across_shards_and_processes(tmp_path):
    folder = tmp_path / "cache"
    store = EmbeddingCache(folder)
    assert len(store) == 0 and UNIVERSE[0] not in store and not folder.exists()  # opening writes nothing
    store.put(UNIVERSE[:100], _vectors(UNIVERSE[:100]))
    store.put(UNIVERSE[100:150][::-1], _vectors(UNIVERSE[100:150][::-1]))  # unsorted input is sorted on write
    keys = random.Random(0).sample(UNIVERSE[:150], 150)
    np.testing.assert_array_equal(store.get(keys, DIM), _vectors(keys))
    fresh = EmbeddingCache(folder)
    assert len(fresh) == 150 and len(_shards(folder)) == 2
    np.testing.assert_array_equal(fresh.get(keys, DIM), _vectors(keys))
    assert list(fresh.contains(UNIVERSE[140:160])) == [True] * 10 + [False] * 10
    assert fresh.get([], DIM).shape == (0, DIM)
    fresh.verify()
    with pytest.raises(AdapterError, match="a cached vector vanished"):
        fresh.get(UNIVERSE[149:151], DIM)


def test_keys_sharing_their_first_eight_bytes_are_told_apart(tmp_path):
    keys = [b"\x01" * 8 + bytes([i]) * 8 for i in (9, 3, 7)] + [b"\x00" * 16, b"\xff" * 16]
    store = EmbeddingCache(tmp_path)
    store.put(keys, _vectors(keys))
    assert b"\x01" * 8 + b"\x05" * 8 not in store
    np.testing.assert_array_equal(EmbeddingCache(tmp_path).get(keys[::-1], DIM), _vectors(keys[::-1]))


def test_a_key_stored_twice_counts_once(tmp_path):
    a, b = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)  # two processes embedding the same text at once
    a.put(UNIVERSE[:10], _vectors(UNIVERSE[:10]))
    b.put(UNIVERSE[5:15], _vectors(UNIVERSE[5:15]))
    assert len(EmbeddingCache(tmp_path)) == 15


def test_opening_reads_headers_only_and_a_read_copies_only_its_rows(tmp_path):
    """No Python object per key: the shards are mapped, and what get returns is a copy, not a view of the map."""
    store = EmbeddingCache(tmp_path)
    store.put(UNIVERSE, _vectors(UNIVERSE))
    fresh = EmbeddingCache(tmp_path)
    (shard,) = fresh._shards
    assert isinstance(shard.hi, np.ndarray) and not shard.hi.flags.owndata  # a view of the mapped file
    out = fresh.get(UNIVERSE[:3], DIM)
    assert out.flags.owndata and out.flags.writeable


# ---------------------------------------------------------------------------------------------------------- merging


def test_merging_is_tiered_and_never_rewrites_the_whole_cache(tmp_path):
    """Past MAX_SHARDS a write merges the MERGE_WIDTH smallest shards: one big shard is never rewritten by a stream
    of small writes, and the folder stays at most MAX_SHARDS shards."""
    folder = tmp_path / "cache"
    store = EmbeddingCache(folder)
    store.put(UNIVERSE[:200], _vectors(UNIVERSE[:200]))
    (big,) = _shards(folder)
    inode = big.stat().st_ino
    most = 0
    for key in UNIVERSE[200:]:
        store.put([key], _vectors([key]))
        most = max(most, len(_shards(folder)))
    assert most == cache.MAX_SHARDS and big.exists() and big.stat().st_ino == inode
    assert any("-merged" in p.name for p in _shards(folder))
    fresh = EmbeddingCache(folder)
    assert len(fresh) == len(UNIVERSE)
    np.testing.assert_array_equal(fresh.get(UNIVERSE, DIM), _vectors(UNIVERSE))


def test_a_reader_survives_another_process_merging_its_shards(tmp_path):
    """#13 reproduction 2: a second process merged and deleted shards the first had indexed: FileNotFoundError."""
    folder = tmp_path / "cache"
    _put_one_by_one(EmbeddingCache(folder), UNIVERSE[:cache.MAX_SHARDS])
    reader = EmbeddingCache(folder)  # maps the 32 shards
    other = EmbeddingCache(folder)
    other.put([UNIVERSE[100]], _vectors([UNIVERSE[100]]))  # the 33rd: merges 8 and deletes them
    assert len(_shards(folder)) == cache.MAX_SHARDS - cache.MERGE_WIDTH + 2
    keys = UNIVERSE[:cache.MAX_SHARDS]
    np.testing.assert_array_equal(reader.get(keys, DIM), _vectors(keys))  # from the files it mapped
    more = keys + [UNIVERSE[100]]  # stored by the other process after the reader opened: the reader lists again
    np.testing.assert_array_equal(reader.get(more, DIM), _vectors(more))


def test_readers_and_writers_never_wait_for_a_merge(tmp_path, monkeypatch):
    """While another process holds the merge lock (a long merge), opening, reading and writing all go on; the
    write that passes MAX_SHARDS leaves the merge to the holder instead of waiting. Counted, not timed: every lock
    request the cache makes meanwhile must be non-blocking (a blocking one fails here instead of hanging)."""
    folder = tmp_path / "cache"
    _put_one_by_one(EmbeddingCache(folder), UNIVERSE[:cache.MAX_SHARDS])
    fd = os.open(folder / cache.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a separate open file description: conflicts as another process would
    requests, flock = [], fcntl.flock

    def nonblocking_only(fd: int, operation: int) -> None:
        requests.append(operation)
        assert operation & fcntl.LOCK_NB, "the cache waited for the lock another process holds"
        flock(fd, operation)

    monkeypatch.setattr(cache.fcntl, "flock", nonblocking_only)
    try:
        store = EmbeddingCache(folder)
        _put_one_by_one(store, UNIVERSE[cache.MAX_SHARDS:cache.MAX_SHARDS + 5])
        keys = UNIVERSE[:cache.MAX_SHARDS + 5]
        np.testing.assert_array_equal(store.get(keys, DIM), _vectors(keys))
        assert len(_shards(folder)) == cache.MAX_SHARDS + 5
        assert len(requests) == 5  # each write past MAX_SHARDS asked for the merge lock once, and went on without it
    finally:
        monkeypatch.undo()
        os.close(fd)
    store.put([UNIVERSE[200]], _vectors([UNIVERSE[200]]))  # the lock is free: this write merges
    assert len(_shards(folder)) == cache.MAX_SHARDS + 6 - cache.MERGE_WIDTH + 1


def test_two_processes_share_one_cache_past_the_merge_threshold(tmp_path):
    """#13: two processes, 20 rounds each, overlapping keys, a merge every few puts: no error, every vector read
    back equals the one stored, and a third process finds every key either stored."""
    folder = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(folder), str(seed), "20"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert len(out.splitlines()) == 20
    third = EmbeddingCache(folder)
    stored = {k for k in UNIVERSE if k in third}
    asked = set()  # every key either process asked for (and so found or stored), replayed from the seeds
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            asked |= {UNIVERSE[i] for i in rng.choice(len(UNIVERSE), size=60, replace=False)}
    assert stored == asked and len(third) == len(asked)  # no merge dropped what the other process had stored
    keys = sorted(stored)
    np.testing.assert_array_equal(third.get(keys, DIM), _vectors(keys))
    third.verify()


# ---------------------------------------------------------------------------------------------------------- kill -9


def _assert_whole(folder: Path) -> EmbeddingCache:
    store = EmbeddingCache(folder)  # opens: no half-written shard is ever visible
    keys = [k for k in UNIVERSE if k in store]
    np.testing.assert_array_equal(store.get(keys, DIM), _vectors(keys))
    store.verify()
    return store


def _kill_once_and_rerun(folder: Path, seed: int, n: int, log: Path) -> None:
    """A writer of 60 keys (one a shard) killed once ``n`` shard files have appeared; what the kill left opens whole,
    and the rerun stores exactly the keys the kill left out and the cache then holds every key asked for."""
    worker = [sys.executable, str(WORKER), str(folder), str(seed), "1", "1"]  # one round of 60 keys, one a shard
    seen, kept = set(), set()
    asked = {UNIVERSE[i] for i in np.random.default_rng(seed).choice(len(UNIVERSE), 60, replace=False)}

    def n_shards_written() -> bool:
        if folder.is_dir():
            seen.update(s.name for s in _shards(folder))
        return len(seen) >= n

    def the_kill_left_a_whole_cache() -> None:
        if folder.is_dir():
            store = _assert_whole(folder)
            kept.update(k for k in UNIVERSE if k in store)
        assert kept <= asked

    r = kill_and_resume(worker, n_shards_written, env=ENV, log=log, between=the_kill_left_a_whole_cache,
                        must_land=False, poll_s=0.001, polls=60_000, timeout=120)
    assert json.loads(r.stdout)["stored"] == len(asked - kept)  # exactly what was missing, nothing twice
    store = _assert_whole(folder)
    assert {k for k in UNIVERSE if k in store} == asked


def test_kill_9_at_random_points_leaves_a_cache_that_opens(tmp_path):
    """#13: a writer killed with SIGKILL once N shard files have appeared, N random over the run (a kill on a timer
    mostly landed before the first write): the cache opens with every stored vector right, and the same work run
    again stores exactly the keys the kill left out."""
    rng = random.Random(0)
    for seed in range(5):
        _kill_once_and_rerun(tmp_path / f"cache-{seed}", seed, rng.randint(1, 59), tmp_path / f"killed-{seed}.log")


@pytest.mark.parametrize("point", ["writing", "renamed", "unlinking"])
def test_kill_9_during_a_merge_loses_nothing(point, tmp_path):
    """Killed while writing the merged shard (a hidden temporary left), just after renaming it in (every shard it
    replaces still there), or between deletions: every key stored before the merge is read back, the cache opens,
    and the next write's merge folds any key held twice into one."""
    folder = tmp_path / "cache"
    p = subprocess.run([sys.executable, str(WORKER), "kill-merge", str(folder), point], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    stored = cache.MAX_SHARDS + 1  # the write that started the merge was whole before the merge began
    leftovers = list(folder.glob(".*.tmp"))
    merged = [s for s in _shards(folder) if "-merged" in s.name]
    if point == "writing":
        assert len(leftovers) == 1 and not merged and len(_shards(folder)) == stored
    else:
        assert not leftovers and len(merged) == 1
        assert len(_shards(folder)) == stored + 1 - (3 if point == "unlinking" else 0)
    store = _assert_whole(folder)
    assert len(store) == stored and all(k in store for k in UNIVERSE[:stored])
    _put_one_by_one(store, UNIVERSE[stored:stored + 8])  # later writes merge again, cleanly
    store = _assert_whole(folder)
    assert len(store) == stored + 8 and len(_shards(folder)) <= cache.MAX_SHARDS


# ---------------------------------------------------------------------------------------------------------- damage


def _damage(shard: Path, how: str) -> None:
    raw = bytearray(shard.read_bytes())
    if how == "bit flip":
        raw[-5] ^= 0xFF  # inside the vectors: only the CRC can tell
    elif how == "truncated":
        del raw[len(raw) // 2:]
    elif how == "header":
        raw[:20] = b"\x00" * 20
    elif how == "grown":
        raw += b"\x00" * 8
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "header", "grown", "not a shard"])
def test_a_damaged_shard_is_named_when_opened(how, tmp_path):
    """#13 reproduction 7: a damaged shard was a traceback that did not name the shard to delete."""
    EmbeddingCache(tmp_path).put(UNIVERSE[:4], _vectors(UNIVERSE[:4]))
    (shard,) = _shards(tmp_path)
    if how == "not a shard":
        shard.write_bytes(b"hello")
    else:
        _damage(shard, how)
    with pytest.raises(AdapterError, match=f"{shard.name}: damaged embedding cache shard .*; delete it") as e:
        EmbeddingCache(tmp_path)
    assert "\n" not in str(e.value)


def test_a_shard_of_another_dimension_is_named(tmp_path):
    EmbeddingCache(tmp_path).put(UNIVERSE[:4], np.zeros((4, DIM + 1), np.float32))
    (shard,) = _shards(tmp_path)
    with pytest.raises(AdapterError, match=f"{shard.name}: damaged .*dimension {DIM + 1}, expected {DIM}.*delete"):
        EmbeddingCache(tmp_path).get(UNIVERSE[:4], DIM)


def test_a_flipped_bit_is_named_by_verify_and_by_the_merge_that_reads_it(tmp_path):
    store = EmbeddingCache(tmp_path)
    _put_one_by_one(store, UNIVERSE[:cache.MAX_SHARDS])
    victim = _shards(tmp_path)[0]
    _damage(victim, "bit flip")
    store = EmbeddingCache(tmp_path)  # opens: the header and the size are right
    with pytest.raises(AdapterError, match=f"{victim.name}: damaged embedding cache shard \\(CRC mismatch\\)"):
        store.verify()
    with pytest.raises(AdapterError, match=f"{victim.name}: damaged .*CRC mismatch.*delete it"):
        store.put([UNIVERSE[300]], _vectors([UNIVERSE[300]]))  # the 33rd shard: the merge reads the victim whole
    assert victim.exists() and len(_shards(tmp_path)) == cache.MAX_SHARDS + 1  # nothing merged, nothing lost
    victim.unlink()  # as the message says
    store = EmbeddingCache(tmp_path)
    assert len(store) == cache.MAX_SHARDS and UNIVERSE[300] in store


def _write_v1(folder: Path, keys, vectors) -> Path:
    """A shard as version 1 wrote it (adapter/cache.py of #14: keys and vectors, no row checksums)."""
    import json
    import zlib

    folder.mkdir(parents=True, exist_ok=True)
    hi, lo = cache._split_keys(keys)
    order = cache._sorted_unique(hi, lo)  # the cache's key order
    body = hi[order].tobytes() + lo[order].tobytes() + np.asarray(vectors, "<f4")[order].tobytes()
    head = json.dumps({"format": cache.FORMAT, "version": 1, "rows": len(order), "dim": DIM,
                       "crc32": zlib.crc32(body)})
    path = folder / f"{time.time_ns()}-{os.getpid()}.shard"
    path.write_bytes(head.encode().ljust(cache.HEADER_BYTES - 1) + b"\n" + body)
    return path


def test_a_version_1_shard_is_refused_in_one_line_naming_it(tmp_path):
    """Version-1 shards (no row checksums) are no longer read: the shard and its version are named, and the way on."""
    shard = _write_v1(tmp_path, UNIVERSE[:50], _vectors(UNIVERSE[:50]))
    with pytest.raises(AdapterError) as e:
        EmbeddingCache(tmp_path)
    assert str(e.value) == (f"{shard}: embedding cache shard version 1, which this version of adapter does not read "
                            "(it reads 2); delete it and its texts are embedded again")


def test_damaged_vectors_are_named_when_read_not_returned(tmp_path):
    """Audit #24.6: damaged vectors in a shard were returned as they were (evaluate exited 0, base ndcg@10 0.60 ->
    0.11): the CRC was checked only on merge. Now each row read is checked against its checksum; the rows of a
    damaged shard are never returned."""
    keys = UNIVERSE[:50]
    EmbeddingCache(tmp_path).put(keys, _vectors(keys))
    (shard,) = _shards(tmp_path)
    raw = bytearray(shard.read_bytes())
    at = cache.HEADER_BYTES + 16 * 50 + 4 * DIM * 7 + 4 * 3  # row 7's fourth number
    raw[at:at + 4] = np.float32(0.5).tobytes()
    shard.write_bytes(bytes(raw))
    store = EmbeddingCache(tmp_path)  # opens: header and size are right
    with pytest.raises(AdapterError, match=f"{shard.name}: damaged embedding cache shard .*delete it") as e:
        store.get(keys, DIM)
    assert "\n" not in str(e.value)
    assert "row 7" in str(e.value)  # only the rows read are checked: the other 49 are whole
    hi, lo = cache._split_keys(keys)
    whole = [k for k, h, l_ in zip(keys, hi, lo, strict=True) if (h, l_) != (store._shards[0].hi[7],
                                                                        store._shards[0].lo[7])]
    assert len(whole) == 49
    np.testing.assert_array_equal(store.get(whole, DIM), _vectors(whole))


# ---------------------------------------------------------------------------------------------------------- old layout


def _write_npz(folder: Path, keys, vectors) -> Path:
    """A shard as the previous layout wrote it (adapter/cache.py before #14): keys (n, 16) uint8, vectors float32."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.time_ns()}-{os.getpid()}.npz"
    with open(path, "wb") as f:
        np.savez(f, keys=np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16),
                 vectors=np.asarray(vectors, np.float32))
    return path


def test_an_old_layout_cache_is_refused_in_one_line_and_left_as_it_is(tmp_path):
    """The ``.npz`` layout (before #14) is no longer migrated: the first old shard is named, nothing is touched."""
    old = [_write_npz(tmp_path, UNIVERSE[i:i + 10], _vectors(UNIVERSE[i:i + 10])) for i in range(0, 30, 10)]
    before = {p: p.read_bytes() for p in old}
    with pytest.raises(AdapterError) as e:
        EmbeddingCache(tmp_path)
    assert str(e.value) == (f"{sorted(old)[0]}: an embedding cache shard of the old layout (*.npz), which this version "
                            f"of adapter does not read; delete {tmp_path} and its texts are embedded again")
    assert {p: p.read_bytes() for p in old} == before and not _shards(tmp_path)


# ---------------------------------------------------------------------------------------------------------- the root


def test_the_cache_root_order(tmp_path, monkeypatch):
    """--cache-dir, else $ADAPTER_CACHE, else $XDG_CACHE_HOME/adapter, else ~/.cache/adapter; an empty variable and
    a relative $XDG_CACHE_HOME count as unset."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ADAPTER_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(tmp_path / "flag") == tmp_path / "flag"
    assert cache_root() == tmp_path / "env"
    monkeypatch.setenv("ADAPTER_CACHE", "")
    assert cache_root() == tmp_path / "xdg" / "adapter"
    monkeypatch.delenv("ADAPTER_CACHE")
    assert cache_root() == tmp_path / "xdg" / "adapter"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cache_root() == tmp_path / "home" / ".cache" / "adapter"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_root() == tmp_path / "home" / ".cache" / "adapter"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "adapter"


def test_the_encoder_caches_under_xdg_cache_home(tiny_model_dir, tmp_path, monkeypatch):
    from adapter.encoder import Encoder

    monkeypatch.delenv("ADAPTER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    enc = Encoder(str(tiny_model_dir), show_progress=False)
    enc.encode_documents(["burst main", "valve"])
    assert enc.cache.folder.parent == tmp_path / "xdg" / "adapter" / "embeddings"
    assert len(_shards(enc.cache.folder)) == 1
    again = Encoder(str(tiny_model_dir), show_progress=False)
    again.encode_documents(["valve"])
    assert again.texts_encoded == 0
