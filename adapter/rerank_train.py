"""A second stage: a cross-encoder that reorders a first stage's top-k, fine-tuned with sentence-transformers' own
CrossEncoderTrainer and losses.

Training pairs come from the train split: each question with its gold chunk, and hard negatives mined once by the
project's one search function (``adapter.evaluate.search``) under the first stage (the base encoder, or it with an
adapter): chunks it ranks in its top-k that are not relevant, which is exactly what the reranker will have to push
down. The start is a cross-encoder checkpoint, or any BERT-like encoder (a sentence-transformers folder or a plain
transformers one), which gets a new head: by default ``CosineHead``, the cosine between the mean of the question's and
the mean of the chunk's token states of the one joint encoding, so a bi-encoder's backbone starts as a reranker that
already ranks (a new one-logit classifier on the pooler starts from noise and did not learn in 15 CPU minutes). After
every epoch the validation questions' first-stage lists are reranked by the model being trained and scored by the
shared judge (``adapter.evaluate.evaluate`` with ``rerank``), the reranker's score alone and fused with the first
stage's rank (``ListReranker``), the fusion weight chosen there; the best epoch by ndcg@10 is kept. Checkpoints live
in ``OUT/checkpoints`` until the model is installed, so the same command resumes after a crash, as ``adapter
finetune`` does.
"""


from __future__ import annotations

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

from adapter.cards import model_card as card
from adapter.config import Config
from adapter.data import Dataset, Qrels, atomic_write, fingerprint, relevant, train_val_qrels
from adapter.encoder import resolve_model, truncate
from adapter.errors import AdapterError
from adapter.evaluate import METRICS, PRIMARY_METRIC, Results, evaluate, id_rank, search
from adapter.rerank import (
    FORMAT_VERSION,
    META_FILE,
    ListReranker,
    Reranker,
    check_code_free,
    check_k,
    list_reranker,
    start_model,
    use_bf16,
)
from adapter.st_trainer import (
    CHECKPOINTS,
    CLOCK_FILE,
    clock_callback,
    epoch_selection_args,
    install,
    prepare_out,
    quiet_progress_callback,
    read_json,
)

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

logger = logging.getLogger(__name__)

NEGATIVES_FILE = "negatives.json"  # in CHECKPOINTS: the hard negatives, mined once and reused on resume
BASE_FILE = "base.json"  # in CHECKPOINTS: validation of the first stage alone and of the start model, measured once
LOSSES = ("lambda", "bce", "mnrl")
HEADS = ("cosine", "classifier")
FUSION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)  # of the first
# stage's score, tried on validation (0: none); one scoring pass serves them all, so the grid is fine and wide


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


def first_stage_priors(dataset: Dataset, qrels: Qrels, query_vectors: np.ndarray, corpus_vectors: np.ndarray,
                       chunks: Mapping[str, Sequence[str]], k: int) -> dict[str, dict[str, float]]:
    """For each query of ``qrels`` (rows of ``query_vectors`` in its order), the first stage's score of each of
    ``chunks[query]``, standardised by the mean and spread of its top ``k`` scores: the same scale ``ListReranker``
    fuses at, so training on score + w x prior trains what reranking uses."""
    cids = list(dataset.corpus)
    row = {c: i for i, c in enumerate(cids)}
    top, _ = search(query_vectors, corpus_vectors, k, tie_rank=id_rank(cids))
    mean, spread = top.mean(1), np.maximum(top.std(1), 1e-6)
    out: dict[str, dict[str, float]] = {}
    for i, q in enumerate(qrels):
        wanted = list(dict.fromkeys(chunks[q]))
        d = corpus_vectors.shape[1]  # scored as search scores: both sides normalised
        s = truncate(corpus_vectors[[row[c] for c in wanted]], d) @ truncate(query_vectors[i:i + 1], d)[0]
        out[q] = {c: float((v - mean[i]) / spread[i]) for c, v in zip(wanted, s, strict=True)}
    return out


def prior_lambda_loss(model: CrossEncoder, weight: float, mini_batch_size: int):
    """sentence-transformers' LambdaLoss on each pair's score + ``weight`` x its first-stage prior (the training
    set's ``prior`` column, after the chunks): the lists are ordered by what reranking with fusion orders them by, so
    the model learns what to change in the first stage's order, not the whole order again."""
    import torch
    from sentence_transformers.cross_encoder.losses import LambdaLoss

    class Shift(torch.nn.Module):
        """The loss's activation (applied once, to the batch's flat scores in pair order) plus a shift per pair."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner, self.add = inner, None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + self.add.to(x.device, x.dtype)

    class PriorLambdaLoss(LambdaLoss):
        def __init__(self) -> None:
            super().__init__(model, mini_batch_size=mini_batch_size)
            self.weight = weight
            self.activation_fn = Shift(self.activation_fn)

        def forward(self, inputs: list, labels: list, **kw: Any) -> torch.Tensor:
            queries, docs, priors = inputs
            self.activation_fn.add = weight * torch.tensor([p for row in priors for p in row], dtype=torch.float32)
            return super().forward([queries, docs], labels, **kw)

    return PriorLambdaLoss()


class RerankEvaluator(BaseEvaluator):
    """The shared judge over reranked validation lists: the first stage's vectors are fixed, the model being trained
    reorders each question's top ``k`` (scored afresh each call: its weights change every epoch), alone and fused with
    the first stage's rank at each of ``weights``. Returns the metrics of the best weight (the first of equals: the
    smallest), that weight as ``fusion`` and the reranker's own ``ndcg@10`` alone as ``alone``."""

    def __init__(self, dataset: Dataset, qrels: Qrels, query_vectors: np.ndarray, corpus_vectors: np.ndarray, k: int,
                 batch_size: int, *, weights: Sequence[float] = FUSION_WEIGHTS, bf16: bool = False):
        super().__init__()
        self.dataset, self.qrels = dataset, relevant(qrels)
        self.query_vectors, self.corpus_vectors, self.k, self.batch_size = query_vectors, corpus_vectors, k, batch_size
        self.weights, self.bf16 = weights, bf16
        self.primary_metric = PRIMARY_METRIC
        self.last: Reranker | None = None  # the last call's, with its remembered scores

    def __call__(self, model: CrossEncoder, output_path: str | None = None, epoch: float = -1,
                 steps: int = -1) -> dict[str, float]:
        self.last = Reranker(model, batch_size=self.batch_size, bf16=self.bf16)  # one scoring pass for every weight
        r = self.score(self.last)
        logger.info("validation %s at epoch %g: %.4f (reranker alone %.4f, fusion weight %g)", PRIMARY_METRIC,
                    max(epoch, 0), r[PRIMARY_METRIC], r["alone"], r["fusion"])
        return r

    def score(self, reranker: Reranker, query_vectors: np.ndarray | None = None,
              corpus_vectors: np.ndarray | None = None) -> dict[str, float]:
        """The judge's metrics of the best weight with ``fusion`` and ``alone``, on these lists or another first
        stage's (its vectors for the same questions)."""
        q = self.query_vectors if query_vectors is None else query_vectors
        c = self.corpus_vectors if corpus_vectors is None else corpus_vectors
        by_weight = [(w, score_first_stage(self.dataset, self.qrels, q, c,
                                           list_reranker(reranker, self.dataset, self.k, fusion=w)))
                     for w in self.weights]
        w, r = max(by_weight, key=lambda x: x[1][PRIMARY_METRIC])
        alone = by_weight[0][1][PRIMARY_METRIC] if self.weights[0] == 0 else float("nan")
        return {**r, "fusion": float(w), "alone": alone}


def score_first_stage(dataset: Dataset, qrels: Qrels, query_vectors: np.ndarray, corpus_vectors: np.ndarray,
                      reorder: ListReranker | None = None) -> dict[str, float]:
    """The judge's metrics (full dim) for the first stage alone, or reranked by ``reorder``."""
    full = corpus_vectors.shape[1]
    return evaluate(query_vectors, corpus_vectors, qrels, list(qrels), list(dataset.corpus), [full],
                    rerank=reorder)[full]


FirstStage = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]  # query ids -> (their vectors, corpus vectors)


def _train_rows(dataset: Dataset, qrels: Qrels, negatives: Mapping[str, list[str]], loss: str,
                priors: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, list]:
    """Columns of the training set: (query, chunk, label) rows for bce; (anchor, positive, negative_1..n) for mnrl;
    (query, [chunks], [labels]) lists for lambda: each relevant chunk with the question's hard negatives, and with
    ``priors`` (query -> chunk -> first-stage prior) a [priors] column after the chunks."""
    if loss == "lambda":
        lists = [(q, (c, *negatives[q])) for q, rels in qrels.items() for c in rels]
        cols: dict[str, list] = {"query": [dataset.queries[q] for q, _ in lists],
                                 "docs": [[dataset.doc_text(c) for c in cs] for _, cs in lists]}
        if priors is not None:
            cols["prior"] = [[float(priors[q][c]) for c in cs] for q, cs in lists]
        return {**cols, "labels": [[1] + [0] * (len(cs) - 1) for _, cs in lists]}
    if loss == "bce":
        rows = [(dataset.queries[q], dataset.doc_text(c), 1.0) for q, rels in qrels.items() for c in rels]
        rows += [(dataset.queries[q], dataset.doc_text(c), 0.0) for q in qrels for c in negatives[q]]
        return {"query": [r[0] for r in rows], "chunk": [r[1] for r in rows], "label": [r[2] for r in rows]}
    n = min(len(v) for v in negatives.values())
    if n == 0:
        raise AdapterError(f"{dataset.path}: some training question has no non-relevant candidate; use rerank.loss "
                           "'bce'")
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
    bf16 = use_bf16(r.bf16)
    return CrossEncoderTrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=r.epochs,
        per_device_train_batch_size=r.batch_size,
        learning_rate=r.lr,
        warmup_steps=r.warmup,  # a float below 1 is a share of the steps
        lr_scheduler_type="linear",
        bf16=bf16,
        use_cpu=bf16 and not cuda,  # the trainer's bf16 autocast on a CPU
        batch_sampler=BatchSamplers.NO_DUPLICATES if r.loss == "mnrl" else BatchSamplers.BATCH_SAMPLER,
        dataloader_pin_memory=cuda,
        **epoch_selection_args(f"eval_{PRIMARY_METRIC}", progress, cfg.seed),
    )


def _check(cfg: Config) -> None:
    r = cfg.rerank
    checks = [(r.loss in LOSSES, f"rerank.loss must be one of {', '.join(LOSSES)}", r.loss),
              (r.head in HEADS, f"rerank.head must be one of {', '.join(HEADS)}", r.head),
              (r.bf16 in ("auto", "yes", "no"), "rerank.bf16 must be auto, yes or no", r.bf16),
              (r.epochs >= 1, "rerank.epochs must be at least 1", r.epochs),
              (r.batch_size >= (2 if r.loss == "mnrl" else 1), "rerank.batch_size must be at least 2 for mnrl "
               "(in-batch negatives), 1 otherwise", r.batch_size),
              (r.lr > 0, "rerank.lr must be positive", r.lr),
              (r.prior >= 0, "rerank.prior must be 0 or more", r.prior),
              (0 <= r.base_share < 1, "rerank.base_share must be in [0, 1)", r.base_share),
              (r.negatives >= (0 if r.loss == "mnrl" else 1), f"rerank.negatives must be at least 1 for {r.loss}",
               r.negatives),
              (r.max_seq_length is None or r.max_seq_length >= 8, "rerank.max_seq_length must be at least 8",
               r.max_seq_length),
              (r.max_train_seconds is None or r.max_train_seconds > 0, "rerank.max_train_seconds must be positive",
               r.max_train_seconds)]
    for ok, message, value in checks:
        if not ok:
            raise AdapterError(f"{message}, got {value}")


@dataclass
class RerankResult:
    """Where the reranker went and how the kept epoch scored on validation (top-k reranked), keyed by dim as every
    result: the first stage's full dim, ``dim``."""

    path: Path
    best_epoch: float
    dim: int
    base_val: Results  # the first stage alone
    start_val: Results | None  # the start model reranking, before training (None: a new classifier, random)
    best_val: Results  # the kept epoch reranking
    seconds: float  # training wall time, resumed runs included
    resumed_from: str | None
    fusion: float = 0.0  # the kept weight of the first-stage rank (0: the reranker's order alone)
    alone: float | None = None  # the kept epoch's validation ndcg@10 without fusion


def rerank_train(dataset: Dataset, out: str | os.PathLike, cfg: Config, first_stage: FirstStage,
                 source: dict[str, Any], *, also: Mapping[str, FirstStage] | None = None,
                 progress: bool = True) -> RerankResult:
    """Fine-tune a cross-encoder (``cfg.rerank.model``) to rerank ``first_stage``'s lists (query ids -> their vectors
    and the corpus vectors in corpus order; ``source`` says what it is: ``first_stage``, ``adapter``,
    ``adapter_sha``, ``key``, its ``stage_key``) on the train split; install the best epoch in ``out`` with a model
    card and ``rerank.json``. For each first stage of ``also`` (by ``stage_key``) the kept model's fusion weight is
    chosen again on that stage's own validation lists. Called by ``adapter.pipeline.rerank_train``, which builds the
    first stages."""
    try:
        import accelerate  # noqa: F401  (the trainer's own requirement, checked here for a one-line message)
        from datasets import Dataset as HFDataset
    except ImportError as e:
        raise AdapterError(f"training a reranker needs the {e.name!r} package: pip install 'adapter[train]'") from None
    from sentence_transformers.cross_encoder import CrossEncoderTrainer
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
    check_code_free(resolve_model(r.model))  # before any first stage is embedded
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
    # each training question's lists (hard negatives, priors) come from one first stage: the trained one, or with
    # base_share > 0 one of ``also``, so the reranker learns to correct every first stage it will be fused with
    parts = _share_out(train_qrels, source["key"], list(also or ()) if r.base_share else [], r.base_share, cfg.seed)
    vectors = {key: (train_q[[i for i, q in enumerate(train_qrels) if q in part]], corpus) if key == source["key"]
               else also[key](list(part)) for key, part in parts.items() if part}
    prior = r.prior if r.loss == "lambda" and r.fusion else 0.0  # the weight the loss adds the first stage at
    negatives, priors = _negatives_and_priors(dataset, ckpt, cfg, parts, vectors, prior)
    train_data = HFDataset.from_dict(_train_rows(dataset, train_qrels, negatives, r.loss, priors))

    model, start_kind = start_model(r.model, r.max_seq_length, r.head)
    loss = _loss(model, cfg, prior, train_qrels, negatives)
    evaluator = RerankEvaluator(dataset, val_qrels, val_q, corpus, r.k, r.predict_batch_size,
                                weights=FUSION_WEIGHTS if r.fusion else (0.0,), bf16=use_bf16(r.bf16))
    before = read_json(resume / CLOCK_FILE)["seconds"] if resume else 0.0
    clock = clock_callback(before)
    trainer = CrossEncoderTrainer(model=model, args=_training_args(cfg, out, progress), train_dataset=train_data,
                                  loss=loss, evaluator=evaluator, callbacks=[clock, _budget_callback(clock,
                                                                                                     r.max_train_seconds)])
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(quiet_progress_callback())
    logger.info("training a reranker from %s (%s) on %d rows from %d questions (%s loss, %d hard negatives each "
                "from the top %d of %s%s); validating on %d questions (%s)", r.model, start_kind, len(train_data),
                len(train_qrels), r.loss, r.negatives, r.k, source["first_stage"],
                f" + {source['adapter']}" if source.get("adapter") else "",
                len(val_qrels), how)

    if (ckpt / BASE_FILE).is_file():
        base = read_json(ckpt / BASE_FILE)
    else:
        fresh = start_kind.endswith("one-logit head")  # a new classifier ranks at random: not worth a pass
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
    fusion, alone = float(best.get("eval_fusion", 0.0)), best.get("eval_alone")
    stages = {source["key"]: {"fusion": fusion, "first_stage": base["first_stage"][PRIMARY_METRIC],
                              "reranked": best_val[PRIMARY_METRIC], "alone": alone}}
    if also and r.fusion:
        # the kept model's scores: the last validation pass's when that was the kept one (they share candidates)
        same = evaluator.last is not None and best is evals[-1]
        reranker = evaluator.last if same else Reranker(model, batch_size=r.predict_batch_size, bf16=use_bf16(r.bf16))
        stages.update(_other_stages(dataset, val_qrels, evaluator, reranker, also))
    if best_val[PRIMARY_METRIC] <= base["first_stage"][PRIMARY_METRIC]:
        logger.warning("the reranker's best validation %s %.4f does not beat the first stage alone (%.4f)",
                       PRIMARY_METRIC, best_val[PRIMARY_METRIC], base["first_stage"][PRIMARY_METRIC])
    d = int(corpus.shape[1])  # the project's one metadata schema: metrics by dim (here the first stage's full dim)
    meta = {"format_version": FORMAT_VERSION, **run, "start_kind": start_kind, "adapter": source.get("adapter"),
            "dataset": str(dataset.path), "trained_on": cfg.split.train_split, "rows": len(train_data),
            "val_queries": len(val_qrels), "chunks": len(dataset.corpus), "train_seconds": seconds,
            "resumed": resume is not None, "best_epoch": best["epoch"], "best_step": best["step"],
            "fusion_weight": fusion, "stages": stages, "prior_weight": prior,
            "val_alone": {d: {PRIMARY_METRIC: alone}} if alone is not None else None,
            "val_base": {d: base["first_stage"]}, "val_start": {d: base["start"]} if base["start"] else None,
            "val_best": {d: best_val},
            "history": {"loss": [{"epoch": e["epoch"], "loss": e["loss"]} for e in trainer.state.log_history
                                 if "loss" in e],
                        "val": [{"epoch": 0.0, PRIMARY_METRIC: {d: base["first_stage"][PRIMARY_METRIC]}}]
                        + [{"epoch": e["epoch"], PRIMARY_METRIC: {d: e[f"eval_{PRIMARY_METRIC}"]},
                            "fusion": e.get("eval_fusion"), "alone": e.get("eval_alone")} for e in evals]},
            "config": cfg.to_dict("encoder", "split", "rerank")}
    install(model, out, {"README.md": model_card(meta, out.name), META_FILE: json.dumps(meta, indent=2)})
    logger.info("kept epoch %g: validation %s %.4f reranked (fusion weight %g; first stage alone %.4f); %.0f s",
                best["epoch"], PRIMARY_METRIC, best_val[PRIMARY_METRIC], fusion, base["first_stage"][PRIMARY_METRIC],
                seconds)
    return RerankResult(out, float(best["epoch"]), d, {d: base["first_stage"]},
                        {d: _metrics(base["start"])} if base["start"] else None, {d: best_val}, seconds,
                        str(resume) if resume else None, fusion, alone)


def _negatives_and_priors(dataset: Dataset, ckpt: Path, cfg: Config, parts: Mapping[str, Qrels],
                          vectors: Mapping[str, tuple[np.ndarray, np.ndarray]], prior: float
                          ) -> tuple[dict[str, list[str]], dict[str, dict[str, float]] | None]:
    """Each training question's hard negatives under its first stage (mined once, kept in ``ckpt`` for a resume) and,
    with a ``prior`` weight, the first stage's standardised score of each of its chunks."""
    r = cfg.rerank
    if (ckpt / NEGATIVES_FILE).is_file():
        negatives = read_json(ckpt / NEGATIVES_FILE)
    else:
        negatives = {}
        for key, (q, c) in vectors.items():
            negatives.update(mine_negatives(dataset, parts[key], q, c, k=r.k, n=r.negatives, seed=cfg.seed))
        with atomic_write(ckpt / NEGATIVES_FILE) as f:
            json.dump(negatives, f)
    priors: dict[str, dict[str, float]] | None = None
    if prior:
        priors = {}
        for key, (q, c) in vectors.items():
            priors.update(first_stage_priors(dataset, parts[key], q, c, {x: [*parts[key][x], *negatives[x]]
                                                                          for x in parts[key]}, r.k))
    return negatives, priors


def _loss(model: CrossEncoder, cfg: Config, prior: float, train_qrels: Qrels, negatives: Mapping[str, list[str]]):
    """sentence-transformers' loss for ``cfg.rerank.loss``: LambdaLoss (on score + ``prior`` x the first stage's when
    fused), BinaryCrossEntropyLoss with positives weighted by the negatives per positive, or
    MultipleNegativesRankingLoss."""
    import torch
    from sentence_transformers.cross_encoder.losses import (
        BinaryCrossEntropyLoss,
        LambdaLoss,
        MultipleNegativesRankingLoss,
    )

    r = cfg.rerank
    if prior:
        return prior_lambda_loss(model, prior, r.predict_batch_size)
    if r.loss == "lambda":
        return LambdaLoss(model, mini_batch_size=r.predict_batch_size)
    if r.loss == "bce":
        n_pos = sum(len(v) for v in train_qrels.values())
        n_neg = sum(len(v) for v in negatives.values())
        return BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(n_neg / max(n_pos, 1)))
    return MultipleNegativesRankingLoss(model)


def _other_stages(dataset: Dataset, val_qrels: Qrels, evaluator: RerankEvaluator, reranker: Reranker,
                  also: Mapping[str, FirstStage]) -> dict[str, dict[str, Any]]:
    """For each other first stage (by ``stage_key``), the kept model's fusion weight chosen on that stage's own
    validation lists, with the first stage alone, reranked and the reranker alone."""
    stages = {}
    for key, stage in also.items():
        q, c = stage(list(val_qrels))
        got = evaluator.score(reranker, q, c)
        stages[key] = {"fusion": got["fusion"], "first_stage": score_first_stage(dataset, val_qrels, q, c)[
            PRIMARY_METRIC], "reranked": got[PRIMARY_METRIC], "alone": got["alone"]}
        logger.info("validation %s under %s: %.4f alone -> %.4f reranked (fusion weight %g)", PRIMARY_METRIC,
                    key, stages[key]["first_stage"], got[PRIMARY_METRIC], got["fusion"])
    return stages


def _share_out(qrels: Qrels, main: str, others: Sequence[str], share: float, seed: int) -> dict[str, Qrels]:
    """``qrels`` split between first stages: a seeded ``share`` of the questions to ``others`` (in turn), the rest to
    ``main``; each part in ``qrels``' order."""
    qids = list(qrels)
    n_other = round(share * len(qids)) if others else 0
    picked = np.random.default_rng(seed).permutation(len(qids))[:n_other]
    owner = {qids[i]: others[j % len(others)] for j, i in enumerate(sorted(picked))}
    return {key: {q: v for q, v in qrels.items() if owner.get(q, main) == key} for key in (main, *others)}


def _sample(qrels: Qrels, n: int | None, seed: int) -> Qrels:
    """A seeded sample of ``n`` of the queries (all when ``n`` is None or not smaller), in their order."""
    if n is None or len(qrels) <= n:
        return qrels
    if n < 1:
        raise AdapterError(f"a sample of {n} questions: must be at least 1")
    keep = set(np.random.default_rng(seed).choice(sorted(qrels), n, replace=False).tolist())
    return {q: v for q, v in qrels.items() if q in keep}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """The judge's metrics of an evaluator's answer (without its fusion weight and the reranker-alone score)."""
    return {m: float(values[m]) for m in METRICS}


def _strip(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"eval_ndcg@10": v, ...}`` -> ``{"ndcg@10": v, ...}``, the judge's metrics only."""
    return {m: float(metrics[f"eval_{m}"]) for m in METRICS}


def model_card(meta: dict[str, Any], name: str) -> str:
    """A short README.md: start model, first stage, data, the validation table and how it was trained."""
    first = f"`{meta['first_stage']}`" + (f" with the adapter `{meta['adapter']}`" if meta.get("adapter") else "")
    fusion = meta.get("fusion_weight") or 0.0
    kept = f"kept epoch ({meta['best_epoch']:g}) reranking" + (f", fused at weight {fusion:g}" if fusion else "")
    start_fusion = (meta.get("val_start") or {}).get(next(iter(meta["val_base"])), {}).get("fusion")
    start = "start model reranking" + (f", fused at weight {start_fusion:g}" if start_fusion else "")
    rows = [f"| {label} | " + " | ".join(f"{next(iter(meta[key].values()))[m]:.4f}" for m in
                                          (PRIMARY_METRIC, "accuracy@1", "accuracy@10", "mrr@10")) + " |"
            for label, key in (("first stage alone", "val_base"), (start, "val_start"), (kept, "val_best"))
            if meta[key]]
    alone = (meta.get("val_alone") or {}).values()
    alone_line = ([f"The reranker's own order (no fusion) scored {PRIMARY_METRIC} "
                   f"{next(iter(alone))[PRIMARY_METRIC]:.4f}; the final order is by its score + {fusion:g} x the "
                   "first stage's, each standardised over a question's candidates, the weight chosen on these "
                   "validation questions.", ""] if fusion and alone else [])
    losses = {"bce": "BinaryCrossEntropyLoss, positives weighted by the negatives per positive",
              "mnrl": "MultipleNegativesRankingLoss", "lambda": "LambdaLoss over each question's list of chunks"}
    cosine = "cosine head" in meta["start_kind"]
    load = (["from adapter.rerank import load_reranker", "",  # CosineHead by import: no remote code is ever enabled
             f'reranker = load_reranker("path/to/{name}").model  # a sentence-transformers CrossEncoder']
            if cosine else ["from sentence_transformers import CrossEncoder", "",
                            f'reranker = CrossEncoder("path/to/{name}")'])
    k = meta["rerank_k"]
    best, alone_first = (next(iter(meta[key].values()))[PRIMARY_METRIC] for key in ("val_best", "val_base"))
    worse = best <= alone_first
    front = ["library_name: sentence-transformers", f"base_model: {meta['start_model']}", "pipeline_tag: text-ranking",
             "tags: [sentence-transformers, cross-encoder, reranker, retrieval]"]
    return card(front, name, [
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
        *alone_line,
        *(["On validation this reranker does not beat the first stage alone: check it with `adapter compare "
           "--reranker` before putting it in front of users.", ""] if worse else []),
        "## Training",
        "",
        f"sentence-transformers' CrossEncoderTrainer, loss `{meta['rerank_loss']}` "
        f"({losses.get(meta['rerank_loss'], meta['rerank_loss'])}), {meta['rerank_epochs']} epoch(s) "
        f"(time budget: {meta['rerank_max_train_seconds'] or 'none'} s), batch "
        f"{meta['rerank_batch_size']}, learning rate {meta['rerank_lr']:g} with {meta['rerank_warmup']:g} warmup then "
        f"linear decay, pairs truncated to {meta['rerank_max_seq_length'] or 'the model maximum of'} tokens, seed "
        f"{meta['seed']}; {meta['train_seconds']:.0f} s of training wall time."
        + (f" The loss ranked each list by the model's score + {meta['prior_weight']:g} x the first stage's score "
           "(standardised over its top k), so the model learned to correct the first stage's order: use it fused "
           "with the first stage, as `adapter evaluate --reranker` does." if meta.get("prior_weight") else ""),
        "",
        "## Use",
        "",
        "```python",
        *load,
        'ranked = reranker.rank("my question", candidate_chunks)',
        "```",
        "",
        f"Or score a reranked system: `adapter evaluate DIR --reranker path/to/{name} --set rerank.k={k}`.",
    ])
