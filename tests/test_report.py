"""The report: tables, per-query metrics and the paired bootstrap worked out by hand, and `adapter compare` end to end
with base, an adapter, a fine-tuned folder and another model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from click.testing import CliRunner

from adapter.errors import AdapterError
from adapter.evaluate import METRICS, evaluate, paired_bootstrap
from adapter.model import LinearAdapter
from adapter.report import format_table

if TYPE_CHECKING:
    from adapter.report import Comparison
from cli import main


def test_per_query_metrics_average_to_the_metrics():
    # 3 one-hot chunks; q0's chunk ranks 1st, q1's ranks 2nd (score 0.6 against 0.8), q2 has two relevant chunks,
    # ranked 1st and 3rd: ndcg@10 = 1, 1/log2(3) = 0.6309, (1 + 1/2) / (1 + 1/log2(3)) = 0.9197
    corpus = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [0.8, 0.6, 0], [0.8, 0.5, 0.33]], dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    qrels = {"q0": {"c0": 1}, "q1": {"c1": 1}, "q2": {"c0": 1, "c2": 1}}
    ids, cids = ["q0", "q1", "q2"], ["c0", "c1", "c2"]
    per = evaluate(queries, corpus, qrels, ids, cids, per_query=True)[3]
    assert per["ndcg@10"] == pytest.approx([1.0, 1 / np.log2(3), 1.5 / (1 + 1 / np.log2(3))])
    assert per["mrr@10"] == pytest.approx([1.0, 0.5, 1.0])
    means = evaluate(queries, corpus, qrels, ids, cids)[3]
    assert {m: float(np.mean(per[m])) for m in METRICS} == means  # exactly the same numbers


def test_paired_bootstrap_by_hand():
    x = np.array([0.1, 0.9, 0.3, 0.7, 0.5])
    assert paired_bootstrap(x, x) == (0.0, 0.0, 0.0)
    # a constant gain of 0.05 on queries of very different difficulty: pairing leaves no spread at all
    change, low, high = paired_bootstrap(x, x + 0.05)
    assert change == pytest.approx(0.05) and low == pytest.approx(0.05) and high == pytest.approx(0.05)
    # one query of four gains 1: the mean change is 0.25; a resample's mean is k/4 for k hits, 0 to 1
    change, low, high = paired_bootstrap(np.zeros(4), np.array([1.0, 0, 0, 0]), samples=2000, seed=3)
    assert change == 0.25 and 0.0 <= low < 0.25 < high <= 1.0
    assert {low * 4, high * 4} <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert paired_bootstrap(np.zeros(4), np.array([1.0, 0, 0, 0]), samples=2000, seed=3) == (change, low, high)


def test_format_table_keeps_its_layout_and_shows_missing_dims():
    r = {"base": {64: {"ndcg@10": 0.5}}, "a": {64: {"ndcg@10": 0.6}}}
    assert format_table(r, metrics=["ndcg@10"]) == ("dim 64     base       a     Δ a\n"
                                                     "ndcg@10  0.5000  0.6000  +20.0%\n")
    r["small"] = {32: {"ndcg@10": 0.4}}
    r["base"][32] = {"ndcg@10": 0.2}
    table = format_table(r, metrics=["ndcg@10"])
    assert "dim 32" in table and table.count("n/a") == 4  # a and small each lack one dim, with their Δ


def make_systems(tmp_path: Path, tiny_model_dir: Path, minilm) -> tuple[Path, Path]:
    from adapter.encoder import Encoder

    identity = Encoder(minilm, show_progress=False).identity
    adapter = LinearAdapter.identity(384, identity)
    adapter.metadata = {"train_seconds": 1.5, "trained_on": "train", "config": {"train": {"loss": "triplet"}},
                        "history": {"loss": [{"epoch": 1, "loss": 0.2}],
                                    "val": [{"epoch": 0, "ndcg@10": {384: 0.5}}, {"epoch": 1, "ndcg@10": {384: 0.6}}]}}
    path = adapter.save(tmp_path / "identity.safetensors")
    ft = tmp_path / "tiny-ft"
    shutil.copytree(tiny_model_dir, ft)
    (ft / "finetune.json").write_text(json.dumps({
        "format_version": 2, "train_seconds": 12.0, "dims": [32],
        "history": {"val": [{"epoch": 0.0, "ndcg@10": {"32": 0.3}}, {"epoch": 1.0, "ndcg@10": {"32": 0.4}}],
                    "loss": [{"epoch": 0.5, "step": 1, "loss": 2.0}]}}))
    return path, ft


def test_compare_writes_the_side_by_side_report(tiny_dataset, tmp_path, tiny_model_dir, minilm):
    adapter, ft = make_systems(tmp_path, tiny_model_dir, minilm)
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["-q", "compare", str(tiny_dataset), "--adapter", str(adapter), "--finetuned", str(ft),
                                  "--model", str(tiny_model_dir), "--out", str(out), "--set",
                                  "report.bootstrap_samples=200"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "| dim | base | identity | Δ identity | 95% CI |" in r.output

    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["base", "identity", "tiny-ft", "tiny-bert"]  # named after stem, folder, model
    assert list(results["base"]) == ["384", "256", "128", "64", "32"] and list(results["tiny-ft"]) == ["32"]
    assert results["identity"] == results["base"]  # the identity adapter is the base model
    assert set(results["base"]["384"]) == set(METRICS)

    summary = json.loads((out / "summary.json").read_text())
    s = summary["systems"]
    assert s["identity"]["kind"] == "adapter" and s["identity"]["reembed"] is False
    assert s["identity"]["train_seconds"] == 1.5 and s["identity"]["artifact_bytes"] == adapter.stat().st_size
    assert s["tiny-ft"]["reembed"] is True and s["tiny-ft"]["train_seconds"] == 12.0
    assert s["tiny-bert"]["train_seconds"] is None and s["base"]["artifact_bytes"] > 80e6  # MiniLM's float32 weights
    assert summary["intervals"]["identity"]["384"] == {"change": 0.0, "low": 0.0, "high": 0.0}
    ci = summary["intervals"]["tiny-ft"]["32"]
    assert ci["low"] <= ci["change"] <= ci["high"] and "384" not in summary["intervals"]["tiny-ft"]

    report = (out / "report.md").read_text()
    for text in ("| 384 | ", "95% CI", "| identity | query adapter | 1.5 s |", "| no |", "yes (6 chunks)",
                 "![ndcg@10 by dimension](ndcg_by_dim.png)", "![training curves](training_curves.png)"):
        assert text in report, text
    for png in ("ndcg_by_dim.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_bad_systems(tiny_dataset, tmp_path, tiny_model_dir, minilm):
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.pipeline import compare

    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    r = CliRunner().invoke(main, ["compare", str(tiny_dataset), "--finetuned", str(not_model), "--out",
                                  str(tmp_path / "r")])
    assert r.exit_code == 1 and "not a sentence-transformers model folder" in r.output
    assert not (tmp_path / "r").exists()
    clash = tmp_path / "base"
    shutil.copytree(tiny_model_dir, clash)
    with pytest.raises(AdapterError, match="already named 'base'"):
        compare(load_dataset(tiny_dataset), tmp_path / "r", Config(), finetuned=[str(clash)], progress=False)


def test_finetuned_folders_of_an_unknown_format_are_refused_in_one_line(tiny_dataset, tmp_path, tiny_model_dir):
    ft = tmp_path / "future-ft"
    shutil.copytree(tiny_model_dir, ft)
    (ft / "finetune.json").write_text(json.dumps({"format_version": 9}))
    r = CliRunner().invoke(main, ["compare", str(tiny_dataset), "--finetuned", str(ft), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "finetune.json: format version 9 is not supported" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_version_1_finetune_json_is_refused_in_one_line(tmp_path, tiny_model_dir):
    from adapter.model import read_finetune_meta

    ft = tmp_path / "old-ft"
    shutil.copytree(tiny_model_dir, ft)
    (ft / "finetune.json").write_text(json.dumps({"format_version": 1, "train_seconds": 3.0, "config": {"lr": 1},
                                                  "val_best": {"32": {"ndcg@10": 0.4}}}))
    with pytest.raises(AdapterError) as e:
        read_finetune_meta(ft)
    assert str(e.value) == (f"{ft / 'finetune.json'}: format version 1 is not supported (this version of adapter "
                            "reads 2); re-train with this version, or delete the file to use the folder as a plain "
                            "model")


def hand_made_comparison(names: list[str], text: str = "a question") -> Comparison:
    """A Comparison as `compare` makes one, by hand: base and ``names``, each with every table of the report filled
    (dims, costs, reranking, answers, where it helps and hurts) and ``text`` as a question and as both top chunks."""
    from adapter.report import Comparison, SystemInfo

    metrics = {m: 0.5 for m in METRICS}
    systems = ["base", *names, *(f"{s}+rerank" for s in names)]
    info = {s: SystemInfo("base" if s == "base" else "rerank" if s.endswith("+rerank") else "adapter", s, 1.0, 100,
                          False, 2.0, rerank_ms=1.0) for s in systems}
    mover = {"query_id": "q", "text": text, "base": 0.5, "system": 0.9, "top_base": "c0", "top_system": "c1",
             "top_base_text": text, "top_system_text": text, "chunks": [{"id": "c0", "base_rank": 2, "system_rank": 1}]}
    rag = {"k": 1, "compared": 2, "questions": 2, "llm_model": "m", "judge_model": "j",
           "systems": {s: {"accuracy": 0.5, "accuracy_ci": [0.4, 0.6], "change": [0.1, 0.0, 0.2], "ungraded": 0,
                           "ndcg@10": 0.5, "gold_in_context": 0.5} for s in systems}}
    return Comparison(results={s: {384: metrics} for s in systems}, systems=info,
                      intervals={s: {384: (0.1, 0.0, 0.2)} for s in systems[1:]}, queries=2, files=[],
                      rerank_gain={f"{s}+rerank": {384: (0.1, 0.0, 0.2)} for s in names}, rag=rag,
                      insights={"headroom": {"k": 6, "recall": 0.5, "never": 0.5, "queries": 2},
                                "systems": {s: {"movers": {"up": [mover], "down": []}, "trained_chunks": 1,
                                                "seen_unseen": {"seen": {"queries": 1, "base": 0.5, "system": 0.6,
                                                                         "change": 0.2}}} for s in names}})


def test_system_names_with_a_pipe_or_a_line_break_keep_every_table_whole(tmp_path):
    """Issue #24: a system name holding `|` or a newline split its table's rows (or ended them)."""
    from markdown_it import MarkdownIt

    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.report import render_markdown
    from tests.conftest import write_dataset

    ds = load_dataset(write_dataset(tmp_path / "ds"))
    names = ["a|b", "two\nlines", "tick```s"]
    c = hand_made_comparison(names)
    md = render_markdown(ds, Config(), c, ["ndcg_by_dim.png"])
    html = MarkdownIt("commonmark").enable("table").render(md)
    tables = html.split("<table>")[1:]
    assert len(tables) >= 6  # dims, costs, reranking, answers, seen/unseen, movers
    for table in tables:
        head = len(re.findall(r"<th[ >]", table.split("</thead>")[0]))
        rows = table.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
        assert rows and all(len(re.findall(r"<td[ >]", row)) == head for row in rows), table
    for name in ("a|b", "two lines", "tick```s"):
        assert f"<h3>{name}</h3>" in html  # one heading each, the whole name on it
    assert "a|b" in html.split("<pre><code class=\"language-text\">")[1].split("</code></pre>")[0]  # fence held
    assert "| a\\|b | query adapter |" in md and "| two lines | query adapter |" in md
