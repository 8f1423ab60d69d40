"""Train a query-only adapter on cached embeddings: a custom PyTorch loop that never re-encodes a text.

The loop, per step: sample a batch of (query, positive chunk) pairs, draw negatives by index, adapt the queries, loss
(``nn.TripletMarginLoss`` by default, or InfoNCE), plus an optional pull toward the identity, backward, clip, step,
schedule. After every epoch the shared evaluator scores the validation queries; the best epoch by ndcg@10 is kept and
epoch 0 (the identity) is always a candidate, so the shipped adapter never scores below base on validation.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adapter.config import Config
from adapter.data import Dataset, Qrels, fingerprint, partition_qrels, train_val_qrels
from adapter.errors import AdapterError
from adapter.evaluate import PRIMARY_METRIC, Results, search
from adapter.evaluate import evaluate as judge
from adapter.model import LinearAdapter
from adapter.systems import CorpusSource, EncodedCorpus

if TYPE_CHECKING:
    from adapter.encoder import Encoder

logger = logging.getLogger(__name__)

PENALTY_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)  # identity-penalty strengths tried by identity_penalty="auto"


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
    seconds: float = 0.0  # wall time of the loop itself (embedding excluded)


class _Module(nn.Module):
    """The adapter as torch parameters, initialised from a LinearAdapter (the identity)."""

    def __init__(self, init: LinearAdapter):
        super().__init__()
        as_param = lambda a: nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32)))  # noqa: E731
        self.weight = as_param(init.weight) if init.weight is not None else None
        self.U = as_param(init.U) if init.U is not None else None
        self.V = as_param(init.V) if init.V is not None else None
        self.bias = as_param(init.bias) if init.bias is not None else None

    def delta(self) -> torch.Tensor:
        """W − I (full) or U V (low rank): how far the adapter is from the identity."""
        if self.weight is not None:
            return self.weight - torch.eye(self.weight.shape[0])
        return self.U @ self.V

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d), unit length
        y = x @ self.weight if self.weight is not None else x + (x @ self.U) @ self.V
        if self.bias is not None:
            y = y + self.bias
        return F.normalize(y, dim=-1)

    def export(self, like: LinearAdapter) -> LinearAdapter:
        get = lambda p: None if p is None else p.detach().numpy().copy()  # noqa: E731
        return dataclasses.replace(like, weight=get(self.weight), U=get(self.U), V=get(self.V), bias=get(self.bias))


def _pairs(split: Split, n_corpus: int, corpus_row: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(P, 2) array of (query row, positive chunk row), and the sorted codes q*N+c of every relevant pair."""
    pairs = np.array([(i, corpus_row[c]) for i, q in enumerate(split.ids) for c in split.qrels[q]], dtype=np.int64)
    return pairs, np.unique(pairs[:, 0] * n_corpus + pairs[:, 1])


def _is_relevant(codes: np.ndarray, rel_codes: np.ndarray) -> np.ndarray:
    """Membership of pair codes in the sorted relevant codes (a binary search: no per-step sort as np.isin does)."""
    at = np.minimum(np.searchsorted(rel_codes, codes), len(rel_codes) - 1)
    return rel_codes[at] == codes


def _random_negatives(q_rows: np.ndarray, n_corpus: int, rel_codes: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """One chunk per query drawn uniformly from the corpus, redrawn until none is relevant to its query."""
    neg = rng.integers(0, n_corpus, size=len(q_rows))
    for _ in range(100):
        bad = _is_relevant(q_rows * n_corpus + neg, rel_codes)
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
        keep = r[~_is_relevant(i * n + r, rel_codes)][:pool]
        if not len(keep):
            raise AdapterError("no hard negative left: every retrieved chunk is relevant")
        out[i] = np.resize(keep, pool)
    return out


def _lr_lambda(total: int, warmup: int):
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def fit(train: Split, val: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str,
        cfg: Config | None = None, *, progress: bool = True) -> TrainResult:
    """Train an adapter on arrays: train/validation query vectors and qrels, and the (fixed) corpus vectors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (32, 384) x (384, 384) steps: a second thread costs more in sync than it gives
    try:
        return _fit(train, val, corpus, corpus_ids, base_model, cfg or Config(), progress)
    finally:
        torch.set_num_threads(threads)


def resolve_loss(cfg: Config) -> Config:
    """The "auto" loss made concrete: triplet for the full matrix (unchanged), InfoNCE for the low-rank form, which
    learns far less from triplets (rank 16 on AppleQA kept 65% of the full adapter's gain with triplet, 98% with
    InfoNCE: bench/bench_tiny.py)."""
    return cfg.replace(loss=("triplet" if cfg.train.rank is None else "infonce")) if cfg.train.loss == "auto" else cfg


def _fit(train: Split, val: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str, cfg: Config,
         progress: bool) -> TrainResult:
    cfg = resolve_loss(cfg)
    penalty = float(cfg.train.identity_penalty)
    if cfg.train.loss not in ("triplet", "infonce"):
        raise AdapterError(f"--loss must be 'triplet' or 'infonce', not {cfg.train.loss!r}")
    if cfg.train.negatives not in ("random", "hard"):
        raise AdapterError(f"--negatives must be 'random' or 'hard', not {cfg.train.negatives!r}")
    if cfg.train.epochs < 0 or cfg.train.batch_size < 1 or cfg.train.lr <= 0:
        raise AdapterError("--epochs must be >= 0, --batch-size >= 1 and --lr > 0")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n_corpus, dim = corpus.shape
    corpus_row = {c: i for i, c in enumerate(corpus_ids)}
    pairs, rel_codes = _pairs(train, n_corpus, corpus_row)
    hard = (mine_hard_negatives(train.vectors, corpus, rel_codes, cfg.train.hard_pool)
            if cfg.train.negatives == "hard" else None)

    init = LinearAdapter.identity(dim, base_model, rank=cfg.train.rank, bias=cfg.train.bias, seed=cfg.seed)
    module = _Module(init)
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters  # one kernel per step; bit-reproducible
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            fused=fused or None)
    steps_per_epoch = -(-len(pairs) // cfg.train.batch_size)
    total = steps_per_epoch * cfg.train.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, int(cfg.train.warmup_fraction * total))))
    triplet = nn.TripletMarginLoss(margin=cfg.train.margin)
    Q, C = torch.from_numpy(train.vectors), torch.from_numpy(corpus)  # (n_train, d), (N, d): fixed inputs

    def validate() -> dict[str, float]:
        with torch.no_grad():
            adapted = module(torch.from_numpy(val.vectors)).numpy()
        return judge(adapted, corpus, val.qrels, val.ids, corpus_ids)[dim]

    base_val = best_val = validate()
    best_epoch, best_state = 0, {k: v.clone() for k, v in module.state_dict().items()}
    history: list[dict[str, float]] = [{"epoch": 0, "loss": float("nan"), PRIMARY_METRIC: base_val[PRIMARY_METRIC]}]
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.train.epochs + 1), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        order = rng.permutation(len(pairs))
        losses = []
        for s in range(0, len(order), cfg.train.batch_size):
            batch = pairs[order[s:s + cfg.train.batch_size]]  # (B, 2): query row, positive row
            q_rows, pos = batch[:, 0], batch[:, 1]
            anchor = module(Q[q_rows])  # (B, d)
            if cfg.train.loss == "triplet":
                # (B*k,): each query k times, one negative each
                q_rep = np.repeat(q_rows, cfg.train.negatives_per_query)
                if hard is not None:
                    neg = hard[q_rep, rng.integers(0, hard.shape[1], size=len(q_rep))]
                else:
                    neg = _random_negatives(q_rep, n_corpus, rel_codes, rng)
                # (B, 1, d) anchors and positives broadcast against (B, k, d) negatives
                loss = triplet(anchor[:, None], C[pos][:, None], C[neg.reshape(len(pos), -1)])
            else:
                cand = C if cfg.train.infonce_candidates == "corpus" else C[pos]  # (M, d)
                cand_rows = np.arange(n_corpus) if cfg.train.infonce_candidates == "corpus" else pos
                logits = anchor @ cand.T / cfg.train.temperature  # (B, M)
                target = pos if cfg.train.infonce_candidates == "corpus" else np.arange(len(pos))
                # other chunks relevant to the same query are not negatives
                masked = _is_relevant(q_rows[:, None] * n_corpus + cand_rows[None, :], rel_codes)
                masked[np.arange(len(pos)), target] = False
                logits = logits.masked_fill(torch.from_numpy(masked), float("-inf"))
                loss = F.cross_entropy(logits, torch.from_numpy(target))
            if penalty:
                loss = loss + penalty * module.delta().pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.detach())
        metrics = validate()
        loss_mean = torch.stack(losses).mean().item()
        history.append({"epoch": epoch, "loss": loss_mean, PRIMARY_METRIC: metrics[PRIMARY_METRIC]})
        if metrics[PRIMARY_METRIC] > best_val[PRIMARY_METRIC]:
            best_epoch, best_val = epoch, metrics
            best_state = {k: v.clone() for k, v in module.state_dict().items()}
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", val=f"{metrics[PRIMARY_METRIC]:.4f}", best=best_epoch)
    seconds = time.perf_counter() - t0
    module.load_state_dict(best_state)
    logger.info("epoch %d won: validation %s %.4f (base %.4f)", best_epoch, PRIMARY_METRIC,
                best_val[PRIMARY_METRIC], base_val[PRIMARY_METRIC])
    return TrainResult(module.export(init), best_epoch, history, {dim: base_val}, {dim: best_val}, seconds)


def choose_identity_penalty(train: Split, corpus: np.ndarray, corpus_ids: list[str], base_model: str,
                            cfg: Config, grid: tuple[float, ...] = PENALTY_GRID) -> tuple[float, list[dict]]:
    """Pick the identity penalty on held-out chunks: hold out a seeded share of the training chunks, train at each
    strength on the rest, and keep the strength with the best ndcg@10 on seen-chunk validation queries among those
    that do not lower ndcg@10 on the held-out chunks' queries (the identity always qualifies)."""
    parts, _ = partition_qrels(train.qrels, by="chunk", test_fraction=0.2, seed=cfg.seed)
    inner, unseen = _subset(train, parts["train"]), _subset(train, parts["test"])
    parts, _ = partition_qrels(inner.qrels, by="query", test_fraction=cfg.split.val_fraction, seed=cfg.seed)
    inner, seen = _subset(inner, parts["train"]), _subset(inner, parts["test"])
    base_unseen = judge(unseen.vectors, corpus, unseen.qrels, unseen.ids, corpus_ids)[corpus.shape[1]]
    trials = []
    for lam in grid:
        r = fit(inner, seen, corpus, corpus_ids, base_model, cfg.replace(identity_penalty=lam), progress=False)
        on_unseen = judge(r.adapter.apply(unseen.vectors), corpus, unseen.qrels, unseen.ids,
                          corpus_ids)[corpus.shape[1]]
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


def _digits(v: float) -> float:
    return float(f"{v:.6g}")


def train_adapter(dataset: Dataset, encoder: Encoder, cfg: Config | None = None, *,
                  progress: bool = True, corpus: CorpusSource | None = None) -> TrainResult:
    """Train an adapter on a dataset split with the encoder's cached embeddings; validation is the ``dev`` split if
    present, else a seeded slice of train carved the way the dataset was split (by query or by whole chunk).

    ``corpus``: where the corpus vectors come from (``adapter.systems``; e.g. ``adapter.stores.StoreSource``, the
    vectors the index already holds) instead of the encoder's encoding of corpus.jsonl; then only queries are
    embedded."""
    cfg = cfg or Config()
    train_qrels, val_qrels, how = train_val_qrels(dataset, train_split=cfg.split.train_split,
                                                  val_fraction=cfg.split.val_fraction, seed=cfg.seed)
    qids = [*train_qrels, *val_qrels]
    source = corpus or EncodedCorpus()
    corpus_ids, corpus = source.read(dataset, encoder)
    missing = sorted({c for rels in (*train_qrels.values(), *val_qrels.values()) for c in rels} - set(corpus_ids))
    if missing:
        raise AdapterError(f"{source.name}: holds no vector for {len(missing)} chunks the training queries judge "
                           f"(first: {missing[0]!r}); its ids must be corpus ids")
    queries = encoder.encode_queries([dataset.queries[q] for q in qids])
    train = Split(queries[: len(train_qrels)], list(train_qrels), train_qrels)
    val = Split(queries[len(train_qrels):], list(val_qrels), val_qrels)
    logger.info("training on %d queries, validating on %d (%s)", len(train.ids), len(val.ids), how)
    trials: list[dict] = []
    cfg = resolve_loss(cfg)  # the file records the loss that ran
    if cfg.train.identity_penalty == "auto":
        lam, trials = choose_identity_penalty(train, corpus, corpus_ids, encoder.identity, cfg)
        logger.info("identity penalty chosen on held-out chunks: %g", lam)
        cfg = cfg.replace(identity_penalty=lam)
    result = fit(train, val, corpus, corpus_ids, encoder.identity, cfg, progress=progress)
    result.adapter.metadata = {
        "base_model_name": encoder.name, "config": cfg.to_dict("encoder", "split", "train"),
        "trained_on": cfg.split.train_split,
        "data_fingerprint": fingerprint(dataset, cfg.split.train_split), "validation": how,
        "best_epoch": result.best_epoch, "val_base": result.base_val, "val_best": result.best_val,
        "train_seconds": result.seconds,  # wall time of the loop, read by `adapter compare`
        "history": {"loss": [{"epoch": h["epoch"], "loss": _digits(h["loss"])} for h in result.history[1:]],
                    "val": [{"epoch": h["epoch"], PRIMARY_METRIC: {corpus.shape[1]: _digits(h[PRIMARY_METRIC])}}
                            for h in result.history]},  # 6 digits keep a rank-16 float16 file under 30 KB
        **({"penalty_trials": trials} if trials else {})}
    return result
