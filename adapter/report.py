"""Pure rendering of results: plain-text and markdown tables, the compare report, its plots.

Nothing here loads a model or scores anything: it is fed results (system -> dim -> metric -> value) and the
``adapter.pipeline.Comparison`` that ``compare`` measured, and returns text or PNG bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from adapter.config import Config
from adapter.data import Dataset
from adapter.errors import AdapterError
from adapter.evaluate import METRICS, PRIMARY_METRIC, Results

if TYPE_CHECKING:
    from adapter.pipeline import Comparison, SystemInfo


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


def require_matplotlib():
    """matplotlib with the file-only Agg backend, or one line naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise AdapterError("compare draws its plots with matplotlib: pip install 'adapter[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        f"is scored by the same judge. Intervals: {cfg.report.level:.0%} paired bootstrap over the queries "
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


def plot_dims(plt, results: dict[str, Results]) -> bytes:
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


def plot_curves(plt, infos: dict[str, SystemInfo]) -> bytes:
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
