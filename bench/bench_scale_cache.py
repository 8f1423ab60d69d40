"""The embedding cache at 10^7 keys (issue #14): open time, memory beyond the vectors read, reading random vectors.

    python bench/bench_scale_cache.py [--keys 10000000] [--dim 384] [--reads 100000] [--folder DIR] [--keep]

Writes a synthetic cache of ``--keys`` keys in shards of 10^6 with the cache's own shard writer (``write_shard``:
sorted keys, fsync, rename), then measures in fresh processes (one per row of the table):

- ``EmbeddingCache(folder)``: wall time, and growth of the process's resident memory (anonymous and file-backed,
  from /proc/self/status);
- ``get`` of ``--reads`` random keys (seeded), checked row by row (column 0 of each stored vector is its key's index):
  wall time and resident growth, against the bytes of vectors actually read (the returned array, and the file pages
  their rows lie on);
- ``contains`` of the same keys and of as many absent ones (the encoder's check before embedding);
- ``put`` of 1,000 new keys into the full cache (a write rewrites nothing else);
- Python's own allocations (tracemalloc peak) over open + get, in a separate run (it slows allocation);
- the disk's floor for the cold read: the same rows read with ``os.pread`` from 32 threads, no cache code; and the
  cold read without the cache's prefetch (``madvise(WILLNEED)`` of every row's pages before copying them).

"cold" runs evict the cache's files from the page cache first (posix_fadvise DONTNEED on those files only, so the
reads go to the disk); "warm" runs follow at once. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapter.cache import HEADER_BYTES, SUFFIX, EmbeddingCache, write_shard  # noqa: E402

SHARD_ROWS = 1_000_000
MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix: synthetic keys as a pure function of their index, uniform like real hashes."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & MASK
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def key_columns(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) of the synthetic keys of ``index``."""
    index = index.astype(np.uint64)
    return splitmix64(2 * index), splitmix64(2 * index + np.uint64(1))


def key_bytes(index: np.ndarray) -> list[bytes]:
    hi, lo = key_columns(index)
    raw = np.stack([hi.astype("<u8"), lo.astype("<u8")], axis=1).tobytes()
    return [raw[i:i + 16] for i in range(0, len(raw), 16)]


def evict(folder: Path) -> None:
    """Drop the cache's own files from the page cache (other processes' pages are untouched)."""
    for path in folder.glob(f"*{SUFFIX}"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build(folder: Path, keys: int, dim: int) -> dict:
    folder.mkdir(parents=True)
    block = np.random.default_rng(0).standard_normal((4096, dim)).astype(np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    start = time.perf_counter()
    for first in range(0, keys, SHARD_ROWS):
        index = np.arange(first, min(first + SHARD_ROWS, keys), dtype=np.int64)
        hi, lo = key_columns(index)
        order = np.lexsort((lo, hi))
        index = index[order]

        def rows_of(a: int, b: int, index=index) -> np.ndarray:
            out = block[index[a:b] % len(block)]
            out[:, 0] = index[a:b]  # column 0 names the key: reads are checked against it
            return out

        write_shard(folder, hi[order], lo[order], rows_of, dim)
        evict(folder)  # do not flood the shared machine's page cache
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.glob(f"*{SUFFIX}"))
    return {"seconds": seconds, "bytes": size, "shards": len(list(folder.glob(f"*{SUFFIX}")))}


def rss() -> dict[str, int]:
    """Resident memory of this process in bytes: anonymous (heap, arrays) and file-backed (mapped file pages)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) * 1024
    return out


def vector_pages(cache: EmbeddingCache, keys: list[bytes]) -> int:
    """Bytes of the file pages the rows of ``keys`` lie on (what reading them must bring in, at least)."""
    shard_of, row_of = cache._locate(keys, cache._shards)
    pages = 0
    for s in np.unique(shard_of).tolist():
        shard = cache._shards[s]
        rows = row_of[shard_of == s]
        at = HEADER_BYTES + 16 * shard.rows + rows * 4 * shard.dim
        first, last = at // mmap.PAGESIZE, (at + 4 * shard.dim - 1) // mmap.PAGESIZE
        pages += len(np.union1d(first, last))
    return pages * mmap.PAGESIZE


def measure(folder: Path, keys: int, dim: int, reads: int, trace: bool, prefetch: bool = True) -> dict:
    """One fresh process's open and read (called through a subprocess)."""
    import tracemalloc

    import adapter.cache

    if not prefetch:  # the ablation: every page read by its own fault, one after another
        adapter.cache.PREFETCH_ROWS = reads

    index = np.random.default_rng(1).choice(keys, size=reads, replace=False)
    wanted = key_bytes(index)
    absent = key_bytes(np.arange(keys, keys + reads))
    if trace:
        tracemalloc.start()
    base = rss()
    t0 = time.perf_counter()
    cache = EmbeddingCache(folder)
    t_open = time.perf_counter() - t0
    after_open = rss()
    t0 = time.perf_counter()
    vectors = cache.get(wanted, dim)
    t_get = time.perf_counter() - t0
    after_get = rss()
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    if trace:
        tracemalloc.stop()
    assert np.array_equal(vectors[:, 0], index.astype(np.float32)), "a read returned another key's vector"
    t0 = time.perf_counter()
    present = cache.contains(wanted)
    t_hit = time.perf_counter() - t0
    t0 = time.perf_counter()
    missing = cache.contains(absent)
    t_miss = time.perf_counter() - t0
    assert present.all() and not missing.any()
    return {"open_s": t_open, "get_s": t_get, "contains_hit_s": t_hit, "contains_miss_s": t_miss,
            "shards": len(cache._shards),
            "open_anon": after_open["RssAnon"] - base["RssAnon"], "open_file": after_open["RssFile"] - base["RssFile"],
            "get_anon": after_get["RssAnon"] - base["RssAnon"], "get_file": after_get["RssFile"] - base["RssFile"],
            "returned": vectors.nbytes, "vector_pages": vector_pages(cache, wanted), "tracemalloc_peak": peak}


def measure_floor(folder: Path, keys: int, reads: int) -> dict:
    """The disk's own floor for the same read: the rows located first, then the cache's files evicted, then each
    row read by ``os.pread`` from 32 threads (no cache code, as many reads in flight as the disk takes)."""
    from concurrent.futures import ThreadPoolExecutor

    index = np.random.default_rng(1).choice(keys, size=reads, replace=False)
    cache = EmbeddingCache(folder)
    shard_of, row_of = cache._locate(key_bytes(index), cache._shards)
    jobs = []
    for s in np.unique(shard_of).tolist():
        shard = cache._shards[s]
        fd = os.open(shard.path, os.O_RDONLY)
        size = 4 * shard.dim
        at = HEADER_BYTES + 16 * shard.rows + np.sort(row_of[shard_of == s]) * size
        jobs += [(fd, size, int(a)) for a in at]
    evict(folder)

    def work(part: list[tuple[int, int, int]]) -> int:
        return sum(len(os.pread(fd, size, at)) for fd, size, at in part)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        got = sum(pool.map(work, [jobs[i::256] for i in range(256)]))
    seconds = time.perf_counter() - t0
    assert got == sum(size for _, size, _ in jobs)
    return {"floor_s": seconds}


def measure_disk(where: Path, seconds: int = 8) -> dict | None:
    """The disk itself, beneath any page cache: fio's random 4 KB reads with O_DIRECT at queue depths 1, 32 and 128
    over a 4 GB file next to the cache (None when fio is not installed: `apt-get install fio`)."""
    if shutil.which("fio") is None:
        return None
    path = where / "bench-scale-cache-fio.dat"
    out = {}
    try:
        subprocess.run(["fio", "--name=lay", f"--filename={path}", "--size=4G", "--rw=write", "--bs=1M",
                        "--direct=1", "--output-format=terse"], capture_output=True, check=True)
        for depth in (1, 32, 128):
            r = subprocess.run(["fio", "--name=r", f"--filename={path}", "--size=4G", "--rw=randread", "--bs=4k",
                                "--direct=1", "--ioengine=libaio", f"--iodepth={depth}", f"--runtime={seconds}",
                                "--time_based", "--output-format=json"], capture_output=True, text=True, check=True)
            out[depth] = json.loads(r.stdout)["jobs"][0]["read"]["iops"]
    finally:
        path.unlink(missing_ok=True)
    return out


def measure_put(folder: Path, keys: int, dim: int) -> dict:
    before = {p.name: p.stat().st_ino for p in folder.glob(f"*{SUFFIX}")}
    cache = EmbeddingCache(folder)
    new = key_bytes(np.arange(keys + 10**6, keys + 10**6 + 1000))
    t0 = time.perf_counter()
    cache.put(new, np.ones((1000, dim), np.float32))
    seconds = time.perf_counter() - t0
    after = {p.name: p.stat().st_ino for p in folder.glob(f"*{SUFFIX}")}
    kept = all(after.get(name) == ino for name, ino in before.items())
    return {"put_s": seconds, "shards_before": len(before), "shards_after": len(after), "untouched": kept}


def child(args: argparse.Namespace, what: str, trace: bool = False, prefetch: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--folder", str(args.folder), "--keys", str(args.keys),
           "--dim", str(args.dim), "--reads", str(args.reads)] + (["--trace"] if trace else []) + \
        ([] if prefetch else ["--no-prefetch"])
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.splitlines()[-1])


def print_disk(iops: dict | None, pages: int, what: str = "pages") -> None:
    if iops is None:
        print("\nThe disk's own random-read rate: not measured (fio is not installed).")
        return
    rates = ", ".join(f"queue depth {d}: {v:,.0f}" for d, v in iops.items())
    print(f"\nThe disk's own random 4 KB reads per second (fio, O_DIRECT, libaio; beneath the page cache): {rates}. "
          f"At the best of these, {pages:,} {what} take {pages / max(iops.values()):.2f} s.")


def mb(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--reads", type=int, default=100_000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bench-scale-cache"))
    parser.add_argument("--keep", action="store_true", help="keep the cache (and reuse it if it is there)")
    parser.add_argument("--disk", action="store_true", help="only the disk's own random-read rate (fio)")
    parser.add_argument("--child", choices=["measure", "put", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "measure":
        print(json.dumps(measure(args.folder, args.keys, args.dim, args.reads, args.trace, not args.no_prefetch)))
        return
    if args.child == "put":
        print(json.dumps(measure_put(args.folder, args.keys, args.dim)))
        return
    if args.child == "floor":
        print(json.dumps(measure_floor(args.folder, args.keys, args.reads)))
        return

    if args.disk:
        print_disk(measure_disk(args.folder.parent), args.reads, "random pages")
        return
    need = args.keys * (16 + 4 * args.dim)
    reuse = args.keep and args.folder.is_dir()
    if not reuse:
        if args.folder.exists():
            raise SystemExit(f"{args.folder}: exists; delete it or pass --keep to reuse it")
        free = shutil.disk_usage(args.folder.parent).free
        if free < need * 1.1:
            raise SystemExit(f"{args.folder.parent}: {free / 1e9:.1f} GB free, the cache needs {need / 1e9:.1f} GB; "
                             "pass a smaller --dim")
    try:
        built = None if reuse else build(args.folder, args.keys, args.dim)
        rows = []
        for label, cold, trace, prefetch in (
                ("cold", True, False, True), ("warm", False, False, True), ("cold", True, False, True),
                ("warm", False, False, True), ("warm, tracemalloc on", False, True, True),
                ("cold, without the prefetch (ablation)", True, False, False)):
            if cold:
                evict(args.folder)
            rows.append((label, child(args, "measure", trace, prefetch)))
        floor = child(args, "floor")
        put = child(args, "put")
        disk = measure_disk(args.folder.parent)
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)

    print(f"\nCache of {args.keys:,} synthetic keys, stored dimension {args.dim} "
          f"({need / 1e9:.1f} GB of keys and float32 vectors); reading {args.reads:,} random keys.\n")
    if built:
        print(f"Written in {built['seconds']:.0f} s ({built['bytes'] / 1e9:.1f} GB, {built['shards']} shards of "
              f"{SHARD_ROWS:,}, {built['bytes'] / built['seconds'] / 1e6:.0f} MB/s).\n")
    print("| page cache | open (s) | RSS growth after open, anon + file (MB) | get (s) | RSS growth after get, anon + "
          "file (MB) | of which vectors read: returned array + their file pages (MB) | beyond the vectors read (MB) "
          "| contains: present / absent keys (s) | tracemalloc peak (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, m in rows:
        grown = m["get_anon"] + m["get_file"]
        read = m["returned"] + m["vector_pages"]
        peak = "" if m["tracemalloc_peak"] is None else mb(m["tracemalloc_peak"])
        print(f"| {label} | {m['open_s']:.3f} | {mb(m['open_anon'])} + {mb(m['open_file'])} | {m['get_s']:.2f} | "
              f"{mb(m['get_anon'])} + {mb(m['get_file'])} | {mb(m['returned'])} + {mb(m['vector_pages'])} | "
              f"{mb(grown - read)} | {m['contains_hit_s']:.2f} / {m['contains_miss_s']:.2f} | {peak} |")
    print(f"\nThe disk's floor for the cold read: the same {args.reads:,} rows read with os.pread from 32 threads "
          f"after evicting the files (no cache code): {floor['floor_s']:.2f} s.")
    print_disk(disk, rows[0][1]["vector_pages"] // mmap.PAGESIZE, "distinct pages (what the read's rows lie on)")
    print(f"\nA put of 1,000 new keys into the full cache: {put['put_s']:.3f} s, shards {put['shards_before']} -> "
          f"{put['shards_after']}, every existing shard untouched: {put['untouched']}.")
    print(f"\n(machine: {os.cpu_count()} cores, shared; {json.dumps(vars(args), default=str)})")


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "scale_cache", children=("--child",))
