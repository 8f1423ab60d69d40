"""Train a query-only adapter on cached embeddings: a custom PyTorch loop that never re-encodes a text.

The loop, per step: sample a batch of (query, positive chunk) pairs, draw negatives by index, adapt the queries, loss
(``nn.TripletMarginLoss``, or InfoNCE over the batch or over every chunk, optionally summed over Matryoshka dims),
plus an optional pull toward the identity, backward, clip, step, schedule.

Around it, ``train_on_vectors`` makes the adapter trustworthy on chunks it never saw, with every training question
as evidence. It measures coverage (the share of the corpus with training questions) and deals the training questions
into cross-fitting folds (``cross_folds``), whatever way the dataset was split: each question is scored once as a
*seen*-chunk question (held out, its chunk's other questions trained on) and once as an *unseen*-chunk one (its
whole chunk held out), each time by a fit that never saw it. Each recipe of a small set is fitted on every fold and
its paired per-question changes pooled; the recipe is chosen by ``objective`` with a rule that allows for the noise
(a standard error clustered by chunk, since questions about one chunk rise and fall together), then refit on every
training question. At two questions per chunk a 10% slice held a few dozen questions and no real gain cleared the
noise; pooled folds hold them all, so the test's power grows with the data. Recipes use a fixed number of epochs and
average the late ones; only a handful compete, and the identity always does, unless a recipe is asked for by name.

Chunks of the index that no training question is about are known before training: the ``uncovered-*`` recipes pull
the map toward the identity on their own vectors, so it stays put where their questions would land. A trial trains
as if the unseen slice's chunks were not indexed yet, so the unseen-chunk estimate stands for chunks added later.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapter.config import Config, TrainConfig, default_dims
from adapter.data import Dataset, Qrels, fingerprint, partition_qrels, relevant
from adapter.encoder import truncate
from adapter.errors import AdapterError
from adapter.evaluate import PRIMARY_METRIC, Results, id_rank, is_relevant, search
from adapter.evaluate import evaluate as judge
from adapter.model import LinearAdapter, pct_change
from adapter.systems import CorpusSource, EncodedCorpus

if TYPE_CHECKING:
    from adapter.encoder import Encoder

logger = logging.getLogger(__name__)

PENALTY_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)  # identity-penalty strengths tried by identity_penalty="auto"
OBJECTIVES = ("both", "seen")
EPOCH_CHOICES = ("average", "last", "best")
# The recipe axes: everything else (lr, epochs, batch, margin, temperature) is shared by every recipe.
RECIPE_FIELDS = ("loss", "infonce_candidates", "rank", "identity_penalty", "matryoshka", "epoch_choice",
                 "uncovered_pull")


def _recipe(loss: str = "infonce", candidates: str = TrainConfig.infonce_candidates,
            rank: int | None = None, pull: float = 0.0,
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
MIN_SEEN_QUERIES = 4  # questions needed to hold out a seen-chunk slice (one held out, three left to train on)
MIN_UNSEEN_CHUNKS = 5  # chunks with questions needed to hold out whole chunks and still train on four
GAIN_Z = 2.0  # a recipe must beat the identity by this many standard errors of its gain (see select)
MIN_VAL_QUESTIONS = 100  # a sampled validation slice keeps at least this many questions (train.val_budget)
MOMENT_BLOCK = 65536  # chunks whose outer products are summed at once for the uncovered pull
GATHER_STEPS = 64  # training steps whose query and chunk rows are gathered at once (~13 MB each at d 384, batch 128)


@dataclass
class Split:
    """Queries of one role as arrays: vectors (n, d), ids, and their positive judgements."""

    vectors: np.ndarray
    ids: list[str]
    qrels: Qrels


@dataclass
class TrainResult:
    """The selected adapter and how it was chosen."""

    adapter: LinearAdapter
    best_epoch: int  # 0 means the identity won: training did not beat base on validation
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss and validation ndcg@10
    base_val: Results = field(default_factory=dict)  # validation metrics of the identity (base), {dim: metrics}
    best_val: Results = field(default_factory=dict)  # validation metrics of the selected adapter, {dim: metrics}
    seconds: float = 0.0  # wall time of training (trials and refit; embedding excluded)
    recipe: str = "manual"  # the recipe shipped ("identity" when none was safe and better)
    history_recipe: str = "manual"  # whose curves ``history`` holds (the shipped trial's, else the closest one's)
    coverage: dict[str, Any] = field(default_factory=dict)  # chunks, covered, share
    estimates: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # "seen"/"unseen" -> estimate or None
    trials: list[dict[str, Any]] = field(default_factory=list)  # every recipe tried: its validation scores
    warnings: list[str] = field(default_factory=list)  # one line each: fallbacks and partial coverage


class _Module(nn.Module):
    """The adapter as torch parameters, initialised from a LinearAdapter (the identity)."""

    def __init__(self, init: LinearAdapter):
        super().__init__()
        as_param = lambda a: nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32)))  # noqa: E731
        self.weight = as_param(init.weight) if init.weight is not None else None
        self.U = as_param(init.U) if init.U is not None else None
        self.V = as_param(init.V) if init.V is not None else None
        self.bias = as_param(init.bias) if init.bias is not None else None
        self.eye = torch.eye(self.weight.shape[0]) if self.weight is not None else None  # not a parameter

    def delta(self) -> torch.Tensor:
        """W − I (full) or U V (low rank): how far the adapter is from the identity."""
        if self.weight is not None:
            return self.weight - self.eye
        return self.U @ self.V

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d), unit length
        y = x @ self.weight if self.weight is not None else x + (x @ self.U) @ self.V
        if self.bias is not None:
            y = y + self.bias
        return F.normalize(y, dim=-1)

    def export(self, like: LinearAdapter) -> LinearAdapter:
        get = lambda p: None if p is None else p.detach().numpy().copy()  # noqa: E731
        return dataclasses.replace(like, weight=get(self.weight), U=get(self.U), V=get(self.V), bias=get(self.bias))


def _pairs(split: Split, corpus_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) array of (query row, positive chunk row), and the sorted codes q*N+c of every relevant pair."""
    n_corpus = len(corpus_ids)
    judged = {c for q in split.ids for c in split.qrels[q]}
    corpus_row = {c: i for i, c in enumerate(corpus_ids) if c in judged}  # judged chunks only: no million-entry dict
    pairs = np.array([(i, corpus_row[c]) for i, q in enumerate(split.ids) for c in split.qrels[q]], dtype=np.int64)
    return pairs, np.unique(pairs[:, 0] * n_corpus + pairs[:, 1])


def _random_negatives(q_rows: np.ndarray, n_corpus: int, rel_codes: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """One chunk per query drawn uniformly from the corpus, redrawn until none is relevant to its query."""
    neg = rng.integers(0, n_corpus, size=len(q_rows))
    for _ in range(100):
        bad = is_relevant(q_rows * n_corpus + neg, rel_codes)
        if not bad.any():
            return neg
        neg[bad] = rng.integers(0, n_corpus, size=int(bad.sum()))
    raise AdapterError("could not draw negatives: nearly every chunk is relevant to some training query")


def mine_hard_negatives(queries: np.ndarray, corpus: np.ndarray, rel_codes: np.ndarray, pool: int) -> np.ndarray:
    """Each query's top-``pool`` non-relevant chunks under the base embeddings (mined once, with the shared search);
    rows padded by repetition when a query has fewer."""
    n = len(corpus)
    k = min(n, pool + int(np.bincount(rel_codes // n).max()))
    _, rows = search(queries, corpus, k)
    out = np.empty((len(queries), pool), dtype=np.int64)
    for i, r in enumerate(rows):
        keep = r[~is_relevant(i * n + r, rel_codes)][:pool]
        if not len(keep):
            raise AdapterError("no hard negative left: every retrieved chunk is relevant")
        out[i] = np.resize(keep, pool)
    return out


def uncovered_rows(n_corpus: int, covered_rows: np.ndarray, outside: np.ndarray | None = None) -> np.ndarray:
    """Corpus rows neither among ``covered_rows`` (the training pairs' positives) nor in ``outside``: what the
    uncovered-chunk pull is measured on."""
    keep = np.ones(n_corpus, dtype=bool)
    keep[covered_rows] = False
    if outside is not None:
        keep[outside] = False
    return np.flatnonzero(keep)


def uncovered_moment(corpus: np.ndarray, covered_rows: np.ndarray, weight: float,
                     outside: np.ndarray | None = None, block: int = MOMENT_BLOCK) -> torch.Tensor | None:
    """``weight * d * mean(c^T c)`` over the chunks outside ``covered_rows`` (the training pairs' positives) and
    ``outside``, as a (d, d) tensor M, so that ``sum(D * (M @ D))`` is the uncovered-chunk pull on the adapter's
    change D = W − I (its mean over those chunks of ‖cD‖², scaled by d to match ‖D‖²_F on isotropic vectors); None
    when the weight is 0 or no chunk is left. Read block by block: a memory-mapped corpus is not copied."""
    dim = corpus.shape[1]
    if not weight:
        return None
    rows = uncovered_rows(len(corpus), covered_rows, outside)
    if not len(rows):
        return None
    moment = np.zeros((dim, dim))
    for s in range(0, len(rows), block):
        v = np.asarray(corpus[rows[s:s + block]], dtype=np.float64)
        moment += v.T @ v
    moment = (moment + moment.T) / 2  # symmetric to the last bit: identity_pull's gradient relies on it
    return torch.from_numpy((weight * dim / len(rows) * moment).astype(np.float32))


class _Stopped(Exception):
    """A fit told to stop (``_fit``'s ``stop``)."""


def identity_pull(change: torch.Tensor, form: torch.Tensor) -> torch.Tensor:
    """``sum(D * (A @ D))`` for a symmetric (d, d) ``A``, or ``a * sum(D * D)`` for a 0-d ``a``: the pulls toward the
    identity as one quadratic form in the adapter's change D, with the gradient ``2 A D`` from the one product
    ``A @ D`` (autograd of the plain form would make ``A^T @ grad`` as a second d^3 product per step). Plain torch
    ops, so the backward pass stays in C++ and never waits for the GIL that a parallel trial holds."""
    fixed = change.detach()
    applied = form @ fixed if form.dim() else form * fixed  # A D, a constant to autograd
    return 2 * (change * applied).sum() - (fixed * applied).sum()  # value sum(D A D), gradient 2 A D


def clip_grads(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """``nn.utils.clip_grad_norm_`` for these few CPU tensors, the same arithmetic without its per-call grouping by
    device and dtype: the stock call held the GIL for a sixth of a parallel trial's training step."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


def _lr_lambda(total: int, warmup: int):
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def fit(train: Split, val: Split | None, corpus: np.ndarray, corpus_ids: list[str], base_model: str,
        cfg: Config | None = None, *, progress: bool = True, tie_rank: np.ndarray | None = None) -> TrainResult:
    """Train one recipe (the config's own fields) on arrays: training query vectors and qrels, the fixed corpus
    vectors, and optional validation queries (required when ``epoch_choice`` is "best", which scores them each
    epoch; above ``train.val_budget`` scores a seeded sample of them, see ``bounded``).

    The corpus is only read: rows are gathered per step, so a memory-mapped (N, d) float32 array is never copied."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (128, 384) x (384, 384) steps: a second thread costs more in sync than it gives
    try:
        return _fit(train, val, corpus, corpus_ids, base_model, cfg or Config(), progress, tie_rank=tie_rank)
    finally:
        torch.set_num_threads(threads)


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
        raise AdapterError(f"train.epoch_choice must be one of {', '.join(EPOCH_CHOICES)}, not "
                           f"{tc.epoch_choice!r}")
    if tc.objective not in OBJECTIVES:
        raise AdapterError(f"train.objective must be 'both' or 'seen', not {tc.objective!r}")
    if tc.recipe not in ("auto", "manual", *RECIPES):
        raise AdapterError(f"train.recipe must be 'auto', 'manual' or one of {', '.join(RECIPES)}, not {tc.recipe!r}")
    if tc.uncovered_pull < 0:
        raise AdapterError(f"train.uncovered_pull must be >= 0, not {tc.uncovered_pull}")
    if tc.folds < 2 or tc.crossfit_questions < 1:
        raise AdapterError(f"train.folds must be >= 2 and train.crossfit_questions >= 1, not {tc.folds} and "
                           f"{tc.crossfit_questions}")
    if tc.epochs < 0 or tc.batch_size < 1 or tc.lr <= 0:
        raise AdapterError(f"train.epochs must be >= 0, train.batch_size >= 1 and train.lr > 0, got {tc.epochs}, "
                           f"{tc.batch_size} and {tc.lr}")


def _fit(train: Split, val: Split | None, corpus: np.ndarray, corpus_ids: list[str], base_model: str, cfg: Config,
         progress: bool, *, tie_rank: np.ndarray | None = None, base_val: dict[str, float] | None = None,
         outside: np.ndarray | None = None, stop: threading.Event | None = None) -> TrainResult:
    """``fit``; ``tie_rank`` (``id_rank(corpus_ids)``) and ``base_val`` (the identity's validation metrics) when the
    caller already has them, since at 10^6 chunks each costs seconds. ``outside``: corpus rows the uncovered-chunk
    pull leaves out, as if not yet indexed (a trial's unseen slice, so its estimate stands for chunks added later).
    ``stop``: once set, the fit raises ``_Stopped`` at its next step (a speculative refit that lost)."""
    cfg = resolve_loss(cfg)
    check_options(cfg)
    tc = cfg.train
    penalty = float(tc.identity_penalty)
    choice = tc.epoch_choice
    if choice == "best" and val is None:
        raise AdapterError("epoch_choice 'best' needs validation queries")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_corpus, dim = corpus.shape
    pairs, rel_codes = _pairs(train, corpus_ids)
    n_relevant = np.bincount(rel_codes // n_corpus, minlength=len(train.ids))  # (n_train,) relevant chunks each
    val = bounded(val, n_corpus, cfg)
    if val is not None and tie_rank is None:
        tie_rank = id_rank(corpus_ids)
    moment = uncovered_moment(corpus, pairs[:, 1], float(tc.uncovered_pull), outside)  # the uncovered pull, or None
    # both pulls toward the identity, penalty * |D|^2 + sum(D * (moment @ D)), as one form: a matrix, a scalar, or None
    form = (moment + penalty * torch.eye(dim) if moment is not None
            else torch.tensor(penalty) if penalty else None)
    hard = mine_hard_negatives(train.vectors, corpus, rel_codes, tc.hard_pool) if tc.negatives == "hard" else None

    init = LinearAdapter.identity(dim, base_model, rank=tc.rank, bias=tc.bias, seed=cfg.seed)
    module = _Module(init)
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters  # one kernel per step; bit-reproducible
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused or None)
    steps_per_epoch = -(-len(pairs) // tc.batch_size)
    total = steps_per_epoch * tc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, int(tc.warmup_fraction * total))))
    triplet = nn.TripletMarginLoss(margin=tc.margin)
    Q = torch.from_numpy(np.asarray(train.vectors, dtype=np.float32))  # (n_train, d): fixed inputs
    loss_dims = list(default_dims(dim)) if tc.matryoshka else [dim]
    corpus_wide = tc.infonce_candidates == "corpus"
    in_batch = tc.loss != "triplet" and not corpus_wide  # InfoNCE over the batch's positives: the recipes' loss
    arange = torch.arange(tc.batch_size)  # an in-batch step's targets: query i's positive is candidate i
    # every chunk is a candidate in each step: the corpus truncated once per dim, (N, m) each (cheap below ~10^5)
    C = {m: torch.from_numpy(truncate(corpus, m) if m < dim else np.asarray(corpus, dtype=np.float32))
         for m in loss_dims} if corpus_wide else {}

    def at_dims(v: torch.Tensor) -> dict[int, torch.Tensor]:
        """Chunk vectors (..., d) at every loss dim, (..., m), renormalised below the full dim."""
        return {m: v if m == dim else F.normalize(v[..., :m], dim=-1) for m in loss_dims}

    def chunks(rows: np.ndarray) -> dict[int, torch.Tensor]:
        """The chunks of ``rows`` (any shape) at every loss dim: gathered rows, so the corpus is not copied."""
        return at_dims(torch.from_numpy(np.asarray(corpus[rows], dtype=np.float32)))

    def validate() -> dict[str, float]:
        if val is None:
            return {}
        with torch.no_grad():
            adapted = module(torch.from_numpy(val.vectors)).numpy()
        return judge(adapted, corpus, val.qrels, val.ids, corpus_ids, tie_rank=tie_rank)[dim]

    def in_batch_masks(q_rows: np.ndarray, pos: np.ndarray, batch: int) -> torch.Tensor:
        """(steps, B, B) for the consecutive batches of ``batch`` rows (the last one padded): True where a batch's
        positive is relevant to another of its queries, so not its negative. A query with one relevant chunk masks
        only its own positive's repeats (no lookup); the others are looked up. Made for many steps at once."""
        n = -(-len(pos) // batch) * batch
        p = np.pad(pos, (0, n - len(pos)), constant_values=-1).reshape(-1, batch)  # (steps, B); -1 is padding
        q = np.pad(q_rows, (0, n - len(q_rows))).reshape(-1, batch)
        masked = p[:, None, :] == p[:, :, None]  # (steps, B, B): [s, i, j] the batch's j-th positive is i's own
        many = n_relevant[q] > 1
        if many.any():
            s_i, i_i = np.nonzero(many)
            masked[s_i, i_i] = is_relevant(q[s_i, i_i][:, None] * n_corpus + p[s_i], rel_codes)
        masked[:, np.arange(batch), np.arange(batch)] = False
        return torch.from_numpy(masked)

    def step_loss(q_rows: np.ndarray, pos: np.ndarray, queries: torch.Tensor, positives: dict[int, torch.Tensor],
                  masked: torch.Tensor | None) -> torch.Tensor:
        """One step's loss on the batch's query rows and positive chunk rows, whose vectors (at every loss dim) and
        in-batch masks the caller made for many steps at once."""
        anchor = module(queries)  # (B, d), unit length
        if tc.loss == "triplet":
            q_rep = np.repeat(q_rows, tc.negatives_per_query)  # (B*k,): each query k times, one negative each
            if hard is not None:
                neg = hard[q_rep, rng.integers(0, hard.shape[1], size=len(q_rep))]
            else:
                neg = _random_negatives(q_rep, n_corpus, rel_codes, rng)
            neg = chunks(neg.reshape(len(pos), -1))  # (B, k, m) per dim
        elif corpus_wide:  # every chunk a candidate: the others relevant to the query are not negatives
            target = torch.from_numpy(pos)
            masked = is_relevant(q_rows[:, None] * n_corpus + np.arange(n_corpus)[None, :], rel_codes)
            masked[np.arange(len(pos)), pos] = False
            masked = torch.from_numpy(masked)
        else:  # the batch's positives are the candidates; the caller made the masks
            target = arange[:len(pos)]
            masked = masked[:len(pos), :len(pos)]
        loss = 0.0
        for m in loss_dims:  # Matryoshka: the same loss at every truncation, summed (MatryoshkaLoss's weights of 1)
            a = anchor if m == dim else F.normalize(anchor[:, :m], dim=-1)  # (B, m)
            if tc.loss == "triplet":
                # (B, 1, m) anchors and positives broadcast against (B, k, m) negatives
                loss = loss + triplet(a[:, None], positives[m][:, None], neg[m])
            else:
                logits = a @ (C[m] if corpus_wide else positives[m]).T / tc.temperature  # (B, M)
                loss = loss + F.cross_entropy(logits.masked_fill(masked, float("-inf")), target)
        if form is not None:
            loss = loss + identity_pull(module.delta(), form)
        return loss

    base_val = best_val = (base_val if val is not None and base_val else validate())
    snapshot = lambda: {k: v.detach().clone() for k, v in module.state_dict().items()}  # noqa: E731
    best_epoch, best_state = 0, snapshot()
    average_from = tc.epochs // 2 + 1  # "average": the late half of the epochs, when the decaying lr has settled
    summed: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = [{"epoch": 0, "loss": float("nan"), **_primary(base_val)}]
    t0 = time.perf_counter()
    bar = tqdm(range(1, tc.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        order = rng.permutation(len(pairs))
        losses = []
        for g in range(0, len(order), tc.batch_size * GATHER_STEPS):
            # the rows of many steps gathered at once: one index of the queries and one read of the corpus
            rows = pairs[order[g:g + tc.batch_size * GATHER_STEPS]]  # (n, 2): query row, positive row
            queries = Q[torch.from_numpy(rows[:, 0])]
            pos_vectors = torch.from_numpy(np.asarray(corpus[rows[:, 1]], dtype=np.float32))
            positives = at_dims(pos_vectors)
            masks = in_batch_masks(rows[:, 0], rows[:, 1], tc.batch_size) if in_batch else None
            for i, s in enumerate(range(0, len(rows), tc.batch_size)):
                if stop is not None and stop.is_set():
                    raise _Stopped
                b = slice(s, s + tc.batch_size)
                loss = step_loss(rows[b, 0], rows[b, 1], queries[b], {m: v[b] for m, v in positives.items()},
                                 masks[i] if masks is not None else None)
                for p in params:
                    p.grad = None
                loss.backward()
                clip_grads(params, tc.grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.detach())
        metrics = validate() if choice == "best" else {}  # per epoch only when it selects
        history.append({"epoch": epoch, "loss": torch.stack(losses).mean().item(), **_primary(metrics)})
        if choice == "best" and metrics[PRIMARY_METRIC] > best_val[PRIMARY_METRIC]:
            best_epoch, best_val, best_state = epoch, metrics, snapshot()
        if choice == "average" and epoch >= average_from:
            now = snapshot()
            summed = now if summed is None else {k: summed[k] + now[k] for k in now}
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", best=best_epoch)
    if choice == "last" or (choice == "average" and summed is None):
        best_state, best_epoch = snapshot(), tc.epochs
    elif choice == "average":
        best_state, best_epoch = {k: v / (tc.epochs - average_from + 1) for k, v in summed.items()}, tc.epochs
    seconds = time.perf_counter() - t0
    module.load_state_dict(best_state)
    if choice != "best":
        best_val = validate()  # what ships, scored once
        history[-1].update(_primary(best_val))
    if val is not None:
        logger.debug("%s, epoch %d: validation %s %.4f (base %.4f)", choice, best_epoch, PRIMARY_METRIC,
                     best_val[PRIMARY_METRIC], base_val[PRIMARY_METRIC])
    by_dim = lambda m: {dim: m} if m else {}  # noqa: E731  (keyed by dim, as every result)
    return TrainResult(module.export(init), best_epoch, history, by_dim(base_val), by_dim(best_val), seconds)


def _primary(metrics: dict[str, float]) -> dict[str, float]:
    return {PRIMARY_METRIC: metrics[PRIMARY_METRIC]} if metrics else {}


# ------------------------------------------------------------------------------------------ coverage and selection


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


def bounded(s: Split | None, n_corpus: int, cfg: Config) -> Split | None:
    """The validation questions scored: all of them, or, when they would score more than ``train.val_budget``
    question x chunk pairs, a seeded sample of ``val_budget // n_corpus`` (at least ``MIN_VAL_QUESTIONS``), in their
    order. Each question costs an exact search over every chunk, so this bounds validation however large the corpus;
    every chunk still competes, so the metric is the full search's, on fewer questions."""
    if s is None:
        return None
    keep = max(MIN_VAL_QUESTIONS, cfg.train.val_budget // max(1, n_corpus))
    if len(s.ids) <= keep:
        return s
    rows = np.sort(np.random.default_rng(cfg.seed).choice(len(s.ids), size=keep, replace=False))
    ids = [s.ids[i] for i in rows]
    logger.info("validating on %d of %d questions (%d chunks; train.val_budget %d)", keep, len(s.ids), n_corpus,
                cfg.train.val_budget)
    return Split(s.vectors[rows], ids, {q: s.qrels[q] for q in ids})


def held_out_rows(unseen: Split | None, corpus_ids: Sequence[str]) -> np.ndarray | None:
    """Corpus rows of the unseen slice's chunks: a trial trains as if they were not yet indexed."""
    if unseen is None:
        return None
    held = {c for r in unseen.qrels.values() for c in r}
    return np.array([i for i, c in enumerate(corpus_ids) if c in held], dtype=np.int64)


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
        tie_rank = id_rank(corpus_ids) if tie_rank is None else tie_rank
        return _per_query(adapter.apply(self.split.vectors), corpus, self.split, corpus_ids, dims, tie_rank)


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


def recipe_config(cfg: Config, name: str) -> Config:
    """The config a named recipe trains with: its axes over the shared settings ("manual": the config as given)."""
    return cfg if name == "manual" else cfg.replace(train=RECIPES[name])


MANUAL_FIELDS = ("loss", "negatives", "rank", "identity_penalty")  # setting one of these means "manual"


def resolve_recipe(cfg: Config) -> Config:
    """"auto" with a recipe axis set away from its default (``--loss``, ``--negatives``, ``--rank``,
    ``--identity-penalty``) means the user chose the recipe: "manual"."""
    default = TrainConfig()
    if cfg.train.recipe == "auto" and any(getattr(cfg.train, f) != getattr(default, f) for f in MANUAL_FIELDS):
        return cfg.replace(recipe="manual")
    return cfg


def recipe_names(cfg: Config) -> list[str]:
    """The recipes a run tries: the one named, "manual" (the config's own settings), or the auto set."""
    return list(AUTO_RECIPES) if cfg.train.recipe == "auto" else [cfg.train.recipe]


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
    se = lambda e: float("inf") if e["se"] is None else e["se"]  # noqa: E731
    gain = lambda t: t.get("seen") or t.get("unseen")  # noqa: E731

    def safe(unseen: dict[str, Any] | None) -> bool:
        if objective != "both" or unseen is None:
            return True
        parts = list(unseen["by_dim"].values()) if worst_dim and unseen.get("by_dim") else [unseen]
        return all(e["delta"] >= -z * se(e) for e in parts)

    ok = []
    for i, t in enumerate(trials):
        t["safe"] = safe(t.get("unseen"))
        if t["safe"] and gain(t)["delta"] > gain_z * se(gain(t)):
            ok.append(i)
    if not ok:
        return None
    best = max(ok, key=lambda i: gain(trials[i])["delta"])
    if objective != "both" or not within:
        return best
    floor = gain(trials[best])["delta"] - within * se(gain(trials[best]))
    return next(i for i in ok if gain(trials[i])["delta"] >= floor)


def train_on_vectors(train: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str,
                     cfg: Config | None = None, *, progress: bool = True) -> TrainResult:
    """Train an adapter on arrays the trustworthy way: coverage, two validation slices, recipe trials scored on both,
    a noise-aware choice by ``cfg.train.objective``, and the chosen recipe refit on every training question."""
    cfg = resolve_recipe(cfg or Config())
    check_options(cfg)
    _check_learnable(train, corpus_ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread each; trials run side by side instead
    try:
        return _train_on_vectors(train, corpus, corpus_ids, base_model, cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _check_learnable(train: Split, corpus_ids: Sequence[str]) -> None:
    if all(len(train.qrels[q]) >= len(corpus_ids) for q in train.ids):
        raise AdapterError(f"every chunk ({len(corpus_ids)}) is relevant to every training question: there is "
                           "nothing to rank, so nothing to learn")


def _train_on_vectors(train: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str, cfg: Config,
                      progress: bool) -> TrainResult:
    dim = corpus.shape[1]
    dims = list(default_dims(dim))
    coverage = coverage_of(train.qrels, corpus_ids)
    t0 = time.perf_counter()
    folds, warnings = cross_folds(train, cfg)
    tie_rank = id_rank(corpus_ids)  # the judge's tie-break, once (seconds at 10^6 ids)
    # each fold's held-out questions and the base's scores on them, and the corpus rows it treats as not yet indexed
    slices = [{k: _Slice.of(getattr(f, k), corpus, corpus_ids, dims, cfg, tie_rank) for k in ("seen", "unseen")}
              for f in folds]
    kinds = [k for k in ("seen", "unseen") if any(s[k] for s in slices)]
    watch_key = kinds[0]  # its questions are the curves, and pick the epoch a "best" recipe keeps
    outside = [held_out_rows(f.unseen, corpus_ids) for f in folds]
    names = recipe_names(cfg)

    # a recipe whose uncovered pull has no chunk to act on trains exactly as the same recipe without it (with every
    # chunk covered, the uncovered pulls are pull-0.01): each distinct recipe is fitted once and its row repeated
    bare = all(not len(uncovered_rows(len(corpus_ids), _pairs(f.fit, corpus_ids)[0][:, 1], o))
               for f, o in zip(folds, outside, strict=True))
    effective = {n: recipe_config(cfg, n).train if not bare else recipe_config(cfg, n).replace(uncovered_pull=0.0).train
                 for n in names}
    first = {n: next(m for m in names if effective[m] == effective[n]) for n in names}

    def fold_fit(name: str, f: int) -> TrainResult:
        """The recipe fitted on fold ``f``'s training questions (with its own slice to pick a "best" epoch)."""
        tcfg = recipe_config(cfg, name)
        watch = slices[f][watch_key]
        per_epoch = tcfg.train.epoch_choice == "best" and watch is not None
        return _fit(folds[f].fit, watch.split if per_epoch else None, corpus, corpus_ids, base_model, tcfg,
                    progress=False, tie_rank=tie_rank, base_val=watch.base_metrics() if per_epoch else None,
                    outside=outside[f], stop=halt)

    def trial(name: str, fits: list[TrainResult]) -> tuple[dict[str, Any], list[TrainResult]]:
        """The recipe's row: every fold's held-out questions scored by the fold's own fit, pooled."""
        scores, metrics = {}, {}
        for k in kinds:
            parts = [(s[k], s[k].score(r.adapter, corpus, corpus_ids, dims, tie_rank))
                     for s, r in zip(slices, fits, strict=True) if s[k]]
            scores[k], metrics[k] = pooled([p[0] for p in parts], [p[1] for p in parts], dims)
        r = fits[0]  # the first fold's curves stand for the recipe's, ends scored on every fold
        base_metrics = pooled([s[watch_key] for s in slices if s[watch_key]],
                              [s[watch_key].score(None, corpus, corpus_ids, dims) for s in slices if s[watch_key]],
                              dims)[1]
        r.base_val, r.best_val = {dim: base_metrics}, {dim: metrics[watch_key]}
        r.history[0].update(_primary(base_metrics))
        r.history[-1].update(_primary(metrics[watch_key]))
        row = {**_fields(cfg, name), **{k: scores.get(k) for k in ("seen", "unseen")},
               "epoch": int(np.median([x.best_epoch for x in fits])), "seconds": _r(sum(x.seconds for x in fits))}
        return row, fits

    distinct = run_order([n for n in names if first[n] == n], effective)
    tasks = [(n, f) for n in distinct for f in range(len(folds))]
    workers = max(1, min(len(tasks), cfg.train.workers))

    def rows_of(fitted: dict[str, tuple[dict[str, Any], list[TrainResult]]]) -> list[tuple[str, dict[str, Any]]]:
        """(name, trial row) in the choice's order for every recipe whose folds are done; a repeat is its twin's."""
        return [(n, fitted[n][0] if first[n] == n else {**fitted[first[n]][0], **_fields(cfg, n), "same_as": first[n]})
                for n in names if first[n] in fitted]

    def choose(fitted: dict[str, tuple[dict[str, Any], list[TrainResult]]]) -> str | None:
        named = rows_of(fitted)
        if cfg.train.recipe != "auto":  # a recipe asked for by name (or by its settings) ships
            return named[0][0] if named else None
        pick = select([dict(row) for _, row in named], cfg.train.objective, cfg.train.safety_z,
                      cfg.train.simpler_within)
        return None if pick is None else named[pick][0]

    def refit(name: str, stop: threading.Event | None = None, show: bool = False) -> TrainResult:
        rc = recipe_config(cfg, name)
        if rc.train.epoch_choice == "best":  # the folds' median best epoch, on every question (0: the identity)
            keep = fitted[first[name]][0]["epoch"]
            if keep == 0:
                return TrainResult(LinearAdapter.identity(dim, base_model, rank=rc.train.rank, seed=cfg.seed), 0)
            rc = rc.replace(train={"epochs": keep, "epoch_choice": "last"})
        return _fit(train, None, corpus, corpus_ids, base_model, rc, progress=show, stop=stop)

    fitted: dict[str, tuple[dict[str, Any], list[TrainResult]]] = {}
    fits: dict[str, dict[int, TrainResult]] = {n: {} for n in distinct}
    halt = threading.Event()  # set on an error or an interrupt: every running fit stops at its next step
    ahead: tuple[str, Future, threading.Event] | None = None  # (recipe, its refit, stop): started before the choice
    with ThreadPoolExecutor(workers) as pool:
        running = {pool.submit(fold_fit, n, f): (n, f) for n, f in tasks}
        bar = tqdm(total=len(tasks), desc=f"recipes x {len(folds)} folds", disable=not progress)
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for job in finished:
                    name, f = running.pop(job)
                    fits[name][f] = job.result()
                    bar.update()
                    if len(fits[name]) == len(folds):
                        fitted[name] = trial(name, [fits[name][i] for i in range(len(folds))])
                        logger.debug("trial %s done at %.0f s", name, time.perf_counter() - t0)
                # nothing left to queue and a worker idle: refit the recipe the trials so far choose while the last
                # ones run; the choice is made on every trial as before, and a refit it does not keep is stopped
                if ahead is None and running and len(running) < workers:
                    guess = choose(fitted)
                    if guess is not None:
                        logger.info("refitting %s on every training question while %d fit(s) run", guess,
                                    len(running))
                        stop = threading.Event()
                        ahead = (guess, pool.submit(refit, guess, stop), stop)
        except BaseException:
            halt.set()
            for job in running:
                job.cancel()
            if ahead is not None:
                ahead[2].set()
            raise
        finally:
            bar.close()
        named = rows_of(fitted)
        trials = [row for _, row in named]
        chosen = choose(fitted)
        early = None
        if ahead is not None:
            if ahead[0] == chosen:
                early = ahead[1].result()
            else:
                ahead[2].set()
                logger.info("the last trials moved the choice from %s to %s: its refit stopped", ahead[0], chosen)
    done = [fitted[first[n]][1][0] for n in names]
    pick = None if chosen is None else names.index(chosen)
    if pick is None:
        recipe, estimates = "identity", {k: pooled([s[k] for s in slices if s[k]],
                                                   [s[k].score(None, corpus, corpus_ids, dims) for s in slices if s[k]],
                                                   dims)[0] if k in kinds else None for k in ("seen", "unseen")}
        # the curves of the trial that came closest, so a user sees what was tried and why it did not ship
        closest = max(range(len(trials)), key=lambda i: _gain(trials[i])["delta"])
        warnings.append(identity_line(trials[closest], cfg.train.objective))
        form = recipe_config(cfg, names[closest]).train.rank  # the identity in that trial's form (size, dtype)
        shipped = TrainResult(LinearAdapter.identity(dim, base_model, rank=form, seed=cfg.seed), 0,
                              done[closest].history)
        shipped.base_val = shipped.best_val = done[closest].base_val
        shipped.history_recipe = names[closest]
    else:
        recipe, estimates = names[pick], {k: trials[pick][k] for k in ("seen", "unseen")}
        if cfg.train.recipe != "auto" and not _clears(trials[pick]):
            warnings.append(f"{recipe} ships because it was asked for, though its validation gain is within noise "
                            f"({_gain_words(trials[pick])}); the automatic choice would ship the identity")
        validated = done[pick]
        shipped = early if early is not None else refit(recipe, show=progress)
        shipped.history = validated.history  # the curves of the validated trial
        shipped.base_val, shipped.best_val = validated.base_val, validated.best_val
        shipped.history_recipe = recipe
    for t in trials:
        t["chosen"] = t["recipe"] == recipe
    if coverage["covered"] < coverage["chunks"]:
        warnings.append(partial_coverage_line(coverage, estimates.get("unseen")))
    for w in warnings:
        logger.warning("%s", w)
    shipped.best_val = shipped.best_val if pick is not None else shipped.base_val
    shipped.seconds = time.perf_counter() - t0
    shipped.recipe, shipped.coverage, shipped.estimates = recipe, coverage, estimates
    shipped.trials, shipped.warnings = trials, warnings
    logger.info("chose %s (objective %s) from %s in %.1f s", recipe, cfg.train.objective, ", ".join(names),
                shipped.seconds)
    return shipped


def _gain(t: dict[str, Any]) -> dict[str, Any]:
    """The estimate a trial's gain is judged on: seen chunks, or unseen ones where no seen slice could be made."""
    return t.get("seen") or t.get("unseen")


def _clears(t: dict[str, Any]) -> bool:
    """Whether a trial's gain clears ``GAIN_Z`` standard errors (what ``select`` asks of any recipe)."""
    e = _gain(t)
    return e["se"] is not None and e["delta"] > GAIN_Z * e["se"]


def _gain_words(t: dict[str, Any]) -> str:
    e = _gain(t)
    kind = "seen" if t.get("seen") else "unseen"
    return f"{pct_change(e)} on {e['queries']:,} {kind}-chunk questions about {e['chunks']:,} chunks"


def identity_line(best: dict[str, Any], objective: str) -> str:
    """Why the identity shipped, in numbers, and what would change it."""
    if not _clears(best):
        why = f"short of the {GAIN_Z:g} standard errors a gain must clear"
    else:
        why = "but it moves unseen chunks below base beyond noise"
    other = "; train.objective 'seen' if every chunk of the index has questions" if objective == "both" else ""
    return (f"shipped the identity: the best recipe, {best['recipe']}, changed ndcg@10 by {_gain_words(best)}, "
            f"{why}. More questions per chunk would settle it{other}; train.recipe '{best['recipe']}' ships it anyway")


def run_order(names: Sequence[str], effective: dict[str, TrainConfig]) -> list[str]:
    """The order recipe trials start in, the costliest first so the workers finish together: an uncovered pull (a d^3
    product per step), then the other full matrices, then low rank (a few directions), each in the given order. The
    last to start is so the cheapest, and, as low rank gains least on seen chunks in every cell of BENCHMARKS.md's
    recipe grid, the trial least likely to move the choice that the refit started beside it bets on."""
    cost = lambda n: 0 if effective[n].uncovered_pull else 1 if effective[n].rank is None else 2  # noqa: E731
    return sorted(names, key=cost)


def _fields(cfg: Config, name: str) -> dict[str, Any]:
    """A trial row's name and recipe settings, as metadata stores them."""
    tcfg = recipe_config(cfg, name)
    return {"recipe": name, **{f: _jsonable(getattr(tcfg.train, f)) for f in RECIPE_FIELDS}}


def _jsonable(v: Any) -> Any:
    return v if v is None or isinstance(v, (str, bool, int, float)) else str(v)


def partial_coverage_line(coverage: dict[str, Any], unseen: dict[str, Any] | None) -> str:
    """One line for a partly covered corpus: how much has no training questions and what to expect there."""
    missing = coverage["chunks"] - coverage["covered"]
    expect = (f"on such chunks expect ndcg@10 {pct_change(unseen)} (the unseen-chunk estimate)" if unseen else
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
                         f"{e['base']:.4f} -> {e['adapter']:.4f}; {pct_change(e)} over dims")
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
        rows.append((t["recipe"], pct_change(t["seen"]) if t.get("seen") else "n/a",
                     pct_change(t["unseen"]) if t.get("unseen") else "n/a", mark))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def choose_identity_penalty(train: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str,
                            cfg: Config, grid: tuple[float, ...] = PENALTY_GRID) -> tuple[float, list[dict]]:
    """Pick the identity penalty on held-out chunks: hold out a seeded share of the training chunks, train at each
    strength on the rest, and keep the strength with the best ndcg@10 on seen-chunk validation queries among those
    that do not lower ndcg@10 on the held-out chunks' queries (the identity always qualifies)."""
    parts, _ = partition_qrels(train.qrels, by="chunk", test_fraction=0.2, seed=cfg.seed)
    inner, unseen = _subset(train, parts["train"]), _subset(train, parts["test"])
    parts, _ = partition_qrels(inner.qrels, by="query", test_fraction=cfg.split.val_fraction, seed=cfg.seed)
    inner, seen = _subset(inner, parts["train"]), _subset(inner, parts["test"])
    unseen = bounded(unseen, len(corpus_ids), cfg)
    tie_rank = id_rank(corpus_ids)
    base_unseen = judge(unseen.vectors, corpus, unseen.qrels, unseen.ids, corpus_ids,
                        tie_rank=tie_rank)[corpus.shape[1]]
    trials = []
    for lam in grid:
        r = fit(inner, seen, corpus, corpus_ids, base_model, cfg.replace(identity_penalty=lam), progress=False,
                tie_rank=tie_rank)
        on_unseen = judge(r.adapter.apply(unseen.vectors), corpus, unseen.qrels, unseen.ids, corpus_ids,
                          tie_rank=tie_rank)[corpus.shape[1]]
        seen_val = r.best_val[corpus.shape[1]][PRIMARY_METRIC]
        trials.append({"identity_penalty": lam, "seen_" + PRIMARY_METRIC: seen_val,
                       "unseen_" + PRIMARY_METRIC: on_unseen[PRIMARY_METRIC]})
        logger.info("identity penalty %g: seen %.4f, unseen %.4f (base unseen %.4f)", lam,
                    seen_val, on_unseen[PRIMARY_METRIC], base_unseen[PRIMARY_METRIC])
    safe = [t for t in trials if t["unseen_" + PRIMARY_METRIC] >= base_unseen[PRIMARY_METRIC]] or [
        max(trials, key=lambda t: t["identity_penalty"])]
    best = max(safe, key=lambda t: t["seen_" + PRIMARY_METRIC])
    return best["identity_penalty"], trials


def _subset(split: Split, qrels: Qrels) -> Split:
    rows = {q: i for i, q in enumerate(split.ids)}
    ids = [q for q in split.ids if q in qrels]
    return Split(split.vectors[[rows[q] for q in ids]], ids, qrels)


def train_adapter(dataset: Dataset, cfg: Config | None = None, *, encoder: Encoder | None = None,
                  corpus: CorpusSource | None = None, progress: bool = True) -> TrainResult:
    """Train an adapter on a dataset's training split with the encoder's cached embeddings (``train_on_vectors``;
    default encoder: ``cfg.encoder``); the result's adapter carries the resolved config, coverage, both validation
    estimates and every trial.

    ``corpus``: where the corpus vectors come from (``adapter.systems``; e.g. ``adapter.stores.StoreSource``, the
    vectors the index already holds) instead of the encoder's encoding of corpus.jsonl; then only queries are
    embedded."""
    from adapter.encoder import Encoder

    cfg = resolve_recipe(cfg or Config())
    check_options(cfg)
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
    train = Split(queries, qids, train_qrels)
    trials: list[dict] = []
    if cfg.train.identity_penalty == "auto":
        lam, trials = choose_identity_penalty(train, corpus, corpus_ids, encoder.identity, cfg)
        logger.info("identity penalty chosen on held-out chunks: %g", lam)
        cfg = cfg.replace(identity_penalty=lam, recipe="manual")
    result = train_on_vectors(train, corpus, corpus_ids, encoder.identity, cfg, progress=progress)
    est = result.estimates
    how = "; ".join(f"{k}: {e['queries']:,} questions on {e['chunks']:,} chunks over {e.get('folds', 1)} folds"
                    for k, e in est.items() if e)
    result.adapter.metadata = {
        "base_model_name": encoder.name,
        "config": resolve_loss(cfg).to_dict("encoder", "split", "train"),  # with the loss that ran
        "trained_on": cfg.split.train_split,
        "data_fingerprint": fingerprint(dataset, cfg.split.train_split), "validation": how,
        "recipe": result.recipe, "history_recipe": result.history_recipe, "objective": cfg.train.objective,
        "coverage": result.coverage, "estimates": est,
        "trials": result.trials, "best_epoch": result.best_epoch, "val_base": result.base_val,
        "val_best": result.best_val,
        "train_seconds": result.seconds,  # wall time of trials and refit, read by `adapter compare`
        "history": {"loss": [{"epoch": h["epoch"], "loss": _digits(h["loss"])} for h in result.history[1:]],
                    "val": [{"epoch": h["epoch"], PRIMARY_METRIC: {corpus.shape[1]: _digits(h[PRIMARY_METRIC])}}
                            for h in result.history if PRIMARY_METRIC in h]},  # 6 digits: a rank-16 file < 30 KB
        **({"penalty_trials": trials} if trials else {})}
    return result
