"""Pure rendering of results: plain-text and markdown tables, the compare report, its plots.

Nothing here loads a model or scores anything: it is fed results (system -> dim -> metric -> value) and the
``Comparison`` that ``adapter.pipeline.compare`` measured, and returns text or PNG bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter.cards import pct_change
from adapter.config import Config
from adapter.data import Dataset
from adapter.errors import AdapterError
from adapter.evaluate import METRICS, PRIMARY_METRIC, Results
from adapter.model import estimates_line


@dataclass
class SystemInfo:
    """One compared system and what it costs."""

    kind: str  # "base", "adapter", "fine-tune" or "model"
    source: str  # the adapter file, model folder or model name
    train_seconds: float | None  # training wall time when recorded; None for pre-trained models
    artifact_bytes: int  # the adapter file, or the model's weights
    reembed: bool  # whether using it means embedding the whole corpus again
    latency_ms: float  # time to turn one query text into its search vector (embedding + adapter), uncached, warm:
    # the median over queries of each one's best of ``report.latency_repeats`` timings
    history: dict[str, list] | None = None  # training curves: val_epoch/val (ndcg@10 at full dim), loss_epoch/loss
    rerank_ms: float | None = None  # reranked systems: median time to rerank one query's top-k (in latency_ms too)
    identity: bool = False  # an adapter file whose training shipped the identity (no recipe cleared validation)
    adapter_ms: float | None = None  # adapters: their own part of latency_ms, the matrix product on one query vector


@dataclass
class Comparison:
    """What ``compare`` measured and wrote."""

    results: dict[str, Results]  # system -> dim -> metric -> value, as `adapter evaluate --json`
    systems: dict[str, SystemInfo]
    intervals: dict[str, dict[int, tuple[float, float, float]]]  # system -> dim -> ndcg@10 (change, low, high)
    queries: int
    files: list[Path]
    rerank_gain: dict[str, dict[int, tuple[float, float, float]]] | None = None  # "<s>+rerank" -> dim -> vs <s>
    rag: dict[str, Any] | None = None  # `adapter rag`'s rag.json, shown beside the retrieval metrics
    insights: dict[str, Any] = field(default_factory=dict)  # adapter.diagnose.insights: headroom, seen/unseen, movers


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
                row.append(pct_change(results[s][d][m], base) if d in results[s] else "n/a")
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
    head = ["dim", "base"] + [x for s in others for x in (_cell(s), f"Δ {_cell(s)}", "95% CI")]
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
            pct = f" ({pct_change(v, base)})" if base else ""
            row += [f"{v:.4f}", f"{change:+.4f}{pct}", f"[{low:+.4f}, {high:+.4f}]"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def rerank_table(c: Comparison) -> str:
    """Markdown: for each reranked system and dim, its first stage's ndcg@10, reranked, the change and interval."""
    lines = ["| system | dim | first stage | reranked | Δ | 95% CI |", "|---|---:|---:|---:|---:|---:|"]
    for s, by_dim in (c.rerank_gain or {}).items():
        first = s.removesuffix("+rerank")
        for d, (change, low, high) in by_dim.items():
            a, b = c.results[first][d][PRIMARY_METRIC], c.results[s][d][PRIMARY_METRIC]
            pct = f" ({change / a:+.1%})" if a else ""
            lines.append(f"| {_cell(s)} | {d} | {a:.4f} | {b:.4f} | {change:+.4f}{pct} | [{low:+.4f}, {high:+.4f}] |")
    return "\n".join(lines) + "\n"


def rag_table(summary: dict[str, Any]) -> str:
    """Markdown: each system's answer accuracy (`adapter rag`'s rag.json) with its interval and change against base,
    beside its retrieval on the same questions."""
    lines = [f"| system | {PRIMARY_METRIC} | gold in top {summary['k']} | answer accuracy | 95% CI | Δ vs base | "
             "95% CI | ungraded |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s, v in summary["systems"].items():
        ci = f"[{v['accuracy_ci'][0]:.3f}, {v['accuracy_ci'][1]:.3f}]" if v["accuracy_ci"] else "n/a"
        change = v["change"]
        delta = (f"{change[0]:+.3f}", f"[{change[1]:+.3f}, {change[2]:+.3f}]") if change else ("—", "—")
        lines.append(f"| {_cell(s)} | {v[PRIMARY_METRIC]:.4f} | {v['gold_in_context']:.3f} | {v['accuracy']:.3f} | "
                     f"{ci} | {delta[0]} | {delta[1]} | {v['ungraded']} |")
    return "\n".join(lines) + "\n"


def cost_table(c: Comparison, chunks: int) -> str:
    """Markdown: each system's training time, artifact size, re-embedding and query latency."""
    kinds = {"base": "base model", "adapter": "query adapter", "fine-tune": "fine-tuned model",
             "model": "other model", "rerank": "first stage + cross-encoder"}
    reranked = any(i.rerank_ms is not None for i in c.systems.values())
    lines = ["| system | kind | training time | artifact size | re-embed the corpus | query latency |"
             + (" rerank latency |" if reranked else ""),
             "|---|---|---:|---:|---|---:|" + ("---:|" if reranked else "")]
    for s, i in c.systems.items():
        train = "pre-trained" if i.kind in ("base", "model") else _duration(i.train_seconds)
        reembed = f"yes ({chunks:,} chunks)" if i.reembed else ("no" if i.kind == "adapter" else "— (the index)")
        if i.kind == "rerank":
            train = f"{_duration(i.train_seconds)} (reranker)"
            reembed = f"yes ({chunks:,} chunks)" if i.reembed else "no"
        extra = (f" {i.rerank_ms:.1f} ms |" if i.rerank_ms is not None else " — |") if reranked else ""
        kind = kinds[i.kind] + (" (the identity: no recipe cleared validation)" if i.identity else "")
        own = f" (adapter {i.adapter_ms:.3f} ms)" if i.adapter_ms is not None else ""
        lines.append(f"| {_cell(s)} | {kind} | {train} | {_size(i.artifact_bytes)} | {reembed} | "
                     f"{i.latency_ms:.1f} ms{own} |{extra}")
    return "\n".join(lines) + "\n"


def render_markdown(dataset: Dataset, cfg: Config, c: Comparison, plots: Sequence[str]) -> str:
    """The report: the ndcg@10 table with intervals, the costs, the plots and every metric."""
    captions = {"ndcg_by_dim.png": f"{PRIMARY_METRIC} by dimension", "training_curves.png": "training curves"}
    return "\n".join([
        f"# Retrieval on {_code(dataset.path)}, split {_code(cfg.evaluate.split)}",
        "",
        f"{c.queries:,} queries against {len(dataset.corpus):,} chunks; base model {_code(cfg.encoder.model)}. Every "
        f"system is scored by the same judge. Intervals: {cfg.report.level:.0%} paired bootstrap over the queries "
        f"({cfg.report.bootstrap_samples:,} resamples, seed {cfg.seed}) of the change in {PRIMARY_METRIC} against "
        "base.",
        "",
        f"## {PRIMARY_METRIC} by dimension",
        "",
        primary_table(c),
        "## Costs",
        "",
        "Training time is the recorded wall time of the training run (n/a when the artifact does not record it); "
        "artifact size is the adapter file or the model's weights; query latency is the time to embed one query "
        f"alone (and apply the adapter) on this machine, warm: the median over {cfg.report.latency_queries} queries "
        f"of each one's best of {cfg.report.latency_repeats} timings. An adapter's own part, its matrix product on the "
        "query vector, is in brackets.",
        "",
        cost_table(c, len(dataset.corpus)),
        *([f"## Reranking: {PRIMARY_METRIC} over each first stage", "",
           f"Each `<system>+rerank` is its first stage with the top {cfg.rerank.k} reordered by the cross-encoder "
           f"{_code(next(i.source for i in c.systems.values() if i.kind == 'rerank'))}; the change is against that "
           f"first stage, with its {cfg.report.level:.0%} paired bootstrap interval. Its query latency above includes "
           "the reranking (one question scored against k chunks on its own, median).", "", rerank_table(c)]
          if c.rerank_gain else []),
        *([f"## Answers (`adapter rag`, top {c.rag['k']} chunks, {c.rag['compared']:,} of {c.rag['questions']:,} "
           "questions graded for every system)", "",
           f"Answers by {_code(c.rag['llm_model'])}, graded against the gold chunk by {_code(c.rag['judge_model'])}: "
           "correct 1, partly 0.5, wrong 0, averaged over the questions every system had graded; intervals are 95% "
           "bootstrap (the accuracy) and 95% paired bootstrap (its change against base). Retrieval columns are the "
           "judge's, on the same questions.", "", rag_table(c.rag)] if c.rag else []),
        *insights_markdown(c.insights),
        "## Plots",
        "",
        *[f"![{captions[p]}]({p})\n" for p in plots],
        "## Every metric",
        "",
        *_fenced(format_table({_line(s): r for s, r in c.results.items()}).rstrip(), "text"),
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


def _rank(r: int | None, k: int) -> str:
    return str(r) if r is not None else f">{k}"


def _line(text: str) -> str:
    """``text`` on one line: every run of whitespace (line breaks included) one space."""
    return " ".join(str(text).split())


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell or a heading: one line, pipes escaped."""
    return _line(text).replace("|", "\\|")


def _code(text: str) -> str:
    """``text`` as one inline code span, delimited by a run of backticks longer than any inside it (CommonMark)."""
    text = _line(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    tick = "`" * (longest + 1)
    return f"{tick} {text} {tick}" if longest else f"`{text}`"


def _fenced(text: str, info: str = "") -> list[str]:
    """``text`` as a fenced code block whose fence is longer than any run of backticks in it, so nothing inside can
    close it (CommonMark)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, text, fence]


def insights_markdown(ins: dict[str, Any]) -> list[str]:
    """Markdown lines for where each system helps and where it hurts: the base's headroom, seen against unseen
    chunks (test questions, and the adapter's own validation estimates), and the questions that moved most."""
    if not ins:
        return []
    h = ins["headroom"]
    lines = ["## Where it helps and where it hurts", "",
             f"**Headroom.** Base recall@{h['k']} is {h['recall']:.3f}. For {h['never']:.1%} of the {h['queries']:,} "
             f"test questions base ranks no relevant chunk in its top {h['k']}: a reranker over that list cannot "
             "help them, only a better query (or document) vector can. The others have their chunk within reach "
             "and gain from any better ordering.", ""]
    for system, e in ins["systems"].items():
        name = _cell(system)
        lines += [f"### {name}", ""]
        su = e.get("seen_unseen")
        if su:
            lines += [f"Test questions split by whether the {e['trained_chunks']:,} chunks with training questions "
                      "include theirs.", "", f"| test questions | count | base {PRIMARY_METRIC} | {name} | change |",
                      "|---|---:|---:|---:|---:|"]
            label = {"seen": "about chunks it trained on (seen)", "unseen": "about chunks it never saw (unseen)"}
            for k, v in su.items():
                lines.append(f"| {label[k]} | {v['queries']:,} | {v['base']:.4f} | {v['system']:.4f} | "
                             f"{v['change']:+.1%} |")
            lines.append("")
        if e.get("estimates"):
            lines += [f"Validation at training time: {estimates_line(e)}.", ""]
        for way, title in (("up", "rose most"), ("down", "fell most")):
            rows = e["movers"][way]
            if not rows:
                continue
            k = h["k"]
            lines += [f"Questions that {title} ({PRIMARY_METRIC} at the full dim):", "",
                      f"| question | {PRIMARY_METRIC} base → {name} | relevant chunk: rank base → {name} | "
                      f"top chunk under base | top chunk under {name} |", "|---|---|---|---|---|"]
            for m in rows:
                chunks = ", ".join(f"`{_cell(c['id'])}` {_rank(c['base_rank'], k)} → {_rank(c['system_rank'], k)}"
                                   for c in m["chunks"])
                lines.append(f"| {_cell(m['text'])} | {m['base']:.3f} → {m['system']:.3f} | {chunks} | "
                             f"`{_cell(m['top_base'])}`: {_cell(m['top_base_text'])} | `{_cell(m['top_system'])}`: "
                             f"{_cell(m['top_system_text'])} |")
            lines.append("")
    return lines


HTML_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #1d2430; background: #fff; }
h1 { font-size: 1.6em; border-bottom: 2px solid #3b6fb6; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; color: #274b7a; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #c9d2de; padding: .3em .6em; vertical-align: top; }
th { background: #e8eef7; }
tr:nth-child(even) td { background: #f6f8fb; }
code { background: #eef1f5; padding: 0 .25em; border-radius: 3px; }
pre { background: #f3f5f8; padding: .8em; overflow-x: auto; font-size: .85em; }
img { max-width: 100%; border: 1px solid #dde3ea; }
"""


CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")  # the
# browser itself refuses any fetch but inline data, whatever markup a later change lets through


def render_html(markdown: str, images: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page: the Markdown rendered (raw HTML in it escaped, since question
    and chunk text is user data), the PNG plots inlined as data URIs, the style inline; nothing is fetched: an image
    in the text that is not one of ``images`` (``![x](http://host/pixel.png)`` in a chunk) is shown as its Markdown,
    and a Content-Security-Policy allows inline data only."""
    import base64
    import html

    try:
        from markdown_it import MarkdownIt
    except ImportError:
        raise AdapterError("compare writes report.html with markdown-it-py: pip install 'adapter[report]'") from None
    uris = {name: "data:image/png;base64," + base64.b64encode(data).decode("ascii") for name, data in images.items()}
    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def image(self, tokens, idx, options, env) -> str:  # markdown-it's render-rule signature
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        if src in uris:
            token.attrSet("src", uris[src])
            return self.image(tokens, idx, options, env)
        alt = self.renderInlineAsText(token.children or [], options, env)
        return html.escape(f"![{alt}]({src})")  # as written, never fetched

    md.add_render_rule("image", image)
    body = md.render(markdown)
    title = html.escape(markdown.splitlines()[0].lstrip("# ").replace("`", "")) if markdown else "report"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<meta '
            f'http-equiv="Content-Security-Policy" content="{CSP}">\n<meta name="referrer" content="no-referrer">\n'
            f"<title>{title}</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
