"""Bolting the adapter on where the queries are embedded: `adapter serve` (``adapter.serve``), LangChain
(``adapter.integrations.langchain``) and LlamaIndex (``adapter.integrations.llamaindex``). Queries are adapted;
documents get the untouched base vectors, the ones the index already holds, so nothing is re-embedded. The adapter
file may be either form: a linear map on the base's query vectors, or a query LoRA (``adapter.lora``), whose queries
run through the base with the LoRA merged (a local model only: it needs the weights).

Each framework gets two classes, both right by construction when one object embeds both sides (as vector stores and
``VectorStoreIndex`` do): one that runs the model here (``AdaptedBackend``: an embedding backend, local or
``openai:NAME``, and an adapter checked against it), and one that talks to a running `adapter serve` over HTTP
(``ServeClient``: queries to ``/v1``, documents to ``/documents/v1``; httpx and numpy only, no model, no torch).
Nothing here writes to the embedding cache: live queries are embedded, used and forgotten.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from adapter.backends import Backend, make_backend
from adapter.config import DEFAULT_MODEL, EmbeddingConfig
from adapter.errors import AdapterError
from adapter.model import LinearAdapter, checked_adapter, read_header

if TYPE_CHECKING:
    from adapter.lora import QueryLora


def checked(adapter: LinearAdapter | QueryLora | str | os.PathLike, backend: Backend, *,
            allow_other_model: bool = False) -> LinearAdapter | QueryLora:
    """Either form, checked against the backend (``adapter.lora.checked_transform``: a LoRA needs a local model);
    torch is imported for a LoRA only."""
    if isinstance(adapter, LinearAdapter) or (isinstance(adapter, str | os.PathLike) and
                                              read_header(adapter)["form"] != "lora"):
        return checked_adapter(adapter, backend, allow_other_model=allow_other_model)
    from adapter.lora import checked_transform

    return checked_transform(adapter, backend, allow_other_model=allow_other_model)


class AdaptedBackend:
    """An adapter of either form in front of an embedding backend: ``encode_query`` adapted (the linear map on the
    backend's query vectors, or a LoRA's adapted encoder), ``encode_document`` the base vectors, (n, d) float32, unit
    length."""

    def __init__(self, adapter: LinearAdapter | QueryLora | str | os.PathLike, model: str = DEFAULT_MODEL, *,
                 embedding: EmbeddingConfig | None = None, allow_other_model: bool = False,
                 backend: Backend | None = None):
        self.backend = backend or make_backend(model, embedding, show_progress=False)
        self.adapter = checked(adapter, self.backend, allow_other_model=allow_other_model)

    def encode_query(self, texts: Sequence[str]) -> np.ndarray:
        """Adapted query vectors."""
        if self.adapter.form == "lora":
            return self.adapter.encode_queries(list(texts), self.backend.model)
        return self.adapter.apply(self.backend.embed(list(texts), "query"))

    def encode_document(self, texts: Sequence[str]) -> np.ndarray:
        """Base document vectors: the index side, unchanged."""
        return self.backend.embed(list(texts), "document")


SERVE_URL = "http://127.0.0.1:8080"  # `adapter serve`'s own default address


class ServeClient:
    """A running `adapter serve` over HTTP: ``embed(texts, "query")`` posts to ``/v1/embeddings`` (adapted vectors),
    ``embed(texts, "document")`` to ``/documents/v1/embeddings`` (the base vectors the index holds), in requests of
    at most ``batch_size`` texts, base64 replies. ``base_url`` is the server's root (a trailing ``/v1`` is dropped);
    ``model`` the name to send (None: the first name the server lists); the key comes from ``api_key`` or the
    variable ``api_key_env`` names. A refusal or a server that cannot be reached is an ``AdapterError`` in one line."""

    def __init__(self, base_url: str = SERVE_URL, *, model: str | None = None, api_key: str | None = None,
                 api_key_env: str | None = None, timeout: float = 60.0, batch_size: int = 256):
        import httpx

        root = base_url.rstrip("/")
        for suffix in ("/documents/v1", "/v1"):
            root = root.removesuffix(suffix)
        if not root.startswith(("http://", "https://")):
            raise AdapterError(f"{base_url}: not an http(s) URL of an `adapter serve`")
        if batch_size < 1:
            raise AdapterError(f"batch_size must be at least 1, got {batch_size}")
        key = api_key or (os.environ.get(api_key_env) if api_key_env else None)
        if api_key_env and not key:
            raise AdapterError(f"${api_key_env} is not set: export the server's key there")
        self.root, self.model, self.batch_size = root, model, batch_size
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.timeout = httpx.Timeout(timeout)
        self._client: Any = None
        self._lock = threading.Lock()

    def _url(self, role: str) -> str:
        return f"{self.root}/v1" if role == "query" else f"{self.root}/documents/v1"

    def _check(self, response: Any) -> Any:
        if response.status_code == 200:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or "no message"
        raise AdapterError(f"{response.request.url}: HTTP {response.status_code} ({message})")

    def _requests(self, texts: Sequence[str]) -> list[list[str]]:
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise AdapterError("texts to embed must be strings")
        return [texts[lo:lo + self.batch_size] for lo in range(0, len(texts), self.batch_size)]

    def _body(self, batch: list[str]) -> dict[str, Any]:
        return {"model": self.model, "input": batch, "encoding_format": "base64"}

    @staticmethod
    def _vectors(reply: dict[str, Any], n: int) -> list[list[float]]:
        data = sorted(reply.get("data") or [], key=lambda d: d["index"])
        if len(data) != n:
            raise AdapterError(f"the server returned {len(data)} embeddings for {n} texts")
        return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in data]

    def _sync(self) -> Any:
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self.timeout, headers=self.headers)
            return self._client

    def embed(self, texts: Sequence[str], role: str) -> list[list[float]]:
        """Vectors for ``texts`` as lists of floats: adapted for ``"query"``, the base vectors for ``"document"``."""
        import httpx

        batches = self._requests(texts)
        client = self._sync()
        out: list[list[float]] = []
        try:
            if self.model is None:
                self.model = self._check(client.get(f"{self.root}/v1/models"))["data"][0]["id"]
            for batch in batches:
                reply = self._check(client.post(f"{self._url(role)}/embeddings", json=self._body(batch)))
                out += self._vectors(reply, len(batch))
        except httpx.HTTPError as e:
            raise AdapterError(f"{self.root}: cannot reach `adapter serve` ({type(e).__name__}: {e})") from None
        return out

    async def aembed(self, texts: Sequence[str], role: str) -> list[list[float]]:
        """``embed`` without blocking the event loop (an async HTTP client of this call's own)."""
        import httpx

        batches = self._requests(texts)
        out: list[list[float]] = []
        try:
            async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers) as client:
                if self.model is None:
                    self.model = self._check(await client.get(f"{self.root}/v1/models"))["data"][0]["id"]
                for batch in batches:
                    reply = self._check(await client.post(f"{self._url(role)}/embeddings", json=self._body(batch)))
                    out += self._vectors(reply, len(batch))
        except httpx.HTTPError as e:
            raise AdapterError(f"{self.root}: cannot reach `adapter serve` ({type(e).__name__}: {e})") from None
        return out
