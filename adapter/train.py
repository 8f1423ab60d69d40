"""The training loop: one recipe trained on cached embeddings, never re-encoding a text.

``fit`` reads top to bottom: per step, take a batch of (query, positive chunk) pairs, draw negatives by index, adapt
the queries, loss (``nn.TripletMarginLoss``, or InfoNCE over the batch or over every chunk, optionally summed over
Matryoshka dims), plus an optional pull toward the identity, backward, clip, step, schedule; per epoch, keep the best
epoch, the last, or the average of the late ones. The losses, the in-batch masks, the identity pull and validation
are small functions below it.

Which recipe to train, how it is validated (cross-fitted folds) and chosen, and the dataset-level entry
``train_adapter`` live in ``adapter.choice``, which calls ``fit``; ``fit`` trusts the config it is given (resolved
and checked once by ``adapter.choice.resolve_train``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapter.config import Config, TrainConfig, default_dims
from adapter.data import Qrels
from adapter.encoder import truncate
from adapter.errors import AdapterError
from adapter.evaluate import PRIMARY_METRIC, Results, id_rank, is_relevant, search
from adapter.evaluate import evaluate as judge
from adapter.model import LinearAdapter

logger = logging.getLogger(__name__)

EPOCH_CHOICES = ("average", "last", "best")
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

    adapter: LinearAdapter  # or, for train.form "lora", an adapter.lora.QueryLora (the same file schema)
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


class Stopped(Exception):
    """A fit told to stop (``fit``'s ``stop``)."""


def _param(a: np.ndarray | None) -> nn.Parameter | None:
    return None if a is None else nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32)))


def _array(p: torch.Tensor | None) -> np.ndarray | None:
    return None if p is None else p.detach().numpy().copy()


class _Module(nn.Module):
    """The adapter as torch parameters, initialised from a LinearAdapter (the identity)."""

    def __init__(self, init: LinearAdapter):
        super().__init__()
        self.weight, self.U, self.V, self.bias = (_param(init.weight), _param(init.U), _param(init.V),
                                                  _param(init.bias))
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
        return dataclasses.replace(like, weight=_array(self.weight), U=_array(self.U), V=_array(self.V),
                                   bias=_array(self.bias))


@dataclass
class Pairs:
    """The training pairs and what a step looks up about them."""

    rows: np.ndarray  # (P, 2): query row, positive chunk row
    codes: np.ndarray  # sorted codes q * N + c of every relevant (query row, chunk row)
    n_relevant: np.ndarray  # (n_train,): relevant chunks per query
    n_corpus: int  # N


def training_pairs(split: Split, corpus_ids: Sequence[str]) -> Pairs:
    """Every (query, relevant chunk) of ``split`` as rows of the query vectors and of the corpus."""
    n_corpus = len(corpus_ids)
    judged = {c for q in split.ids for c in split.qrels[q]}
    corpus_row = {c: i for i, c in enumerate(corpus_ids) if c in judged}  # judged chunks only: no million-entry dict
    rows = np.array([(i, corpus_row[c]) for i, q in enumerate(split.ids) for c in split.qrels[q]], dtype=np.int64)
    codes = np.unique(rows[:, 0] * n_corpus + rows[:, 1])
    return Pairs(rows, codes, np.bincount(codes // n_corpus, minlength=len(split.ids)), n_corpus)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for the block, then put back: training's (128, 384) x (384, 384) steps
    lose more to a second thread's sync than it gives, and recipe trials run side by side instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit(train: Split, val: Split | None, corpus: np.ndarray, corpus_ids: list[str], base_model: str, cfg: Config,
        *, progress: bool = True, tie_rank: np.ndarray | None = None, base_val: dict[str, float] | None = None,
        outside: np.ndarray | None = None, stop: threading.Event | None = None) -> TrainResult:
    """Train one recipe (the config's fields, as ``adapter.choice.resolve_train`` returns them) on arrays: training
    queries, the (N, d) corpus vectors (only read, a row at a time: a memory-mapped array is never copied), and
    validation queries when ``epoch_choice`` is "best" (scored each epoch; a sample above ``train.val_budget``).
    The caller sets torch's threads (``torch_threads(1)``, as ``adapter.choice`` does).

    ``tie_rank`` (``id_rank(corpus_ids)``) and ``base_val`` (the identity's validation metrics): when the caller
    has them (seconds each at 10^6 chunks). ``outside``: corpus rows the uncovered pull leaves out, as if not yet
    indexed. ``stop``: once set, the fit raises ``Stopped`` at its next step (a refit ahead of the choice that lost)."""
    tc, choice = cfg.train, cfg.train.epoch_choice
    if tc.loss not in ("triplet", "infonce"):  # "auto" would train InfoNCE unasked: resolve_train makes it concrete
        raise AdapterError(f"fit takes a concrete loss, not {tc.loss!r} (adapter.choice.resolve_train gives one)")
    if choice == "best" and val is None:
        raise AdapterError("epoch_choice 'best' needs validation queries")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_corpus, dim = corpus.shape
    pairs = training_pairs(train, corpus_ids)
    val = bounded(val, n_corpus, cfg)
    if val is not None and tie_rank is None:
        tie_rank = id_rank(corpus_ids)
    form = pull_form(corpus, pairs.rows[:, 1], float(tc.identity_penalty), float(tc.uncovered_pull), outside)
    hard = mine_hard_negatives(train.vectors, corpus, pairs.codes, tc.hard_pool) if tc.negatives == "hard" else None

    init = LinearAdapter.identity(dim, base_model, rank=tc.rank, bias=tc.bias, seed=cfg.seed)
    module = _Module(init)
    params = list(module.parameters())
    opt, sched = optimizer(params, tc, -(-len(pairs.rows) // tc.batch_size) * tc.epochs)
    margin = nn.TripletMarginLoss(margin=tc.margin)
    Q = torch.from_numpy(np.asarray(train.vectors, dtype=np.float32))  # (n_train, d): fixed inputs
    dims = list(default_dims(dim)) if tc.matryoshka else [dim]  # the loss is summed over these (Matryoshka)
    corpus_wide = tc.infonce_candidates == "corpus"  # InfoNCE over every chunk, else over the batch's positives
    all_chunks = every_chunk(corpus, dims) if corpus_wide else {}  # (N, m) per dim

    base_val = best_val = (base_val if val is not None and base_val else validate(module, val, corpus, corpus_ids,
                                                                                 tie_rank))
    best_epoch, best_state, summed = 0, _snapshot(module), None
    average_from = tc.epochs // 2 + 1  # "average": the late half of the epochs, when the decaying lr has settled
    history: list[dict[str, float]] = [{"epoch": 0, "loss": float("nan"), **primary(base_val)}]
    t0 = time.perf_counter()
    bar = tqdm(range(1, tc.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        order = rng.permutation(len(pairs.rows))
        losses = []
        for g in range(0, len(order), tc.batch_size * GATHER_STEPS):
            # the rows of many steps gathered at once: one index of the queries and one read of the corpus
            rows = pairs.rows[order[g:g + tc.batch_size * GATHER_STEPS]]  # (n, 2): query row, positive row
            queries = Q[torch.from_numpy(rows[:, 0])]  # (n, d)
            positives = gather(corpus, rows[:, 1], dims)  # (n, m) per dim
            if tc.loss != "triplet" and not corpus_wide:
                masks = in_batch_masks(rows[:, 0], rows[:, 1], tc.batch_size, pairs)  # (steps, B, B)
            for i, s in enumerate(range(0, len(rows), tc.batch_size)):
                if stop is not None and stop.is_set():
                    raise Stopped
                b = slice(s, s + tc.batch_size)
                q_rows, pos = rows[b, 0], rows[b, 1]  # (B,) each
                anchor = module(queries[b])  # (B, d), unit length
                if tc.loss == "triplet":
                    negatives = triplet_negatives(q_rows, tc.negatives_per_query, hard, pairs, rng)  # (B, k)
                    loss = triplet_loss(anchor, {m: v[b] for m, v in positives.items()},
                                        gather(corpus, negatives, dims), dims, margin)
                elif corpus_wide:  # every chunk a candidate: the others relevant to the query are not negatives
                    loss = infonce_loss(anchor, all_chunks, corpus_masks(q_rows, pos, pairs), torch.from_numpy(pos),
                                        dims, tc.temperature)
                else:  # the batch's positives are the candidates: query i's positive is candidate i
                    loss = infonce_loss(anchor, {m: v[b] for m, v in positives.items()},
                                        masks[i][:len(pos), :len(pos)], torch.arange(tc.batch_size)[:len(pos)],
                                        dims, tc.temperature)
                if form is not None:
                    loss = loss + identity_pull(module.delta(), form)
                for p in params:
                    p.grad = None
                loss.backward()
                clip_grads(params, tc.grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.detach())
        metrics = validate(module, val, corpus, corpus_ids, tie_rank) if choice == "best" else {}  # when it selects
        history.append({"epoch": epoch, "loss": torch.stack(losses).mean().item(), **primary(metrics)})
        if choice == "best" and metrics[PRIMARY_METRIC] > best_val[PRIMARY_METRIC]:
            best_epoch, best_val, best_state = epoch, metrics, _snapshot(module)
        if choice == "average" and epoch >= average_from:
            summed = _add_states(summed, _snapshot(module))
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", best=best_epoch)
    if choice == "last" or (choice == "average" and summed is None):
        best_state, best_epoch = _snapshot(module), tc.epochs
    elif choice == "average":
        best_state, best_epoch = {k: v / (tc.epochs - average_from + 1) for k, v in summed.items()}, tc.epochs
    seconds = time.perf_counter() - t0
    module.load_state_dict(best_state)
    if choice != "best":
        best_val = validate(module, val, corpus, corpus_ids, tie_rank)  # what ships, scored once
        history[-1].update(primary(best_val))
    if val is not None:
        logger.debug("%s, epoch %d: validation %s %.4f (base %.4f)", choice, best_epoch, PRIMARY_METRIC,
                     best_val[PRIMARY_METRIC], base_val[PRIMARY_METRIC])
    by_dim = ({dim: base_val} if base_val else {}), ({dim: best_val} if best_val else {})  # keyed by dim, as results
    return TrainResult(module.export(init), best_epoch, history, *by_dim, seconds)


# --------------------------------------------------------------------------------------------- pieces of a step


def optimizer(params: list[nn.Parameter], tc: TrainConfig,
              total: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the adapter's parameters and its schedule over the run's ``total`` steps (``lr_factor``)."""
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters  # one kernel per step; bit-reproducible
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused or None)
    warmup = max(1, int(tc.warmup_fraction * total))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, total=total, warmup=warmup))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate's factor at ``step``: linear warmup over ``warmup`` steps, then linear decay to 0."""
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def at_dim(v: torch.Tensor, m: int) -> torch.Tensor:
    """Vectors (..., d) at Matryoshka dim ``m``: their first ``m`` dims renormalised, (..., m); the full dim as is."""
    return v if m == v.shape[-1] else F.normalize(v[..., :m], dim=-1)


def gather(corpus: np.ndarray, rows: np.ndarray, dims: Sequence[int]) -> dict[int, torch.Tensor]:
    """The chunks of ``rows`` (any shape) at every loss dim, (*rows.shape, m): gathered rows, the corpus not copied."""
    v = torch.from_numpy(np.asarray(corpus[rows], dtype=np.float32))
    return {m: at_dim(v, m) for m in dims}


def every_chunk(corpus: np.ndarray, dims: Sequence[int]) -> dict[int, torch.Tensor]:
    """Every chunk at every loss dim, (N, m) each, truncated once: corpus-wide InfoNCE's candidates in each step
    (cheap below ~10^5 chunks)."""
    dim = corpus.shape[1]
    return {m: torch.from_numpy(truncate(corpus, m) if m < dim else np.asarray(corpus, dtype=np.float32))
            for m in dims}


def triplet_loss(anchor: torch.Tensor, positives: dict[int, torch.Tensor], negatives: dict[int, torch.Tensor],
                 dims: Sequence[int], margin: nn.TripletMarginLoss) -> torch.Tensor:
    """``nn.TripletMarginLoss`` of (B, d) adapted queries against their (B, m) positives and (B, k, m) negatives,
    summed over ``dims`` (MatryoshkaLoss's weights of 1)."""
    loss = 0.0
    for m in dims:
        a = at_dim(anchor, m)  # (B, m)
        loss = loss + margin(a[:, None], positives[m][:, None], negatives[m])  # (B, 1, m) against (B, k, m)
    return loss


def infonce_loss(anchor: torch.Tensor, candidates: dict[int, torch.Tensor], masked: torch.Tensor,
                 target: torch.Tensor, dims: Sequence[int], temperature: float) -> torch.Tensor:
    """InfoNCE (MultipleNegativesRankingLoss's form) of (B, d) adapted queries over (M, m) candidate chunks, query
    i's positive at ``target[i]``; ``masked`` (B, M) is True where a candidate is neither its positive nor a
    negative. Summed over ``dims``."""
    loss = 0.0
    for m in dims:
        logits = at_dim(anchor, m) @ candidates[m].T / temperature  # (B, M)
        loss = loss + F.cross_entropy(logits.masked_fill(masked, float("-inf")), target)
    return loss


def triplet_negatives(q_rows: np.ndarray, k: int, hard: np.ndarray | None, pairs: Pairs,
                      rng: np.random.Generator) -> np.ndarray:
    """(B, k) chunk rows, k negatives per query: drawn from its mined hard negatives, or from the whole corpus."""
    q_rep = np.repeat(q_rows, k)  # (B*k,): each query k times, one negative each
    if hard is not None:
        neg = hard[q_rep, rng.integers(0, hard.shape[1], size=len(q_rep))]
    else:
        neg = _random_negatives(q_rep, pairs.n_corpus, pairs.codes, rng)
    return neg.reshape(len(q_rows), -1)


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


def in_batch_masks(q_rows: np.ndarray, pos: np.ndarray, batch: int, pairs: Pairs) -> torch.Tensor:
    """(steps, B, B) for the consecutive batches of ``batch`` rows (the last one padded): True where a batch's
    positive is relevant to another of its queries, so not its negative. A query with one relevant chunk masks
    only its own positive's repeats (no lookup); the others are looked up. Made for many steps at once."""
    n = -(-len(pos) // batch) * batch
    p = np.pad(pos, (0, n - len(pos)), constant_values=-1).reshape(-1, batch)  # (steps, B); -1 is padding
    q = np.pad(q_rows, (0, n - len(q_rows))).reshape(-1, batch)
    masked = p[:, None, :] == p[:, :, None]  # (steps, B, B): [s, i, j] the batch's j-th positive is i's own
    many = pairs.n_relevant[q] > 1
    if many.any():
        s_i, i_i = np.nonzero(many)
        masked[s_i, i_i] = is_relevant(q[s_i, i_i][:, None] * pairs.n_corpus + p[s_i], pairs.codes)
    masked[:, np.arange(batch), np.arange(batch)] = False
    return torch.from_numpy(masked)


def corpus_masks(q_rows: np.ndarray, pos: np.ndarray, pairs: Pairs) -> torch.Tensor:
    """(B, N): True where a chunk is relevant to the query but not the positive of this pair, so not a negative."""
    masked = is_relevant(q_rows[:, None] * pairs.n_corpus + np.arange(pairs.n_corpus)[None, :], pairs.codes)
    masked[np.arange(len(pos)), pos] = False
    return torch.from_numpy(masked)


def identity_pull(change: torch.Tensor, form: torch.Tensor) -> torch.Tensor:
    """``sum(D * (A @ D))`` for a symmetric (d, d) ``A``, or ``a * sum(D * D)`` for a 0-d ``a``: the pulls toward the
    identity as one quadratic form in the adapter's change D, with the gradient ``2 A D`` from the one product
    ``A @ D`` (autograd of the plain form would make ``A^T @ grad`` as a second d^3 product per step). Plain torch
    ops, so the backward pass stays in C++ and never waits for the GIL that a parallel trial holds."""
    fixed = change.detach()
    applied = form @ fixed if form.dim() else form * fixed  # A D, a constant to autograd
    return 2 * (change * applied).sum() - (fixed * applied).sum()  # value sum(D A D), gradient 2 A D


def pull_form(corpus: np.ndarray, covered_rows: np.ndarray, penalty: float, uncovered: float,
              outside: np.ndarray | None) -> torch.Tensor | None:
    """Both pulls toward the identity, ``penalty * |D|^2 + sum(D * (M @ D))`` (M: ``uncovered_moment``), as the one
    form ``identity_pull`` takes: a (d, d) matrix, a 0-d scalar, or None when neither pulls."""
    moment = uncovered_moment(corpus, covered_rows, uncovered, outside)
    if moment is not None:
        return moment + penalty * torch.eye(corpus.shape[1])
    return torch.tensor(penalty) if penalty else None


def clip_grads(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """``nn.utils.clip_grad_norm_`` for these few CPU tensors, the same arithmetic without its per-call grouping by
    device and dtype: the stock call held the GIL for a sixth of a parallel trial's training step."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)


# ------------------------------------------------------------------------------------- epochs and validation


def validate(module: nn.Module, val: Split | None, corpus: np.ndarray, corpus_ids: list[str],
             tie_rank: np.ndarray | None) -> dict[str, float]:
    """The adapted validation queries' metrics at the full dim ({} without validation queries)."""
    if val is None:
        return {}
    with torch.no_grad():
        adapted = module(torch.from_numpy(val.vectors)).numpy()
    return judge(adapted, corpus, val.qrels, val.ids, corpus_ids, tie_rank=tie_rank)[corpus.shape[1]]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _add_states(summed: dict[str, torch.Tensor] | None, now: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The running sum of the late epochs' weights ("average")."""
    return now if summed is None else {k: summed[k] + now[k] for k in now}


def primary(metrics: dict[str, float]) -> dict[str, float]:
    """Only the primary metric (what a history row keeps), or nothing."""
    return {PRIMARY_METRIC: metrics[PRIMARY_METRIC]} if metrics else {}


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


# ---------------------------------------------------------------------------- negatives and the uncovered pull


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
