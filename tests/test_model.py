import json
import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save as save_tensors

from adapter.errors import AdapterError
from adapter.model import FORMAT_VERSION, LinearAdapter
from cli import main

BASE = "all-MiniLM-L6-v2@7cfb2e751f04"


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("rank", [None, 4])
def test_untrained_adapter_is_exactly_identity(rank):
    x = unit_rows(10, 16)
    a = LinearAdapter.identity(16, BASE, rank=rank, bias=True)
    if rank is None:
        np.testing.assert_array_equal(a.weight, np.eye(16))
    else:
        np.testing.assert_array_equal(a.V, 0)  # so x + (xU)V == x whatever U is
    np.testing.assert_array_equal(a.bias, 0)
    np.testing.assert_allclose(a.apply(x), x, atol=1e-7)  # only renormalisation rounding


def test_identity_scores_exactly_base():
    from adapter.evaluate import evaluate

    corpus, queries = unit_rows(50, 16, 1), unit_rows(20, 16, 2)
    cids, qids = [f"c{i}" for i in range(50)], [f"q{i}" for i in range(20)]
    qrels = {q: {cids[i * 2]: 1} for i, q in enumerate(qids)}
    adapted = LinearAdapter.identity(16, BASE).apply(queries)
    assert evaluate(adapted, corpus, qrels, qids, cids) == evaluate(queries, corpus, qrels, qids, cids)


@pytest.mark.parametrize("rank, dtype", [(None, "float32"), (3, "float32"), (None, "float16")])
def test_save_load_round_trip(tmp_path, rank, dtype):
    a = LinearAdapter.identity(8, BASE, rank=rank, bias=True)
    rng = np.random.default_rng(0)
    for t in a.tensors().values():
        t += rng.normal(scale=0.1, size=t.shape).astype(np.float32)
    a.metadata = {"best_epoch": 3, "val_best": {8: {"ndcg@10": 0.5}}}  # dims stay ints through the JSON
    path = a.save(tmp_path / "a.safetensors", dtype=dtype)
    b = LinearAdapter.load(path)
    assert (b.form, b.rank, b.dim, b.base_model) == (a.form, a.rank, 8, BASE)
    assert b.metadata == a.metadata
    x = unit_rows(5, 8)
    np.testing.assert_allclose(b.apply(x), a.apply(x), atol=1e-3 if dtype == "float16" else 1e-7)
    np.testing.assert_allclose(np.linalg.norm(b.apply(x), axis=1), 1.0, rtol=1e-6)


def test_low_rank_form_matches_its_definition():
    a = LinearAdapter.identity(6, BASE, rank=2)
    a.V = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
    x = unit_rows(3, 6)
    y = x + (x @ a.U) @ a.V
    np.testing.assert_allclose(a.apply(x), y / np.linalg.norm(y, axis=1, keepdims=True), rtol=1e-5)


def write_raw(path, tensors: dict, header: dict | None) -> None:
    meta = None if header is None else {"adapter": json.dumps(header)}
    path.write_bytes(save_tensors(tensors, metadata=meta))


def good_header(**over):
    return {"format_version": FORMAT_VERSION, "base_model": BASE, "dim": 4, "form": "full", "rank": None,
            "bias": False, **over}


@pytest.mark.parametrize("case, words", [
    ("truncated", "not a readable safetensors file"),
    ("garbage", "not a readable safetensors file"),
    ("no-metadata", "not an adapter file"),
    ("version", "format version 99 is not supported"),
    ("shape", "has shape (4, 3), metadata says (4, 4)"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("extra-key", "unexpected tensors ['extra']"),
    ("dtype", "dtype int32"),
    ("bad-json", "metadata is damaged"),
])
def test_load_refuses_bad_files(tmp_path, case, words):
    path = tmp_path / "bad.safetensors"
    eye = np.eye(4, dtype=np.float32)
    if case == "truncated":
        LinearAdapter.identity(4, BASE).save(path)
        path.write_bytes(path.read_bytes()[:-7])
    elif case == "garbage":
        path.write_bytes(struct.pack("<Q", 12) + b"not json at all")
    elif case == "no-metadata":
        write_raw(path, {"weight": eye}, None)
    elif case == "version":
        write_raw(path, {"weight": eye}, good_header(format_version=99))
    elif case == "shape":
        write_raw(path, {"weight": eye[:, :3].copy()}, good_header())
    elif case in ("nan", "inf"):
        bad = eye.copy()
        bad[1, 2] = np.nan if case == "nan" else np.inf
        write_raw(path, {"weight": bad}, good_header())
    elif case == "extra-key":
        write_raw(path, {"weight": eye, "extra": eye}, good_header())
    elif case == "dtype":
        write_raw(path, {"weight": eye.astype(np.int32)}, good_header())
    elif case == "bad-json":
        path.write_bytes(save_tensors({"weight": eye}, metadata={"adapter": "{nope"}))
    with pytest.raises(AdapterError, match=str(path.name)) as e:
        LinearAdapter.load(path)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_wrong_dimension_and_other_model_are_refused():
    a = LinearAdapter.identity(4, BASE)
    with pytest.raises(AdapterError, match="expects 4-dimensional vectors, got 3"):
        a.apply(np.ones((2, 3), np.float32))
    with pytest.raises(AdapterError, match="trained on .* not tiny@abc; pass --allow-other-model"):
        a.check_base_model("tiny@abc")
    a.check_base_model("tiny@abc", allow_other_model=True)  # explicit override: allowed
    a.check_base_model("some-local-path@7cfb2e751f04")  # same weights under another name: fine


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    LinearAdapter.identity(4, BASE).save(path)
    before = path.read_bytes()
    import adapter.model as model

    monkeypatch.setattr(model, "save_tensors", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        LinearAdapter.identity(4, BASE, bias=True).save(path, force=True)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("case", ["truncated", "other-format", "nan", "other-model", "wrong-dim"])
def test_cli_refuses_bad_adapter_in_one_line(tiny_dataset, tmp_path, case):
    path = tmp_path / "a.safetensors"
    if case == "other-model":
        LinearAdapter.identity(384, "another-model@0123456789ab").save(path)
    elif case == "wrong-dim":
        LinearAdapter.identity(256, BASE).save(path)
    elif case == "truncated":
        LinearAdapter.identity(384, BASE).save(path)
        path.write_bytes(path.read_bytes()[:1000])
    elif case == "other-format":
        path.write_text("this is a text file, not an adapter")
    else:
        w = np.eye(384, dtype=np.float32)
        w[0, 0] = np.nan
        write_raw(path, {"weight": w}, good_header(dim=384))
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["evaluate", str(tiny_dataset), "--adapter", str(path), "--json", str(out)])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert not out.exists()
    if case == "other-model":
        assert "trained on another-model@0123456789ab" in r.output and "--allow-other-model" in r.output
    if case == "wrong-dim":
        assert "256-dimensional, the model 384" in r.output


def test_a_version_1_file_is_refused_in_one_line_naming_file_and_version(tmp_path):
    """Version-1 files (flat validation metrics) are no longer upgraded in memory: re-train them."""
    rows = [{"epoch": 0, "loss": None, "ndcg@10": 0.4}, {"epoch": 1, "loss": 0.3, "ndcg@10": 0.5}]
    header = good_header(format_version=1, val_base={"ndcg@10": 0.4}, val_adapter={"ndcg@10": 0.5}, history=rows,
                         config={"loss": "triplet"}, best_epoch=1)
    write_raw(tmp_path / "v1.safetensors", {"weight": np.eye(4, dtype=np.float32)}, header)
    with pytest.raises(AdapterError) as e:
        LinearAdapter.load(tmp_path / "v1.safetensors")
    assert str(e.value) == (f"{tmp_path / 'v1.safetensors'}: adapter format version 1 is not supported (this version "
                            "of adapter reads 2); re-train with this version")


# ---------------------------------------------------------------------------------------------------------- audit #24


def sparse_file(path, header: dict, name: str, shape: tuple[int, ...], dtype: str = "F32") -> None:
    """A safetensors file whose header declares one big tensor while the file holds none of its bytes on disk: its
    length is set with truncate, so it is all holes (a few KiB used)."""
    nbytes = int(np.prod(shape)) * (2 if dtype.endswith("16") else 4)
    head = json.dumps({"__metadata__": {"adapter": json.dumps(header)},
                       name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + nbytes)


def test_shapes_are_checked_from_the_header_before_any_tensor_is_read(tmp_path):
    """Audit #24.4: a sparse file declaring 8000x8000 (256 MB, 4 KiB on disk) was read whole before its shape was
    compared with the metadata's dim; now nothing of it is allocated."""
    import tracemalloc

    path = tmp_path / "sparse.safetensors"
    sparse_file(path, good_header(dim=384), "weight", (8000, 8000))
    tracemalloc.start()
    try:
        with pytest.raises(AdapterError, match=r"has shape \(8000, 8000\), metadata says \(384, 384\)"):
            LinearAdapter.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak:,} bytes allocated to refuse it"


@pytest.mark.parametrize("case, words", [
    ("bf16", "dtype bfloat16, expected float32 or float16"),
    ("nested", "nested 100000 levels deep"),
    ("history", "'history' is not"),
    ("history-rows", "'history' is not"),
    ("estimates", "'estimates' is not"),
    ("coverage", "'coverage' is not"),
    ("val-best", "'val_best' is not"),
    ("train-seconds", "'train_seconds' is not"),
    ("v1-history", "format version 1 is not supported (this version of adapter reads 2); re-train with this version"),
    ("dim-string", "dim, base_model or bias"),
])
def test_damaged_headers_are_one_line_errors(tmp_path, case, words):
    """Audit #24.8: a BF16 tensor was a TypeError, metadata nested 10^5 deep a RecursionError; wrong-typed history
    or estimates loaded, then failed inside `compare` or `search`'s summary."""
    path = tmp_path / "bad.safetensors"
    eye = np.eye(4, dtype=np.float32)
    bad = {"history": {"loss": "x", "val": 3}, "history-rows": {"loss": [], "val": [{"epoch": 1, "ndcg@10": 0.5}]},
           "estimates": [1, 2], "coverage": {"chunks": "many"}, "val-best": {"4": 0.5}, "train-seconds": "long"}
    if case == "bf16":
        sparse_file(path, good_header(), "weight", (4, 4), dtype="BF16")
    elif case == "nested":
        path.write_bytes(save_tensors({"weight": eye}, metadata={"adapter": "[" * 100_000 + "]" * 100_000}))
    elif case == "v1-history":
        write_raw(path, {"weight": eye}, good_header(format_version=1, history=[1, 2]))
    elif case == "dim-string":
        write_raw(path, {"weight": eye}, good_header(dim="4"))
    else:
        key = {"history-rows": "history", "val-best": "val_best", "train-seconds": "train_seconds"}.get(case, case)
        write_raw(path, {"weight": eye}, good_header(**{key: bad[case]}))
    with pytest.raises(AdapterError, match=str(path.name)) as e:
        LinearAdapter.load(path)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def trained(dim: int, seed: int) -> LinearAdapter:
    a = LinearAdapter.identity(dim, BASE, bias=True)
    a.weight = a.weight + np.random.default_rng(seed).normal(scale=0.1, size=(dim, dim)).astype(np.float32)
    a.metadata = {"best_epoch": 3, "train_seconds": 1.5}
    return a


def test_a_same_size_rewrite_caught_half_way_is_not_loaded(tmp_path):
    """Audit #24.6: `rsync --inplace` of a new adapter over the old one, caught half way, loaded as neither; the
    checksum of the tensors in the header refuses it (its first half is the new header, the rest the old data)."""
    old = trained(64, 0).save(tmp_path / "old.safetensors")
    new = trained(64, 1).save(tmp_path / "new.safetensors")
    a, b = old.read_bytes(), new.read_bytes()
    assert len(a) == len(b) and a != b
    live = tmp_path / "live.safetensors"
    live.write_bytes(a)
    with open(live, "r+b") as f:  # in place, as rsync --inplace writes
        f.write(b[:len(b) // 2])
    with pytest.raises(AdapterError, match="do not match the checksum"):
        LinearAdapter.load(live)
    with open(live, "r+b") as f:
        f.write(b)  # the rewrite finished: the new adapter loads
    np.testing.assert_array_equal(LinearAdapter.load(live).weight, LinearAdapter.load(new).weight)


def test_a_file_written_while_it_is_read_is_not_loaded(tmp_path, monkeypatch):
    """Audit #24.6: a file changed between the start and the end of the read is refused, even one without the
    checksum (written before it existed): its stat differs."""
    import adapter.model as model

    path = tmp_path / "a.safetensors"
    a = trained(8, 0)
    header = {"format_version": FORMAT_VERSION, "base_model": BASE, "dim": 8, "form": "full", "rank": None,
              "bias": True, **a.metadata}
    write_raw(path, a.tensors(), header)  # an older file: no checksum
    real = model.safe_open

    class Writer:  # a writer that touches the file while its tensors are read
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_tensor(self, name):
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
            return self.inner.get_tensor(name)

    monkeypatch.setattr(model, "safe_open", Writer)
    with pytest.raises(AdapterError, match="changed while it was read"):
        LinearAdapter.load(path)
    monkeypatch.undo()
    assert LinearAdapter.load(path).dim == 8  # unchanged since: it loads


def test_a_full_disk_on_save_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """Audit #24.8: ENOSPC on `train --out` was a traceback."""
    import errno

    import adapter.data

    path = trained(8, 0).save(tmp_path / "a.safetensors")
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(adapter.data.os, "replace", full)
    with pytest.raises(AdapterError, match="No space left on device") as e:
        trained(8, 1).save(path, force=True)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
