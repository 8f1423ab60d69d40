"""Glue from a dataset folder to the judge: embed through the cache, build each system's vectors, evaluate.

Kept apart from ``evaluate.py`` so the judge itself only ever sees arrays.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from adapter.config import AdapterError, default_dims
from adapter.data import Dataset, atomic_write, relevant
from adapter.encoder import Encoder
from adapter.evaluate import Results, evaluate
from adapter.model import LinearAdapter

logger = logging.getLogger(__name__)

SystemResults = dict[str, Results]  # system name -> dim -> metric -> value


def resolve_dims(dims: Sequence[int] | None, full_dim: int) -> list[int]:
    """Validate requested Matryoshka dims against the model (default: full dim and the standard ones below)."""
    if not dims:
        return list(default_dims(full_dim))
    for d in dims:
        if d <= 0:
            raise AdapterError(f"--dims: {d} is not a positive dimension")
        if d > full_dim:
            raise AdapterError(f"--dims: {d} is above the model's dimension {full_dim}")
    return list(dict.fromkeys(dims))


def embed_dataset(dataset: Dataset, encoder: Encoder, query_ids: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cached (query vectors, corpus vectors) for the given queries (default: all) and the whole corpus."""
    qids = list(dataset.queries) if query_ids is None else list(query_ids)
    queries = encoder.encode_queries([dataset.queries[q] for q in qids])
    corpus = encoder.encode_documents([dataset.doc_text(c) for c in dataset.corpus])
    return queries, corpus


def evaluate_dataset(dataset: Dataset, encoder: Encoder, *, split: str = "test", dims: Sequence[int] | None = None,
                     adapters: Mapping[str, LinearAdapter] | None = None) -> SystemResults:
    """Score the base model and each adapter on one split of a dataset at each dim.

    Returns ``{"base": {dim: metrics}, "<adapter name>": {...}, ...}``. Adapters change query vectors only, so every
    system searches the same cached corpus vectors.
    """
    dims = resolve_dims(dims, encoder.dim)
    qrels = relevant(dataset.split(split))
    qids = list(qrels)
    queries, corpus = embed_dataset(dataset, encoder, qids)
    cids = list(dataset.corpus)
    results = {"base": evaluate(queries, corpus, qrels, qids, cids, dims)}
    for name, adapter in (adapters or {}).items():
        results[name] = evaluate(adapter.apply(queries), corpus, qrels, qids, cids, dims)
    return results


def load_adapters(paths: Sequence[str | os.PathLike], encoder: Encoder, *,
                  allow_other_model: bool = False) -> dict[str, LinearAdapter]:
    """Load adapter files as named systems (each named after its file's stem), checked against the encoder."""
    out: dict[str, LinearAdapter] = {}
    for p in paths:
        adapter = LinearAdapter.load(p)
        adapter.check_base_model(encoder.identity, allow_other_model=allow_other_model, source=str(p))
        if adapter.dim != encoder.dim:
            raise AdapterError(f"{p}: adapter is {adapter.dim}-dimensional, the model {encoder.dim}")
        name = Path(p).stem
        if name in out or name == "base":
            raise AdapterError(f"{p}: another system is already named {name!r}; rename the file")
        out[name] = adapter
    return out


def results_to_json(results: SystemResults) -> dict:
    """The JSON shape: ``{"<system>": {"<dim>": {"<metric>": value}}}``."""
    return {system: {str(d): dict(m) for d, m in by_dim.items()} for system, by_dim in results.items()}


def write_results(results: SystemResults, path: str | os.PathLike) -> Path:
    """Write results as JSON, atomically."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise AdapterError(f"{path.parent}: folder does not exist")
    with atomic_write(path) as f:
        json.dump(results_to_json(results), f, indent=2)
    return path
