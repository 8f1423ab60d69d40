"""The query-side fine-tune: LoRA on the encoder's query route, trained against the corpus vectors the index holds.

Documents are never encoded here. Every chunk is a candidate through its fixed vector (the cache, a store or a vector
file), and only the training questions run through the encoder, which carries low-rank adapters (PEFT) on its
attention and dense layers, the base weights frozen. The loss is the linear adapter's corpus-wide InfoNCE
(``adapter.train.infonce_loss``: the train section's temperature, warmup, clipping; every chunk a candidate, the
query's other relevant chunks masked), summed over the Matryoshka dims. The epoch kept is the best on the validation
questions by the one judge, the base (epoch 0: B = 0, the base exactly) competing. ``adapter.choice`` runs it as one
more trial beside the linear recipes (``train.form``).

The artifact is one safetensors file in the adapter file's schema (``adapter.model``): ``form`` "lora", ``rank``
(LoRA's r), a ``lora`` entry (alpha, target modules, layers), the checksum and the same training metadata; the
tensors are PEFT's LoRA factors. ``QueryLora`` is that file loaded: ``encode_queries`` runs the base encoder with
the LoRA merged into its weights (the same architecture, so a query costs what a base query costs), while documents
stay with the untouched base encoder.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from adapter.backends import load_model, role_prompt
from adapter.config import Config, LoraConfig, TrainConfig, default_dims
from adapter.data import atomic_write
from adapter.errors import AdapterError, one_line, refuse_existing
from adapter.evaluate import evaluate as judge
from adapter.evaluate import id_rank
from adapter.model import (
    CHECKSUM_KEY,
    FORMAT_VERSION,
    METADATA_KEY,
    check_base_model,
    check_training_meta,
    read_header,
    tensors_sha256,
    training_meta,
)
from adapter.train import (
    Split,
    Stopped,
    bounded,
    clip_grads,
    corpus_masks,
    every_chunk,
    infonce_loss,
    optimizer,
    primary,
    training_pairs,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

FORM = "lora"
ENCODE_BATCH = 64  # questions per forward pass when scoring validation


@dataclass
class LoraFit:
    """One fit: the encoder carrying the kept epoch's LoRA (not merged) and its curves."""

    model: Any  # SentenceTransformer whose transformer is a peft.PeftModel
    best_epoch: int  # 0: no epoch beat the base on validation; the LoRA is B = 0 (the base exactly)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss and validation ndcg@10
    base_val: dict[str, float] = field(default_factory=dict)  # the base's metrics on validation (full dim)
    best_val: dict[str, float] = field(default_factory=dict)  # the kept epoch's
    seconds: float = 0.0


def lora_settings(lc: LoraConfig, model: SentenceTransformer) -> dict[str, Any]:
    """What the file records of the LoRA's shape, and all ``with_lora`` needs to rebuild it: ``lc.top_layers`` made
    the model's own layer numbers (None: every layer)."""
    n = getattr(model[0].auto_model.config, "num_hidden_layers", None)
    top = lc.top_layers
    layers = list(range(n - top, n)) if top is not None and n is not None and top < n else None
    return {"alpha": float(lc.alpha), "dropout": float(lc.dropout), "target_modules": list(lc.target_modules),
            "layers": layers}


def with_lora(model: SentenceTransformer, r: int, settings: Mapping[str, Any],
              seed: int | None = None) -> SentenceTransformer:
    """A copy of ``model`` whose transformer carries fresh LoRA layers (B = 0: the base exactly), the base frozen."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise AdapterError("a query LoRA needs the 'peft' package: pip install 'adapter[lora]'") from None
    if type(model[0]).__name__ != "Transformer":
        raise AdapterError(f"{type(model[0]).__name__}: a query LoRA needs a sentence-transformers model whose first "
                           "module is a Transformer (a text encoder)")
    layers = settings.get("layers")
    where = {"layers_to_transform": list(layers), "layers_pattern": "layer"} if layers else {}
    peft_cfg = PeftLoraConfig(r=r, lora_alpha=settings["alpha"], lora_dropout=settings.get("dropout", 0.0),
                              target_modules=list(settings["target_modules"]), exclude_modules=["pooler.dense"],
                              bias="none", **where)
    torch.manual_seed(Config().seed if seed is None else seed)  # LoRA's A factors are drawn here
    out = copy.deepcopy(model)
    try:
        out[0].model = get_peft_model(out[0].model, peft_cfg)
    except ValueError as e:  # no module matches the targets or layers
        raise AdapterError(f"lora.target_modules / lora.layers do not fit the model ({one_line(e)})") from None
    return out


def lora_tensors(model: SentenceTransformer) -> dict[str, torch.Tensor]:
    """The LoRA factors of a LoRA-carrying encoder, as PEFT names them (copies)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model[0].model).items()}


def set_lora_tensors(model: SentenceTransformer, tensors: Mapping[str, torch.Tensor], source: str = "LoRA") -> None:
    """Load LoRA factors into a LoRA-carrying encoder; refuses factors that do not fit its layers."""
    from peft import set_peft_model_state_dict

    have = set(lora_tensors(model))
    if set(tensors) != have:
        odd = sorted(set(tensors) ^ have)
        raise AdapterError(f"{source}: its LoRA tensors do not fit the model's LoRA layers (e.g. {odd[0]!r})")
    try:
        set_peft_model_state_dict(model[0].model, dict(tensors))
    except RuntimeError as e:  # a shape mismatch
        raise AdapterError(f"{source}: its LoRA tensors do not fit the model ({one_line(e)[:200]})") from None


def merged(model: SentenceTransformer) -> SentenceTransformer:
    """A copy of a LoRA-carrying encoder with the LoRA folded into its weights (PEFT's merge_and_unload): the base's
    architecture, so a query costs what it costs there."""
    out = copy.deepcopy(model)
    out[0].model = out[0].model.merge_and_unload()
    out.eval()
    return out


def encode_queries(model: SentenceTransformer, texts: Sequence[str], batch_size: int = ENCODE_BATCH) -> np.ndarray:
    """(n, d) float32 unit query vectors from ``model`` with its query prompt, as the base encoder makes them."""
    with torch.no_grad():
        v = model.encode_query(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False)
    return np.asarray(v, dtype=np.float32).reshape(len(texts), -1)


def _query_forward(model: SentenceTransformer, texts: Sequence[str]) -> torch.Tensor:
    """(B, d) unit query vectors with gradients: the query prompt, the tokenizer and the modules' forward."""
    features = model.preprocess(list(texts), prompt=role_prompt(model, "query") or None)
    features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return F.normalize(model(features)["sentence_embedding"], dim=-1)


def _validate(model: SentenceTransformer, val: Split | None, texts: Mapping[str, str], corpus: np.ndarray,
              corpus_ids: list[str], tie_rank: np.ndarray) -> dict[str, float]:
    if val is None:
        return {}
    v = encode_queries(model, [texts[q] for q in val.ids])
    return judge(v, corpus, val.qrels, val.ids, corpus_ids, tie_rank=tie_rank)[corpus.shape[1]]


def fit_lora(model: SentenceTransformer, train: Split, texts: Mapping[str, str], corpus: np.ndarray,
             corpus_ids: list[str], cfg: Config, *, val: Split | None = None, epochs: int | None = None,
             tie_rank: np.ndarray | None = None, outside: np.ndarray | None = None,
             stop: threading.Event | None = None) -> LoraFit:
    """Train LoRA layers on ``model``'s query route (``cfg.lora``): the questions of ``train`` (their texts in
    ``texts``) against every chunk's fixed vector in ``corpus`` (rows in ``corpus_ids`` order, unit length), the
    InfoNCE of ``cfg.train``'s temperature summed over the Matryoshka dims; the candidates are the chunks the
    training questions are about (the others are never negatives). ``val``: the questions whose ndcg@10
    (full dim) picks the epoch, the base competing; without it the last epoch is kept. ``epochs``: instead of
    ``cfg.lora.epochs`` (a refit to the validated count). ``outside``: corpus rows treated as not yet indexed (never
    a candidate). ``model`` itself is not changed; the same inputs and seed give the same weights."""
    lc, tc = cfg.lora, cfg.train
    epochs = lc.epochs if epochs is None else epochs
    n_corpus, dim = corpus.shape
    missing = next((q for q in train.ids if q not in texts), None)
    if missing is not None:
        raise AdapterError(f"training question {missing!r} has no text: a query LoRA trains on the questions' texts")
    pairs = training_pairs(train, corpus_ids)
    # only chunks some training question is about are candidates: a chunk no question names would be a negative to
    # every question, and the encoder learns to steer every query away from it (by chunk, test fell to 0.52x base)
    never = np.ones(n_corpus, dtype=bool)
    never[pairs.rows[:, 1]] = False
    if outside is not None:
        never[outside] = True
    never_t = torch.from_numpy(never)
    tie_rank = id_rank(corpus_ids) if tie_rank is None else tie_rank
    val = bounded(val, n_corpus, cfg)
    dims = list(default_dims(dim))
    candidates = every_chunk(corpus, dims)  # (N, m) per dim: every chunk a candidate, truncated once
    lora = with_lora(model, lc.r, lora_settings(lc, model), cfg.seed)
    lora.eval()  # the encoder's own dropout off: each step is a deterministic function of the weights and batch
    params = [p for p in lora.parameters() if p.requires_grad]
    steps = -(-len(pairs.rows) // lc.batch_size) * max(1, epochs)
    opt, sched = optimizer(params, cfg.replace(train={"lr": lc.lr, "weight_decay": 0.0}).train, steps)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    base_val = best_val = _validate(lora, val, texts, corpus, corpus_ids, tie_rank)
    best_epoch, best_state = 0, lora_tensors(lora)
    history: list[dict[str, float]] = [{"epoch": 0, "loss": float("nan"), **primary(base_val)}]
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(pairs.rows))
        losses = []
        for s in range(0, len(order), lc.batch_size):
            if stop is not None and stop.is_set():
                raise Stopped
            rows = pairs.rows[order[s:s + lc.batch_size]]  # (B, 2): question row, positive chunk row
            anchor = _query_forward(lora, [texts[train.ids[i]] for i in rows[:, 0]])
            masked = corpus_masks(rows[:, 0], rows[:, 1], pairs)  # (B, N): the question's other relevant chunks
            masked |= never_t  # and every chunk no training question is about
            loss = infonce_loss(anchor, candidates, masked, torch.from_numpy(rows[:, 1]), dims, tc.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_grads(params, tc.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        metrics = _validate(lora, val, texts, corpus, corpus_ids, tie_rank)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **primary(metrics)})
        logger.info("lora epoch %d: loss %.4f, validation %s", epoch, history[-1]["loss"], primary(metrics))
        if val is None or metrics["ndcg@10"] > best_val["ndcg@10"]:
            best_epoch, best_val, best_state = epoch, metrics, lora_tensors(lora)
    set_lora_tensors(lora, best_state)
    return LoraFit(lora, best_epoch, history, base_val, best_val, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------- the file


@dataclass
class QueryLora:
    """A query-side LoRA: its factors, shape and training metadata (what its file holds), and the adapted query
    encoder built from the base model on first use. Documents are the base encoder's, untouched."""

    dim: int
    base_model: str  # the encoder identity it was trained on, "name@fingerprint"
    r: int
    settings: dict[str, Any]  # lora_settings: alpha, dropout, target_modules, layers
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # the merged query encoder (SentenceTransformer), built by ``query_model``
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    form = FORM

    @property
    def rank(self) -> int:
        return self.r

    @classmethod
    def from_fit(cls, fitted: LoraFit, base_model: str, cfg: Config) -> QueryLora:
        """The file's content for a fit (its kept epoch), its merged encoder ready."""
        dim = int(fitted.model.get_embedding_dimension())
        out = cls(dim, base_model, cfg.lora.r, lora_settings(cfg.lora, fitted.model), lora_tensors(fitted.model))
        out.model = merged(fitted.model)
        return out

    def check_base_model(self, identity: str, *, allow_other_model: bool = False, source: str = "adapter") -> None:
        """Refuse an encoder other than the one this LoRA was trained on (unless explicitly allowed)."""
        check_base_model(self.base_model, identity, allow_other_model=allow_other_model, source=source)

    def query_model(self, base: SentenceTransformer | None = None) -> SentenceTransformer:
        """The adapted query encoder: ``base`` (else the recorded base model, loaded) with this LoRA merged. Built
        once; ``base`` itself is not changed."""
        with self._lock:
            if self.model is None:
                name = self.metadata.get("base_model_name") or self.base_model.rsplit("@", 1)[0]
                base = base if base is not None else load_model(name)
                if base.get_embedding_dimension() != self.dim:
                    raise AdapterError(f"a LoRA for dimension {self.dim}, the model's is "
                                       f"{base.get_embedding_dimension()}; pass the model it was trained on")
                lora = with_lora(base, self.r, self.settings)
                set_lora_tensors(lora, self.tensors)
                self.model = merged(lora)
            return self.model

    def encode_queries(self, texts: Sequence[str], base: SentenceTransformer | None = None) -> np.ndarray:
        """(n, d) unit query vectors from the adapted encoder."""
        return encode_queries(self.query_model(base), texts)

    def save(self, path: str | os.PathLike, *, dtype: str = TrainConfig.dtype, force: bool = False) -> Path:
        """Write the factors and the header to one safetensors file, atomically; an existing file is replaced only
        with ``force``. The factors stay float32 (``dtype`` float16 halves them)."""
        from safetensors.torch import save

        refuse_existing(path, force)
        path = Path(path)
        if not path.parent.is_dir():
            raise AdapterError(f"{path.parent}: folder does not exist")
        torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
        tensors = {k: v.to(torch_dtype).contiguous() for k, v in self.tensors.items()}
        header = {"format_version": FORMAT_VERSION, "base_model": self.base_model, "dim": self.dim, "form": FORM,
                  "rank": self.r, "bias": False, "normalize": True, "dtype": dtype, "lora": self.settings,
                  CHECKSUM_KEY: tensors_sha256({k: v.numpy() for k, v in tensors.items()}), **self.metadata}
        data = save(tensors, metadata={METADATA_KEY: json.dumps(header, separators=(",", ":"))})
        try:
            with atomic_write(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise AdapterError(f"{path}: cannot write the adapter ({e.strerror or one_line(e)})") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QueryLora:
        """Read and check a LoRA file: the header (``adapter.model.read_header``), its ``lora`` entry, finite
        tensors matching the checksum, the training metadata's types. The encoder is built on first use."""
        from safetensors import SafetensorError, safe_open

        header = read_header(path)
        if header["form"] != FORM:
            raise AdapterError(f"{path}: a {header['form']} adapter, not a query LoRA")
        settings = header.get("lora")
        if not isinstance(settings, dict) or not isinstance(settings.get("target_modules"), list) or \
                not isinstance(settings.get("alpha"), int | float):
            raise AdapterError(f"{path}: adapter metadata is damaged (its 'lora' entry is missing or incomplete)")
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
        if header.get(CHECKSUM_KEY) != tensors_sha256({k: v.numpy() for k, v in tensors.items()}):
            raise AdapterError(f"{path}: its tensors do not match the checksum in its header (a file written only in "
                               "part, or damaged); write it again whole")
        bad = next((k for k, t in tensors.items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise AdapterError(f"{path}: tensor {bad!r} holds NaN or Inf values")
        extra = {k: v for k, v in header.items() if k not in (*_HEADER_KEYS, "lora")}
        check_training_meta(extra, str(path))
        return cls(header["dim"], header["base_model"], header["rank"], settings,
                   {k: v.float() for k, v in tensors.items()}, training_meta(extra))


_HEADER_KEYS = ("format_version", "base_model", "dim", "form", "rank", "bias", "normalize", "dtype", CHECKSUM_KEY)


def load_query_transform(path: str | os.PathLike) -> Any:
    """Either form of adapter file, loaded: a ``LinearAdapter`` (the map on query vectors) or a ``QueryLora``."""
    from adapter.model import LinearAdapter

    return QueryLora.load(path) if read_header(path)["form"] == FORM else LinearAdapter.load(path)


def checked_transform(adapter: Any, backend: Any, *, allow_other_model: bool = False) -> Any:
    """Either form of adapter (loaded when a path), refused in one line unless it fits the backend
    (``adapter.backends.Backend``): a ``LinearAdapter`` as ``adapter.model.checked_adapter`` checks it; a
    ``QueryLora`` also needs the model's weights here (a local sentence-transformers backend), and gets its query
    encoder built on that model now, so the first query does not pay for it. What the wings bolt on."""
    from adapter.model import LinearAdapter, checked_adapter

    if isinstance(adapter, LinearAdapter) or (not isinstance(adapter, QueryLora) and read_header(adapter)["form"]
                                              != FORM):
        return checked_adapter(adapter, backend, allow_other_model=allow_other_model)
    source = "adapter" if isinstance(adapter, QueryLora) else str(adapter)
    model = getattr(backend, "model", None)
    if backend.remote or model is None:
        raise AdapterError(f"{source}: a query LoRA (form 'lora') changes the encoder's weights, so it needs a local "
                           f"sentence-transformers model, not {backend.name}; use a linear adapter with a remote one")
    lora = adapter if isinstance(adapter, QueryLora) else QueryLora.load(adapter)
    lora.check_base_model(backend.identity, allow_other_model=allow_other_model, source=source)
    if lora.dim != backend.dim:
        raise AdapterError(f"{source}: a LoRA for dimension {lora.dim}, {backend.name} gives {backend.dim}")
    lora.query_model(model)
    return lora
