"""adapter: make retrieval better on your own data without rebuilding your vector index.

The public API, each name loaded on first use (so ``import adapter.model`` stays numpy-only)::

    Config, AdapterError             the one defaults block (per-stage sections) and the one error type
    load_dataset, split_dataset      a dataset folder, and its query or chunk split
    Encoder                          a frozen sentence-transformers model whose embeddings are cached on disk
    train_adapter, LinearAdapter     train the query adapter; its one-file form
    evaluate_dataset, compare        score base and adapters; side by side with fine-tunes, costs and intervals
    AdaptedEncoder, open_store, search   query time: adapted queries against the index you already have

The full fine-tune is ``adapter.finetune.finetune`` and the sentence-transformers export ``adapter.export.export``
(their module names would shadow them here).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adapter.config import Config
from adapter.errors import AdapterError

_LAZY = {"load_dataset": "adapter.data", "split_dataset": "adapter.data", "Encoder": "adapter.encoder",
         "train_adapter": "adapter.choice", "LinearAdapter": "adapter.model", "evaluate_dataset": "adapter.pipeline",
         "compare": "adapter.pipeline", "AdaptedEncoder": "adapter.export", "open_store": "adapter.stores",
         "search": "adapter.pipeline"}

__all__ = ["Config", "AdapterError", "load_dataset", "split_dataset", "Encoder", "train_adapter", "LinearAdapter",
           "evaluate_dataset", "compare", "AdaptedEncoder", "open_store", "search"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from adapter.choice import train_adapter
    from adapter.data import load_dataset, split_dataset
    from adapter.encoder import Encoder
    from adapter.export import AdaptedEncoder
    from adapter.model import LinearAdapter
    from adapter.pipeline import compare, evaluate_dataset, search
    from adapter.stores import open_store


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'adapter' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
