"""A second stage: a cross-encoder that reorders a first stage's top-k, fine-tuned with sentence-transformers' own
CrossEncoderTrainer and losses.

Training pairs come from the train split: each question with its gold chunk, and hard negatives mined once by the
project's one search function (``adapter.evaluate.search``) under the first stage (the base encoder, or it with an
adapter): chunks it ranks in its top-k that are not relevant, which is exactly what the reranker will have to push
down. The start is a cross-encoder checkpoint, or any BERT-like encoder (a sentence-transformers folder or a plain
transformers one), which gets a new one-logit head. After every epoch the validation questions' first-stage lists are
reranked by the model being trained and scored by the shared judge (``adapter.evaluate.evaluate`` with ``rerank``);
the best epoch by ndcg@10 is kept. Checkpoints live in ``OUT/checkpoints`` until the model is installed, so the same
command resumes after a crash, as ``adapter finetune`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sentence_transformers.base.evaluation import BaseEvaluator

from adapter.config import Config
from adapter.data import Dataset, Qrels, atomic_write, fingerprint, relevant, train_val_qrels
from adapter.encoder import resolve_model
from adapter.errors import AdapterError, one_line
from adapter.evaluate import METRICS, PRIMARY_METRIC, Results, evaluate, id_rank, search
from adapter.finetune import (
    CHECKPOINTS,
    CLOCK_FILE,
    _clock_callback,
    _install,
    _quiet_progress_callback,
    _read_json,
    epoch_selection_args,
    prepare_out,
)

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "rerank.json"  # what the reranker was trained on and how it scored: what `compare` reads
NEGATIVES_FILE = "negatives.json"  # in CHECKPOINTS: the hard negatives, mined once and reused on resume
BASE_FILE = "base.json"  # in CHECKPOINTS: validation of the first stage alone and of the start model, measured once
LOSSES = ("bce", "mnrl")


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


def _cross_encoder(path: str, max_length: int | None, **kw: Any) -> CrossEncoder:
    from sentence_transformers import CrossEncoder

    try:
        model = CrossEncoder(path, **kw)
    except Exception as e:  # hub and transformers raise many types; the user needs one line
        raise AdapterError(f"{path}: cannot load as a cross-encoder ({one_line(e)})") from None
    if max_length is not None:
        model.max_seq_length = max_length
    return model


def check_folder(folder: str | os.PathLike) -> Path:
    """A reranker folder, checked without loading it: it exists and holds a cross-encoder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such reranker folder")
    if not is_cross_encoder(folder):
        raise AdapterError(f"{folder}: not a cross-encoder (a sentence-transformers CrossEncoder or a "
                           "sequence-classification model); train one with `adapter rerank-train`")
    return folder


def load_reranker(folder: str | os.PathLike, cfg: Config | None = None) -> Reranker:
    """A trained reranker from ``folder``; a one-line error when it is not a one-score cross-encoder."""
    cfg = cfg or Config()
    folder = check_folder(folder)
    model = _cross_encoder(str(folder), None)
    if model.num_labels != 1:
        raise AdapterError(f"{folder}: a cross-encoder with {model.num_labels} labels; a reranker gives one score")
    meta_file = folder / META_FILE
    return Reranker(model, batch_size=cfg.rerank.predict_batch_size, source=str(folder),
                    meta=_json(meta_file) if meta_file.is_file() else {})


def start_model(name: str, max_length: int | None) -> tuple[CrossEncoder, str]:
    """The model training starts from, and how: a cross-encoder checkpoint as it is, or any other encoder (a
    sentence-transformers folder, a transformers model) with a new one-logit head."""
    path = resolve_model(name)
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
        model = _cross_encoder(path, max_length, num_labels=1)
    finally:
        hf_logging.set_verbosity(level)
    return model, "encoder with a new one-logit head"


# ---------------------------------------------------------------------------------------------------------- scoring


class Reranker:
    """A one-score cross-encoder that scores (question, chunk) pairs, remembering pairs it has scored (a reranked
    system is scored at every dim, and base and adapter share most of their candidates)."""

    def __init__(self, model: CrossEncoder, *, batch_size: int = 32, source: str = "", memo: bool = True,
                 meta: dict[str, Any] | None = None):
        self.model, self.batch_size, self.source = model, batch_size, source
        self.meta = meta or {}
        self._memo: dict[tuple[str, str], float] | None = {} if memo else None

    def _predict(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        import torch

        if not pairs:
            return np.empty(0, dtype=np.float32)
        scores = self.model.predict(list(pairs), batch_size=self.batch_size, show_progress_bar=False,
                                    activation_fn=torch.nn.Identity(), convert_to_numpy=True)
        return np.asarray(scores, dtype=np.float32).reshape(-1)  # logits: no sigmoid ties at the top

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


class ListReranker:
    """The second stage the judge takes (``adapter.evaluate.Reorder``): reorders each query's first ``k`` corpus rows
    by the cross-encoder's score, ties kept in first-stage order; rows below ``k`` stay as they were."""

    def __init__(self, reranker: Reranker, queries: Mapping[str, str], chunks: Sequence[str], k: int):
        self.reranker, self.queries, self.chunks, self.k = reranker, queries, chunks, k

    def __call__(self, query_ids: Sequence[str], rows: np.ndarray) -> np.ndarray:
        k = min(self.k, rows.shape[1])
        top = rows[:, :k]  # (n, k)
        pairs = [(self.queries[q], self.chunks[r]) for q, row in zip(query_ids, top, strict=True) for r in row]
        s = self.reranker.scores(pairs).reshape(len(query_ids), k)
        order = np.lexsort((np.broadcast_to(np.arange(k), s.shape), -s), axis=1)
        return np.concatenate([np.take_along_axis(top, order, 1), rows[:, k:]], axis=1)


def check_k(k: int, n_chunks: int) -> None:
    """--rerank-k must name at least one candidate and no more than the corpus holds."""
    if not 1 <= k <= n_chunks:
        raise AdapterError(f"--rerank-k {k} is outside 1..{n_chunks} (the corpus's chunk count)")


def list_reranker(reranker: Reranker, dataset: Dataset, k: int,
                  corpus_ids: Sequence[str] | None = None) -> ListReranker:
    """The judge's second stage for ``dataset`` whose corpus rows are ``corpus_ids`` (default: corpus order, as every
    system's cached corpus vectors are; a store read out for evaluation has its own order)."""
    check_k(k, len(dataset.corpus))
    cids = list(dataset.corpus) if corpus_ids is None else corpus_ids
    return ListReranker(reranker, dataset.queries, [dataset.doc_text(c) for c in cids], k)


# ---------------------------------------------------------------------------------------------------------- training


def mine_negatives(dataset: Dataset, qrels: Qrels, query_vectors: np.ndarray, corpus_vectors: np.ndarray, *,
                   k: int, n: int, seed: int) -> dict[str, list[str]]:
    """For each query of ``qrels`` (rows of ``query_vectors`` in its order), ``n`` chunks sampled from those the first
    stage ranks in its top ``k`` that are not relevant: the confusions the reranker is there to fix."""
    cids = list(dataset.corpus)
    qids = list(qrels)
    depth = min(len(cids), k + max(len(r) for r in qrels.values()))
    _, rows = search(query_vectors, corpus_vectors, depth, tie_rank=id_rank(cids))
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {}
    for qid, row in zip(qids, rows, strict=True):
        pool = [cids[r] for r in row if cids[r] not in qrels[qid]][:k]
        take = rng.choice(len(pool), size=min(n, len(pool)), replace=False) if pool else []
        out[qid] = [pool[i] for i in sorted(take)]
    return out


class RerankEvaluator(BaseEvaluator):
    """The shared judge over reranked validation lists: the first stage's vectors are fixed, the model being trained
    reorders each question's top ``k`` (no memo: its weights change every epoch). Returns ``{metric: value}``."""

    def __init__(self, dataset: Dataset, qrels: Qrels, query_vectors: np.ndarray, corpus_vectors: np.ndarray, k: int,
                 batch_size: int):
        super().__init__()
        self.dataset, self.qrels = dataset, relevant(qrels)
        self.query_vectors, self.corpus_vectors, self.k, self.batch_size = query_vectors, corpus_vectors, k, batch_size
        self.primary_metric = PRIMARY_METRIC

    def __call__(self, model: CrossEncoder, output_path: str | None = None, epoch: float = -1,
                 steps: int = -1) -> dict[str, float]:
        reorder = list_reranker(Reranker(model, batch_size=self.batch_size, memo=False), self.dataset, self.k)
        r = score_first_stage(self.dataset, self.qrels, self.query_vectors, self.corpus_vectors, reorder)
        logger.info("validation %s at epoch %g: %.4f", PRIMARY_METRIC, max(epoch, 0), r[PRIMARY_METRIC])
        return r


def score_first_stage(dataset: Dataset, qrels: Qrels, query_vectors: np.ndarray, corpus_vectors: np.ndarray,
                      reorder: ListReranker | None = None) -> dict[str, float]:
    """The judge's metrics (full dim) for the first stage alone, or reranked by ``reorder``."""
    full = corpus_vectors.shape[1]
    return evaluate(query_vectors, corpus_vectors, qrels, list(qrels), list(dataset.corpus), [full],
                    rerank=reorder)[full]


def file_sha(path: str | os.PathLike) -> str:
    """Short hash of a file's bytes: what identifies the adapter a reranker's negatives were mined under."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


FirstStage = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]  # query ids -> (their vectors, corpus vectors)


def _train_rows(dataset: Dataset, qrels: Qrels, negatives: Mapping[str, list[str]], loss: str) -> dict[str, list]:
    """Columns of the training set: (query, chunk, label) rows for bce; (anchor, positive, negative_1..n) for mnrl."""
    if loss == "bce":
        rows = [(dataset.queries[q], dataset.doc_text(c), 1.0) for q, rels in qrels.items() for c in rels]
        rows += [(dataset.queries[q], dataset.doc_text(c), 0.0) for q in qrels for c in negatives[q]]
        return {"query": [r[0] for r in rows], "chunk": [r[1] for r in rows], "label": [r[2] for r in rows]}
    n = min(len(v) for v in negatives.values())
    if n == 0:
        raise AdapterError(f"{dataset.path}: some training question has no non-relevant candidate; use --loss bce")
    cols: dict[str, list] = {"anchor": [], "positive": [], **{f"negative_{j + 1}": [] for j in range(n)}}
    for q, rels in qrels.items():
        for c in rels:
            cols["anchor"].append(dataset.queries[q])
            cols["positive"].append(dataset.doc_text(c))
            for j in range(n):
                cols[f"negative_{j + 1}"].append(dataset.doc_text(negatives[q][j]))
    return cols


def _budget_callback(clock: Any, seconds: float | None):
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        """Stops training once the wall time (resumes included) reaches the budget; the trainer then ends the epoch
        there, so that point is validated and saved like any epoch's end and selection sees it."""

        def on_step_end(self, args, state, control, **kwargs):
            if seconds is not None and clock.seconds() >= seconds and not control.should_training_stop:
                logger.info("training time budget of %.0f s reached at epoch %.2f; stopping", seconds, state.epoch)
                control.should_training_stop = True
            return control

    return Budget()


def _training_args(cfg: Config, out: Path, progress: bool):
    import torch
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    cuda = torch.cuda.is_available()
    r = cfg.rerank
    return CrossEncoderTrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=r.epochs,
        per_device_train_batch_size=r.batch_size,
        learning_rate=r.lr,
        warmup_steps=r.warmup,  # a float below 1 is a share of the steps
        lr_scheduler_type="linear",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        batch_sampler=BatchSamplers.NO_DUPLICATES if r.loss == "mnrl" else BatchSamplers.BATCH_SAMPLER,
        dataloader_pin_memory=cuda,
        **epoch_selection_args(f"eval_{PRIMARY_METRIC}", progress, cfg.seed),
    )


def _check(cfg: Config) -> None:
    r = cfg.rerank
    checks = [(r.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}", r.loss),
              (r.epochs >= 1, "--epochs must be at least 1", r.epochs),
              (r.batch_size >= (2 if r.loss == "mnrl" else 1), "--batch-size must be at least 2 for mnrl (in-batch "
               "negatives), 1 for bce", r.batch_size),
              (r.lr > 0, "--lr must be positive", r.lr),
              (r.negatives >= (0 if r.loss == "mnrl" else 1), "--negatives must be at least 1 for bce", r.negatives),
              (r.max_seq_length is None or r.max_seq_length >= 8, "--max-seq-length must be at least 8",
               r.max_seq_length),
              (r.max_train_seconds is None or r.max_train_seconds > 0, "--max-train-seconds must be positive",
               r.max_train_seconds)]
    for ok, message, value in checks:
        if not ok:
            raise AdapterError(f"{message}, got {value}")


@dataclass
class RerankResult:
    """Where the reranker went and how the kept epoch scored on validation (top-k reranked), keyed by dim like every
    result (the one dim here: the first stage's full dim, ``dim``)."""

    path: Path
    best_epoch: float
    dim: int
    base_val: Results  # the first stage alone, {dim: metrics}
    start_val: Results | None  # the start model reranking, before training (None: a new head, random)
    best_val: Results  # the kept epoch reranking
    seconds: float  # training wall time, resumed runs included
    resumed_from: str | None


def rerank_train(dataset: Dataset, out: str | os.PathLike, cfg: Config, first_stage: FirstStage,
                 source: dict[str, Any], *, progress: bool = True) -> RerankResult:
    """Fine-tune a cross-encoder (``cfg.rerank.model``) to rerank ``first_stage``'s lists (query ids -> their vectors
    and the corpus vectors in corpus order; ``source`` says what it is: ``first_stage``, ``adapter``,
    ``adapter_sha``) on the train split; install the best epoch in ``out`` with a model card and ``rerank.json``.
    Called by ``adapter.pipeline.rerank_train``, which builds the first stage."""
    try:
        import accelerate  # noqa: F401  (the trainer's own requirement, checked here for a one-line message)
        from datasets import Dataset as HFDataset
    except ImportError as e:
        raise AdapterError(f"training a reranker needs the {e.name!r} package: pip install 'adapter[train]'") from None
    import torch
    from sentence_transformers.cross_encoder import CrossEncoderTrainer
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, MultipleNegativesRankingLoss
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cfg = cfg or Config()
    r = cfg.rerank
    _check(cfg)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    if (out / "modules.json").is_file():  # before loading anything: a model here is never overwritten
        raise AdapterError(f"{out}: already holds a model; choose another --out folder")
    check_k(r.k, len(dataset.corpus))
    train_qrels, val_qrels, how = train_val_qrels(dataset, cfg)
    if r.val_queries is not None and len(val_qrels) > r.val_queries:
        val_qrels, how = _sample(val_qrels, r.val_queries, cfg.seed), how + f", {r.val_queries} of them sampled"
    train_qrels = _sample(train_qrels, r.train_queries, cfg.seed)
    run = {"start_model": r.model, "first_stage": source["first_stage"], "adapter_sha": source.get("adapter_sha"),
           "data_fingerprint": fingerprint(dataset, cfg.split.train_split), "validation": how,
           "train_queries": len(train_qrels), **{f"rerank_{k}": v for k, v in vars(r).items()
                                                 if k not in ("model", "predict_batch_size")}, "seed": cfg.seed}
    resume = prepare_out(out, run, main=True)
    ckpt = out / CHECKPOINTS

    qids = [*train_qrels, *val_qrels]
    queries, corpus = first_stage(qids)
    train_q, val_q = queries[:len(train_qrels)], queries[len(train_qrels):]
    if (ckpt / NEGATIVES_FILE).is_file():
        negatives = _read_json(ckpt / NEGATIVES_FILE)
    else:
        negatives = mine_negatives(dataset, train_qrels, train_q, corpus, k=r.k, n=r.negatives, seed=cfg.seed)
        with atomic_write(ckpt / NEGATIVES_FILE) as f:
            json.dump(negatives, f)
    train_data = HFDataset.from_dict(_train_rows(dataset, train_qrels, negatives, r.loss))

    model, start_kind = start_model(r.model, r.max_seq_length)
    if r.loss == "bce":
        n_pos = sum(len(v) for v in train_qrels.values())
        n_neg = sum(len(v) for v in negatives.values())
        loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(n_neg / max(n_pos, 1)))
    else:
        loss = MultipleNegativesRankingLoss(model)
    evaluator = RerankEvaluator(dataset, val_qrels, val_q, corpus, r.k, r.predict_batch_size)
    before = _read_json(resume / CLOCK_FILE)["seconds"] if resume else 0.0
    clock = _clock_callback(before)
    trainer = CrossEncoderTrainer(model=model, args=_training_args(cfg, out, progress), train_dataset=train_data,
                                  loss=loss, evaluator=evaluator, callbacks=[clock, _budget_callback(clock,
                                                                                                     r.max_train_seconds)])
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_quiet_progress_callback())
    logger.info("training a reranker from %s (%s) on %d rows from %d questions (%s loss, %d hard negatives each "
                "from the top %d of %s%s); validating on %d questions (%s)", r.model, start_kind, len(train_data),
                len(train_qrels), r.loss, r.negatives, r.k, source["first_stage"],
                f" + {source['adapter']}" if source.get("adapter") else "",
                len(val_qrels), how)

    if (ckpt / BASE_FILE).is_file():
        base = _read_json(ckpt / BASE_FILE)
    else:
        fresh = start_kind != "cross-encoder checkpoint"  # a new head ranks at random: not worth a validation pass
        base = {"first_stage": score_first_stage(dataset, val_qrels, val_q, corpus),
                "start": None if fresh else evaluator(model)}
        with atomic_write(ckpt / BASE_FILE) as f:
            json.dump(base, f)
    clock.start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = clock.seconds()

    evals = [e for e in trainer.state.log_history if f"eval_{PRIMARY_METRIC}" in e]
    best = max(evals, key=lambda e: e[f"eval_{PRIMARY_METRIC}"])  # first of equals, as the trainer
    best_val = _strip(best)
    if best_val[PRIMARY_METRIC] <= base["first_stage"][PRIMARY_METRIC]:
        logger.warning("the reranker's best validation %s %.4f does not beat the first stage alone (%.4f)",
                       PRIMARY_METRIC, best_val[PRIMARY_METRIC], base["first_stage"][PRIMARY_METRIC])
    d = int(corpus.shape[1])  # the project's one metadata schema: metrics by dim (here the first stage's full dim)
    meta = {"format_version": FORMAT_VERSION, **run, "start_kind": start_kind, "adapter": source.get("adapter"),
            "dataset": str(dataset.path), "trained_on": cfg.split.train_split, "rows": len(train_data),
            "val_queries": len(val_qrels), "chunks": len(dataset.corpus), "train_seconds": seconds,
            "resumed": resume is not None, "best_epoch": best["epoch"], "best_step": best["step"],
            "val_base": {d: base["first_stage"]}, "val_start": {d: base["start"]} if base["start"] else None,
            "val_best": {d: best_val},
            "history": {"loss": [{"epoch": e["epoch"], "loss": e["loss"]} for e in trainer.state.log_history
                                 if "loss" in e],
                        "val": [{"epoch": 0.0, PRIMARY_METRIC: {d: base["first_stage"][PRIMARY_METRIC]}}]
                        + [{"epoch": e["epoch"], PRIMARY_METRIC: {d: e[f"eval_{PRIMARY_METRIC}"]}} for e in evals]},
            "config": cfg.to_dict("encoder", "split", "rerank")}
    _install(model, out, {"README.md": model_card(meta, out.name), META_FILE: json.dumps(meta, indent=2)})
    logger.info("kept epoch %g: validation %s %.4f reranked (first stage alone %.4f); %.0f s", best["epoch"],
                PRIMARY_METRIC, best_val[PRIMARY_METRIC], base["first_stage"][PRIMARY_METRIC], seconds)
    return RerankResult(out, float(best["epoch"]), d, meta["val_base"], meta["val_start"], meta["val_best"], seconds,
                        str(resume) if resume else None)


def _sample(qrels: Qrels, n: int | None, seed: int) -> Qrels:
    """A seeded sample of ``n`` of the queries (all when ``n`` is None or not smaller), in their order."""
    if n is None or len(qrels) <= n:
        return qrels
    if n < 1:
        raise AdapterError(f"a sample of {n} questions: must be at least 1")
    keep = set(np.random.default_rng(seed).choice(sorted(qrels), n, replace=False).tolist())
    return {q: v for q, v in qrels.items() if q in keep}


def _strip(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"eval_ndcg@10": v, ...}`` -> ``{"ndcg@10": v, ...}``, the judge's metrics only."""
    return {m: float(metrics[f"eval_{m}"]) for m in METRICS}


def model_card(meta: dict[str, Any], name: str) -> str:
    """A short README.md: start model, first stage, data, the validation table and how it was trained."""
    first = f"`{meta['first_stage']}`" + (f" with the adapter `{meta['adapter']}`" if meta.get("adapter") else "")
    rows = [f"| {label} | " + " | ".join(f"{next(iter(meta[key].values()))[m]:.4f}" for m in
                                          (PRIMARY_METRIC, "accuracy@1", "accuracy@10", "mrr@10")) + " |"
            for label, key in (("first stage alone", "val_base"), ("start model reranking", "val_start"),
                               (f"kept epoch ({meta['best_epoch']:g}) reranking", "val_best")) if meta[key]]
    k = meta["rerank_k"]
    best, first = (next(iter(meta[key].values()))[PRIMARY_METRIC] for key in ("val_best", "val_base"))
    worse = best <= first
    return "\n".join([
        "---",
        "library_name: sentence-transformers",
        f"base_model: {meta['start_model']}",
        "pipeline_tag: text-ranking",
        "tags: [sentence-transformers, cross-encoder, reranker, retrieval]",
        "---",
        "",
        f"# {name}",
        "",
        f"A cross-encoder reranker made by `adapter rerank-train` from `{meta['start_model']}` "
        f"({meta['start_kind']}), trained to reorder the top {k} chunks that {first} retrieves.",
        "",
        "## Data",
        "",
        f"{meta['rows']:,} training rows from {meta['train_queries']:,} questions of the `{meta['trained_on']}` split "
        f"of `{meta['dataset']}` (fingerprint `{meta['data_fingerprint']}`, {meta['chunks']:,} chunks): each question "
        f"with its gold chunk and {meta['rerank_negatives']} hard negative(s) sampled from the first stage's top {k} "
        f"non-relevant chunks, mined once. Validation: {meta['val_queries']:,} questions ({meta['validation']}).",
        "",
        f"## Validation (top {k} reranked, scored by the project's judge)",
        "",
        f"| list | {PRIMARY_METRIC} | accuracy@1 | accuracy@10 | mrr@10 |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        *(["On validation this reranker does not beat the first stage alone: check it with `adapter compare "
           "--reranker` before putting it in front of users.", ""] if worse else []),
        "## Training",
        "",
        f"sentence-transformers' CrossEncoderTrainer, loss `{meta['rerank_loss']}` "
        f"({'BinaryCrossEntropyLoss, positives weighted by the negatives per positive' if meta['rerank_loss'] == 'bce' else 'MultipleNegativesRankingLoss'}), "  # noqa: E501
        f"{meta['rerank_epochs']} epoch(s) (time budget: {meta['rerank_max_train_seconds'] or 'none'} s), batch "
        f"{meta['rerank_batch_size']}, learning rate {meta['rerank_lr']:g} with {meta['rerank_warmup']:g} warmup then "
        f"linear decay, pairs truncated to {meta['rerank_max_seq_length'] or 'the model maximum of'} tokens, seed "
        f"{meta['seed']}; {meta['train_seconds']:.0f} s of training wall time.",
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import CrossEncoder",
        "",
        f'reranker = CrossEncoder("path/to/{name}")',
        'ranked = reranker.rank("my question", candidate_chunks)',
        "```",
        "",
        f"Or score a reranked system: `adapter evaluate DIR --reranker path/to/{name} --rerank-k {k}`.",
        "",
    ])
