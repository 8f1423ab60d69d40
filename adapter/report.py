"""Side-by-side tables of evaluation results, and ``compare``: base, adapters, fine-tunes and other models scored by
the one judge on one split, with what each costs, paired bootstrap intervals on its change, and plots."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adapter.config import Config, default_dims
from adapter.data import Dataset, atomic_write, ensure_dir, fingerprint, relevant
from adapter.errors import AdapterError
from adapter.evaluate import METRICS, PRIMARY_METRIC, Results

if TYPE_CHECKING:
    from adapter.encoder import Encoder
    from adapter.model import LinearAdapter

logger = logging.getLogger(__name__)

LEVEL = 0.95  # confidence level of the intervals


def format_table(results: dict[str, Results], metrics: Sequence[str] = METRICS, baseline: str = "base") -> str:
    """A plain-text table per dim: one row per metric, one column per system, and each system's change against
    ``baseline`` (when present) as a percentage."""
    systems = list(results)
    others = [s for s in systems if s != baseline] if baseline in results else []
    dims = list(dict.fromkeys(d for r in results.values() for d in r))  # systems of smaller models lack some dims
    header = ["", *systems, *[f"Δ {s}" for s in others]]
    lines: list[str] = []
    for d in dims:
        rows = [[f"dim {d}", *header[1:]]]
        for m in metrics:
            row = [m, *[f"{results[s][d][m]:.4f}" if d in results[s] else "n/a" for s in systems]]
            for s in others:
                base = results[baseline][d][m] if d in results[baseline] else 0.0
                row.append(f"{(results[s][d][m] - base) / base:+.1%}" if base and d in results[s] else "n/a")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def paired_bootstrap(base: np.ndarray, system: np.ndarray, *, samples: int = 1000, seed: int = 0,
                     level: float = LEVEL) -> tuple[float, float, float]:
    """Mean per-query change (system − base) and its percentile interval: the queries are resampled with replacement
    ``samples`` times, the same resample for both systems (paired). Returns (change, low, high)."""
    delta = np.asarray(system, dtype=np.float64) - np.asarray(base, dtype=np.float64)  # (n,)
    if delta.ndim != 1 or not len(delta):
        raise AdapterError("paired bootstrap needs two equal-length, non-empty lists of per-query values")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for s in range(0, samples, 256):  # blocks keep memory at 256 x n indices
        idx = rng.integers(0, len(delta), size=(min(256, samples - s), len(delta)))
        means[s:s + len(idx)] = delta[idx].mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(delta.mean()), float(low), float(high)


@dataclass
class SystemInfo:
    """One compared system and what it costs."""

    kind: str  # "base", "adapter", "fine-tune" or "model"
    source: str  # the adapter file, model folder or model name
    train_seconds: float | None  # training wall time when recorded; None for pre-trained models
    artifact_bytes: int  # the adapter file, or the model's weights
    reembed: bool  # whether using it means embedding the whole corpus again
    latency_ms: float  # median time to turn one query text into its search vector (embedding + adapter), uncached
    history: dict[str, list] | None = None  # training curves: val_epoch/val (ndcg@10 at full dim), loss_epoch/loss


@dataclass
class Comparison:
    """What ``compare`` measured and wrote."""

    results: dict[str, Results]  # system -> dim -> metric -> value, as `adapter evaluate --json`
    systems: dict[str, SystemInfo]
    intervals: dict[str, dict[int, tuple[float, float, float]]]  # system -> dim -> ndcg@10 (change, low, high)
    queries: int
    files: list[Path]


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise AdapterError("compare draws its plots with matplotlib: pip install 'adapter[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _weights_bytes(encoder: Encoder) -> int:
    return sum(t.numel() * t.element_size() for t in encoder.model.state_dict().values())


def _encode_seconds(encoder: Encoder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-text seconds to embed one query on its own (after one warm-up), and the vectors."""
    kw = {"normalize_embeddings": True, "convert_to_numpy": True, "show_progress_bar": False}
    encoder.model.encode_query(list(texts[:1]), **kw)
    seconds, vectors = [], []
    for text in texts:
        t = time.perf_counter()
        vectors.append(encoder.model.encode_query([text], **kw)[0])
        seconds.append(time.perf_counter() - t)
    return np.array(seconds), np.array(vectors, dtype=np.float32)


def _apply_seconds(adapter: LinearAdapter, vectors: np.ndarray) -> np.ndarray:
    seconds = []
    for v in vectors:
        t = time.perf_counter()
        adapter.apply(v[None, :])
        seconds.append(time.perf_counter() - t)
    return np.array(seconds)


def _adapter_history(meta: dict[str, Any]) -> dict[str, list] | None:
    rows = meta.get("history") or []
    if not rows:
        return None
    losses = [r for r in rows if r.get("loss") is not None]
    return {"val_epoch": [r["epoch"] for r in rows], "val": [r[PRIMARY_METRIC] for r in rows],
            "loss_epoch": [r["epoch"] for r in losses], "loss": [r["loss"] for r in losses]}


def _finetune_history(meta: dict[str, Any]) -> dict[str, list] | None:
    hist = meta.get("history") or {}
    if not hist.get("val"):
        return None
    full = str(meta["dims"][0])
    return {"val_epoch": [r["epoch"] for r in hist["val"]], "val": [r[PRIMARY_METRIC][full] for r in hist["val"]],
            "loss_epoch": [r["epoch"] for r in hist.get("loss", [])], "loss": [r["loss"] for r in hist.get("loss", [])]}


def _check_trained_on(dataset: Dataset, meta: dict[str, Any], source: str) -> None:
    """Warn when a system was trained on other data than this dataset's training split (its score may then be
    inflated by test queries it saw, or simply not comparable)."""
    split, fp = meta.get("trained_on"), meta.get("data_fingerprint")
    if split and fp and split in dataset.qrels and fingerprint(dataset, split) != fp:
        logger.warning("%s was trained on other data than %s's %s split", source, dataset.path, split)


def _name(names: dict[str, Any], name: str, source: str) -> str:
    if name in names:
        raise AdapterError(f"{source}: another system is already named {name!r}; rename it")
    return name


def compare(dataset: Dataset, out: str | os.PathLike, cfg: Config | None = None, *, adapters: Sequence[str] = (),
            finetuned: Sequence[str] = (), models: Sequence[str] = (), allow_other_model: bool = False,
            progress: bool = True) -> Comparison:
    """Score base (``cfg.encoder.model``), each adapter on it, each fine-tuned model folder and each other model on
    one split at every dim; measure what each costs; write ``report.md``, ``results.json`` (the shape of `adapter
    evaluate --json`), ``summary.json`` (costs and intervals) and PNG plots into ``out``.

    Systems are named ``base``, then after the adapter file's stem, the model folder's name or the model's name.
    """
    from adapter.encoder import Encoder
    from adapter.model import LinearAdapter
    from adapter.pipeline import evaluate_systems, mean_results, results_to_json

    cfg = cfg or Config()
    plt = _require_matplotlib()
    qrels = relevant(dataset.split(cfg.evaluate.split))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out}: exists and is not a folder")
    for folder in finetuned:
        if not Path(folder).is_dir():
            raise AdapterError(f"{folder}: no such model folder")
    enc = lambda name: Encoder.from_config(cfg.replace(model=name), show_progress=progress)  # noqa: E731
    base = enc(cfg.encoder.model)
    systems: dict[str, tuple[Encoder, LinearAdapter | None]] = {"base": (base, None)}
    # kind, source, metadata
    metas: dict[str, tuple[str, str, dict[str, Any]]] = {"base": ("base", cfg.encoder.model, {})}
    for p in adapters:
        adapter = LinearAdapter.load(p)
        adapter.check_base_model(base.identity, allow_other_model=allow_other_model, source=str(p))
        if adapter.dim != base.dim:
            raise AdapterError(f"{p}: adapter is {adapter.dim}-dimensional, the model {base.dim}")
        name = _name(systems, Path(p).stem, str(p))
        systems[name], metas[name] = (base, adapter), ("adapter", str(p), adapter.metadata)
    for folder in finetuned:
        meta_file = Path(folder) / "finetune.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        name = _name(systems, Path(folder).resolve().name, str(folder))
        systems[name], metas[name] = (enc(str(folder)), None), ("fine-tune", str(folder), meta)
    for m in models:
        name = _name(systems, m.rstrip("/").split("/")[-1], m)
        systems[name], metas[name] = (enc(m), None), ("model", m, {})
    for _, source, meta in metas.values():
        _check_trained_on(dataset, meta, source)

    dims = cfg.evaluate.dims or sorted({d for e, _ in systems.values() for d in default_dims(e.dim)}, reverse=True)
    per_query = evaluate_systems(dataset, systems, split=cfg.evaluate.split, dims=dims, per_query=True)
    results = mean_results(per_query)
    intervals = {s: {d: paired_bootstrap(per_query["base"][d][PRIMARY_METRIC], per_query[s][d][PRIMARY_METRIC],
                                         samples=cfg.report.bootstrap_samples, seed=cfg.seed)
                     for d in per_query[s] if d in per_query["base"]}
                 for s in systems if s != "base"}

    texts = [dataset.queries[q] for q in list(qrels)[:cfg.report.latency_queries]]
    timed: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # one timing per encoder, shared by its adapters
    infos: dict[str, SystemInfo] = {}
    for name, (encoder, adapter) in systems.items():
        kind, source, meta = metas[name]
        if id(encoder) not in timed:
            timed[id(encoder)] = _encode_seconds(encoder, texts)
        seconds, vectors = timed[id(encoder)]
        if adapter is not None:
            seconds = seconds + _apply_seconds(adapter, vectors)
            size, history = Path(source).stat().st_size, _adapter_history(meta)
        else:
            size, history = _weights_bytes(encoder), _finetune_history(meta) if kind == "fine-tune" else None
        infos[name] = SystemInfo(kind, source, meta.get("train_seconds"), size, kind in ("fine-tune", "model"),
                                 float(np.median(seconds) * 1000), history)

    ensure_dir(out)
    comparison = Comparison(results, infos, intervals, len(qrels), [])
    files = {"results.json": json.dumps(results_to_json(results), indent=2),
             "summary.json": json.dumps(_summary(dataset, cfg, comparison), indent=2)}
    plots = {"ndcg_by_dim.png": _plot_dims(plt, results)}
    if any(i.history for i in infos.values()):
        plots["training_curves.png"] = _plot_curves(plt, infos)
    files["report.md"] = render_markdown(dataset, cfg, comparison, list(plots))
    for name, data in {**files, **plots}.items():
        with atomic_write(out / name, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        comparison.files.append(out / name)
    return comparison


def _summary(dataset: Dataset, cfg: Config, c: Comparison) -> dict[str, Any]:
    return {"dataset": str(dataset.path), "split": cfg.evaluate.split, "queries": c.queries,
            "chunks": len(dataset.corpus), "base_model": cfg.encoder.model,
            "bootstrap_samples": cfg.report.bootstrap_samples, "seed": cfg.seed, "level": LEVEL,
            "systems": {s: {k: v for k, v in asdict(i).items() if k != "history"} for s, i in c.systems.items()},
            "intervals": {s: {str(d): dict(zip(("change", "low", "high"), ci, strict=True)) for d, ci in by.items()}
                          for s, by in c.intervals.items()}}


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def primary_table(c: Comparison) -> str:
    """Markdown: ndcg@10 by dim for base and every system, each with its change (absolute, %) and 95% interval."""
    others = [s for s in c.results if s != "base"]
    dims = sorted({d for r in c.results.values() for d in r}, reverse=True)
    head = ["dim", "base"] + [x for s in others for x in (s, f"Δ {s}", "95% CI")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for d in dims:
        base = c.results["base"].get(d, {}).get(PRIMARY_METRIC)
        row = [str(d), f"{base:.4f}" if base is not None else "n/a"]
        for s in others:
            v = c.results[s].get(d, {}).get(PRIMARY_METRIC)
            if v is None or base is None:
                row += [f"{v:.4f}" if v is not None else "n/a", "n/a", "n/a"]
                continue
            change, low, high = c.intervals[s][d]
            pct = f" ({change / base:+.1%})" if base else ""
            row += [f"{v:.4f}", f"{change:+.4f}{pct}", f"[{low:+.4f}, {high:+.4f}]"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def cost_table(c: Comparison, chunks: int) -> str:
    """Markdown: each system's training time, artifact size, re-embedding and query latency."""
    kinds = {"base": "base model", "adapter": "query adapter", "fine-tune": "fine-tuned model",
             "model": "other model"}
    lines = ["| system | kind | training time | artifact size | re-embed the corpus | query latency |",
             "|---|---|---:|---:|---|---:|"]
    for s, i in c.systems.items():
        train = "pre-trained" if i.kind in ("base", "model") else _duration(i.train_seconds)
        reembed = f"yes ({chunks:,} chunks)" if i.reembed else ("no" if i.kind == "adapter" else "— (the index)")
        lines.append(f"| {s} | {kinds[i.kind]} | {train} | {_size(i.artifact_bytes)} | {reembed} | "
                     f"{i.latency_ms:.1f} ms |")
    return "\n".join(lines) + "\n"


def render_markdown(dataset: Dataset, cfg: Config, c: Comparison, plots: Sequence[str]) -> str:
    """The report: the ndcg@10 table with intervals, the costs, the plots and every metric."""
    captions = {"ndcg_by_dim.png": f"{PRIMARY_METRIC} by dimension", "training_curves.png": "training curves"}
    return "\n".join([
        f"# Retrieval on `{dataset.path}`, split `{cfg.evaluate.split}`",
        "",
        f"{c.queries:,} queries against {len(dataset.corpus):,} chunks; base model `{cfg.encoder.model}`. Every system "
        f"is scored by the same judge. Intervals: {LEVEL:.0%} paired bootstrap over the queries "
        f"({cfg.report.bootstrap_samples:,} resamples, seed {cfg.seed}) of the change in {PRIMARY_METRIC} against "
        "base.",
        "",
        f"## {PRIMARY_METRIC} by dimension",
        "",
        primary_table(c),
        "## Costs",
        "",
        "Training time is the recorded wall time of the training run (n/a when the artifact does not record it); "
        "artifact size is the adapter file or the model's weights; query latency is the median time to embed one "
        f"query alone (and apply the adapter), over {cfg.report.latency_queries} queries on this machine.",
        "",
        cost_table(c, len(dataset.corpus)),
        "## Plots",
        "",
        *[f"![{captions[p]}]({p})\n" for p in plots],
        "## Every metric",
        "",
        "```text",
        format_table(c.results).rstrip(),
        "```",
        "",
    ])


def _png(plt, fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plot_dims(plt, results: dict[str, Results]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, by_dim in results.items():
        dims = sorted(by_dim)
        ax.plot(dims, [by_dim[d][PRIMARY_METRIC] for d in dims], marker="o", label=s)
    ticks = sorted({d for r in results.values() for d in r})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="dimension", ylabel=PRIMARY_METRIC, title=f"{PRIMARY_METRIC} by dimension")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(plt, fig)


def _plot_curves(plt, infos: dict[str, SystemInfo]) -> bytes:
    fig, (val, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for s, i in infos.items():
        if not i.history:
            continue
        val.plot(i.history["val_epoch"], i.history["val"], marker="o", label=s)
        if i.history["loss"]:
            loss.plot(i.history["loss_epoch"], i.history["loss"], label=s)
    val.set(xlabel="epoch", ylabel=f"validation {PRIMARY_METRIC} (full dim)", title="validation (epoch 0: base)")
    loss.set(xlabel="epoch", ylabel="training loss (each system its own loss)", yscale="log", title="training loss")
    for ax in (val, loss):
        ax.grid(alpha=0.3)
        ax.legend()
    return _png(plt, fig)
