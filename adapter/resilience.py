"""The one retry and limit mechanism for every remote call: generate's chat requests, the OpenAI-compatible
embeddings backend, and whatever else talks to a server (rag, serve's upstream mode).

- ``RateLimiter`` paces request starts across threads by requests per minute and tokens per minute, and ``pause``
  holds every thread back when a server says 429 with Retry-After.
- ``call`` runs one request until it succeeds, retrying what a later try may fix (429, 408, 409, 5xx, timeouts,
  dropped connections, bodies that do not parse) after an exponential backoff with jitter that is at least the
  server's Retry-After, and failing at once, in one line naming the endpoint and the status, on what no retry fixes
  (401, 403, 404, any other 4xx, a refused connection, a host that does not resolve).
- ``Journal``: an append-only JSON-lines file, fsynced per entry, so a killed run loses only what was in flight.
- ``make_client``: an ``openai.OpenAI`` client without retries of its own (ours are counted), its key read from an
  environment variable only and never logged or written, and a deadline for each request: its timeout bounds the
  whole request, not each read (a server sending a byte a second is cut off at the timeout).
- ``ChatRun``: one run's chat requests (generate's questions, rag's answers and grades): the client, pacing and
  retry policy of ``cfg.llm``, the counts and the stop event its threads share, and ``run_each``, the one thread-pool
  loop that stops every worker on a fatal error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from adapter.errors import AdapterError, one_line, redact

if TYPE_CHECKING:
    from adapter.config import LLMConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")
RETRY_STATUSES = (408, 409, 429)  # and every 5xx: busy or broken for now, likely fine on a later try


# ---------------------------------------------------------------------------------------------------------- pacing


class RateLimiter:
    """Spaces request starts across threads: at least 60/rpm seconds apart, and a request of n tokens books n/tpm
    minutes of the token budget before the next may start. ``None`` lifts a limit; ``pause`` holds everyone back."""

    def __init__(self, per_minute: float | None, tokens_per_minute: float | None = None):
        if per_minute is not None and per_minute <= 0:
            raise AdapterError(f"requests per minute must be positive, got {per_minute}")
        if tokens_per_minute is not None and tokens_per_minute <= 0:
            raise AdapterError(f"tokens per minute must be positive, got {tokens_per_minute}")
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.seconds_per_token = 60.0 / tokens_per_minute if tokens_per_minute else 0.0
        self._next = 0.0  # monotonic time of the next free request slot
        self._next_tokens = 0.0  # monotonic time the token budget booked so far runs out
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event | None = None, tokens: int = 0) -> None:
        """Block until this caller's slot comes (or ``stop`` is set); ``tokens`` is the size of its request."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next, self._next_tokens)
            self._next = slot + self.interval
            self._next_tokens = slot + tokens * self.seconds_per_token
        if slot > now:
            if stop is None:
                time.sleep(slot - now)
            else:
                stop.wait(slot - now)

    def pause(self, seconds: float) -> None:
        """No slot before ``seconds`` from now: the server asked everyone to wait."""
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


def backoff_delay(retry: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds before re-ask number ``retry`` (1, 2, ...): base * 2**(retry-1), jittered to half-to-full, at least
    the server's Retry-After, at most ``cap``."""
    ceiling = min(cap, base * 2 ** (retry - 1))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    return min(cap, max(delay, retry_after or 0.0))


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, else ``Retry-After`` in seconds or as an HTTP date."""
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, float(headers.get("retry-after-ms")) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    return None


# ---------------------------------------------------------------------------------------------------------- errors


class FatalError(AdapterError):
    """An error no retry fixes, already one line naming the endpoint; ``status`` is the HTTP status (None when the
    server was never reached) and ``detail`` the server's own message."""

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status, self.detail = status, detail


class RetriesExhausted(Exception):
    """Every try failed with a retryable error; the message is the last one's reason (e.g. ``HTTP 500``)."""


class Stopped(Exception):
    """The run is stopping (another request hit a fatal error, or the user interrupted)."""


@dataclass(frozen=True)
class Failure:
    """What went wrong with one try: ``retryable`` or not, a short ``reason`` for counts (``HTTP 429``, ``timeout``),
    the HTTP ``status`` when there was one, the server's ``detail`` and its ``retry_after`` in seconds."""

    retryable: bool
    reason: str
    status: int | None = None
    detail: str = ""
    retry_after: float | None = None


def _server_message(e: Any) -> str:
    body = e.body.get("message") if isinstance(getattr(e, "body", None), dict) else None
    text = str(body or getattr(e, "message", "") or "").strip()
    return one_line(text) if text else ""


def classify(exc: BaseException) -> Failure | None:
    """Sort an exception from an openai client call (or from parsing its answer): retryable, fatal, or None when it
    is not a request failure at all (a bug, or an AdapterError of the caller's own: let it propagate)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = retry_after_seconds(exc.response.headers) if exc.response is not None else None
        return Failure(status in RETRY_STATUSES or status >= 500, f"HTTP {status}", status, _server_message(exc),
                       retry_after)
    if isinstance(exc, openai.APITimeoutError):
        return Failure(True, "timeout")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        kinds = {k.__name__ for k in type(cause).__mro__}  # by name: the client's HTTP library varies by version
        if "ConnectError" in kinds:  # refused, or the host does not resolve: no retry helps
            detail = one_line(cause) if str(cause).strip() else "connection refused"
            return Failure(False, "cannot connect", detail=detail)
        if "UnsupportedProtocol" in kinds:
            return Failure(False, "bad URL", detail=str(cause))
        return Failure(True, "connection error")
    if isinstance(exc, AdapterError):
        return None
    if isinstance(exc, RecursionError):  # a body nested past what the client's JSON decoder recurses into
        return Failure(True, "unreadable response", detail="the response is nested too deep to read")
    if isinstance(exc, ValueError):  # a 200 whose body is not JSON, or an answer the caller cannot parse
        return Failure(True, getattr(exc, "kind", None) or "unreadable response", detail=str(exc))
    return None


def endpoint_of(client: Any) -> str:
    """The client's base URL as shown in messages: no trailing slash, no credentials."""
    parts = urlsplit(str(client.base_url))
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/")


def fatal_error(endpoint: str, failure: Failure, what: str = "") -> FatalError:
    """The one-line error for a fatal failure: ``ENDPOINT: HTTP 401 asking for chunk 'c0' (Incorrect API key)``."""
    detail = redact(failure.detail)  # a server may echo the key it refused
    message = f"{endpoint}: {failure.reason}" + (f" {what}" if what else "")
    message += f" ({detail})" if detail else ""
    return FatalError(message, failure.status, detail)


# ---------------------------------------------------------------------------------------------------------- calling


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``max_retries`` re-asks after the first, waits from ``base_delay`` doubling to ``max_delay``
    (Retry-After included)."""

    max_retries: int
    base_delay: float
    max_delay: float


@dataclass
class Stats:
    """Counts shared by the threads of one run: requests sent, re-asks and why, and how many are waiting to re-ask.
    ``on_change`` (e.g. a progress bar's refresh) is called after each change, under the lock."""

    requests: int = 0
    retries: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    retrying: int = 0
    on_change: Callable[[], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, retry: str | None = None, waiting: int = 0) -> None:
        with self.lock:
            self.requests += requests
            if retry is not None:
                self.retries += 1
                self.reasons[retry] += 1
            self.retrying += waiting
            if self.on_change is not None:
                self.on_change()


def call(fn: Callable[[], T], *, endpoint: str, policy: RetryPolicy, limiter: RateLimiter | None = None,
         stop: threading.Event | None = None, tokens: int = 0, stats: Stats | None = None, what: str = "") -> T:
    """``fn()`` until it returns, retrying what ``classify`` calls retryable with backoff.

    Raises ``FatalError`` (one line: endpoint, status, ``what``, the server's message) on a fatal failure,
    ``RetriesExhausted`` when every try failed, ``Stopped`` once ``stop`` is set. A 429 with Retry-After also pauses
    ``limiter`` for everyone sharing it. Before each try the limiter is waited on for a request of ``tokens``.
    """
    stop = stop or threading.Event()
    stats = stats or Stats()
    reason, retry_after = "", None
    for attempt in range(policy.max_retries + 1):
        if attempt:
            stats.add(waiting=1)
            stop.wait(backoff_delay(attempt, policy.base_delay, policy.max_delay, retry_after))
            stats.add(waiting=-1)
        if limiter is not None:
            limiter.wait(stop, tokens)
        if stop.is_set():
            raise Stopped
        stats.add(requests=1)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 -- sorted by classify; what it does not know is re-raised
            failure = classify(e)
            if failure is None:
                raise
            if not failure.retryable:
                raise fatal_error(endpoint, failure, what) from None
            reason, retry_after = failure.reason, failure.retry_after
            if failure.status == 429 and retry_after and limiter is not None:
                limiter.pause(min(retry_after, policy.max_delay))
            if attempt < policy.max_retries:
                stats.add(retry=reason)
                logger.debug("%s %s: %s; asking again (retry %d of %d)", endpoint, what,
                             redact(failure.detail or reason), attempt + 1, policy.max_retries)
    raise RetriesExhausted(reason)


# ---------------------------------------------------------------------------------------------------------- client


def make_client(base_url: str | None, api_key_env: str | None = None, timeout: float | None = None, *,
                key_hint: str = "llm.api_key_env") -> Any:
    """An ``openai.OpenAI`` client with no retries of its own, ``timeout`` seconds per request (a deadline for the
    whole request, reads and writes included), the key read from ``$api_key_env`` only. A local server (``base_url``
    or ``$OPENAI_BASE_URL`` set) may go without a key."""
    import openai

    from adapter.config import LLMConfig

    api_key_env = LLMConfig.api_key_env if api_key_env is None else api_key_env  # None: the LLM's settings
    timeout = LLMConfig.request_timeout if timeout is None else timeout
    url = base_url or os.environ.get("OPENAI_BASE_URL")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AdapterError(f"{url}: not an http(s) URL for an OpenAI-compatible server")
    if timeout is None or timeout <= 0:
        raise AdapterError(f"request timeout must be positive, got {timeout}")
    key = os.environ.get(api_key_env)
    if not key:
        if url is None:
            raise AdapterError(f"${api_key_env} is not set: export the API key there, or name another variable "
                               f"with {key_hint}")
        key = "none"  # local servers (vLLM, Ollama, TEI) accept any key

    def start(request: Any) -> None:  # an httpx request hook: runs in the calling thread as each request starts
        _deadline.at = time.monotonic() + timeout

    http = openai.DefaultHttpxClient(timeout=timeout, event_hooks={"request": [start]})
    with_deadlines(http)
    return openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0, http_client=http)


# ---------------------------------------------------------------------------------------------------------- deadlines

# httpx's timeouts bound each read, write and connect on its own: a server that sends a byte every second never
# trips a 5 s read timeout. The client's request hook sets the calling thread's deadline; its connections' reads,
# writes and connects each wait at most until then, and one that starts after it fails as a timeout at once.
_deadline = threading.local()


def _timeouts(backend: Any) -> Any:
    """The module of ``backend``'s HTTP library (httpcore, or the copy the openai client ships), for its timeouts."""
    return sys.modules[type(backend).__module__.split(".")[0]]


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream:
    """A connection whose every read and write waits at most until the calling thread's request deadline."""

    def __init__(self, inner: Any, errors: Any):
        self._inner, self._errors = inner, errors

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, self._errors.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, self._errors.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> _DeadlineStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, _left(timeout, self._errors.ConnectTimeout))
        return _DeadlineStream(inner, self._errors)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend:
    """The network backend of an httpx connection pool, its connections bounded by the request deadline."""

    def __init__(self, inner: Any):
        self._inner, self._errors = inner, _timeouts(inner)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> _DeadlineStream:
        left = _left(timeout, self._errors.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_tcp(host, port, left, local_address, socket_options), self._errors)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None
                            ) -> _DeadlineStream:
        left = _left(timeout, self._errors.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, left, socket_options), self._errors)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def with_deadlines(http: Any) -> Any:
    """Bound every connection of the httpx client ``http`` (its own transport and each proxy's) by the calling
    thread's request deadline. httpx takes no network backend of its own, so each pool's is wrapped in place."""
    for transport in [http._transport, *http._mounts.values()]:
        if transport is None:  # a host mounted to go without a proxy: served by the client's own transport
            continue
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None:
            raise AdapterError(f"this version of httpx ({type(http).__module__}) keeps its connections where the "
                               "request deadline cannot bound them; install the version setup.cfg names")
        if not isinstance(backend, _DeadlineBackend):
            pool._network_backend = _DeadlineBackend(backend)
    return http


# ---------------------------------------------------------------------------------------------------------- a run


class ChatRun:
    """One run's chat requests to an OpenAI-compatible server: the client, pacing and retry policy of ``llm``
    (``cfg.llm``), and the counts and stop event its worker threads share. The client is made here, first, so a
    missing key or a bad URL is one line before anything else starts."""

    def __init__(self, llm: LLMConfig, stats: Stats | None = None):
        self.client = make_client(llm.base_url, llm.api_key_env, llm.request_timeout)
        self.endpoint = endpoint_of(self.client)
        self.policy = RetryPolicy(llm.max_retries, llm.retry_base_delay, llm.retry_max_delay)
        self.limiter = RateLimiter(llm.requests_per_minute)
        self.workers = llm.concurrency
        self.stats = stats or Stats()
        self.stop = threading.Event()

    def chat(self, model: str, prompt: str, temperature: float, parse: Callable[[str | None], T], what: str) -> T:
        """``parse`` of the reply's text (None when there is none) to one user message, through ``call``: a
        ValueError from ``parse`` is an unreadable reply, asked again. A fatal error stops every other worker too."""

        def once() -> T:
            reply = self.client.chat.completions.create(model=model, temperature=temperature,
                                                        messages=[{"role": "user", "content": prompt}])
            return parse(reply.choices[0].message.content if reply.choices else None)

        try:
            return call(once, endpoint=self.endpoint, policy=self.policy, limiter=self.limiter, stop=self.stop,
                        stats=self.stats, what=what)
        except FatalError:
            self.stop.set()  # before this worker can take another item
            raise

    def run_each(self, work: Callable[[K], T], items: Iterable[K], *, done: Callable[[K, T], None],
                 failed: Callable[[K, RetriesExhausted], None], name: str) -> None:
        """``work(item)`` for every item on the run's threads; ``done(item, result)`` or ``failed(item, error)``
        (every retry spent) is called in this thread as each ends. An item that found the run stopping is skipped:
        the error that stopped it surfaces from its own item. Any other error, or Ctrl-C, sets ``stop``, cancels
        the items not yet started, and is raised once the running ones return."""
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=name) as pool:
            futures = {pool.submit(work, item): item for item in items}
            try:
                for future in as_completed(futures):
                    item = futures[future]
                    try:
                        result = future.result()
                    except RetriesExhausted as e:
                        failed(item, e)
                        continue
                    except Stopped:
                        continue
                    done(item, result)
            except BaseException:
                self.stop.set()
                for future in futures:
                    future.cancel()
                raise


# ---------------------------------------------------------------------------------------------------------- journal


class Journal:
    """Append-only record, one JSON object per line, each flushed and fsynced as it is written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: Any = None
        self._lock = threading.Lock()

    def entries(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, object) for every line. A torn last line (a run killed mid-write) is cut off first, so the
        next append starts on a fresh line; a line that is not a JSON object is a one-line error."""
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            logger.warning("%s: dropped a torn last line (a run was stopped mid-write)", self.path)
            raw = raw[:keep]
        for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                raise AdapterError(f"{self.path}:{n}: not a journal entry; delete the line (or the file to start "
                                   "over)")
            yield n, entry

    def append(self, entry: Mapping[str, Any]) -> None:
        """Write one entry and force it to disk before returning (safe from several threads)."""
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            try:
                if self._file is None:
                    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- held open for the run
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                raise AdapterError(f"{self.path}: cannot write ({e.strerror})") from None

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
