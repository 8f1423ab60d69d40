"""Dataset: a BEIR-style folder every stage reads, converters into it, and query/chunk splits.

On disk::

    DIR/corpus.jsonl        {"_id": str, "text": str, "title": str (optional)}
    DIR/queries.jsonl       {"_id": str, "text": str}
    DIR/qrels/all.tsv       query-id <TAB> corpus-id <TAB> score   (every pair)
    DIR/qrels/{train,test,dev}.tsv   written by split_dataset

Every reader validates up front and raises AdapterError with ``file:line: problem``; every writer writes to a temporary
file and renames it into place, so a failure never leaves half a file.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapter.errors import AdapterError

logger = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]  # query id -> {corpus id: relevance score}
QRELS_HEADER = ("query-id", "corpus-id", "score")
SPLITS = ("train", "dev", "test")
FORMATS = ("chunks", "llamaindex", "pairs", "beir")

# Keys accepted by the converters, in order of preference.
CHUNK_TEXT_KEYS = ("input_chunk", "chunk", "text", "content", "context", "passage")
CHUNK_ID_KEYS = ("chunk_index", "chunk_id", "global_chunk_id", "_id", "id")
QUESTION_LIST_KEYS = ("questions", "queries")
PAIR_QUERY_KEYS = ("anchor", "question", "query")
PAIR_TEXT_KEYS = ("positive", "text", "chunk", "context")
PAIR_ID_KEYS = ("global_chunk_id", "chunk_id", "chunk_index", "corpus_id", "doc_id")


# ---------------------------------------------------------------------------------------------------------- writing

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's umask, restored at once


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success rename it over ``path``, on failure delete it."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise AdapterError(f"{path.parent}: cannot write here ({e.strerror})") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets the usual permissions
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create a folder (and parents) or raise a one-line error saying why not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapterError(f"{path}: cannot create folder ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise AdapterError(f"{path}: folder is not writable")
    return path


# ---------------------------------------------------------------------------------------------------------- dataset


@dataclass
class Dataset:
    """Corpus, queries and qrels by split, all keyed by string ids (insertion order is file order)."""

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, Qrels]
    titles: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def doc_text(self, cid: str) -> str:
        """The text embedded for a chunk: its title (when it has one) then its text."""
        title = self.titles.get(cid)
        return f"{title} {self.corpus[cid]}" if title else self.corpus[cid]

    def split(self, name: str) -> Qrels:
        """The qrels of one split; a clear error when the split was never written or holds no queries."""
        where = self.path or "dataset"
        if name not in self.qrels:
            hint = f"; run `adapter split {where}` first" if name in SPLITS else ""
            raise AdapterError(f"{where}: no qrels/{name}.tsv{hint}")
        if not self.qrels[name]:
            raise AdapterError(f"{where}/qrels/{name}.tsv: split has no queries")
        return self.qrels[name]

    def validate(self, source: str | os.PathLike) -> None:
        """Check that qrels name existing ids and that the dataset is not empty."""
        if not self.corpus:
            raise AdapterError(f"{source}: no corpus entries")
        if not self.queries:
            raise AdapterError(f"{source}: no queries")
        for split, qrels in self.qrels.items():
            for qid, rels in qrels.items():
                if qid not in self.queries:
                    raise AdapterError(f"{source}: qrels {split} names unknown query id {qid!r}")
                for cid in rels:
                    if cid not in self.corpus:
                        raise AdapterError(f"{source}: qrels {split} names unknown corpus id {cid!r}")


def relevant(qrels: Qrels) -> Qrels:
    """Only the positive judgements (score > 0), dropping queries left with none."""
    out = {q: {c: s for c, s in rels.items() if s > 0} for q, rels in qrels.items()}
    return {q: rels for q, rels in out.items() if rels}


def fingerprint(dataset: Dataset, split: str) -> str:
    """A short hash of one split's query texts, chunk texts and judgements: what a model was trained on."""
    h = hashlib.sha256()
    for qid, rels in sorted(dataset.split(split).items()):
        h.update(dataset.queries[qid].encode())
        for cid, score in sorted(rels.items()):
            h.update(b"\0" + dataset.doc_text(cid).encode() + b"\0" + str(score).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------- reading


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; one-line errors for bad lines."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AdapterError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise AdapterError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def read_jsonl(path: Path, kind: str) -> tuple[dict[str, str], dict[str, str]]:
    """Read corpus.jsonl or queries.jsonl into (id -> text, id -> title), validating every line."""
    if not path.is_file():
        raise AdapterError(f"{path}: file not found")
    texts: dict[str, str] = {}
    titles: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, obj in iter_jsonl(path):
        for key in ("_id", "text"):
            if key not in obj:
                raise AdapterError(f"{path}:{n}: missing {key!r}")
        if not isinstance(obj["_id"], (str, int)) or isinstance(obj["_id"], bool):
            raise AdapterError(f"{path}:{n}: '_id' must be a string")
        _id = str(obj["_id"])
        if not _id:
            raise AdapterError(f"{path}:{n}: empty '_id'")
        if _id in texts:
            raise AdapterError(f"{path}:{n}: duplicate id {_id!r} (first on line {first_line[_id]})")
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise AdapterError(f"{path}:{n}: empty text for id {_id!r}")
        title = obj.get("title") if kind == "corpus" else None
        if title is not None and not isinstance(title, str):
            raise AdapterError(f"{path}:{n}: 'title' must be a string")
        texts[_id] = text
        first_line[_id] = n
        if title:
            titles[_id] = title
    if not texts:
        raise AdapterError(f"{path}: no {kind} entries")
    return texts, titles


def _read_qrels(path: Path, corpus: dict[str, str], queries: dict[str, str]) -> Qrels:
    """Read one qrels TSV, checking the header, each row's shape, the ids and duplicate pairs."""
    qrels: Qrels = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header is None or tuple(h.strip() for h in header) != QRELS_HEADER:
            raise AdapterError(f"{path}:1: expected header 'query-id<TAB>corpus-id<TAB>score'")
        for n, row in enumerate(rows, 2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 3:
                raise AdapterError(f"{path}:{n}: expected 3 tab-separated columns, got {len(row)}")
            qid, cid, score = (c.strip() for c in row)
            if qid not in queries:
                raise AdapterError(f"{path}:{n}: unknown query id {qid!r}")
            if cid not in corpus:
                raise AdapterError(f"{path}:{n}: unknown corpus id {cid!r}")
            try:
                value = int(float(score))
            except ValueError:
                raise AdapterError(f"{path}:{n}: score {score!r} is not a number") from None
            if cid in qrels.setdefault(qid, {}):
                raise AdapterError(f"{path}:{n}: duplicate pair ({qid!r}, {cid!r})")
            qrels[qid][cid] = value
    return qrels


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Load a dataset folder: corpus, queries and every ``qrels/*.tsv`` found, all validated."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a dataset folder")
    corpus, titles = read_jsonl(path / "corpus.jsonl", "corpus")
    queries, _ = read_jsonl(path / "queries.jsonl", "queries")
    qdir = path / "qrels"
    if not qdir.is_dir() or not any(qdir.glob("*.tsv")):
        raise AdapterError(f"{qdir}: no qrels files (expected qrels/all.tsv)")
    qrels = {p.stem: _read_qrels(p, corpus, queries) for p in sorted(qdir.glob("*.tsv"))}
    return Dataset(corpus=corpus, queries=queries, qrels=qrels, titles=titles, path=path)


def save_dataset(dataset: Dataset, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write corpus.jsonl, queries.jsonl and qrels/all.tsv; refuse to replace a dataset unless ``force``."""
    out = Path(out)
    if (out / "corpus.jsonl").exists() and not force:
        raise AdapterError(f"{out}: already holds a dataset; pass --force to replace it")
    qdir = ensure_dir(out / "qrels")
    with atomic_write(out / "corpus.jsonl") as f:
        for cid, text in dataset.corpus.items():
            row = {"_id": cid, "title": dataset.titles[cid], "text": text} if cid in dataset.titles else {
                "_id": cid, "text": text}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with atomic_write(out / "queries.jsonl") as f:
        for qid, text in dataset.queries.items():
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    write_qrels(qdir / "all.tsv", dataset.qrels["all"])
    for stale in SPLITS:  # splits of whatever dataset was here before no longer match
        with contextlib.suppress(FileNotFoundError):
            (qdir / f"{stale}.tsv").unlink()
    return out


def write_qrels(path: Path, qrels: Qrels) -> None:
    """Write one qrels TSV with its header, atomically."""
    with atomic_write(path) as f:
        f.write("\t".join(QRELS_HEADER) + "\n")
        for qid, rels in qrels.items():
            for cid, score in rels.items():
                f.write(f"{qid}\t{cid}\t{score}\n")


# ---------------------------------------------------------------------------------------------------------- converters


class _Builder:
    """Collects chunks and questions, merging repeated texts: one chunk text is one corpus entry and one question
    text is one query (relevant to every chunk it was asked of)."""

    def __init__(self, source: Path):
        self.source = source
        self.corpus: dict[str, str] = {}
        self.titles: dict[str, str] = {}
        self.queries: dict[str, str] = {}
        self.qrels: Qrels = {}
        self._query_by_text: dict[str, str] = {}
        self._chunk_by_text: dict[str, str] = {}

    def chunk(self, text: Any, where: str, cid: Any = None, title: Any = None) -> str:
        if not isinstance(text, str) or not text.strip():
            raise AdapterError(f"{where}: empty chunk text")
        if cid is None:
            cid = self._chunk_by_text.get(text) or f"c{len(self.corpus)}"
        cid = str(cid)
        if cid in self.corpus and self.corpus[cid] != text:
            raise AdapterError(f"{where}: chunk id {cid!r} has two different texts")
        self.corpus[cid] = text
        self._chunk_by_text.setdefault(text, cid)
        if isinstance(title, str) and title.strip():
            self.titles[cid] = title
        return cid

    def question(self, text: Any, cid: str, where: str, qid: str | None = None) -> None:
        if not isinstance(text, str) or not text.strip():
            raise AdapterError(f"{where}: empty question")
        if text in self._query_by_text:
            qid = self._query_by_text[text]
        else:
            qid = qid or f"q{len(self.queries)}"
            if qid in self.queries:
                raise AdapterError(f"{where}: duplicate query id {qid!r}")
            self.queries[qid] = text
            self._query_by_text[text] = qid
        self.qrels.setdefault(qid, {})[cid] = 1

    def dataset(self) -> Dataset:
        ds = Dataset(corpus=self.corpus, queries=self.queries, qrels={"all": self.qrels}, titles=self.titles)
        ds.validate(self.source)
        return ds


def _first_key(obj: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in obj), None)


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise AdapterError(f"{path}: not UTF-8 text") from None


def _from_chunks(path: Path) -> Dataset:
    """(a) A JSON list of chunks, each holding its text and a dict or list of questions (the AppleQA shape)."""
    items = _load_json(path)
    if not isinstance(items, list) or not items:
        raise AdapterError(f"{path}: expected a non-empty JSON list of chunk objects")
    b = _Builder(path)
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise AdapterError(f"{where}: expected an object")
        tkey, qkey, ikey = (_first_key(item, k) for k in (CHUNK_TEXT_KEYS, QUESTION_LIST_KEYS, CHUNK_ID_KEYS))
        if tkey is None:
            raise AdapterError(f"{where}: missing chunk text (one of {', '.join(CHUNK_TEXT_KEYS)})")
        if qkey is None:
            raise AdapterError(f"{where}: missing questions (one of {', '.join(QUESTION_LIST_KEYS)})")
        cid = b.chunk(item[tkey], where, item[ikey] if ikey else i, item.get("title"))
        questions = item[qkey]
        if isinstance(questions, dict):
            questions = list(questions.values())
        if not isinstance(questions, list) or not questions:
            raise AdapterError(f"{where}: {qkey!r} must be a non-empty list or dict of questions")
        for j, q in enumerate(questions):
            b.question(q, cid, f"{where}, question {j}", qid=f"{cid}_q{j}")
    return b.dataset()


def _from_llamaindex(path: Path) -> Dataset:
    """(b) LlamaIndex EmbeddingQAFinetuneDataset JSON: {"queries", "corpus", "relevant_docs"}."""
    obj = _load_json(path)
    for key in ("queries", "corpus", "relevant_docs"):
        if not isinstance(obj.get(key), dict):
            raise AdapterError(f"{path}: missing or non-object {key!r}")
    b = _Builder(path)
    for cid, text in obj["corpus"].items():
        b.chunk(text, f"{path}: corpus {cid!r}", cid)
    for qid, docs in obj["relevant_docs"].items():
        if qid not in obj["queries"]:
            raise AdapterError(f"{path}: relevant_docs names unknown query id {qid!r}")
        if isinstance(docs, str):
            docs = [docs]
        for cid in docs:
            if str(cid) not in b.corpus:
                raise AdapterError(f"{path}: relevant_docs of {qid!r} names unknown corpus id {cid!r}")
            b.question(obj["queries"][qid], str(cid), f"{path}: query {qid!r}", qid=str(qid))
    return b.dataset()


def _pair_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, row) from a CSV or JSONL pairs file."""
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for n, row in enumerate(reader, 2):
                if None in row:
                    raise AdapterError(f"{path}:{n}: more columns than the header")
                yield f"{path}:{n}", row
        return
    for n, row in iter_jsonl(path):
        yield f"{path}:{n}", row


def _from_pairs(path: Path) -> Dataset:
    """(c) Question/chunk pairs in CSV or JSONL; a chunk repeated over many rows becomes one corpus entry."""
    b = _Builder(path)
    for where, row in _pair_rows(path):
        qkey, tkey, ikey = (_first_key(row, k) for k in (PAIR_QUERY_KEYS, PAIR_TEXT_KEYS, PAIR_ID_KEYS))
        if qkey is None:
            raise AdapterError(f"{where}: missing column {' or '.join(PAIR_QUERY_KEYS)}")
        if tkey is None:
            raise AdapterError(f"{where}: missing column {' or '.join(PAIR_TEXT_KEYS)}")
        chunk_id = row[ikey] if ikey and row[ikey] not in (None, "") else None
        cid = b.chunk(row[tkey], where, chunk_id)
        b.question(row[qkey], cid, where)
    if not b.corpus:
        raise AdapterError(f"{path}: no rows")
    return b.dataset()


def _from_beir(path: Path) -> Dataset:
    """(d) A BEIR folder: corpus, queries and the union of its qrels files."""
    ds = load_dataset(path)
    merged: Qrels = {}
    for qrels in ds.qrels.values():
        for qid, rels in qrels.items():
            merged.setdefault(qid, {}).update(rels)
    ds.qrels = {"all": merged}
    return ds


_CONVERTERS = {"chunks": _from_chunks, "llamaindex": _from_llamaindex, "pairs": _from_pairs, "beir": _from_beir}


def detect_format(src: str | os.PathLike) -> str:
    """Name the format of ``src`` (one of FORMATS) from its shape, or raise saying why it could not."""
    src = Path(src)
    if src.is_dir():
        return "beir"
    if not src.is_file():
        raise AdapterError(f"{src}: no such file or folder")
    suffix = src.suffix.lower()
    if suffix == ".csv":
        return "pairs"
    if suffix == ".jsonl":
        for _, row in _pair_rows(src):
            if _first_key(row, PAIR_QUERY_KEYS):
                return "pairs"
            break
        raise AdapterError(f"{src}: JSONL rows have no {'/'.join(PAIR_QUERY_KEYS)} key; pass --format")
    obj = _load_json(src)
    if isinstance(obj, dict) and {"queries", "corpus", "relevant_docs"} <= obj.keys():
        return "llamaindex"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict) and _first_key(obj[0], QUESTION_LIST_KEYS):
        return "chunks"
    raise AdapterError(f"{src}: cannot detect the format; pass --format ({', '.join(FORMATS)})")


def convert(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str | None = None,
            force: bool = False) -> tuple[Dataset, str]:
    """Read ``src`` in any supported format and write it to ``out`` as a dataset folder; returns it and the format."""
    src = Path(src)
    if fmt is None:
        fmt = detect_format(src)
        logger.debug("detected format: %s", fmt)
    if fmt not in _CONVERTERS:
        raise AdapterError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not src.exists():
        raise AdapterError(f"{src}: no such file or folder")
    try:
        dataset = _CONVERTERS[fmt](src)
    except UnicodeDecodeError:
        raise AdapterError(f"{src}: not UTF-8 text") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise AdapterError(f"{src}: does not look like the {fmt!r} format ({type(e).__name__}: {e})") from None
    if Path(out).resolve() == src.resolve():
        raise AdapterError(f"{out}: output folder is the source folder")
    save_dataset(dataset, out, force=force)
    dataset.path = Path(out)
    return dataset, fmt


# ---------------------------------------------------------------------------------------------------------- splits


def partition_qrels(qrels: Qrels, *, by: str, test_fraction: float, dev_fraction: float = 0.0,
                    seed: int = 0) -> tuple[dict[str, Qrels], int]:
    """Deal queries into train/dev/test, by random query or by whole chunk; returns the parts and the number of
    queries dropped because their relevant chunks fell on both sides (``by="chunk"`` only)."""
    if by not in ("query", "chunk"):
        raise AdapterError(f"--by must be 'query' or 'chunk', not {by!r}")
    rng = np.random.default_rng(seed)
    units = sorted(qrels) if by == "query" else sorted({c for r in qrels.values() for c in r})
    order = [units[i] for i in rng.permutation(len(units))]
    n_test = max(1, round(test_fraction * len(units)))  # a positive fraction always holds out at least one
    n_dev = max(1, round(dev_fraction * len(units))) if dev_fraction > 0 else 0
    if n_test + n_dev >= len(units):
        plural = {"query": "queries", "chunk": "chunks"}[by]
        raise AdapterError(f"too few {plural} ({len(units)}) to hold out {test_fraction:g} (+{dev_fraction:g})")
    side = {u: "test" for u in order[:n_test]}
    side.update({u: "dev" for u in order[n_test:n_test + n_dev]})
    parts: dict[str, Qrels] = {s: {} for s in SPLITS}
    dropped = 0
    for qid, rels in qrels.items():
        sides = {side.get(qid, "train")} if by == "query" else {side.get(c, "train") for c in rels}
        if len(sides) > 1:
            dropped += 1
            continue
        parts[sides.pop()][qid] = rels
    return parts, dropped


def split_dataset(path: str | os.PathLike, *, by: str = "query", test_fraction: float = 0.2,
                  dev_fraction: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Split ``qrels/all.tsv`` into train/test (and dev) qrels files; same seed, same split.

    ``by="query"`` holds out random queries; ``by="chunk"`` holds out whole chunks, so no test (or dev) query's
    relevant chunk appears in train; a query whose relevant chunks fall on both sides is dropped and counted. The
    corpus stays whole: evaluation always searches every chunk. Returns the summary also written to ``split.json``.
    """
    if by not in ("query", "chunk"):
        raise AdapterError(f"--by must be 'query' or 'chunk', not {by!r}")
    if not 0 < test_fraction < 1:
        raise AdapterError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if not 0 <= dev_fraction < 1 or test_fraction + dev_fraction >= 1:
        raise AdapterError(f"--dev-fraction must be >= 0 with test + dev below 1, got {dev_fraction}")
    path = Path(path)
    ds = load_dataset(path)
    try:
        parts, dropped = partition_qrels(ds.split("all"), by=by, test_fraction=test_fraction,
                                         dev_fraction=dev_fraction, seed=seed)
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None
    qdir = path / "qrels"
    for name in SPLITS:
        if parts[name]:
            write_qrels(qdir / f"{name}.tsv", parts[name])
        else:
            with contextlib.suppress(FileNotFoundError):
                (qdir / f"{name}.tsv").unlink()
    summary = {"by": by, "test_fraction": test_fraction, "dev_fraction": dev_fraction, "seed": seed,
               "queries": {s: len(parts[s]) for s in SPLITS}, "dropped_queries": dropped}
    with atomic_write(path / "split.json") as f:
        json.dump(summary, f, indent=2)
    if dropped:
        logger.info("dropped %d queries whose relevant chunks fall on both sides of the split", dropped)
    return summary


def split_kind(dataset: Dataset) -> str:
    """How the dataset was split ("query" or "chunk", from split.json); "query" when unknown."""
    info = dataset.path / "split.json" if dataset.path else None
    if info is not None and info.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError, AttributeError):
            return json.loads(info.read_text()).get("by", "query")
    return "query"


def train_val_qrels(dataset: Dataset, *, train_split: str = "train", val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[Qrels, Qrels, str]:
    """Training and validation queries for any trainer: the ``dev`` split if present, else a seeded ``val_fraction``
    of the training split carved the way the dataset was split (by query, or by whole chunk). Returns both and a
    phrase saying how validation was chosen."""
    train = relevant(dataset.split(train_split))
    if "dev" in dataset.qrels and train_split != "dev":
        return train, relevant(dataset.split("dev")), "the dev split"
    by = split_kind(dataset)
    try:
        parts, _ = partition_qrels(train, by=by, test_fraction=val_fraction, seed=seed)
    except AdapterError as e:
        raise AdapterError(f"{dataset.path}: cannot carve validation from {train_split}: {e}") from None
    if not parts["train"] or not parts["test"]:
        raise AdapterError(f"{dataset.path}: too few training queries to train and validate")
    return parts["train"], parts["test"], f"{val_fraction:g} of {train_split} by {by}"
