"""The orchestration verbs: what a command does, as a library call.

``evaluate_dataset`` scores base and adapters on a split (corpus vectors from the cache, or read out of an existing
store); ``compare`` scores base, adapters, fine-tunes and other models side by side, measures what each costs, draws
the paired bootstrap intervals and writes the report; ``search`` sends adapted queries to an existing store. Systems
are built by ``adapter.systems.build_systems`` and scored by ``adapter.systems.score``; rendering is
``adapter.report``'s. Nothing here prints.
"""

from __future__ import annotations

import json
import logging
import os
import time
import timeit
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapter import safejson
from adapter.config import Config, ReportConfig
from adapter.corpus import CorpusSource, SearchedStore
from adapter.data import Dataset, atomic_write, fingerprint, relevant, replace_folder
from adapter.diagnose import insights
from adapter.errors import AdapterError, refuse_existing
from adapter.evaluate import PRIMARY_METRIC, TOP_K, paired_bootstrap
from adapter.lora import QueryLora, load_query_transform
from adapter.model import LinearAdapter
from adapter.report import Comparison, SystemInfo
from adapter.systems import (
    System,
    SystemResults,
    build_systems,
    mean_results,
    results_to_json,
    score,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from adapter.encoder import Encoder
    from adapter.rerank import Reranker
    from adapter.rerank_train import RerankResult
    from adapter.stores import Hits, Store

logger = logging.getLogger(__name__)

COMPARE_FILES = ("report.md", "report.html", "results.json", "summary.json", "ndcg_by_dim.png", "training_curves.png")


def embed_dataset(dataset: Dataset, encoder: Encoder, query_ids: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cached (query vectors, corpus vectors) for the given queries (default: all) and the whole corpus."""
    qids = list(dataset.queries) if query_ids is None else list(query_ids)
    queries = encoder.encode_queries([dataset.queries[q] for q in qids])
    corpus = encoder.encode_documents([dataset.doc_text(c) for c in dataset.corpus])
    return queries, corpus


def evaluate_dataset(dataset: Dataset, cfg: Config | None = None, *, encoder: Encoder | None = None,
                     adapters: Mapping[str, LinearAdapter | QueryLora | str | os.PathLike]
                     | Sequence[str | os.PathLike] = (),
                     corpus: CorpusSource | None = None,
                     allow_other_model: bool = False, reranker: Reranker | str | os.PathLike | None = None
                     ) -> SystemResults:
    """Score the base model (``encoder``, default ``cfg.encoder``) and each adapter on ``cfg.evaluate.split`` at
    ``cfg.evaluate.dims``: ``{"base": {dim: metrics}, "<adapter name>": {...}}``.

    Adapters change query vectors only, so every system searches the same corpus vectors: the cached encoding of
    corpus.jsonl, or the ``corpus`` source given (``adapter.corpus.StoreSource``: every vector read out of an existing
    index or a vector file, scored as it stands). With a
    ``reranker`` (loaded, or its folder) each is scored again as ``<name>+rerank``, its top ``cfg.rerank.k``
    reordered.
    """
    cfg = cfg or Config()
    split = cfg.evaluate.split
    dataset.split(split)  # fail on a missing split before loading a model
    systems = build_systems(cfg, encoder=encoder, adapters=adapters, corpus=corpus,
                            allow_other_model=allow_other_model, reranker=reranker)
    return score(dataset, systems, split=split, dims=cfg.evaluate.dims)


def rerank_train(dataset: Dataset, out: str | os.PathLike, cfg: Config | None = None, *,
                 adapter: str | os.PathLike | None = None, progress: bool = True) -> RerankResult:
    """Fine-tune a cross-encoder reranker for a first stage: base (``cfg.encoder``), or ``adapter`` on it, built the
    one way systems are built; hard negatives are mined from its lists (see ``adapter.rerank_train.rerank_train``)."""
    from adapter import rerank
    from adapter import rerank_train as trainer

    cfg = cfg or Config()
    if adapter is not None and not Path(adapter).is_file():
        raise AdapterError(f"{adapter}: no such adapter file")

    systems: dict[str, System] = {}

    def stage(name: str) -> trainer.FirstStage:
        def vectors(qids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:  # built once the cheap checks passed
            if not systems:
                systems.update(build_systems(cfg, adapters={"first stage": adapter} if adapter else (),
                                             progress=progress))
            system = systems[name]
            _, corpus = system.corpus.read(dataset, system.encoder)  # the cached encoding of corpus.jsonl, in order
            return system.encode_queries([dataset.queries[q] for q in qids]), corpus
        return vectors

    def key(kind: str, src: str) -> str:
        return rerank.stage_key(kind, src) or f"{kind}:{src}"

    source = {"first_stage": cfg.encoder.model, "adapter": str(adapter) if adapter else None,
              "adapter_sha": rerank.file_sha(adapter) if adapter else None,
              "key": key("adapter", str(adapter)) if adapter else key("base", cfg.encoder.model)}
    also = {key("base", cfg.encoder.model): stage("base")} if adapter else {}  # base gets its own fusion weight
    return trainer.rerank_train(dataset, out, cfg, stage("first stage" if adapter else "base"), source, also=also,
                               progress=progress)


@dataclass
class StoreSearch:
    """``evaluate --store-search``: each system scored on the store's own top-``depth`` ids (at the store's dimension
    only), and, over ``sample`` queries, recall@10 of the store's search against its exact search."""

    results: SystemResults
    store: str
    dim: int
    depth: int
    sample: int
    recall_at_10: dict[str, float]  # system -> mean over the sampled queries


def evaluate_store_search(dataset: Dataset, store: Store, cfg: Config | None = None, *,
                          encoder: Encoder | None = None,
                          adapters: Mapping[str, LinearAdapter | QueryLora | str | os.PathLike]
                     | Sequence[str | os.PathLike] = (),
                          allow_other_model: bool = False) -> StoreSearch:
    """Score base and adapters through ``store``'s own search: adapted query vectors in, top-100 ids out, no vector
    read out of the store, so an index too large to read out is scored as it serves. Ids name chunks as
    ``adapter.stores.hit_names`` does; hits naming no chunk count as misses. The systems are scored by
    ``adapter.systems.score`` (their corpus source an ``adapter.corpus.SearchedStore``)."""
    cfg = cfg or Config()
    split = cfg.evaluate.split
    qrels = relevant(dataset.split(split))
    texts = [dataset.queries[q] for q in qrels]
    systems = build_systems(cfg, encoder=encoder, adapters=adapters, corpus=SearchedStore(store, cfg.store.id_field),
                            allow_other_model=allow_other_model)
    base = systems["base"].encoder
    if store.dim != base.dim:
        raise AdapterError(f"{store.name} holds {store.dim}-dimensional vectors, {base.identity} makes {base.dim}")
    results = score(dataset, systems, split=split)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(len(texts), min(cfg.store.search_sample, len(texts)), replace=False))
    recall: dict[str, float] = {}
    for name, system in systems.items():
        if len(sample):
            queries = system.encode_queries(texts)[sample]
            hits = store.search(queries, TOP_K, id_field=cfg.store.id_field)  # as scored: the same depth
            exact = store.exact_search(queries, 10, id_field=cfg.store.id_field)
            recall[name] = float(np.mean([len(set(h.ids[:10]) & set(e.ids)) / max(len(e.ids), 1)
                                          for h, e in zip(hits, exact, strict=True)]))
        logger.info("%s through %s: %s %.4f", name, store.name, PRIMARY_METRIC,
                    results[name][store.dim][PRIMARY_METRIC])
    return StoreSearch(results, store.name, store.dim, TOP_K, len(sample), recall)


def write_results(results: SystemResults, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write results as JSON (``results_to_json``), atomically; an existing file is replaced only with ``force``."""
    refuse_existing(path, force)
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise AdapterError(f"{path.parent}: folder does not exist")
    try:
        with atomic_write(path) as f:
            json.dump(results_to_json(results), f, indent=2)
    except OSError as e:  # a full disk: the temporary file is gone, an older file at ``path`` untouched
        raise AdapterError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def search(queries: str | Sequence[str], store: Store, adapter: LinearAdapter | QueryLora | str | os.PathLike,
           cfg: Config | None = None, *, allow_other_model: bool = False) -> list[Hits]:
    """Top ``cfg.store.k`` hits of an existing store for each query, through the adapter (either form): only the
    queries are embedded (base model ``cfg.encoder.model``, local or ``openai:NAME``; a query LoRA needs it local),
    and the store's own ids come back."""
    from adapter.encoder import Encoder

    cfg = cfg or Config()
    texts = [queries] if isinstance(queries, str) else list(queries)
    loaded = isinstance(adapter, LinearAdapter | QueryLora)
    transform = adapter if loaded else load_query_transform(adapter)
    encoder = Encoder.from_config(cfg, show_progress=False)
    transform.check_base_model(encoder.identity, allow_other_model=allow_other_model,
                               source="adapter" if loaded else str(adapter))
    if isinstance(transform, QueryLora):
        if encoder.model is None:
            raise AdapterError(f"{adapter}: a query LoRA runs the encoder's own weights; {encoder.name} is a remote "
                               "model, so only a linear adapter applies to it")
        vectors = transform.encode_queries(texts, encoder.model)
    else:
        vectors = transform.apply(encoder.backend.embed(texts, "query"))  # live queries: not worth caching
    return store.search(vectors, cfg.store.k, id_field=cfg.store.id_field)


# ---------------------------------------------------------------------------------------------------------- compare


def training_curves(meta: dict[str, Any]) -> dict[str, list] | None:
    """Validation ndcg@10 at the full dim by epoch, and the training loss, from an artifact's training metadata
    (adapter file or finetune.json, one schema: see adapter.model); None when it records none."""
    hist = meta.get("history") or {}
    if not hist.get("val") or meta.get("recipe") == "identity":  # the identity trained nothing: no curve of its own
        return None
    full = max(hist["val"][0][PRIMARY_METRIC])
    return {"val_epoch": [r["epoch"] for r in hist["val"]], "val": [r[PRIMARY_METRIC][full] for r in hist["val"]],
            "loss_epoch": [r["epoch"] for r in hist.get("loss", [])], "loss": [r["loss"] for r in hist.get("loss", [])]}


def _weights_bytes(encoder: Encoder) -> int:
    """Bytes of weights held here (0 for a remote model: its weights are the provider's)."""
    if encoder.model is None:
        return 0
    return sum(t.numel() * t.element_size() for t in encoder.model.state_dict().values())


LATENCY_CLOCK = time.perf_counter  # the clock latencies are read from (tests put a scripted one here)
APPLY_CALLS = 100  # adapter products per timing: one takes microseconds, below what a single reading resolves


def _best_seconds(call: Callable[[], Any], repeats: int, number: int = 1) -> float:
    """Seconds per call: the best of ``repeats`` timings of ``number`` calls each (timeit's rule: whatever else runs
    on the machine only adds time, so the least disturbed timing is the closest to the cost itself)."""
    return min(timeit.Timer(call, timer=LATENCY_CLOCK).repeat(repeat=repeats, number=number)) / number


def _encode_seconds(encoder: Encoder, texts: Sequence[str], repeats: int,
                    model: SentenceTransformer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seconds to embed each query on its own, warm (every text embedded once untimed first), best of ``repeats``
    rounds over all of them (a query's timings spread out in time: a burst of other work cannot spoil them all); and
    the vectors. ``model``: a local model to time instead of the encoder's (a query LoRA's adapted encoder)."""
    kw = {"normalize_embeddings": True, "convert_to_numpy": True, "show_progress_bar": False}
    model = model if model is not None else encoder.model
    if model is not None:
        embed = lambda text: model.encode_query([text], **kw)[0]  # noqa: E731
    else:  # a remote model: the round trip is the latency
        embed = lambda text: encoder.backend.embed([text], "query")[0]  # noqa: E731
    vectors = np.array([embed(text) for text in texts], dtype=np.float32)  # the warm-up
    rounds = [[_best_seconds(lambda t=text: embed(t), 1) for text in texts] for _ in range(repeats)]
    return np.min(rounds, axis=0), vectors


def _apply_seconds(adapter: LinearAdapter, vectors: np.ndarray, repeats: int) -> np.ndarray:
    """Seconds the adapter alone adds to each query (its product on one vector, warm), best of ``repeats``."""
    adapter.apply(vectors[:1])
    return np.array([_best_seconds(lambda v=v[None, :]: adapter.apply(v), repeats, APPLY_CALLS) for v in vectors])


def _rerank_ms(reranker: Reranker, texts: Sequence[str], chunks: Sequence[str]) -> float:
    """Median milliseconds to score one question against the candidate ``chunks``, uncached, after a warm-up."""
    reranker.seconds_per_query(texts[0], chunks)
    return float(np.median([reranker.seconds_per_query(t, chunks) for t in texts]) * 1000)


def _costs(systems: Mapping[str, System], texts: Sequence[str], chunks: Sequence[str] = (), *,
           repeats: int = ReportConfig.latency_repeats) -> dict[str, SystemInfo]:
    """What each system costs: training time, artifact size, re-embedding, single-query latency (uncached, warm, the
    median over ``texts`` of each one's best of ``repeats``; an adapter's own product beside it); a reranked system
    adds its first stage's latency to reranking ``rerank_k`` of ``chunks`` (real corpus chunks)."""
    timed: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # one timing per encoder, shared by its adapters
    infos: dict[str, SystemInfo] = {}
    rerank_ms: dict[int, float] = {}  # one timing per reranker
    for name, s in systems.items():
        if s.reranker is not None:
            if id(s.reranker.model) not in rerank_ms:  # one model behind each first stage's fusion weight
                rerank_ms[id(s.reranker.model)] = _rerank_ms(s.reranker, texts, chunks[:s.rerank_k])
            first, ms = infos[s.first_stage], rerank_ms[id(s.reranker.model)]
            infos[name] = SystemInfo(s.kind, s.source, s.meta.get("train_seconds"), s.reranker.weight_bytes,
                                     first.reembed, first.latency_ms + ms, rerank_ms=ms)  # curves: its card
            continue
        if id(s.encoder) not in timed:
            timed[id(s.encoder)] = _encode_seconds(s.encoder, texts, repeats)
        seconds, vectors = timed[id(s.encoder)]
        ms = float(np.median(seconds) * 1000)
        own = None
        if isinstance(s.transform, QueryLora):  # its own encoder, merged: timed whole, in place of the base's
            seconds = _encode_seconds(s.encoder, texts, repeats, s.transform.query_model(s.encoder.model))[0]
            ms = float(np.median(seconds) * 1000)
            size = Path(s.source).stat().st_size if Path(s.source).is_file() else \
                sum(t.numel() * t.element_size() for t in s.transform.tensors.values())
        elif s.transform is not None:
            own = float(np.median(_apply_seconds(s.transform, vectors, repeats)) * 1000)
            size = (Path(s.source).stat().st_size if Path(s.source).is_file()
                    else sum(t.nbytes for t in s.transform.tensors().values()))
        else:
            size = _weights_bytes(s.encoder)
        infos[name] = SystemInfo(s.kind, s.source, s.meta.get("train_seconds"), size, s.kind in ("fine-tune", "model"),
                                 ms + (own or 0.0), training_curves(s.meta), adapter_ms=own,
                                 identity=s.meta.get("recipe") == "identity")
    return infos


def _check_trained_on(dataset: Dataset, meta: dict[str, Any], source: str) -> None:
    """Warn when a system was trained on other data than this dataset's training split (its score may then be
    inflated by test queries it saw, or simply not comparable)."""
    split, fp = meta.get("trained_on"), meta.get("data_fingerprint")
    if split and fp and split in dataset.qrels and fingerprint(dataset, split) != fp:
        logger.warning("%s was trained on other data than %s's %s split", source, dataset.path, split)


def compare(dataset: Dataset, out: str | os.PathLike, cfg: Config | None = None, *,
            adapters: Sequence[str | os.PathLike] = (), finetuned: Sequence[str | os.PathLike] = (),
            models: Sequence[str] = (), allow_other_model: bool = False, force: bool = False,
            reranker: Reranker | str | os.PathLike | None = None, rag: str | os.PathLike | None = None,
            progress: bool = True, corpus: CorpusSource | None = None) -> Comparison:
    """Score base (``cfg.encoder.model``), each adapter on it, each fine-tuned model folder and each other model on
    ``cfg.evaluate.split`` at every dim; measure what each costs; write ``report.md``, ``results.json`` (the shape of
    `adapter evaluate --json`), ``summary.json`` (costs and intervals) and PNG plots into ``out``.

    Systems are named ``base``, then after the adapter file's stem, the model folder's name or the model's name.
    An ``out`` that already holds any of these files is refused without ``force`` (checked before any model is
    loaded); the files are written as one unit (beside ``out``, then swapped in: a failure leaves it as it was, and
    other files in it are kept).
    With a ``reranker`` (loaded, or its folder) each system is scored
    again as ``<system>+rerank`` (top ``cfg.rerank.k`` reordered), with its change over its own first stage and the
    reranking's latency; ``rag``: a ``rag.json`` from `adapter rag`, whose answer accuracy joins the report.
    ``corpus``: where base and its adapters find the corpus vectors (e.g. ``adapter.corpus.StoreSource``; fine-tuned
    and other models embed corpus.jsonl).
    """
    from adapter import report

    cfg = cfg or Config()
    rag_summary = read_rag(rag) if rag is not None else None
    plt = report.require_matplotlib()
    qrels = relevant(dataset.split(cfg.evaluate.split))
    out = Path(out)
    check_compare_out(out, force)
    systems = build_systems(cfg, adapters=adapters, finetuned=finetuned, models=models, corpus=corpus,
                            allow_other_model=allow_other_model, reranker=reranker, progress=progress)
    for s in systems.values():
        _check_trained_on(dataset, s.meta, s.source)

    per_query = score(dataset, systems, split=cfg.evaluate.split, dims=cfg.evaluate.dims, per_query=True)
    results = mean_results(per_query)
    intervals = {s: {d: paired_bootstrap(per_query["base"][d][PRIMARY_METRIC], per_query[s][d][PRIMARY_METRIC],
                                         samples=cfg.report.bootstrap_samples, seed=cfg.seed,
                                         level=cfg.report.level)
                     for d in per_query[s] if d in per_query["base"]}
                 for s in systems if s != "base"}
    rerank_gain = {name: {d: paired_bootstrap(per_query[s.first_stage][d][PRIMARY_METRIC],
                                              per_query[name][d][PRIMARY_METRIC], samples=cfg.report.bootstrap_samples,
                                              seed=cfg.seed, level=cfg.report.level) for d in per_query[name]}
                   for name, s in systems.items() if s.first_stage} or None
    infos = _costs(systems, [dataset.queries[q] for q in list(qrels)[:cfg.report.latency_queries]],
                   [dataset.doc_text(c) for c in list(dataset.corpus)[:cfg.rerank.k]],
                   repeats=cfg.report.latency_repeats)

    comparison = Comparison(results, infos, intervals, len(qrels), [], rerank_gain, rag_summary,
                            insights(dataset, systems, per_query, cfg.evaluate.split))
    files = {"results.json": json.dumps(results_to_json(results), indent=2),
             "summary.json": json.dumps(_summary(dataset, cfg, comparison), indent=2)}
    plots = {"ndcg_by_dim.png": report.plot_dims(plt, results)}
    if any(i.history for i in infos.values()):
        plots["training_curves.png"] = report.plot_curves(plt, infos)
    files["report.md"] = report.render_markdown(dataset, cfg, comparison, list(plots))
    files["report.html"] = report.render_html(files["report.md"], plots)  # the same report, self-contained
    written = {name: data.encode() if isinstance(data, str) else data for name, data in {**files, **plots}.items()}
    replace_folder(out, written, replaced=COMPARE_FILES)  # an older run's plot that is not made again goes too
    comparison.files = [out / name for name in written]
    return comparison


def check_compare_out(out: str | os.PathLike, force: bool) -> None:
    """Refuse an ``out`` that is a file, or holds any file ``compare`` writes, unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    for name in COMPARE_FILES:
        refuse_existing(out / name, force)


def _summary(dataset: Dataset, cfg: Config, c: Comparison) -> dict[str, Any]:
    return {"dataset": str(dataset.path), "split": cfg.evaluate.split, "queries": c.queries,
            "chunks": len(dataset.corpus), "base_model": cfg.encoder.model,
            "bootstrap_samples": cfg.report.bootstrap_samples, "seed": cfg.seed, "level": cfg.report.level,
            "systems": {s: {k: v for k, v in asdict(i).items() if k != "history"} for s, i in c.systems.items()},
            "intervals": {s: {str(d): dict(zip(("change", "low", "high"), ci, strict=True)) for d, ci in by.items()}
                          for s, by in c.intervals.items()},
            **({"rerank_gain": {s: {str(d): dict(zip(("change", "low", "high"), ci, strict=True))
                                    for d, ci in by.items()} for s, by in c.rerank_gain.items()},
                "rerank_k": cfg.rerank.k} if c.rerank_gain else {})}


def read_rag(path: str | os.PathLike) -> dict[str, Any]:
    """A rag.json written by `adapter rag`, with every field the report shows; a one-line error for anything else."""
    try:
        summary = safejson.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read rag results ({type(e).__name__})") from None
    number = lambda x: isinstance(x, int | float) and not isinstance(x, bool)  # noqa: E731
    numbers = lambda x, n: isinstance(x, list) and len(x) == n and all(map(number, x))  # noqa: E731
    top = {"k": number, "compared": number, "questions": number, "llm_model": lambda x: isinstance(x, str),
           "judge_model": lambda x: isinstance(x, str)}
    each = {"accuracy": number, PRIMARY_METRIC: number, "gold_in_context": number, "ungraded": number,
            "accuracy_ci": lambda x: x is None or numbers(x, 2), "change": lambda x: x is None or numbers(x, 3)}
    if not isinstance(summary, dict) or not isinstance(summary.get("systems"), dict) or not summary["systems"]:
        raise AdapterError(f"{path}: not a rag.json written by `adapter rag` (no systems)")
    for key, ok in top.items():
        if not ok(summary.get(key)):
            raise AdapterError(f"{path}: not a rag.json written by `adapter rag` ({key!r} missing or wrong)")
    for system, values in summary["systems"].items():
        bad = next((k for k, ok in each.items() if not isinstance(values, dict) or not ok(values.get(k))), None)
        if bad is not None:
            raise AdapterError(f"{path}: not a rag.json written by `adapter rag` (system {system!r}: {bad!r} missing "
                               "or wrong)")
    return summary
