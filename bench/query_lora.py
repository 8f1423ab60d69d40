"""An experiment for issue #26, not yet part of the package: a query-side LoRA fine-tune: low-rank adapters on the
encoder's attention and dense layers, trained on the query route only against the corpus vectors the index already
holds.

Documents are never encoded here: every chunk is a candidate through its fixed, cached vector, and only queries run
through the (PEFT-wrapped) encoder, with gradients. The loss is the linear adapter's InfoNCE (``adapter.train``):
temperature ``TrainConfig.temperature``, every chunk of the corpus a candidate (the others relevant to the query
masked), summed over the Matryoshka dims of ``default_dims``. The epoch kept is the one best on a validation split by
the project's judge (``adapter.evaluate.evaluate``), the base (epoch 0, B = 0) competing.

The artifact is one safetensors file: the LoRA tensors and a JSON header in the adapter file's schema style
(``format_version``, ``base_model``, ``form`` "lora", ``rank``, ``alpha``, ``target_modules`` and the training
metadata). ``load_query_lora`` rebuilds the adapted query encoder from the base model and that file, merged, so a
query costs what the base encoder's does.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from adapter.backends import load_model, role_prompt
from adapter.config import PRIMARY_METRIC, TrainConfig, default_dims
from adapter.data import Qrels, atomic_write, relevant
from adapter.errors import AdapterError, one_line, refuse_existing
from adapter.evaluate import evaluate, id_rank, is_relevant

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the LoRA file
METADATA_KEY = "adapter"  # the header entry's name, as in adapter.model
FORM = "lora"


@dataclass(frozen=True)
class LoraTrainConfig:
    """The query-side LoRA fine-tune's settings (chosen on a validation split carved from training data: bench_lora)."""

    rank: int = 8  # LoRA rank r: 8 keeps MiniLM's file at ~1.3 MB in float32
    alpha: float = 16.0  # LoRA scaling alpha / r = 2, PEFT's common setting
    dropout: float = 0.0  # on the LoRA input only; the encoder's own dropout is off (eval mode): deterministic steps
    # every attention projection and dense layer of a BERT-like encoder (the pooler, unused by sentence-transformers,
    # is left out)
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    layers: tuple[int, ...] | None = None  # the encoder layers given LoRA (None: all); the top ones cut backward cost
    epochs: int = 3  # the best epoch on validation is kept, so extra epochs cost time, not quality
    lr: float = 3e-4  # AdamW on the LoRA factors only
    batch_size: int = 32  # queries per step; each sees every chunk of the corpus as a candidate
    temperature: float = TrainConfig.temperature  # the linear adapter's InfoNCE temperature
    warmup_fraction: float = TrainConfig.warmup_fraction  # linear warmup, then linear decay to zero (as the adapter)
    grad_clip: float = TrainConfig.grad_clip  # max gradient norm
    matryoshka: bool = True  # the loss summed over every Matryoshka dim (default_dims), as the adapter's default
    encode_batch_size: int = 64  # queries per forward pass when scoring validation


@dataclass
class LoraResult:
    """The fitted encoder (the base with LoRA layers, the kept epoch's weights loaded) and how it was chosen."""

    model: Any  # SentenceTransformer whose transformer is a peft.PeftModel
    base_model: str
    config: LoraTrainConfig
    best_epoch: int  # 0: no epoch beat the base on validation, the LoRA is B = 0 (the base exactly)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss and validation ndcg@10
    base_val: dict[int, dict[str, float]] = field(default_factory=dict)  # {dim: metrics} of the base on validation
    best_val: dict[int, dict[str, float]] = field(default_factory=dict)  # ... of the kept epoch
    seconds: float = 0.0  # wall time of training and validation
    cpu_seconds: float = 0.0  # process CPU time of the same (all threads): / cores = wall time on idle cores


def _peft_config(cfg: LoraTrainConfig) -> Any:
    from peft import LoraConfig

    layers = {"layers_to_transform": list(cfg.layers), "layers_pattern": "layer"} if cfg.layers else {}
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), exclude_modules=["pooler.dense"], bias="none", **layers)


def with_lora(model: SentenceTransformer, cfg: LoraTrainConfig, seed: int = 0) -> SentenceTransformer:
    """A copy of ``model`` whose transformer carries fresh LoRA layers (B = 0: the base exactly), base frozen."""
    from peft import get_peft_model

    if type(model[0]).__name__ != "Transformer":
        raise AdapterError(f"{type(model[0]).__name__}: a query LoRA needs a sentence-transformers Transformer module "
                           "first (a text encoder)")
    torch.manual_seed(seed)  # LoRA's A factors are drawn here
    out = copy.deepcopy(model)
    out[0].model = get_peft_model(out[0].model, _peft_config(cfg))
    return out


def _lora_tensors(model: SentenceTransformer) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model[0].model).items()}


def _set_lora_tensors(model: SentenceTransformer, tensors: Mapping[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model[0].model, dict(tensors))
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise AdapterError(f"LoRA tensors {unexpected[:3]} do not fit the model's layers")


def encode_queries(model: SentenceTransformer, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """(n, d) float32 unit query vectors from ``model`` (with its query prompt), as the Encoder makes them."""
    with torch.no_grad():
        v = model.encode_query(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
    return np.asarray(v, dtype=np.float32)


def _query_forward(model: SentenceTransformer, texts: Sequence[str]) -> torch.Tensor:
    """(B, d) unit query vectors with gradients: the query prompt, the tokenizer and the modules' forward."""
    features = model.preprocess(list(texts), prompt=role_prompt(model, "query") or None)
    features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return F.normalize(model(features)["sentence_embedding"], dim=-1)


def fit_query_lora(model: SentenceTransformer, queries: Mapping[str, str], train: Qrels, corpus: np.ndarray,
                   corpus_ids: Sequence[str], *, val: Qrels | None = None, cfg: LoraTrainConfig | None = None,
                   seed: int = 0, base_model: str | None = None) -> LoraResult:
    """Train LoRA layers on ``model``'s query route: the queries of ``train`` (texts in ``queries``) against every
    chunk's fixed vector in ``corpus`` (rows in ``corpus_ids`` order, unit length). ``val``: the queries whose
    ndcg@10 (full dim) picks the epoch, the base competing; without it the last epoch is kept. ``model`` itself is
    not changed. Seeded: the same inputs and seed give the same weights."""
    cfg = cfg or LoraTrainConfig()
    corpus = np.asarray(corpus, dtype=np.float32)
    n_corpus, dim = corpus.shape
    if len(corpus_ids) != n_corpus:
        raise AdapterError(f"{len(corpus_ids)} corpus ids for {n_corpus} corpus vectors")
    train = relevant(train)
    row = {c: i for i, c in enumerate(corpus_ids)}
    missing = next((c for r in train.values() for c in r if c not in row), None)
    if missing is not None:
        raise AdapterError(f"training qrels name chunk {missing!r} that is not in the corpus vectors")
    q_ids = [q for q in train if q in queries]
    if not q_ids:
        raise AdapterError("no training query has both a text and a relevant chunk")
    # (P, 2): (query row, positive chunk row), and every relevant pair as one code q * N + c (for the masks)
    pairs = np.array([(i, row[c]) for i, q in enumerate(q_ids) for c in sorted(train[q])], dtype=np.int64)
    rel_codes = np.unique(pairs[:, 0] * n_corpus + pairs[:, 1])
    texts = [queries[q] for q in q_ids]
    loss_dims = list(default_dims(dim)) if cfg.matryoshka else [dim]
    C = {m: F.normalize(torch.from_numpy(corpus[:, :m]), dim=-1) if m < dim else torch.from_numpy(corpus)
         for m in loss_dims}  # (N, m): every chunk a candidate, truncated once per dim

    lora = with_lora(model, cfg, seed)
    lora.eval()  # the encoder's own dropout off: each step is a deterministic function of the weights and batch
    params = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(pairs) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    rng = np.random.default_rng(seed)
    tie_rank = id_rank(corpus_ids)
    val_ids = [q for q in relevant(val) if q in queries] if val else []

    def validate() -> dict[str, float]:
        if not val_ids:
            return {}
        v = encode_queries(lora, [queries[q] for q in val_ids], cfg.encode_batch_size)
        return evaluate(v, corpus, val, val_ids, corpus_ids, tie_rank=tie_rank)[dim]

    t0, c0 = time.perf_counter(), time.process_time()
    base_val = best_val = validate()
    best_epoch, best_state = 0, _lora_tensors(lora)
    history: list[dict[str, float]] = [{"epoch": 0, "loss": float("nan"), **_primary(base_val)}]
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(len(pairs))
        losses = []
        for s in range(0, len(order), cfg.batch_size):
            b = pairs[order[s:s + cfg.batch_size]]  # (B, 2)
            anchor = _query_forward(lora, [texts[i] for i in b[:, 0]])  # (B, d), unit length
            target = torch.from_numpy(b[:, 1])
            # the other chunks relevant to a query are not its negatives
            masked = is_relevant(b[:, :1] * n_corpus + np.arange(n_corpus)[None, :], rel_codes)
            masked[np.arange(len(b)), b[:, 1]] = False
            masked_t = torch.from_numpy(masked)
            loss = 0.0
            for m in loss_dims:  # Matryoshka: the same InfoNCE at every truncation, summed
                a = anchor if m == dim else F.normalize(anchor[:, :m], dim=-1)  # (B, m)
                logits = a @ C[m].T / cfg.temperature  # (B, N)
                loss = loss + F.cross_entropy(logits.masked_fill(masked_t, float("-inf")), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        metrics = validate()
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **_primary(metrics)})
        logger.info("lora epoch %d: loss %.4f, validation %s", epoch, history[-1]["loss"], _primary(metrics))
        if not val_ids or metrics[PRIMARY_METRIC] > best_val[PRIMARY_METRIC]:
            best_epoch, best_val, best_state = epoch, metrics, _lora_tensors(lora)
    _set_lora_tensors(lora, best_state)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    by_dim = (lambda m: {dim: m} if m else {})  # noqa: E731
    return LoraResult(lora, base_model or _model_name(model), cfg, best_epoch, history, by_dim(base_val),
                      by_dim(best_val), seconds, cpu_seconds)


def _primary(metrics: dict[str, float]) -> dict[str, float]:
    return {PRIMARY_METRIC: metrics[PRIMARY_METRIC]} if metrics else {}


def _model_name(model: SentenceTransformer) -> str:
    return str(getattr(model, "model_card_data", None) and model.model_card_data.base_model or
               getattr(model[0].auto_model.config, "_name_or_path", "") or "unknown")


def merged(model: SentenceTransformer) -> SentenceTransformer:
    """A copy of a LoRA-carrying encoder with the LoRA folded into its weights (peft's merge_and_unload): the same
    architecture as the base, so a query costs what it costs there."""
    out = copy.deepcopy(model)
    out[0].model = out[0].model.merge_and_unload()
    out.eval()
    return out


def save_query_lora(result: LoraResult, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None,
                    force: bool = False) -> Path:
    """Write the LoRA tensors and the header (format, base model, rank, targets, training metadata) to one
    safetensors file, atomically; an existing file is replaced only with ``force``."""
    from safetensors.torch import save

    refuse_existing(path, force)
    path = Path(path)
    if not path.parent.is_dir():
        raise AdapterError(f"{path.parent}: folder does not exist")
    cfg = result.config
    header = {"format_version": FORMAT_VERSION, "base_model": result.base_model,
              "dim": int(result.model.get_embedding_dimension()), "form": FORM, "rank": cfg.rank,
              "alpha": cfg.alpha, "target_modules": list(cfg.target_modules),
              "layers": list(cfg.layers) if cfg.layers else None, "dtype": "float32",
              "best_epoch": result.best_epoch, "train_seconds": round(result.seconds, 3),
              "train_cpu_seconds": round(result.cpu_seconds, 3),
              "val_base": result.base_val, "val_best": result.best_val,
              "history": {"loss": result.history}, "config": {"lora": asdict(cfg)}, **(metadata or {})}
    data = save(_lora_tensors(result.model), metadata={METADATA_KEY: json.dumps(header, separators=(",", ":"))})
    try:
        with atomic_write(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise AdapterError(f"{path}: cannot write the LoRA ({e.strerror or one_line(e)})") from None
    return path


def read_query_lora(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and the tensors of a LoRA file, checked: form, format version, finite values."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    try:
        header = json.loads(meta[METADATA_KEY])
    except (KeyError, ValueError):
        raise AdapterError(f"{path}: no adapter metadata in its header; not an adapter file") from None
    if header.get("form") != FORM or header.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path}: form {header.get('form')!r} version {header.get('format_version')!r}, not a "
                           f"{FORM} file of version {FORMAT_VERSION}")
    bad = next((k for k, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise AdapterError(f"{path}: tensor {bad!r} holds NaN or Inf values")
    return header, tensors


def load_query_lora(path: str | os.PathLike, model: SentenceTransformer | None = None, *,
                    merge: bool = True) -> SentenceTransformer:
    """The adapted query encoder: ``model`` (else the file's base model, loaded) with the file's LoRA, merged into the
    weights unless ``merge=False``. ``model`` itself is not changed."""
    header, tensors = read_query_lora(path)
    base = model if model is not None else load_model(header["base_model"])
    if base.get_embedding_dimension() != header["dim"]:
        raise AdapterError(f"{path}: a LoRA for dimension {header['dim']}, the model's is "
                           f"{base.get_embedding_dimension()}; pass the model it was trained on")
    layers = header.get("layers")
    cfg = LoraTrainConfig(rank=header["rank"], alpha=header["alpha"], target_modules=tuple(header["target_modules"]),
                          layers=tuple(layers) if layers else None)
    lora = with_lora(base, cfg)
    _set_lora_tensors(lora, tensors)
    lora.eval()
    return merged(lora) if merge else lora
