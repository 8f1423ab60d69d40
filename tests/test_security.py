"""Secrets stay secret and the terminal stays the user's (issue #24): a key is masked by its value, whatever the
variable it came from is called, and a URL's password wherever a URL is printed or stored, checked through the real
CLI against a loopback server that echoes the key it is sent; `search` shows control characters in chunk text as
escapes. (A reranker folder that names code of its own: tests/test_rerank.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from tests.conftest import QUESTIONS, write_dataset
from tests.fake_llm import FakeLLM, chunk_of, questions_for, render

ROOT = Path(__file__).resolve().parents[1]
KEY = "Zq7-plain-looking-credential-4471"  # no sk-/hf_ shape: only its value can give it away
PASSWORD = "pw-Vr8-never-written"


class EchoingLLM:
    """A chat server on 127.0.0.1 that echoes the bearer token it is sent in its error bodies: a 500 on each chunk's
    first request (retried: the reason reaches the debug log), a good answer after; with ``refuse`` a 401 always."""

    def __init__(self, *, refuse: bool = False):
        self.refuse, self.seen = refuse, set()
        self.auth: set[str] = set()
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 -- the http.server hook's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                chunk = chunk_of("".join(str(m.get("content", "")) for m in body.get("messages", [])))
                key = hashlib.sha256(chunk.encode()).hexdigest()
                with lock:
                    outer.auth.add(token)
                    first = key not in outer.seen
                    outer.seen.add(key)
                if outer.refuse:
                    self._send(401, {"error": {"message": f"Incorrect API key provided: {token}"}})
                elif first:
                    self._send(500, {"error": {"message": f"upstream broke while using key {token}"}})
                else:
                    content = render(questions_for(chunk, 3), 2)
                    self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": content}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it: what it prints to stderr is every log line and error."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cli", *argv], env=full, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def files_holding(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_redact_masks_held_values_whatever_the_variable_is_called(monkeypatch):
    from adapter.config import Config
    from adapter.errors import redact

    key, password = f"{KEY}-unit", f"{PASSWORD}-unit"  # held by no other test of this process
    monkeypatch.setenv("LLM_CREDENTIAL_VALUE", key)  # a name no pattern recognises
    assert key in redact(f"echo: {key}")  # a variable nothing reads a key from is not a secret
    Config().replace(llm={"api_key_env": "LLM_CREDENTIAL_VALUE", "base_url": f"http://bob:{password}@10.0.0.1/v1"})
    text = redact(f"echo: {key}; again {key[:-1]}x; password {password}")
    assert key not in text and password not in text and f"{key[:-1]}x" in text  # the value, not its neighbours


@pytest.mark.parametrize("url", [f"http://bob:{PASSWORD}@host:8000/v1", f"ftp://bob:{PASSWORD}@host/x",
                                 f"postgresql://bob:{PASSWORD}@[::1/db", f"redis://bob:{PASSWORD}@with@at@host:6379",
                                 f"https://:{PASSWORD}@host/v1"])
def test_url_passwords_are_masked_in_any_scheme_and_the_rest_kept(url):
    from adapter.errors import strip_credentials

    shown = strip_credentials(f"cannot reach {url}: refused")
    assert PASSWORD not in shown and ":***@" in shown and shown.endswith(": refused")
    user_colon, at = url.index(":", url.index("//")) + 1, url.rindex("@")  # the password: up to the last "@"
    assert strip_credentials(url) == url[:user_colon] + "***" + url[at:]  # the rest as it was
    for kept in ('"http://host/a@b", "a@b.org"', "postgresql://bob@host/db", "ssh://git@host:22"):  # no password
        assert strip_credentials(kept) == kept


def test_a_key_echoed_by_the_upstream_is_in_no_log_line_no_file_and_no_error(tmp_path, tiny_model_dir):
    """The key lives in a variable whose name ends in none of KEY/TOKEN/SECRET/PASSWORD; the server echoes it in a
    500 (retried, logged at debug) and in a 401 (fatal, printed)."""
    ds = write_dataset(tmp_path / "ds")
    env = {"LLM_CRED": KEY, "ADAPTER_CACHE": str(tmp_path / "cache")}
    with EchoingLLM() as url:
        r = cli("-v", "generate", str(ds), "--base-url", url, "--set", "llm.api_key_env=LLM_CRED",
                "--questions-per-chunk",
                "3", "--set", "llm.max_retries=2", "--model", str(tiny_model_dir), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "asking again" in r.stderr and "***" in r.stderr  # the echo was logged, masked
    assert KEY not in r.stderr + r.stdout and not files_holding(tmp_path, KEY)
    assert (ds / "queries.jsonl").is_file() and (ds / "generate.json").is_file()
    other = write_dataset(tmp_path / "other")
    with EchoingLLM(refuse=True) as url:
        r = cli("-v", "generate", str(other), "--base-url", url, "--set", "llm.api_key_env=LLM_CRED", env=env)
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "Incorrect API key provided: ***" in r.stderr, r.stderr
    assert KEY not in r.stderr + r.stdout and not files_holding(tmp_path, KEY)


def test_a_password_in_the_base_url_is_not_written_to_generate_json_or_rag_json(tmp_path, tiny_model_dir):
    ds, answered = write_dataset(tmp_path / "ds"), write_dataset(tmp_path / "answered", {"test": list(QUESTIONS)})
    with FakeLLM(questions=3) as fake:
        url = fake.url.replace("http://", f"http://bob:{PASSWORD}@")
        r = CliRunner().invoke(main, ["-q", "generate", str(ds), "--base-url", url, "--questions-per-chunk", "3",
                                      "--model", str(tiny_model_dir)], env={"OPENAI_API_KEY": ""})
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(main, ["-q", "rag", str(answered), "--base-url", url, "--set", "rag.k=1", "--model",
                                      str(tiny_model_dir), "--out", str(tmp_path / "rag")], env={"OPENAI_API_KEY": ""})
        assert r.exit_code == 0, r.output
    stored = json.loads((ds / "generate.json").read_text())["config"]["llm"]["base_url"]
    assert stored == fake.url.replace("http://", "http://bob:***@")  # where it went and as whom, not the password
    assert json.loads((tmp_path / "rag" / "rag.json").read_text())["config"]["llm"]["base_url"] == stored
    assert PASSWORD not in r.output and not files_holding(tmp_path, PASSWORD)


def test_a_url_or_dsn_the_tools_refuse_is_printed_without_its_password(tmp_path):
    ds = write_dataset(tmp_path / "ds")
    r = CliRunner().invoke(main, ["generate", str(ds), "--base-url", f"ftp://bob:{PASSWORD}@127.0.0.1/v1"],
                           env={"OPENAI_API_KEY": "x" * 20})
    assert r.exit_code == 1 and "not an http(s) URL" in r.output and PASSWORD not in r.output, r.output
    pytest.importorskip("psycopg")
    pytest.importorskip("pgvector")
    from adapter.errors import AdapterError
    from adapter.stores import PgvectorStore

    with pytest.raises(AdapterError) as e:  # libpq quotes the whole malformed URI in its message
        PgvectorStore(f"postgresql://bob:{PASSWORD}@[::1/db", "chunks")
    assert PASSWORD not in str(e.value) and "cannot connect to PostgreSQL" in str(e.value), e.value


def test_search_shows_control_characters_in_chunk_text_as_escapes(tmp_path, tiny_model_dir):
    """Chunk text (and a store's ids) are data: ESC sequences in them must not reach the terminal as sequences."""
    from adapter.encoder import Encoder
    from adapter.model import LinearAdapter
    from tests.conftest import CHUNKS

    texts = {**CHUNKS, "burst": "\x1b]0;owned\x07\x1b[2J burst water main \x9b31m in red \u202eesrever"}
    ds = write_dataset(tmp_path / "ds")
    (ds / "corpus.jsonl").write_text("".join(json.dumps({"_id": c, "text": t}) + "\n" for c, t in texts.items()))
    adapter = LinearAdapter.identity(32, Encoder(str(tiny_model_dir), show_progress=False).identity)
    adapter.save(tmp_path / "a.safetensors")
    r = CliRunner().invoke(main, ["-q", "index", "build", str(ds), "--out", str(tmp_path / "i.faiss"), "--model",
                                  str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["-q", "search", "burst water main", "--store", "faiss:" + str(tmp_path / "i.faiss"),
                                  "--adapter",
                                  str(tmp_path / "a.safetensors"), "--model", str(tiny_model_dir), "--data", str(ds),
                                  "-k", "6"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "burst water main" in x)
    assert "\\x1b]0;owned\\x07\\x1b[2J burst water main \\x9b31m in red \\u202eesrever" in line
    assert not any(ch in r.output for ch in "\x1b\x07\x9b\u202e")
