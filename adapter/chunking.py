"""Documents -> chunks: read .txt, .md and .pdf, split each to a target size with overlap, write ``corpus.jsonl``.

Splitting is recursive: the text is cut at paragraph breaks and sentence ends, a sentence longer than a chunk at
spaces, and only a single word longer than a chunk between tokens (or characters). The pieces are packed into chunks of
at most ``size`` units like a sliding window: a chunk ends at the strongest boundary (paragraph, then sentence, then
word) that leaves it at least half full, and the next one starts far enough back to share up to ``overlap`` units of
whole sentences with it. Units are tokens of the embedding model's own tokenizer (what it truncates by) or characters.

Each chunk is an exact slice of its document: ``text == document[start:end]``, where the document is its text as read
(newlines normalised; a PDF's pages joined by blank lines). Ids are ``<file stem>-<n>``: the same documents and
settings give the same ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from adapter.config import CHUNK_UNITS, Config
from adapter.data import atomic_write, ensure_dir
from adapter.errors import AdapterError, one_line

logger = logging.getLogger(__name__)

DOC_SUFFIXES = (".txt", ".md", ".pdf")
BOUNDARIES = (  # coarsest first; a cut falls after the match, so the separator stays with the text before it
    re.compile(r"\n[^\S\n]*\n\s*"),  # paragraph: a blank line
    re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+"),  # sentence: end mark, closing quotes or brackets, space
    re.compile(r"\s+"),  # word
)


@dataclass(frozen=True)
class Chunk:
    """One chunk: its id, its text and where it sits in its source document (character offsets)."""

    id: str
    text: str
    source: str
    start: int
    end: int


# ---------------------------------------------------------------------------------------------------------- reading


def find_documents(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The documents named: files as given, folders searched recursively for .txt, .md and .pdf (sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DOC_SUFFIXES)
        elif not p.is_file():
            raise AdapterError(f"{p}: no such file or folder")
        elif p.suffix.lower() not in DOC_SUFFIXES:
            raise AdapterError(f"{p}: unsupported document type (expected {', '.join(DOC_SUFFIXES)})")
        else:
            found.append(p)
    if not found:
        raise AdapterError(f"{', '.join(map(str, paths))}: no .txt, .md or .pdf documents found")
    return list(dict.fromkeys(found))


def read_document(path: str | os.PathLike) -> str:
    """The text of a .txt or .md file (UTF-8) or of a PDF's text layer (pages joined by blank lines)."""
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        return _read_pdf(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise AdapterError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read ({e.strerror})") from None


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise AdapterError(f"{path}: reading PDFs needs pypdf (pip install 'adapter[pdf]')") from None
    try:
        pages = [page.extract_text() or "" for page in PdfReader(path).pages]
    except Exception as e:  # pypdf raises many types for damaged or encrypted files; the user needs one line
        raise AdapterError(f"{path}: cannot read PDF ({type(e).__name__}: {one_line(e)})") from None
    return "\n\n".join(page.strip() for page in pages)


# ---------------------------------------------------------------------------------------------------------- splitting


def _check_sizes(size: int, overlap: int) -> None:
    if size < 1:
        raise AdapterError(f"chunk.size must be at least 1, got {size}")
    if not 0 <= overlap < size:
        raise AdapterError(f"chunk.overlap must be at least 0 and below chunk.size ({size}), got {overlap}")


def split_text(text: str, size: int, overlap: int, starts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(start, end) character spans of chunks of at most ``size`` units, each sharing up to ``overlap`` with the last.

    ``starts`` are the character offsets at which units (tokens) begin, ascending; None counts characters. Spans are
    trimmed of surrounding whitespace and never empty.
    """
    _check_sizes(size, overlap)
    starts = range(len(text)) if starts is None else starts

    def length(a: int, b: int) -> int:  # units beginning in text[a:b]
        return bisect_left(starts, b) - bisect_left(starts, a)

    def pieces(a: int, b: int, level: int, end_strength: int) -> list[tuple[int, int, int]]:
        """(start, end, strength of the boundary at its end): always cut into sentences, below that only as needed."""
        if level >= len(BOUNDARIES) - 1 and length(a, b) <= size:
            return [(a, b, end_strength)]
        if level >= len(BOUNDARIES):  # one word longer than a chunk: cut between units
            i, j = bisect_left(starts, a), bisect_left(starts, b)
            cuts = [starts[k] for k in range(i + size, j, size)]
        else:
            cuts = [m.end() for m in BOUNDARIES[level].finditer(text, a, b) if a < m.end() < b]
        strength = len(BOUNDARIES) - level  # paragraph 3, sentence 2, word 1, inside a word 0
        bounds = [a, *cuts, b]
        return [p for lo, hi in pairwise(bounds)
                for p in pieces(lo, hi, level + 1, end_strength if hi == b else strength)]

    parts = pieces(0, len(text), 0, len(BOUNDARIES))
    sums = [0]  # sums[k]: units in parts[:k]
    for a, b, _ in parts:
        sums.append(sums[-1] + length(a, b))
    spans: list[tuple[int, int]] = []
    first, last_end, reach = 0, -1, 0  # the chunk's first part, the last chunk's last part, furthest part that fits
    while first < len(parts):
        while first < len(parts) - 1 and text[parts[first][0]:parts[first][1]].isspace():
            first += 1  # never start a chunk on bare whitespace
        reach = max(reach, first)
        while reach + 1 < len(parts) and sums[reach + 2] - sums[first] <= size:
            reach += 1
        if reach == len(parts) - 1:
            spans.append((parts[first][0], parts[-1][1]))
            break
        # End at the strongest boundary that leaves the chunk at least half full, the latest among equals.
        ends = [j for j in range(max(first, last_end + 1), reach + 1) if 2 * (sums[j + 1] - sums[first]) >= size]
        end = max(ends or [reach], key=lambda j: (parts[j][2], j))
        spans.append((parts[first][0], parts[end][1]))
        # Start the next chunk as far back as the overlap allows while its first new part still fits.
        nxt = first + 1
        while sums[end + 1] - sums[nxt] > overlap or sums[end + 2] - sums[nxt] > size:
            nxt += 1
        first, last_end = nxt, end
    return _trim(text, spans)


def _trim(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans without surrounding whitespace, dropping empty ones and any that lie inside the one before."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b and (not out or b > out[-1][1]):
            out.append((a, b))
    return out


def load_tokenizer(model: str) -> Any:
    """The embedding model's own tokenizer (a fast one, for character offsets); the bundled MiniLM loads offline."""
    from transformers import AutoTokenizer

    from adapter.encoder import resolve_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    except Exception as e:  # hub and transformers raise many types; the user needs one line
        raise AdapterError(f"{model}: cannot load tokenizer ({one_line(e)}); or use chunk.unit 'chars'") from None
    if not tokenizer.is_fast:
        raise AdapterError(f"{model}: tokenizer gives no character offsets (not a fast tokenizer); use chunk.unit "
                           "'chars'")
    return tokenizer


def model_max_tokens(model: str) -> int | None:
    """How many tokens the embedding model reads (its ``max_seq_length``; MiniLM: 256), from its sentence-transformers
    config; None when that is not at hand. A chunk longer than this is cut when embedded."""
    from adapter.encoder import resolve_model

    try:
        config = json.loads((Path(resolve_model(model)) / "sentence_bert_config.json").read_text(encoding="utf-8"))
        return int(config["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def token_starts(text: str, tokenizer: Any) -> list[int]:
    """Character offsets at which the tokenizer's tokens begin in ``text`` (no special tokens)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [a for a, b in enc["offset_mapping"] if b > a]


def _id_prefix(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "doc"


def chunk_documents(paths: Sequence[str | os.PathLike], *, size: int, overlap: int, unit: str,
                    model: str | None = None) -> list[Chunk]:
    """Read and split every document; ids are ``<file stem>-<n>`` in document order. Empty documents are skipped."""
    _check_sizes(size, overlap)
    if unit not in CHUNK_UNITS:
        raise AdapterError(f"chunk.unit must be one of {', '.join(CHUNK_UNITS)}, not {unit!r}")
    docs = find_documents(paths)
    owners: dict[str, Path] = {}
    for doc in docs:
        prefix = _id_prefix(doc)
        if prefix in owners:
            raise AdapterError(f"{doc}: same name as {owners[prefix]}, so their chunk ids would clash; rename one")
        owners[prefix] = doc
    tokenizer = load_tokenizer(model or Config().encoder.model) if unit == "tokens" else None
    chunks: list[Chunk] = []
    for doc in docs:
        text = read_document(doc)
        starts = token_starts(text, tokenizer) if tokenizer is not None else None
        spans = split_text(text, size, overlap, starts)
        if not spans:
            ocr = " (a scanned PDF needs OCR first)" if doc.suffix.lower() == ".pdf" else ""
            logger.warning("%s: no text, skipped%s", doc, ocr)
            continue
        prefix = _id_prefix(doc)
        chunks += [Chunk(f"{prefix}-{i}", text[a:b], str(doc), a, b) for i, (a, b) in enumerate(spans)]
        logger.info("%s: %d chunks", doc, len(spans))
    if not chunks:
        raise AdapterError(f"{', '.join(map(str, paths))}: no text in any document")
    return chunks


def chunk(paths: Sequence[str | os.PathLike], out: str | os.PathLike, cfg: Config | None = None, *,
          force: bool = False) -> list[Chunk]:
    """Chunk documents into ``out/corpus.jsonl`` (with source and offsets) and record the settings in chunk.json."""
    cfg = cfg or Config()
    out = Path(out)
    if (out / "corpus.jsonl").exists() and not force:
        raise AdapterError(f"{out}: already holds a corpus; pass --force to replace it")
    chunks = chunk_documents(paths, size=cfg.chunk.size, overlap=cfg.chunk.overlap, unit=cfg.chunk.unit,
                             model=cfg.encoder.model)
    limit = model_max_tokens(cfg.encoder.model) if cfg.chunk.unit == "tokens" else None
    if limit is not None and cfg.chunk.size > limit:  # never cut silently
        logger.warning("%d-token chunks are longer than the %d tokens %s reads: the rest of each chunk is never "
                       "embedded; pass --size %d or less", cfg.chunk.size, limit, cfg.encoder.model, limit)
    ensure_dir(out)
    with atomic_write(out / "corpus.jsonl") as f:
        for c in chunks:
            row = {"_id": c.id, "text": c.text, "source": c.source, "start": c.start, "end": c.end}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    per_doc: dict[str, int] = {}
    for c in chunks:
        per_doc[c.source] = per_doc.get(c.source, 0) + 1
    settings = {"size": cfg.chunk.size, "overlap": cfg.chunk.overlap, "unit": cfg.chunk.unit,
                "model": cfg.encoder.model if cfg.chunk.unit == "tokens" else None, "chunks": len(chunks),
                "documents": per_doc}
    with atomic_write(out / "chunk.json") as f:
        json.dump(settings, f, indent=2)
    return chunks
