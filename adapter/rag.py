"""The answer benchmark: does a better retriever give better answers?

For each test question (or a seeded sample), each system's top-k chunks go to an OpenAI-compatible chat model with a
short answer prompt; a judge model then grades the answer against the gold chunk: ``correct``, ``partly`` or
``wrong``, with a one-line reason, in JSON. Every request goes through ``adapter.resilience`` (the one retrying,
rate-limited mechanism ``generate`` uses) and every reply is appended to an fsynced journal keyed by a hash of the
request, so a killed run resumes where it stopped and no request is paid for twice; systems that put the same chunks
in the same order before a question share one answer and one grade.

A grade that is not the JSON asked for is asked again (``cfg.rag.reasks`` times); after that the question is recorded
as ungraded for that system and counted, never guessed. Accuracy (correct 1, partly 0.5, wrong 0) is the mean over
the questions every system had graded, so systems are compared on the same questions, with 95% paired bootstrap
intervals of each system's change against base, beside the judge's retrieval metrics on the same questions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapter import safejson
from adapter.config import Config
from adapter.data import Dataset, Qrels, atomic_write, ensure_dir, relevant
from adapter.errors import AdapterError
from adapter.evaluate import PRIMARY_METRIC, evaluate, id_rank, paired_bootstrap, search
from adapter.resilience import ChatRun, Journal, RetriesExhausted

if TYPE_CHECKING:
    from adapter.systems import System

logger = logging.getLogger(__name__)

JOURNAL = "rag-journal.jsonl"  # one line per finished request: {"key", "kind", ...}
ANSWERS = "answers.jsonl"  # every (system, question): context, answer, grade, reason
RESULTS = "rag.json"  # per-system accuracy, intervals and retrieval metrics
GRADES = {"correct": 1.0, "partly": 0.5, "wrong": 0.0}

ANSWER_PROMPT = """\
Answer the question using only the passages below. If they do not hold the answer, say that you do not know.
Answer in one or two sentences.

Passages:
{passages}

Question: {question}
"""

GRADE_PROMPT = """\
You grade an answer to a question against the reference passage that holds the right answer.

Question: {question}

Reference passage:
<<<
{reference}
>>>

Answer to grade:
<<<
{answer}
>>>

Reply with JSON only, in this shape:
{{"grade": "correct" or "partly" or "wrong", "reason": "one line saying why"}}
"""


@dataclass
class RagResult:
    """What `adapter rag` measured and wrote."""

    questions: int  # asked of every system
    compared: int  # graded for every system: the questions accuracy is computed over
    accuracy: dict[str, float]  # system -> mean grade over the compared questions
    intervals: dict[str, tuple[float, float, float]]  # system -> (change vs base, low, high), paired bootstrap
    accuracy_ci: dict[str, tuple[float, float]]  # system -> bootstrap interval of its own accuracy
    retrieval: dict[str, dict[str, float]]  # system -> judge's metrics on the same questions, gold-in-context rate
    ungraded: dict[str, int]  # system -> questions whose grade never came back as the JSON asked for
    failed: int  # requests that failed every retry (run again to ask them again)
    requests: int  # HTTP requests sent by this run
    retries: int
    retry_reasons: dict[str, int]
    reused: int  # replies found in the journal from an earlier run
    seconds: float
    files: list[Path] = field(default_factory=list)


class GradeError(ValueError):
    """A grade reply that is not the JSON asked for."""

    kind = "grade not JSON"


class EmptyReply(ValueError):
    """A reply with no text: retried by ``adapter.resilience.call`` like any unreadable response."""

    kind = "empty reply"


_FENCE = re.compile(r"```[A-Za-z]*\s*(.*?)```", re.S)


def parse_grade(content: str | None) -> tuple[str, str]:
    """(grade, reason) from a judge's reply: a JSON object with ``grade`` one of correct/partly/wrong (in a code
    fence or after prose is fine); GradeError otherwise."""
    text = (content or "").strip()
    if not text:
        raise GradeError("empty reply")
    def found() -> Iterator[Any]:  # the whole reply, each code fence, each value inside prose: bounded, linear
        for candidate in (text, *(m.group(1).strip() for m in _FENCE.finditer(text))):
            with contextlib.suppress(ValueError):
                yield safejson.loads(candidate)
        yield from safejson.values(text)

    try:
        for value in found():
            if isinstance(value, dict) and str(value.get("grade", "")).strip().lower() in GRADES:
                reason = " ".join(str(value.get("reason", "")).split())[:300]
                return str(value["grade"]).strip().lower(), reason
    except safejson.DepthError as e:
        raise GradeError(f"reply nested too deep ({e})") from None
    raise GradeError(f"no grade in reply starting {text[:60]!r}")


def _reply_text(content: str | None) -> str:
    if not content or not content.strip():
        raise EmptyReply("empty reply")
    return content


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def answer_prompt(question: str, chunks: Sequence[str]) -> str:
    """The answer prompt: numbered passages, one line each, then the question."""
    passages = "\n".join(f"[{i}] {' '.join(c.split())}" for i, c in enumerate(chunks, 1))
    return ANSWER_PROMPT.format(passages=passages, question=question)


def grade_prompt(question: str, reference: str, answer: str) -> str:
    """The judge's prompt: question, the gold chunk, the answer, and the JSON shape wanted."""
    return GRADE_PROMPT.format(question=question, reference=" ".join(reference.split()), answer=answer.strip())


def sample_questions(qrels: Mapping[str, Any], limit: int | None, seed: int) -> list[str]:
    """The test questions asked: all, or a seeded sample of ``limit`` in split order."""
    qids = list(qrels)
    if limit is None or limit >= len(qids):
        return qids
    if limit < 1:
        raise AdapterError(f"rag.limit must be at least 1, got {limit}")
    keep = set(np.random.default_rng(seed).choice(len(qids), size=limit, replace=False).tolist())
    return [q for i, q in enumerate(qids) if i in keep]


def retrieve(dataset: Dataset, system: System, qids: Sequence[str], qrels: Qrels, k: int
             ) -> tuple[list[list[str]], dict[str, float]]:
    """Each question's top ``k`` corpus ids under a system (the one search function, then its second stage), and the
    judge's metrics (full dim) on the same questions."""
    from adapter.systems import second_stage

    texts = [dataset.queries[q] for q in qids]
    queries = system.encode_queries(texts)
    cids, corpus = system.corpus.read(dataset, system.encoder)
    reorder = second_stage(system, dataset, cids)
    depth = max(k, reorder.k) if reorder is not None else k
    scores, rows = search(queries, corpus, depth, tie_rank=id_rank(cids))
    if reorder is not None:
        rows = reorder(list(qids), rows, scores)
    full = corpus.shape[1]
    metrics = evaluate(queries, corpus, {q: qrels[q] for q in qids}, list(qids), cids, [full], rerank=reorder)[full]
    return [[cids[r] for r in row[:k]] for row in rows], metrics


class _Asker:
    """Sends chat requests through the one retry mechanism, journalling each reply by its key."""

    def __init__(self, cfg: Config, journal: Journal, done: dict[str, dict[str, Any]]):
        self.cfg, self.journal, self.done = cfg, journal, done
        self.run = ChatRun(cfg.llm)
        self.stats = self.run.stats
        self.lock = threading.Lock()

    def chat(self, model: str, prompt: str, what: str) -> str:
        return self.run.chat(model, prompt, self.cfg.rag.temperature, _reply_text, what)

    def record(self, entry: dict[str, Any]) -> None:
        self.journal.append(entry)
        with self.lock:
            self.done[entry["key"]] = entry

    def answer(self, key: str, question: str, chunks: Sequence[str], qid: str) -> dict[str, Any]:
        if key in self.done:
            return self.done[key]
        text = self.chat(self.cfg.llm.model, answer_prompt(question, chunks), f"answering question {qid!r}")
        entry = {"key": key, "kind": "answer", "answer": text.strip()}
        self.record(entry)
        return entry

    def grade(self, key: str, question: str, reference: str, answer: str, qid: str) -> dict[str, Any]:
        if key in self.done:
            return self.done[key]
        model = self.cfg.rag.judge_model or self.cfg.llm.model
        prompt = grade_prompt(question, reference, answer)
        why = ""
        for attempt in range(self.cfg.rag.reasks + 1):
            try:
                grade, reason = parse_grade(self.chat(model, prompt, f"grading question {qid!r}"))
            except GradeError as e:
                why = str(e)
                if attempt < self.cfg.rag.reasks:
                    self.stats.add(retry="grade not JSON")
                continue
            entry = {"key": key, "kind": "grade", "grade": grade, "reason": reason}
            break
        else:
            entry = {"key": key, "kind": "grade", "grade": None, "reason": f"ungraded: {why}"}
        self.record(entry)
        return entry


def _work(asker: _Asker, dataset: Dataset, qid: str, ids: Sequence[str], gold: Sequence[str]) -> dict[str, Any]:
    """One question with one context: the answer, then its grade (each skipped when journalled)."""
    question = dataset.queries[qid]
    chunks = [dataset.doc_text(c) for c in ids]
    a_key = _key("answer", asker.cfg.llm.model, answer_prompt(question, chunks))
    answer = asker.answer(a_key, question, chunks, qid)["answer"]
    reference = "\n\n".join(dataset.doc_text(c) for c in gold)
    g_key = _key("grade", asker.cfg.rag.judge_model or asker.cfg.llm.model, grade_prompt(question, reference, answer))
    g = asker.grade(g_key, question, reference, answer, qid)
    return {"answer": answer, "grade": g["grade"], "reason": g["reason"]}


def _check(cfg: Config) -> None:
    r = cfg.rag
    checks = [(r.k >= 1, "rag.k must be at least 1", r.k), (r.reasks >= 0, "rag.reasks must be at least 0", r.reasks),
              (cfg.llm.concurrency >= 1, "llm.concurrency must be at least 1", cfg.llm.concurrency),
              (cfg.llm.max_retries >= 0, "llm.max_retries must be at least 0", cfg.llm.max_retries)]
    for ok, message, value in checks:
        if not ok:
            raise AdapterError(f"{message}, got {value}")


def run_rag(dataset: Dataset, systems: Mapping[str, System], qids: Sequence[str], out: str | os.PathLike,
            cfg: Config | None = None, *, progress: bool = True) -> RagResult:
    """Ask, grade and score: each of ``systems`` (``adapter.systems.build_systems``) retrieves for ``qids``; writes
    ``answers.jsonl`` and ``rag.json`` into ``out`` beside the journal that makes the run resumable."""
    from tqdm.auto import tqdm

    cfg = cfg or Config()
    _check(cfg)
    if "base" not in systems:
        raise AdapterError("the systems must include 'base': every change is measured against it")
    started = time.monotonic()
    out = ensure_dir(out)
    if cfg.rag.k > len(dataset.corpus):
        raise AdapterError(f"-k {cfg.rag.k} is above the corpus's {len(dataset.corpus)} chunks")
    qrels = relevant(dataset.split(cfg.evaluate.split))
    retrieved = {s: retrieve(dataset, system, qids, qrels, cfg.rag.k) for s, system in systems.items()}
    lists = {s: r[0] for s, r in retrieved.items()}
    journal = Journal(out / JOURNAL)
    done = {e["key"]: e for _, e in journal.entries() if "key" in e}
    asker = _Asker(cfg, journal, done)
    reused = len(done)

    # one unit of work per distinct (question, context): systems that agree share the answer and its grade
    units: dict[tuple[str, tuple[str, ...]], None] = {}
    for s in systems:
        for qid, ids in zip(qids, lists[s], strict=True):
            units[(qid, tuple(ids))] = None
    results: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    failed = 0
    bar = tqdm(total=len(units), unit="q", desc="rag", disable=not progress)

    def work(unit: tuple[str, tuple[str, ...]]) -> dict[str, Any]:
        return _work(asker, dataset, unit[0], unit[1], list(qrels[unit[0]]))

    def done(unit: tuple[str, tuple[str, ...]], result: dict[str, Any]) -> None:
        results[unit] = result
        bar.update(1)

    def fail(unit: tuple[str, tuple[str, ...]], e: RetriesExhausted) -> None:
        nonlocal failed
        failed += 1
        logger.warning("question %s: failed after every retry (%s)", unit[0], e)
        bar.update(1)

    try:
        asker.run.run_each(work, units, done=done, failed=fail, name="rag")
    finally:
        journal.close()
        bar.close()

    # the answers file, then scores over questions graded for every system
    rows = []
    scores: dict[str, dict[str, float]] = {s: {} for s in systems}
    ungraded = {s: 0 for s in systems}
    for s in systems:
        for qid, ids in zip(qids, lists[s], strict=True):
            r = results.get((qid, tuple(ids)))
            gold_in = any(c in qrels[qid] for c in ids)
            rows.append({"system": s, "query_id": qid, "question": dataset.queries[qid], "context_ids": list(ids),
                         "gold_ids": list(qrels[qid]), "gold_in_context": gold_in,
                         "answer": r["answer"] if r else None, "grade": r["grade"] if r else None,
                         "reason": r["reason"] if r else "failed: run again to ask again"})
            if r and r["grade"] is not None:
                scores[s][qid] = GRADES[r["grade"]]
            elif r:
                ungraded[s] += 1
    common = [q for q in qids if all(q in scores[s] for s in systems)]
    acc, intervals, acc_ci = {}, {}, {}
    for s in systems:
        v = np.array([scores[s][q] for q in common])
        acc[s] = float(v.mean()) if len(v) else float("nan")
        if len(v):
            _, lo, hi = paired_bootstrap(np.zeros_like(v), v, samples=cfg.report.bootstrap_samples, seed=cfg.seed)
            acc_ci[s] = (lo, hi)
            if s != "base":
                b = np.array([scores["base"][q] for q in common])
                intervals[s] = paired_bootstrap(b, v, samples=cfg.report.bootstrap_samples, seed=cfg.seed)
    retrieval = {s: {PRIMARY_METRIC: retrieved[s][1][PRIMARY_METRIC],
                     "gold_in_context": float(np.mean([any(c in qrels[q] for c in ids)
                                                       for q, ids in zip(qids, lists[s], strict=True)]))}
                 for s in systems}
    result = RagResult(len(qids), len(common), acc, intervals, acc_ci, retrieval, ungraded, failed,
                       asker.stats.requests, asker.stats.retries, dict(sorted(asker.stats.reasons.items())), reused,
                       round(time.monotonic() - started, 2))
    with atomic_write(out / ANSWERS) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"dataset": str(dataset.path), "split": cfg.evaluate.split, "k": cfg.rag.k, "llm_model": cfg.llm.model,
               "judge_model": cfg.rag.judge_model or cfg.llm.model, "questions": result.questions,
               "compared": result.compared, "systems": {s: {"accuracy": acc[s], "accuracy_ci": acc_ci.get(s),
                                                            "change": intervals.get(s), "ungraded": ungraded[s],
                                                            **retrieval[s]} for s in systems},
               "failed": failed, "requests": result.requests, "retries": result.retries,
               "retry_reasons": result.retry_reasons, "reused": reused, "seconds": result.seconds,
               "config": cfg.to_dict("encoder", "llm", "rerank", "rag")}
    with atomic_write(out / RESULTS) as f:
        json.dump(summary, f, indent=2)
    result.files = [out / ANSWERS, out / RESULTS]
    return result
