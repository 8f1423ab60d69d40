"""Which recipe to train, and the trustworthy way to choose it: recipe trials on cross-fitted folds, a noise-aware
choice with the identity always competing, and the chosen recipe refit on every training question.

``train_adapter`` (a dataset) and ``train_on_vectors`` (arrays) are the library's entries; ``resolve_train`` makes
their options concrete and checks them, once. ``train_on_vectors`` measures coverage (the share of the corpus with
training questions) and deals the training questions into cross-fitting folds (``cross_folds``), whatever way the
dataset was split: each question is scored once as a *seen*-chunk question (held out, its chunk's other questions
trained on) and once as an *unseen*-chunk one (its whole chunk held out), each time by a fit that never saw it. Each
recipe of a small set is fitted (``adapter.train.fit``) on every fold and its paired per-question changes pooled; the
recipe is chosen by ``objective`` with a rule that allows for the noise (a standard error clustered by chunk, since
questions about one chunk rise and fall together), then refit on every training question. At two questions per
chunk a 10% slice held a few dozen questions and no real gain cleared the noise; pooled folds hold them all, so the
test's power grows with the data. Recipes use a fixed number of epochs and average the late ones; only a handful
compete, and the identity always does, unless a recipe is asked for by name.

Chunks of the index that no training question is about are known before training: the ``uncovered-*`` recipes pull
the map toward the identity on their own vectors, so it stays put where their questions would land. A trial trains
as if the unseen slice's chunks were not indexed yet, so the unseen-chunk estimate stands for chunks added later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from adapter.config import FORMS, Config, TrainConfig, default_dims
from adapter.corpus import CorpusSource, EncodedCorpus
from adapter.data import Dataset, Qrels, fingerprint, relevant
from adapter.errors import AdapterError
from adapter.evaluate import PRIMARY_METRIC, id_rank
from adapter.evaluate import evaluate as judge
from adapter.lora import QueryLora, fit_lora
from adapter.model import LinearAdapter, estimate_change
from adapter.train import (
    EPOCH_CHOICES,
    Split,
    TrainResult,
    bounded,
    fit,
    primary,
    torch_threads,
    training_pairs,
    uncovered_rows,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from adapter.encoder import Encoder

logger = logging.getLogger(__name__)

OBJECTIVES = ("both", "seen")
# The recipe axes: everything else (lr, epochs, batch, margin, temperature) is shared by every recipe.
RECIPE_FIELDS = ("loss", "infonce_candidates", "rank", "identity_penalty", "matryoshka", "epoch_choice",
                 "uncovered_pull")


def _recipe(loss: str = "infonce", candidates: str = TrainConfig.infonce_candidates, rank: int | None = None,
            pull: float = 0.0,
            matryoshka: bool = True, epochs: str = "average", uncovered: float = 0.0) -> dict[str, Any]:
    return {"loss": loss, "infonce_candidates": candidates, "rank": rank, "identity_penalty": pull,
            "matryoshka": matryoshka, "epoch_choice": epochs, "uncovered_pull": uncovered}


RECIPES: dict[str, dict[str, Any]] = {
    # the seed notebook's loss, kept by name: triplets with random negatives, full matrix, best validation epoch
    "triplet": _recipe("triplet", matryoshka=False, epochs="best"),
    # InfoNCE (MultipleNegativesRankingLoss's form) over the other in-batch positives, late epochs averaged
    "infonce": _recipe(matryoshka=False),
    # InfoNCE over every chunk of the corpus: all negatives at once (a d x N product per step, cheap below ~100k)
    "infonce-corpus": _recipe(candidates="corpus", matryoshka=False),
    # the in-batch loss summed over every Matryoshka dim, so truncated vectors gain too
    "matryoshka": _recipe(),
    # ... pulled toward the identity: the pull sets how far the map moves, so how much chunks without training
    # questions move with it (0.01 gains most on seen chunks, 0.1 and 0.3 keep unseen chunks at or above base)
    "pull-0.01": _recipe(pull=0.01),
    "pull-0.03": _recipe(pull=0.03),
    "pull-0.1": _recipe(pull=0.1),
    "pull-0.3": _recipe(pull=0.3),
    # low-rank residual x + xUV: a few directions only, the rest of the space untouched
    "lowrank": _recipe(rank=16, pull=0.01),
    # the light pull, and a pull measured on the chunks without training questions (their own vectors as
    # pseudo-queries): where a query log covers part of the index, the map stays put near the rest of it
    "uncovered-0.3": _recipe(pull=0.01, uncovered=0.3),
    "uncovered-1": _recipe(pull=0.01, uncovered=1.0),
}
# what recipe="auto" chooses from, the most constrained first: the order ``select`` prefers. The uncovered pulls
# lead: they hold the map where the index has chunks without questions (with none, they are pull-0.01, whose
# unseen-chunk estimate then decides); then the uniform pulls, strongest first
AUTO_RECIPES = ("uncovered-1", "uncovered-0.3", "pull-0.3", "pull-0.1", "lowrank", "pull-0.03", "pull-0.01")
MANUAL_FIELDS = ("loss", "negatives", "rank", "identity_penalty")  # setting one of these means "manual"
MIN_SEEN_QUERIES = 4  # questions needed to hold out a seen-chunk slice (one held out, three left to train on)
MIN_UNSEEN_CHUNKS = 5  # chunks with questions needed to hold out whole chunks and still train on four
GAIN_Z = 2.0  # a recipe must beat the identity by this many standard errors of its gain (see select)
# The query-side LoRA's trial (train.form "lora" or "auto"): one more contender, after the linear recipes, so a
# linear map that validates as well within noise is preferred (select's order)
LORA = "lora"


# ------------------------------------------------------------------------------------- options, once at the edge


def resolve_train(cfg: Config) -> Config:
    """The training options made concrete and checked, once, where a run enters the library (``train_adapter``,
    ``train_on_vectors``; the CLI calls it before any model loads): "auto" with a recipe axis set away from its
    default means "manual", a manual recipe's "auto" loss becomes its form's (``resolve_loss``), and options no
    recipe can run with are one-line errors. What it returns passes through it unchanged, and everything below it
    (the trials, ``adapter.train.fit``) trusts it."""
    cfg = resolve_recipe(cfg)
    if cfg.train.recipe == "manual":  # only the manual recipe trains with the config's own loss
        cfg = resolve_loss(cfg)
    check_options(cfg)
    return cfg


def resolve_recipe(cfg: Config) -> Config:
    """"auto" with a recipe axis set away from its default (``train.loss``, ``train.negatives``,
    ``train.rank``, ``train.identity_penalty``) means the user chose the recipe: "manual"."""
    default = TrainConfig()
    if cfg.train.recipe == "auto" and any(getattr(cfg.train, f) != getattr(default, f) for f in MANUAL_FIELDS):
        return cfg.replace(recipe="manual")
    return cfg


def resolve_loss(cfg: Config) -> Config:
    """The "auto" loss made concrete: triplet for the full matrix (unchanged), InfoNCE for the low-rank form, which
    learns far less from triplets (rank 16 on AppleQA kept 65% of the full adapter's gain with triplet, 98% with
    InfoNCE: bench/bench_tiny.py)."""
    if cfg.train.loss != "auto":
        return cfg
    return cfg.replace(train={"loss": "triplet" if cfg.train.rank is None else "infonce"})


def check_options(cfg: Config) -> None:
    """One-line errors for training options no recipe can run with."""
    tc = cfg.train
    if tc.loss not in ("triplet", "infonce", "auto"):
        raise AdapterError(f"train.loss must be 'triplet' or 'infonce', not {tc.loss!r}")
    if tc.negatives not in ("random", "hard"):
        raise AdapterError(f"train.negatives must be 'random' or 'hard', not {tc.negatives!r}")
    if tc.epoch_choice not in EPOCH_CHOICES:
        raise AdapterError(f"train.epoch_choice must be one of {', '.join(EPOCH_CHOICES)}, not {tc.epoch_choice!r}")
    if tc.objective not in OBJECTIVES:
        raise AdapterError(f"train.objective must be 'both' or 'seen', not {tc.objective!r}")
    if tc.recipe not in ("auto", "manual", *RECIPES, LORA):
        raise AdapterError(f"train.recipe must be 'auto', 'manual', {LORA!r} or one of {', '.join(RECIPES)}, not "
                           f"{tc.recipe!r}")
    if isinstance(tc.identity_penalty, bool) or not isinstance(tc.identity_penalty, (int, float)) or \
            not tc.identity_penalty >= 0:
        raise AdapterError(f"train.identity_penalty must be a number >= 0, not {tc.identity_penalty!r}")
    if tc.uncovered_pull < 0:
        raise AdapterError(f"train.uncovered_pull must be >= 0, not {tc.uncovered_pull}")
    if tc.folds < 2 or tc.crossfit_questions < 1:
        raise AdapterError(f"train.folds must be >= 2 and train.crossfit_questions >= 1, not {tc.folds} and "
                           f"{tc.crossfit_questions}")
    if tc.form not in FORMS:
        raise AdapterError(f"train.form must be one of {', '.join(FORMS)}, not {tc.form!r}")
    if tc.form == LORA and tc.recipe not in ("auto", LORA):
        raise AdapterError(f"train.recipe {tc.recipe!r} names a linear recipe, and train.form 'lora' trains none: "
                           "use train.form 'auto' to let both compete, or leave the recipe out")
    if tc.recipe == LORA and tc.form == "linear":
        raise AdapterError("train.recipe 'lora' is the query LoRA: set train.form 'lora' (or 'auto') with it")
    if tc.epochs < 0 or tc.batch_size < 1 or tc.lr <= 0:
        raise AdapterError(f"train.epochs must be >= 0, train.batch_size >= 1 and train.lr > 0, got {tc.epochs}, "
                           f"{tc.batch_size} and {tc.lr}")


def recipe_config(cfg: Config, name: str) -> Config:
    """The config a named recipe trains with: its axes over the shared settings ("manual": the config as given)."""
    return cfg if name == "manual" else cfg.replace(train=RECIPES[name])


def recipe_names(cfg: Config) -> list[str]:
    """The recipes a run tries: the one named, "manual" (the config's own settings), or the auto set; then the
    query-side LoRA (``LORA``) where ``train.form`` asks for it, alone under "lora"."""
    tc = cfg.train
    linear = [] if LORA in (tc.form, tc.recipe) else list(AUTO_RECIPES) if tc.recipe == "auto" else [tc.recipe]
    return linear + ([LORA] if tc.form != "linear" else [])


# ------------------------------------------------------------------------------------------------- the entries


@dataclass
class QueryRoute:
    """What the query LoRA trains through: the local encoder and the training questions' texts (by id)."""

    model: SentenceTransformer
    texts: dict[str, str]


def train_adapter(dataset: Dataset, cfg: Config | None = None, *, encoder: Encoder | None = None,
                  corpus: CorpusSource | None = None, progress: bool = True) -> TrainResult:
    """Train an adapter on a dataset's training split with the encoder's cached embeddings (``train_on_vectors``;
    default encoder: ``cfg.encoder``); the result's adapter carries the resolved config, coverage, both validation
    estimates and every trial.

    ``corpus``: where the corpus vectors come from (``adapter.systems``; e.g. ``adapter.stores.StoreSource``, the
    vectors the index already holds) instead of the encoder's encoding of corpus.jsonl; then only queries are
    embedded."""
    from adapter.encoder import Encoder

    cfg = resolve_train(cfg or Config())
    encoder = encoder or Encoder.from_config(cfg, show_progress=progress)
    train_qrels = relevant(dataset.split(cfg.split.train_split))
    if not train_qrels:
        raise AdapterError(f"{dataset.path}: the {cfg.split.train_split} split has no question with a relevant chunk")
    qids = list(train_qrels)
    source = corpus or EncodedCorpus()
    corpus_ids, corpus = source.read(dataset, encoder)
    missing = sorted({c for rels in train_qrels.values() for c in rels} - set(corpus_ids))
    if missing:
        raise AdapterError(f"{source.name}: holds no vector for {len(missing)} chunks the training queries judge "
                           f"(first: {missing[0]!r}); its ids must be corpus ids")
    queries = encoder.encode_queries([dataset.queries[q] for q in qids])
    lora = None
    if cfg.train.form != "linear":  # the LoRA trains on the questions' texts through the encoder's own weights
        if encoder.model is None:
            raise AdapterError(f"{encoder.name}: train.form {cfg.train.form!r} fits LoRA layers on the encoder's "
                               "weights, so it needs a local sentence-transformers model, not a remote one; use "
                               "train.form 'linear'")
        lora = QueryRoute(encoder.model, {q: dataset.queries[q] for q in qids})
    result = _train_on_vectors(Split(queries, qids, train_qrels), corpus, corpus_ids, encoder.identity, cfg, progress,
                               lora)
    est = result.estimates
    how = "; ".join(f"{k}: {e['queries']:,} questions on {e['chunks']:,} chunks over {e.get('folds', 1)} folds"
                    for k, e in est.items() if e)
    result.adapter.metadata = {
        "base_model_name": encoder.name,
        # the config with the loss "auto" written as the full matrix's (what a manual run of it trains)
        "config": resolve_loss(cfg).to_dict("encoder", "split", "train", *(["lora"] if lora else [])),
        "trained_on": cfg.split.train_split,
        "data_fingerprint": fingerprint(dataset, cfg.split.train_split), "validation": how,
        "recipe": result.recipe, "history_recipe": result.history_recipe, "objective": cfg.train.objective,
        "coverage": result.coverage, "estimates": est,
        "trials": result.trials, "best_epoch": result.best_epoch, "val_base": result.base_val,
        "val_best": result.best_val,
        "train_seconds": result.seconds,  # wall time of trials and refit, read by `adapter compare`
        "history": {"loss": [{"epoch": h["epoch"], "loss": _digits(h["loss"])} for h in result.history[1:]],
                    "val": [{"epoch": h["epoch"], PRIMARY_METRIC: {corpus.shape[1]: _digits(h[PRIMARY_METRIC])}}
                            for h in result.history if PRIMARY_METRIC in h]}}  # 6 digits: a rank-16 file < 30 KB
    return result


def train_on_vectors(train: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str,
                     cfg: Config | None = None, *, progress: bool = True,
                     route: QueryRoute | None = None) -> TrainResult:
    """Train an adapter on arrays the trustworthy way: coverage, two validation slices, recipe trials scored on both,
    a noise-aware choice by ``cfg.train.objective``, and the chosen recipe refit on every training question.
    ``route``: the encoder and the questions' texts, which the query LoRA trains through (``train.form`` "lora" or
    "auto")."""
    return _train_on_vectors(train, corpus, corpus_ids, base_model, resolve_train(cfg or Config()), progress, route)


def _train_on_vectors(train: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str, cfg: Config,
                      progress: bool, lora: QueryRoute | None = None) -> TrainResult:
    if all(len(train.qrels[q]) >= len(corpus_ids) for q in train.ids):
        raise AdapterError(f"every chunk ({len(corpus_ids)}) is relevant to every training question: there is "
                           "nothing to rank, so nothing to learn")
    with torch_threads(1):  # small matmuls: one thread each; trials run side by side instead
        coverage = coverage_of(train.qrels, corpus_ids)
        trials = Trials(train, corpus, corpus_ids, base_model, cfg, lora)
        chosen, early = trials.run(progress)
    if LORA in trials.names:  # minutes of encoder passes, on every core, once the linear trials are done
        chosen, early = trials.run_lora(chosen, early)
    with torch_threads(1) if chosen != LORA else contextlib.nullcontext():
        return trials.ship(chosen, early, coverage, progress)


# ---------------------------------------------------------------------------------------- the recipe trials


class Trials:
    """One run's recipe trials. Every distinct recipe is fitted on every cross-fitted fold (``fold_fit``); once a
    recipe's folds are done, each fold's held-out questions are scored by that fold's own fit and pooled into the
    recipe's row (``trial``); ``choose`` picks among the rows done so far; ``run`` fits them side by side and
    ``ship`` refits the choice on every training question (or ships the identity)."""

    def __init__(self, train: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str, cfg: Config,
                 lora: QueryRoute | None = None):
        self.train, self.corpus, self.corpus_ids, self.base_model, self.cfg = train, corpus, corpus_ids, base_model, cfg
        self.lora = lora
        self.t0 = time.perf_counter()
        self.dim = corpus.shape[1]
        self.dims = list(default_dims(self.dim))
        self.folds, self.warnings = cross_folds(train, cfg)
        self.tie_rank = id_rank(corpus_ids)  # the judge's tie-break, once (seconds at 10^6 ids)
        # each fold's held-out questions and the base's scores on them, and the corpus rows it treats as not indexed
        self.slices = [{k: _Slice.of(getattr(f, k), corpus, corpus_ids, self.dims, cfg, self.tie_rank)
                        for k in ("seen", "unseen")} for f in self.folds]
        self.kinds = [k for k in ("seen", "unseen") if any(s[k] for s in self.slices)]
        self.watch = self.kinds[0]  # its questions are the curves, and pick the epoch a "best" recipe keeps
        self.outside = [held_out_rows(f.unseen, corpus_ids) for f in self.folds]
        self.names = recipe_names(cfg)
        if LORA in self.names and lora is None:
            raise AdapterError(f"train.form {cfg.train.form!r} needs the encoder and the questions' texts")
        linear = [n for n in self.names if n != LORA]
        # a recipe whose uncovered pull has no chunk to act on trains exactly as the same recipe without it (with
        # every chunk covered, the uncovered pulls are pull-0.01): each distinct recipe is fitted once, its row repeated
        bare = all(not len(uncovered_rows(len(corpus_ids), training_pairs(f.fit, corpus_ids).rows[:, 1], o))
                   for f, o in zip(self.folds, self.outside, strict=True))
        self.effective = {n: recipe_config(cfg, n).train if not bare else
                          recipe_config(cfg, n).replace(uncovered_pull=0.0).train for n in linear}
        self.first = {n: next(m for m in linear if self.effective[m] == self.effective[n]) for n in linear}
        self.first.update({LORA: LORA} if LORA in self.names else {})
        self.fitted: dict[str, tuple[dict[str, Any], list[TrainResult]]] = {}  # recipe -> (its row, its fold fits)
        self.halt = threading.Event()  # set on an error or an interrupt: every running fit stops at its next step

    def fold_fit(self, name: str, f: int) -> TrainResult:
        """The recipe fitted on fold ``f``'s training questions (with its own slice to pick a "best" epoch)."""
        tcfg = recipe_config(self.cfg, name)
        watch = self.slices[f][self.watch]
        per_epoch = tcfg.train.epoch_choice == "best" and watch is not None
        return fit(self.folds[f].fit, watch.split if per_epoch else None, self.corpus, self.corpus_ids,
                   self.base_model, tcfg, progress=False, tie_rank=self.tie_rank,
                   base_val=watch.base_metrics() if per_epoch else None, outside=self.outside[f], stop=self.halt)

    def trial(self, name: str, fits: list[TrainResult]) -> tuple[dict[str, Any], list[TrainResult]]:
        """The recipe's row: every fold's held-out questions scored by the fold's own fit, pooled."""
        scores, metrics = {}, {}
        for k in self.kinds:
            parts = [(s[k], s[k].score(r.adapter, self.corpus, self.corpus_ids, self.dims, self.tie_rank))
                     for s, r in zip(self.slices, fits, strict=True) if s[k]]
            scores[k], metrics[k] = pooled([p[0] for p in parts], [p[1] for p in parts], self.dims)
        r = fits[0]  # the first fold's curves stand for the recipe's, ends scored on every fold
        base_metrics = self.base_pooled(self.watch)[1]
        r.base_val, r.best_val = {self.dim: base_metrics}, {self.dim: metrics[self.watch]}
        r.history[0].update(primary(base_metrics))
        r.history[-1].update(primary(metrics[self.watch]))
        row = {**_fields(self.cfg, name), **{k: scores.get(k) for k in ("seen", "unseen")},
               "epoch": int(np.median([x.best_epoch for x in fits])), "seconds": _r(sum(x.seconds for x in fits))}
        return row, fits

    def base_pooled(self, kind: str) -> tuple[dict[str, Any], dict[str, float]]:
        """``pooled`` for the base (the identity) on every fold's slice of this kind: its estimate and metrics."""
        held = [s[kind] for s in self.slices if s[kind]]
        return pooled(held, [s.score(None, self.corpus, self.corpus_ids, self.dims) for s in held], self.dims)

    def rows(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, trial row) in the choice's order for every recipe whose folds are done; a repeat is its twin's."""
        return [(n, self.fitted[n][0] if self.first[n] == n else
                 {**self.fitted[self.first[n]][0], **_fields(self.cfg, n), "same_as": self.first[n]})
                for n in self.names if self.first[n] in self.fitted]

    def choose(self) -> str | None:
        """The recipe the rows done so far choose, None for the identity; a recipe asked for by name ships."""
        named = self.rows()
        if self.cfg.train.recipe == LORA:  # the query LoRA asked for by name ships
            return LORA if LORA in self.fitted else None
        if self.cfg.train.recipe != "auto" and LORA not in self.names:  # a recipe asked for by name ships
            return named[0][0] if named else None
        tc = self.cfg.train
        pick = select([dict(row) for _, row in named], tc.objective, tc.safety_z, tc.simpler_within)
        return None if pick is None else named[pick][0]

    def refit(self, name: str, stop: threading.Event | None = None, show: bool = False) -> TrainResult:
        """The recipe fitted on every training question; a "best" recipe for the folds' median best epoch."""
        if name == LORA:
            return self.refit_lora(stop)
        rc = recipe_config(self.cfg, name)
        if rc.train.epoch_choice == "best":  # the folds' median best epoch, on every question (0: the identity)
            keep = self.fitted[self.first[name]][0]["epoch"]
            if keep == 0:
                return TrainResult(LinearAdapter.identity(self.dim, self.base_model, rank=rc.train.rank,
                                                          seed=self.cfg.seed), 0)
            rc = rc.replace(train={"epochs": keep, "epoch_choice": "last"})
        return fit(self.train, None, self.corpus, self.corpus_ids, self.base_model, rc, progress=show, stop=stop)

    def run(self, progress: bool) -> tuple[str | None, TrainResult | None]:
        """Every fold fit, ``train.workers`` at a time, then the choice on every row. With nothing left to queue
        and a worker idle, the recipe the finished trials choose is refit beside the last fits: kept when the final
        choice agrees, stopped when it does not. Returns the choice and that refit (None when not kept)."""
        distinct = run_order([n for n in self.names if self.first[n] == n and n != LORA], self.effective)
        tasks = [(n, f) for n in distinct for f in range(len(self.folds))]
        workers = max(1, min(len(tasks), self.cfg.train.workers))
        fits: dict[str, dict[int, TrainResult]] = {n: {} for n in distinct}
        ahead: tuple[str, Future, threading.Event] | None = None  # (recipe, its refit, stop): started before the choice
        with ThreadPoolExecutor(workers) as pool:
            running = {pool.submit(self.fold_fit, n, f): (n, f) for n, f in tasks}
            bar = tqdm(total=len(tasks), desc=f"recipes x {len(self.folds)} folds", disable=not progress or not tasks)
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for job in finished:
                        name, f = running.pop(job)
                        fits[name][f] = job.result()
                        bar.update()
                        if len(fits[name]) == len(self.folds):
                            self.fitted[name] = self.trial(name, [fits[name][i] for i in range(len(self.folds))])
                            logger.debug("trial %s done at %.0f s", name, time.perf_counter() - self.t0)
                    # nothing left to queue and a worker idle: refit the recipe the trials so far choose while the
                    # last ones run; the choice is made on every trial as before, and a refit it does not keep stops
                    if ahead is None and running and len(running) < workers:
                        guess = self.choose()
                        if guess is not None:
                            logger.info("refitting %s on every training question while %d fit(s) run", guess,
                                        len(running))
                            stop = threading.Event()
                            ahead = (guess, pool.submit(self.refit, guess, stop), stop)
            except BaseException:
                self.halt.set()
                for job in running:
                    job.cancel()
                if ahead is not None:
                    ahead[2].set()
                raise
            finally:
                bar.close()
            chosen = self.choose()
            if ahead is None or ahead[0] == chosen:
                return chosen, ahead[1].result() if ahead is not None else None
            ahead[2].set()
            logger.info("the last trials moved the choice from %s to %s: its refit stopped", ahead[0], chosen)
            return chosen, None

    def run_lora(self, chosen: str | None, early: TrainResult | None) -> tuple[str | None, TrainResult | None]:
        """The query LoRA's trial, then the choice again with its row: the linear refit made ahead is kept when the
        choice stays."""
        self.fitted[LORA] = self.lora_trial()
        now = self.choose()
        return now, early if now == chosen else None

    def lora_trial(self) -> tuple[dict[str, Any], list[TrainResult]]:
        """The query LoRA's row: fitted on the first fold only (a fit costs minutes of encoder passes, not seconds),
        its epoch picked on that fold's watched slice as a "best" recipe's is, both slices scored through the
        adapted encoder and estimated as the linear trials' are, on fewer questions (its s.e. says so)."""
        assert self.lora is not None
        watch = self.slices[0][self.watch]
        fitted = fit_lora(self.lora.model, self.folds[0].fit, self.lora.texts, self.corpus, self.corpus_ids,
                          self.cfg, val=watch.split, tie_rank=self.tie_rank, outside=self.outside[0], stop=self.halt)
        query_lora = QueryLora.from_fit(fitted, self.base_model, self.cfg)
        scores, metrics = {}, {}
        for k in self.kinds:
            s = self.slices[0][k]
            if s:
                vectors = query_lora.encode_queries([self.lora.texts[q] for q in s.split.ids])
                scores[k], metrics[k] = pooled([s], [s.score_vectors(vectors, self.corpus, self.corpus_ids,
                                                                      self.dims, self.tie_rank)], self.dims)
        r = TrainResult(query_lora, fitted.best_epoch, fitted.history, {self.dim: watch.base_metrics()},
                        {self.dim: metrics[self.watch]}, fitted.seconds)
        row = {**_fields(self.cfg, LORA), **{k: scores.get(k) for k in ("seen", "unseen")},
               "epoch": fitted.best_epoch, "seconds": _r(fitted.seconds)}
        logger.info("trial lora done at %.0f s", time.perf_counter() - self.t0)
        return row, [r]

    def refit_lora(self, stop: threading.Event | None = None) -> TrainResult:
        """The query LoRA fitted on every training question for the epochs its trial kept."""
        assert self.lora is not None
        keep = self.fitted[LORA][0]["epoch"]
        fitted = fit_lora(self.lora.model, self.train, self.lora.texts, self.corpus, self.corpus_ids, self.cfg,
                          epochs=keep, tie_rank=self.tie_rank, stop=stop)
        return TrainResult(QueryLora.from_fit(fitted, self.base_model, self.cfg), keep, fitted.history,
                           seconds=fitted.seconds)

    def ship(self, chosen: str | None, early: TrainResult | None, coverage: dict[str, Any],
             progress: bool) -> TrainResult:
        """What ships: the chosen recipe refit on every question (``early`` when it was refit ahead) with its
        validated trial's curves and scores, or the identity in the closest trial's form with a line saying why."""
        names, cfg, warnings = self.names, self.cfg, self.warnings
        trials = [row for _, row in self.rows()]
        done = [self.fitted[self.first[n]][1][0] for n in names]  # each recipe's first fold fit: its curves
        if chosen is None:
            recipe = "identity"
            estimates = {k: self.base_pooled(k)[0] if k in self.kinds else None for k in ("seen", "unseen")}
            # the curves of the trial that came closest, so a user sees what was tried and why it did not ship
            closest = max(range(len(trials)), key=[_gain(t)["delta"] for t in trials].__getitem__)
            warnings.append(identity_line(trials[closest], cfg.train.objective))
            # the identity in that trial's form (size, dtype); the linear identity for the LoRA's (the base exactly)
            form = recipe_config(cfg, names[closest]).train.rank if names[closest] != LORA else None
            shipped = TrainResult(LinearAdapter.identity(self.dim, self.base_model, rank=form, seed=cfg.seed), 0,
                                  done[closest].history)
            shipped.base_val = shipped.best_val = done[closest].base_val
            shipped.history_recipe = names[closest]
        else:
            pick = names.index(chosen)
            recipe, estimates = chosen, {k: trials[pick][k] for k in ("seen", "unseen")}
            if cfg.train.recipe != "auto" and not _clears(trials[pick]):
                warnings.append(f"{recipe} ships because it was asked for, though its validation gain is within "
                                f"noise ({_gain_words(trials[pick])}); the automatic choice would ship the identity")
            shipped = early if early is not None else self.refit(recipe, show=progress)
            shipped.history = done[pick].history  # the curves of the validated trial
            shipped.base_val, shipped.best_val = done[pick].base_val, done[pick].best_val
            shipped.history_recipe = recipe
        for t in trials:
            t["chosen"] = t["recipe"] == recipe
        if coverage["covered"] < coverage["chunks"]:
            warnings.append(partial_coverage_line(coverage, estimates.get("unseen")))
        for w in warnings:
            logger.warning("%s", w)
        shipped.seconds = time.perf_counter() - self.t0
        shipped.recipe, shipped.coverage, shipped.estimates = recipe, coverage, estimates
        shipped.trials, shipped.warnings = trials, warnings
        logger.info("chose %s (objective %s) from %s in %.1f s", recipe, cfg.train.objective, ", ".join(names),
                    shipped.seconds)
        return shipped


def run_order(names: Sequence[str], effective: dict[str, TrainConfig]) -> list[str]:
    """The order recipe trials start in, the costliest first so the workers finish together: an uncovered pull (a d^3
    product per step), then the other full matrices, then low rank (a few directions), each in the given order. The
    last to start is so the cheapest, and, as low rank gains least on seen chunks in every cell of BENCHMARKS.md's
    recipe grid, the trial least likely to move the choice that the refit started beside it bets on."""
    cost = [0 if effective[n].uncovered_pull else 1 if effective[n].rank is None else 2 for n in names]
    return [names[i] for i in sorted(range(len(names)), key=cost.__getitem__)]


def _fields(cfg: Config, name: str) -> dict[str, Any]:
    """A trial row's name and recipe settings, as metadata stores them."""
    if name == LORA:
        return {"recipe": LORA, **{k: _jsonable(v) for k, v in dataclasses.asdict(cfg.lora).items()}}
    tcfg = recipe_config(cfg, name)
    return {"recipe": name, **{f: _jsonable(getattr(tcfg.train, f)) for f in RECIPE_FIELDS}}


def _jsonable(v: Any) -> Any:
    return v if v is None or isinstance(v, (str, bool, int, float)) else str(v)


# ------------------------------------------------------------------------------------------ coverage and folds


def coverage_of(qrels: Qrels, corpus_ids: Sequence[str]) -> dict[str, Any]:
    """How much of the corpus the training questions cover: chunks with at least one relevant training question."""
    covered = {c for r in relevant(qrels).values() for c in r} & set(corpus_ids)
    return {"chunks": len(corpus_ids), "covered": len(covered), "share": len(covered) / max(1, len(corpus_ids))}


@dataclass
class Fold:
    """One cross-fitting fold: the questions its fit trains on and the two kinds of held-out questions it scores."""

    fit: Split
    seen: Split | None  # questions held out by query: their chunks' other questions stay in the fit
    unseen: Split | None  # every question about a group of whole chunks, not even indexed during the fit


def cross_folds(train: Split, cfg: Config) -> tuple[list[Fold], list[str]]:
    """Deal the training questions into ``train.folds`` cross-fitting folds, so that every question is scored once
    as a *seen*-chunk question and once as an *unseen*-chunk one, each time by a fit that never trained on it.

    Chunks are dealt into the folds in a seeded order: fold k's unseen slice is every question about its chunks,
    and its fit leaves out every question that touches them. Each chunk's questions are dealt to the other folds,
    one fold each where there are enough, so a seen question's chunk keeps its other questions in the fit that
    scores it. A fit trains on about ``1 - 2 / folds`` of the questions. Folds run in order until their held-out
    questions reach ``train.crossfit_questions``: large data need one fold, small data use them all. Too few chunks
    for the unseen slice leaves it out with a warning; too few questions for either is an error."""
    tc = cfg.train
    k = tc.folds
    rng = np.random.default_rng(cfg.seed)
    warnings: list[str] = []
    chunks = sorted({c for r in train.qrels.values() for c in r})
    if len(train.ids) < MIN_SEEN_QUERIES:
        raise AdapterError(f"too few training questions to validate ({len(train.ids)} on {len(chunks)} chunks): "
                           f"need at least {MIN_SEEN_QUERIES}")
    by_chunk = len(chunks) >= MIN_UNSEEN_CHUNKS
    group = {c: i % k for i, c in enumerate(chunks[j] for j in rng.permutation(len(chunks)))} if by_chunk else {}
    if not by_chunk:
        warnings.append(f"no unseen-chunk estimate: holding out whole chunks needs questions on at least "
                        f"{MIN_UNSEEN_CHUNKS} chunks, the training split has {len(chunks)}")
    questions: dict[str, list[int]] = {}  # each question by its first relevant chunk (as the s.e. clusters them)
    for i, q in enumerate(train.ids):
        questions.setdefault(min(train.qrels[q]), []).append(i)
    fold_of = np.empty(len(train.ids), dtype=np.int64)
    for c in sorted(questions):
        others = np.array([f for f in range(k) if f != group.get(c)])
        mine = np.array(questions[c])[rng.permutation(len(questions[c]))]
        fold_of[mine] = others[rng.permutation(len(others))][np.arange(len(mine)) % len(others)]
    touches = [{group[c] for c in train.qrels[q]} for q in train.ids] if by_chunk else [set()] * len(train.ids)
    home = np.array([group.get(min(train.qrels[q]), -1) for q in train.ids])
    folds: list[Fold] = []
    scored = 0
    for f in range(k):
        fit_rows = [i for i in range(len(train.ids)) if fold_of[i] != f and f not in touches[i]]
        seen_rows = [i for i in range(len(train.ids)) if fold_of[i] == f and f not in touches[i]]
        unseen_rows = np.flatnonzero(home == f).tolist()
        if not fit_rows or not (seen_rows or unseen_rows):
            continue
        folds.append(Fold(_rows(train, fit_rows), _rows(train, seen_rows) if seen_rows else None,
                          _rows(train, unseen_rows) if unseen_rows else None))
        scored += len(seen_rows) or len(unseen_rows)
        if scored >= tc.crossfit_questions:
            break
    if not folds:
        raise AdapterError(f"too few training questions to validate ({len(train.ids)} on {len(chunks)} chunks): "
                           f"no fold has both questions to train on and questions to score")
    return folds, warnings


def _rows(split: Split, rows: Sequence[int]) -> Split:
    ids = [split.ids[i] for i in rows]
    return Split(split.vectors[list(rows)], ids, {q: split.qrels[q] for q in ids})


def held_out_rows(unseen: Split | None, corpus_ids: Sequence[str]) -> np.ndarray | None:
    """Corpus rows of the unseen slice's chunks: a trial trains as if they were not yet indexed."""
    if unseen is None:
        return None
    held = {c for r in unseen.qrels.values() for c in r}
    return np.array([i for i, c in enumerate(corpus_ids) if c in held], dtype=np.int64)


# ---------------------------------------------------------------------------------------- scores and estimates


def _per_query(vectors: np.ndarray, corpus: np.ndarray, s: Split, corpus_ids: list[str], dims: Sequence[int],
               tie_rank: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each scored query's ndcg@10 at every dim of ``dims`` (len(dims), n), and every metric of each query at the
    full dim (``dims[0]``)."""
    r = judge(vectors, corpus, s.qrels, s.ids, corpus_ids, dims, per_query=True, tie_rank=tie_rank)
    return np.stack([r[d][PRIMARY_METRIC] for d in dims]), {m: np.asarray(v) for m, v in r[dims[0]].items()}


def clustered_se(delta: np.ndarray, groups: Sequence[str]) -> float:
    """Standard error of mean(delta) with queries clustered by group (their chunk): questions about one chunk move
    together, so they count as one draw, not many (the CR1 sandwich estimator)."""
    g = np.unique(np.asarray(groups, dtype=object), return_inverse=True)[1]
    n_groups = int(g.max()) + 1 if len(g) else 0
    if n_groups < 2:
        return float("inf")
    sums = np.bincount(g, weights=delta - delta.mean(), minlength=n_groups)
    return float(np.sqrt(n_groups / (n_groups - 1) * (sums ** 2).sum()) / len(delta))


@dataclass
class _Slice:
    """One fold's held-out questions of one kind, their chunk groups and the base's scores on them, computed once
    for every trial."""

    split: Split  # the questions scored (``bounded``)
    held_out: int  # questions held out before sampling
    groups: list[str]
    base: np.ndarray  # (len(dims), n) per-query ndcg@10 at each dim
    base_full: dict[str, np.ndarray]  # every metric of each query at the full dim

    @classmethod
    def of(cls, s: Split | None, corpus: np.ndarray, corpus_ids: list[str], dims: Sequence[int],
           cfg: Config | None = None, tie_rank: np.ndarray | None = None) -> _Slice | None:
        """The slice's scored questions (``bounded`` by ``cfg``) and the base's scores on them."""
        scored = bounded(s, len(corpus_ids), cfg or Config())
        if scored is None:
            return None
        tie_rank = id_rank(corpus_ids) if tie_rank is None else tie_rank
        base, full = _per_query(scored.vectors, corpus, scored, corpus_ids, dims, tie_rank)
        return cls(scored, len(s.ids), [min(scored.qrels[q]) for q in scored.ids], base, full)

    def base_metrics(self) -> dict[str, float]:
        """The base's mean metrics at the full dim on this slice."""
        return {m: float(np.mean(v)) for m, v in self.base_full.items()}

    def score(self, adapter: LinearAdapter | None, corpus: np.ndarray, corpus_ids: list[str], dims: Sequence[int],
              tie_rank: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The adapter's per-query scores, as ``base`` and ``base_full`` hold the base's (None: the base's own)."""
        if adapter is None:
            return self.base, self.base_full
        return self.score_vectors(adapter.apply(self.split.vectors), corpus, corpus_ids, dims, tie_rank)

    def score_vectors(self, vectors: np.ndarray, corpus: np.ndarray, corpus_ids: list[str], dims: Sequence[int],
                      tie_rank: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The per-query scores of these questions' vectors from another query encoder (the query LoRA's)."""
        tie_rank = id_rank(corpus_ids) if tie_rank is None else tie_rank
        return _per_query(vectors, corpus, self.split, corpus_ids, dims, tie_rank)


def pooled(slices: Sequence[_Slice], scores: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]],
           dims: Sequence[int]) -> tuple[dict[str, Any], dict[str, float]]:
    """One estimate from every fold's slice of a kind, each scored by the fit that did not see it: ndcg@10 of base
    and adapter at full dim, the mean per-query change over dims with its s.e. clustered by chunk (``by_dim``: at
    each dim alone), and the adapter's mean metrics at full dim (its validation score)."""
    base = np.concatenate([s.base for s in slices], axis=1)  # (len(dims), n)
    deltas = np.concatenate([sc[0] for sc in scores], axis=1) - base
    groups = [g for s in slices for g in s.groups]
    metrics = {m: float(np.mean(np.concatenate([sc[1][m] for sc in scores]))) for m in scores[0][1]}
    base_full = float(np.mean(np.concatenate([s.base_full[PRIMARY_METRIC] for s in slices])))
    delta = deltas.mean(axis=0)  # each query's change, mean over dims
    by_dim = {int(d): {"delta": _r(float(v.mean())), "se": _r(clustered_se(v, groups))}
              for d, v in zip(dims, deltas, strict=True)}
    return {"queries": len(groups), "held_out": sum(s.held_out for s in slices), "chunks": len(set(groups)),
            "folds": len(slices), "base": _r(base_full), "adapter": _r(metrics[PRIMARY_METRIC]),
            "delta": _r(float(delta.mean())), "se": _r(clustered_se(delta, groups)),
            "base_mean": _r(float(base.mean())), "by_dim": by_dim}, metrics


def _digits(v: float) -> float:
    return float(f"{v:.6g}")


def _r(x: float) -> float | None:
    """Six significant digits for the file's metadata; None for an infinite s.e. (JSON has no Infinity)."""
    return float(f"{x:.6g}") if np.isfinite(x) else None


# ------------------------------------------------------------------------------------------------- the choice


def _se(e: dict[str, Any]) -> float:
    return float("inf") if e["se"] is None else e["se"]


def _safe(unseen: dict[str, Any] | None, objective: str, z: float, worst_dim: bool) -> bool:
    """Whether a trial's unseen-chunk change is at or above base within ``z`` standard errors (``worst_dim``: at
    every dim alone); any trial is safe under objective "seen" or without an unseen estimate."""
    if objective != "both" or unseen is None:
        return True
    parts = list(unseen["by_dim"].values()) if worst_dim and unseen.get("by_dim") else [unseen]
    return all(e["delta"] >= -z * _se(e) for e in parts)


def select(trials: Sequence[dict[str, Any]], objective: str, z: float, within: float = 0.0, *,
           worst_dim: bool = False, gain_z: float = GAIN_Z) -> int | None:
    """Index of the chosen trial, or None for the identity (base), by the validation estimates.

    Gains are means over dims of per-query ndcg@10 changes, each with its clustered standard error; a slice that
    could not be carved is skipped (the seen gain falls back to the unseen one). The identity (gain 0) always
    competes, and a trial beats it only by a gain above ``GAIN_Z`` standard errors: the best of several noisy
    estimates is biased upward (the largest of five pure-noise z-scores averages about 1.2), so a gain within that
    noise is no gain.

    ``seen``: the best seen-chunk gain. ``both``: among trials whose unseen-chunk change is at or above base within
    ``z`` standard errors ("safe"; ``worst_dim``: at every dim alone, not on the mean over dims), the first in the
    given order (most constrained first) whose seen gain is within ``within`` standard errors of the best safe one:
    Breiman's one-standard-error rule, since a constrained map that validates as well within noise moves unseen
    chunks less."""
    ok = []
    for i, t in enumerate(trials):
        t["safe"] = _safe(t.get("unseen"), objective, z, worst_dim)
        if t["safe"] and _gain(t)["delta"] > gain_z * _se(_gain(t)):
            ok.append(i)
    if not ok:
        return None
    gains = {i: _gain(trials[i])["delta"] for i in ok}
    best = max(ok, key=gains.__getitem__)
    if objective != "both" or not within:
        return best
    floor = gains[best] - within * _se(_gain(trials[best]))
    return next(i for i in ok if gains[i] >= floor)


def _gain(t: dict[str, Any]) -> dict[str, Any]:
    """The estimate a trial's gain is judged on: seen chunks, or unseen ones where no seen slice could be made."""
    return t.get("seen") or t.get("unseen")


def _clears(t: dict[str, Any]) -> bool:
    """Whether a trial's gain clears ``GAIN_Z`` standard errors (what ``select`` asks of any recipe)."""
    e = _gain(t)
    return e["se"] is not None and e["delta"] > GAIN_Z * e["se"]


# -------------------------------------------------------------------------------------------------- the words


def _gain_words(t: dict[str, Any]) -> str:
    e = _gain(t)
    kind = "seen" if t.get("seen") else "unseen"
    return f"{estimate_change(e)} on {e['queries']:,} {kind}-chunk questions about {e['chunks']:,} chunks"


def identity_line(best: dict[str, Any], objective: str) -> str:
    """Why the identity shipped, in numbers, and what would change it."""
    if not _clears(best):
        why = f"short of the {GAIN_Z:g} standard errors a gain must clear"
    else:
        why = "but it moves unseen chunks below base beyond noise"
    other = "; train.objective 'seen' if every chunk of the index has questions" if objective == "both" else ""
    force = f"train.recipe '{best['recipe']}'" + (" with train.form 'lora'" if best["recipe"] == LORA else "")
    return (f"shipped the identity: the best recipe, {best['recipe']}, changed ndcg@10 by {_gain_words(best)}, "
            f"{why}. More questions per chunk would settle it{other}; {force} ships it anyway")


def partial_coverage_line(coverage: dict[str, Any], unseen: dict[str, Any] | None) -> str:
    """One line for a partly covered corpus: how much has no training questions and what to expect there."""
    missing = coverage["chunks"] - coverage["covered"]
    expect = (f"on such chunks expect ndcg@10 {estimate_change(unseen)} (the unseen-chunk estimate)" if unseen else
              "nothing estimates how the adapter does on them")
    return (f"partial coverage: {missing:,} of {coverage['chunks']:,} chunks ({missing / coverage['chunks']:.0%}) "
            f"have no training questions; {expect}")


def train_summary(result: TrainResult, objective: str) -> list[str]:
    """What `adapter train` prints: coverage, each trial, the choice and why, and both estimates of what shipped."""
    cov = result.coverage
    rule = {"both": "among recipes whose unseen-chunk estimate stays at base within its noise, the most constrained "
                    "whose seen-chunk gain is within noise of the best", "seen": "the best seen-chunk gain"}[objective]
    lines = [f"coverage: {cov['covered']:,} of {cov['chunks']:,} chunks ({cov['share']:.0%}) have training questions",
             f"validation, ndcg@10 change against base ({_held_out_words(result.estimates)}; mean over dims, "
             "± s.e. clustered by chunk):",
             *("  " + t for t in trials_table(result.trials)),
             f"shipped {result.recipe} (objective {objective}: {rule})"]
    for k, e in result.estimates.items():
        if e:
            lines.append(f"{k} chunks ({e['queries']:,} questions on {e['chunks']:,} chunks): ndcg@10 at full dim "
                         f"{e['base']:.4f} -> {e['adapter']:.4f}; {estimate_change(e)} over dims")
    return lines


def _held_out_words(estimates: dict[str, dict[str, Any] | None]) -> str:
    folds = max((e.get("folds", 1) for e in estimates.values() if e), default=1)
    held = max((e["held_out"] for e in estimates.values() if e), default=0)
    return f"{held:,} training questions held out over {folds} cross-fitted fold{'s' if folds > 1 else ''}"


def trials_table(trials: Sequence[dict[str, Any]]) -> list[str]:
    """Each trial's validation scores as aligned text lines: recipe, seen and unseen change, safe, chosen."""
    rows = [("recipe", "seen chunks", "unseen chunks", "")]
    for t in trials:
        mark = "chosen" if t.get("chosen") else ("" if t.get("safe", True) else "unsafe on unseen")
        if t.get("same_as"):  # trained exactly as that recipe here (nothing uncovered to pull on): fitted once
            mark = f"{mark}{', ' if mark else ''}= {t['same_as']}"
        rows.append((t["recipe"], estimate_change(t["seen"]) if t.get("seen") else "n/a",
                     estimate_change(t["unseen"]) if t.get("unseen") else "n/a", mark))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
