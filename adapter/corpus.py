"""Where a system's corpus vectors come from: one source type, in one module, whatever holds the vectors.

A corpus source has ``name`` (what messages call it) and ``read(dataset, encoder) -> (ids, vectors)``: the corpus ids
and their (n, d) float32 unit vectors, of the encoder's dimension. ``EncodedCorpus`` is the encoder's own cached
encoding of corpus.jsonl (the default); ``StoreSource`` reads every vector out of an existing store or a vector file
(``--store faiss:``, ``qdrant:``, ``chroma:``, ``pgvector:``, ``vectors:``); ``VectorCorpus`` holds vectors
already read. ``SearchedStore`` is the one source that is searched instead of read: the store ranks, the judge scores
its rankings. Training (``adapter.train``), the systems (``adapter.systems``) and every verb take a source, so none
of them needs to know which kind it has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from adapter.config import Config, StoreConfig
from adapter.data import Dataset
from adapter.errors import AdapterError
from adapter.stores import ArrayStore, Store, corpus_from_store, dsn_name, hit_names, open_store, read_vector_file

if TYPE_CHECKING:
    from adapter.encoder import Encoder


class CorpusSource(Protocol):
    """Where a system's corpus vectors come from."""

    name: str  # what messages call it

    def read(self, dataset: Dataset, encoder: Encoder) -> tuple[list[str], np.ndarray]:
        """(corpus ids, (n, d) float32 unit vectors) for ``dataset``, ``encoder`` being the system's own."""
        ...


@dataclass
class EncodedCorpus:
    """The system encoder's own (cached) encoding of corpus.jsonl: the default source."""

    name: str = "corpus.jsonl"

    def read(self, dataset: Dataset, encoder: Encoder) -> tuple[list[str], np.ndarray]:
        ids = list(dataset.corpus)
        return ids, encoder.encode_documents([dataset.doc_text(c) for c in ids])


@dataclass
class VectorCorpus:
    """Vectors already made, named by corpus id: read out of an existing index or a file. The index is then scored
    as it stands, nothing re-embedded."""

    ids: list[str]
    vectors: np.ndarray  # (n, d) float32
    name: str = "the index"

    def read(self, dataset: Dataset, encoder: Encoder) -> tuple[list[str], np.ndarray]:
        if self.vectors.shape[1] != encoder.dim:
            raise AdapterError(f"{self.name} holds {self.vectors.shape[1]}-dimensional vectors, {encoder.identity} "
                               f"makes {encoder.dim}")
        return self.ids, self.vectors

    @classmethod
    def from_store(cls, store: Store, dataset: Dataset, split: str | Collection[str], *,
                   id_field: str | None = None) -> VectorCorpus:
        """Every vector of ``store``, named by corpus id and checked to hold each chunk ``split`` judges (a split's
        name, or the chunk ids themselves)."""
        ids, vectors = corpus_from_store(store, dataset, split, id_field=id_field)
        return cls(ids, vectors, store.name)


@dataclass(frozen=True)
class StoreSource:
    """Where a team's corpus vectors already are: one store, or a vector file (with its ids). A corpus source of
    ``adapter.systems`` (``read``), so train, evaluate, compare and search take it in place of embedding corpus.jsonl;
    ``store`` holds the settings it is opened with (``with_settings`` takes them from a Config)."""

    index: str | None = None
    qdrant: str | None = None
    chroma: str | None = None
    pgvector: str | None = None
    collection: str | None = None
    table: str | None = None
    vectors: str | None = None  # --store vectors:FILE: .npy (with ``ids``) or .parquet
    ids: str | None = None  # --store vectors:VECTORS.npy,IDS.txt
    store: StoreConfig = field(default_factory=StoreConfig)  # nprobe, ef_search, id_field, batch

    def __bool__(self) -> bool:
        """True when anything was given (a stray collection too, so that it is refused rather than ignored)."""
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self) if f.name != "store")

    def with_settings(self, cfg: Config) -> StoreSource:
        return dataclasses.replace(self, store=cfg.store)

    @property
    def name(self) -> str:
        given = self.vectors or self.index or self.qdrant or self.chroma or (self.pgvector and dsn_name(self.pgvector))
        return str(given or "no store")

    def open(self, cfg: Config | None = None) -> Store:
        """The store named (``open_store``), or the vector file as an ``ArrayStore``."""
        cfg = cfg or Config().replace(store=self.store)
        if self.vectors is not None:
            if any(v is not None for v in (self.index, self.qdrant, self.chroma, self.pgvector)):
                raise AdapterError("pass either a vector file or a store (index, qdrant, chroma, "
                                   "pgvector), not both")
            return ArrayStore(str(self.vectors), *read_vector_file(self.vectors, self.ids))
        if self.ids is not None:
            raise AdapterError("an ids file goes with a vector file VECTORS.npy")
        return open_store(index=self.index, qdrant=self.qdrant, chroma=self.chroma, pgvector=self.pgvector,
                          collection=self.collection, table=self.table, cfg=cfg)

    def read(self, dataset: Dataset, encoder: Encoder) -> tuple[list[str], np.ndarray]:
        """Every vector, named by corpus id and put in corpus.jsonl's order, each chunk any split of ``dataset``
        judges among them, of ``encoder``'s dimension: nothing of the corpus is embedded."""
        judged = {c for qrels in dataset.qrels.values() for rels in qrels.values() for c in rels}
        with self.open() as store:
            ids, vectors = corpus_from_store(store, dataset, judged, id_field=self.store.id_field)
            name = store.name
        if vectors.shape[1] != encoder.dim:
            raise AdapterError(f"{name} holds {vectors.shape[1]}-dimensional vectors, {encoder.identity} makes "
                               f"{encoder.dim}")
        return ids, vectors


@dataclass
class SearchedStore:
    """A store scored as it serves (``evaluate --store-search``): each query's ranking is the store's own search
    (adapted query vectors in, the top ``k`` ids out, named as corpus ids by ``adapter.stores.hit_names``), no vector
    read out. ``adapter.systems.score`` judges those rankings (``adapter.evaluate.evaluate_ranked``) at the store's
    dimension only."""

    store: Store
    id_field: str | None = None

    @property
    def name(self) -> str:
        return self.store.name

    @property
    def dim(self) -> int:
        return self.store.dim

    def rank(self, dataset: Dataset, query_vectors: np.ndarray, k: int) -> list[list[str]]:
        """Each query's top ``k`` corpus ids by the store's own search."""
        hits = self.store.search(query_vectors, k, id_field=self.id_field)
        return [hit_names(self.store, dataset, h) for h in hits]

    def read(self, dataset: Dataset, encoder: Encoder) -> tuple[list[str], np.ndarray]:
        raise AdapterError(f"{self.store.name}: scored through its own search; its vectors are not read out")
