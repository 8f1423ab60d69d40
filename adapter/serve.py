"""`adapter serve`: an OpenAI-compatible embeddings endpoint with the adapter on the query side, so bolting it on is a
``base_url`` change.

``POST /v1/embeddings`` returns adapted query vectors; ``POST /documents/v1/embeddings`` the untouched base vectors
(what the index holds). A request's ``input_type`` (``query``/``document``, or the ``search_query``/``search_document``
of Cohere- and Nomic-style clients) picks the side on either path, so one base_url can serve both. Both take OpenAI's
request (``input`` a string, a list of strings, or token ids as LangChain's ``OpenAIEmbeddings`` sends them, decoded
with tiktoken; ``model`` one of the served names; ``encoding_format`` float or base64; ``dimensions`` as a Matryoshka
truncation, renormalised), gzip bodies included, and answer in OpenAI's shape with ``usage``. Every bad request is a
4xx in OpenAI's error shape (an unknown model a 404 ``model_not_found``); nothing a client sends yields a traceback.

A local model sees concurrent requests gathered into micro-batches (the first request of a batch waits at most
``batch_window_ms`` for company, a model call holds at most ``max_batch`` texts; one thread runs the model). A request
larger than what a call has room for is split, and each call shares its room fairly among the requests waiting, so
a one-text request waits behind at most one model call whatever else is queued. Upstream (``openai:NAME``), each
request goes through the OpenAI-compatible embedding backend (``adapter.backends``: its retries, limits and checks),
the adapter is applied to the answer, and a failure past the retries is a 502 whose message (and log line) has every
key the server holds masked.

The adapter file may be either form. A linear adapter is applied to the base's query vectors. A query LoRA (form
"lora", ``adapter.lora``) needs the model's weights, so a local model only (with ``openai:NAME`` it is refused in one
line at start, and on reload): its queries run through the adapted encoder, the base with the LoRA merged, a second
local model on the same one model thread. Its queries are gathered into micro-batches of their own, one batcher per
LoRA version (the same window, ``max_batch`` and fair shares), so a batch never mixes two LoRAs; as with a linear
adapter two batchers take turns on the thread, the queries' and the documents' (for a moment after a reload, the old
LoRA's too, until its queue is empty). Documents always come from the untouched base.

The adapter file is watched: a replacement (of either form) is loaded and checked off the event loop, and a valid one
is swapped in as one reference, so each reply is computed wholly by one adapter (its version is in the
``x-adapter-version`` header); an invalid one is refused in one log line and the old one keeps serving. Served vectors
are never written to the cache.
A connection that has not sent a complete request head within ``header_timeout`` seconds is closed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapter.backends import BUNDLED_NAMES, Backend, estimate_tokens, make_backend
from adapter.config import Config, ServeConfig
from adapter.encoder import truncate
from adapter.errors import AdapterError, one_line, redact
from adapter.model import LinearAdapter, checked_adapter, read_header

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
except ImportError:  # pragma: no cover - the extra is missing
    raise AdapterError("adapter serve needs FastAPI and uvicorn: pip install 'adapter[serve]'") from None

if TYPE_CHECKING:
    from adapter.lora import QueryLora

logger = logging.getLogger(__name__)

QUERY, DOCUMENT = "query", "document"
INPUT_TYPES = {"query": QUERY, "search_query": QUERY, "document": DOCUMENT, "search_document": DOCUMENT}
TOKEN_HELP = ("token-id input needs tiktoken and its {encoding} file ({reason}); or send strings: LangChain's "
              "OpenAIEmbeddings(check_embedding_ctx_length=False)")
TOKENIZER_RETRY_SECONDS = 60.0  # a tiktoken encoding that failed to load is tried again after this long
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


# ----------------------------------------------------------------------------------------------- the adapter slot


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter as loaded (either form), with a short hash of its tensors (the version replies carry)."""

    adapter: LinearAdapter | QueryLora
    version: str
    loaded_at: float


def adapter_version(adapter: LinearAdapter | QueryLora) -> str:
    """A 12-hex hash of the adapter's tensors (either form): two files with the same tensors have the same version."""
    h = hashlib.sha256()
    tensors = adapter.tensors if adapter.form == "lora" else adapter.tensors()
    for name, t in sorted(tensors.items()):
        h.update(name.encode() + np.ascontiguousarray(t if isinstance(t, np.ndarray) else t.numpy()).tobytes())
    return h.hexdigest()[:12]


def load_checked(path: Path, backend: Backend, *, allow_other_model: bool = False) -> LinearAdapter | QueryLora:
    """An adapter file of either form, checked against the backend (``adapter.lora.checked_transform``: a LoRA needs
    a local model, and its query encoder is built here); torch is imported for a LoRA only."""
    if read_header(path)["form"] != "lora":
        return checked_adapter(path, backend, allow_other_model=allow_other_model)
    from adapter.lora import checked_transform

    return checked_transform(path, backend, allow_other_model=allow_other_model)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class AdapterSlot:
    """The adapter being served (either form): one reference, replaced whole when a valid new file appears, which
    may be of the other form.

    A reader takes ``slot.current`` once per request, so a reply never mixes two adapters even when a reload lands in
    the middle of it.
    """

    def __init__(self, path: str | os.PathLike, backend: Backend, *, allow_other_model: bool = False):
        self.path = Path(path)
        self.backend = backend
        self.allow_other_model = allow_other_model
        self._signature = _signature(self.path)
        self.current = self._load()
        self._refused: tuple[int, int, int] | None | str = "nothing refused yet"
        self.reloads = {"ok": 0, "refused": 0}

    def _load(self) -> LoadedAdapter:
        adapter = load_checked(self.path, self.backend, allow_other_model=self.allow_other_model)
        current = getattr(self, "current", None)  # None on the first load
        if current is not None and adapter.dim != current.adapter.dim:
            raise AdapterError(f"{self.path}: adapter is {adapter.dim}-dimensional, the one serving "
                               f"{current.adapter.dim}")
        return LoadedAdapter(adapter, adapter_version(adapter), time.time())

    def poll(self) -> bool:
        """Reload when the file changed since the last look; True when a new adapter was swapped in."""
        sig = _signature(self.path)
        if sig == self._signature or sig == self._refused:
            return False
        if sig is None:
            logger.warning("%s: adapter file is gone; still serving version %s", self.path, self.current.version)
            self.reloads["refused"] += 1
            self._refused = sig
            return False
        try:
            loaded = self._load()
        except AdapterError as e:
            if _signature(self.path) != sig:  # replaced again while we read it: look at the newer one next time
                return False
            logger.warning("refused the new adapter file (%s); still serving version %s", e, self.current.version)
            self._refused = sig
            self.reloads["refused"] += 1
            return False
        if _signature(self.path) != sig:
            return False
        self._signature = sig
        old, self.current = self.current, loaded  # the swap: one reference assignment
        self.reloads["ok"] += 1
        logger.info("reloaded %s: version %s -> %s", self.path, old.version, loaded.version)
        return True


# --------------------------------------------------------------------------------------------------- micro-batches


@dataclass
class _Item:
    texts: list[str]
    future: asyncio.Future
    arrived: float
    sent: int = 0  # texts handed to model calls so far
    finished: int = 0  # texts whose vectors are back
    parts: list[tuple[int, np.ndarray, list[int]]] = field(default_factory=list)  # (first text, vectors, tokens)


def fair_shares(wanted: Sequence[int], room: int) -> list[int]:
    """How many texts each waiting request (in arrival order) puts in a call of ``room`` texts: equal shares, a
    request wanting less than its share leaves the rest to the others, and a remainder goes to the earliest. Every
    request gets at least one text while there are no more requests than ``room``."""
    take = [0] * len(wanted)
    active = [i for i, w in enumerate(wanted) if w > 0]
    while room > 0 and active:
        share = max(1, room // len(active))
        still = []
        for i in active:
            k = min(share, wanted[i] - take[i], room)
            take[i] += k
            room -= k
            if take[i] < wanted[i]:
                still.append(i)
        active = still
    return take


class MicroBatcher:
    """Gathers concurrent requests of one role into model calls of at most ``max_batch`` texts.

    The first request of a batch waits at most ``window`` seconds (counted from its arrival, so requests that queued
    while the model was busy do not wait again). Each call's room is shared fairly (``fair_shares``) among the
    requests waiting, in arrival order, so a large request is split across calls and a small one that arrives
    behind it rides in the very next call; a request's reply is put together once all its texts are back.
    """

    def __init__(self, fn: Callable[[list[str]], tuple[np.ndarray, list[int]]], executor: ThreadPoolExecutor, *,
                 window: float, max_batch: int, observe: Callable[[int], None] = lambda n: None):
        self.fn, self.executor, self.window, self.max_batch, self.observe = fn, executor, window, max_batch, observe
        self._items: deque[_Item] = deque()
        self._queued_texts = 0  # texts not yet handed to a model call
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._calls = 0  # model calls in flight

    @property
    def idle(self) -> bool:
        """Nothing queued and no model call in flight: stopping now fails no request."""
        return not self._items and not self._calls

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._items:
            if not item.future.done():
                item.future.set_exception(AdapterError("server is shutting down"))

    async def submit(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Base vectors for ``texts`` and their token counts, computed in one or more model calls."""
        loop = asyncio.get_running_loop()
        item = _Item(texts, loop.create_future(), loop.time())
        self._items.append(item)
        self._queued_texts += len(texts)
        self._wake.set()
        return await item.future

    def _drop(self, item: _Item) -> None:
        """Take a request out of the queue (finished, failed or abandoned) with whatever it had not sent."""
        with contextlib.suppress(ValueError):
            self._items.remove(item)
            self._queued_texts -= len(item.texts) - item.sent

    def _plan(self) -> list[tuple[_Item, int, int]]:
        """The next call: (request, first text, end) slices, at most ``max_batch`` texts, shared fairly."""
        for item in [i for i in self._items if i.future.done()]:  # abandoned (cancelled) or failed: send no more
            self._drop(item)
        items = list(self._items)
        shares = fair_shares([len(i.texts) - i.sent for i in items], self.max_batch)
        plan = []
        for item, k in zip(items, shares, strict=True):
            if k:
                plan.append((item, item.sent, item.sent + k))
                item.sent += k
                self._queued_texts -= k
                if item.sent == len(item.texts):
                    self._items.remove(item)
        return plan

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                self._wake.clear()
                await self._wake.wait()
            deadline = self._items[0].arrived + self.window
            while self._queued_texts < self.max_batch and (left := deadline - loop.time()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            plan = self._plan()
            if not plan:
                continue
            texts = [t for item, lo, hi in plan for t in item.texts[lo:hi]]
            self.observe(len(texts))
            self._calls += 1
            try:
                vectors, tokens = await loop.run_in_executor(self.executor, self.fn, texts)
            except Exception as e:  # the model failed: every request in the call hears it, and sends no more
                for item, _, _ in plan:
                    self._drop(item)
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            finally:
                self._calls -= 1
            start = 0
            for item, lo, hi in plan:
                stop = start + hi - lo
                if not item.future.done():
                    item.parts.append((lo, vectors[start:stop], list(tokens[start:stop])))
                    item.finished += hi - lo
                    if item.finished == len(item.texts):
                        item.parts.sort(key=lambda p: p[0])
                        item.future.set_result((np.concatenate([p[1] for p in item.parts]),
                                                [t for p in item.parts for t in p[2]]))
                start = stop


# -------------------------------------------------------------------------------------------------- the service


class ApiError(Exception):
    """A request refused with an HTTP status and OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class UpstreamError(Exception):
    """The backend answered vectors that do not fit the adapter."""


@dataclass
class EmbeddingRequest:
    texts: list[str] | None  # strings, or None when the input is token ids
    tokens: list[list[int]] | None = None  # token ids per input (tiktoken's, as LangChain's OpenAIEmbeddings sends)
    model: str = ""
    encoding_format: str = "float"
    dimensions: int | None = None
    role: str | None = None  # from ``input_type``; None: the path's own


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value)


def parse_request(body: bytes, cfg: ServeConfig, dim: int, names: Sequence[str]) -> EmbeddingRequest:
    """Check an embeddings request body against OpenAI's schema, our limits and the served model names; ApiError
    (400, or 404 for an unknown model) naming the problem."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else one_line(e, 120)
        raise ApiError(400, f"request body is not valid JSON ({reason})") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"request body must be a JSON object, not {type(payload).__name__}")
    if "input" not in payload:
        raise ApiError(400, "'input' is required", param="input")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if not model:
        raise ApiError(400, f"'model' is required: this server serves {', '.join(names)}", param="model")
    if model not in names:
        raise ApiError(404, f"The model '{model[:100]}' does not exist: this server serves {', '.join(names)} "
                            "(add a name with --served-model-name)", param="model", code="model_not_found")
    role = payload.get("input_type")
    if role is not None and role not in INPUT_TYPES:
        raise ApiError(400, f"'input_type' must be one of {', '.join(INPUT_TYPES)}, not {role!r}"[:200],
                       param="input_type")
    raw = payload["input"]
    if _token_ids(raw):
        raw = [raw]  # one input given as token ids
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise ApiError(400, f"'input' must be a string or a list of strings, not {type(raw).__name__}", param="input")
    if not items:
        raise ApiError(400, "'input' is an empty list", param="input")
    if len(items) > cfg.max_inputs:
        raise ApiError(400, f"'input' holds {len(items)} items; at most {cfg.max_inputs} per request", param="input")
    tokens = all(isinstance(t, list) for t in items)
    for i, item in enumerate(items):
        where = "'input'" if isinstance(raw, str) else f"'input[{i}]'"
        if tokens:
            if not _token_ids(item) or min(item) < 0:
                raise ApiError(400, f"{where} must be a string or a non-empty list of token ids", param="input")
            if len(item) > cfg.max_input_chars:
                raise ApiError(400, f"{where} holds {len(item)} tokens; at most {cfg.max_input_chars}", param="input")
            continue
        if not isinstance(item, str):
            kind = "a list (strings and token ids mixed)" if isinstance(item, list) else type(item).__name__
            raise ApiError(400, f"{where} must be a string, not {kind}", param="input")
        if not item:
            raise ApiError(400, f"{where} is an empty string", param="input")
        if len(item) > cfg.max_input_chars:
            raise ApiError(400, f"{where} holds {len(item)} characters; at most {cfg.max_input_chars}", param="input")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where} holds a lone surrogate (not valid Unicode)", param="input") from None
    fmt = payload.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', not {fmt!r}"[:200],
                       param="encoding_format")
    dims = payload.get("dimensions")
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, int):
            raise ApiError(400, "'dimensions' must be an integer", param="dimensions")
        if not 1 <= dims <= dim:
            raise ApiError(400, f"'dimensions' must be between 1 and the model's {dim}, not {dims}",
                           param="dimensions")
    role = INPUT_TYPES[role] if role is not None else None
    if tokens:
        return EmbeddingRequest(None, [list(t) for t in items], model, fmt, dims, role)
    return EmbeddingRequest(list(items), None, model, fmt, dims, role)


class TokenDecoder:
    """Token ids back to text with tiktoken: the encoding a client's tiktoken picks for the model name (LangChain:
    ``encoding_for_model``, else cl100k_base), loaded once, from where tiktoken finds its files
    (``$TIKTOKEN_CACHE_DIR``...). A missing tiktoken or encoding file is a 400 that names the client setting that
    sends strings instead, asked again on the next request only after ``retry_after`` seconds."""

    def __init__(self, retry_after: float = TOKENIZER_RETRY_SECONDS):
        self.retry_after = retry_after
        self._loaded: dict[str, Any] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def encoding_name(model: str) -> str:
        try:
            import tiktoken
        except ImportError:
            return "cl100k_base"
        try:
            return tiktoken.encoding_name_for_model(model)
        except KeyError:
            return "cl100k_base"

    def encoding(self, name: str) -> Any:
        """The tiktoken encoding (blocking: the first load reads its file); ApiError(400) when it cannot be had."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            failed = self._failed.get(name)
            if failed and time.monotonic() - failed[0] < self.retry_after:
                raise ApiError(400, TOKEN_HELP.format(encoding=name, reason=failed[1]), param="input")
            try:
                import tiktoken

                self._loaded[name] = tiktoken.get_encoding(name)
            except ImportError:
                reason = "tiktoken is not installed"
            except Exception as e:  # no file and no network, a bad hash: tiktoken raises many types
                reason = f"cannot load it: {one_line(e, 120)}"
            else:
                return self._loaded[name]
            self._failed[name] = (time.monotonic(), reason)
            logger.warning("token-id input refused: %s", reason)
            raise ApiError(400, TOKEN_HELP.format(encoding=name, reason=reason), param="input")

    def decode(self, tokens: list[list[int]], model: str) -> list[str]:
        name = self.encoding_name(model)
        enc = self.encoding(name)
        texts = []
        for i, ids in enumerate(tokens):
            try:
                texts.append(enc.decode(ids))
            except (KeyError, ValueError, OverflowError):
                raise ApiError(400, f"'input[{i}]' holds a token id outside {name} (0 to {enc.max_token_value})",
                               param="input") from None
            if not texts[-1]:
                raise ApiError(400, f"'input[{i}]' decodes to an empty string", param="input")
        return texts


def encode_vectors(vectors: np.ndarray, fmt: str) -> list[Any]:
    """Each row as a list of floats, or (base64) its little-endian float32 bytes, as OpenAI sends them."""
    if fmt == "base64":
        v = np.ascontiguousarray(vectors, dtype="<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in v]
    return vectors.astype(np.float32).tolist()


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps in one process never collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("adapter_serve_requests", "Requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("adapter_serve_errors", "Requests answered with an error, by endpoint and error type",
                              ["endpoint", "type"], registry=self.registry)
        self.latency = Histogram("adapter_serve_request_seconds", "Request latency, by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("adapter_serve_batch_texts", "Texts per model call (local) or upstream request",
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self.reloads = Counter("adapter_serve_adapter_reloads", "Adapter file changes seen, by result",
                               ["result"], registry=self.registry)
        self.adapter = Histogram("adapter_serve_adapter_seconds", "Time applying the adapter to one reply's vectors",
                                 buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2),
                                 registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class EmbeddingService:
    """Base vectors from a backend (micro-batched when local, forwarded when remote), the current adapter applied on
    the query side: a linear map on the base's query vectors, or a LoRA's adapted encoder (local only, its queries
    micro-batched per LoRA version)."""

    def __init__(self, backend: Backend, adapter_path: str | os.PathLike, cfg: ServeConfig | None = None, *,
                 allow_other_model: bool = False):
        self.backend, self.cfg, self.upstream = backend, cfg or ServeConfig(), bool(backend.remote)
        self.slot = AdapterSlot(adapter_path, backend, allow_other_model=allow_other_model)
        self.names = served_names(backend, self.cfg)
        self.tokens = TokenDecoder()
        self.secrets: list[str] = []  # masked in every message a client or the log sees (the upstream's key ...)
        key = getattr(getattr(backend, "client", None), "api_key", None)
        if isinstance(key, str) and key != "none":
            self.secrets.append(key)
        self.dim = backend.dim or self.slot.current.adapter.dim  # a remote model's dimension: the adapter's
        self.metrics = Metrics()
        workers = self.cfg.upstream_concurrency if self.upstream else 1  # one thread owns a local model
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="serve")
        self.batchers: dict[str, MicroBatcher] = {}
        self.lora_batchers: dict[str, MicroBatcher] = {}  # a LoRA's queries, by its version
        self._watcher: asyncio.Task | None = None

    def _tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text: the local model's own tokenizer (what it truncates by); for a remote model an estimate."""
        model = getattr(self.backend, "model", None)
        if model is None:
            return [estimate_tokens(t) for t in texts]
        enc = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
        return [len(ids) for ids in enc["input_ids"]]

    def _call(self, role: str) -> Callable[[list[str]], tuple[np.ndarray, list[int]]]:
        def run(texts: list[str]) -> tuple[np.ndarray, list[int]]:
            vectors = self.backend.embed(texts, role)
            if vectors.shape != (len(texts), self.dim):
                raise UpstreamError(f"{self.backend.name} returned {vectors.shape[1]}-dimensional vectors; the "
                                    f"adapter takes {self.dim}")
            return vectors, self._tokens(texts)
        return run

    def _lora_call(self, lora: QueryLora) -> Callable[[list[str]], tuple[np.ndarray, list[int]]]:
        def run(texts: list[str]) -> tuple[np.ndarray, list[int]]:
            return lora.encode_queries(texts, self.backend.model), self._tokens(texts)  # the base's tokenizer
        return run

    def _batcher(self, fn: Callable[[list[str]], tuple[np.ndarray, list[int]]]) -> MicroBatcher:
        b = MicroBatcher(fn, self.executor, window=self.cfg.batch_window_ms / 1000, max_batch=self.cfg.max_batch,
                         observe=self.metrics.batch.observe)
        b.start()
        return b

    def _lora_batcher(self, loaded: LoadedAdapter) -> MicroBatcher:
        """The micro-batcher of this LoRA version's queries, started on first use (on the event loop)."""
        b = self.lora_batchers.get(loaded.version)
        if b is None:
            b = self.lora_batchers[loaded.version] = self._batcher(self._lora_call(loaded.adapter))
        return b

    async def _retire(self) -> None:
        """Stop the batchers of LoRAs no longer served once nothing waits on them."""
        current = self.slot.current.version
        for version, b in list(self.lora_batchers.items()):
            if version != current and b.idle:
                del self.lora_batchers[version]
                await b.stop()

    async def start(self) -> None:
        if not self.upstream:
            for role in (QUERY, DOCUMENT):
                self.batchers[role] = self._batcher(self._call(role))
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
        for b in [*self.batchers.values(), *self.lora_batchers.values()]:
            await b.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.reload_interval)
            before = dict(self.slot.reloads)
            try:
                await loop.run_in_executor(None, self.slot.poll)  # off the loop: a load reads the file
            except Exception as e:  # never let the watcher die: serving goes on with the adapter it has
                logger.warning("adapter reload failed (%s: %s)", type(e).__name__, e)
            for result, n in self.slot.reloads.items():
                if n > before[result]:
                    self.metrics.reloads.labels(result).inc(n - before[result])
            await self._retire()

    async def embed(self, texts: list[str], role: str) -> tuple[np.ndarray, int, LoadedAdapter | None]:
        """Vectors for ``texts`` (adapted for queries), their total tokens, and the adapter that made them."""
        loaded = self.slot.current if role == QUERY else None  # read once: this whole reply comes from this adapter
        if loaded is not None and loaded.adapter.form == "lora":  # never upstream: a LoRA is refused there
            vectors, tokens = await self._lora_batcher(loaded).submit(texts)
            return vectors, sum(tokens), loaded
        if self.upstream:
            self.metrics.batch.observe(len(texts))
            try:
                vectors, tokens = await asyncio.get_running_loop().run_in_executor(self.executor, self._call(role),
                                                                                   texts)
            except Exception as e:  # past the backend's retries, or a fatal answer: the client hears one line
                line = redact(one_line(e, 300), self.secrets)  # an upstream may echo the key it was sent
                reason = line.removeprefix(f"{getattr(self.backend, 'endpoint', '')}: ")
                reason = reason.split("; run again")[0]  # the backend's advice to batch jobs, not to a client
                logger.warning("upstream failed: %s", line)
                raise ApiError(502, f"upstream embeddings server failed: {reason}", kind="upstream_error",
                               code="upstream_failed") from None
        else:
            vectors, tokens = await self.batchers[role].submit(texts)
        if loaded is None:
            return vectors, sum(tokens), None
        start = time.perf_counter()
        adapted = loaded.adapter.apply(vectors)
        self.metrics.adapter.observe(time.perf_counter() - start)
        return adapted, sum(tokens), loaded


def served_names(backend: Backend, cfg: ServeConfig) -> list[str]:
    """The names a request's ``model`` may be: ``cfg.served_model_names`` when given, else the model's own name (and
    for the bundled MiniLM both of its usual spellings)."""
    if cfg.served_model_names:
        return list(dict.fromkeys(cfg.served_model_names))
    name = getattr(backend, "model_name", None) or backend.name  # openai:NAME is served as NAME
    return [name, *[n for n in BUNDLED_NAMES if name in BUNDLED_NAMES and n != name]]


# ------------------------------------------------------------------------------------------------------- the app


CONTENT_ENCODINGS = {"identity": None, "gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib wbits: 31 gzip, 15 zlib


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, inflated when gzip or deflate, refused with a 413 as soon as it passes ``limit`` bytes on the
    wire or once inflated (a zip bomb stops there, never inflated whole)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in CONTENT_ENCODINGS:
        raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or identity")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes is over the limit of {limit}")
    wbits = CONTENT_ENCODINGS[encoding]
    inflater = zlib.decompressobj(wbits) if wbits else None
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
        if inflater is None:
            body += chunk
            continue
        try:
            data = chunk
            while data and len(body) <= limit:  # at most limit + 1 bytes out, however much the input inflates
                body += inflater.decompress(data, limit + 1 - len(body))
                data = inflater.unconsumed_tail
        except zlib.error as e:
            raise ApiError(400, f"request body is not valid {encoding} ({e})") from None
        if len(body) > limit:
            raise ApiError(413, f"request body inflates past the limit of {limit} bytes")
    if inflater is not None and not inflater.eof:
        raise ApiError(400, f"request body is truncated {encoding}")
    return bytes(body)


def create_app(service: EmbeddingService, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: the two embeddings endpoints, models, health and metrics, with OpenAI-shaped errors."""
    cfg, metrics, backend = service.cfg, service.metrics, service.backend
    model_id = backend.name
    if api_key:
        service.secrets.append(api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="adapter serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["authorization", "content-type", "content-encoding"],
                           expose_headers=["x-adapter-version"])

    def error(exc: ApiError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(exc.status)).inc()
        metrics.errors.labels(endpoint, exc.kind).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def embeddings(request: Request, role: str, endpoint: str) -> Response:
        start = time.perf_counter()
        try:
            check_auth(request)
            req = parse_request(await read_body(request, cfg.max_body_bytes), cfg, service.dim, service.names)
            texts = req.texts
            if texts is None:  # token ids: the first request loads the encoding, off the event loop
                texts = await asyncio.to_thread(service.tokens.decode, req.tokens or [], req.model)
            vectors, tokens, loaded = await service.embed(texts, req.role or role)
            if req.dimensions is not None and req.dimensions < vectors.shape[1]:
                vectors = truncate(vectors, req.dimensions)
            data = [{"object": "embedding", "index": i, "embedding": e}
                    for i, e in enumerate(encode_vectors(vectors, req.encoding_format))]
            body = {"object": "list", "data": data, "model": req.model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
            headers = {"x-adapter-version": loaded.version} if loaded else {}
            response = Response(json.dumps(body, separators=(",", ":")), media_type="application/json",
                                headers=headers)
        except ApiError as e:
            response = error(e, endpoint)
        except Exception as e:  # a bug or a broken model: one line in the log, OpenAI's shape to the client
            logger.error("%s failed: %s: %s", endpoint, type(e).__name__, redact(one_line(e), service.secrets))
            response = error(ApiError(500, f"internal error ({type(e).__name__})", kind="server_error"), endpoint)
        else:
            metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    @app.post("/v1/embeddings")
    async def query_embeddings(request: Request) -> Response:
        return await embeddings(request, QUERY, "/v1/embeddings")

    @app.post("/documents/v1/embeddings")
    async def document_embeddings(request: Request) -> Response:
        return await embeddings(request, DOCUMENT, "/documents/v1/embeddings")

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(service.slot.current.loaded_at), "owned_by": "adapter"}

    def models(request: Request) -> Response:
        try:
            check_auth(request)
        except ApiError as e:
            return error(e, "/v1/models")
        return JSONResponse({"object": "list", "data": [model_card(n) for n in service.names]})

    def one_model(request: Request, model: str) -> Response:
        try:
            check_auth(request)
            if model not in service.names:
                raise ApiError(404, f"The model '{model[:100]}' does not exist: this server serves "
                                    f"{', '.join(service.names)}", param="model", code="model_not_found")
        except ApiError as e:
            return error(e, "/v1/models")
        return JSONResponse(model_card(model))

    for prefix in ("/v1", "/documents/v1"):
        app.get(f"{prefix}/models")(models)
        app.get(prefix + "/models/{model:path}")(one_model)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        loaded = service.slot.current
        return JSONResponse({"status": "ok", "model": model_id, "served_names": service.names, "dim": service.dim,
                             "upstream": service.upstream,
                             "adapter": {"file": service.slot.path.name, "form": loaded.adapter.form,
                                         "version": loaded.version,
                                         "loaded_at": loaded.loaded_at, "reloads": service.slot.reloads}})

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown path, wrong method
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     kind=kind).body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse(ApiError(400, "invalid request").body(), status_code=400)

    return app


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request head: a connection that has not sent a complete head
    within ``seconds`` of opening, or of its last response, is closed. uvicorn has no such limit of its own (its
    keep-alive timer stops at the first byte), so a client sending half a head would hold a connection for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's head has the same time

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no complete head yet
                self.transport.close()

    return HeaderDeadline


def uvicorn_config(app: FastAPI, cfg: ServeConfig, **options: Any) -> Any:
    """uvicorn's settings for the app: its h11 protocol with the head deadline, quiet logs; ``options`` add to them
    (host and port, or nothing when the caller hands over a bound socket)."""
    import uvicorn

    return uvicorn.Config(app, http=header_deadline_protocol(cfg.header_timeout), log_level="warning",
                          access_log=False, **options)


def serve(adapter_path: str | os.PathLike, cfg: Config | None = None, *, allow_other_model: bool = False,
          backend: Backend | None = None) -> None:
    """Serve ``cfg.encoder.model`` (a local model, or ``openai:NAME`` at ``cfg.embedding.base_url``) with the adapter
    file (either form; a query LoRA needs a local model) until interrupted (uvicorn, one process)."""
    import uvicorn

    cfg = cfg or Config()
    scfg = cfg.serve
    api_key = None
    if scfg.auth_key_env:
        api_key = os.environ.get(scfg.auth_key_env)
        if not api_key:
            raise AdapterError(f"serve.auth_key_env {scfg.auth_key_env}: that environment variable is not set or empty")
    if scfg.max_batch < 1 or not (math.isfinite(scfg.batch_window_ms) and scfg.batch_window_ms >= 0):
        raise AdapterError("serve: max_batch must be at least 1 and batch_window_ms a number at least 0")
    if not (math.isfinite(scfg.header_timeout) and scfg.header_timeout > 0):
        raise AdapterError(f"serve: header_timeout must be a positive number of seconds, not {scfg.header_timeout}")
    if scfg.threads is not None:
        import torch

        torch.set_num_threads(max(scfg.threads, 1))
    backend = backend or make_backend(cfg.encoder.model, cfg.embedding, batch_size=scfg.max_batch,
                                      show_progress=False)
    service = EmbeddingService(backend, adapter_path, scfg, allow_other_model=allow_other_model)
    where = f" through {backend.endpoint}" if backend.remote else ""
    current = service.slot.current
    logger.info("serving %s%s as %s with adapter %s (%s, version %s) on http://%s:%d: /v1 adapted queries, "
                "/documents/v1 base", backend.name, where, ", ".join(service.names), adapter_path, current.adapter.form,
                current.version, scfg.host, scfg.port)
    uvicorn.Server(uvicorn_config(create_app(service, api_key=api_key), scfg, host=scfg.host, port=scfg.port)).run()
