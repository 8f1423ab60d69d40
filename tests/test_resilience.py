"""The one retry/limit mechanism (adapter/resilience.py) against real servers on 127.0.0.1: pacing by requests and
tokens, backoff and Retry-After, which failures are retried and which stop at once in one line, the journal."""

from __future__ import annotations

import json
import random
import socket
import threading
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from fake_llm import FakeLLM

from adapter.errors import AdapterError
from adapter.resilience import (
    FatalError,
    Journal,
    RateLimiter,
    RetriesExhausted,
    RetryPolicy,
    Stats,
    Stopped,
    backoff_delay,
    call,
    endpoint_of,
    make_client,
    retry_after_seconds,
)

FAST = RetryPolicy(max_retries=3, base_delay=0.01, max_delay=2.0)


def test_backoff_doubles_with_jitter_and_honours_retry_after():
    random.seed(0)
    for retry, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (8, 10.0)]:
        delays = [backoff_delay(retry, 1.0, 10.0) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling and len(set(delays)) > 100
    assert backoff_delay(1, 1.0, 10.0, retry_after=7.0) == 7.0
    assert backoff_delay(1, 1.0, 10.0, retry_after=30.0) == 10.0  # the cap holds even against Retry-After
    date = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert 25 < retry_after_seconds({"retry-after": date}) <= 30
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


class Clock:
    """Time as the limiter sees it, moved only by its own waits: what it asks for is measured exactly, whatever the
    machine's load (wall-clock bounds on a loaded machine are not)."""

    def __init__(self):
        self.now = 1000.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    import types

    import adapter.resilience

    c = Clock()
    monkeypatch.setattr(adapter.resilience, "time", types.SimpleNamespace(monotonic=c.monotonic, sleep=c.sleep))
    return c


class ClockedStop(threading.Event):
    """A stop event whose ``wait`` passes on the fake clock (as ``RateLimiter.wait(stop)`` waits on it)."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.sleep(timeout or 0.0)
        return self.is_set()


def test_rate_limiter_spaces_requests_and_pauses_everyone(clock):
    limiter, stop = RateLimiter(600), ClockedStop(clock)  # one slot every 0.1 s
    for _ in range(4):
        limiter.wait(stop)
    assert clock.waits == pytest.approx([0.1, 0.1, 0.1])  # the first goes at once
    limiter.pause(0.4)
    limiter.wait(stop)
    assert clock.waits[-1] == pytest.approx(0.4)  # the pause, not the 0.1 s slot, decides


def test_rate_limiter_books_tokens_per_minute(clock):
    limiter = RateLimiter(None, tokens_per_minute=60_000)  # 1000 tokens a second, no request limit
    for _ in range(4):
        limiter.wait(tokens=100)  # each books 0.1 s of the budget
    assert clock.waits == pytest.approx([0.1, 0.1, 0.1])
    with pytest.raises(AdapterError, match="tokens per minute must be positive, got 0"):
        RateLimiter(10, tokens_per_minute=0)


@pytest.mark.parametrize(("fault", "reason"), [("500", "HTTP 500"), ("429", "HTTP 429"), ("slow", "timeout"),
                                               ("drop", "connection error")])
def test_retryable_failures_are_asked_again(fault: str, reason: str):
    with FakeLLM(questions=2, slow_seconds=1.0, retry_after="0") as llm:
        client = make_client(llm.url, timeout=0.5)
        llm.push(fault, fault)
        stats = Stats()
        answer = call(lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]),
                      endpoint=endpoint_of(client), policy=FAST, stats=stats)
    assert answer.choices[0].message.content
    assert (stats.requests, stats.retries, dict(stats.reasons)) == (3, 2, {reason: 2})


def test_a_429_pauses_everyone_for_its_retry_after():
    """The 429's Retry-After goes to the shared limiter, not only to this caller's backoff (which alone would be
    about 0.01 s); that a paused limiter holds every caller back that long is measured on the fake clock above."""
    with FakeLLM(questions=2, retry_after="1") as llm:
        client = make_client(llm.url, timeout=5)
        llm.push("429")
        limiter, stats, pauses = RateLimiter(60_000), Stats(), []
        pause = limiter.pause
        limiter.pause = lambda seconds: (pauses.append(seconds), pause(seconds))[1]
        answer = call(lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]),
                      endpoint="e", policy=FAST, limiter=limiter, stats=stats)
    assert answer.choices[0].message.content
    assert pauses == [1.0] and (stats.requests, stats.retries) == (2, 1)


def test_every_retry_failing_raises_the_last_reason():
    with FakeLLM(questions=2) as llm:
        client = make_client(llm.url, timeout=5)
        llm.push("500", "500", "500", "500")
        stats = Stats()
        with pytest.raises(RetriesExhausted, match="HTTP 500"):
            call(lambda: client.chat.completions.create(model="m", messages=[]), endpoint="e", policy=FAST,
                 stats=stats)
    assert (stats.requests, stats.retries) == (4, 3)


def test_a_bad_key_fails_at_once_naming_endpoint_and_status():
    with FakeLLM(questions=2) as llm:
        client = make_client(llm.url, timeout=5)
        llm.push("401")  # then good answers: a retry would have succeeded
        with pytest.raises(FatalError) as e:
            call(lambda: client.chat.completions.create(model="m", messages=[]), endpoint=endpoint_of(client),
                 policy=FAST, what="asking for chunk 'c0'")
    assert str(e.value) == f"{llm.url}: HTTP 401 asking for chunk 'c0' (Incorrect API key provided)"
    assert e.value.status == 401


def test_an_unknown_route_is_a_404_at_once():
    with FakeLLM(questions=2) as llm:
        client = make_client(llm.url, timeout=5)
        stats = Stats()
        with pytest.raises(FatalError, match=r"HTTP 404 \(no route /v1/embeddings\)"):
            call(lambda: client.embeddings.create(model="m", input=["x"]), endpoint=endpoint_of(client),
                 policy=RetryPolicy(6, 1.0, 60.0), stats=stats)
        assert (stats.requests, stats.retries) == (1, 0)  # asked once, never again


def test_a_closed_port_fails_at_once_in_one_line():
    with socket.socket() as s:  # bound, never listening: connections are refused, and no one else can take the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        client = make_client(f"http://127.0.0.1:{port}/v1", timeout=5)
        stats = Stats()
        with pytest.raises(FatalError, match=rf"^http://127.0.0.1:{port}/v1: cannot connect \(.*refused.*\)$"):
            call(lambda: client.embeddings.create(model="m", input=["x"]), endpoint=endpoint_of(client),
                 policy=RetryPolicy(6, 1.0, 60.0), stats=stats)
    assert (stats.requests, stats.retries) == (1, 0)  # no backoff at all


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://127.0.0.1/v1", r"^ftp://127\.0\.0\.1/v1: not an http\(s\) URL"),
    ("localhost:8000/v1", r"^localhost:8000/v1: not an http\(s\) URL"),
])
def test_a_bad_url_is_refused_before_any_request(url: str, message: str):
    with pytest.raises(AdapterError, match=message):
        make_client(url)


def test_a_missing_key_is_one_line_unless_a_local_server_is_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(AdapterError, match=r"^\$MY_KEY is not set: .* with embedding.api_key_env$"):
        make_client(None, "MY_KEY", key_hint="embedding.api_key_env")
    assert make_client("http://127.0.0.1:1/v1", "MY_KEY").api_key == "none"
    assert endpoint_of(make_client("http://user:pw@127.0.0.1:9/v1/", "MY_KEY")) == "http://127.0.0.1:9/v1"


def test_errors_of_the_callers_own_pass_through_and_stop_is_honoured():
    def refuse():
        raise AdapterError("wrong dimension")

    with pytest.raises(AdapterError, match="wrong dimension"):
        call(refuse, endpoint="e", policy=FAST)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        call(lambda: 1, endpoint="e", policy=FAST, stop=stop)


def test_journal_is_fsynced_per_entry_and_repairs_a_torn_line(tmp_path: Path):
    journal = Journal(tmp_path / "j.jsonl")
    threads = [threading.Thread(target=journal.append, args=({"i": i, "text": "é" * 50},)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    journal.close()
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["i"] for line in lines) == list(range(20))  # whole lines, none interleaved
    (tmp_path / "j.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:7])
    assert [e["i"] for _, e in Journal(tmp_path / "j.jsonl").entries()] == [json.loads(x)["i"] for x in lines[:5]]
    assert (tmp_path / "j.jsonl").read_text().endswith("\n")
    (tmp_path / "j.jsonl").write_text('{"i": 1}\n[2]\n')
    with pytest.raises(AdapterError, match=r"j\.jsonl:2: not a journal entry"):
        list(Journal(tmp_path / "j.jsonl").entries())


# ---------------------------------------------------------------------------------------------------------- audit #24

@pytest.mark.parametrize("part", ["headers", "body"])
def test_the_timeout_is_a_deadline_for_the_whole_request_not_each_read(part: str):
    """Audit #24.5: `generate --timeout 5` against a server sending a byte a second ran 61 s: each read got its
    byte within the timeout. Now the request ends at its timeout: the client hangs up long before the last byte
    (the reply takes 300+ bytes at 0.05 s each, 15 s or more; the timeout is 0.5 s)."""
    import openai

    from tests.fault_cases import Drip

    with Drip(part) as server:
        client = make_client(server.url, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        total = len(server.response)
    assert len(server.sent) == 1 and server.sent[0] < total, (server.sent, total)


def test_a_body_nested_past_the_json_decoders_limit_is_an_unreadable_reply_asked_again():
    """Audit #24.8: a 200 whose body is nested 10^5 deep was a RecursionError out of the client (a traceback)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Nested(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Nested)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = make_client(f"http://127.0.0.1:{server.server_address[1]}/v1", timeout=10)
        stats = Stats()
        with pytest.raises(RetriesExhausted, match="unreadable response"):
            call(lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]),
                 endpoint=endpoint_of(client), policy=FAST, stats=stats)
        assert stats.requests == FAST.max_retries + 1
    finally:
        server.shutdown()
        server.server_close()
