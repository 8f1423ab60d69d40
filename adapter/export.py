"""Export an adapter for serving code that expects a sentence-transformers model, without touching the index.

``AdaptedEncoder`` wraps a base model and an adapter of either form on the query side only; ``export`` writes one
sentence-transformers model folder whose ``encode_query`` runs the adapted query route and whose ``encode_document``
is the untouched base, so vectors already in an index stay valid. A linear adapter becomes a stock ``Dense`` layer
after the base; a query LoRA (``adapter.lora``) becomes a copy of the encoder with the LoRA merged into its weights,
the query route's own.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adapter.backends import make_backend
from adapter.cards import model_card as card
from adapter.cards import pct_change
from adapter.config import DEFAULT_MODEL
from adapter.data import atomic_write
from adapter.encoder import load_model
from adapter.errors import AdapterError, refuse_existing
from adapter.model import LinearAdapter

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from adapter.lora import QueryLora

logger = logging.getLogger(__name__)


def load_transform(adapter: LinearAdapter | QueryLora | str | os.PathLike) -> LinearAdapter | QueryLora:
    """An adapter of either form, loaded when given as a path (``adapter.lora.load_query_transform``)."""
    if not isinstance(adapter, str | os.PathLike):
        return adapter
    from adapter.lora import load_query_transform

    return load_query_transform(adapter)


class AdaptedEncoder:
    """A sentence-transformers model with an adapter of either form on the query side only.

    ``encode_query`` returns adapted unit vectors (the linear map on the base's query vectors, or a LoRA's adapted
    encoder); ``encode_document`` returns the untouched base vectors, exactly those already in your index, so nothing
    is re-embedded.
    """

    def __init__(self, adapter: LinearAdapter | QueryLora | str | os.PathLike,
                 model: str | SentenceTransformer = DEFAULT_MODEL, *, allow_other_model: bool = False):
        self.adapter = load_transform(adapter)
        self.model = load_model(model) if isinstance(model, str) else model
        identity = make_backend(self.model, show_progress=False).identity  # as every encoder names its model
        source = str(adapter) if isinstance(adapter, str | os.PathLike) else "adapter"
        self.adapter.check_base_model(identity, allow_other_model=allow_other_model, source=source)
        # a LoRA's query encoder: the base with the LoRA merged (built here, once)
        self.query_model = self.adapter.query_model(self.model) if self.adapter.form == "lora" else None

    def encode_document(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Base document vectors, unit length (the index side: unchanged)."""
        return self.model.encode_document(texts, normalize_embeddings=True, convert_to_numpy=True, **kwargs)

    def encode_query(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Adapted query vectors, unit length."""
        if self.query_model is not None:
            return self.query_model.encode_query(texts, normalize_embeddings=True, convert_to_numpy=True, **kwargs)
        base = self.model.encode_query(texts, normalize_embeddings=True, convert_to_numpy=True, **kwargs)
        return self.adapter.apply(base)


CARD_METRICS = ("ndcg@10", "mrr@10", "map@100", "accuracy@1", "accuracy@10", "recall@10")  # rows of the model card


def adapted_model(adapter: LinearAdapter | QueryLora, base: SentenceTransformer) -> SentenceTransformer:
    """One sentence-transformers model with a Router: the document route is the base's own modules, untouched. For a
    linear adapter the query route is the base, normalised, then the adapter as a stock ``Dense`` layer (weight W,
    or I + UV for the low-rank form) and a ``Normalize``; both routes share the base modules, so the encoder is
    stored once. For a query LoRA the query route is its own copy of the encoder with the LoRA merged into the
    weights (``QueryLora.query_model``), then a ``Normalize``: the encoder is stored twice."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Router

    modules = list(base)
    if adapter.form == "lora":
        query = list(adapter.query_model(base))
        unit = [] if isinstance(query[-1], Normalize) else [Normalize()]  # encode_queries' unit vectors
        router = Router.for_query_document(query_modules=[*query, *unit], document_modules=modules)
    else:
        weight = adapter.weight if adapter.weight is not None else np.eye(adapter.dim) + adapter.U.astype(
            np.float64) @ adapter.V.astype(np.float64)  # x + (xU)V = x (I + UV)
        dense = Dense(adapter.dim, adapter.dim, bias=adapter.bias is not None,
                      activation_function=torch.nn.Identity(),
                      init_weight=torch.tensor(np.asarray(weight, np.float32).T.copy()),  # nn.Linear computes x Wᵀ
                      init_bias=None if adapter.bias is None else torch.tensor(adapter.bias, dtype=torch.float32))
        unit = [] if isinstance(modules[-1], Normalize) else [Normalize()]  # the adapter was trained on unit vectors
        router = Router.for_query_document(query_modules=[*modules, *unit, dense, Normalize()],
                                           document_modules=modules)
    return SentenceTransformer(modules=[router], prompts=dict(base.prompts),
                               default_prompt_name=base.default_prompt_name,
                               similarity_fn_name=base.similarity_fn_name, device=str(base.device))


def _form_lines(adapter: LinearAdapter | QueryLora, base_name: str) -> tuple[str, list[str]]:
    """The card's title and its first paragraph: what the query route is, and what it costs."""
    if adapter.form != "lora":
        form = f"rank {adapter.rank} (x + xUV)" if adapter.rank else f"full {adapter.dim}×{adapter.dim}"
        return (f"{base_name} with a query-only linear adapter",
                [f"Queries pass through `{base_name}`, then a {form} linear adapter, then L2 normalisation. Documents "
                 "pass through the untouched base model, so vectors already in an index built with the base stay "
                 "valid: nothing is re-embedded."])
    s = adapter.settings
    where = f"layers {', '.join(map(str, s['layers']))}" if s.get("layers") else "every layer"
    return (f"{base_name} with a query-side LoRA",
            [f"Queries pass through `{base_name}` with a LoRA (rank {adapter.r}, alpha {s['alpha']:g}, on "
             f"{', '.join(s['target_modules'])} of {where}) merged into its weights, then L2 normalisation. Documents "
             "pass through the untouched base model, so vectors already in an index built with the base stay valid: "
             "nothing is re-embedded.", "",
             "Costs: the query route is the base architecture with changed weights, so a query costs what a base query "
             "costs; this folder holds the encoder twice (the query copy and the untouched document copy), so it is "
             "about twice the base model on disk and in memory."])


def model_card(adapter: LinearAdapter | QueryLora, base_name: str) -> str:
    """A README.md for the exported folder: usage, the adapter's form (and its costs) and its validation metrics
    against base."""
    meta = adapter.metadata
    hub_id = base_name if not Path(base_name).exists() and "/" in base_name else None
    front = ["library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:",
             "- sentence-transformers", "- query-adapter", *(["- lora"] if adapter.form == "lora" else []),
             *([f"base_model: {hub_id}"] if hub_id else [])]
    title, lines = _form_lines(adapter, base_name)
    lines += ["", "```python", "from sentence_transformers import SentenceTransformer", "",
              "model = SentenceTransformer(\"PATH_OR_REPO\")", "queries = model.encode_query([\"...\"])      "
              "# adapted", "documents = model.encode_document([\"...\"])  # the base model's own vectors", "```", "",
              f"Adapter trained on {meta.get('trained_on', 'unknown')} queries (data fingerprint "
              f"`{meta.get('data_fingerprint', 'unknown')}`), base encoder `{adapter.base_model}`."]
    base_val, adapted_val = ((meta.get(k) or {}).get(adapter.dim) for k in ("val_base", "val_best"))
    if base_val and adapted_val:
        lines += ["", f"## Validation metrics ({meta.get('validation', 'held-out queries')}, epoch "
                      f"{meta.get('best_epoch', '?')} kept)", "", "| metric | base | adapter | change |",
                  "|---|---|---|---|"]
        for m in CARD_METRICS:
            if m in base_val and m in adapted_val:
                b, a = base_val[m], adapted_val[m]
                lines.append(f"| {m} | {b:.4f} | {a:.4f} | {pct_change(a, b)} |")
    config = meta.get("config") or {}
    if adapter.form == "lora":
        config = {**config.get("lora", {}), "seed": config.get("seed")}
        keys = ("r", "alpha", "epochs", "lr", "batch_size", "seed")
    else:
        config = {**config.get("train", config), "seed": config.get("seed")}  # files before sections were flat
        keys = ("loss", "negatives", "epochs", "lr", "batch_size", "margin", "rank", "identity_penalty", "seed")
    if any(config.get(k) is not None for k in keys):
        lines += ["", "## Training", "", ", ".join(f"{k} {config[k]}" for k in keys if config.get(k) is not None)
                  + "."]
    return card(front, title, lines)


def export(adapter_path: str | os.PathLike, out: str | os.PathLike, *, model: str = DEFAULT_MODEL,
           allow_other_model: bool = False, force: bool = False) -> Path:
    """Write a sentence-transformers model folder (``adapted_model``) for an adapter file of either form, with a
    model card and the adapter file itself; built in a temporary folder beside ``out`` and renamed into place."""
    out = Path(os.path.abspath(out))
    refuse_existing(out, force)
    if Path.cwd() == out or out in Path.cwd().parents:
        raise AdapterError(f"{out}: is the current folder or holds it; choose another --out folder")
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    if not out.parent.is_dir():
        raise AdapterError(f"{out.parent}: folder does not exist")
    encoder = AdaptedEncoder(adapter_path, model, allow_other_model=allow_other_model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the folder into place
        adapted_model(encoder.adapter, encoder.model).save(str(tmp), create_model_card=False)
        with atomic_write(tmp / "README.md") as f:
            f.write(model_card(encoder.adapter, encoder.adapter.metadata.get("base_model_name") or model))
        shutil.copyfile(adapter_path, tmp / "adapter.safetensors")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s with %s to %s", adapter_path, model, out)
    return out
