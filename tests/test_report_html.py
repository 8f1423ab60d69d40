"""Where the adapter helps and hurts (headroom, seen against unseen chunks, the questions that moved), in report.md
and in a self-contained report.html that a real headless Chromium renders to a non-blank screenshot, and that fetches
nothing from the network whatever the chunk texts hold."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from tests.conftest import QUESTIONS, split_tiny

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

    root = tmp_path_factory.mktemp("html")
    folder = split_tiny(root / "ds")
    adapter = root / "adapter.safetensors"
    r = CliRunner().invoke(main, ["-q", "train", str(folder), "--out", str(adapter), "--set", "train.epochs=3",
                                  "--set", "train.batch_size=2", "--recipe", "infonce", "--set", "train.lr=0.05"])
    assert r.exit_code == 0, r.output
    from adapter.model import LinearAdapter

    trained = LinearAdapter.load(adapter)  # the trained file's metadata, with a weight that surely moves questions
    trained.weight = np.random.default_rng(0).permutation(np.eye(384, dtype=np.float32))  # scrambles queries
    trained.save(adapter, force=True)
    out = root / "report"
    r = CliRunner().invoke(main, ["-q", "compare", str(folder), "--adapter", str(adapter), "--out", str(out),
                                  "--set", "report.bootstrap_samples=50", "--dims", "384"], catch_exceptions=False)
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
    assert not remote_loads(html) and "Content-Security-Policy" in html


def screenshot(page: Path, shot: Path, profile: Path) -> None:
    """A real headless Chromium opens ``page`` and saves what it shows (after the page's load event)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), done.stderr[-2000:]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_report_html_renders_in_headless_chromium(report_dir, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    screenshot(report_dir / "report.html", shot, tmp_path / "profile")
    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert image.shape == (1600, 1200)
    dark = (image < 128).mean()  # text, table rules and the plot: a blank or error page has next to none
    assert 0.005 < dark < 0.5, dark
    assert image.std() > 10 and len(np.unique(image)) > 32  # anti-aliased text and a plot, not one flat colour


# ---------------------------------------------------------------------------------------------------------- no fetch

LOADING = {"src", "data", "poster", "background", "action", "formaction"}  # on any element


class _Loads(HTMLParser):
    """Every URL an HTML page would load by itself on opening (not links a reader may click): attributes that load,
    ``<link href>``/``<base href>``, ``url(...)`` and ``@import`` in styles, a meta refresh."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.in_style = tag == "style"
        for k, v in attrs:
            v = (v or "").strip()
            if k in ("srcset", "imagesrcset"):
                self.urls += [c.split()[0] for c in v.split(",") if c.strip()]
            elif k in LOADING or (k == "href" and tag in ("link", "base")):
                self.urls.append(v)
            elif tag == "meta" and "url=" in v.lower():
                self.urls.append(v[v.lower().index("url=") + 4:])
            elif k == "style":
                self.urls += re.findall(r"url\(([^)]*)\)", v)

    def handle_data(self, data: str) -> None:
        if self.in_style:
            self.urls += re.findall(r"url\(([^)]*)\)", data) + re.findall(r"@import\s+([^;]+)", data)

    def handle_endtag(self, tag: str) -> None:
        self.in_style = False


def remote_loads(html: str) -> list[str]:
    parser = _Loads()
    parser.feed(html)
    return [u for u in parser.urls if u and not u.strip("'\" ").startswith("data:")]


HOSTILE = ("![pixel]({u}/md.png) [![nested]({u}/nested.png)]({u}/link) <{u}/autolink> "
           "<img src=\"{u}/raw.png\" srcset=\"{u}/set.png 2x\"> <link rel=stylesheet href=\"{u}/css\"> "
           "<iframe src=\"{u}/frame\"></iframe> <p style=\"background:url({u}/bg.png)\">")


def hostile_report(tmp_path: Path, url: str) -> str:
    """report.html of a hand-made comparison whose question and chunk texts hold every way Markdown or HTML could
    make a page load ``url``."""
    from adapter.config import Config
    from adapter.data import load_dataset
    from adapter.report import render_html, render_markdown
    from tests.conftest import write_dataset
    from tests.test_report import hand_made_comparison

    ds = load_dataset(write_dataset(tmp_path / "ds"))
    c = hand_made_comparison(["adapter"], HOSTILE.format(u=url))
    return render_html(render_markdown(ds, Config(), c, ["ndcg_by_dim.png"]), {"ndcg_by_dim.png": b"\x89PNG"})


def test_markdown_images_and_html_in_chunk_text_load_nothing(tmp_path):
    """Issue #24: `![x](http://...)` in a chunk became a remote <img>; opening the report made 18 requests."""
    html = hostile_report(tmp_path, "http://127.0.0.1:9")
    assert not remote_loads(html), remote_loads(html)
    assert "![pixel](http://127.0.0.1:9/md.png)" in html  # shown as written
    assert 'src="data:image/png;base64,' in html  # the report's own plot is still an image
    assert remote_loads('<img src="http://x/a.png" srcset="data:a, http://x/c 2x"><p style="background:url(x/b)">'
                        ) == ["http://x/a.png", "http://x/c", "x/b"]  # the checker itself sees loads


class _Counting:
    """A loopback server that counts the requests it gets (any path), answering each with a 1x1 GIF."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 -- the http.server hook's name
                outer.paths.append(self.path)
                gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(gif)))
                self.end_headers()
                self.wfile.write(gif)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _Counting:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_opening_the_report_in_chromium_makes_no_request(tmp_path):
    with _Counting() as server:
        control = tmp_path / "control.html"  # the same browser does fetch a remote image from a file:// page
        control.write_text(f'<!DOCTYPE html><html><body><img src="{server.url}/control.png"></body></html>')
        screenshot(control, tmp_path / "control.png", tmp_path / "profile-control")
        assert server.paths == ["/control.png"]
        page = tmp_path / "report.html"
        page.write_text(hostile_report(tmp_path, server.url))
        screenshot(page, tmp_path / "shot.png", tmp_path / "profile")
    assert server.paths == ["/control.png"]  # opening the report asked for nothing
