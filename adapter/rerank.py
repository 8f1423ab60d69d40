"""A second stage: a cross-encoder that reorders a first stage's top-k, as systems use it.

``load_reranker`` reads a reranker folder (a sentence-transformers CrossEncoder, or a transformers
sequence-classification model) after ``check_code_free`` has refused any folder that names code of its own: nothing is
ever loaded with remote code, and the project's ``CosineHead`` (the cosine between the question's and the chunk's mean
token states of one joint encoding) is handed to the loader by import. ``Reranker`` scores (question, chunk) pairs;
``ListReranker`` is the judge's second stage (``adapter.evaluate.Reorder``), fusing its score with the first stage's
at the weight chosen on validation for that first stage (``stage_key``). Training one is ``adapter.rerank_train``'s.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sentence_transformers.base.modules import Module

from adapter.config import Config
from adapter.data import Dataset
from adapter.encoder import resolve_model
from adapter.errors import AdapterError, one_line

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of META_FILE; the only version read
COSINE_SCALE = 20.0  # CosineHead multiplies cosines by this (MultipleNegativesRankingLoss's scale)
META_FILE = "rerank.json"  # what the reranker was trained on and how it scored: what `compare` reads
HEAD_TYPE = "adapter.rerank.CosineHead"  # modules.json's name for it: the one class outside sentence-transformers
# that a reranker folder may name, resolved to this module's class by import (never by trust_remote_code)
CODE_KEYS = ("auto_map", "custom_pipelines")  # where transformers configs name a folder's own Python
ACTIVATION_KEYS = ("activation_fn", "activation_function", "sbert_ce_default_activation_function")  # a dotted path
# there is imported and called by sentence-transformers; these are the ones it saves for torch's plain activations
SAFE_ACTIVATIONS = frozenset({"torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Sigmoid",
                              "torch.nn.modules.activation.Tanh", "torch.nn.modules.activation.Softmax",
                              "torch.nn.modules.activation.ReLU", "torch.nn.modules.activation.GELU"})
DATA_JSON = ("tokenizer.json", "vocab.json")  # token data, read by the tokenizers library: no code is named there
MAX_CONFIG_BYTES = 16 * 2 ** 20  # a config file larger than this is not one
MAX_FOLDER_FILES = 10_000  # files and folders walked in a model folder before it is refused


# ---------------------------------------------------------------------------------------------------------- loading


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: unreadable ({type(e).__name__})") from None
    return value if isinstance(value, dict) else {}


def is_cross_encoder(folder: str | os.PathLike) -> bool:
    """Whether a local folder holds a cross-encoder: saved by sentence-transformers as one, or a transformers
    sequence-classification model without sentence-transformers modules (the classic checkpoints)."""
    folder = Path(folder)
    st = folder / "config_sentence_transformers.json"
    if st.is_file():
        return _json(st).get("model_type") == "CrossEncoder"
    if (folder / "modules.json").is_file() or not (folder / "config.json").is_file():
        return False
    archs = _json(folder / "config.json").get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


class CosineHead(Module):
    """A cross-encoder head with nothing to learn but a scale: the cosine between the mean token state of the
    question (segment A) and of the chunk (segment B) of one joint encoding, times ``scale``. On a bi-encoder's
    backbone (trained for mean pooling) it ranks from the first step, where a new classifier ranks at random; training
    then moves the encoder, which reads question and chunk together."""

    config_keys = ["scale"]

    def __init__(self, scale: float = COSINE_SCALE):
        super().__init__()
        self.scale = scale

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        import torch

        h = features["token_embeddings"].float()
        mask = features["attention_mask"].unsqueeze(-1).float()
        chunk = features["token_type_ids"].unsqueeze(-1).float() * mask
        query = mask - chunk
        q = (h * query).sum(1) / query.sum(1).clamp(min=1.0)
        c = (h * chunk).sum(1) / chunk.sum(1).clamp(min=1.0)
        features["scores"] = (self.scale * torch.nn.functional.cosine_similarity(q, c, dim=-1)).unsqueeze(1)
        return features

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        self.save_config(output_path)


def _json_files(folder: Path) -> list[Path]:
    """Every JSON file a loader may read under ``folder``, symbolic links followed (each real folder once), at most
    ``MAX_FOLDER_FILES`` files in all."""
    found: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        found += [Path(root, f) for f in files if f.endswith(".json")]
        if len(found) + len(dirs) > MAX_FOLDER_FILES:
            raise AdapterError(f"{folder}: more than {MAX_FOLDER_FILES} files and folders; not a model folder")
    return sorted(found)


def _code_named(value: Any, name: str) -> str | None:
    """What in one parsed JSON file would make a loader import code: an ``auto_map`` or ``custom_pipelines`` entry
    (transformers' remote code), or an activation's dotted path that is not one of torch's plain ones
    (sentence-transformers imports what it names and calls it; a bare name such as GPT-2's "gelu_new" imports
    nothing); None when nothing does."""
    stack = [value]
    while stack:  # iterative: a file nested deeply cannot overflow the stack
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, v in item.items():
                if key in CODE_KEYS:
                    return f"{key!r} in {name}"
                if key in ACTIVATION_KEYS and isinstance(v, str) and "." in v and v not in SAFE_ACTIVATIONS:
                    return f"{key} {v[:80]!r} in {name}"
                stack.append(v)
    return None


def check_code_free(folder: str | os.PathLike) -> None:
    """Refuse a local model folder that names any code of its own, before anything in it is loaded: every JSON file
    in it, subfolders included, is read (``tokenizer.json`` and ``vocab.json`` hold token data only), and
    ``modules.json`` may name sentence-transformers' modules and the project's ``CosineHead`` only. Loading never
    turns on ``trust_remote_code``: ``CosineHead`` is this module's own class, handed to the loader by import."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for file in _json_files(folder):
        if file.name in DATA_JSON:
            continue
        try:
            if file.stat().st_size > MAX_CONFIG_BYTES:
                raise AdapterError(f"{file}: {file.stat().st_size:,} bytes is not a model config; refusing to load "
                                   f"{folder}")
            value = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise AdapterError(f"{file}: unreadable ({type(e).__name__}); refusing to load {folder}") from None
        if file.name == "modules.json" and file.parent == folder:
            entries = value if isinstance(value, list) else []
            if not entries or not all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in entries):
                raise AdapterError(f"{file}: not a list of modules; refusing to load {folder}")
            other = [e["type"] for e in entries if e["type"] != HEAD_TYPE
                     and not e["type"].startswith("sentence_transformers.")]
            if other:
                raise AdapterError(f"{folder}: names code outside sentence-transformers ({other[0][:80]!r} in "
                                   "modules.json); refusing to load it")
        named = _code_named(value, str(file.relative_to(folder)))
        if named is not None:
            raise AdapterError(f"{folder}: names code of its own ({named}); refusing to load it")


def _cross_encoder(path: str, max_length: int | None, **kw: Any) -> CrossEncoder:
    """A cross-encoder from ``path``, never with remote code: a local folder is checked first (``check_code_free``)
    and its ``CosineHead`` resolves to this module's class."""
    from sentence_transformers import CrossEncoder

    check_code_free(path)
    try:
        model = CrossEncoder._load_with_module_classes(path, {HEAD_TYPE: CosineHead}, trust_remote_code=False, **kw)
    except Exception as e:  # hub and transformers raise many types; the user needs one line
        raise AdapterError(f"{path}: cannot load as a cross-encoder ({one_line(e)})") from None
    if max_length is not None:
        model.max_seq_length = max_length
    return model


def check_folder(folder: str | os.PathLike) -> Path:
    """A reranker folder, checked without loading it: it exists, holds a cross-encoder naming no code of its own,
    and its rerank.json (when it has one) is of the format version this version of adapter reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such reranker folder")
    if not is_cross_encoder(folder):
        raise AdapterError(f"{folder}: not a cross-encoder (a sentence-transformers CrossEncoder or a "
                           "sequence-classification model); train one with `adapter rerank-train`")
    check_code_free(folder)
    meta_file = folder / META_FILE
    version = _json(meta_file).get("format_version") if meta_file.is_file() else FORMAT_VERSION
    if version != FORMAT_VERSION:
        raise AdapterError(f"{meta_file}: format version {version!r} is not supported (this version of adapter reads "
                           f"{FORMAT_VERSION}); re-train with this version")
    return folder


def load_reranker(folder: str | os.PathLike, cfg: Config | None = None) -> Reranker:
    """A trained reranker from ``folder``; a one-line error when it is not a one-score cross-encoder."""
    cfg = cfg or Config()
    folder = check_folder(folder)
    model = _cross_encoder(str(folder), None)
    if model.num_labels != 1:
        raise AdapterError(f"{folder}: a cross-encoder with {model.num_labels} labels; a reranker gives one score")
    meta_file = folder / META_FILE
    meta = _json(meta_file) if meta_file.is_file() else {}
    weights = {str(k): float(v["fusion"]) for k, v in (meta.get("stages") or {}).items()}
    return Reranker(model, batch_size=cfg.rerank.predict_batch_size, source=str(folder), meta=meta,
                    fusion=float(meta.get("fusion_weight") or 0.0), bf16=use_bf16(cfg.rerank.bf16), weights=weights)


def stage_key(kind: str, source: str) -> str | None:
    """What names a first stage in a reranker's per-first-stage fusion weights: ``base:<model>``, or
    ``adapter:<hash of the adapter file>``; None for one that cannot be named (an adapter given in memory)."""
    if kind == "base":
        return f"base:{source}"
    if kind == "adapter" and Path(source).is_file():
        return f"adapter:{file_sha(source)}"
    return None


def start_model(name: str, max_length: int | None, head: str | None = None) -> tuple[CrossEncoder, str]:
    """The model training starts from, and how: a cross-encoder checkpoint as it is, or any other encoder (a
    sentence-transformers folder, a transformers model) with a new head: ``cosine`` (``CosineHead`` on the token
    states) or ``classifier`` (transformers' sequence-classification head, one logit on the pooler)."""
    head = Config().rerank.head if head is None else head
    path = resolve_model(name)
    check_code_free(path)
    if Path(path).is_dir() and is_cross_encoder(path):
        model = _cross_encoder(path, max_length)
        if model.num_labels != 1:
            raise AdapterError(f"{name}: a cross-encoder with {model.num_labels} labels; a reranker gives one score")
        return model, "cross-encoder checkpoint"
    if Path(path).exists() and not Path(path, "config.json").is_file() and not Path(path, "modules.json").is_file():
        raise AdapterError(f"{name}: not a model folder (no config.json or modules.json)")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the new head's weights as missing: that is the point
    try:
        if head == "classifier":
            return _cross_encoder(path, max_length, num_labels=1), "encoder with a new one-logit head"
        import torch
        from sentence_transformers import CrossEncoder
        from sentence_transformers.base.modules import Transformer

        try:
            encoder = Transformer(path, max_seq_length=max_length)  # remote code stays off (transformers default)
        except Exception as e:  # as in _cross_encoder: one line
            raise AdapterError(f"{name}: cannot load as an encoder ({one_line(e)})") from None
        encoder.model.config.num_labels = 1  # what CrossEncoder.num_labels reads: one score
        # scores as they are (scale x cosine): a sigmoid on top would saturate to ties near the top of CrossEncoder.rank
        model = CrossEncoder(modules=[encoder, CosineHead()], activation_fn=torch.nn.Identity())
    finally:
        hf_logging.set_verbosity(level)
    if max_length is not None:
        model.max_seq_length = max_length
    return model, "encoder with a new cosine head (question tokens against chunk tokens)"


def use_bf16(setting: str) -> bool:
    """Whether to run under bfloat16 autocast: ``auto`` where the hardware does bf16 natively (a bf16 GPU, or a CPU
    with AVX-512 BF16 or AMX, where it measured 2-3x the pairs per second of float32 for MiniLM)."""
    import torch

    if setting in ("yes", "no"):
        return setting == "yes"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


# ---------------------------------------------------------------------------------------------------------- scoring


class Reranker:
    """A one-score cross-encoder that scores (question, chunk) pairs, remembering pairs it has scored (a reranked
    system is scored at every dim, and base and adapter share most of their candidates)."""

    def __init__(self, model: CrossEncoder, *, batch_size: int | None = None, source: str = "", memo: bool = True,
                 meta: dict[str, Any] | None = None, fusion: float = 0.0, bf16: bool = False,
                 weights: Mapping[str, float] | None = None):
        batch_size = Config().rerank.predict_batch_size if batch_size is None else batch_size
        self.model, self.batch_size, self.source = model, batch_size, source
        self.meta = meta or {}
        self.fusion = fusion  # weight of the first-stage score in the final order (ListReranker)
        self.weights = dict(weights or {})  # stage_key -> the weight chosen on that first stage's validation lists
        self.bf16 = bf16
        self._memo: dict[tuple[str, str], float] | None = {} if memo else None

    def for_first_stage(self, kind: str, source: str) -> Reranker:
        """This reranker (same model, same remembered scores) with the fusion weight chosen on validation for that
        first stage; one it was not validated on gets the weight of the first stage it was trained under."""
        key = stage_key(kind, source)
        if key not in self.weights:
            return self
        view = copy.copy(self)  # shallow: model and memo shared
        view.fusion = self.weights[key]
        return view

    def _predict(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        import torch

        if not pairs:
            return np.empty(0, dtype=np.float32)
        bf16 = torch.autocast(self.model.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with bf16:
            scores = self.model.predict(list(pairs), batch_size=self.batch_size, show_progress_bar=False,
                                        activation_fn=torch.nn.Identity(), convert_to_tensor=True)
        return torch.as_tensor(scores).float().cpu().numpy().reshape(-1)  # logits: no sigmoid ties at the top

    def scores(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """One score per (question, chunk text) pair; higher is more relevant."""
        if self._memo is None:
            return self._predict(pairs)
        todo = list(dict.fromkeys(p for p in pairs if p not in self._memo))
        self._memo.update(zip(todo, self._predict(todo).tolist(), strict=True))
        return np.array([self._memo[p] for p in pairs], dtype=np.float32)

    def seconds_per_query(self, query: str, chunks: Sequence[str]) -> float:
        """Wall seconds to score one question against its candidates, uncached."""
        t = time.perf_counter()
        self._predict([(query, c) for c in chunks])
        return time.perf_counter() - t

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


def _standard(x: np.ndarray) -> np.ndarray:
    """Each row to mean 0 and standard deviation 1 (a row of equal values to 0)."""
    return (x - x.mean(-1, keepdims=True)) / np.maximum(x.std(-1, keepdims=True), 1e-6)


class ListReranker:
    """The second stage the judge takes (``adapter.evaluate.Reorder``): reorders each query's first ``k`` corpus rows
    by the cross-encoder's score, ties kept in first-stage order; rows below ``k`` stay as they were. With ``fusion``
    w > 0 the order is by the cross-encoder's score + w x the first stage's, each standardised over the query's ``k``
    candidates, so a large w keeps the first stage's order: w is chosen on validation by `rerank-train`."""

    def __init__(self, reranker: Reranker, queries: Mapping[str, str], chunks: Sequence[str], k: int,
                 fusion: float | None = None):
        self.reranker, self.queries, self.chunks, self.k = reranker, queries, chunks, k
        self.fusion = reranker.fusion if fusion is None else fusion

    def __call__(self, query_ids: Sequence[str], rows: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
        k = min(self.k, rows.shape[1])
        top = rows[:, :k]  # (n, k)
        pairs = [(self.queries[q], self.chunks[r]) for q, row in zip(query_ids, top, strict=True) for r in row]
        s = self.reranker.scores(pairs).reshape(len(query_ids), k)
        if self.fusion:
            if scores is None:
                raise ValueError("a fused reranker needs the first stage's scores")
            s = _standard(s.astype(np.float64)) + self.fusion * _standard(np.asarray(scores[:, :k], np.float64))
        order = np.lexsort((np.broadcast_to(np.arange(k), s.shape), -s), axis=1)
        return np.concatenate([np.take_along_axis(top, order, 1), rows[:, k:]], axis=1)


def check_k(k: int, n_chunks: int) -> None:
    """rerank.k must name at least one candidate and no more than the corpus holds."""
    if not 1 <= k <= n_chunks:
        raise AdapterError(f"rerank.k {k} is outside 1..{n_chunks} (the corpus's chunk count)")


def list_reranker(reranker: Reranker, dataset: Dataset, k: int, corpus_ids: Sequence[str] | None = None,
                  fusion: float | None = None) -> ListReranker:
    """The judge's second stage for ``dataset`` whose corpus rows are ``corpus_ids`` (default: corpus order, as every
    system's cached corpus vectors are; a store read out for evaluation has its own order); ``fusion``: the weight of
    the first-stage rank (default: the reranker's own, chosen on validation)."""
    check_k(k, len(dataset.corpus))
    cids = list(dataset.corpus) if corpus_ids is None else corpus_ids
    return ListReranker(reranker, dataset.queries, [dataset.doc_text(c) for c in cids], k, fusion)


def file_sha(path: str | os.PathLike) -> str:
    """Short hash of a file's bytes: what identifies the adapter a reranker's negatives were mined under."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
