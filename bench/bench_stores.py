"""Adapted search through existing stores (issue #7): on 100 AppleQA test queries (query split, seed 0) adapted by the
default adapter, each store's top-10 against the brute-force top-10 over the same vectors; then `adapter evaluate`
reading the corpus from each store against embedding it.

    python bench/bench_stores.py [--shared ../shared] [--distractors]

Two corpora: AppleQA's 215 chunks, and (--distractors) those chunks plus its 4,300 questions embedded as documents
(4,515 vectors), where approximate indexes have something to get wrong. FAISS files are built here the way a user
builds their own; Qdrant is a local folder (qdrant-client's local mode), Chroma an embedded PersistentClient.
Prints Markdown on stdout (bench/stores.md quotes it).
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


def faiss_files(work: Path, vectors, ids) -> dict[str, tuple[Path, dict]]:
    """The user's own indexes: flat (as `adapter index build` writes), IVF-flat and HNSW-flat, inner product, each
    under an id map holding the given int64 ids; the setting each row searches with."""
    import faiss
    import numpy as np

    n, d = vectors.shape
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS's rule of thumb, within its 39-points-per-list floor
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    built = {"flat": faiss.IndexFlatIP(d), f"IVF{nlist},Flat": ivf, "HNSW32,Flat": faiss.IndexHNSWFlat(
        d, 32, faiss.METRIC_INNER_PRODUCT)}
    out = {}
    for name, index in built.items():
        index = faiss.IndexIDMap2(index)
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        path = work / f"{name.replace(',', '-')}.faiss"
        faiss.write_index(index, str(path))
        out[name] = path
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    p.add_argument("--distractors", action="store_true")
    a = p.parse_args()

    import chromadb
    import numpy as np
    import qdrant_client
    from qdrant_client import models

    from adapter.config import Config
    from adapter.data import convert, load_dataset, relevant, split_dataset
    from adapter.encoder import Encoder
    from adapter.pipeline import evaluate_dataset
    from adapter.stores import ChromaStore, FaissStore, QdrantStore, corpus_from_store
    from adapter.train import train_adapter

    work = Path(tempfile.mkdtemp(prefix="bench-stores-"))
    folder = work / "appleqa-query"
    convert(a.shared / "data" / "appleqa" / "apple_QA_dataset.json", folder)
    split_dataset(folder, by="query", test_fraction=0.2, seed=0)
    ds = load_dataset(folder)
    encoder = Encoder("sentence-transformers/all-MiniLM-L6-v2", cache_dir=work / "cache", show_progress=False)
    adapter = train_adapter(ds, encoder, Config(), progress=False).adapter
    qids = list(relevant(ds.split("test")))[:100]
    queries = adapter.apply(encoder.encode_queries([ds.queries[q] for q in qids]))  # (100, 384), adapted

    cids = list(ds.corpus)
    vectors = encoder.encode_documents([ds.doc_text(c) for c in cids])
    if a.distractors:
        vectors = np.concatenate([vectors, encoder.encode_documents(list(ds.queries.values()))])
    n = len(vectors)
    names = cids + [f"x{i}" for i in range(n - len(cids))]  # corpus ids, then the distractors' own
    ids = np.arange(n) * 10 + 7  # ids a user's store might hold: not row numbers
    scores = queries @ vectors.T
    truth = np.argsort(-scores, axis=1, kind="stable")[:, :K]  # brute force, (100, 10) rows

    stores = {}
    for name, path in faiss_files(work, vectors, ids).items():
        if name != "flat":
            stores[f"FAISS {name}, FAISS's own settings (nprobe 1, efSearch 16)"] = (
                lambda p=path: FaissStore(p, nprobe=1, ef_search=16))
        stores[f"FAISS {name}, defaults (nprobe {Config.nprobe}, efSearch {Config.ef_search})"] = (
            lambda p=path: FaissStore(p))
    qc = qdrant_client.QdrantClient(path=str(work / "qdrant"))
    qc.create_collection("apple", vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE))
    qc.upload_points("apple", [models.PointStruct(id=int(i), vector=v.tolist(), payload={"corpus_id": c})
                               for i, v, c in zip(ids, vectors, names, strict=True)])
    qc.close()
    stores["Qdrant, local folder (cosine)"] = lambda: QdrantStore(str(work / "qdrant"), "apple")
    cc = chromadb.PersistentClient(path=str(work / "chroma"),
                                   settings=chromadb.config.Settings(anonymized_telemetry=False))
    col = cc.create_collection("apple", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
    for s in range(0, n, 1000):
        col.add(ids=[str(i) for i in ids[s:s + 1000]], embeddings=vectors[s:s + 1000],
                metadatas=[{"corpus_id": c} for c in names[s:s + 1000]])
    stores["Chroma, embedded PersistentClient (cosine, its default HNSW)"] = (
        lambda: ChromaStore(str(work / "chroma"), "apple"))

    print(f"{len(qids)} AppleQA test queries, adapted by the default adapter; corpus {n:,} vectors"
          f"{' (215 chunks + 4,300 questions as distractors)' if a.distractors else ' (the 215 chunks)'}.\n")
    print("| store | recall@10 vs brute force: min per query | mean | queries with the exact top-10 list | "
          "ms per query |")
    print("|---|---|---|---|---|")
    own = {str(i): row for row, i in enumerate(ids)}
    for name, open_ in stores.items():
        store = open_()
        t = time.perf_counter()
        hits = store.search(queries, K)
        ms = (time.perf_counter() - t) * 1000 / len(queries)
        rows = [[own[str(i)] for i in h.ids] for h in hits]
        recall = np.array([len(set(r) & set(t)) / K for r, t in zip(rows, truth, strict=True)])
        exact = sum(r == t.tolist() for r, t in zip(rows, truth, strict=True))
        print(f"| {name} | {recall.min():.2f} | {recall.mean():.4f} | {exact}/{len(rows)} | {ms:.2f} |")
        store.close()

    print("\n`adapter evaluate` on the test split (860 queries), corpus read from each store against embedded:\n")
    print("| corpus from | base ndcg@10 | adapter ndcg@10 |")
    print("|---|---|---|")
    embedded = evaluate_dataset(ds, encoder, dims=[384], adapters={"adapter": adapter})
    print(f"| embedded (cache), 215 chunks | {embedded['base'][384]['ndcg@10']:.4f} | "
          f"{embedded['adapter'][384]['ndcg@10']:.4f} |")
    for name, make in (("FAISS IndexIDMap2(IVF)", lambda: FaissStore(next(work.glob("IVF*.faiss")))),
                       ("Qdrant", lambda: QdrantStore(str(work / "qdrant"), "apple")),
                       ("Chroma", lambda: ChromaStore(str(work / "chroma"), "apple"))):
        with make() as store:
            field = None if name.startswith("FAISS") else "corpus_id"
            if field is None:  # the FAISS ids are 10 i + 7: name them through the bench's own table
                got_ids, vecs = store.vectors()
                corpus = ([names[own[str(i)]] for i in got_ids], vecs)
            else:
                corpus = corpus_from_store(store, ds, "test", id_field=field)
        r = evaluate_dataset(ds, encoder, dims=[384], adapters={"adapter": adapter}, corpus=corpus)
        print(f"| {name}, {len(corpus[0]):,} vectors | {r['base'][384]['ndcg@10']:.4f} | "
              f"{r['adapter'][384]['ndcg@10']:.4f} |")


if __name__ == "__main__":
    main()
