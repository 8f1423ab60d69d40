"""Dataset: a BEIR-style folder every stage reads, converters into it, and query/chunk splits.

On disk::

    DIR/corpus.jsonl        {"_id": str, "text": str, "title": str (optional)}
    DIR/queries.jsonl       {"_id": str, "text": str}
    DIR/qrels/all.tsv       query-id <TAB> corpus-id <TAB> score   (every pair)
    DIR/qrels/{train,test,dev}.tsv   written by split_dataset

Every reader validates up front and raises AdapterError with ``file:line: problem`` (bytes that are not UTF-8 included);
every writer writes to a temporary file and renames it into place, so a failure never leaves half a file, and a
dataset is written as one unit: the whole folder is written beside its target and swapped in, after every id and text
was checked, so no failure leaves half an old and half a new dataset. Ids are refused where a qrels TSV could not carry
them unchanged (tabs, line breaks or other control characters, surrounding spaces, a leading quote).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapter.config import SPLIT_BY, Config
from adapter.errors import AdapterError, refuse_existing

logger = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]  # query id -> {corpus id: relevance score}
QRELS_HEADER = ("query-id", "corpus-id", "score")
SPLITS = ("train", "dev", "test")
FORMATS = ("chunks", "llamaindex", "pairs", "beir")
REPLACED_FILES = ("corpus.jsonl", "queries.jsonl", "qrels", "split.json", "chunk.json")  # what convert --force
# replaces in a dataset folder (the rest describes the data: it goes with it); anything else in the folder is kept
CSV_FIELD_LIMIT = 1 << 30  # chunks and ids may be long: the csv module's 131,072-character default is not our limit

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


def read_text(path: Path) -> str:
    """A whole text file as UTF-8 (a byte-order mark is dropped); a one-line error naming the line of the first byte
    that is not UTF-8, or why the file cannot be read."""
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        raise AdapterError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = "it looks like UTF-16" if utf16 else f"byte 0x{raw[e.start]:02x}, perhaps Latin-1 or Windows-1252"
        raise AdapterError(f"{path}:{line}: not UTF-8 text ({hint}); save it as UTF-8") from None


def check_text(value: Any, where: str, what: str = "text") -> str:
    """``value`` if it is a non-blank string of valid Unicode, else a one-line error saying what it is instead."""
    if isinstance(value, float) and math.isnan(value):
        raise AdapterError(f"{where}: {what} is NaN, not a string")
    if not isinstance(value, str):
        kind = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object",
                type(None): "null"}.get(type(value), type(value).__name__)
        raise AdapterError(f"{where}: {what} is {kind}, not a string")
    if not value.strip():
        raise AdapterError(f"{where}: empty {what}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise AdapterError(f"{where}: {what} holds a lone surrogate {value[e.start]!r} at character {e.start} "
                           "(not valid Unicode)") from None
    return value


def check_id(value: str, where: str, what: str = "id") -> str:
    """``value`` if it can travel through a qrels TSV and back unchanged, else a one-line error saying why not."""
    if not value:
        raise AdapterError(f"{where}: empty {what}")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise AdapterError(f"{where}: {what} {value!r} holds the control character {bad!r} (tabs and line breaks "
                           "cannot be written to a qrels TSV)")
    if value != value.strip():
        raise AdapterError(f"{where}: {what} {value!r} has surrounding spaces (qrels readers strip them)")
    if value.startswith('"'):
        raise AdapterError(f"{where}: {what} {value!r} starts with a quote (TSV readers take it for quoting)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterError(f"{where}: {what} {value!r} holds a lone surrogate (not valid Unicode)") from None
    return value


def _csv_rows(path: Path, **kwargs: Any) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each row of a CSV/TSV file read strictly (an unterminated quote is an error)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True, **kwargs)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise AdapterError(f"{path}:{start}: malformed row ({e}; an unterminated quote?)") from None
        yield start, row


def iter_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (``text``: its content, when read already);
    one-line errors for bad lines."""
    for n, line in enumerate((read_text(path) if text is None else text).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise AdapterError(f"{path}:{n}: JSON nested too deeply") from None
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
        _id = check_id(str(obj["_id"]), f"{path}:{n}", "'_id'")
        if _id in texts:
            raise AdapterError(f"{path}:{n}: duplicate id {_id!r} (first on line {first_line[_id]})")
        text = check_text(obj["text"], f"{path}:{n}", f"text for id {_id!r}")
        title = obj.get("title") if kind == "corpus" else None
        if title is not None and not isinstance(title, str):
            raise AdapterError(f"{path}:{n}: 'title' must be a string")
        if title:
            check_text(title, f"{path}:{n}", "'title'")
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
    rows = _csv_rows(path, delimiter="\t")
    header = next(rows, (1, None))[1]
    if header is None or tuple(h.strip() for h in header) != QRELS_HEADER:
        raise AdapterError(f"{path}:1: expected header 'query-id<TAB>corpus-id<TAB>score'")
    for n, row in rows:
        if not row or not "".join(row).strip():
            continue
        if len(row) != 3:
            raise AdapterError(f"{path}:{n}: expected 3 tab-separated columns, got {len(row)}")
        qid, cid, score = (c.strip() for c in row)
        if qid not in queries:
            raise AdapterError(f"{path}:{n}: unknown query id {qid[:100]!r}")
        if cid not in corpus:
            raise AdapterError(f"{path}:{n}: unknown corpus id {cid[:100]!r}")
        try:
            number = float(score)
        except ValueError:
            raise AdapterError(f"{path}:{n}: score {score[:100]!r} is not a number") from None
        if not number.is_integer():  # 0.5 read as int() would silently become 0: not relevant
            raise AdapterError(f"{path}:{n}: score {score!r} is not a whole number (relevance grades are 0, 1, 2 ...)")
        if cid in qrels.setdefault(qid, {}):
            raise AdapterError(f"{path}:{n}: duplicate pair ({qid!r}, {cid!r})")
        qrels[qid][cid] = int(number)
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


def _qrels_text(qrels: Qrels) -> str:
    lines = ["\t".join(QRELS_HEADER)] + [f"{q}\t{c}\t{s}" for q, rels in qrels.items() for c, s in rels.items()]
    return "\n".join(lines) + "\n"


def _dataset_files(dataset: Dataset, where: str) -> dict[str, bytes]:
    """corpus.jsonl, queries.jsonl and each qrels split as bytes, every id and text checked first (nothing is
    written)."""
    def jsonl(texts: dict[str, str], kind: str, titles: dict[str, str]) -> bytes:
        rows = []
        for i, (_id, text) in enumerate(texts.items()):
            at = f"{where}: {kind} entry {i}"
            check_id(_id, at, f"{kind} id")
            check_text(text, at, f"text of {_id!r}")
            row = {"_id": _id, "title": check_text(titles[_id], at, "title"), "text": text} if _id in titles else {
                "_id": _id, "text": text}
            rows.append(json.dumps(row, ensure_ascii=False) + "\n")
        return "".join(rows).encode("utf-8")

    return {"corpus.jsonl": jsonl(dataset.corpus, "corpus", dataset.titles),
            "queries.jsonl": jsonl(dataset.queries, "queries", {}),
            **{f"qrels/{name}.tsv": _qrels_text(qrels).encode("utf-8") for name, qrels in dataset.qrels.items()}}


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _swap(new: Path, out: Path) -> None:
    """Exchange two folders in one step where the kernel can (Linux renameat2 RENAME_EXCHANGE), so a kill at any
    instant leaves ``out`` either old or new; elsewhere two renames, the old folder put back on failure."""
    libc = _libc()
    if libc is not None and libc.renameat2(-100, os.fsencode(new), -100, os.fsencode(out), 2) == 0:  # AT_FDCWD
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    os.replace(old, new)  # the caller removes ``new``: it now holds the old folder, as after an exchange


@functools.cache
def _libc() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return libc
    return None


def _carry(old: Path, new: Path, skip: Callable[[str], bool]) -> None:
    """Hard-link (or copy, where links fail) every entry of ``old`` into ``new`` that is not there yet and whose
    relative path ``skip`` does not name; symbolic links are carried as links. ``old`` itself is not changed."""
    for root, dirs, names in os.walk(old):  # does not descend into linked folders: they are listed in dirs
        here = Path(root)
        for name in dirs + names:
            src = here / name
            rel, dst = src.relative_to(old).as_posix(), new / src.relative_to(old)
            if skip(rel):
                if name in dirs:
                    dirs.remove(name)
            elif src.is_dir() and not src.is_symlink():
                dst.mkdir(exist_ok=True)
            elif not os.path.lexists(dst):
                try:
                    if src.is_symlink():
                        raise OSError("a link is copied as a link")
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst, follow_symlinks=False)


def replace_folder(out: Path, files: dict[str, bytes], *, replaced: tuple[str, ...] = ()) -> None:
    """Make ``out`` hold ``files`` (relative path -> bytes) as one unit: they are written into a new folder beside
    ``out``, every other entry of the old ``out`` is carried over (hard-linked: no copy of a large corpus) unless
    it is, or is inside, a path named in ``replaced``, then the new folder takes ``out``'s place in one step. A
    failure or a kill at any point leaves the old folder (or none) whole, never a mix."""
    out = Path(os.path.abspath(out))
    if _inside(Path.cwd(), out):
        raise AdapterError(f"{out}: is the current folder or holds it; run from outside it (cd ..)")
    ensure_dir(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise AdapterError(f"{out.parent}: cannot write here ({e.strerror})") from None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(tmp / rel, "wb") as f:
                f.write(data)
        if out.is_dir():
            _carry(out, tmp, lambda rel: any(rel == r or rel.startswith(r + "/") for r in replaced))
            _swap(tmp, out)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise AdapterError(f"{out}: cannot write the folder ({e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new folder, or the old one swapped out


def save_dataset(dataset: Dataset, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write corpus.jsonl, queries.jsonl and every qrels split as one unit (the inverse of ``load_dataset``); refuse
    to replace a dataset unless ``force``.

    Every id and text is checked before anything is written. A replaced dataset's splits, split.json and chunk.json go
    with it (they describe the old data); anything else in the folder is kept."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    if (out / "corpus.jsonl").exists() and not force:
        raise AdapterError(f"{out}: already holds a dataset; pass --force to replace it")
    replace_folder(out, _dataset_files(dataset, str(out)), replaced=REPLACED_FILES)
    return out


def qrels_bytes(qrels: Qrels, path: str | os.PathLike) -> bytes:
    """One qrels TSV with its header, as bytes; ids a TSV cannot carry are refused (naming ``path``) first."""
    for qid, rels in qrels.items():
        check_id(qid, str(path), "query id")
        for cid in rels:
            check_id(cid, str(path), "corpus id")
    return _qrels_text(qrels).encode("utf-8")


def write_qrels(path: Path, qrels: Qrels) -> None:
    """Write one qrels TSV with its header, atomically; ids a TSV cannot carry are refused before writing."""
    data = qrels_bytes(qrels, path)
    with atomic_write(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------------------- converters


def _is_empty(value: Any) -> bool:
    """A missing text: null (what a data frame writes for an empty cell) or only white space."""
    return value is None or (isinstance(value, str) and not value.strip())


class _Builder:
    """Collects chunks and questions from one or more sources, merging repeats: one chunk text is one corpus entry (a
    chunk id named again must carry the same text), and one question text is one query, relevant to every chunk it was
    asked of. With ``drop_empty`` an empty chunk is dropped with the questions asked of it, and an empty question is
    dropped; without it either is a one-line error naming the way on. ``report`` says in one line each what was
    merged and dropped."""

    def __init__(self, *, drop_empty: bool = False):
        self.drop_empty = drop_empty
        self.corpus: dict[str, str] = {}
        self.titles: dict[str, str] = {}
        self.queries: dict[str, str] = {}
        self.qrels: Qrels = {}
        self.source = 0  # position of the source being read
        self.side: dict[str, int] = {}  # query id -> position of the first source that asks it
        self.asked = 0  # question occurrences kept: a text asked twice counts twice
        self.crossed: set[str] = set()  # query ids asked again by a later source
        self.dropped_chunks: list[str] = []  # where each dropped empty chunk was
        self.dropped_asked: set[str] = set()  # texts of questions asked of dropped chunks
        self.dropped_questions = 0  # empty questions dropped
        self._query_by_text: dict[str, str] = {}
        self._chunk_by_text: dict[str, str] = {}
        self._where: dict[tuple[str, str], str] = {}  # ("chunk" or "query", id) -> where it was first read

    def _free_id(self, taken: dict[str, str], prefix: str, first: Any = None) -> str:
        if first is not None and str(first) not in taken:
            return str(first)
        n = len(taken)
        while f"{prefix}{n}" in taken:
            n += 1
        return f"{prefix}{n}"

    def chunk(self, text: Any, where: str, cid: Any = None, title: Any = None, *, default: Any = None) -> str | None:
        """The corpus id of one chunk (its own ``cid``; else the id of the same text read before, else ``default``
        when free, else a new one); None when its text is empty and ``drop_empty`` drops it."""
        if cid is not None:
            if not isinstance(cid, (str, int)) or isinstance(cid, bool):
                raise AdapterError(f"{where}: chunk id {cid!r} is not a string or an integer")
            cid = check_id(str(cid), where, "chunk id")
        if _is_empty(text):
            named = f"{where} (chunk {cid!r})" if cid is not None else where
            if not self.drop_empty:
                raise AdapterError(f"{named}: empty chunk text; pass --drop-empty to drop such chunks with their "
                                   "questions (each is reported), or fill it in")
            self.dropped_chunks.append(named)
            return None
        check_text(text, where, "chunk text")
        if cid is None:
            cid = self._chunk_by_text.get(text) or self._free_id(self.corpus, "c", default)
        if cid in self.corpus and self.corpus[cid] != text:
            raise AdapterError(f"{where}: chunk id {cid!r} has another text than at {self._where['chunk', cid]} (one "
                               "id must be one chunk)")
        if cid not in self.corpus:
            self.corpus[cid] = text
            self._where["chunk", cid] = where
        self._chunk_by_text.setdefault(text, cid)
        if isinstance(title, str) and title.strip():
            self.titles[cid] = check_text(title, where, "title")
        return cid

    def question(self, text: Any, where: str, qid: str | None = None) -> str | None:
        """The query id of one question asked (a text asked before keeps its first id); None when the question is
        empty and ``drop_empty`` drops it."""
        if _is_empty(text):
            if not self.drop_empty:
                raise AdapterError(f"{where}: empty question; pass --drop-empty to drop empty questions (they are "
                                   "counted), or fill it in")
            self.dropped_questions += 1
            return None
        check_text(text, where, "question")
        self.asked += 1
        if text in self._query_by_text:
            known = self._query_by_text[text]
            if self.side[known] != self.source:
                self.crossed.add(known)
            return known
        qid = check_id(self._free_id(self.queries, "q") if qid is None else qid, where, "query id")
        if qid in self.queries:
            raise AdapterError(f"{where}: query id {qid!r} has another text than at {self._where['query', qid]}")
        self.queries[qid] = text
        self.side[qid] = self.source
        self._where["query", qid] = where
        self._query_by_text[text] = qid
        return qid

    def judge(self, qid: str, cid: str, score: int = 1) -> None:
        self.qrels.setdefault(qid, {})[cid] = score

    def drop_questions(self, texts: Any) -> None:
        """The questions asked of a dropped chunk: counted when no kept chunk has them."""
        self.dropped_asked.update(t for t in texts if isinstance(t, str) and t.strip())

    def dataset(self, source: str, splits: tuple[str, ...] = ()) -> Dataset:
        """The dataset read; ``splits``: the sources' names as splits, in order (a query on its first source's)."""
        qrels = {"all": self.qrels}
        for i, name in enumerate(splits):
            qrels[name] = {q: rels for q, rels in self.qrels.items() if self.side[q] == i}
        ds = Dataset(corpus=self.corpus, queries=self.queries, qrels=qrels, titles=self.titles)
        ds.validate(source)
        return ds

    def report(self, source: str, sources: list[Path], splits: tuple[str, ...] = ()) -> None:
        """One logged line for each thing the data did not say plainly: repeats merged, empties dropped, questions
        asked on two sides of a given split."""
        repeated = self.asked - len(self.queries)
        if repeated:
            logger.info("%s: %d repeated question texts merged: %d questions asked, %d queries (a question asked of "
                        "several chunks is one query, relevant to each)", source, repeated, self.asked,
                        len(self.queries))
        if self.dropped_chunks or self.dropped_questions:
            only = len(self.dropped_asked - self._query_by_text.keys())
            shown = "; ".join(self.dropped_chunks[:5]) + ("; ..." if len(self.dropped_chunks) > 5 else "")
            chunks = (f"{len(self.dropped_chunks)} empty chunks ({shown}) with the {only} questions asked only of "
                      "them" if self.dropped_chunks else "")
            empty = f"{self.dropped_questions} empty questions" if self.dropped_questions else ""
            logger.warning("%s: --drop-empty dropped %s", source, " and ".join(p for p in (chunks, empty) if p))
        if splits and self.crossed:
            logger.warning("%s: %d questions of a later source were already asked in an earlier one: each stays in "
                           "the split of the first (%s)", source, len(self.crossed),
                           ", ".join(f"{s.name} -> {n}" for s, n in zip(sources, splits, strict=True)))


def _first_key(obj: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in obj), None)


def _read_json(path: Path, hint: str = "") -> tuple[Any, list[int] | None]:
    """The JSON value of ``path``; or, for JSON Lines (one object per line, whatever the file's name: Hugging Face's
    ``Dataset.to_json`` writes them under ``.json``), the list of its objects and their line numbers. ``hint`` ends
    the message of a file that is neither."""
    text = read_text(path)
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        error = e
    except RecursionError:
        raise AdapterError(f"{path}: JSON nested too deeply") from None
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        lines = isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, RecursionError):
        lines = False
    if not lines:
        raise AdapterError(f"{path}:{error.lineno}: malformed JSON ({error.msg}){hint}") from None
    rows = list(iter_jsonl(path, text))
    return [obj for _, obj in rows], [n for n, _ in rows]


def _records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) of each record of a JSON list, a JSON Lines file or a single JSON object."""
    value, lines = _read_json(path)
    if lines is not None:
        return [(f"{path}:{n}", obj) for n, obj in zip(lines, value, strict=True)]
    if isinstance(value, dict):
        return [(str(path), value)]
    if isinstance(value, list):
        return [(f"{path}: item {i}", obj) for i, obj in enumerate(value)]
    raise AdapterError(f"{path}: expected a JSON list of objects, or JSON Lines; got {type(value).__name__}")


def _from_chunks(path: Path, b: _Builder) -> None:
    """(a) Chunks, each holding its text and a dict or list of questions (the AppleQA shape): a JSON list, or JSON
    Lines of the same objects."""
    records = _records(path)
    if not records:
        raise AdapterError(f"{path}: expected a non-empty list of chunk objects")
    for i, (where, item) in enumerate(records):
        if not isinstance(item, dict):
            raise AdapterError(f"{where}: expected an object")
        tkey, qkey, ikey = (_first_key(item, k) for k in (CHUNK_TEXT_KEYS, QUESTION_LIST_KEYS, CHUNK_ID_KEYS))
        if tkey is None:
            raise AdapterError(f"{where}: missing chunk text (one of {', '.join(CHUNK_TEXT_KEYS)})")
        if qkey is None:
            raise AdapterError(f"{where}: missing questions (one of {', '.join(QUESTION_LIST_KEYS)})")
        questions = item[qkey]
        if isinstance(questions, dict):
            questions = list(questions.values())
        if not isinstance(questions, list) or not questions:
            raise AdapterError(f"{where}: {qkey!r} must be a non-empty list or dict of questions")
        cid = b.chunk(item[tkey], where, item.get(ikey) if ikey else None, item.get("title"), default=i)
        if cid is None:
            b.drop_questions(questions)
            continue
        for j, q in enumerate(questions):
            qid = b.question(q, f"{where}, question {j}", qid=f"{cid}_q{j}")
            if qid is not None:
                b.judge(qid, cid)


def _from_llamaindex(path: Path, b: _Builder) -> None:
    """(b) LlamaIndex EmbeddingQAFinetuneDataset JSON: {"queries", "corpus", "relevant_docs"}."""
    obj, lines = _read_json(path)
    if lines is not None or not isinstance(obj, dict):
        raise AdapterError(f"{path}: expected one JSON object with queries, corpus and relevant_docs")
    for key in ("queries", "corpus", "relevant_docs"):
        if not isinstance(obj.get(key), dict):
            raise AdapterError(f"{path}: missing or non-object {key!r}")
    kept = {str(cid): b.chunk(text, f"{path}: corpus {cid!r}", cid) for cid, text in obj["corpus"].items()}
    for qid, docs in obj["relevant_docs"].items():
        if qid not in obj["queries"]:
            raise AdapterError(f"{path}: relevant_docs names unknown query id {qid!r}")
        if isinstance(docs, str):
            docs = [docs]
        for cid in docs:
            if str(cid) not in kept:
                raise AdapterError(f"{path}: relevant_docs of {qid!r} names unknown corpus id {cid!r}")
        cids = [c for c in (kept[str(d)] for d in docs) if c is not None]
        if not cids:
            b.drop_questions([obj["queries"][qid]])
            continue
        q = b.question(obj["queries"][qid], f"{path}: query {qid!r}", qid=str(qid))
        for cid in cids:
            if q is not None:
                b.judge(q, cid)


def _pair_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, row) from a CSV file, or a JSON Lines file or JSON list of objects."""
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
        header = next(rows, (1, []))[1]
        for n, row in rows:
            if not row:
                continue
            if len(row) > len(header):
                raise AdapterError(f"{path}:{n}: more columns than the header")
            if len(row) < len(header):
                raise AdapterError(f"{path}:{n}: fewer columns than the header ({len(row)} of {len(header)})")
            yield f"{path}:{n}", dict(zip(header, row, strict=True))
        return
    for where, row in _records(path):
        if not isinstance(row, dict):
            raise AdapterError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _from_pairs(path: Path, b: _Builder) -> None:
    """(c) Question/chunk pairs in CSV or JSON Lines; a chunk repeated over many rows becomes one corpus entry."""
    rows = 0
    for where, row in _pair_rows(path):
        rows += 1
        qkey, tkey, ikey = (_first_key(row, k) for k in (PAIR_QUERY_KEYS, PAIR_TEXT_KEYS, PAIR_ID_KEYS))
        if qkey is None:
            raise AdapterError(f"{where}: missing column {' or '.join(PAIR_QUERY_KEYS)}")
        if tkey is None:
            raise AdapterError(f"{where}: missing column {' or '.join(PAIR_TEXT_KEYS)}")
        chunk_id = row[ikey] if ikey and row[ikey] not in (None, "") else None
        cid = b.chunk(row[tkey], where, chunk_id)
        if cid is None:
            b.drop_questions([row[qkey]])
            continue
        qid = b.question(row[qkey], where)
        if qid is not None:
            b.judge(qid, cid)
    if not rows:
        raise AdapterError(f"{path}: no rows")


def _from_beir(path: Path, b: _Builder) -> None:
    """(d) A BEIR folder: corpus, queries and the union of its qrels files."""
    ds = load_dataset(path)
    for cid, text in ds.corpus.items():
        b.chunk(text, f"{path}: corpus {cid!r}", cid, ds.titles.get(cid))
    judged: Qrels = {}
    for qrels in ds.qrels.values():
        for qid, rels in qrels.items():
            judged.setdefault(qid, {}).update(rels)
    for qid, text in ds.queries.items():
        q = b.question(text, f"{path}: query {qid!r}", qid=qid)
        for cid, score in judged.get(qid, {}).items():
            if q is not None:
                b.judge(q, cid, score)


_CONVERTERS: dict[str, Callable[[Path, _Builder], None]] = {
    "chunks": _from_chunks, "llamaindex": _from_llamaindex, "pairs": _from_pairs, "beir": _from_beir}


def detect_format(src: str | os.PathLike) -> str:
    """Name the format of ``src`` (one of FORMATS) from its content (a ``.csv`` is read as pairs), or raise saying
    why it could not, and that ``--format`` names it."""
    src = Path(src)
    if src.is_dir():
        return "beir"
    if not src.is_file():
        raise AdapterError(f"{src}: no such file or folder")
    if src.suffix.lower() == ".csv":
        return "pairs"
    formats = f"pass --format ({', '.join(FORMATS)})"
    value, lines = _read_json(src, hint=f"; if it is not JSON or JSON Lines, {formats}")
    if lines is None and isinstance(value, dict) and {"queries", "corpus", "relevant_docs"} <= value.keys():
        return "llamaindex"
    rows = value if lines is not None or isinstance(value, list) else [value]
    first = rows[0] if rows else None
    if isinstance(first, dict):
        if _first_key(first, QUESTION_LIST_KEYS):
            return "chunks"
        if _first_key(first, PAIR_QUERY_KEYS):
            return "pairs"
        keys = ", ".join(map(str, list(first)[:8])) or "none"
        raise AdapterError(f"{src}: cannot detect the format: the first record's keys ({keys}) hold no questions "
                           f"({'/'.join(QUESTION_LIST_KEYS)}) and no question ({'/'.join(PAIR_QUERY_KEYS)}); {formats}")
    raise AdapterError(f"{src}: cannot detect the format; {formats}")


def convert(src: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *, fmt: str | None = None,
            force: bool = False, drop_empty: bool = False, keep_split: bool = False) -> tuple[Dataset, str]:
    """Read ``src`` in any supported format, or several sources merged into one dataset, and write it to ``out`` as a
    dataset folder; returns it and the format (each source's, comma-joined where they differ).

    Several sources share one corpus (a chunk id named in two must carry the same text) and one query per question
    text. ``keep_split``: the sources are the split as given, in the order train, test (or train, dev, test), written
    beside qrels/all.tsv; a question asked in two sources stays on its first one's side. ``drop_empty``: an empty
    chunk text is dropped with the questions asked of it, and an empty question is dropped, both reported in one
    logged line; without it either is an error naming the chunk and this way on."""
    sources = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(s) for s in src]
    if not sources:
        raise AdapterError("convert needs a source file or folder")
    splits: tuple[str, ...] = ()
    if keep_split:
        if len(sources) not in (2, 3):
            raise AdapterError(f"--keep-split needs two sources (train, test) or three (train, dev, test), got "
                               f"{len(sources)}")
        splits = ("train", "test") if len(sources) == 2 else SPLITS
    if fmt is not None and fmt not in _CONVERTERS:
        raise AdapterError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    seen: dict[Path, Path] = {}
    for s in sources:
        if not s.exists():
            raise AdapterError(f"{s}: no such file or folder")
        if Path(out).resolve() == s.resolve():
            raise AdapterError(f"{out}: output folder is the source folder")
        if s.resolve() in seen:
            raise AdapterError(f"{s}: given twice (as {seen[s.resolve()]} too)")
        seen[s.resolve()] = s
    b = _Builder(drop_empty=drop_empty)
    formats = []
    for i, s in enumerate(sources):
        kind = fmt or detect_format(s)
        logger.debug("%s: format %s", s, kind)
        if s.is_dir() and kind != "beir":
            raise AdapterError(f"{s}: is a folder; --format {kind} reads one file (a folder is read as beir)")
        b.source = i
        try:
            _CONVERTERS[kind](s, b)
        except (KeyError, TypeError, AttributeError) as e:
            raise AdapterError(f"{s}: does not look like the {kind!r} format ({type(e).__name__}: {e})") from None
        formats.append(kind)
    where = ", ".join(map(str, sources))
    dataset = b.dataset(where, splits)
    save_dataset(dataset, out, force=force)
    b.report(where, sources, splits)
    dataset.path = Path(out)
    return dataset, ", ".join(dict.fromkeys(formats))


# ---------------------------------------------------------------------------------------------------------- splits


def partition_qrels(qrels: Qrels, *, by: str, test_fraction: float, dev_fraction: float = 0.0,
                    seed: int) -> tuple[dict[str, Qrels], int]:
    """Deal queries into train/dev/test, by random query or by whole chunk; returns the parts and the number of
    queries dropped because their relevant chunks fell on both sides (``by="chunk"`` only)."""
    if by not in SPLIT_BY:
        raise AdapterError(f"split.by must be 'query' or 'chunk', not {by!r}")
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


def split_dataset(path: str | os.PathLike, cfg: Config | None = None, *, by: str | None = None,
                  test_fraction: float | None = None, dev_fraction: float | None = None,
                  seed: int | None = None, force: bool = False) -> dict[str, Any]:
    """Split ``qrels/all.tsv`` into train/test (and dev) qrels files as ``cfg.split`` says (the keywords override
    it); same seed, same split. An existing split (drawn before, or kept as given by ``convert``) is replaced only
    with ``force``.

    ``by="query"`` holds out random queries; ``by="chunk"`` holds out whole chunks, so no test (or dev) query's
    relevant chunk appears in train; a query whose relevant chunks fall on both sides is dropped and counted. The
    corpus stays whole: evaluation always searches every chunk. Returns the summary also written to ``split.json``.
    """
    cfg = (cfg or Config()).replace(by=by, test_fraction=test_fraction, dev_fraction=dev_fraction, seed=seed)
    by, test_fraction, dev_fraction, seed = cfg.split.by, cfg.split.test_fraction, cfg.split.dev_fraction, cfg.seed
    if by not in SPLIT_BY:
        raise AdapterError(f"split.by must be 'query' or 'chunk', not {by!r}")
    if not 0 < test_fraction < 1:
        raise AdapterError(f"split.test_fraction must be between 0 and 1, got {test_fraction}")
    if not 0 <= dev_fraction < 1 or test_fraction + dev_fraction >= 1:
        raise AdapterError(f"split.dev_fraction must be >= 0 with test + dev below 1, got {dev_fraction}")
    path = Path(path)
    ds = load_dataset(path)
    for name in SPLITS:
        refuse_existing(path / "qrels" / f"{name}.tsv", force)
    try:
        parts, dropped = partition_qrels(ds.split("all"), by=by, test_fraction=test_fraction,
                                         dev_fraction=dev_fraction, seed=seed)
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None
    summary = {"by": by, "test_fraction": test_fraction, "dev_fraction": dev_fraction, "seed": seed,
               "queries": {s: len(parts[s]) for s in SPLITS}, "dropped_queries": dropped}
    files = {f"qrels/{name}.tsv": qrels_bytes(parts[name], path / "qrels" / f"{name}.tsv")
             for name in SPLITS if parts[name]}
    files["split.json"] = json.dumps(summary, indent=2).encode("utf-8")
    # the splits and split.json as one unit: a kill never leaves a train split of one seed beside a test of another
    replace_folder(path, files, replaced=tuple(f"qrels/{name}.tsv" for name in SPLITS))
    return summary  # its dropped_queries: the CLI says it once (a log line here printed it a second time)


def split_kind(dataset: Dataset) -> str:
    """How the dataset was split ("query" or "chunk", from split.json); "query" when unknown."""
    info = dataset.path / "split.json" if dataset.path else None
    if info is not None and info.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError, AttributeError):
            return json.loads(info.read_text()).get("by", "query")
    return "query"


def train_val_qrels(dataset: Dataset, cfg: Config | None = None) -> tuple[Qrels, Qrels, str]:
    """Training and validation queries for any trainer: ``cfg.split.train_split``, and the ``dev`` split if present,
    else a seeded ``cfg.split.val_fraction`` of the training split carved the way the dataset was split (by query, or
    by whole chunk). Returns both and a phrase saying how validation was chosen."""
    cfg = cfg or Config()
    train_split, val_fraction, seed = cfg.split.train_split, cfg.split.val_fraction, cfg.seed
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
