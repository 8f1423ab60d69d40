"""Side-by-side tables of evaluation results: every system beside base, at every dim."""

from __future__ import annotations

from collections.abc import Sequence

from adapter.evaluate import METRICS, Results


def format_table(results: dict[str, Results], metrics: Sequence[str] = METRICS, baseline: str = "base") -> str:
    """A plain-text table per dim: one row per metric, one column per system, and each system's change against
    ``baseline`` (when present) as a percentage."""
    systems = list(results)
    others = [s for s in systems if s != baseline] if baseline in results else []
    dims = list(next(iter(results.values())))
    header = ["", *systems, *[f"Δ {s}" for s in others]]
    lines: list[str] = []
    for d in dims:
        rows = [[f"dim {d}", *header[1:]]]
        for m in metrics:
            row = [m, *[f"{results[s][d][m]:.4f}" for s in systems]]
            for s in others:
                base = results[baseline][d][m]
                row.append(f"{(results[s][d][m] - base) / base:+.1%}" if base else "n/a")
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
