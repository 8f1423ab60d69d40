"""One notion of a system, built in one place and scored by one function.

A system is what turns a question into a ranking: an encoder that embeds the queries, an optional query transform (a
``LinearAdapter`` on its query vectors, or a ``QueryLora`` that encodes the queries through the adapted encoder
itself), and where its corpus vectors come from (a ``CorpusSource``: the encoder's cached encoding of
corpus.jsonl, or vectors read out of an existing store or file). ``build_systems`` makes the named systems every
command scores (base, each adapter on it, each fine-tuned folder, each other model) with the checks they all need;
``score`` runs the one judge over them. `adapter evaluate`, `adapter compare`, the demo and the benchmarks all go
through these two.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapter.config import Config, EvaluateConfig, RerankConfig, default_dims
from adapter.corpus import CorpusSource, EncodedCorpus, SearchedStore
from adapter.data import Dataset, relevant
from adapter.errors import AdapterError
from adapter.evaluate import TOP_K, Reorder, Results, evaluate, evaluate_ranked, resolve_dims
from adapter.lora import QueryLora, load_query_transform
from adapter.model import LinearAdapter, read_finetune_meta

if TYPE_CHECKING:
    from adapter.encoder import Encoder
    from adapter.rerank import Reranker

logger = logging.getLogger(__name__)

SystemResults = dict[str, Results]  # system name -> dim -> metric -> value


@dataclass
class System:
    """One named system: query encoder, optional query transform, corpus source, and what it was made from."""

    name: str
    encoder: Encoder  # embeds the queries (and, with EncodedCorpus, the corpus)
    transform: LinearAdapter | QueryLora | None = None  # on the query side only; documents stay the base's
    corpus: CorpusSource = field(default_factory=EncodedCorpus)
    kind: str = "base"  # "base", "adapter", "fine-tune" or "model"
    source: str = ""  # the adapter file, model folder or model name
    meta: dict[str, Any] = field(default_factory=dict)  # the artifact's training metadata (see adapter.model)
    reranker: Reranker | None = None  # a second stage: a cross-encoder reordering the top rerank_k (kind "rerank")
    rerank_k: int = RerankConfig.k  # first-stage candidates the reranker reorders
    first_stage: str | None = None  # reranked systems: the name of the system whose list is reordered

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """The vectors this system searches with: cached query vectors, through the transform when there is one; a
        query LoRA's from its adapted encoder (not cached: the questions of one run, encoded once)."""
        if isinstance(self.transform, QueryLora):
            return self.transform.encode_queries(texts, self.encoder.model)
        q = self.encoder.encode_queries(texts)
        return self.transform.apply(q) if self.transform is not None else q


def _add(systems: dict[str, System], system: System) -> None:
    if system.name in systems:
        raise AdapterError(f"{system.source}: another system is already named {system.name!r}; rename it")
    systems[system.name] = system


def build_systems(cfg: Config | None = None, *, encoder: Encoder | None = None,
                  adapters: Mapping[str, LinearAdapter | QueryLora | str | os.PathLike]
                  | Sequence[str | os.PathLike] = (),
                  finetuned: Sequence[str | os.PathLike] = (), models: Sequence[str] = (),
                  corpus: CorpusSource | None = None, allow_other_model: bool = False,
                  reranker: Reranker | str | os.PathLike | None = None, rerank_k: int | None = None,
                  progress: bool = True) -> dict[str, System]:
    """The named systems to score, in order: ``base`` (``encoder``, default ``cfg.encoder``), each adapter on it
    (files of either form named after their stem, or given as ``{name: adapter or file}``), each fine-tuned model
    folder (named after the folder) and each other model (named after its last path part).

    Base and its adapters search ``corpus`` (default: the base encoder's cached corpus.jsonl); fine-tuned and other
    models always embed corpus.jsonl themselves. Adapters are checked against the base model and dimension. With a
    ``reranker`` (loaded, or a folder loaded here, last), each of those follows again as ``<name>+rerank``: its top
    ``rerank_k`` (default ``cfg.rerank.k``) reordered by the cross-encoder.
    """
    from adapter.encoder import Encoder

    cfg = cfg or Config()
    for folder in finetuned:
        if not Path(folder).is_dir():
            raise AdapterError(f"{folder}: no such model folder")
    base = encoder or Encoder.from_config(cfg, show_progress=progress)
    corpus = corpus or EncodedCorpus()
    systems = {"base": System("base", base, corpus=corpus, kind="base", source=base.name)}
    named = adapters.items() if isinstance(adapters, Mapping) else ((Path(p).stem, p) for p in adapters)
    for name, given in named:
        adapter = given if isinstance(given, LinearAdapter | QueryLora) else load_query_transform(given)
        source = name if isinstance(given, LinearAdapter | QueryLora) else str(given)
        if isinstance(adapter, QueryLora) and base.model is None:
            raise AdapterError(f"{source}: a query LoRA runs the encoder's own weights; {base.name} is a remote "
                               "model, so only a linear adapter applies to it")
        adapter.check_base_model(base.identity, allow_other_model=allow_other_model, source=source)
        if adapter.dim != base.dim:
            raise AdapterError(f"{source}: adapter is {adapter.dim}-dimensional, the model {base.dim}")
        _add(systems, System(name, base, adapter, corpus, "adapter", source, adapter.metadata))
    for folder in finetuned:
        meta = read_finetune_meta(folder)
        enc = Encoder.from_config(cfg.replace(encoder={"model": str(folder)}), show_progress=progress)
        _add(systems, System(Path(folder).resolve().name, enc, kind="fine-tune", source=str(folder), meta=meta))
    for m in models:
        enc = Encoder.from_config(cfg.replace(encoder={"model": m}), show_progress=progress)
        _add(systems, System(m.rstrip("/").split("/")[-1], enc, kind="model", source=m))
    if isinstance(reranker, str | os.PathLike):
        from adapter.rerank import load_reranker

        reranker = load_reranker(reranker, cfg)
    if reranker is not None:
        k = rerank_k or cfg.rerank.k
        for name, s in list(systems.items()):
            _add(systems, System(f"{name}+rerank", s.encoder, s.transform, s.corpus, "rerank", reranker.source,
                                 reranker.meta, reranker.for_first_stage(s.kind, s.source), k, first_stage=name))
    return systems


def score(dataset: Dataset, systems: Mapping[str, System], *, split: str = EvaluateConfig.split,
          dims: Sequence[int] | None = None, per_query: bool = False) -> SystemResults:
    """Score every system on one split with the one judge: ``{name: {dim: {metric: value}}}``.

    ``dims`` (checked against the largest model) are scored up to each system's dimension (none fit: its full
    dimension); default: every standard dim of any system's model, each system at those it reaches.
    ``per_query=True`` gives per-query arrays aligned across systems (see ``adapter.evaluate.evaluate``);
    ``mean_results`` turns them into the usual metrics.
    """
    qrels = relevant(dataset.split(split))
    qids = list(qrels)
    texts = [dataset.queries[q] for q in qids]
    widest = max(s.encoder.dim for s in systems.values())
    wanted = resolve_dims(dims, widest) if dims else sorted(
        {d for s in systems.values() for d in default_dims(s.encoder.dim)}, reverse=True)
    results: SystemResults = {}
    for name, system in systems.items():
        if isinstance(system.corpus, SearchedStore):  # the store ranks, at its own dimension; the judge scores
            ranked = system.corpus.rank(dataset, system.encode_queries(texts), TOP_K)
            results[name] = {system.corpus.dim: evaluate_ranked(ranked, qrels, qids, per_query=per_query)}
            continue
        full = system.encoder.dim
        fit = [d for d in wanted if d <= full] or [full]
        if dims and len(fit) < len(wanted):
            logger.info("%s: %d-dimensional, scored at %s only", name, full, ",".join(map(str, fit)))
        cids, corpus = system.corpus.read(dataset, system.encoder)  # first: a bad store costs no query embedding
        queries = system.encode_queries(texts)
        results[name] = evaluate(queries, corpus, qrels, qids, cids, fit, per_query=per_query,
                                 rerank=second_stage(system, dataset, cids))
    return results


def second_stage(system: System, dataset: Dataset, corpus_ids: Sequence[str]) -> Reorder | None:
    """The judge's second stage for a reranked system, over its corpus rows (``corpus_ids``); None for the others."""
    if system.reranker is None:
        return None
    from adapter.rerank import list_reranker

    return list_reranker(system.reranker, dataset, system.rerank_k, corpus_ids)


def mean_results(results: SystemResults) -> SystemResults:
    """Per-query results (``per_query=True``) averaged into the usual metrics."""
    return {s: {d: {m: float(np.mean(v)) for m, v in by_m.items()} for d, by_m in by_dim.items()}
            for s, by_dim in results.items()}


def results_to_json(results: SystemResults) -> dict:
    """The JSON shape: ``{"<system>": {"<dim>": {"<metric>": value}}}``."""
    return {system: {str(d): dict(m) for d, m in by_dim.items()} for system, by_dim in results.items()}

