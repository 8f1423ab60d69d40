"""A fake OpenAI-compatible embeddings server on 127.0.0.1 serving a real sentence-transformers model's vectors (the
bundled MiniLM unless told otherwise), injecting faults on demand, for tests and the benchmarks.

``POST /v1/embeddings`` takes ``model``, ``input`` (a string or a list), ``encoding_format`` (``float`` or
``base64``) and ``dimensions`` (first N components, renormalised, as text-embedding-3 does) and answers like OpenAI:
``{"data": [{"index", "embedding"}], "usage": {...}}``. The model encodes one request at a time (a lock), so the
server's model is what limits throughput, as on a single-GPU server. Faults come from a queue (``push``) first, then
at ``fault_rate`` from a seeded function of (batch, attempt):

    429        HTTP 429 with Retry-After
    500        HTTP 500
    slow       the answer comes after ``slow_seconds`` (longer than the client's timeout)
    notjson    a 200 whose body is not JSON
    shuffle    the right answer with the ``data`` list in random order (also ``shuffle=True`` for every answer)
    drop       the connection closed without a response
    401        HTTP 401, a bad key                          }
    echo401    HTTP 401 whose message repeats the key sent  } never drawn at random:
    short      one embedding fewer than asked               } only ``push`` serves these
    baddim     one embedding of another size                }

Requests with more than ``max_inputs`` inputs or ``max_tokens`` tokens get the 400 a real server sends for a batch
that is too large (``batch_error`` words it otherwise: a status and a message with ``{n}`` and ``{max}``, or None for
an empty body, as servers differ); a model name outside ``models`` gets a 404; with ``api_key`` set, a request
without that bearer token gets the 401 OpenAI sends for a wrong key. Serve by hand:
``python tests/fake_embeddings.py --port 8001 --fault-rate 0.1``; ``GET /stats`` tells what it has served.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

FAULTS = ("429", "500", "slow", "notjson", "shuffle", "drop")
MODEL = "fake-minilm"


@dataclass
class Request:
    """One request the server answered (or faulted)."""

    inputs: int
    tokens: int
    fault: str | None
    status: int
    start: float  # time.monotonic()
    end: float
    auth: str
    model: str
    dimensions: int | None
    encoding_format: str | None


class FakeEmbeddings:
    """The server; use as a context manager. ``url`` is the base URL to give the client."""

    def __init__(self, model: Any = None, *, models: tuple[str, ...] = (MODEL,), fault_rate: float = 0.0,
                 faults: tuple[str, ...] = FAULTS, seed: int = 0, delay: float = 0.0, slow_seconds: float = 2.0,
                 retry_after: str = "1", shuffle: bool = False, max_inputs: int = 2048, max_tokens: int = 300_000,
                 max_faults: int | None = None, api_key: str | None = None, port: int = 0,
                 batch_error: tuple[int, str | None] = (400, "Too many inputs: at most {max} per request, got {n}")):
        if model is None:
            from adapter.encoder import load_model

            model = load_model()
        self.model, self.models = model, models
        model.encode(["warm up"], show_progress_bar=False)  # the first encode is slow; no request should pay for it
        self.fault_rate, self.faults, self.seed = fault_rate, faults, seed
        self.delay, self.slow_seconds, self.retry_after, self.shuffle = delay, slow_seconds, retry_after, shuffle
        self.max_inputs, self.max_tokens, self.max_faults = max_inputs, max_tokens, max_faults
        self.api_key, self.batch_error = api_key, batch_error
        self.requests: list[Request] = []  # appended once answered (a client may see its answer first)
        self.arrivals: list[int] = []  # inputs of each request as it arrives: what a test counts right after a call
        self.texts_embedded = 0
        self.encode_seconds = 0.0  # time the model spent encoding: what throughput can be compared with
        self.inflight = self.max_inflight = 0
        self.swap_model: Any = None  # set to another model to play a provider that silently changed it
        self._queue: deque[str | None] = deque()
        self._attempts: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> FakeEmbeddings:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + 10
        while self.inflight and time.monotonic() < deadline:  # answers already sent are recorded before we return
            time.sleep(0.01)
        self._server.shutdown()
        self._server.server_close()

    def push(self, *faults: str | None) -> None:
        """Serve these faults (None: a good answer) to the next requests, in order, before any random ones."""
        with self._lock:
            self._queue.extend(faults)

    def faults_seen(self) -> Counter[str]:
        """How many times each fault has been served so far."""
        with self._lock:
            return Counter(self._faults)

    def good_requests(self) -> int:
        """Requests answered 200 with every vector asked for (what a client paid for)."""
        with self._lock:
            return sum(1 for r in self.requests if r.status == 200 and r.fault in (None, "shuffle"))

    def tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, texts: list[str]) -> np.ndarray:
        """The model's unit vectors for ``texts``, one request at a time."""
        with self._model_lock:
            start = time.perf_counter()
            model = self.swap_model or self.model
            vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
            self.texts_embedded += len(texts)
            self.encode_seconds += time.perf_counter() - start
        return np.asarray(vectors, dtype=np.float32)

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` answers: counts for a benchmark driving the server from another process."""
        with self._lock:
            good = [r for r in self.requests if r.status == 200 and r.fault in (None, "shuffle")]
            return {"requests": len(self.requests), "good_requests": len(good),
                    "good_texts": sum(r.inputs for r in good), "texts_embedded": self.texts_embedded,
                    "encode_seconds": self.encode_seconds, "faults": dict(self._faults),
                    "inflight": self.inflight, "max_inflight": self.max_inflight,
                    "auth": sorted({r.auth for r in self.requests})}

    def _begin(self, key: str, inputs: int) -> str | None:
        with self._lock:
            self.arrivals.append(inputs)
            attempt = self._attempts[key]
            self._attempts[key] += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            if self._queue:
                fault = self._queue.popleft()
            else:
                rng = random.Random(f"{self.seed}:{key}:{attempt}")
                strikes = rng.random() < self.fault_rate and (self.max_faults is None or attempt < self.max_faults)
                fault = rng.choice(self.faults) if strikes else None
            if fault:
                self._faults[fault] += 1
            return fault

    def _end(self, request: Request) -> None:
        with self._lock:
            self.inflight -= 1
            self.requests.append(request)


def _handler(fake: FakeEmbeddings) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _send(self, status: int, body: dict | bytes, headers: dict[str, str] | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.status = status

        def _error(self, status: int, message: str, kind: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> None:
            self._send(status, {"error": {"message": message, "type": kind}}, headers)

        def do_GET(self) -> None:  # noqa: N802 -- the http.server hook's name
            if self.path.rstrip("/") == "/stats":
                self._send(200, fake.stats())
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:  # noqa: N802 -- the http.server hook's name
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self.path.rstrip("/").endswith("/embeddings"):
                self._error(404, f"no route {self.path}")
                return
            texts = body.get("input", [])
            texts = [texts] if isinstance(texts, str) else list(texts)
            key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
            start = time.monotonic()
            self.status = 0
            fault = fake._begin(key, len(texts))
            tokens = 0
            try:
                tokens = self._reply(body, texts, fault)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) first
                pass
            finally:
                fake._end(Request(len(texts), tokens, fault, self.status, start, time.monotonic(),
                                  self.headers.get("Authorization", ""), body.get("model", ""),
                                  body.get("dimensions"), body.get("encoding_format")))

        def _reply(self, body: dict, texts: list[str], fault: str | None) -> int:
            time.sleep(fake.slow_seconds if fault == "slow" else fake.delay)
            if fault == "drop":
                self.close_connection = True
                self.connection.close()
                return 0
            if fault == "500":
                self._error(500, "internal server error", "server_error")
                return 0
            if fault == "echo401":
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                self._error(401, f"Incorrect API key provided: {key}. You can find your API key in your account.")
                return 0
            if fault == "401" or (fake.api_key is not None
                                  and self.headers.get("Authorization") != f"Bearer {fake.api_key}"):
                self._error(401, "Incorrect API key provided")
                return 0
            if fault == "429":
                self._error(429, "rate limit reached", "requests", {"Retry-After": fake.retry_after})
                return 0
            if body.get("model") not in fake.models:
                self._error(404, f"The model `{body.get('model')}` does not exist", "model_not_found")
                return 0
            if not texts or not all(isinstance(t, str) and t for t in texts):
                self._error(400, "'input' must be a non-empty list of non-empty strings")
                return 0
            if len(texts) > fake.max_inputs:
                status, message = fake.batch_error
                if message is None:
                    self._send(status, b"")
                else:
                    self._error(status, message.format(n=len(texts), max=fake.max_inputs))
                return 0
            counts = [fake.tokens(t) for t in texts]
            if sum(counts) > fake.max_tokens:
                self._error(400, f"Requested {sum(counts)} tokens, max {fake.max_tokens} tokens per request")
                return 0
            if fault == "notjson":
                self._send(200, b"<html><body>502 Bad Gateway</body></html>")
                return 0
            vectors = fake.encode(texts)
            dims = body.get("dimensions")
            if dims:
                vectors = vectors[:, :int(dims)]
                vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            b64 = body.get("encoding_format") == "base64"
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else v.tolist()}
                    for i, v in enumerate(vectors)]
            if fault == "short":
                data = data[:-1]
            elif fault == "baddim":
                data[-1]["embedding"] = (base64.b64encode(vectors[-1, :-1].astype("<f4").tobytes()).decode() if b64
                                         else vectors[-1, :-1].tolist())
            if fault == "shuffle" or fake.shuffle:
                random.Random(len(fake.requests)).shuffle(data)
            self._send(200, {"object": "list", "data": data, "model": body.get("model"),
                             "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}})
            return sum(counts)

    return Handler


INFINITY_VENV = Path(os.environ.get("INFINITY_VENV") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                     / "adapter-venv-infinity")  # where .ci/run installs infinity-emb


class Infinity:
    """Infinity (``infinity-emb``, a real OpenAI-compatible embeddings server) serving a sentence-transformers folder
    on 127.0.0.1 from its own virtualenv ($INFINITY_VENV: it pins numpy<2, transformers 4 and sentence-transformers 3,
    which this project has moved past). Use as a context manager; ``url`` is the base URL for a client, ``name`` the
    model name it serves. ``missing()`` says why it cannot run here, or None."""

    def __init__(self, model_dir: str | os.PathLike, *, name: str = "minilm", batch_size: int = 32,
                 startup_timeout: float = 300.0):
        self.model_dir, self.name, self.batch_size = str(model_dir), name, batch_size
        self.startup_timeout = startup_timeout
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the server

    @staticmethod
    def missing() -> str | None:
        exe = INFINITY_VENV / "bin" / "infinity_emb"
        return None if exe.is_file() else f"infinity-emb is not installed at {exe} (.ci/run installs it)"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def __enter__(self) -> Infinity:
        import httpx

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
               "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # its own packages, not this checkout's
        self.proc = subprocess.Popen(
            [str(INFINITY_VENV / "bin" / "infinity_emb"), "v2", "--model-id", self.model_dir, "--served-model-name",
             self.name, "--host", "127.0.0.1", "--port", str(self.port), "--url-prefix", "/v1", "--engine", "torch",
             "--device", "cpu", "--batch-size", str(self.batch_size), "--no-model-warmup"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout  # a liveness bound: its start loads torch and the model
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infinity_emb exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"infinity_emb did not answer within {self.startup_timeout:.0f} s: {self.output()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated faults to draw from")
    parser.add_argument("--slow-seconds", type=float, default=2.0)
    parser.add_argument("--retry-after", default="1")
    parser.add_argument("--shuffle", action="store_true", help="every answer's data list in random order")
    parser.add_argument("--max-faults", type=int, default=None, help="faults strike only a batch's first N tries")
    args = parser.parse_args()
    fake = FakeEmbeddings(fault_rate=args.fault_rate, seed=args.seed, port=args.port, faults=tuple(
        args.faults.split(",")), slow_seconds=args.slow_seconds, retry_after=args.retry_after, shuffle=args.shuffle,
        max_faults=args.max_faults)
    with fake:
        print(f"serving {fake.url} (model {MODEL!r})", flush=True)  # noqa: T201
        fake._thread.join()
