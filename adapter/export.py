"""Export an adapter for serving code that expects a sentence-transformers model, without touching the index.

``AdaptedEncoder`` wraps a base model and an adapter on the query side only; ``export`` writes one
sentence-transformers model folder whose ``encode_query`` applies the adapter and whose ``encode_document`` is the
untouched base, so vectors already in an index stay valid.
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

logger = logging.getLogger(__name__)


class AdaptedEncoder:
    """A sentence-transformers model with an adapter on the query side only.

    ``encode_query`` returns adapted unit vectors; ``encode_document`` returns the untouched base vectors, exactly
    those already in your index, so nothing is re-embedded.
    """

    def __init__(self, adapter: LinearAdapter | str | os.PathLike, model: str | SentenceTransformer = DEFAULT_MODEL,
                 *, allow_other_model: bool = False):
        self.adapter = adapter if isinstance(adapter, LinearAdapter) else LinearAdapter.load(adapter)
        self.model = load_model(model) if isinstance(model, str) else model
        identity = make_backend(self.model, show_progress=False).identity  # as every encoder names its model
        source = str(adapter) if not isinstance(adapter, LinearAdapter) else "adapter"
        self.adapter.check_base_model(identity, allow_other_model=allow_other_model, source=source)

    def encode_document(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Base document vectors, unit length (the index side: unchanged)."""
        return self.model.encode_document(texts, normalize_embeddings=True, convert_to_numpy=True, **kwargs)

    def encode_query(self, texts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Adapted query vectors, unit length."""
        base = self.model.encode_query(texts, normalize_embeddings=True, convert_to_numpy=True, **kwargs)
        return self.adapter.apply(base)


CARD_METRICS = ("ndcg@10", "mrr@10", "map@100", "accuracy@1", "accuracy@10", "recall@10")  # rows of the model card


def adapted_model(adapter: LinearAdapter, base: SentenceTransformer) -> SentenceTransformer:
    """One sentence-transformers model with a Router: the query route is the base, normalised, then the adapter as a
    stock ``Dense`` layer (weight W, or I + UV for the low-rank form) and a ``Normalize``; the document route is the
    base's own modules, untouched. Both routes share the base modules, so the encoder is stored once."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Router

    modules = list(base)
    weight = adapter.weight if adapter.weight is not None else np.eye(adapter.dim) + adapter.U.astype(
        np.float64) @ adapter.V.astype(np.float64)  # x + (xU)V = x (I + UV)
    dense = Dense(adapter.dim, adapter.dim, bias=adapter.bias is not None, activation_function=torch.nn.Identity(),
                  init_weight=torch.tensor(np.asarray(weight, np.float32).T.copy()),  # nn.Linear computes x Wᵀ
                  init_bias=None if adapter.bias is None else torch.tensor(adapter.bias, dtype=torch.float32))
    unit = [] if isinstance(modules[-1], Normalize) else [Normalize()]  # the adapter was trained on unit vectors
    router = Router.for_query_document(query_modules=[*modules, *unit, dense, Normalize()], document_modules=modules)
    return SentenceTransformer(modules=[router], prompts=dict(base.prompts),
                               default_prompt_name=base.default_prompt_name,
                               similarity_fn_name=base.similarity_fn_name, device=str(base.device))


def model_card(adapter: LinearAdapter, base_name: str) -> str:
    """A README.md for the exported folder: usage, the adapter's form and its validation metrics against base."""
    meta = adapter.metadata
    hub_id = base_name if not Path(base_name).exists() and "/" in base_name else None
    form = f"rank {adapter.rank} (x + xUV)" if adapter.rank else f"full {adapter.dim}×{adapter.dim}"
    front = ["library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:",
             "- sentence-transformers", "- query-adapter", *([f"base_model: {hub_id}"] if hub_id else [])]
    lines = [f"Queries pass through `{base_name}`, then a {form} linear adapter, then L2 normalisation. Documents "
             "pass through the untouched base model, so vectors already in an index built with the base stay valid: "
             "nothing is re-embedded.", "", "```python", "from sentence_transformers import SentenceTransformer", "",
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
    config = {**config.get("train", config), "seed": config.get("seed")}  # files before sections were flat
    keys = ("loss", "negatives", "epochs", "lr", "batch_size", "margin", "rank", "identity_penalty", "seed")
    if config:
        lines += ["", "## Training", "", ", ".join(f"{k} {config[k]}" for k in keys if config.get(k) is not None)
                  + "."]
    return card(front, f"{base_name} with a query-only linear adapter", lines)


def export(adapter_path: str | os.PathLike, out: str | os.PathLike, *, model: str = DEFAULT_MODEL,
           allow_other_model: bool = False, force: bool = False) -> Path:
    """Write a sentence-transformers model folder (``adapted_model``) with a model card and the adapter file itself;
    built in a temporary folder beside ``out`` and renamed into place."""
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
