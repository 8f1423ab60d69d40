"""Corpus vectors from where the index already is (a FAISS file, a vector file, a Qdrant, Chroma or pgvector store)
for train and evaluate: the same adapter and metrics as from embedded chunks, no chunk embedded, bad input refused
in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from adapter.config import Config
from adapter.corpus import StoreSource
from adapter.errors import AdapterError
from adapter.stores import read_vector_file, write_index
from cli import main
from tests.conftest import CHUNKS, split_tiny

QUICK = Config().replace(train={"epochs": 3}, val_fraction=0.3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm):
    """The tiny dataset split by query, a copy whose chunk texts are placeholders, and its MiniLM document vectors
    written the ways a team might hold them (ids in a shuffled order, plus two vectors naming no chunk)."""
    from adapter.encoder import Encoder

    root = tmp_path_factory.mktemp("corpus")
    folder = split_tiny(root / "ds")
    blind = root / "blind"
    blind.mkdir()
    (blind / "qrels").mkdir()
    for p in (folder / "qrels").iterdir():
        (blind / "qrels" / p.name).write_bytes(p.read_bytes())
    (blind / "queries.jsonl").write_bytes((folder / "queries.jsonl").read_bytes())
    with open(blind / "corpus.jsonl", "w") as f:
        for i, cid in enumerate(CHUNKS):
            f.write(json.dumps({"_id": cid, "text": f"placeholder {i}"}) + "\n")
    docs = Encoder(minilm, cache_dir=root / "cache", show_progress=False).encode_documents(list(CHUNKS.values()))
    rng = np.random.default_rng(0)
    extra = rng.normal(size=(2, docs.shape[1])).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    names = [*CHUNKS, "other-1", "other-2"]
    vectors = np.concatenate([docs, extra])
    order = rng.permutation(len(names))
    np.save(root / "vectors.npy", vectors[order])
    (root / "ids.txt").write_text("".join(names[i] + "\n" for i in order))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [names[i] for i in order], "vector": [vectors[i].tolist() for i in order]}),
                   root / "vectors.parquet")
    shuffled = rng.permutation(len(CHUNKS))  # the chunks alone, in another order than corpus.jsonl's
    np.save(root / "chunks.npy", docs[shuffled])
    (root / "chunks.txt").write_text("".join(list(CHUNKS)[i] + "\n" for i in shuffled))
    pq.write_table(pa.table({"id": [list(CHUNKS)[i] for i in shuffled], "vector": [docs[i].tolist()
                                                                                   for i in shuffled]}),
                   root / "chunks.parquet")
    write_index(docs, root / "rows.faiss")  # row i = line i of corpus.jsonl
    write_index(vectors[order], root / "ids.faiss", ids=np.array([100 + i for i in order]))
    return folder, blind, root


def encoder(minilm, cache: Path):
    from adapter.encoder import Encoder

    return Encoder(minilm, cache_dir=cache, show_progress=False)


@pytest.mark.parametrize("source", ["rows.faiss", "npy", "parquet"])
def test_training_on_the_index_vectors_gives_the_same_adapter_and_embeds_no_chunk(setup, minilm, tmp_path, source):
    from adapter.choice import train_adapter
    from adapter.data import load_dataset

    folder, blind, root = setup
    reference = train_adapter(load_dataset(folder), QUICK, encoder=encoder(minilm, tmp_path / "a"), progress=False)
    given = {"rows.faiss": StoreSource(index=str(root / "rows.faiss")),
             "npy": StoreSource(vectors=str(root / "chunks.npy"), ids=str(root / "chunks.txt")),
             "parquet": StoreSource(vectors=str(root / "chunks.parquet"))}[source]
    enc = encoder(minilm, tmp_path / "b")
    ds = load_dataset(blind)  # chunk texts are placeholders: only ids are read
    result = train_adapter(ds, QUICK, encoder=enc, progress=False, corpus=given)
    assert enc.texts_encoded == len(ds.split("train"))  # the queries, and no chunk
    # the same vectors, put in corpus.jsonl's order whatever the file's: the same adapter, bit for bit
    np.testing.assert_array_equal(result.adapter.weight, reference.adapter.weight)
    assert result.best_val == reference.best_val


def test_evaluate_cli_scores_a_vector_file_as_the_embedded_corpus(setup, tmp_path):
    folder, blind, root = setup
    runs = {}
    for name, data, extra in (("embedded", folder, []),
                              ("npy", blind, ["--store",
                                              "vectors:" + str(root / "vectors.npy") + "," + str(root / "ids.txt")]),
                              ("parquet", blind, ["--store", "vectors:" + str(root / "vectors.parquet")])):
        out = tmp_path / f"{name}.json"
        r = CliRunner().invoke(main, ["evaluate", str(data), "--dims", "384", "--json", str(out), *extra])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads(out.read_text())
    # the vector files also hold two vectors naming no chunk: they compete in search and may push a chunk down
    for name in ("npy", "parquet"):
        assert runs[name]["base"]["384"]["ndcg@10"] == pytest.approx(runs["embedded"]["base"]["384"]["ndcg@10"],
                                                                     abs=0.05)
    assert runs["npy"] == runs["parquet"]


def test_train_cli_from_a_faiss_file_with_ids(setup, tmp_path):
    """Ids under an id map are not corpus ids: refused in one line, nothing written."""
    _, blind, root = setup
    out = tmp_path / "a.safetensors"
    r = CliRunner().invoke(main, ["train", str(blind), "--out", str(out), "--set", "train.epochs=1",
                                  "--store", "faiss:" + str(root / "ids.faiss")])
    assert r.exit_code == 1 and "holds no vector for" in r.output and r.output.count("\n") == 1, r.output
    assert not out.exists()
    r = CliRunner().invoke(main, ["train", str(blind), "--out", str(out), "--set", "train.epochs=1",
                                  "--store", "faiss:" + str(root / "rows.faiss")])
    assert r.exit_code == 0 and out.is_file(), r.output


def test_bad_vector_files_are_one_line(setup, tmp_path, minilm):
    from adapter.choice import train_adapter
    from adapter.data import load_dataset

    _, blind, root = setup
    ds = load_dataset(blind)
    np.save(tmp_path / "flat.npy", np.ones(8, np.float32))
    np.save(tmp_path / "small.npy", np.ones((8, 16), np.float32))
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    names = (root / "ids.txt").read_text()
    (tmp_path / "dup.txt").write_text(names.replace("other-1", "other-2"))
    (tmp_path / "strangers.txt").write_text("".join(f"x{i}\n" for i in range(8)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "embedding": [[1.0, 0.0]]}), tmp_path / "novec.parquet")
    cases = [
        ({"vectors": str(tmp_path / "none.npy"), "ids": str(root / "ids.txt")}, r"none\.npy: no such file"),
        ({"vectors": str(root / "vectors.npy")}, r"needs an ids file \(IDS\.txt\)"),
        ({"vectors": str(tmp_path / "flat.npy"), "ids": str(root / "ids.txt")}, r"expected a 2-D float array"),
        ({"vectors": str(root / "vectors.npy"), "ids": str(tmp_path / "three.txt")},
         r"three\.txt: 3 ids for the 8 rows of"),
        ({"vectors": str(root / "vectors.npy"), "ids": str(tmp_path / "dup.txt")},
         r"id 'other-2' names more than one vector"),
        ({"vectors": str(root / "vectors.npy"), "ids": str(tmp_path / "strangers.txt")},
         r"holds no vector for \d+ of the \d+ chunks judged \(first: '\w+'\); its ids must be corpus ids"),
        ({"vectors": str(tmp_path / "novec.parquet")}, r"novec\.parquet: cannot read id and vector columns"),
        ({"vectors": str(tmp_path / "small.npy"), "ids": str(root / "ids.txt")},
         r"small\.npy holds 16-dimensional vectors, .* makes 384"),
        ({"vectors": str(root / "vectors.npy"), "ids": str(root / "ids.txt"), "index": "x.faiss"},
         "pass either a vector file or a store"),
        ({"ids": str(root / "ids.txt")}, r"an ids file goes with a vector file"),
    ]
    enc = encoder(minilm, tmp_path / "cache")
    for given, message in cases:
        with pytest.raises(AdapterError, match=message):
            train_adapter(ds, QUICK, encoder=enc, progress=False, corpus=StoreSource(**given))
    assert read_vector_file(root / "vectors.parquet")[1].shape == (8, 384)


# ------------------------------------------------------------------------------------------------------ store search


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_exact_search_is_brute_force_over_what_the_index_stores(tmp_path, kind):
    """IVF: every list probed (exact over the stored codes, so compared with brute force over their reconstructions);
    HNSW: reconstructed block by block; flat: the search itself."""
    import faiss

    from adapter.stores import FaissStore

    rng = np.random.default_rng(0)
    docs = rng.normal(size=(3000, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:20] + 0.05 * rng.normal(size=(20, 16)).astype(np.float32)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    elif kind == "ivfpq":
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(16), 16, 30, 4, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(docs)
    else:
        index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(16, 8, faiss.METRIC_INNER_PRODUCT))
    index.add_with_ids(docs, np.arange(3000, dtype=np.int64) * 3)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    store = FaissStore(tmp_path / "i.faiss", nprobe=1, ef_search=10)  # starved: its own search misses some
    ids, stored = store.vectors()
    truth = np.asarray(ids)[np.argsort(-(queries @ stored.T), axis=1, kind="stable")[:, :10]]
    exact = store.exact_search(queries, 10)
    assert [h.ids for h in exact] == truth.tolist()


def test_evaluate_store_search_scores_through_the_stores_own_search(setup, tmp_path):
    folder, blind, root = setup
    runs = {}
    for name, data, extra in (("read out", folder, ["--store", "faiss:" + str(root / "rows.faiss")]),
                              ("store search", blind, ["--store", "faiss:" + str(root / "rows.faiss"),
                                                       "--store-search"])):
        out = tmp_path / f"{len(runs)}.json"
        r = CliRunner().invoke(main, ["evaluate", str(data), "--dims", "384", "--json", str(out), *extra])
        assert r.exit_code == 0, r.output
        runs[name] = (json.loads(out.read_text()), r.output)
    (read_out, _), (searched, output) = runs["read out"], runs["store search"]
    assert searched.keys() == read_out.keys() == {"base"}
    for metric, value in read_out["base"]["384"].items():  # an exact index: the same ranking, the same metrics
        assert searched["base"]["384"][metric] == pytest.approx(value, abs=1e-9), metric
    assert "own search: top 100 ids per query, at its dimension 384 only; no vector read out" in output
    assert "recall@10 of the store's search against exact search over its vectors" in output
    assert "base 1.0000" in output
    r = CliRunner().invoke(main, ["evaluate", str(blind), "--store-search"])
    assert r.exit_code == 1 and "--store-search needs --store" in r.output


def test_bad_embedding_and_store_input_fails_cleanly(tmp_path_factory, tiny_model_dir, minilm):
    """#11's bad input through the real CLI (tests/fault_cases.py, embed's block): a wrong key and an unknown model
    fail at the first request (one request reaches the server, no retries), a closed port well within its timeout,
    a store of another dimension, ids that are not corpus ids, a table without a vector column and a DSN that does
    not connect: each a non-zero exit, one short line saying what is wrong, no traceback, nothing written, no
    secret shown."""
    import re
    import urllib.request

    for module in ("pgserver", "psycopg", "pgvector"):
        pytest.importorskip(module, reason=f"{module} is not installed; pip install 'adapter[dev]'")
    from tests.fault_cases import (
        EMBED_KEY,
        EMBED_STORE_EXPECT,
        PG_PASSWORD,
        build_workspace,
        embedding_store_cases,
        embedding_store_services,
        run_case,
    )

    root = tmp_path_factory.mktemp("faults-embed")
    cache = root / "cache"
    base = build_workspace(root / "ws", str(tiny_model_dir), cache, light=True)
    bad = []
    with embedding_store_services(base, minilm) as w:
        stats = w["embeddings_url"].removesuffix("/v1") + "/stats"

        def requests() -> int:
            with urllib.request.urlopen(stats, timeout=10) as r:
                return json.loads(r.read())["requests"]

        for case in embedding_store_cases():
            before = requests()
            o = run_case(case, w, cache)
            sent = requests() - before
            expect = EMBED_STORE_EXPECT[case.what].replace("{embeddings_url}", re.escape(w["embeddings_url"]))
            problems = [p for p, failed in (
                ("not clean", not o.clean), (f"no line matching {expect!r}", not re.search(expect, o.stderr)),
                ("a secret shown", EMBED_KEY in o.stderr or PG_PASSWORD in o.stderr),
                (f"{sent} requests (retried)", "(40" in case.what and sent != 1),
                # a refused connection stops at the first try: "cannot connect" is never a retried reason, and a
                # retried one would end "failed after N retries (...)"; counted from the message, not timed
                ("a closed port retried", case.what == "closed port" and "retries" in o.stderr),
            ) if failed]
            if problems:
                bad.append(f"{case.command}: {case.what}: {', '.join(problems)}: exit {o.code}, {o.lines} lines, "
                           f"left {o.left[:2]}: {o.stderr[-400:]}")
    assert not bad, "\n".join(bad)
