"""`adapter rag` against the tests' own chat server on 127.0.0.1, which answers right exactly when the gold chunk is
in the context: a better retriever shows a higher answer accuracy, faults are survived, a SIGKILL mid-run resumes
with every question graded once and nothing asked twice, the key is in no file, and bad input is one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from adapter.data import load_dataset
from adapter.encoder import Encoder
from adapter.model import LinearAdapter
from adapter.rag import GradeError, parse_grade
from cli import main
from tests.conftest import QUESTIONS, write_dataset
from tests.fake_llm import FakeLLM
from tests.processes import kill_and_resume

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-rag-4242-secret"


@pytest.fixture
def rag_dir(tmp_path: Path, minilm) -> tuple[Path, Path]:
    """The tiny dataset (test split: every question) and a shuffling adapter that retrieves worse than base."""
    ds = write_dataset(tmp_path / "ds", {"test": list(QUESTIONS)})
    identity = Encoder("sentence-transformers/all-MiniLM-L6-v2").identity
    rng = np.random.default_rng(0)
    weight = np.eye(384, dtype=np.float32)[rng.permutation(384)]  # a permutation: queries land in the wrong places
    bad = LinearAdapter(384, identity, weight=weight)
    path = bad.save(tmp_path / "shuffled.safetensors")
    return ds, path


def gold_map(directory: Path) -> dict[str, str]:
    ds = load_dataset(directory)
    return {ds.queries[q]: ds.doc_text(next(iter(rels))) for q, rels in ds.qrels["all"].items()}


def test_grades_are_read_from_json_in_any_wrapping_and_refused_otherwise():
    assert parse_grade('{"grade": "correct", "reason": "all there"}') == ("correct", "all there")
    assert parse_grade('```json\n{"grade": "Partly", "reason": "half"}\n```') == ("partly", "half")
    assert parse_grade('My grade: {"grade": "wrong", "reason": "no"} done') == ("wrong", "no")
    for bad in ("", "The answer looks right.", '{"grade": "excellent"}', '{"grade": "corr'):
        with pytest.raises(GradeError):
            parse_grade(bad)


def test_a_judge_reply_of_braces_costs_no_more_than_its_size():
    """Audit #24.4: 60,000 `{` took 2.4 GiB: the reply was sliced at every brace (quadratic memory)."""
    import tracemalloc

    reply = "{" * 20_000
    tracemalloc.start()
    try:
        with pytest.raises(GradeError, match="nested too deep"):
            parse_grade(reply)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(reply) + (1 << 20), f"{peak:,} bytes for a {len(reply):,}-character reply"
    for deep in ("[" * 100_000, 'Grade: {"grade": ' * 30_000):  # was a RecursionError
        with pytest.raises(GradeError):
            parse_grade(deep)
    assert parse_grade('[{"grade": "correct", "reason": "in a list"}]') == ("correct", "in a list")


def test_a_better_retriever_gives_better_answers(rag_dir, tmp_path):
    ds, shuffled = rag_dir
    with FakeLLM(rag_gold=gold_map(ds)) as fake:
        r = CliRunner().invoke(main, ["-q", "rag", str(ds), "--llm-model", "fake-reader", "--judge-model",
                                      "fake-judge", "--base-url", fake.url, "--adapter", str(shuffled), "--set",
                                      "rag.k=1",
                                      "--out", str(tmp_path / "rag")], catch_exceptions=False,
                               env={"OPENAI_API_KEY": KEY})
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "rag" / "rag.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "rag" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(QUESTIONS) and {r["system"] for r in rows} == {"base", "shuffled"}
    for row in rows:  # the reader is right exactly when the gold chunk was in its context
        assert (row["grade"] == "correct") == row["gold_in_context"], row
    base, worse = summary["systems"]["base"], summary["systems"]["shuffled"]
    assert base["accuracy"] > worse["accuracy"] and base["gold_in_context"] > worse["gold_in_context"]
    assert worse["change"][0] == pytest.approx(worse["accuracy"] - base["accuracy"])
    assert worse["change"][1] <= worse["change"][0] <= worse["change"][2]
    assert "answer accuracy" in r.output and "ndcg@10" in r.output
    models = {q.model for q in fake.requests}
    assert models == {"fake-reader", "fake-judge"}
    # the compare report shows the answers beside the retrieval metrics
    r = CliRunner().invoke(main, ["-q", "compare", str(ds), "--adapter", str(shuffled), "--dims", "384", "--out",
                                  str(tmp_path / "rep"), "--set", "report.bootstrap_samples=50", "--rag",
                                  str(tmp_path / "rag" / "rag.json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Answers (`adapter rag`, top 1 chunks" in report and f"| shuffled | {worse['ndcg@10']:.4f}" in report


def test_faults_and_a_sigkill_mid_run_lose_nothing_and_ask_nothing_twice(rag_dir, tmp_path):
    ds, shuffled = rag_dir
    out = tmp_path / "rag"
    args = [sys.executable, str(ROOT / "cli.py"), "-q", "rag", str(ds), "--llm-model", "m", "--base-url", "{url}",
            "--adapter", str(shuffled), "--set", "rag.k=2", "--out", str(out), "--set", "llm.concurrency=2", "--set",
            "llm.max_retries=8"]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with FakeLLM(rag_gold=gold_map(ds), fault_rate=0.2, faults=("500", "429", "malformed", "empty", "few", "drop"),
                 retry_after="0", delay=0.3, seed=1, hold_after=8) as fake:  # then held: the kill lands mid-run
        cmd = [a.replace("{url}", fake.url) for a in args]
        journal, first, seen_before = out / "rag-journal.jsonl", [], []

        def killed_mid_run() -> None:
            fake.release()
            first.extend(json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}"))
            assert first and not (out / "rag.json").exists()
            seen_before.append(len(fake.requests))

        kill_and_resume(cmd, lambda: fake.held and journal.is_file() and journal.read_text().endswith("}\n"), env=env,
                        log=tmp_path / "killed.log", between=killed_mid_run, poll_s=0.05)
        assert fake.faults_seen(), "no fault was injected"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    keys = [e["key"] for e in entries]
    assert len(keys) == len(set(keys))  # every answer and every grade recorded once
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(QUESTIONS) and all(r["grade"] in ("correct", "partly", "wrong") for r in rows)
    summary = json.loads((out / "rag.json").read_text())
    assert summary["reused"] == len(first) and summary["compared"] == len(QUESTIONS)
    # nothing was asked twice: each good reply became one journal entry, bar at most the 2 in flight at the kill
    good = sum(q.fault is None for q in fake.requests)
    assert len(entries) <= good <= len(entries) + 2 and len(fake.requests) > seen_before[0]
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path


def test_a_grade_that_never_comes_back_as_json_is_recorded_ungraded_and_counted(rag_dir, tmp_path):
    ds, _ = rag_dir
    with FakeLLM(rag_gold=gold_map(ds)) as fake:
        fake.push(None, "few", "few", "few")  # the first answer is fine; its grade comes back in prose three times
        r = CliRunner().invoke(main, ["-q", "rag", str(ds), "--llm-model", "m", "--base-url", fake.url, "--set",
                                      "rag.k=1",
                                      "--set", "llm.concurrency=1", "--out", str(tmp_path / "rag")],
                                      catch_exceptions=False,
                               env={"OPENAI_API_KEY": KEY})
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "rag" / "rag.json").read_text())
    assert summary["systems"]["base"]["ungraded"] == 1 and summary["compared"] == len(QUESTIONS) - 1
    assert "ungraded: base 1" in r.output
    rows = [json.loads(line) for line in (tmp_path / "rag" / "answers.jsonl").read_text().splitlines()]
    assert sum(r["grade"] is None for r in rows) == 1


def test_bad_input_is_one_line_and_writes_nothing(rag_dir, tmp_path, tiny_model_dir):
    ds, _ = rag_dir
    out = tmp_path / "rag"

    def fails(*args: str, env: dict[str, str | None] | None = None) -> str:
        r = CliRunner().invoke(main, ["-q", "rag", str(ds), "--out", str(out), *args],
                               env=env or {"OPENAI_API_KEY": KEY})
        last = r.output.strip().splitlines()[-1]  # after any progress bar
        assert r.exit_code == 1 and last.startswith("Error: ") and "Traceback" not in r.output, r.output
        return last

    assert "OPENAI_API_KEY is not set" in fails(env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None})
    assert "rag.k 0 is outside 1..6" in fails("--set", "rag.k=0", "--base-url", "http://127.0.0.1:9/v1")
    from adapter.rerank import start_model

    ce, _ = start_model(str(tiny_model_dir), 48)
    ce.save(str(tmp_path / "ce"))
    assert "rerank.k 9 is outside 1..6" in fails("--reranker", str(tmp_path / "ce"), "--set", "rerank.k=9",
                                                   "--base-url", "http://127.0.0.1:9/v1")
    assert "not a cross-encoder" in fails("--reranker", str(tiny_model_dir), "--set", "rerank.k=3", "--base-url",
                                          "http://127.0.0.1:9/v1")
    assert "--limit must be at least 1" in fails("--limit", "0", "--base-url", "http://127.0.0.1:9/v1")
    with FakeLLM() as fake:
        fake.push("401")
        assert "HTTP 401" in fails("--llm-model", "m", "--base-url", fake.url)
    assert not (out / "rag.json").exists() and not (out / "answers.jsonl").exists()
