"""Bolting an adapter onto a FAISS index built by `adapter index build`, or the user's own: search through the CLI
against a brute-force computation, ids as stored, one-line errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from adapter.model import LinearAdapter
from cli import main
from tests.conftest import split_tiny


def random_adapter(dim: int, base_model: str, *, rank: int | None = None, seed: int = 0,
                   scale: float = 0.5) -> LinearAdapter:
    """An adapter far enough from the identity to reorder results: the identity plus seeded noise."""
    a = LinearAdapter.identity(dim, base_model, rank=rank, bias=True, seed=seed)
    rng = np.random.default_rng(seed + 1)
    if rank is None:
        a.weight += rng.normal(scale=scale * dim ** -0.5, size=a.weight.shape).astype(np.float32)
    else:
        a.V += rng.normal(scale=scale, size=a.V.shape).astype(np.float32)
    a.bias += rng.normal(scale=0.05, size=dim).astype(np.float32)
    return a


@pytest.fixture(scope="module")
def trained(tmp_path_factory, minilm):
    """The tiny dataset split by query, and an adapter file for MiniLM that reorders its results."""
    from adapter.encoder import Encoder

    folder = split_tiny(tmp_path_factory.mktemp("t") / "ds")
    out = folder.parent / "tiny-adapter.safetensors"
    random_adapter(384, Encoder(minilm, show_progress=False).identity).save(out)
    return folder, out, ""


def test_search_matches_brute_force(trained, tmp_path, minilm):
    from adapter.encoder import Encoder
    from adapter.export import AdaptedEncoder

    folder, out, _ = trained
    idx = tmp_path / "base.faiss"
    r = CliRunner().invoke(main, ["index", "build", str(folder), "--out", str(idx)])
    assert r.exit_code == 0, r.output
    query = "who fixes a broken pipe in the street"
    r = CliRunner().invoke(main, ["search", "--store", "faiss:" + str(idx), "--adapter", str(out), "-k", "4",
                                  "--json", query])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output.strip().splitlines()[-1])
    adapted = AdaptedEncoder(out, minilm)
    corpus = Encoder(minilm, show_progress=False).encode_documents(
        [json.loads(line)["text"] for line in (folder / "corpus.jsonl").read_text().splitlines()])
    np.testing.assert_allclose(adapted.encode_document(["x"]), minilm.encode_document(["x"], normalize_embeddings=True))
    scores = corpus @ adapted.encode_query([query])[0]
    assert got["ids"] == list(np.argsort(-scores, kind="stable")[:4])
    np.testing.assert_allclose(got["scores"], np.sort(scores)[::-1][:4], rtol=1e-5)
    base_scores = corpus @ minilm.encode_query([query], normalize_embeddings=True)[0]
    assert not np.allclose(scores, base_scores, atol=1e-3)  # the adapter really was applied
    r = CliRunner().invoke(main, ["search", "--store", "faiss:" + str(idx), "--adapter", str(out), "--data",
                                  str(folder), query])
    assert r.exit_code == 0 and "  1. id " in r.output and "sluice valves" in r.output


def test_search_keeps_the_index_own_ids(tmp_path, trained, minilm):
    from adapter.export import AdaptedEncoder
    from adapter.stores import read_index, search_index, write_index

    _, out, _ = trained
    vecs = minilm.encode_document(["burst main", "hydrant flushing", "lead pipes"], normalize_embeddings=True)
    write_index(vecs, tmp_path / "ids.faiss", ids=np.array([1001, 2002, 3003]))
    scores, ids = search_index(read_index(tmp_path / "ids.faiss"), AdaptedEncoder(out, minilm).encode_query(
        ["the main burst"]), k=3)
    assert set(ids[0]) == {1001, 2002, 3003} and ids[0][0] == 1001
    r = CliRunner().invoke(main, ["search", "--store", "faiss:" + str(tmp_path / "ids.faiss"), "--adapter", str(out),
                                  "--json",
                                  "the main burst"])
    assert r.exit_code == 0 and json.loads(r.output)["ids"] == [int(i) for i in ids[0]]


def test_search_bad_input(tmp_path, trained):
    _, out, _ = trained
    from adapter.stores import write_index

    write_index(np.eye(8, dtype=np.float32), tmp_path / "small.faiss")
    (tmp_path / "junk.faiss").write_text("junk")
    for idx, words in ((tmp_path / "small.faiss", "index holds 8-dimensional vectors, queries have 384"),
                       (tmp_path / "junk.faiss", "not a readable FAISS index")):
        r = CliRunner().invoke(main, ["search", "--store", "faiss:" + str(idx), "--adapter", str(out), "hello"])
        assert r.exit_code == 1 and words in r.output and r.output.count("\n") == 1, r.output


@pytest.mark.parametrize("value, fields", [
    ("faiss:runs/i.faiss", {"index": "runs/i.faiss"}),
    ("qdrant:http://localhost:6333/docs", {"qdrant": "http://localhost:6333", "collection": "docs"}),
    ("qdrant:./qdrant_data/docs", {"qdrant": "./qdrant_data", "collection": "docs"}),
    ("chroma:/srv/chroma/docs", {"chroma": "/srv/chroma", "collection": "docs"}),
    ("pgvector:postgresql://me@db:5432/app?sslmode=require/chunks",  # the DSN keeps its own slashes
     {"pgvector": "postgresql://me@db:5432/app?sslmode=require", "table": "chunks"}),
    ("pgvector:host=db dbname=app/chunks", {"pgvector": "host=db dbname=app", "table": "chunks"}),
    ("vectors:v.parquet", {"vectors": "v.parquet"}),
    ("vectors:dir,1/v.npy,ids.txt", {"vectors": "dir,1/v.npy", "ids": "ids.txt"}),
])
def test_store_option_grammar(value, fields):
    from adapter.corpus import StoreSource
    from cli import StoreSpec

    assert StoreSpec().convert(value, None, None) == StoreSource(**fields)


@pytest.mark.parametrize("value, words", [
    ("a.faiss", "expected KIND:WHERE, KIND one of faiss, qdrant, chroma, pgvector, vectors, got 'a.faiss'"),
    ("faiss:", "expected faiss:FILE, got 'faiss:'"),
    ("qdrant:db", "expected qdrant:PATH_OR_URL/COLLECTION, got 'qdrant:db'"),
    ("chroma:http://localhost:8000/", "expected chroma:PATH_OR_URL/COLLECTION"),
    ("pgvector:postgresql://bob:hunter2@db/app",
     "expected pgvector:DSN/TABLE (the table after the database), got 'pgvector:postgresql://bob:***@db/app'"),
    ("vectors:v.npy", "expected vectors:FILE.parquet or vectors:VECTORS.npy,IDS.txt, got 'vectors:v.npy'"),
])
def test_a_bad_store_is_one_line_naming_the_form(tmp_path, value, words):
    r = CliRunner().invoke(main, ["search", "--store", value, "--adapter", str(tmp_path / "a.safetensors"), "hello"])
    assert r.exit_code == 2 and "Invalid value for '--store'" in r.output and words in r.output, r.output
    assert "hunter2" not in r.output


def test_evaluate_reads_the_corpus_from_an_index(trained, tmp_path):
    """Scoring the vectors in an index built by `adapter index build` equals scoring freshly embedded ones."""
    folder, out, _ = trained
    idx = tmp_path / "base.faiss"
    assert CliRunner().invoke(main, ["index", "build", str(folder), "--out", str(idx)]).exit_code == 0
    runs = {}
    for name, extra in (("embedded", []), ("index", ["--store", "faiss:" + str(idx)])):
        js = tmp_path / f"{name}.json"
        r = CliRunner().invoke(main, ["evaluate", str(folder), "--adapter", str(out), "--dims", "384,64",
                                      "--json", str(js), *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(js.read_text())
    assert runs["index"] == runs["embedded"]
    assert runs["index"]["tiny-adapter"] != runs["index"]["base"]
    # an index of another corpus cannot be read as this one's rows
    from adapter.stores import write_index

    write_index(np.eye(384, dtype=np.float32)[:5], tmp_path / "other.faiss")
    r = CliRunner().invoke(main, ["evaluate", str(folder), "--store", "faiss:" + str(tmp_path / "other.faiss")])
    assert r.exit_code == 1 and "holds 5 vectors without ids" in r.output and r.output.count("\n") == 1, r.output
