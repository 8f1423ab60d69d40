"""Question synthesis against a real HTTP server on 127.0.0.1 (tests/fake_llm.py) that injects faults on demand:
parsing, retries and backoff, pacing, resuming (including after SIGKILL), near-duplicates and the API key."""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fake_llm import FAULTS, FakeLLM, render

from adapter.config import Config
from adapter.data import load_dataset
from adapter.errors import AdapterError
from adapter.generate import JOURNAL, ParseError, drop_near_duplicates, generate, parse_questions
from tests.processes import kill_and_resume

ROOT = Path(__file__).resolve().parents[1]
N = 4  # questions per chunk in these tests


def write_corpus(folder: Path, n: int, seed: int = 0) -> dict[str, str]:
    """``n`` chunks of made-up words, so no two chunks share a question."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))

    chunks = {f"c{i}": " ".join(word() for _ in range(8)) + "." for i in range(n)}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for cid, text in chunks.items():
            f.write(json.dumps({"_id": cid, "text": text}) + "\n")
    return chunks


class FakeEncoder:
    """One-hot vectors per normalised text (case and punctuation ignored): equal texts have cosine 1, others 0."""

    def __init__(self):
        self.index: dict[str, int] = {}

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 4096), dtype=np.float32)
        for i, t in enumerate(texts):
            key = " ".join("".join(c for c in t.lower() if c.isalnum() or c.isspace()).split())
            out[i, self.index.setdefault(key, len(self.index))] = 1
        return out


def config(llm: FakeLLM, **overrides) -> Config:
    """Settings for fast tests: tiny backoff, no pacing to speak of, a short timeout."""
    base = {"base_url": llm.url, "questions_per_chunk": N, "concurrency": 2, "requests_per_minute": 60_000,
            "request_timeout": 0.5, "retry_base_delay": 0.01, "retry_max_delay": 2.0}
    return Config().replace(llm={**base, **overrides})


def run(folder: Path, llm: FakeLLM, **overrides):
    return generate(folder, config(llm, **overrides), encoder=FakeEncoder(), show_progress=False)


def queries(folder: Path) -> dict[str, str]:
    return {r["_id"]: r["text"] for r in map(json.loads, (folder / "queries.jsonl").read_text().splitlines())}


def outputs(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "queries.jsonl").read_bytes(), (folder / "qrels" / "all.tsv").read_bytes()


def expected(chunks: dict[str, str], llm: FakeLLM) -> dict[str, str]:
    return {f"{cid}_q{j}": q for cid, text in chunks.items() for j, q in enumerate(llm.answer(text)[:N])}


# ---------------------------------------------------------------------------------------------------------- parsing

QS = ["where do i report a leak?", "Who fixes burst pipes", "is the tap water safe after flushing"]


@pytest.mark.parametrize("content", [
    *(render(QS, shape) for shape in range(5)),  # question_k dict, list, {"questions"}, code fence, prose
    json.dumps({"questions": {"q1": QS[0], "q2": QS[1], "q3": QS[2]}}),
    json.dumps([{"question": q} for q in QS]),
    json.dumps([f"{k}. {q}" for k, q in enumerate(QS, 1)]),
    "Here you go:\n```\n" + json.dumps(QS) + "\n```\nAnything else?",
    json.dumps({"result": {"questions": QS}, "note": [1, 2]}),  # inside other JSON
    "Here: " + json.dumps({"result": {"questions": QS}, "note": [1, 2]})[:-1],  # inside unclosed JSON
])
def test_parse_questions_reads_every_shape(content: str):
    assert parse_questions(content, 3) == QS


def test_parse_questions_takes_the_first_n_distinct():
    content = json.dumps([QS[0], "  " + QS[0].upper() + " ", QS[1], QS[2], "one more"])
    assert parse_questions(content, 3) == QS


@pytest.mark.parametrize(("content", "kind"), [
    (None, "empty answer"),
    ("  \n", "empty answer"),
    (render(QS, 0)[:40], "no questions found"),
    ("I cannot help with that.", "no questions found"),
    (json.dumps({"answer": 42}), "no questions found"),
    (json.dumps(QS[:2]), "too few questions"),
    (json.dumps([QS[0], QS[0].upper(), QS[1]]), "too few questions"),  # a repeat does not count twice
    (json.dumps([QS[0], "what is \ud83d?", QS[1]]), "too few questions"),  # a lone surrogate is not a question
])
def test_parse_questions_rejects_what_must_be_asked_again(content: str | None, kind: str):
    with pytest.raises(ParseError) as e:
        parse_questions(content, 3)
    assert e.value.kind == kind


class _Scanned:
    """Counts the characters every JSON decode scans (``json.JSONDecoder.raw_decode``, which ``json.loads`` calls
    too): how much work a parse did, whatever the machine's speed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.chars = 0
        real = json.JSONDecoder.raw_decode

        def counted(decoder, s, idx=0):
            try:
                value, end = real(decoder, s, idx)
            except json.JSONDecodeError as e:
                self.chars += e.pos - idx + 1
                raise
            self.chars += end - idx
            return value, end

        monkeypatch.setattr(json.JSONDecoder, "raw_decode", counted)


@pytest.mark.parametrize("levels", [40, 200])
def test_parsing_an_answer_is_linear_in_its_length(levels: int, monkeypatch: pytest.MonkeyPatch):
    """Audit #24.4: a 4.8 MB answer took 33-58 s: a decode started at every bracket, inside values already decoded
    too (each inner start scanned to the end again). Now each character is scanned a bounded number of times."""
    content = "Sure: " + "[" * levels + "1, " * 60_000 + "1" + "]" * levels + " done"
    scanned = _Scanned(monkeypatch)
    with pytest.raises(ParseError) as e:
        parse_questions(content, 3)
    assert e.value.kind == ("no questions found" if levels <= 64 else "answer nested too deep")
    assert scanned.chars <= 12 * len(content), f"{scanned.chars:,} characters scanned for {len(content):,}"


@pytest.mark.parametrize("content", ["[" * 100_000, '{"questions": ' * 50_000, 'a "' + "[" * 100_000],
                         ids=["brackets", "objects", "after-a-quote"])
def test_an_answer_nested_deep_is_asked_again_not_a_crash(content: str):
    """Audit #24.8: an answer nested 10^5 deep was a RecursionError out of the worker (a traceback)."""
    with pytest.raises(ParseError):
        parse_questions(content, 3)


def test_a_failure_between_queries_and_qrels_leaves_the_old_dataset_whole(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """queries.jsonl and qrels/all.tsv are one unit: a run that fails (or is killed) while writing qrels/all.tsv
    used to leave new queries beside old qrels, and splits of neither. Now the old dataset, splits included, stays."""
    import adapter.data
    from adapter.data import split_dataset

    folder = tmp_path / "ds"
    chunks = write_corpus(folder, 6)
    with FakeLLM(questions=N) as llm:
        run(folder, llm)
        split_dataset(folder, by="query", test_fraction=0.3, seed=0)
        names = ["queries.jsonl", "qrels/all.tsv", "qrels/train.tsv", "qrels/test.tsv", "split.json"]
        before = {n: (folder / n).read_bytes() for n in names}
        write_corpus(folder, 6, seed=1)  # every chunk changed: all asked again, new questions
        real = adapter.data.atomic_write

        def dies_on_qrels(path, mode="w"):
            if Path(path).name == "all.tsv":
                raise KeyboardInterrupt  # as a kill between the two files would
            return real(path, mode)

        monkeypatch.setattr(adapter.data, "atomic_write", dies_on_qrels)
        with pytest.raises(KeyboardInterrupt):
            run(folder, llm)
        assert {n: (folder / n).read_bytes() for n in names} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left
        monkeypatch.undo()
        s = run(folder, llm)  # the journal holds every new chunk: nothing asked, both files written
        assert s.requests == 0 and queries(folder) == expected(write_corpus(tmp_path / "x", 6, seed=1), llm)
    assert queries(folder) != {k: v for k, v in expected(chunks, llm).items()}
    assert not (folder / "qrels" / "train.tsv").exists() and not (folder / "split.json").exists()
    assert load_dataset(folder).qrels.keys() == {"all"}


def test_drop_near_duplicates_keeps_the_first_of_each_group():
    # Rows 0 and 1 have cosine 0.96 (a near-duplicate); row 2 is 0.9 from row 0 (kept); row 3 repeats row 2.
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.96, np.sqrt(1 - 0.96**2), 0.0])
    c = np.array([0.9, 0.0, np.sqrt(1 - 0.81)])
    vectors = np.stack([a, b, c, c]).astype(np.float32)
    assert drop_near_duplicates(vectors, 0.95).tolist() == [True, False, True, False]
    assert drop_near_duplicates(vectors, 0.97).tolist() == [True, True, True, False]
    assert drop_near_duplicates(vectors, 0.85).tolist() == [True, False, False, False]


# ---------------------------------------------------------------------------------------------------------- runs


def test_generate_writes_a_dataset_folder(tmp_path: Path):
    chunks = write_corpus(tmp_path, 6)
    with FakeLLM(questions=N) as llm:
        s = run(tmp_path, llm)
        assert queries(tmp_path) == expected(chunks, llm)
    ds = load_dataset(tmp_path)  # the loader accepts it
    assert ds.qrels["all"] == {qid: {qid.split("_q")[0]: 1} for qid in ds.queries}
    assert (s.done, s.failed, s.requests, s.retries, s.questions, s.near_duplicates) == (6, {}, 6, 0, 24, 0)
    assert len((tmp_path / JOURNAL).read_text().splitlines()) == 6
    report = json.loads((tmp_path / "generate.json").read_text())
    assert report["questions"] == 24 and report["config"]["llm"]["questions_per_chunk"] == N


REASONS = {"500": "HTTP 500", "429": "HTTP 429", "slow": "timeout", "malformed": "no questions found",
           "empty": "empty answer", "few": "too few questions", "drop": "connection error"}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_asked_again_until_it_succeeds(tmp_path: Path, fault: str):
    chunks = write_corpus(tmp_path, 3)
    with FakeLLM(questions=N, slow_seconds=1.0, retry_after="0") as llm:
        llm.push(fault, fault)  # the first chunk meets the fault twice, then gets its answer
        s = run(tmp_path, llm, concurrency=1)
        assert queries(tmp_path) == expected(chunks, llm)
        assert llm.faults_seen() == {fault: 2}
    assert (s.done, s.failed, s.requests, s.retries) == (3, {}, 5, 2)
    assert s.retry_reasons == {REASONS[fault]: 2}


def test_retry_after_is_honoured(tmp_path: Path, backoff_delays: list[float]):
    write_corpus(tmp_path, 1)
    with FakeLLM(questions=N, retry_after="1") as llm:
        llm.push("429")
        s = run(tmp_path, llm)
    first, second = llm.requests
    assert first.fault == "429" and second.fault is None
    assert backoff_delays == [1.0]  # the server's Retry-After; backoff alone would have waited about 0.01 s
    assert s.retry_reasons == {"HTTP 429": 1}


def test_requests_in_flight_and_per_minute_are_bounded(tmp_path: Path):
    write_corpus(tmp_path, 9)
    with FakeLLM(questions=N, delay=0.2) as llm:
        run(tmp_path, llm, concurrency=3)
    assert llm.max_inflight == 3
    write_corpus(tmp_path / "paced", 5)
    with FakeLLM(questions=N) as llm:
        run(tmp_path / "paced", llm, concurrency=4, requests_per_minute=600)  # one start every 0.1 s
    starts = sorted(r.start for r in llm.requests)  # as the server saw them: arrival adds jitter to each gap
    assert starts[-1] - starts[0] >= 0.9 * 0.1 * (len(starts) - 1) and min(np.diff(starts)) >= 0.05


def test_a_chunk_failing_every_retry_is_listed_then_asked_again(tmp_path: Path):
    chunks = write_corpus(tmp_path, 4)
    with FakeLLM(questions=N) as llm:
        llm.push("500", "500", "500")  # the first chunk: one request and two retries, all failing
        s = run(tmp_path, llm, concurrency=1, max_retries=2)
        assert s.failed == {"c0": "HTTP 500"} and s.done == 3
        assert not any(qid.startswith("c0_") for qid in queries(tmp_path))
        s = run(tmp_path, llm)
        assert (s.already_done, s.done, s.failed, s.requests) == (3, 4, {}, 1)  # only the failed chunk is asked
        assert queries(tmp_path) == expected(chunks, llm)  # in corpus order, as if it had never failed


def test_cli_lists_failed_chunks_and_exits_non_zero(tmp_path: Path):
    from cli import main

    write_corpus(tmp_path, 3)
    with FakeLLM(questions=N) as llm:
        llm.push("500", "500")
        args = ["generate", str(tmp_path), "--base-url", llm.url, "--questions-per-chunk", str(N), "--set",
                "llm.concurrency=1", "--set", "llm.max_retries=1", "--llm-model", "qwen2.5:7b", "--set",
                "llm.temperature=0.3"]
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert {(q.model, q.temperature) for q in llm.requests} == {("qwen2.5:7b", 0.3)}
    assert "chunks: 3, done 2 (0 from an earlier run), failed 1" in r.output
    assert "questions: 8 written, 0 near-duplicates dropped" in r.output
    assert "requests: 4, retries 1 (HTTP 500: 1)" in r.output
    assert "  c0: HTTP 500" in r.output


def test_an_error_no_retry_can_fix_stops_the_run_at_once(tmp_path: Path):
    write_corpus(tmp_path, 5)
    with FakeLLM(questions=N) as llm:
        llm.push("401")
        with pytest.raises(AdapterError, match=r"HTTP 401 asking for chunk 'c0' \(Incorrect API key provided\)"):
            run(tmp_path, llm, concurrency=1)
    assert len(llm.requests) == 1


def test_api_key_comes_from_the_environment_and_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture):
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("MY_LLM_KEY", secret)
    write_corpus(tmp_path, 3)
    caplog.set_level(logging.DEBUG)
    with FakeLLM(questions=N) as llm:
        llm.push("500")
        run(tmp_path, llm, api_key_env="MY_LLM_KEY")
    assert {r.auth for r in llm.requests} == {f"Bearer {secret}"}
    assert secret not in caplog.text
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_a_missing_api_key_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    write_corpus(tmp_path, 1)
    with pytest.raises(AdapterError, match=r"^\$OPENAI_API_KEY is not set"):
        generate(tmp_path, Config(), encoder=FakeEncoder(), show_progress=False)


def test_resume_skips_finished_chunks_and_repairs_a_torn_line(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_corpus(tmp_path, 6)
    with FakeLLM(questions=N) as llm:
        run(tmp_path, llm)
        whole = outputs(tmp_path)
        journal = tmp_path / JOURNAL
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(lines[:3]) + lines[3][:25])  # as if killed while writing the fourth line
        (tmp_path / "queries.jsonl").unlink()
        s = run(tmp_path, llm)
    assert "dropped a torn last line" in caplog.text
    assert (s.already_done, s.requests) == (3, 3)
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted(e["_id"] for e in entries) == [f"c{i}" for i in range(6)]  # each chunk once
    assert outputs(tmp_path) == whole


def test_a_changed_chunk_is_asked_again(tmp_path: Path):
    chunks = write_corpus(tmp_path, 3)
    with FakeLLM(questions=N) as llm:
        run(tmp_path, llm)
        chunks["c1"] = "A whole new text about sluice gates and weirs."
        with open(tmp_path / "corpus.jsonl", "w") as f:
            f.writelines(json.dumps({"_id": cid, "text": text}) + "\n" for cid, text in chunks.items())
        s = run(tmp_path, llm)
        assert (s.already_done, s.requests) == (2, 1)
        assert queries(tmp_path) == expected(chunks, llm)


def test_a_prompt_file_replaces_the_built_in_prompt(tmp_path: Path):
    chunks = write_corpus(tmp_path, 2)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text('Give {n} questions in JSON about:\n"""\n{chunk}\n"""\n')
    with FakeLLM(questions=N) as llm:
        run(tmp_path, llm, prompt=str(prompt))
        assert queries(tmp_path) == expected(chunks, llm)  # the fake server found each chunk inside the quotes
    prompt.write_text("Questions please.")
    with pytest.raises(AdapterError, match=r"prompt\.txt: no \{chunk\} placeholder"):
        generate(tmp_path, Config().replace(prompt=str(prompt)), encoder=FakeEncoder(), show_progress=False)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"questions_per_chunk": 0}, "llm.questions_per_chunk must be at least 1, got 0"),
    ({"concurrency": 0}, "llm.concurrency must be at least 1, got 0"),
    ({"requests_per_minute": 0}, "llm.requests_per_minute must be positive, got 0"),
    ({"dedup_threshold": 1.5}, "llm.dedup_threshold must be above 0 and at most 1, got 1.5"),
])
def test_bad_settings_are_one_line(tmp_path: Path, overrides: dict, message: str):
    write_corpus(tmp_path, 1)
    with pytest.raises(AdapterError, match=message):
        generate(tmp_path, Config().replace(llm=overrides), encoder=FakeEncoder(), show_progress=False)


def test_near_duplicates_are_dropped_under_the_frozen_encoder(tmp_path: Path, minilm):
    from adapter.encoder import Encoder

    chunks = write_corpus(tmp_path, 16, seed=3)
    encoder = Encoder(minilm, show_progress=False)
    with FakeLLM(questions=N, near_duplicates=True) as llm:
        s = generate(tmp_path, config(llm), encoder=encoder, show_progress=False)
        planted = [f"{cid}_q{N - 1}" for cid, text in chunks.items()
                   if llm.answer(text)[-1].lower().rstrip("?") == llm.answer(text)[0].lower().rstrip("?")]
    kept = queries(tmp_path)
    assert planted and not set(planted) & set(kept)
    assert s.near_duplicates >= len(planted) and s.questions == len(kept) == 16 * N - s.near_duplicates
    vectors = encoder.encode_queries(list(kept.values()))
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, 0)
    assert sims.max() <= 0.95


def test_sigkill_mid_run_then_resume_matches_a_run_in_one_go(tmp_path: Path, minilm):
    """A 20%-faulty server; one folder is generated in one go, the other by the CLI killed with SIGKILL mid-run and
    run again: every chunk ends with its questions, none twice, and the files are byte for byte the same."""
    from adapter.encoder import Encoder

    one, two, n_chunks = tmp_path / "one", tmp_path / "two", 40
    write_corpus(one, n_chunks)
    write_corpus(two, n_chunks)
    # One random fault per chunk at most: the CLI backs off from 1 s, and a chain of faults would only slow the test.
    server = {"questions": N, "fault_rate": 0.2, "seed": 7, "delay": 0.05, "slow_seconds": 1.0, "retry_after": "0",
              "max_faults": 1}
    with FakeLLM(**server) as llm:
        generate(one, config(llm), encoder=Encoder(minilm, show_progress=False), show_progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    journal = two / JOURNAL
    with FakeLLM(**server, hold_after=16) as llm:  # then the server holds every request: the kill lands mid-run
        cmd = [sys.executable, str(ROOT / "cli.py"), "-q", "generate", str(two), "--base-url", llm.url,
               "--questions-per-chunk", str(N), "--set", "llm.concurrency=4", "--set", "llm.requests_per_minute=60000",
               "--set", "llm.request_timeout=0.5", "--set", "llm.max_retries=10"]

        def killed_mid_run() -> None:
            killed_at = len(journal.read_bytes().splitlines())
            assert 0 < killed_at <= 16 and not (two / "queries.jsonl").exists()
            llm.release()

        r = kill_and_resume(cmd, lambda: llm.held and journal.exists() and journal.read_bytes().count(b"\n") >= 1,
                            env=env, log=tmp_path / "killed.log", between=killed_mid_run, timeout=120)
        faults = llm.faults_seen()
    assert f"done {n_chunks} (" in r.stdout and "failed 0" in r.stdout
    ids = [json.loads(line)["_id"] for line in journal.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == n_chunks  # every chunk once
    assert outputs(two) == outputs(one)
    qrels = load_dataset(two).qrels["all"]
    assert {c for rels in qrels.values() for c in rels} == {f"c{i}" for i in range(n_chunks)}
    assert len(set(queries(two).values())) == len(queries(two))
    assert len(faults) >= 3  # the run met assorted faults
