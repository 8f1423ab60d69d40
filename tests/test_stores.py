"""Existing stores, nothing re-embedded: real FAISS files (flat, IVF, HNSW, id maps), a real local Qdrant collection and
a real embedded Chroma collection, each searched with adapted queries and compared with brute force."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from adapter.errors import AdapterError
from adapter.stores import ChromaStore, FaissStore, QdrantStore, corpus_from_store, open_store
from cli import main
from tests.conftest import CHUNKS, split_tiny
from tests.test_index import random_adapter

D, N, K = 32, 6000, 10


@pytest.fixture(scope="module")
def vectors():
    """Clustered unit vectors (what embeddings look like, and what IVF and HNSW are built for), and 100 queries near
    them (as a question lies near its chunk) adapted by a random adapter."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, D))
    docs = centres[rng.integers(0, 40, N)] + 0.6 * rng.normal(size=(N, D))
    docs = (docs / np.linalg.norm(docs, axis=1, keepdims=True)).astype(np.float32)
    queries = docs[rng.integers(0, N, 100)] + 0.1 * rng.normal(size=(100, D)).astype(np.float32)
    adapted = random_adapter(D, "synthetic@0", scale=0.3).apply(queries)
    return docs, adapted


def brute_force(docs: np.ndarray, queries: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ docs.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(scores, top, 1)


def recalls(hits, truth_ids) -> np.ndarray:
    return np.array([len(set(h.ids) & set(t)) / len(t) for h, t in zip(hits, truth_ids, strict=True)])


def faiss_index(kind: str, docs: np.ndarray, ids: np.ndarray | None) -> faiss.Index:
    """A user's own index: flat, IVF (150 lists) or HNSW, inner product or L2, under an id map or with IVF's own
    ids."""
    metric = faiss.METRIC_L2 if "l2" in kind else faiss.METRIC_INNER_PRODUCT
    if kind.startswith("flat"):
        index = faiss.IndexFlat(D, metric)
    elif kind.startswith("ivf"):
        index = faiss.IndexIVFFlat(faiss.IndexFlat(D, metric), D, 150, metric)
        index.train(docs)
    else:
        index = faiss.IndexHNSWFlat(D, 16, metric)
    if "idmap" in kind:
        index = faiss.IndexIDMap2(index)
    if ids is None:
        index.add(docs)
    else:
        index.add_with_ids(docs, ids)
    return index


@pytest.mark.parametrize("kind", ["flat", "flat_l2", "flat_idmap", "ivf", "ivf_ids", "ivf_l2_idmap", "hnsw",
                                  "hnsw_l2", "hnsw_idmap"])
def test_faiss_files_match_brute_force(tmp_path, vectors, kind):
    docs, queries = vectors
    with_ids = "idmap" in kind or kind == "ivf_ids"
    ids = np.random.default_rng(1).permutation(10 * N)[:N].astype(np.int64) * 7 + 5 if with_ids else None
    faiss.write_index(faiss_index(kind, docs, ids), str(tmp_path / "user.faiss"))
    truth, truth_scores = brute_force(docs, queries)
    own = ids[truth] if with_ids else truth  # the ids the store must answer with
    store = FaissStore(tmp_path / "user.faiss")
    assert store.rows_are_ids == (not with_ids)
    hits = store.search(queries, K)
    if kind.startswith("flat"):
        assert [h.ids for h in hits] == own.tolist()
        np.testing.assert_allclose([h.scores for h in hits], truth_scores, atol=1e-5)  # inner products, any metric
    else:
        r = recalls(hits, own)
        assert r.min() >= 0.9, (kind, r.min(), r.mean())
        row_of = {int(i): row for row, i in enumerate(ids)} if with_ids else None
        for h, q in zip(hits, queries, strict=True):  # each hit carries its own vector's inner product
            rows = [row_of[i] for i in h.ids] if with_ids else h.ids
            np.testing.assert_allclose(h.scores, docs[rows] @ q, atol=1e-4)
    stored_ids, stored = store.vectors()
    order = np.argsort(stored_ids)
    expect = np.argsort(ids) if with_ids else np.arange(N)
    np.testing.assert_array_equal(np.asarray(stored_ids)[order], ids[expect] if with_ids else expect)
    np.testing.assert_allclose(stored[order], docs[expect], atol=1e-6)


def test_search_settings_are_what_recall_rests_on(tmp_path, vectors):
    """FAISS's own defaults (nprobe 1, efSearch 16) lose neighbours that the project's defaults find."""
    docs, queries = vectors
    truth, _ = brute_force(docs, queries)
    for kind, low in (("ivf", {"nprobe": 1}), ("hnsw", {"ef_search": 1})):
        faiss.write_index(faiss_index(kind, docs, None), str(tmp_path / f"{kind}.faiss"))
        default = recalls(FaissStore(tmp_path / f"{kind}.faiss").search(queries, K), truth)
        starved = recalls(FaissStore(tmp_path / f"{kind}.faiss", **low).search(queries, K), truth)
        assert default.min() >= 0.9 and starved.mean() < default.mean() - 0.05, (kind, default.mean(), starved.mean())


# ---------------------------------------------------------------------------------------------------------- Qdrant


def qdrant_collection(path, docs, *, distance="COSINE", named: str | None = None, names: list[str] | None = None):
    """A local Qdrant collection "docs": point i has id 3i + 1 and payload doc_id (names[i], default d{i})."""
    qdrant_client = pytest.importorskip("qdrant_client")
    from qdrant_client import models

    names = names or [f"d{i}" for i in range(len(docs))]
    client = qdrant_client.QdrantClient(path=str(path))
    params = models.VectorParams(size=docs.shape[1], distance=getattr(models.Distance, distance))
    client.create_collection("docs", vectors_config={named: params} if named else params)
    client.upload_collection("docs", vectors={named: docs} if named else docs,
                             ids=[i * 3 + 1 for i in range(len(docs))], payload=[{"doc_id": n} for n in names])
    client.close()


@pytest.mark.parametrize("distance, named", [("COSINE", None), ("DOT", "dense"), ("EUCLID", None)])
def test_qdrant_matches_brute_force(tmp_path, vectors, distance, named):
    docs, queries = vectors
    docs, queries = docs[:200], queries[:30]  # local Qdrant writes points one by one: keep the test quick
    qdrant_collection(tmp_path / "qdrant", docs, distance=distance, named=named)
    truth, truth_scores = brute_force(docs, queries)
    with QdrantStore(str(tmp_path / "qdrant"), "docs") as store:
        assert store.dim == D and not store.rows_are_ids
        hits = store.search(queries, K)
        assert [h.ids for h in hits] == (truth * 3 + 1).tolist()  # local Qdrant searches exactly
        np.testing.assert_allclose([h.scores for h in hits], truth_scores, atol=1e-4)
        named_hits = store.search(queries[:3], K, id_field="doc_id")
        assert [h.names for h in named_hits] == [[f"d{i}" for i in t] for t in truth[:3]]
        ids, stored = store.vectors()
        assert ids == [i * 3 + 1 for i in range(len(docs))]
        np.testing.assert_allclose(stored, docs, atol=1e-6)
        assert store.vectors(id_field="doc_id")[0] == [f"d{i}" for i in range(len(docs))]


def test_qdrant_bad_input(tmp_path, vectors):
    docs, _ = vectors
    qdrant_collection(tmp_path / "qdrant", docs[:20])
    with pytest.raises(AdapterError, match=r"no Qdrant collection 'nope' \(it has: docs\)"):
        QdrantStore(str(tmp_path / "qdrant"), "nope")
    (tmp_path / "empty").mkdir()
    for where in ("missing", "empty"):
        with pytest.raises(AdapterError, match="not a local Qdrant folder"):
            QdrantStore(str(tmp_path / where), "docs")
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())  # nothing created
    with QdrantStore(str(tmp_path / "qdrant"), "docs") as store:
        with pytest.raises(AdapterError, match="holds 32-dimensional vectors, queries have 8"):
            store.search(np.ones((1, 8), np.float32), 3)
        with pytest.raises(AdapterError, match="has no payload field 'title'"):
            store.vectors(id_field="title")


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "qdrant_client", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "chromadb", None)
    (tmp_path / "db").mkdir()
    with pytest.raises(AdapterError, match=r"qdrant_client is not installed; pip install 'adapter\[qdrant\]'"):
        open_store(qdrant=str(tmp_path / "db"), collection="c")
    with pytest.raises(AdapterError, match=r"chromadb is not installed; pip install 'adapter\[chroma\]'"):
        open_store(chroma=str(tmp_path / "db"), collection="c")


# ---------------------------------------------------------------------------------------------------------- Chroma


def chroma_collection(path, docs, *, space="cosine", name="docs", metadata_ids: bool = True):
    chromadb = pytest.importorskip("chromadb")
    client = chromadb.PersistentClient(path=str(path), settings=chromadb.config.Settings(anonymized_telemetry=False))
    col = client.create_collection(name, configuration={"hnsw": {"space": space}}, embedding_function=None)
    for s in range(0, len(docs), 500):
        rows = range(s, min(s + 500, len(docs)))
        col.add(ids=[f"doc-{i}" for i in rows], embeddings=docs[s:s + 500],
                metadatas=[{"corpus_id": f"c{i}"} for i in rows] if metadata_ids else None)


@pytest.mark.parametrize("space", ["cosine", "l2", "ip"])
def test_chroma_matches_brute_force(tmp_path, vectors, space):
    docs, queries = vectors
    docs = docs[:1500]
    chroma_collection(tmp_path / "chroma", docs, space=space)
    truth, truth_scores = brute_force(docs, queries)
    store = ChromaStore(str(tmp_path / "chroma"), "docs")
    assert store.space == space and store.dim == D
    hits = store.search(queries, K)
    own = [[f"doc-{i}" for i in t] for t in truth]
    r = recalls(hits, own)
    assert r.min() >= 0.9, (r.min(), r.mean())  # Chroma's HNSW is approximate
    for h, q in zip(hits, queries, strict=True):  # each hit carries its own vector's inner product
        np.testing.assert_allclose(h.scores, docs[[int(i[4:]) for i in h.ids]] @ q, atol=1e-4)
    named = store.search(queries[:2], 3, id_field="corpus_id")
    assert [h.names for h in named] == [[f"c{i[4:]}" for i in h.ids] for h in named]
    ids, stored = store.vectors()
    assert sorted(ids) == sorted(f"doc-{i}" for i in range(len(docs)))
    rows = [int(i[4:]) for i in ids]
    np.testing.assert_allclose(stored, docs[rows], atol=1e-6)
    assert store.vectors(id_field="corpus_id")[0] == [f"c{i}" for i in rows]


def test_chroma_bad_input(tmp_path, vectors):
    docs, _ = vectors
    chroma_collection(tmp_path / "chroma", docs[:20], metadata_ids=False)
    with pytest.raises(AdapterError, match=r"no Chroma collection 'nope' \(it has: docs\)"):
        ChromaStore(str(tmp_path / "chroma"), "nope")
    (tmp_path / "empty").mkdir()
    for where in ("missing", "empty"):
        with pytest.raises(AdapterError, match="not a Chroma folder"):
            ChromaStore(str(tmp_path / where), "docs")
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())  # nothing created
    store = ChromaStore(str(tmp_path / "chroma"), "docs")
    with pytest.raises(AdapterError, match="has no metadata field 'corpus_id'"):
        store.vectors(id_field="corpus_id")


# ---------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory, minilm):
    """The tiny dataset split by query; its MiniLM document vectors in a local Qdrant collection (int point ids with
    the corpus id in the payload) and an embedded Chroma collection (ids = corpus ids); an adapter that reorders."""
    from adapter.encoder import Encoder

    root = tmp_path_factory.mktemp("stores")
    folder = split_tiny(root / "ds")
    enc = Encoder(minilm, show_progress=False)
    docs = enc.encode_documents(list(CHUNKS.values()))
    adapter = root / "a.safetensors"
    random_adapter(384, enc.identity).save(adapter)
    qdrant_collection(root / "qdrant", docs, names=list(CHUNKS))
    pytest.importorskip("chromadb")
    import chromadb

    client = chromadb.PersistentClient(path=str(root / "chroma"),
                                       settings=chromadb.config.Settings(anonymized_telemetry=False))
    client.create_collection("docs", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None).add(
        ids=list(CHUNKS), embeddings=docs)
    return folder, adapter, root, docs


@pytest.mark.parametrize("store", ["qdrant", "chroma"])
def test_search_cli_returns_the_store_ids(tiny_stores, minilm, store):
    from adapter.export import AdaptedEncoder

    folder, adapter, root, docs = tiny_stores
    query = "who fixes a broken pipe in the street"
    args = ["search", "--store", f"{store}:{root / store}/docs", "--adapter", str(adapter), "-k", "4"]
    r = CliRunner().invoke(main, [*args, "--json", query])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    scores = docs @ AdaptedEncoder(adapter, minilm).encode_query([query])[0]
    top = np.argsort(-scores)[:4]
    names = list(CHUNKS)
    assert got["ids"] == ([int(i) * 3 + 1 for i in top] if store == "qdrant" else [names[i] for i in top])
    np.testing.assert_allclose(got["scores"], scores[top], atol=1e-4)
    extra = ["--set", "store.id_field=doc_id"] if store == "qdrant" else []
    r = CliRunner().invoke(main, [*args, "--data", str(folder), *extra, query])
    assert r.exit_code == 0, r.output
    assert "  1. id " in r.output and CHUNKS[names[top[0]]][:40] in r.output


@pytest.mark.parametrize("store", ["qdrant", "chroma"])
def test_evaluate_cli_reads_the_store(tiny_stores, tmp_path, store):
    """An existing collection scored with and without the adapter gives what scoring embedded vectors gives."""
    folder, adapter, root, _ = tiny_stores
    runs = {}
    for name, extra in (("embedded", []), ("store", ["--store", f"{store}:{root / store}/docs"])):
        if name == "store" and store == "qdrant":
            extra += ["--set", "store.id_field=doc_id"]
        js = tmp_path / f"{name}.json"
        r = CliRunner().invoke(main, ["evaluate", str(folder), "--adapter", str(adapter), "--dims", "384,64",
                                      "--json", str(js), *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(js.read_text())
    assert runs["store"] == runs["embedded"]
    assert runs["store"]["a"] != runs["store"]["base"]


def test_evaluate_names_missing_chunks(tiny_stores):
    folder, _, root, _ = tiny_stores
    r = CliRunner().invoke(main, ["evaluate", str(folder), "--store", "qdrant:" + str(root / "qdrant") + "/docs"])
    assert r.exit_code == 1 and "holds no vector for" in r.output and "(or set store.id_field)" in r.output, r.output
    assert r.output.count("\n") == 1


def test_corpus_from_store_keeps_extra_vectors_as_distractors(tmp_path, tiny_dataset):
    """Vectors the dataset does not name still compete in search; a judged chunk the store lacks is an error."""
    from adapter.data import load_dataset

    ds = load_dataset(tiny_dataset)
    names = [*CHUNKS, "extra-1", "extra-2"]
    qdrant_collection(tmp_path / "qdrant", np.eye(8, dtype=np.float32), names=names)
    with QdrantStore(str(tmp_path / "qdrant"), "docs") as store:
        cids, vecs = corpus_from_store(store, ds, "test", id_field="doc_id")
        assert cids == names and vecs.shape == (8, 8)
    qdrant_collection(tmp_path / "short", np.eye(8, dtype=np.float32)[:5], names=names[:5])
    with QdrantStore(str(tmp_path / "short"), "docs") as store, pytest.raises(
            AdapterError, match=r"holds no vector for 1 of the 6 chunks judged in test \(first: 'lead'\)"):
        corpus_from_store(store, ds, "test", id_field="doc_id")


# ---------------------------------------------------------------------------------------------- Chroma server


def _chroma_executable() -> str | None:
    """The `chroma` command chromadb installs (beside this Python first, then on PATH)."""
    beside = Path(sys.executable).with_name("chroma")
    return str(beside) if beside.is_file() else shutil.which("chroma")


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    """A real Chroma server (`chroma run`) on a free loopback port, persisting to a temporary folder; its URL."""
    pytest.importorskip("chromadb")
    exe = _chroma_executable()
    if exe is None:
        pytest.skip("the `chroma` executable (installed with chromadb) is not on PATH: no Chroma server to test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path_factory.mktemp("chroma-server")
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen([exe, "run", "--path", str(root / "db"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chroma run did not answer on {url} within 60 s (exit "
                                       f"{proc.poll()}): {(root / 'server.log').read_text()[-500:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _chroma_http(url: str):
    import chromadb

    u = urlparse(url)
    return chromadb.HttpClient(host=u.hostname, port=u.port,
                               settings=chromadb.config.Settings(anonymized_telemetry=False))


def test_chroma_server_matches_brute_force(chroma_server, vectors):
    """The same ChromaStore over HTTP: search against brute force, every vector read back, the metadata id field."""
    docs, queries = vectors
    docs = docs[:1500]
    col = _chroma_http(chroma_server).create_collection("synthetic", configuration={"hnsw": {"space": "cosine"}},
                                                        embedding_function=None)
    for s in range(0, len(docs), 500):
        rows = range(s, min(s + 500, len(docs)))
        col.add(ids=[f"doc-{i}" for i in rows], embeddings=docs[s:s + 500],
                metadatas=[{"corpus_id": f"c{i}"} for i in rows])
    store = open_store(chroma=chroma_server, collection="synthetic")
    assert isinstance(store, ChromaStore) and store.space == "cosine" and store.dim == D
    truth, _ = brute_force(docs, queries)
    hits = store.search(queries, K)
    r = recalls(hits, [[f"doc-{i}" for i in t] for t in truth])
    assert r.min() >= 0.9, (r.min(), r.mean())
    for h, q in zip(hits, queries, strict=True):
        np.testing.assert_allclose(h.scores, docs[[int(i[4:]) for i in h.ids]] @ q, atol=1e-4)
    ids, stored = store.vectors()
    rows = [int(i[4:]) for i in ids]
    assert sorted(rows) == list(range(len(docs)))
    np.testing.assert_allclose(stored, docs[rows], atol=1e-6)
    assert store.vectors(id_field="corpus_id")[0] == [f"c{i}" for i in rows]
    with pytest.raises(AdapterError, match=r"no Chroma collection 'nope' \(it has: .*synthetic"):
        open_store(chroma=chroma_server, collection="nope")


def test_chroma_server_through_the_cli(chroma_server, tiny_stores, tmp_path, minilm):
    """`--chroma URL --collection` on evaluate (vectors read over HTTP) gives what the embedded corpus gives, and on
    search returns the server's ids."""
    folder, adapter, _, docs = tiny_stores
    _chroma_http(chroma_server).create_collection("docs", configuration={"hnsw": {"space": "cosine"}},
                                                  embedding_function=None).add(ids=list(CHUNKS), embeddings=docs)
    runs = {}
    for name, extra in (("embedded", []), ("server", ["--store", "chroma:" + str(chroma_server) + "/docs"])):
        js = tmp_path / f"{name}.json"
        r = CliRunner().invoke(main, ["evaluate", str(folder), "--adapter", str(adapter), "--dims", "384,64",
                                      "--json", str(js), *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(js.read_text())
    assert runs["server"] == runs["embedded"] and runs["server"]["a"] != runs["server"]["base"]
    from adapter.export import AdaptedEncoder

    query = "who fixes a broken pipe in the street"
    r = CliRunner().invoke(main, ["search", "--store", "chroma:" + str(chroma_server) + "/docs", "--adapter",
                                  str(adapter), "-k", "3", "--json", query])
    assert r.exit_code == 0, r.output
    scores = docs @ AdaptedEncoder(adapter, minilm).encode_query([query])[0]
    assert json.loads(r.output)["ids"] == [list(CHUNKS)[i] for i in np.argsort(-scores)[:3]]
