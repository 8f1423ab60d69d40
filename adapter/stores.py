"""Where a team's vectors already live: a FAISS file, a Qdrant collection or a Chroma collection, behind one interface.

Nothing here embeds text. ``search`` sends (already adapted) query vectors to the store and returns the store's own
ids; ``vectors`` reads every stored vector back out so the judge can score the index as it is. Scores are inner
products whatever the store's metric (the cosine, for unit vectors): an L2 distance d between unit vectors is turned
into 1 - d²/2, a cosine or inner-product distance d into 1 - d. Qdrant and Chroma are pip extras (``adapter[qdrant]``,
``adapter[chroma]``), imported only when such a store is opened. The FAISS file helpers (``write_index``,
``read_index``, ``search_index``) are here too: `adapter index build` writes with them, ``FaissStore`` reads.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import struct
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import faiss
import numpy as np

from adapter.config import Config, StoreConfig
from adapter.data import Dataset, atomic_write
from adapter.errors import AdapterError, hold_secret, hold_url_secrets, one_line, redact, refuse_existing

logger = logging.getLogger(__name__)

Id = int | str  # a store's own id: FAISS int64, Qdrant int or UUID string, Chroma string


@dataclass
class Hits:
    """One query's results, best first: the store's own ids, their scores, and (with an id field) corpus ids."""

    ids: list[Id]
    scores: list[float]
    names: list[str | None] = field(default_factory=list)  # the id field's value per hit, when one was asked for


def _require(module: str, extra: str) -> Any:
    """Import an optional integration or raise one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise AdapterError(f"{module} is not installed; pip install 'adapter[{extra}]'") from None


def _is_url(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


def _check_queries(queries: np.ndarray, k: int, dim: int, name: str) -> np.ndarray:
    """Query vectors as a C-contiguous (n, dim) float32 array, or one line on a bad ``k`` or dimension."""
    if k < 1:
        raise AdapterError(f"-k must be at least 1, got {k}")
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if q.shape[1] != dim:
        raise AdapterError(f"{name} holds {dim}-dimensional vectors, queries have {q.shape[1]}")
    return q


def _request(where: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A client call whose failure (network, server, lock) is one line naming the store."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # clients raise many types
        raise AdapterError(f"{where}: {what} failed ({one_line(e)})") from None


class Store:
    """A vector store searched with adapted query vectors. Subclasses set ``name`` (what messages call it), ``dim``,
    and ``rows_are_ids`` (true for a FAISS index without an id map: its ids are insertion rows, which
    ``adapter index build`` makes the line numbers of corpus.jsonl)."""

    name: str
    dim: int
    rows_are_ids: bool = False

    def search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        """Top-``k`` hits for each query vector (n, d)."""
        raise NotImplementedError

    def vectors(self, *, id_field: str | None = None) -> tuple[list[Id], np.ndarray]:
        """Every stored vector, (n, d) float32, with its id (or its ``id_field`` value)."""
        raise NotImplementedError

    def exact_search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        """Top-``k`` by brute force over every stored vector: what ``search`` is checked against. This default reads
        the vectors out and ranks them by the judge's exact search (ties by id); stores that can search exhaustively
        themselves do so without holding them all."""
        from adapter.evaluate import search

        ids, vectors = self.vectors(id_field=id_field)
        scores, rows = search(self._check(queries, k), vectors, k, tie_rank=_id_rank(ids))
        return [Hits([ids[i] for i in r], [float(x) for x in sc]) for sc, r in zip(scores, rows, strict=True)]

    def close(self) -> None:
        """Release the client (a local Qdrant folder is locked while it is open)."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, queries: np.ndarray, k: int) -> np.ndarray:
        return _check_queries(queries, k, self.dim, f"{self.name}:")


# ---------------------------------------------------------------------------------------------------------- FAISS


def write_index(vectors: np.ndarray, path: str | os.PathLike, ids: np.ndarray | None = None, *,
                force: bool = False) -> Path:
    """Write an exact inner-product FAISS index of (unit) vectors; ``ids`` (int64) are stored when given. An
    existing file is replaced only with ``force``."""
    refuse_existing(path, force)
    index = faiss.IndexFlatIP(vectors.shape[1])
    if ids is not None:
        index = faiss.IndexIDMap2(index)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    else:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(faiss.serialize_index(index).tobytes())
    return path


def read_index(path: str | os.PathLike) -> faiss.Index:
    """Read a FAISS index file with a one-line error when it is not one. Every array its header declares is first
    checked against the bytes the file holds (``FaissLayout``): FAISS allocates what a file declares before reading
    it, so a 61-byte file declaring 2.5 GB of vectors would cost 2.5 GB before failing."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            FaissLayout(f, path).check()
            f.seek(0)
            return faiss.read_index(faiss.PyCallbackIOReader(f.read))  # the file checked, not one renamed in since
    except OSError as e:
        raise AdapterError(f"{path}: cannot read ({e.strerror or one_line(e)})") from None
    except RuntimeError as e:
        raise AdapterError(f"{path}: not a readable FAISS index ({one_line(e)})") from None


class FaissLayout:
    """Walks a FAISS index file as ``faiss.read_index`` reads it, for the index types adapter reads (flat, IVF flat,
    PQ or SQ, HNSW flat, PQ or SQ, PQ, SQ, each under an id map, a linear pre-transform such as OPQ or PCA, or
    neither), reading the scalars and skipping every array after checking that its declared size fits in the bytes
    left. Nothing it declares is allocated; a type it does not know is refused (it could not be checked)."""

    HASHTABLE = 2  # faiss DirectMap::Hashtable

    def __init__(self, f: Any, path: Path):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def check(self) -> None:
        self.index()

    # the file's pieces
    def _bad(self, why: str) -> AdapterError:
        return AdapterError(f"{self.path}: not a readable FAISS index ({why})")

    def take(self, fmt: str) -> tuple[Any, ...]:
        n = struct.calcsize(fmt)
        data = self.f.read(n)
        if len(data) != n:
            raise self._bad(f"the file ends at byte {self.size:,}, inside a header")
        return struct.unpack(fmt, data)

    def one(self, fmt: str) -> Any:
        return self.take("<" + fmt)[0]

    def left(self) -> int:
        return self.size - self.f.tell()

    def array(self, item: int, count: int | None = None, what: str = "an array") -> int:
        """Skip an array of ``count`` items of ``item`` bytes (``count`` read first, as faiss's READVECTOR does,
        when not given); refused when the file does not hold it."""
        if count is None:
            count = self.one("Q")
        if count * item > self.left():
            raise self._bad(f"declares {what} of {count * item:,} bytes at byte {self.f.tell():,}, but the file "
                            f"holds {self.size:,} bytes")
        self.f.seek(count * item, os.SEEK_CUR)
        return count

    # faiss's structures
    def header(self) -> tuple[int, int]:
        d, ntotal, _, _, _, metric = self.take("<iqqq?i")
        if metric > 1:
            self.one("f")
        if d < 0 or ntotal < 0:
            raise self._bad(f"dimension {d}, {ntotal} vectors")
        return d, ntotal

    def pq(self) -> None:
        self.take("<QQQ")  # d, M, nbits
        self.array(4, what="PQ centroids")

    def sq(self) -> None:
        self.take("<iifQQ")  # qtype, rangestat, rangestat_arg, d, code_size
        self.array(4, what="SQ training ranges")

    def invlists(self) -> None:
        kind = self.f.read(4)
        if kind == b"il00":
            return
        if kind != b"ilar":
            raise self._bad(f"inverted lists of type {kind!r}, which adapter does not read")
        nlist, code_size = self.take("<QQ")
        if nlist * 8 > self.left():  # faiss makes a table of nlist sizes before reading them
            raise self._bad(f"declares {nlist:,} inverted lists in {self.size:,} bytes")
        listing, count = self.f.read(4), self.one("Q")
        if listing == b"full" and count == nlist:
            sizes = self.numbers(count, "list sizes")
        elif listing == b"sprs" and count % 2 == 0:
            sizes = self.numbers(count, "list sizes")[1::2]  # (list, size) pairs
        else:
            raise self._bad(f"{count} list sizes stored as {listing!r} for {nlist} lists")
        self.array(code_size + 8, int(sizes.astype(object).sum()), "inverted lists")  # codes and ids

    def numbers(self, count: int, what: str) -> np.ndarray:
        """Read an array of ``count`` uint64 (after checking that the file holds it)."""
        start = self.f.tell()
        self.array(8, count, what)
        self.f.seek(start)
        return np.frombuffer(self.f.read(8 * count), dtype="<u8")

    def ivf(self) -> None:
        self.header()
        self.take("<QQ")  # nlist, nprobe
        self.index()  # the coarse quantizer
        if self.one("b") == self.HASHTABLE:
            self.array(8, what="a direct map")
            self.array(16, what="a direct map")
        else:
            self.array(8, what="a direct map")

    def index(self) -> None:
        kind = self.f.read(4)
        if kind in (b"IxFI", b"IxF2", b"IxFl"):
            d, ntotal = self.header()
            if self.array(4, what="vectors") != d * ntotal:
                raise self._bad(f"holds a vector array that is not {ntotal} vectors of dimension {d}")
        elif kind in (b"IxMp", b"IxM2"):
            self.header()
            self.index()
            self.array(8, what="ids")
        elif kind == b"IwFl":
            self.ivf()
            self.invlists()
        elif kind == b"IwPQ":
            self.ivf()
            self.take("<?Q")  # by_residual, code_size
            self.pq()
            self.invlists()
        elif kind in (b"IwSQ", b"IwSq"):
            self.ivf()
            self.sq()
            self.one("Q")  # code_size
            if kind == b"IwSq":
                self.one("?")  # by_residual
            self.invlists()
        elif kind in (b"IHNf", b"IHNp", b"IHNs"):
            self.header()
            for item, what in ((8, "HNSW level probabilities"), (4, "HNSW neighbours per level"),
                               (4, "HNSW levels"), (8, "HNSW offsets"), (4, "HNSW neighbours")):
                self.array(item, what=what)
            self.take("<5i")  # entry point, max level, efConstruction, efSearch, a retired field
            self.index()  # the vectors' storage
        elif kind in (b"IxPQ", b"IxPo", b"IxPq"):
            self.header()
            self.pq()
            self.array(1, what="PQ codes")
            if kind != b"IxPQ":
                self.take("<i?i")  # search type, encode signs, polysemous threshold
        elif kind == b"IxSQ":
            self.header()
            self.sq()
            self.array(1, what="SQ codes")
        elif kind == b"IxPT":
            self.header()
            for _ in range(self.one("i")):
                self.transform()
            self.index()
        else:
            raise self._bad(f"a {kind.decode('latin-1')!r} index, which adapter does not read: flat, IVF (flat, PQ, "
                            "SQ), HNSW, PQ or SQ, under an id map or a linear pre-transform (OPQ, PCA) or not")

    def transform(self) -> None:
        """A vector transform of an IndexPreTransform: the linear ones (OPQ, PCA, random rotation), normalisation,
        centring, a dimension remap."""
        kind = self.f.read(4)
        if kind in (b"rrot", b"PCAm", b"LTra", b"PcAm", b"Pcam", b"Viqm"):
            if kind in (b"PCAm", b"PcAm", b"Pcam"):
                self.one("f")  # eigen power
                if kind == b"Pcam":
                    self.one("f")  # epsilon
                self.one("?")  # random rotation
                if kind != b"PCAm":
                    self.one("i")  # balanced bins
                for what in ("a PCA mean", "PCA eigenvalues", "a PCA matrix"):
                    self.array(4, what=what)
            elif kind == b"Viqm":
                self.take("<ii")  # max iterations, seed
            self.one("?")  # has bias
            self.array(4, what="a transform matrix")
            self.array(4, what="a transform bias")
        elif kind == b"RmDT":
            self.array(4, what="a dimension map")
        elif kind == b"VNrm":
            self.one("f")
        elif kind == b"VCnt":
            self.array(4, what="a centring mean")
        else:
            raise self._bad(f"a {kind.decode('latin-1')!r} vector transform, which adapter does not read")
        self.take("<ii?")  # d_in, d_out, is_trained


def search_index(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query from the index, with the index's own int64 ids; -1 ids are dropped by the
    caller. The query vectors must have the index's dimension."""
    return index.search(_check_queries(queries, k, index.d, "index"), k)


def _layers(index: faiss.Index) -> list[faiss.Index]:
    """The index and every index inside it (id maps, pre-transforms, refinement, IVF coarse quantizers)."""
    out, todo = [], [index]
    while todo:
        layer = faiss.downcast_index(todo.pop())
        out.append(layer)
        for attr in ("index", "base_index", "quantizer"):
            inner = getattr(layer, attr, None)
            if isinstance(inner, faiss.Index):
                todo.append(inner)
    return out


class _Stored:
    """A FAISS index's stored vectors as the judge's search reads a corpus (``shape``, row slices): each block
    reconstructed when it is searched, so memory stays flat however large the index."""

    def __init__(self, name: str, index: faiss.Index):
        self.name, self.index = name, index
        self.shape = (index.ntotal, index.d)

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi = rows.start, min(rows.stop, self.index.ntotal)
        try:
            return np.asarray(self.index.reconstruct_n(lo, hi - lo), dtype=np.float32)
        except RuntimeError as e:
            raise AdapterError(f"{self.name}: cannot read vectors back from this {type(self.index).__name__} "
                               f"({one_line(e)})") from None


def _id_rank(ids: Sequence[Id]) -> np.ndarray:
    """Each stored vector's rank by its id as text: the judge's tie-break (``adapter.evaluate.id_rank``), which a
    store's ids meet named as corpus ids."""
    from adapter.evaluate import id_rank

    return id_rank([str(i) for i in ids])


class FaissStore(Store):
    """A FAISS index file: flat, IVF or HNSW, plain or under an id map (whose int64 ids are kept)."""

    def __init__(self, path: str | os.PathLike, *, nprobe: int = StoreConfig.nprobe,
                 ef_search: int = StoreConfig.ef_search):
        if nprobe < 1 or ef_search < 1:
            raise AdapterError(f"store.nprobe and store.ef_search must be at least 1, got {nprobe} and {ef_search}")
        self.name = str(path)
        self.index = read_index(path)
        self.dim = self.index.d
        self.nprobe, self.ef_search = nprobe, ef_search
        self.metric = self.index.metric_type
        if self.metric not in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
            raise AdapterError(f"{path}: FAISS metric {self.metric} is not supported (inner product or L2 only)")
        self.layers = _layers(self.index)
        self.id_map = next((x for x in self.layers if isinstance(x, faiss.IndexIDMap | faiss.IndexIDMap2)), None)
        self.ivf = next((x for x in self.layers if isinstance(x, faiss.IndexIVF)), None)
        self.rows_are_ids = self.id_map is None and (self.ivf is None or bool(
            np.array_equal(np.sort(self._ivf_ids()), np.arange(self.index.ntotal))))

    def _tune(self, k: int) -> None:
        """Search settings: IVF lists probed, HNSW candidate list (at least k), wherever they sit in the index."""
        for layer in self.layers:
            if isinstance(layer, faiss.IndexIVF):
                layer.nprobe = min(self.nprobe, layer.nlist)
            hnsw = getattr(layer, "hnsw", None)
            if hnsw is not None:
                hnsw.efSearch = max(self.ef_search, k)

    def search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        if id_field:
            raise AdapterError(f"{self.name}: store.id_field applies to Qdrant and Chroma collections, not FAISS files")
        self._tune(k)
        scores, ids = search_index(self.index, queries, k)
        if self.metric == faiss.METRIC_L2:  # squared L2 between unit vectors is 2 - 2 cos
            scores = 1.0 - scores / 2.0
        return [Hits([int(i) for i in row if i >= 0], [float(s) for s, i in zip(srow, row, strict=True) if i >= 0])
                for srow, row in zip(scores, ids, strict=True)]

    def exact_search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        """IVF (flat, PQ, SQ): every list probed, so every stored code is scored, exactly as stored. Others (flat,
        HNSW): every vector read back a block at a time and ranked by the judge's own exact search, ties by id."""
        if id_field:
            raise AdapterError(f"{self.name}: store.id_field applies to Qdrant and Chroma collections, not FAISS files")
        if self.ivf is not None:
            nprobe = self.nprobe
            self.nprobe = self.ivf.nlist
            try:
                return self.search(queries, k)
            finally:
                self.nprobe = nprobe
        from adapter.evaluate import search

        inner = faiss.downcast_index(self.id_map.index) if self.id_map is not None else self.layers[0]
        ids = faiss.vector_to_array(self.id_map.id_map) if self.id_map is not None else np.arange(inner.ntotal)
        scores, rows = search(self._check(queries, k), _Stored(self.name, inner), k, tie_rank=_id_rank(ids))
        return [Hits([int(ids[r]) for r in row], [float(x) for x in sc]) for sc, row in zip(scores, rows, strict=True)]

    def _ivf_ids(self) -> np.ndarray:
        """The ids stored in the IVF's inverted lists, list by list."""
        lists = self.ivf.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(self.ivf.nlist) if lists.list_size(i)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def vectors(self, *, id_field: str | None = None) -> tuple[list[Id], np.ndarray]:
        if id_field:
            raise AdapterError(f"{self.name}: store.id_field applies to Qdrant and Chroma collections, not FAISS files")
        inner = faiss.downcast_index(self.id_map.index) if self.id_map is not None else self.layers[0]
        try:
            if self.ivf is not None:  # rows come back list by list; a hash table finds each id's vector
                keys = np.sort(self._ivf_ids())
                self.ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
                vectors = inner.reconstruct_batch(keys)
            else:
                keys = np.arange(inner.ntotal)
                vectors = inner.reconstruct_n(0, inner.ntotal)
        except RuntimeError as e:
            raise AdapterError(f"{self.name}: cannot read vectors back from this {type(inner).__name__} "
                               f"({one_line(e)})") from None
        ids = faiss.vector_to_array(self.id_map.id_map)[keys] if self.id_map is not None else keys
        return [int(i) for i in ids], np.asarray(vectors, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------- Qdrant


class QdrantStore(Store):
    """A Qdrant collection: a local folder (``QdrantClient(path=...)``) or a server URL (key in $QDRANT_API_KEY)."""

    def __init__(self, location: str, collection: str, *, ef_search: int = StoreConfig.ef_search,
                 batch: int = StoreConfig.batch):
        qdrant = _require("qdrant_client", "qdrant")
        self.models = importlib.import_module("qdrant_client.models")
        self.name, self.collection = f"{location}#{collection}", collection
        self.ef_search, self.batch, self.local = ef_search, batch, not _is_url(location)
        if self.local and not (Path(location) / "meta.json").is_file():  # QdrantClient(path=) would create one
            raise AdapterError(f"{location}: not a local Qdrant folder (no meta.json)")
        try:
            if not self.local:
                self.client = qdrant.QdrantClient(url=location, api_key=os.environ.get("QDRANT_API_KEY"))
            else:
                self.client = qdrant.QdrantClient(path=location)
            if not self.client.collection_exists(collection):
                names = sorted(c.name for c in self.client.get_collections().collections)
                raise AdapterError(f"{location}: no Qdrant collection {collection!r} (it has: "
                                   f"{', '.join(names) or 'none'})")
            params = self.client.get_collection(collection).config.params.vectors
        except AdapterError:
            raise
        except Exception as e:  # connection, lock and server errors come in many types
            raise AdapterError(f"{location}: cannot open Qdrant ({one_line(e)})") from None
        self.using: str | None = None
        if isinstance(params, dict):
            if len(params) != 1:
                raise AdapterError(f"{self.name}: holds several named vectors ({', '.join(sorted(params))}); only "
                                   "collections with one vector per point are supported")
            self.using, params = next(iter(params.items()))
        self.dim, self.distance = params.size, params.distance
        if self.distance not in (self.models.Distance.COSINE, self.models.Distance.DOT, self.models.Distance.EUCLID):
            raise AdapterError(f"{self.name}: {self.distance} distance is not supported (cosine, dot or Euclid)")

    def _payload(self, point: Any, id_field: str | None) -> str | None:
        if id_field is None:
            return None
        value = (point.payload or {}).get(id_field)
        if value is None:
            raise AdapterError(f"{self.name}: point {point.id} has no payload field {id_field!r}")
        return str(value)

    def search(self, queries: np.ndarray, k: int, *, id_field: str | None = None, exact: bool = False) -> list[Hits]:
        q = self._check(queries, k)
        params = None if self.local else self.models.SearchParams(hnsw_ef=max(self.ef_search, k),
                                                                  exact=exact)  # local: always exact
        out = []
        for vector in q:
            points = _request(self.name, "Qdrant search", self.client.query_points, self.collection,
                              query=vector.tolist(), using=self.using, limit=k, search_params=params,
                              with_payload=[id_field] if id_field else False).points
            scores = [float(p.score) for p in points]
            if self.distance == self.models.Distance.EUCLID:  # Qdrant returns the (unsquared) distance
                scores = [1.0 - s * s / 2.0 for s in scores]
            names = [self._payload(p, id_field) for p in points] if id_field else []
            out.append(Hits([p.id for p in points], scores, names))
        return out

    def exact_search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        """Qdrant's own exhaustive search (``exact=True``)."""
        return self.search(queries, k, id_field=id_field, exact=True)

    def vectors(self, *, id_field: str | None = None) -> tuple[list[Id], np.ndarray]:
        ids: list[Id] = []
        rows: list[Sequence[float]] = []
        offset = None
        while True:
            points, offset = _request(self.name, "Qdrant scroll", self.client.scroll, self.collection,
                                      limit=self.batch, offset=offset, with_vectors=True,
                                      with_payload=[id_field] if id_field else False)
            for p in points:
                ids.append(self._payload(p, id_field) if id_field else p.id)
                rows.append(p.vector[self.using] if self.using else p.vector)
            if offset is None:
                break
        return ids, np.asarray(rows, dtype=np.float32).reshape(len(rows), self.dim)

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------------------------- Chroma


class ChromaStore(Store):
    """A Chroma collection: an embedded ``PersistentClient`` folder or a server URL (``HttpClient``). Chroma fixes its
    HNSW candidate list per collection; asking for ``ef_search`` results and keeping the top k widens it for this
    search alone (HNSW searches with the larger of the two), leaving the collection's settings untouched."""

    def __init__(self, location: str, collection: str, *, ef_search: int = StoreConfig.ef_search,
                 batch: int = StoreConfig.batch):
        chromadb = _require("chromadb", "chroma")
        self.name, self.ef_search, self.batch = f"{location}#{collection}", ef_search, batch
        if not _is_url(location) and not (Path(location) / "chroma.sqlite3").is_file():  # else Chroma creates one
            raise AdapterError(f"{location}: not a Chroma folder (no chroma.sqlite3)")
        settings = chromadb.config.Settings(anonymized_telemetry=False)
        try:
            if _is_url(location):
                url = urlparse(location)
                https = url.scheme == "https"
                client = chromadb.HttpClient(host=url.hostname, port=url.port or (443 if https else 8000), ssl=https,
                                             settings=settings)
            else:
                client = chromadb.PersistentClient(path=location, settings=settings)
            names = sorted(c if isinstance(c, str) else c.name for c in client.list_collections())
            if collection not in names:
                raise AdapterError(f"{location}: no Chroma collection {collection!r} (it has: "
                                   f"{', '.join(names) or 'none'})")
            self.collection = client.get_collection(collection)
            self.dim, self.count = self._dimension(), self.collection.count()
        except AdapterError:
            raise
        except Exception as e:
            raise AdapterError(f"{location}: cannot open Chroma ({one_line(e)})") from None
        self.space = self._space()

    def _space(self) -> str:
        config = self.collection.configuration_json or {}
        hnsw = config.get("hnsw") or config.get("spann") or {}
        space = hnsw.get("space") or (self.collection.metadata or {}).get("hnsw:space") or "l2"
        if space not in ("l2", "cosine", "ip"):
            raise AdapterError(f"{self.name}: space {space!r} is not supported (l2, cosine or ip)")
        return space

    def _dimension(self) -> int:
        first = self.collection.get(limit=1, include=["embeddings"])["embeddings"]
        if first is None or not len(first):
            raise AdapterError(f"{self.name}: collection is empty")
        return len(first[0])

    def search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        q = self._check(queries, k)
        include = ["distances", "metadatas"] if id_field else ["distances"]
        res = _request(self.name, "Chroma query", self.collection.query, query_embeddings=q,
                       n_results=min(max(k, self.ef_search), self.count), include=include)
        out = []
        for i, (ids, dists) in enumerate(zip(res["ids"], res["distances"], strict=True)):
            ids, dists = ids[:k], dists[:k]
            scores = [1.0 - d / 2.0 if self.space == "l2" else 1.0 - d for d in map(float, dists)]
            names = [self._meta(m, pid, id_field) for pid, m in zip(ids, res["metadatas"][i][:k], strict=True)] if (
                id_field) else []
            out.append(Hits(list(ids), scores, names))
        return out

    def _meta(self, metadata: dict | None, pid: str, id_field: str) -> str:
        value = (metadata or {}).get(id_field)
        if value is None:
            raise AdapterError(f"{self.name}: record {pid!r} has no metadata field {id_field!r}")
        return str(value)

    def vectors(self, *, id_field: str | None = None) -> tuple[list[Id], np.ndarray]:
        ids: list[Id] = []
        rows: list[np.ndarray] = []
        include = ["embeddings", "metadatas"] if id_field else ["embeddings"]
        while True:
            got = _request(self.name, "Chroma get", self.collection.get, limit=self.batch, offset=len(ids),
                           include=include)
            if not got["ids"]:
                break
            names = ([self._meta(m, p, id_field) for p, m in zip(got["ids"], got["metadatas"], strict=True)]
                     if id_field else got["ids"])
            ids.extend(names)
            rows.append(np.asarray(got["embeddings"], dtype=np.float32))
        return ids, np.concatenate(rows) if rows else np.empty((0, self.dim), np.float32)


# ---------------------------------------------------------------------------------------------------------- pgvector

_PG_OPS = {"vector_cosine_ops": "<=>", "vector_ip_ops": "<#>", "vector_l2_ops": "<->"}  # index opclass -> operator


def dsn_name(dsn: str) -> str:
    """A DSN as messages show it: user, host, port and database, never a password (which ``redact`` masks from now
    on, wherever a library quotes it)."""
    hold_url_secrets(dsn)
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:  # not parseable: show nothing of it that could be secret
        return "postgresql (DSN not parseable)"
    hold_secret(parts.get("password"))
    host = parts.get("host") or "localhost"
    host = "local socket" if str(host).startswith("/") else host
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


class PgvectorStore(Store):
    """A Postgres table with a pgvector ``vector`` column, ids in ``id_column`` (default: the primary key, else
    ``id``). The search uses the operator of the column's HNSW or IVFFlat index (cosine ``<=>``, inner product
    ``<#>`` or L2 ``<->``; cosine without an index), so Postgres searches through that index, with ``hnsw.ef_search``
    and ``ivfflat.probes`` set for the session. The password comes from the DSN or libpq's own ``$PGPASSWORD`` and is
    never shown."""

    def __init__(self, dsn: str, table: str, *, id_column: str | None = None, vector_column: str | None = None,
                 ef_search: int = StoreConfig.ef_search, probes: int = StoreConfig.nprobe,
                 batch: int = StoreConfig.batch):
        psycopg = _require("psycopg", "pgvector")
        pgvector_psycopg = _require("pgvector.psycopg", "pgvector")
        self.sql = importlib.import_module("psycopg.sql")
        where = dsn_name(dsn)
        self.name, self.batch = f"{where}#{table}", batch
        try:
            self.conn = psycopg.connect(dsn, connect_timeout=10, autocommit=True)
        except Exception as e:
            raise AdapterError(f"{where}: cannot connect to PostgreSQL ({redact(one_line(e))})") from None
        try:
            self._open(pgvector_psycopg, table, id_column, vector_column, ef_search, probes)
        except BaseException:
            self.conn.close()
            raise

    def _open(self, pgvector_psycopg: Any, table: str, id_column: str | None, vector_column: str | None,
              ef_search: int, probes: int) -> None:
        run = lambda query, *args: _request(self.name, "query", self.conn.execute, query, *args)  # noqa: E731
        if not run("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
            raise AdapterError(f"{self.name}: the pgvector extension is not installed in this database")
        pgvector_psycopg.register_vector(self.conn)
        oid, schema, relname = self._relation(table)
        self.table = self.sql.Identifier(schema, relname)  # every query names the relation the check found
        columns = run("SELECT attname, format_type(atttypid, atttypmod), atttypid::regtype::text FROM pg_attribute "
                      "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (oid,)).fetchall()
        vectors = [(n, t) for n, t, base in columns if base == "vector"]
        names = [n for n, _, _ in columns]
        if vector_column is not None:
            vectors = [(n, t) for n, t in vectors if n == vector_column]
        if len(vectors) != 1:
            found = ", ".join(f"{n} {t}" for n, t, _ in columns) or "none"
            what = f"no vector column {vector_column!r}" if vector_column else (
                "no vector column" if not vectors else "several vector columns; name one (vector_column=)")
            raise AdapterError(f"{self.name}: {what} (columns: {found})")
        self.vector_column, kind = vectors[0]
        key = run("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = "
                  "ANY(i.indkey) WHERE i.indrelid = %s AND i.indisprimary", (oid,)).fetchall()
        self.id_column = id_column or (key[0][0] if len(key) == 1 else "id")
        if self.id_column not in names:
            raise AdapterError(f"{self.name}: no id column {self.id_column!r} (columns: {', '.join(names)}); name "
                               "it with store.id_field")
        self.dim = int(kind[len("vector("):-1]) if kind.startswith("vector(") else self._first_dim()
        indexes = run("SELECT am.amname, opc.opcname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                      "JOIN pg_am am ON am.oid = c.relam JOIN pg_opclass opc ON opc.oid = i.indclass[0] "
                      "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                      "WHERE i.indrelid = %s AND a.attname = %s AND am.amname IN ('hnsw', 'ivfflat')",
                      (oid, self.vector_column)).fetchall()
        self.operator, self.index = "<=>", "none (exact)"
        for method, opclass in indexes:  # the table's own index, when it has one the operator can use
            if opclass in _PG_OPS:
                self.operator, self.index = _PG_OPS[opclass], method
        run(f"SET hnsw.ef_search = {int(min(max(ef_search, 1), 1000))}")  # pgvector's bounds
        run(f"SET ivfflat.probes = {int(max(probes, 1))}")
        logger.info("%s: %d-dimensional %s, ids in %s, index %s (%s)", self.name, self.dim, self.vector_column,
                    self.id_column, self.index, self.operator)

    def _relation(self, table: str) -> tuple[int, str, str]:
        """(oid, schema, name) of ``table``: read as PostgreSQL reads a table name (``docs``, ``public.docs``,
        ``"MyDocs"``, ``"my.docs"``), else as the exact name of a table on the search path (``MyDocs``, ``my.docs``).
        The queries then name it by the catalog's schema and name, quoted by ``sql.Identifier``: found and used
        alike."""
        oid = None
        with contextlib.suppress(importlib.import_module("psycopg").Error):  # not PostgreSQL's syntax (a lone quote)
            oid = self.conn.execute("SELECT to_regclass(%s)::oid", (table,)).fetchone()[0]
        if oid is None:
            oid = _request(self.name, "query", self.conn.execute, "SELECT to_regclass(quote_ident(%s))::oid",
                           (table,)).fetchone()[0]
        if oid is None:
            raise AdapterError(f"{self.name}: no table {table!r} (names follow PostgreSQL's rules: quote a mixed-case "
                               'name, e.g. \'"MyDocs"\', or give it exactly as created)')
        schema, relname = _request(self.name, "query", self.conn.execute, "SELECT n.nspname, c.relname FROM pg_class c "
                                   "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s", (oid,)).fetchone()
        return int(oid), schema, relname

    def _first_dim(self) -> int:
        q = self.sql.SQL("SELECT vector_dims({}) FROM {} LIMIT 1").format(self.sql.Identifier(self.vector_column),
                                                                            self.table)
        row = _request(self.name, "query", self.conn.execute, q).fetchone()
        if row is None:
            raise AdapterError(f"{self.name}: table is empty")
        return int(row[0])

    def _score(self, d: float) -> float:
        if self.operator == "<#>":  # pgvector's negative inner product
            return -d
        if self.operator == "<->":  # L2 distance between unit vectors
            return 1.0 - d * d / 2.0
        return 1.0 - d

    def _id_field(self, id_field: str | None) -> None:
        if id_field not in (None, self.id_column):
            raise AdapterError(f"{self.name}: ids are read from column {self.id_column!r}, not {id_field!r}")

    def exact_search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        """The same query with index scans off for this transaction: Postgres scans and sorts every row."""
        with self.conn.transaction():
            self.conn.execute("SET LOCAL enable_indexscan = off")
            self.conn.execute("SET LOCAL enable_bitmapscan = off")
            return self.search(queries, k, id_field=id_field)

    def search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        self._id_field(id_field)
        q = self._check(queries, k)
        sql = self.sql
        column = sql.Identifier(self.vector_column)
        query = sql.SQL("SELECT {}, {} {} %(q)s FROM {} ORDER BY {} {} %(q)s LIMIT %(k)s").format(
            sql.Identifier(self.id_column), column, sql.SQL(self.operator), self.table, column,
            sql.SQL(self.operator))
        out = []
        for vector in q:
            rows = _request(self.name, "pgvector search", self.conn.execute, query, {"q": vector, "k": k}).fetchall()
            out.append(Hits([r[0] for r in rows], [self._score(float(r[1])) for r in rows]))
        return out

    def vectors(self, *, id_field: str | None = None) -> tuple[list[Id], np.ndarray]:
        self._id_field(id_field)
        sql = self.sql
        query = sql.SQL("SELECT {}, {} FROM {}").format(sql.Identifier(self.id_column),
                                                         sql.Identifier(self.vector_column), self.table)
        ids: list[Id] = []
        rows: list[np.ndarray] = []
        try:
            with self.conn.transaction(), self.conn.cursor(name="adapter_read") as cur:
                cur.itersize = self.batch
                cur.execute(query)
                for pid, vector in cur:
                    ids.append(pid)
                    rows.append(vector.to_numpy() if hasattr(vector, "to_numpy") else vector)  # pgvector >= 0.4
        except AdapterError:
            raise
        except Exception as e:
            raise AdapterError(f"{self.name}: reading vectors failed ({one_line(e)})") from None
        return ids, np.asarray(rows, dtype=np.float32).reshape(len(rows), self.dim)

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------------------------------------------- opening


def open_store(*, index: str | os.PathLike | None = None, qdrant: str | None = None, chroma: str | None = None,
               pgvector: str | None = None, collection: str | None = None, table: str | None = None,
               cfg: Config | None = None) -> Store:
    """Open the one store given: a FAISS file (``index``), a Qdrant or Chroma ``collection`` at a path or URL, or a
    pgvector ``table`` in the PostgreSQL database at DSN ``pgvector``."""
    cfg = cfg or Config()
    given = [name for name, v in (("index", index), ("qdrant", qdrant), ("chroma", chroma),
                                  ("pgvector", pgvector)) if v]
    if len(given) != 1:
        raise AdapterError("pass exactly one store: index (a FAISS file), qdrant or chroma (a path or URL) or "
                           "pgvector (a DSN)" + (f" (got {' and '.join(given)})" if given else ""))
    if collection and (index is not None or pgvector is not None):
        raise AdapterError(f"a collection applies to qdrant and chroma, not {given[0]}")
    if table and pgvector is None:
        raise AdapterError(f"a table applies to pgvector, not {given[0]}")
    if index is not None:
        return FaissStore(index, nprobe=cfg.store.nprobe, ef_search=cfg.store.ef_search)
    if pgvector is not None:
        if not table:
            raise AdapterError("pgvector needs a table")
        return PgvectorStore(pgvector, table, id_column=cfg.store.id_field, ef_search=cfg.store.ef_search,
                             probes=cfg.store.nprobe, batch=cfg.store.batch)
    if not collection:
        raise AdapterError(f"{given[0]} needs a collection")
    if qdrant is not None:
        return QdrantStore(qdrant, collection, ef_search=cfg.store.ef_search, batch=cfg.store.batch)
    return ChromaStore(chroma, collection, ef_search=cfg.store.ef_search, batch=cfg.store.batch)


def corpus_names(store: Store, dataset: Dataset, ids: Sequence[Id]) -> list[str]:
    """Name each stored vector by a corpus id of ``dataset``: row i is line i of corpus.jsonl for a FAISS index
    without an id map; otherwise the store's id (or id field) as a string. Vectors naming nothing in the corpus stay
    in the list under their own id (they still compete in search)."""
    if store.rows_are_ids:
        if len(ids) != len(dataset.corpus):
            raise AdapterError(f"{store.name}: holds {len(ids)} vectors without ids, {dataset.path} has "
                               f"{len(dataset.corpus)} chunks; row i must be line i of corpus.jsonl")
        cids = list(dataset.corpus)
        return [cids[int(i)] for i in ids]
    names = [str(i) for i in ids]
    if len(set(names)) != len(names):
        dup = next(n for n, count in Counter(names).items() if count > 1)
        raise AdapterError(f"{store.name}: id {dup!r} names more than one vector")
    return names


def hit_names(store: Store, dataset: Dataset, hits: Hits) -> list[str]:
    """Each hit named by corpus id as ``corpus_names`` names vectors: line i of corpus.jsonl for a FAISS index without
    ids, else the store's id (or id field) as a string; a hit naming no chunk keeps its own name (a distractor)."""
    if store.rows_are_ids:
        cids = list(dataset.corpus)
        return [cids[i] if 0 <= i < len(cids) else f"row {i}" for i in map(int, hits.ids)]
    return [str(n) for n in (hits.names or hits.ids)]


def hit_texts(store: Store, dataset: Dataset, hits: Hits) -> list[str]:
    """The corpus text of each hit ("" when its id names no chunk of ``dataset``), named as ``corpus_names`` does."""
    where = f"{dataset.path}: not the dataset {store.name} was built from"
    if store.rows_are_ids:
        cids = list(dataset.corpus)
        size = getattr(getattr(store, "index", None), "ntotal", len(cids))
        if size != len(cids):
            raise AdapterError(f"{where} (the index holds {size} vectors by row, the corpus has {len(cids)} chunks)")
        names = [cids[i] if 0 <= i < len(cids) else "" for i in map(int, hits.ids)]
    else:
        names = [str(n) for n in (hits.names or hits.ids)]
        unknown = [n for n in names if n not in dataset.corpus]
        if unknown:
            raise AdapterError(f"{where} (hit id {unknown[0]!r} is no chunk of it)")
    return [dataset.corpus.get(n, "") for n in names]


def align_corpus(dataset: Dataset, names: Sequence[str], vectors: np.ndarray, *, source: str,
                 judged: Collection[str], where: str = "", hint: str = "") -> tuple[list[str], np.ndarray]:
    """Vectors named by corpus id, put in corpus.jsonl's order (vectors naming no chunk after them, as distractors), so
    training on them samples exactly what training on embedded chunks samples; every ``judged`` chunk must be there
    and every vector must have the same finite dimension."""
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        dup = next(n for n, count in Counter(names).items() if count > 1)
        raise AdapterError(f"{source}: id {dup!r} names more than one vector")
    if vectors.ndim != 2 or len(vectors) != len(names):
        raise AdapterError(f"{source}: {len(names)} ids for vectors of shape {tuple(vectors.shape)}")
    if not len(names):
        raise AdapterError(f"{source}: holds no vectors")
    missing = sorted(set(judged) - set(names))
    if missing:
        raise AdapterError(f"{source}: holds no vector for {len(missing)} of the {len(set(judged))} chunks judged"
                           f"{where} (first: {missing[0]!r}); its ids must be corpus ids{hint}")
    row = {n: i for i, n in enumerate(names)}
    order = [row[c] for c in dataset.corpus if c in row]
    known = set(dataset.corpus)
    order += [i for i, n in enumerate(names) if n not in known]
    if order == list(range(len(names))) and vectors.dtype == np.float32 and vectors.flags.c_contiguous:
        out = vectors  # already in order (a memory-mapped file too): used as it is, never copied
    else:
        out = np.ascontiguousarray(vectors[order], dtype=np.float32)
    if not all(np.isfinite(out[s:s + 65536]).all() for s in range(0, len(out), 65536)):  # bounded temporaries
        raise AdapterError(f"{source}: holds vectors with NaN or infinite components")
    logger.info("read %d vectors from %s (%d of them name no chunk of %s)", len(names), source,
                len(names) - sum(n in known for n in names), dataset.path)
    return [names[i] for i in order], out


def corpus_from_store(store: Store, dataset: Dataset, split: str | Collection[str], *,
                      id_field: str | None = None) -> tuple[list[str], np.ndarray]:
    """Every vector of ``store``, named by corpus id, checked to hold each chunk the split's qrels judge (``split`` is
    a split name, or the chunk ids themselves): what evaluate and train use instead of embedding the corpus."""
    ids, vectors = store.vectors(id_field=id_field)
    if not len(ids):
        raise AdapterError(f"{store.name}: holds no vectors")
    names = corpus_names(store, dataset, ids)
    judged = {c for rels in dataset.split(split).values() for c in rels} if isinstance(split, str) else set(split)
    return align_corpus(dataset, names, vectors, source=store.name, judged=judged,
                        where=f" in {split}" if isinstance(split, str) else "",
                        hint="" if id_field or store.rows_are_ids else " (or set store.id_field)")


# ---------------------------------------------------------------------------------------------------------- files


def read_vector_file(path: str | os.PathLike, ids_path: str | os.PathLike | None = None
                     ) -> tuple[list[str], np.ndarray]:
    """Vectors and their corpus ids from files: ``VECTORS.npy`` with ``IDS.txt`` (row i is the id on line i), or a
    ``.parquet`` file with ``id`` and ``vector`` columns."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such file")
    if path.suffix == ".parquet":
        if ids_path is not None:
            raise AdapterError(f"{path}: a parquet file holds its own ids; give no ids file")
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["id", "vector"])
        except ImportError:
            raise AdapterError("reading .parquet needs pyarrow: pip install pyarrow") from None
        except Exception as e:  # pyarrow's errors name the missing column or the damage
            raise AdapterError(f"{path}: cannot read id and vector columns ({one_line(e)})") from None
        ids = [str(i) for i in table.column("id").to_pylist()]
        column = table.column("vector").combine_chunks()
        try:
            flat = np.asarray(column.flatten(), dtype=np.float32)
        except Exception as e:
            raise AdapterError(f"{path}: the vector column is not a list of numbers ({one_line(e)})") from None
        lengths = set(np.diff(np.asarray(column.offsets)).tolist()) if len(column) else {0}
        if len(lengths) != 1 or column.null_count:
            raise AdapterError(f"{path}: vectors of different lengths ({', '.join(map(str, sorted(lengths))[:5])})")
        return ids, flat.reshape(len(ids), lengths.pop())
    if path.suffix != ".npy":
        raise AdapterError(f"{path}: expected a .npy array (with an ids file) or a .parquet file")
    if ids_path is None:
        raise AdapterError(f"{path}: needs an ids file (IDS.txt), one corpus id per line for each row")
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a .npy array ({one_line(e)})") from None
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise AdapterError(f"{path}: expected a 2-D float array (n, d), got {vectors.dtype} {tuple(vectors.shape)}")
    try:
        ids = Path(ids_path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"{ids_path}: cannot read ids ({getattr(e, 'strerror', None) or one_line(e)})") from None
    while ids and not ids[-1].strip():
        ids.pop()
    if len(ids) != len(vectors):
        raise AdapterError(f"{ids_path}: {len(ids)} ids for the {len(vectors)} rows of {path}")
    return [i.strip() for i in ids], np.asarray(vectors, dtype=np.float32)


class ArrayStore(Store):
    """Vectors held in memory under their ids (a ``--store vectors:`` file), searched exactly by the one ranking
    function, ties by id as the judge breaks them."""

    def __init__(self, name: str, ids: Sequence[str], vectors: np.ndarray):
        self.name, self.ids, self.array = name, list(ids), np.ascontiguousarray(vectors, dtype=np.float32)
        self.dim = int(self.array.shape[1])
        self._tie_rank: np.ndarray | None = None  # made on the first search

    def search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        from adapter.evaluate import search

        self._no_id_field(id_field)
        if self._tie_rank is None:
            self._tie_rank = _id_rank(self.ids)
        scores, rows = search(self._check(queries, k), self.array, k, tie_rank=self._tie_rank)
        return [Hits([self.ids[i] for i in r], [float(x) for x in sc]) for sc, r in zip(scores, rows, strict=True)]

    def exact_search(self, queries: np.ndarray, k: int, *, id_field: str | None = None) -> list[Hits]:
        return self.search(queries, k, id_field=id_field)

    def vectors(self, *, id_field: str | None = None) -> tuple[list[Id], np.ndarray]:
        self._no_id_field(id_field)
        return list(self.ids), self.array

    def _no_id_field(self, id_field: str | None) -> None:
        if id_field:
            raise AdapterError(f"{self.name}: store.id_field applies to Qdrant, Chroma and pgvector, not vector files")
