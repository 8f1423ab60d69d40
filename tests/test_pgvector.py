"""pgvector as a store, against a real PostgreSQL with the pgvector extension started by the test itself (the pip
package pgserver ships both): exact and HNSW/IVFFlat tables under each operator, ids from a column, and bad input."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from adapter.errors import AdapterError
from adapter.stores import PgvectorStore, open_store

D, N, K = 32, 2000, 10


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server (a Unix socket in a temporary folder) with the vector extension created; its
    DSN. Stopped and deleted after the module. The folder is a fresh one under the system's temporary folder, not
    pytest's: run as root, pgserver starts PostgreSQL as its own user, which cannot enter pytest's private folder."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver (a pip package with PostgreSQL and pgvector) is "
                                   "not installed; pip install 'adapter[dev]'")
    pytest.importorskip("psycopg")
    pytest.importorskip("pgvector")
    server = pgserver.get_server(tempfile.mkdtemp(prefix="adapter-pg-"), cleanup_mode="delete")
    server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="module")
def data():
    """Clustered unit vectors and queries near them (as in test_stores)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, D))
    docs = centres[rng.integers(0, 30, N)] + 0.6 * rng.normal(size=(N, D))
    docs = (docs / np.linalg.norm(docs, axis=1, keepdims=True)).astype(np.float32)
    queries = docs[rng.integers(0, N, 50)] + 0.1 * rng.normal(size=(50, D))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    return docs, queries


def make_table(dsn: str, name: str, docs: np.ndarray, *, index: str | None = None, opclass: str = "cosine",
               ids: list[str] | None = None, column: str = "embedding", typed: bool = True) -> None:
    """A user's own table: text ids ``d<i>`` (primary key ``doc_id``), a vector column, maybe an index."""
    import psycopg
    from pgvector.psycopg import register_vector

    ids = ids or [f"d{i}" for i in range(len(docs))]
    kind = f"vector({docs.shape[1]})" if typed else "vector"
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.execute(f"CREATE TABLE {name} (doc_id text PRIMARY KEY, title text, {column} {kind})")
        with conn.cursor().copy(f"COPY {name} (doc_id, {column}) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "vector"])
            for i, v in zip(ids, docs, strict=True):
                copy.write_row([i, v])
        if index == "hnsw":
            conn.execute(f"CREATE INDEX ON {name} USING hnsw ({column} vector_{opclass}_ops)")
        elif index == "ivfflat":
            conn.execute(f"CREATE INDEX ON {name} USING ivfflat ({column} vector_{opclass}_ops) WITH (lists = 40)")


def truth(docs: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ docs.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return top, np.take_along_axis(scores, top, 1)


@pytest.mark.parametrize(("index", "opclass", "operator"), [
    (None, "cosine", "<=>"), ("hnsw", "cosine", "<=>"), ("hnsw", "ip", "<#>"), ("hnsw", "l2", "<->"),
    ("ivfflat", "cosine", "<=>"), ("ivfflat", "l2", "<->"),
])
def test_search_matches_brute_force_through_the_tables_index(postgres, data, index, opclass, operator):
    docs, queries = data
    make_table(postgres, "docs", docs, index=index, opclass=opclass)
    top, scores = truth(docs, queries)
    with PgvectorStore(postgres, "docs", probes=10) as store:  # of 40 lists: all of them, and Postgres scans instead
        assert (store.dim, store.id_column, store.vector_column, store.operator) == (D, "doc_id", "embedding",
                                                                                   operator)
        assert store.index == (index or "none (exact)")
        plan = "\n".join(r[0] for r in store.conn.execute(
            "EXPLAIN SELECT doc_id FROM docs ORDER BY embedding " + operator + " %s LIMIT 10", (queries[0],)))
        assert ("Index Scan" in plan) == (index is not None), plan  # the user's index is what answers
        hits = store.search(queries, K)
        want = [[f"d{i}" for i in row] for row in top]
        recall = np.mean([len(set(h.ids) & set(w)) / K for h, w in zip(hits, want, strict=True)])
        if index is None:
            assert [h.ids for h in hits] == want
            np.testing.assert_allclose([h.scores for h in hits], scores, atol=1e-5)
        else:
            assert recall >= 0.9, recall
        for h, q in zip(hits, queries, strict=True):  # every score is the hit's inner product, whatever the operator
            np.testing.assert_allclose(h.scores, docs[[int(i[1:]) for i in h.ids]] @ q, atol=1e-5)
        ids, vectors = store.vectors()
    assert sorted(ids, key=lambda i: int(i[1:])) == [f"d{i}" for i in range(N)]
    np.testing.assert_allclose(vectors, docs[[int(i[1:]) for i in ids]], atol=1e-6)


def test_ids_from_a_named_column_and_an_untyped_vector_column(postgres, data):
    docs, _ = data
    make_table(postgres, "loose", docs[:50], typed=False, column="vec")
    with open_store(pgvector=postgres, table="loose") as store:
        assert (store.dim, store.vector_column) == (D, "vec")
        ids, _ = store.vectors()
        assert ids[:2] == ["d0", "d1"]
        with pytest.raises(AdapterError, match="ids are read from column 'doc_id', not 'title'"):
            store.vectors(id_field="title")


def test_bad_input_is_one_line_and_never_shows_the_password(postgres, data):
    docs, _ = data
    make_table(postgres, "docs", docs[:20])
    import psycopg

    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS plain")
        conn.execute("CREATE TABLE plain (id int PRIMARY KEY, body text)")
    cases = [
        ({"table": "nope"}, r"#nope: no table 'nope'"),
        ({"table": "plain"}, r"#plain: no vector column \(columns: id integer, body text\)"),
        ({"table": "docs", "id_column": "uid"}, r"no id column 'uid' \(columns: doc_id, title, embedding\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AdapterError, match=message):
            PgvectorStore(postgres, **kwargs)
    with PgvectorStore(postgres, "docs") as store, pytest.raises(AdapterError, match="holds 32-dimensional vectors, "
                                                                              "queries have 8"):
        store.search(np.ones((1, 8), np.float32), 3)
    with pytest.raises(AdapterError) as e:
        PgvectorStore("postgresql://bob:s3cret-pw@127.0.0.1:1/db?connect_timeout=2", "docs")
    assert str(e.value).startswith("postgresql://bob@127.0.0.1:1/db: cannot connect to PostgreSQL (")
    assert "s3cret" not in str(e.value)
    with pytest.raises(AdapterError, match="pgvector needs a table"):
        open_store(pgvector=postgres)
    with pytest.raises(AdapterError, match="a table applies to pgvector, not index"):
        open_store(index="x.faiss", table="docs")


def test_exact_search_turns_the_index_off(postgres, data):
    docs, queries = data
    make_table(postgres, "docs", docs, index="hnsw", opclass="cosine")
    top, _ = truth(docs, queries)
    with PgvectorStore(postgres, "docs", ef_search=10) as store:
        exact = store.exact_search(queries, K)
        assert [h.ids for h in exact] == [[f"d{i}" for i in row] for row in top]
        plan = "\n".join(r[0] for r in store.conn.execute("EXPLAIN SELECT 1 FROM docs ORDER BY embedding <=> %s "
                                                          "LIMIT 10", (queries[0],)))
        assert "Index Scan" in plan  # back on for the session's other searches


def test_mixed_case_dotted_and_schema_qualified_tables_are_found_and_searched_alike(postgres, data):
    """Issue #24: the existence check read the name as PostgreSQL does while the query split it on dots and quoted
    each part: a table created as "MyDocs" or "my.docs" could not be used either way it was written."""
    import psycopg

    docs, queries = data
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA IF NOT EXISTS "Odd Schema"')
    names = {'"MyDocs"': ['"MyDocs"', "MyDocs"], '"my.docs"': ['"my.docs"', "my.docs"],
             '"Odd Schema"."Mixed.Case"': ['"Odd Schema"."Mixed.Case"']}
    for created, spellings in names.items():
        make_table(postgres, created, docs[:40])
        for table in spellings:
            with PgvectorStore(postgres, table) as store:
                assert store.search(docs[:1], 3)[0].ids[0] == "d0", table
                assert len(store.vectors()[0]) == 40 and store.dim == D
    make_table(postgres, "mydocs", docs[40:50])  # PostgreSQL's reading comes first: unquoted MyDocs is mydocs
    with PgvectorStore(postgres, "MyDocs") as store:
        assert len(store.vectors()[0]) == 10
    with pytest.raises(AdapterError, match="no table '\"Odd'"):
        PgvectorStore(postgres, '"Odd')
