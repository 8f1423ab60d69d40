import json
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


def test_a_version_1_file_still_loads_with_its_metadata_in_the_shared_schema(tmp_path):
    rows = [{"epoch": 0, "loss": None, "ndcg@10": 0.4}, {"epoch": 1, "loss": 0.3, "ndcg@10": 0.5}]
    header = good_header(format_version=1, val_base={"ndcg@10": 0.4}, val_adapter={"ndcg@10": 0.5}, history=rows,
                         config={"loss": "triplet"}, best_epoch=1)
    write_raw(tmp_path / "v1.safetensors", {"weight": np.eye(4, dtype=np.float32)}, header)
    meta = LinearAdapter.load(tmp_path / "v1.safetensors").metadata
    assert meta["val_base"] == {4: {"ndcg@10": 0.4}} and meta["val_best"] == {4: {"ndcg@10": 0.5}}
    assert meta["history"] == {"loss": [{"epoch": 1, "loss": 0.3}],
                               "val": [{"epoch": 0, "ndcg@10": {4: 0.4}}, {"epoch": 1, "ndcg@10": {4: 0.5}}]}
    assert meta["best_epoch"] == 1 and "val_adapter" not in meta
