"""Adapted search through existing stores (issue #7): 100 AppleQA test queries (query split, seed 0), adapted by the
default adapter, searched in each store; each store's top-10 against the brute-force top-10 over the same vectors.
Then `adapter evaluate`'s path with the corpus read out of each store, against embedding it.

    python bench/bench_stores.py [--shared ../shared] [--cache-dir DIR] [--distractors]

The stores hold AppleQA's 215 chunks under their own ids (the chunk index: FAISS int64 under an IndexIDMap2, Qdrant
point ids, Chroma string ids). --distractors adds every training question, embedded as a document (3,435 more
vectors), so approximate indexes have something to get wrong; the evaluate table is printed without it. FAISS files
are built the way a user builds their own; Qdrant is a local folder (qdrant-client's local mode searches exactly),
Chroma an embedded PersistentClient with its default HNSW (ef_search 100 set on the collection; asking for more
results widens it for one search). Prints Markdown on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
K = 10


def faiss_files(work: Path, vectors, ids) -> dict[str, Path]:
    """The user's own indexes, inner product, each under an IndexIDMap2 holding ``ids``: flat, IVF-flat with FAISS's
    rule-of-thumb list count, HNSW-flat with M = 32."""
    import faiss

    n, d = vectors.shape
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # 4 sqrt(n) lists, within FAISS's 39-points-per-list floor
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    built = {"Flat": faiss.IndexFlatIP(d), f"IVF{nlist},Flat": ivf,
             "HNSW32,Flat": faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)}
    out = {}
    for name, index in built.items():
        index = faiss.IndexIDMap2(index)
        index.add_with_ids(vectors, ids)
        out[name] = work / f"{name.replace(',', '-')}.faiss"
        faiss.write_index(index, str(out[name]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache to reuse [default: a fresh one]")
    p.add_argument("--distractors", action="store_true")
    a = p.parse_args()

    import chromadb
    import numpy as np
    import qdrant_client
    from common import appleqa
    from qdrant_client import models

    from adapter.choice import train_adapter
    from adapter.config import Config
    from adapter.corpus import VectorCorpus
    from adapter.data import load_dataset, relevant
    from adapter.encoder import Encoder
    from adapter.pipeline import evaluate_dataset
    from adapter.stores import ChromaStore, FaissStore, QdrantStore

    work = Path(tempfile.mkdtemp(prefix="bench-stores-"))
    ds = load_dataset(appleqa(a.shared, work))
    encoder = Encoder("sentence-transformers/all-MiniLM-L6-v2", cache_dir=a.cache_dir or work / "cache",
                      show_progress=False)
    adapter = train_adapter(ds, Config(), encoder=encoder, progress=False).adapter
    qids = list(relevant(ds.split("test")))[:100]
    queries = adapter.apply(encoder.encode_queries([ds.queries[q] for q in qids]))  # (100, 384), adapted

    cids = list(ds.corpus)
    vectors = encoder.encode_documents([ds.doc_text(c) for c in cids])
    ids = np.array([int(c) for c in cids], dtype=np.int64)  # AppleQA's chunk index: the stores' own ids
    if a.distractors:
        train_questions = [ds.queries[q] for q in ds.split("train")]
        vectors = np.concatenate([vectors, encoder.encode_documents(train_questions)])
        ids = np.concatenate([ids, 1_000_000 + np.arange(len(train_questions))])
    n = len(vectors)
    row_of = {int(i): row for row, i in enumerate(ids)}
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :K]  # brute force, (100, 10) rows

    stores = {}
    files = faiss_files(work, vectors, ids)
    for name, path in files.items():  # each setting below the default, FAISS's own first (nprobe 1, efSearch 16)
        knob, values = ("nprobe", (1, 8, 16, 32)) if name.startswith("IVF") else ("ef_search", (16, 32, 64, 128))
        for v in values if name != "Flat" else ():
            stores[f"FAISS {name}, {knob} {v}"] = lambda p=path, kw={knob: v}: FaissStore(p, **kw)
        stores[f"FAISS {name}, defaults (nprobe {Config().store.nprobe}, ef_search {Config().store.ef_search})"] = (
            lambda p=path: FaissStore(p))
    qc = qdrant_client.QdrantClient(path=str(work / "qdrant"))
    qc.create_collection("apple", vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE))
    qc.upload_points("apple", [models.PointStruct(id=int(i), vector=v.tolist()) for i, v in zip(ids, vectors,
                                                                                               strict=True)])
    qc.close()
    stores["Qdrant, local folder (cosine)"] = lambda: QdrantStore(str(work / "qdrant"), "apple")
    cc = chromadb.PersistentClient(path=str(work / "chroma"),
                                   settings=chromadb.config.Settings(anonymized_telemetry=False))
    col = cc.create_collection("apple", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
    for s in range(0, n, 1000):
        col.add(ids=[str(i) for i in ids[s:s + 1000]], embeddings=vectors[s:s + 1000])
    stores["Chroma, embedded PersistentClient (cosine), ef_search 10: asks for the top 10 only"] = (
        lambda: ChromaStore(str(work / "chroma"), "apple", ef_search=K))
    stores[f"Chroma, embedded PersistentClient (cosine), defaults: asks for {Config().store.ef_search}, keeps 10"] = (
        lambda: ChromaStore(str(work / "chroma"), "apple"))

    what = f"215 chunks + {n - 215:,} training questions as distractors" if a.distractors else "the 215 chunks"
    print(f"{len(qids)} AppleQA test queries adapted by the default adapter; {n:,} vectors in each store ({what}).\n")
    print("| store | recall@10 against brute force: lowest query | mean | queries with the exact top-10 list | "
          "ms per query |")
    print("|---|---|---|---|---|")
    for name, open_ in stores.items():
        with open_() as store:
            t = time.perf_counter()
            hits = store.search(queries, K)
            ms = (time.perf_counter() - t) * 1000 / len(queries)
        rows = [[row_of[int(i)] for i in h.ids] for h in hits]
        recall = np.array([len(set(r) & set(t)) / K for r, t in zip(rows, truth, strict=True)])
        exact = sum(r == t.tolist() for r, t in zip(rows, truth, strict=True))
        print(f"| {name} | {recall.min():.2f} | {recall.mean():.4f} | {exact}/{len(rows)} | {ms:.2f} |")
    if a.distractors:
        return

    print(f"\nCorpus read out of each store and scored on the whole test split ({len(ds.split('test'))} queries), "
          "base and adapter, dim 384:\n")
    print("| corpus vectors from | base ndcg@10 | adapter ndcg@10 | same metrics as embedded |")
    print("|---|---|---|---|")
    cfg = Config().replace(dims=(384,))
    embedded = evaluate_dataset(ds, cfg, encoder=encoder, adapters={"adapter": adapter})
    print(f"| the embedding cache (`adapter evaluate DIR`) | {embedded['base'][384]['ndcg@10']:.4f} | "
          f"{embedded['adapter'][384]['ndcg@10']:.4f} | |")
    readers = {f"FAISS IndexIDMap2({k})": (lambda p=v: FaissStore(p)) for k, v in files.items()}
    readers["Qdrant, local folder"] = lambda: QdrantStore(str(work / "qdrant"), "apple")
    readers["Chroma, embedded"] = lambda: ChromaStore(str(work / "chroma"), "apple")
    for name, open_ in readers.items():
        with open_() as store:
            corpus = VectorCorpus.from_store(store, ds, "test")
        r = evaluate_dataset(ds, cfg, encoder=encoder, adapters={"adapter": adapter}, corpus=corpus)
        print(f"| {name} | {r['base'][384]['ndcg@10']:.4f} | {r['adapter'][384]['ndcg@10']:.4f} | "
              f"{'yes' if r == embedded else 'no'} |")


if __name__ == "__main__":
    from common import run_and_save  # writes the report to bench/results/ too

    run_and_save(main, "stores")
