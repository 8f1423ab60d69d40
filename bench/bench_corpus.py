"""Training from the vectors the index already holds (issue #11): AppleQA (query split, seed 0), its base MiniLM chunk
vectors stored under their corpus ids in a FAISS file (IndexIDMap2 over a flat index), a local Qdrant collection, an
embedded Chroma collection and a pgvector table (a real PostgreSQL started here from the pgserver package), each built
here as a team would build its own. `adapter train --<store>` against `adapter train` from corpus.jsonl: the test
metrics of the two adapters, and how many chunk texts each run embedded (read from the CLI's own log; every run
starts from a cache that holds the query vectors only).

    python bench/bench_corpus.py [--shared ../shared]

Prints Markdown on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
METRICS = ("ndcg@10", "mrr@10", "recall@10", "accuracy@1")


def embedded(log: str, role: str) -> int:
    """Texts of ``role`` the run embedded, from the encoder's own log lines."""
    return sum(int(n) for n in re.findall(rf"embedding (\d+) new {role} texts", log))


def build_stores(work: Path, ids: list[str], vectors) -> dict[str, list[str]]:
    """Each store built the way its own client builds it; the CLI options that name it."""
    import chromadb
    import faiss
    import numpy as np
    import pgserver
    import psycopg
    import qdrant_client
    from pgvector.psycopg import register_vector
    from qdrant_client import models

    out: dict[str, list[str]] = {}
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(vectors, np.array([int(i) for i in ids], dtype=np.int64))
    faiss.write_index(index, str(work / "chunks.faiss"))
    out["FAISS (IndexIDMap2, ids = corpus ids)"] = ["--store", "faiss:" + str(work / "chunks.faiss")]

    qc = qdrant_client.QdrantClient(path=str(work / "qdrant"))
    qc.create_collection("chunks", vectors_config=models.VectorParams(size=vectors.shape[1],
                                                                      distance=models.Distance.COSINE))
    qc.upload_collection("chunks", vectors=vectors, ids=list(range(len(ids))), payload=[{"chunk": i} for i in ids])
    qc.close()
    out["Qdrant (local folder, payload field)"] = ["--store", "qdrant:" + str(work / "qdrant") + "/chunks",
                                                   "--set", "store.id_field=chunk"]

    client = chromadb.PersistentClient(path=str(work / "chroma"),
                                       settings=chromadb.config.Settings(anonymized_telemetry=False))
    client.create_collection("chunks", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None).add(
        ids=ids, embeddings=vectors)
    out["Chroma (embedded, ids = corpus ids)"] = ["--store", "chroma:" + str(work / "chroma") + "/chunks"]

    server = pgserver.get_server(tempfile.mkdtemp(prefix="bench-pg-"), cleanup_mode="delete")
    server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"CREATE TABLE chunks (chunk_id text PRIMARY KEY, embedding vector({vectors.shape[1]}))")
        with conn.cursor().copy("COPY chunks (chunk_id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "vector"])
            for i, v in zip(ids, vectors, strict=True):
                copy.write_row([i, v])
        conn.execute("CREATE INDEX ON chunks USING hnsw (embedding vector_cosine_ops)")
    out["pgvector (HNSW, primary key = corpus id)"] = ["--store", f"pgvector:{server.get_uri()}/chunks"]
    out["_server"] = server  # type: ignore[assignment]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from common import appleqa_chunk_vectors, cli, cli_env

    from adapter.encoder import Encoder

    env = cli_env()
    say = lambda line="": print(line, flush=True)  # noqa: E731, T201 -- rows appear as each store is done
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ds, data, ids, vectors = appleqa_chunk_vectors(a.shared, work, work / "build-cache")
        # Every run starts from a cache holding the query vectors alone (embedding 4,000 questions five times over
        # would measure nothing new): whatever chunk a run embeds shows in its log and in its cache.
        Encoder(cache_dir=work / "queries-cache", show_progress=False).encode_queries(list(data.queries.values()))
        stores = build_stores(work, ids, vectors)
        server = stores.pop("_server")
        say(f"# bench_corpus: `adapter train` from each store (AppleQA, {len(ids)} chunks, query split, seed 0)\n")
        say("| corpus vectors from | chunks embedded by train | queries embedded (cached before) | train s | "
            + " | ".join(f"adapter {m}" for m in METRICS) + " | largest |difference| from corpus.jsonl's adapter |")
        say("|---" * (5 + len(METRICS)) + "|")
        ref = base = None
        try:
            for n, (name, options) in enumerate({"corpus.jsonl (embedded)": [], **stores}.items()):
                cache = work / f"cache-{n}"  # the queries' vectors only: any chunk embedded is counted
                shutil.copytree(work / "queries-cache", cache)
                out = work / f"adapter-{n}.safetensors"
                t = time.monotonic()
                r = cli("train", str(ds), "--out", str(out), f"--cache-dir={cache}", *options, env=env)
                seconds = time.monotonic() - t
                js = work / f"results-{n}.json"  # every adapter scored the same way: embedded corpus
                cli("evaluate", str(ds), "--adapter", str(out), "--dims", "384", "--json", str(js),
                    f"--cache-dir={work / 'build-cache'}", env=env)
                result = json.loads(js.read_text())
                adapted = result[out.stem]["384"]
                ref, base = ref or adapted, base or result["base"]["384"]
                worst = max(abs(adapted[m] - ref[m]) for m in ref)
                cells = " | ".join(f"{adapted[m]:.4f}" for m in METRICS)
                say(f"| {name} | {embedded(r.stderr, 'document')} | {embedded(r.stderr, 'query')} | {seconds:.1f} | "
                    f"{cells} | {worst:.1e} |")
        finally:
            server.cleanup()
            shutil.rmtree(work / "qdrant", ignore_errors=True)
    say("\nbase (no adapter): " + ", ".join(f"{m} {base[m]:.4f}" for m in METRICS))


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "corpus")
