"""The query adapter and its one-file safetensors format.

A full adapter maps a query vector ``x`` (row, unit length) to ``normalise(x @ W + b)``; the low-rank form to
``normalise(x + (x @ U) @ V + b)``. Untrained, both are exactly the identity. The file holds those tensors and one JSON
metadata entry (format version, base model, dimension, form, rank, and the training metadata below). Loading and
applying need numpy and safetensors only, never torch, so the file bolts onto any stack.

Training metadata, one schema for every trained artifact (this file's header, a fine-tuned folder's finetune.json):
``trained_on`` (split), ``data_fingerprint``, ``validation`` (how it was chosen), ``best_epoch``, ``train_seconds``,
``val_base`` and ``val_best`` (dim -> metric -> value: the base and the kept epoch on validation), ``history``
(``{"loss": [{"epoch", "loss", ...}], "val": [{"epoch", "ndcg@10": {dim: value}}]}``, epoch 0 the base) and
``config`` (the config sections that made it). An adapter also records how it was chosen (``adapter.choice``):
``recipe``, ``objective``, ``coverage`` (chunks, covered, share), ``estimates`` (``seen``/``unseen`` validation
slices: questions, chunks, ndcg@10 of base and adapter, mean change over dims and its clustered s.e.) and ``trials``
(every recipe tried, with its estimates). A file of another format version is refused in one line: re-train it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_tensors

from adapter import safejson
from adapter.config import ADAPTER_DTYPES, PRIMARY_METRIC, Config, TrainConfig
from adapter.data import atomic_write
from adapter.errors import AdapterError, one_line, refuse_existing

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # training metadata in the shared schema (dims as keys); the only version read
METADATA_KEY = "adapter"
FINETUNE_FILE = "finetune.json"  # a fine-tuned model folder's training metadata, in this module's schema
FINETUNE_VERSION = 2  # of FINETUNE_FILE: what adapter.finetune writes and the only version read
DTYPES = {name: np.dtype(name) for name in ADAPTER_DTYPES}
FILE_DTYPES = {"F32": np.float32, "F16": np.float16}  # safetensors' names of the dtypes a file may hold
CHECKSUM_KEY = "tensors_sha256"  # what the tensors are: a file caught half-rewritten does not match it
FORMAT_KEYS = ("format_version", "base_model", "dim", "form", "rank", "bias", "normalize", "dtype", CHECKSUM_KEY)


@dataclass
class LinearAdapter:
    """A d×d query transform (or its rank-r residual form) with the metadata that travels in its file."""

    dim: int
    base_model: str  # the encoder identity it was trained on, "name@fingerprint"
    weight: np.ndarray | None = None  # (d, d), full form
    U: np.ndarray | None = None  # (d, r), low-rank form
    V: np.ndarray | None = None  # (r, d), low-rank form
    bias: np.ndarray | None = None  # (d,)
    metadata: dict[str, Any] = field(default_factory=dict)  # config, data fingerprint, metrics, best epoch

    @classmethod
    def identity(cls, dim: int, base_model: str, *, rank: int | None = None, bias: bool = False,
                 seed: int | None = None) -> LinearAdapter:
        """The untrained adapter, exactly the identity map. Low-rank: U small random (seeded), V zero, so
        ``x + (x U) V = x`` while both factors still receive gradients."""
        b = np.zeros(dim, np.float32) if bias else None
        if rank is None:
            return cls(dim, base_model, weight=np.eye(dim, dtype=np.float32), bias=b)
        if not 0 < rank < dim:
            raise AdapterError(f"train.rank must be between 1 and {dim - 1}, got {rank}")
        seed = Config().seed if seed is None else seed
        u = np.random.default_rng(seed).normal(0.0, dim ** -0.5, size=(dim, rank)).astype(np.float32)
        return cls(dim, base_model, U=u, V=np.zeros((rank, dim), np.float32), bias=b)

    @property
    def form(self) -> str:
        return "full" if self.weight is not None else "lowrank"

    @property
    def rank(self) -> int | None:
        return None if self.U is None else self.U.shape[1]

    def tensors(self) -> dict[str, np.ndarray]:
        names = {"weight": self.weight, "U": self.U, "V": self.V, "bias": self.bias}
        return {k: v for k, v in names.items() if v is not None}

    def check_base_model(self, identity: str, *, allow_other_model: bool = False, source: str = "adapter") -> None:
        """Refuse an encoder other than the one this adapter was trained on (unless explicitly allowed)."""
        check_base_model(self.base_model, identity, allow_other_model=allow_other_model, source=source)

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Adapted, L2-normalised query vectors (n, d) float32; refuses vectors of another dimension."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            return self.apply(x[None, :])[0]
        if x.shape[1] != self.dim:
            raise AdapterError(f"adapter expects {self.dim}-dimensional vectors, got {x.shape[1]}")
        if self.weight is not None:
            y = x @ self.weight.astype(np.float32, copy=False)
        else:
            y = x + (x @ self.U.astype(np.float32, copy=False)) @ self.V.astype(np.float32, copy=False)
        if self.bias is not None:
            y += self.bias.astype(np.float32, copy=False)
        y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y

    def save(self, path: str | os.PathLike, *, dtype: str = TrainConfig.dtype, force: bool = False) -> Path:
        """Write the adapter as one .safetensors file (atomically), tensors in ``dtype``; an existing file is
        replaced only with ``force``."""
        if dtype not in DTYPES:
            raise AdapterError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        refuse_existing(path, force)
        path = Path(path)
        if not path.parent.is_dir():
            raise AdapterError(f"{path.parent}: folder does not exist")
        tensors = {k: np.ascontiguousarray(v, dtype=DTYPES[dtype]) for k, v in self.tensors().items()}
        header = {"format_version": FORMAT_VERSION, "base_model": self.base_model, "dim": self.dim,
                  "form": self.form, "rank": self.rank, "bias": self.bias is not None, "normalize": True,
                  "dtype": dtype, CHECKSUM_KEY: tensors_sha256(tensors), **self.metadata}
        data = save_tensors(tensors, metadata={METADATA_KEY: json.dumps(header, separators=(",", ":"))})  # compact
        try:
            with atomic_write(path, "wb") as f:
                f.write(data)
        except OSError as e:  # a full disk: the temporary file is gone, an older file at ``path`` untouched
            raise AdapterError(f"{path}: cannot write the adapter ({e.strerror or one_line(e)})") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearAdapter:
        """Read and check an adapter file: format version, expected keys, then each tensor's shape and dtype from
        the file's header (before any tensor is read), finite values, the training metadata's types, and that the
        file is complete and unchanged across the read (its stat before and after, and the checksum of its tensors
        that every file written since it was added carries)."""
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"{path}: file not found")
        try:
            before = _stat(path)
            with safe_open(str(path), framework="np") as f:  # reads and checks the header only, maps the rest
                meta = f.metadata() or {}
                header, shapes = _check_header(path, meta)
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    _check_slice(path, name, f.get_slice(name), shapes)
                if set(f.keys()) != set(shapes):
                    extra, missing = sorted(set(f.keys()) - set(shapes)), sorted(set(shapes) - set(f.keys()))
                    raise AdapterError(f"{path}: unexpected tensors {extra} / missing {missing} for a "
                                       f"{header['form']} adapter")
                tensors = {k: f.get_tensor(k) for k in shapes}  # sizes checked: at most the file's own bytes
            after = _stat(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
        if before != after:
            raise AdapterError(f"{path}: changed while it was read (being written?); load it again once written")
        want = header.get(CHECKSUM_KEY)
        if want is not None and want != tensors_sha256(tensors):
            raise AdapterError(f"{path}: its tensors do not match the checksum in its header (a file written only in "
                               "part, or damaged); write it again whole")
        for name, t in tensors.items():
            if not np.isfinite(t).all():
                raise AdapterError(f"{path}: tensor {name!r} holds NaN or Inf values")
        form, dim = header["form"], header["dim"]
        if form == "full" and not np.any(tensors["weight"]):  # every query would become the zero vector
            raise AdapterError(f"{path}: the adapter's matrix is all zeros; it would map every query to nothing")
        if form == "lowrank" and not np.any(tensors["U"]) and not np.any(tensors["V"]):
            # training starts U at small random values, so no trained file has both factors zero: a damaged one
            raise AdapterError(f"{path}: the adapter's factors U and V are all zeros (a damaged file: training never "
                               "writes one)")
        extra_meta = {k: v for k, v in header.items() if k not in FORMAT_KEYS}
        check_training_meta(extra_meta, str(path))
        return cls(dim, header["base_model"], weight=tensors.get("weight"), U=tensors.get("U"), V=tensors.get("V"),
                   bias=tensors.get("bias"), metadata=training_meta(extra_meta))


def check_base_model(trained_on: str, identity: str, *, allow_other_model: bool = False,
                     source: str = "adapter") -> None:
    """Refuse an encoder (``identity``, "name@fingerprint") other than the one an adapter was trained on, unless
    explicitly allowed: the same weights pass under any name or path."""
    if identity.split("@")[-1] != trained_on.split("@")[-1]:
        if not allow_other_model:
            raise AdapterError(f"{source}: trained on {trained_on}, not {identity}; pass --allow-other-model to "
                               "apply it anyway")
        logger.warning("%s: trained on %s, applied to %s", source, trained_on, identity)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """An adapter file's header, of either form, checked for what every form shares (format version, dim, base
    model); the tensors are not read. ``header["form"]``: "full" or "lowrank" (``LinearAdapter``), "lora"
    (``adapter.lora.QueryLora``)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    return _common_header(path, meta)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """An adapter file's training metadata (either form), from its header alone: what `adapter evaluate` prints."""
    header = read_header(path)
    return training_meta({k: v for k, v in header.items() if k not in (*FORMAT_KEYS, "lora")})


def checked_adapter(adapter: LinearAdapter | str | os.PathLike, backend: Any, *,
                    allow_other_model: bool = False) -> LinearAdapter:
    """The adapter (loaded when a path), refused in one line unless it fits the backend's model and dimension
    (``adapter.backends.Backend``: its ``identity``, ``name`` and ``dim``, None when not known before a call): what
    `adapter serve` and the framework classes bolt on."""
    source = "adapter" if isinstance(adapter, LinearAdapter) else str(adapter)
    loaded = adapter if isinstance(adapter, LinearAdapter) else LinearAdapter.load(adapter)
    if backend.dim is not None and loaded.dim != backend.dim:
        raise AdapterError(f"{source}: adapter is {loaded.dim}-dimensional, {backend.name} gives {backend.dim}")
    loaded.check_base_model(backend.identity, allow_other_model=allow_other_model, source=source)
    return loaded


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 of the tensors in name order (name, dtype, shape, bytes): what the file's header says it holds."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{t.dtype.str}:{list(t.shape)}\0".encode())
        h.update(t.data)  # no copy
    return h.hexdigest()


def _stat(path: Path) -> tuple[int, ...]:
    """What changes when a file is written: its identity, size and times."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _check_header(path: Path, meta: dict[str, str]) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The adapter header (bounded parse) and the tensor shapes it implies; a one-line error for anything else."""
    header = _common_header(path, meta)
    dim, form, rank = (header.get(k) for k in ("dim", "form", "rank"))
    if form == "full":
        shapes = {"weight": (dim, dim)}
    elif form == "lowrank" and _is_int(rank) and rank > 0:
        shapes = {"U": (dim, rank), "V": (rank, dim)}
    elif form == "lora":
        raise AdapterError(f"{path}: a query-side LoRA (form 'lora'): it adapts the encoder, not query vectors, so "
                           "it loads with the model (adapter.lora.QueryLora.load)")
    else:
        raise AdapterError(f"{path}: unknown adapter form {form!r} (rank {rank!r})")
    if header["bias"]:
        shapes["bias"] = (dim,)
    return header, shapes


def _common_header(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The header every form shares, parsed (bounded) and checked; a one-line error for anything else."""
    if METADATA_KEY not in meta:
        raise AdapterError(f"{path}: not an adapter file (no {METADATA_KEY!r} metadata)")
    try:
        header = safejson.loads(meta[METADATA_KEY])
    except ValueError as e:
        raise AdapterError(f"{path}: adapter metadata is damaged ({one_line(e)})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: adapter metadata is damaged (not a JSON object)")
    version, dim = header.get("format_version"), header.get("dim")
    if version != FORMAT_VERSION:
        raise AdapterError(f"{path}: adapter format version {version!r} is not supported (this version of adapter "
                           f"reads {FORMAT_VERSION}); re-train with this version")
    if not _is_int(dim) or dim < 1 or not isinstance(header.get("base_model"), str) or \
            not isinstance(header.get("bias"), bool):
        raise AdapterError(f"{path}: adapter metadata is damaged (dim, base_model or bias missing or of the wrong "
                           "type)")
    if not isinstance(header.get(CHECKSUM_KEY), str | None):
        raise AdapterError(f"{path}: adapter metadata is damaged ({CHECKSUM_KEY} is not a string)")
    return header


def _check_slice(path: Path, name: str, tensor: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """One tensor's dtype and shape as the file's header declares them, against the adapter metadata's."""
    if name not in shapes:
        return
    dtype, shape = tensor.get_dtype(), tuple(tensor.get_shape())
    if dtype not in FILE_DTYPES:
        kind = {"F": "float", "I": "int", "U": "uint", "BF": "bfloat"}.get(dtype.rstrip("0123456789"))
        named = f"{kind}{dtype.lstrip('BFIU')}" if kind else dtype.lower()  # I32 -> int32, BF16 -> bfloat16
        raise AdapterError(f"{path}: tensor {name!r} has dtype {named}, expected float32 or float16")
    if shape != shapes[name]:
        raise AdapterError(f"{path}: tensor {name!r} has shape {shape}, metadata says {shapes[name]}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _dim_key(k: Any) -> bool:
    return isinstance(k, str) and k.isdigit() or _is_int(k)


def _metrics_by_dim(x: Any) -> bool:
    return isinstance(x, dict) and all(_dim_key(d) and isinstance(m, dict) and
                                       all(isinstance(k, str) and (_is_number(v) or v is None) for k, v in m.items())
                                       for d, m in x.items())


def _estimate(e: Any) -> bool:
    return e is None or isinstance(e, dict) and all(_is_number(e.get(k)) for k in ("base_mean", "delta")) and \
        (e.get("se") is None or _is_number(e["se"])) and all(_is_int(e.get(k, 0)) for k in ("queries", "chunks"))


def _history(x: Any) -> bool:
    if not isinstance(x, dict) or not isinstance(x.get("loss", []), list) or not isinstance(x.get("val", []), list):
        return False
    losses_ok = all(isinstance(r, dict) and _is_int(r.get("epoch")) and (r.get("loss") is None or
                                                                          _is_number(r["loss"]))
                    for r in x.get("loss", []))
    return losses_ok and all(isinstance(r, dict) and _is_int(r.get("epoch")) and isinstance(r.get(PRIMARY_METRIC), dict)
                             and r[PRIMARY_METRIC] and all(_dim_key(d) and (v is None or _is_number(v))
                                                           for d, v in r[PRIMARY_METRIC].items())
                             for r in x.get("val", []))


_META_TYPES = {  # key -> (what it must be, as the readers of the metadata use it)
    "trained_on": ("a string", lambda x: isinstance(x, str)),
    "data_fingerprint": ("a string", lambda x: isinstance(x, str)),
    "validation": ("a string", lambda x: isinstance(x, str)),
    "recipe": ("a string", lambda x: isinstance(x, str)),
    "objective": ("a string", lambda x: isinstance(x, str)),
    "base_model_name": ("a string", lambda x: isinstance(x, str)),
    "best_epoch": ("an integer", _is_int),
    "train_seconds": ("a number", _is_number),
    "config": ("an object", lambda x: isinstance(x, dict)),
    "trials": ("a list of objects", lambda x: isinstance(x, list) and all(isinstance(t, dict) for t in x)),
    "val_base": ("dim -> metric -> number", _metrics_by_dim),
    "val_best": ("dim -> metric -> number", _metrics_by_dim),
    "coverage": ("{chunks, covered, share}", lambda x: isinstance(x, dict) and _is_int(x.get("chunks")) and
                 _is_int(x.get("covered")) and _is_number(x.get("share"))),
    "estimates": ("slice -> {base_mean, delta, se, ...}", lambda x: isinstance(x, dict) and
                  all(isinstance(k, str) and _estimate(e) for k, e in x.items())),
    "history": ('{"loss": [{epoch, loss}], "val": [{epoch, ndcg@10: {dim: value}}]}', _history),
}


def check_training_meta(meta: dict[str, Any], source: str) -> None:
    """Refuse training metadata whose known keys are not what every reader of them expects (one line, naming the
    key): a damaged or hand-edited header must not fail later inside a report."""
    for key, (what, ok) in _META_TYPES.items():
        if meta.get(key) is not None and not ok(meta[key]):
            raise AdapterError(f"{source}: adapter metadata {key!r} is not {what}; the file is damaged (train it "
                               "again, or drop the key)")


def _by_dim(d: dict | None) -> dict | None:
    return None if d is None else {int(k): v for k, v in d.items()}


def training_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Training metadata as read from JSON, with its dims back to ints (JSON keys are strings)."""
    out = dict(meta)
    for key in ("val_base", "val_best"):
        if isinstance(out.get(key), dict):
            out[key] = _by_dim(out[key])
    hist = out.get("history")
    if isinstance(hist, dict) and hist.get("val"):
        out["history"] = {**hist, "val": [{**r, PRIMARY_METRIC: _by_dim(r.get(PRIMARY_METRIC))} for r in hist["val"]]}
    return out


def read_finetune_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """A fine-tuned model folder's training metadata (``FINETUNE_FILE``, this schema; ``{}`` for a model folder
    without one), its format version checked: the reader ``adapter.systems`` and `compare` use, beside the writer
    ``adapter.finetune``."""
    path = Path(folder) / FINETUNE_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: unreadable ({type(e).__name__}); delete it to start afresh") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FINETUNE_VERSION:
        raise AdapterError(f"{path}: format version {version!r} is not supported (this version of adapter reads "
                           f"{FINETUNE_VERSION}); re-train with this version, or delete the file to use the folder "
                           "as a plain model")
    return training_meta(meta)


def estimate_change(e: dict[str, Any]) -> str:
    """A validation slice's estimated change as a share of its base, with its standard error: "+12.3% ± 1.1%" (a
    mean change with its noise; ``adapter.cards.pct_change`` is the change between two scores)."""
    base = e["base_mean"] or 1.0
    noise = f"± {e['se'] / base:.1%}" if e["se"] is not None else "(one chunk: no s.e.)"
    return f"{e['delta'] / base:+.1%} {noise}"


def estimates_line(metadata: dict[str, Any]) -> str | None:
    """The adapter file's validation estimates in one line (None for files without them): recipe, coverage, seen
    and unseen chunks, as `adapter train` printed them."""
    est, cov = metadata.get("estimates"), metadata.get("coverage")
    if not est or not cov:
        return None
    parts = [f"{k} chunks {estimate_change(e)}" for k, e in est.items() if e]
    return (f"recipe {metadata.get('recipe', '?')}, trained on {cov['covered']:,} of {cov['chunks']:,} chunks "
            f"({cov['share']:.0%}); validation ndcg@10 (mean over dims ± s.e.): {', '.join(parts)}")
