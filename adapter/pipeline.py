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

from adapter.config import default_dims
from adapter.data import Dataset, atomic_write, relevant
from adapter.encoder import Encoder
from adapter.errors import AdapterError
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
                     adapters: Mapping[str, LinearAdapter] | None = None,
                     corpus: tuple[Sequence[str], np.ndarray] | None = None) -> SystemResults:
    """Score the base model and each adapter on one split of a dataset at each dim.

    Returns ``{"base": {dim: metrics}, "<adapter name>": {...}, ...}``. Adapters change query vectors only, so every
    system searches the same cached corpus vectors, or, given ``corpus`` as (corpus ids, vectors) read from an
    existing index (``adapter.stores.corpus_from_store``), those vectors: the index is scored as it stands.
    """
    dims = resolve_dims(dims, encoder.dim)
    qrels = relevant(dataset.split(split))
    qids = list(qrels)
    if corpus is None:
        queries, vectors = embed_dataset(dataset, encoder, qids)
        cids = list(dataset.corpus)
    else:
        cids, vectors = list(corpus[0]), corpus[1]
        if vectors.shape[1] != encoder.dim:
            raise AdapterError(f"the index holds {vectors.shape[1]}-dimensional vectors, {encoder.identity} makes "
                               f"{encoder.dim}")
        queries = encoder.encode_queries([dataset.queries[q] for q in qids])
    results = {"base": evaluate(queries, vectors, qrels, qids, cids, dims)}
    for name, adapter in (adapters or {}).items():
        results[name] = evaluate(adapter.apply(queries), vectors, qrels, qids, cids, dims)
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


def evaluate_systems(dataset: Dataset, systems: Mapping[str, tuple[Encoder, LinearAdapter | None]], *,
                     split: str = "test", dims: Sequence[int] | None = None,
                     per_query: bool = False) -> SystemResults:
    """Score named systems that each bring their own encoder: base, adapters on it, fine-tuned or other models.

    A system is (encoder, adapter or None): it searches its encoder's cached corpus vectors with that encoder's query
    vectors, adapted when it has an adapter. Each is scored at the ``dims`` up to its encoder's dimension (none fit:
    its full dimension; default: its encoder's default dims). ``per_query=True`` gives per-query arrays, aligned
    across systems (see ``adapter.evaluate.evaluate``); ``mean_results`` turns them into the usual metrics.
    """
    qrels = relevant(dataset.split(split))
    qids, cids = list(qrels), list(dataset.corpus)
    results: SystemResults = {}
    for name, (encoder, adapter) in systems.items():
        queries, corpus = embed_dataset(dataset, encoder, qids)
        if adapter is not None:
            queries = adapter.apply(queries)
        fit = [d for d in dims if d <= encoder.dim] if dims else None
        if dims and len(fit) < len(dims):
            logger.info("%s: %d-dimensional, scored at %s only", name, encoder.dim, ",".join(map(str, fit)) or
                        encoder.dim)
        use = resolve_dims(fit or ([encoder.dim] if dims else None), encoder.dim)
        results[name] = evaluate(queries, corpus, qrels, qids, cids, use, per_query=per_query)
    return results


def mean_results(results: SystemResults) -> SystemResults:
    """Per-query results (``per_query=True``) averaged into the usual metrics."""
    return {s: {d: {m: float(np.mean(v)) for m, v in by_m.items()} for d, by_m in by_dim.items()}
            for s, by_dim in results.items()}


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
