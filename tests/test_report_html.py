"""Where the adapter helps and hurts (headroom, seen against unseen chunks, the questions that moved), in report.md
and in a self-contained report.html that a real headless Chromium renders to a non-blank screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from tests.conftest import QUESTIONS

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def test_headroom_seen_unseen_and_movers_by_hand():
    from adapter.diagnose import headroom, movers, seen_unseen

    corpus = np.eye(3, dtype=np.float32)
    base_q = np.array([[1, 0, 0], [0.6, 0.8, 0], [0.9, 0.42, 0.1]], dtype=np.float32)
    base_q /= np.linalg.norm(base_q, axis=1, keepdims=True)
    qrels = {"q0": {"c0": 1}, "q1": {"c0": 1}, "q2": {"c2": 1}}
    ids, cids = ["q0", "q1", "q2"], ["c0", "c1", "c2"]
    # q1 ranks c0 second under base; q2 ranks c2 third; with k=2 q2's chunk is never in the top 2
    h = headroom(base_q, corpus, qrels, ids, cids, k=2)
    assert h == {"k": 2, "recall": pytest.approx(2 / 3), "never": pytest.approx(1 / 3), "queries": 3}
    su = seen_unseen(np.array([1.0, 0.5, 0.2]), np.array([1.0, 1.0, 0.1]), qrels, ids, {"c0"})
    assert su["seen"] == {"queries": 2, "base": 0.75, "system": 1.0, "change": pytest.approx(1 / 3)}
    assert su["unseen"]["queries"] == 1 and su["unseen"]["change"] == pytest.approx(-0.5)
    system_q = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0]], dtype=np.float32)  # everything to c0
    m = movers(base_q, corpus, system_q, corpus, np.array([1.0, 0.63, 0.5]), np.array([1.0, 1.0, 0.33]), qrels,
               ids, cids, n=1, k=3)
    assert [x["query_id"] for x in m["up"]] == ["q1"] and [x["query_id"] for x in m["down"]] == ["q2"]
    assert m["up"][0]["chunks"] == [{"id": "c0", "base_rank": 2, "system_rank": 1}]
    assert m["down"][0]["chunks"] == [{"id": "c2", "base_rank": 3, "system_rank": 3}]
    assert m["down"][0]["top_base"] == "c0" and m["down"][0]["top_system"] == "c0"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """A real adapter trained on the tiny dataset's train split and compared on its test split."""
    from adapter.data import split_dataset
    from tests.conftest import write_dataset

    root = tmp_path_factory.mktemp("html")
    folder = write_dataset(root / "ds")
    split_dataset(folder, by="query", test_fraction=0.3, seed=0)
    adapter = root / "adapter.safetensors"
    r = CliRunner().invoke(main, ["-q", "train", str(folder), "--out", str(adapter), "--epochs", "3",
                                  "--batch-size", "2", "--recipe", "infonce", "--lr", "0.05"])
    assert r.exit_code == 0, r.output
    from adapter.model import LinearAdapter

    trained = LinearAdapter.load(adapter)  # the trained file's metadata, with a weight that surely moves questions
    trained.weight = np.random.default_rng(0).permutation(np.eye(384, dtype=np.float32))  # scrambles queries
    trained.save(adapter, force=True)
    out = root / "report"
    r = CliRunner().invoke(main, ["-q", "compare", str(folder), "--adapter", str(adapter), "--out", str(out),
                                  "--bootstrap", "50", "--dims", "384"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def test_report_says_where_it_helps_and_hurts(report_dir):
    md = (report_dir / "report.md").read_text()
    assert "## Where it helps and where it hurts" in md
    assert re.search(r"Base recall@6 is \d\.\d{3}\. For \d+\.\d% of the \d+ test questions", md)
    assert "about chunks it trained on (seen)" in md or "about chunks it never saw (unseen)" in md
    assert "Validation at training time: recipe " in md
    assert "Questions that rose most" in md or "Questions that fell most" in md
    moved = [text for text, _ in QUESTIONS.values() if f"| {text} |" in md]
    assert moved  # listed with its text, its chunks' ranks and both top chunks
    assert re.search(r"`\w+` (\d+|>6) → (\d+|>6)", md)


def test_report_html_is_self_contained(report_dir):
    html = (report_dir / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html and "Where it helps and where it hurts" in html
    assert "data:image/png;base64," in html and 'src="ndcg_by_dim.png"' not in html
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert all(s.startswith("data:") for s in srcs), srcs
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_report_html_renders_in_headless_chromium(report_dir, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}",
           (report_dir / "report.html").resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert image.shape == (1600, 1200)
    dark = (image < 128).mean()  # text, table rules and the plot: a blank or error page has next to none
    assert 0.005 < dark < 0.5, dark
    assert image.std() > 10 and len(np.unique(image)) > 32  # anti-aliased text and a plot, not one flat colour
