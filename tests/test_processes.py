"""Embedding in sentence-transformers' multi-process pool (--processes / --devices): the same vectors and the same
cache as one process, the pool stopped afterwards, and bad settings refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adapter.backends import pool_devices
from adapter.encoder import Encoder, load_model
from adapter.errors import AdapterError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["valve", "hydrant", "chlorine", "meter", "sewer", "pipe", "pump", "reservoir", "lead", "crew"]
TEXTS = [f"{WORDS[i % 10]} {WORDS[(i * 7) % 10]} report {i}" + " and more" * (i % 5) for i in range(200)]


def _spy_pool(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every pool start and stop (on the class: the model itself is pickled to the workers; the real methods
    still run)."""
    from sentence_transformers import SentenceTransformer

    calls: list[str] = []
    start, stop = SentenceTransformer.start_multi_process_pool, SentenceTransformer.stop_multi_process_pool

    def started(self, devices):
        calls.append("start:" + ",".join(devices))
        return start(self, devices)

    def stopped(pool):
        calls.append("stop")
        stop(pool)

    monkeypatch.setattr(SentenceTransformer, "start_multi_process_pool", started)
    monkeypatch.setattr(SentenceTransformer, "stop_multi_process_pool", staticmethod(stopped))
    return calls


def test_two_processes_give_the_vectors_and_cache_of_one(tiny_model_dir, tmp_path, monkeypatch):
    one = Encoder(str(tiny_model_dir), cache_dir=tmp_path / "one", batch_size=4, show_progress=False)
    model = load_model(str(tiny_model_dir))
    calls = _spy_pool(monkeypatch)
    two = Encoder(model, cache_dir=tmp_path / "two", batch_size=4, show_progress=False, processes=2,
                  pool_min_texts=100)
    assert one.fingerprint == two.fingerprint  # the same model: the same cache folder name
    expected = one.encode_documents(TEXTS)
    got = two.encode_documents(TEXTS)
    assert calls == ["start:cpu,cpu", "stop"]  # the pool really ran, and was stopped
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert one.texts_encoded == two.texts_encoded == len(TEXTS)
    # 200 texts in parts of 4 x 16 = 64: four shards either way (two rounds of one part per worker)
    shards = [sorted(p.name for p in e.cache.folder.glob("*.shard")) for e in (one, two)]
    assert len(shards[0]) == len(shards[1]) == 4
    keys = two._keys(TEXTS, "document")
    assert len(one.cache) == len(two.cache) == len(TEXTS) and two.cache.contains(keys).all()
    np.testing.assert_allclose(two.cache.get(keys, two.dim), one.cache.get(keys, one.dim), atol=1e-5)
    # a rerun reads everything from the cache and starts no pool
    again = Encoder(model, cache_dir=tmp_path / "two", batch_size=4, show_progress=False, processes=2,
                    pool_min_texts=100)
    np.testing.assert_array_equal(again.encode_documents(TEXTS), got)
    assert again.texts_encoded == 0 and calls == ["start:cpu,cpu", "stop"]


def test_a_job_below_pool_min_texts_stays_in_process(tiny_model_dir, tmp_path, monkeypatch):
    model = load_model(str(tiny_model_dir))
    calls = _spy_pool(monkeypatch)
    enc = Encoder(model, cache_dir=tmp_path, batch_size=4, show_progress=False, processes=2, pool_min_texts=100)
    enc.encode_queries(TEXTS[:99])
    assert calls == [] and enc.texts_encoded == 99


def test_pool_settings_are_checked():
    assert pool_devices() is None and pool_devices(processes=1) is None
    assert pool_devices(processes=3) == ["cpu"] * 3
    assert pool_devices(devices="cpu,cpu") == ["cpu", "cpu"]
    assert pool_devices(devices=("cpu",)) is None  # one device: the model runs there, no pool
    for kwargs, message in [({"processes": 0}, "encoder.processes must be at least 1, got 0"),
                            ({"processes": 2, "devices": "cpu,cpu"}, "not both"),
                            ({"devices": "cpu,gpu:x"}, "'gpu:x' is not a torch device"),
                            ({"devices": "cpu,"}, "'' is not a torch device"),
                            ({"devices": "cuda:0,cuda:99"}, "cuda")]:
        with pytest.raises(AdapterError, match=message):
            pool_devices(**kwargs)


def test_processes_with_an_openai_model_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="apply to local models"):
        Encoder("openai:some-model", cache_dir=tmp_path, processes=2, base_url="http://127.0.0.1:9/v1")


def test_the_cli_refuses_bad_pool_settings_in_one_line(tiny_dataset, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), "embed", str(tiny_dataset), "--cache-dir",
                               str(tmp_path), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)

    bad = run("--set", "encoder.devices=cpu,bogus")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "'bogus' is not a torch device" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    zero = run("--set", "encoder.processes=0")
    assert zero.returncode != 0 and "Traceback" not in zero.stderr and "encoder.processes" in zero.stderr


KILLED_MID_POOL = """
import os, signal, sys
from adapter.encoder import Encoder
texts = [f"pump {i} report" for i in range(200)]

def parent(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return None

def killed(rows, vectors):  # the first finished part: name the children, then die as the OOM killer kills
    kids = [p for p in os.listdir("/proc") if p.isdigit() and parent(p) == str(os.getpid())]
    print(" ".join(kids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

enc = Encoder(sys.argv[1], cache_dir=sys.argv[2], batch_size=4, show_progress=False, processes=2, pool_min_texts=100)
enc.backend.embed(texts, on_batch=killed)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc (Linux)")
def test_workers_do_not_outlive_a_killed_parent(tiny_model_dir, tmp_path):
    """sentence-transformers' workers wait on their queue forever; after a SIGKILL of the process that started them,
    the pool's watchdog kills them within seconds instead of leaving them holding the model."""
    import time

    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as o, err.open("w") as e:  # files, not pipes: orphaned workers would hold a pipe open
        run = subprocess.run([sys.executable, "-c", KILLED_MID_POOL, str(tiny_model_dir), str(tmp_path / "cache")],
                             stdout=o, stderr=e, cwd=ROOT, timeout=300)
    assert run.returncode == -9, err.read_text()[-2000:]
    pids = [int(p) for p in out.read_text().split()]
    assert len(pids) >= 3  # two workers and the watchdog
    deadline = time.monotonic() + 20
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if running(p)]
    assert not alive, f"still running after the parent's SIGKILL: {alive}"
