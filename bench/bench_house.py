"""The size of the house (issue #25): what a reader has to hold, counted from the code as it is.

- CLI options: per command and in all (click's own parameter lists, subcommands included);
- config flat names (``adapter.config.FLAT``) and fields;
- the longest functions in adapter/ (lines, from the AST) and the training loop module's longest;
- import cycles among the package's modules (grimp, lazy imports inside functions included) and upward imports
  against import-linter's contracts;
- BENCHMARKS.md's lines; README sentences over 40 words in its first two screens (100 lines).

    python bench/bench_house.py [--json bench/results/house.json]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCREEN_LINES = 50  # a terminal screen


def cli_options() -> dict[str, int]:
    import click

    import cli

    counts: dict[str, int] = {}

    def walk(group: click.Group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")
            else:
                counts[prefix + name] = sum(isinstance(p, click.Option) for p in cmd.params)

    walk(cli.main, "")
    return counts


def functions() -> list[tuple[int, str]]:
    """(lines, module:function) of every function in adapter/, longest first."""
    out = []
    for path in sorted((ROOT / "adapter").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                out.append((node.end_lineno - start + 1, f"{path.relative_to(ROOT)}:{node.name}"))
    return sorted(out, reverse=True)


def cycles() -> list[list[str]]:
    """Strongly connected groups of adapter's modules (each a cycle or several)."""
    import grimp

    graph = grimp.build_graph("adapter", include_external_packages=False)
    modules = sorted(graph.modules)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & set(modules) for m in modules}
    index, low, stack, on, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for m in modules:
        if m not in index:
            visit(m)
    return groups


def long_sentences(text: str, limit: int = 40) -> list[str]:
    """Sentences over ``limit`` words in prose (code blocks, table rows and headings skipped; a blank line ends a
    paragraph)."""
    paragraphs, current, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.lstrip().startswith(("|", "#")) or not line.strip():
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    paragraphs.append(" ".join(current))
    return [s for p in paragraphs for s in re.split(r"(?<=[.!?:])\s+(?=[A-Z`(\[])", p) if len(s.split()) > limit]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "house.json"))
    args = p.parse_args()
    from adapter import config

    opts = cli_options()
    funcs = functions()
    readme = (ROOT / "README.md").read_text().splitlines()
    result = {
        "cli_options_total": sum(opts.values()), "cli_commands": len(opts), "cli_options": opts,
        "config_flat_names": len(config.FLAT),
        "config_fields": sum(len(__import__("dataclasses").fields(c)) for c in config.SECTIONS.values()),
        "longest_functions": [{"lines": n, "where": w} for n, w in funcs[:10]],
        "longest_in_training_loop": next(({"lines": n, "where": w} for n, w in funcs
                                          if w.startswith("adapter/train.py:")), None),
        "import_cycles": cycles(),
        "benchmarks_md_lines": len((ROOT / "BENCHMARKS.md").read_text().splitlines()),
        "readme_long_sentences_first_two_screens": long_sentences("\n".join(readme[:2 * SCREEN_LINES])),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("| measure | value |\n|---|---:|")
    print(f"| CLI options, all {result['cli_commands']} commands | {result['cli_options_total']} |")
    print(f"| `adapter train --help` options | {opts.get('train')} |")
    print(f"| config flat names | {result['config_flat_names']} |")
    print(f"| longest function in adapter/ | {funcs[0][0]} ({funcs[0][1]}) |")
    loop = result["longest_in_training_loop"]
    print(f"| longest function in the training loop | {loop['lines']} ({loop['where']}) |")
    print(f"| import cycles | {len(result['import_cycles'])} |")
    print(f"| BENCHMARKS.md lines | {result['benchmarks_md_lines']} |")
    print(f"| README sentences over 40 words, first two screens | "
          f"{len(result['readme_long_sentences_first_two_screens'])} |")


if __name__ == "__main__":
    main()
