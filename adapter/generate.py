"""Chunks -> synthetic questions through any OpenAI-compatible chat server, surviving faults and kills.

For each chunk of ``DIR/corpus.jsonl`` an LLM writes N questions a user might ask that the chunk answers. Requests go
out from a bounded thread pool under a requests-per-minute limit. A 429, a 5xx, a timeout, a dropped connection, or an
answer that is empty, cannot be parsed or holds too few questions is asked again after an exponential backoff with
jitter (at least the server's Retry-After; a 429 also pauses the whole pool that long). Any other HTTP error (a bad key,
an unknown model) stops the run at once: no retry would fix it.

Each finished chunk is appended to ``DIR/generation.jsonl`` and fsynced as it arrives, so a killed run loses at most
the requests in flight, and the same command resumes, skipping every chunk the journal holds (an entry counts only
while its chunk's text is unchanged). When no chunk is left to ask, ``queries.jsonl`` and ``qrels/all.tsv`` are rebuilt
from the journal in corpus order, so a resumed run and a run in one go write the same bytes: query ids are
``<chunk id>_q<j>``, and a question whose cosine under the frozen encoder with an earlier kept question exceeds the
threshold is dropped and counted. Chunks that still fail after every retry are listed in the summary, never skipped
silently; running the command again asks them again.

The API key is read from an environment variable only, and is never logged or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adapter import safejson
from adapter.config import Config
from adapter.data import SPLITS, atomic_write, qrels_bytes, read_jsonl, replace_folder
from adapter.errors import AdapterError, redact
from adapter.resilience import ChatRun, Journal, RetriesExhausted, Stats

logger = logging.getLogger(__name__)

JOURNAL = "generation.jsonl"  # one line per finished chunk: {"_id", "sha", "questions"}
DEDUP_BLOCK = 1024  # questions compared per matrix product when dropping near-duplicates

PROMPT = """\
You write search queries for testing a retrieval system. Here is a passage from a document:

\"\"\"
{chunk}
\"\"\"

Write {n} different questions that a real user might type when looking for the information in this passage, so that
this passage is the answer.
- Use the user's own words, not the passage's: paraphrase, never copy phrases from it.
- Mix styles as people really type: some precise, some vague, some short and colloquial, a few with typos.
- Each question must make sense on its own: never mention "the passage", "the text" or "the document".
- Keep to the passage's main facts and topics.

Answer with JSON only, in this shape:
{"questions": ["first question", "second question", ...]}
"""


class QueryEncoder(Protocol):
    """What near-duplicate dropping needs from an encoder: unit vectors for queries (adapter.encoder.Encoder)."""

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass
class Summary:
    """What a run did; ``failed`` maps each chunk that failed every retry to its last error."""

    chunks: int  # in the corpus
    already_done: int  # finished by an earlier run, found in the journal
    done: int  # finished in all, earlier runs included
    failed: dict[str, str]
    requests: int  # HTTP requests sent by this run
    retries: int  # requests that were re-asks
    retry_reasons: dict[str, int]  # why re-asks were needed
    questions: int  # written to queries.jsonl
    near_duplicates: int  # dropped before writing
    seconds: float


# ---------------------------------------------------------------------------------------------------------- answers


class ParseError(ValueError):
    """An answer with no usable list of questions; ``kind`` names the fault, the message gives detail."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind = kind


_FENCE = re.compile(r"```[A-Za-z]*[^\S\n]*\n?(.*?)```", re.S)
_NUMBERING = re.compile(r"^\s*(?:\d+[.):]|[-*\u2022])\s+")


def _json_values(content: str) -> Iterator[Any]:
    """JSON values found in an answer: the whole of it, then each code fence, then each value embedded in prose;
    bounded in depth and linear in time (``adapter.safejson``: an answer nested too deep is a DepthError)."""
    texts = [content.strip(), *(m.group(1).strip() for m in _FENCE.finditer(content))]
    for text in texts:
        with contextlib.suppress(ValueError):
            yield safejson.loads(text)
    yield from safejson.values(content)


def _question_list(value: Any) -> list[str] | None:
    """The questions in one JSON value: a list, {"questions": ...} or {"question_1": ..., ...}; None when none."""
    if isinstance(value, dict):
        for key in ("questions", "queries"):
            if key in value:
                return _question_list(value[key])
        items = list(value.values())
    elif isinstance(value, list):
        items = value
    else:
        return None
    items = [i.get("question") if isinstance(i, dict) else i for i in items]
    found = [_NUMBERING.sub("", i).strip() for i in items if isinstance(i, str)]
    found = [q for q in found if q and _valid_unicode(q)]  # a lone surrogate ("\ud83d") is valid JSON, not text
    return found or None


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_questions(content: str | None, n: int) -> list[str]:
    """The first ``n`` distinct questions in an LLM answer; ParseError when it is empty, unreadable or short."""
    if content is None or not content.strip():
        raise ParseError("empty answer")
    try:
        questions = next((q for q in map(_question_list, _json_values(content)) if q), None)
    except safejson.DepthError as e:
        raise ParseError("answer nested too deep", str(e)) from None
    if questions is None:
        raise ParseError("no questions found", f"answer starts {content.strip()[:60]!r}")
    seen: set[str] = set()
    unique = []
    for q in questions:
        key = " ".join(q.split()).casefold()
        if key not in seen:
            seen.add(key)
            unique.append(q)
    if len(unique) < n:
        raise ParseError("too few questions", f"{len(unique)} of {n}")
    return unique[:n]


# ---------------------------------------------------------------------------------------------------------- journal


def text_hash(text: str) -> str:
    """Short hash of a chunk's text: a journal entry counts only while its chunk is unchanged."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_finished(journal: Journal, hashes: Mapping[str, str]) -> dict[str, list[str]]:
    """Questions of every chunk the journal finished whose text still matches ``hashes`` (id -> text hash)."""
    finished: dict[str, list[str]] = {}
    stale = 0
    for n, entry in journal.entries():
        try:
            cid, sha, questions = str(entry["_id"]), entry["sha"], entry["questions"]
        except KeyError:
            raise AdapterError(f"{journal.path}:{n}: not a journal entry; delete the line (or the file to start "
                               "over)") from None
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise AdapterError(f"{journal.path}:{n}: 'questions' must be a list of strings")
        if hashes.get(cid) != sha:
            stale += 1
        elif cid not in finished:
            finished[cid] = questions
    if stale:
        logger.info("%s: %d entries are for chunks no longer in the corpus or since changed; ignored",
                    journal.path, stale)
    return finished


# ---------------------------------------------------------------------------------------------------------- asking


class _Tally:
    """The run's request counts (``stats``, shared with resilience.call) shown on the progress bar, plus chunks
    done/failed."""

    def __init__(self, total: int, done: int, show: bool, stats: Stats):
        from tqdm.auto import tqdm

        self.done, self.failed = done, 0
        # disable=None: no bar when stderr is not a terminal (a log file gets the summary, not 100 redrawn bars)
        self.bar = tqdm(total=total, initial=done, unit="chunk", desc="generate", disable=None if show else True)
        self.stats = stats
        stats.on_change = self._show
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix(done=self.done, failed=self.failed, retrying=self.stats.retrying, refresh=True)

    def finish(self, *, done: int = 0, failed: int = 0) -> None:
        with self.stats.lock:
            self.done += done
            self.failed += failed
            self.bar.update(done + failed)
            self._show()


# ---------------------------------------------------------------------------------------------------------- output


def drop_near_duplicates(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Keep-mask over unit vectors (n, d) in order: a row goes when its cosine with an earlier kept row is above
    ``threshold``. Compared a block at a time, so memory stays (block, kept) rather than (n, n)."""
    keep = np.zeros(len(vectors), dtype=bool)
    kept = np.empty((0, vectors.shape[1]), dtype=vectors.dtype)
    for lo in range(0, len(vectors), DEDUP_BLOCK):
        block = vectors[lo:lo + DEDUP_BLOCK]  # (B, d)
        near_kept = (block @ kept.T > threshold).any(axis=1)  # (B,)
        within = block @ block.T > threshold  # (B, B)
        chosen: list[int] = []
        for i in range(len(block)):
            if not near_kept[i] and not within[i, chosen].any():
                chosen.append(i)
        keep[lo + np.asarray(chosen, dtype=int)] = True
        kept = np.concatenate([kept, block[chosen]])
    return keep


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_queries(directory: Path, chunk_ids: Sequence[str], finished: Mapping[str, list[str]],
                  encoder: QueryEncoder, threshold: float) -> tuple[int, int]:
    """Write queries.jsonl and qrels/all.tsv from finished chunks in ``chunk_ids`` order, near-duplicates dropped, as
    one unit (``adapter.data.replace_folder``: a failure or a kill leaves the old pair whole); returns (questions
    written, near-duplicates dropped). When they change, the splits of the older questions (qrels/{train,dev,test}.tsv
    and split.json) go with them."""
    pairs = [(f"{cid}_q{j}", q, cid) for cid in chunk_ids for j, q in enumerate(finished.get(cid, ()))]
    keep = drop_near_duplicates(encoder.encode_queries([q for _, q, _ in pairs]), threshold)
    kept = [p for p, k in zip(pairs, keep, strict=True) if k]
    files = {"queries.jsonl": "".join(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n"
                                      for qid, text, _ in kept).encode("utf-8"),
             "qrels/all.tsv": qrels_bytes({qid: {cid: 1} for qid, _, cid in kept}, directory / "qrels" / "all.tsv")}
    if all(_read_bytes(directory / rel) == data for rel, data in files.items()):
        return len(kept), len(pairs) - len(kept)  # the same questions: the splits still hold
    stale = [f"qrels/{s}.tsv" for s in SPLITS if (directory / "qrels" / f"{s}.tsv").exists()]
    replace_folder(directory, files, replaced=(*stale, "split.json"))
    if stale:
        logger.warning("removed %s: split from older questions; run `adapter split %s` again", ", ".join(stale),
                       directory)
    return len(kept), len(pairs) - len(kept)


# ---------------------------------------------------------------------------------------------------------- the run


def load_prompt(path: str | os.PathLike | None) -> str:
    """The prompt template: the built-in PROMPT, or a UTF-8 file holding ``{chunk}`` (and, usually, ``{n}``)."""
    if path is None:
        return PROMPT
    try:
        template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: cannot read prompt ({getattr(e, 'strerror', None) or e})") from None
    if "{chunk}" not in template:
        raise AdapterError(f"{path}: no {{chunk}} placeholder where the chunk's text should go")
    return template


def _check(cfg: Config) -> None:
    checks = [
        (cfg.llm.questions_per_chunk >= 1, "llm.questions_per_chunk must be at least 1", cfg.llm.questions_per_chunk),
        (cfg.llm.concurrency >= 1, "llm.concurrency must be at least 1", cfg.llm.concurrency),
        (cfg.llm.requests_per_minute > 0, "llm.requests_per_minute must be positive", cfg.llm.requests_per_minute),
        (cfg.llm.request_timeout > 0, "llm.request_timeout must be positive", cfg.llm.request_timeout),
        (cfg.llm.max_retries >= 0, "llm.max_retries must be at least 0", cfg.llm.max_retries),
        (cfg.llm.temperature >= 0, "llm.temperature must be at least 0", cfg.llm.temperature),
        (0 < cfg.llm.dedup_threshold <= 1, "llm.dedup_threshold must be above 0 and at most 1",
         cfg.llm.dedup_threshold),
        (cfg.llm.retry_base_delay >= 0 and cfg.llm.retry_max_delay >= 0, "retry delays must be at least 0",
         cfg.llm.retry_base_delay),
    ]
    for ok, message, value in checks:
        if not ok:
            raise AdapterError(f"{message}, got {value}")


def read_chunks(directory: str | os.PathLike) -> dict[str, str]:
    """Chunk id -> the text the LLM sees (title, blank line, text) from ``directory/corpus.jsonl``."""
    texts, titles = read_jsonl(Path(directory) / "corpus.jsonl", "corpus")
    return {cid: f"{titles[cid]}\n\n{text}" if cid in titles else text for cid, text in texts.items()}


def generate(directory: str | os.PathLike, cfg: Config | None = None, *, encoder: QueryEncoder | None = None,
             show_progress: bool = True) -> Summary:
    """Ask for questions for every chunk not yet in the journal, then write queries.jsonl and qrels/all.tsv.

    ``encoder`` drops near-duplicates (default: the frozen ``cfg.encoder.model``, loaded only once there is something to
    write). Writes ``generate.json`` beside the output: this summary and the resolved config.
    """
    cfg = cfg or Config()
    _check(cfg)
    started = time.monotonic()
    directory = Path(directory)
    chunks = read_chunks(directory)
    template = load_prompt(cfg.llm.prompt)
    hashes = {cid: text_hash(text) for cid, text in chunks.items()}
    journal = Journal(directory / JOURNAL)
    finished = load_finished(journal, hashes)
    todo = [cid for cid in chunks if cid not in finished]
    logger.info("%s: %d chunks, %d already done, %d to ask %s", directory, len(chunks), len(finished), len(todo),
                cfg.llm.model)
    # the client first: a missing key or a bad URL is one line, not one glued to a progress bar
    run = ChatRun(cfg.llm) if todo else None
    tally = _Tally(len(chunks), len(finished), show_progress and bool(todo), run.stats if run else Stats())
    failed: dict[str, str] = {}
    n = cfg.llm.questions_per_chunk

    def ask(cid: str) -> list[str]:
        prompt = template.replace("{n}", str(n)).replace("{chunk}", chunks[cid])
        return run.chat(cfg.llm.model, prompt, cfg.llm.temperature, lambda content: parse_questions(content, n),
                        f"asking for chunk {cid!r}")

    def done(cid: str, questions: list[str]) -> None:
        journal.append({"_id": cid, "sha": hashes[cid], "questions": questions})
        finished[cid] = questions
        tally.finish(done=1)

    def fail(cid: str, e: RetriesExhausted) -> None:
        failed[cid] = redact(str(e))  # written to generate.json and printed
        tally.finish(failed=1)
        logger.warning("%s: failed after %d retries (%s)", cid, cfg.llm.max_retries, e)

    try:
        if run is not None:
            run.run_each(ask, todo, done=done, failed=fail, name="generate")
    finally:
        journal.close()
        tally.bar.close()
    written = dropped = 0
    if finished:
        if encoder is None:
            from adapter.encoder import Encoder

            encoder = Encoder.from_config(cfg, show_progress=show_progress)
        written, dropped = write_queries(directory, list(chunks), finished, encoder, cfg.llm.dedup_threshold)
    else:
        logger.warning("%s: no chunk has questions yet; nothing written", directory)
    stats = tally.stats
    summary = Summary(chunks=len(chunks), already_done=len(chunks) - len(todo), done=len(finished),
                      failed={cid: failed[cid] for cid in chunks if cid in failed}, requests=stats.requests,
                      retries=stats.retries, retry_reasons=dict(sorted(stats.reasons.items())), questions=written,
                      near_duplicates=dropped, seconds=round(time.monotonic() - started, 2))
    with atomic_write(directory / "generate.json") as f:
        json.dump({**asdict(summary), "config": cfg.to_dict("encoder", "llm")}, f, indent=2)
    return summary
