import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_clean():
    r = subprocess.run(["ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_model_apply_path_imports_no_torch():
    """The adapter file must bolt onto any stack: loading and applying it needs numpy and safetensors only."""
    code = "import sys, adapter.model; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def _lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over setup.cfg's contracts, for the package under ``package_root`` (not any installed copy)."""
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install 'adapter[dev]')")
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run(["lint-imports", "setup.cfg", "--no-cache"], capture_output=True, text=True,
                          cwd=package_root, env=env)


def test_the_import_contracts_of_architecture_md_are_kept():
    """setup.cfg's [importlinter] contracts (the floors, the independent wings, the core importing no wing, the
    adapter file without torch, the judge without the trainers) hold for the package as it is."""
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Contracts: 5 kept, 0 broken." in r.stdout, r.stdout[-2000:]


def test_a_broken_contract_fails_the_check(tmp_path):
    """The check can fail: the same contracts over a copy of the package in which the judge imports the trainer."""
    shutil.copytree(ROOT / "adapter", tmp_path / "adapter", ignore=shutil.ignore_patterns("__pycache__"))
    judge = tmp_path / "adapter" / "evaluate.py"
    judge.write_text(judge.read_text() + "\n\ndef _upward():\n    from adapter import train  # noqa: F401\n")
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0 and "BROKEN" in r.stdout and "adapter.evaluate -> adapter.train" in r.stdout, r.stdout


def _import_graph():
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("adapter", cache_dir=None)  # imports inside functions and TYPE_CHECKING included
    finally:
        sys.path.remove(str(ROOT))
    return graph


def test_no_import_cycles_among_the_package_modules():
    """0 circles: no module of adapter/ reaches itself through imports (lazy imports inside functions count)."""
    graph = _import_graph()
    modules = sorted(m for m in graph.modules if m != "adapter")  # the package root only names its API, lazily
    edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i in modules) for m in modules}
    cycles = [m for m in modules if any(graph.chain_exists(imported=m, importer=i) for i in edges[m] if i != m)
              or m in edges[m]]
    assert cycles == [], f"modules on an import cycle: {cycles}"


MAX_FUNCTION_LINES = 120


def test_no_function_in_the_package_is_over_120_lines():
    long = []
    for path in sorted((ROOT / "adapter").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], "functions over 120 lines: " + ", ".join(long)


def _commands(group=None, prefix=""):
    """Every command of the CLI, subgroups' included: {"index build": command, ...}."""
    import click

    from cli import main

    group = group or main
    out = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.update(_commands(command, f"{prefix}{name} "))
        else:
            out[f"{prefix}{name}"] = command
    return out


def test_the_cli_stays_small_enough_to_hold():
    """Issue #25: `adapter train --help` shows at most 15 options, the whole CLI at most 140 (280 before it): the
    long tail of settings goes through --set, the stores through one --store."""
    import click

    counts = {name: len([p for p in c.params if isinstance(p, click.Option)]) for name, c in _commands().items()}
    assert counts["train"] <= 15, counts["train"]
    assert sum(counts.values()) <= 140, counts
    assert len(counts) == 16  # a new command is welcome; count it here and keep the totals


def test_every_command_that_takes_settings_takes_them_the_same_way():
    """One --set (repeatable, parsed by adapter/config.py) and one --store per command, never a command's own copy."""
    commands = _commands()
    for name in ("split", "embed", "evaluate", "train", "search", "index build", "generate", "finetune",
                 "rerank-train", "compare", "serve", "rag"):
        [option] = [p for p in commands[name].params if "--set" in p.opts]
        assert option.multiple and option.name == "settings", name
    for name, command in commands.items():
        stores = [p for p in command.params if "--store" in p.opts]
        assert all(p.name == "source" for p in stores), name
        assert not {"--index", "--qdrant", "--chroma", "--pgvector", "--collection", "--table",
                    "--corpus-vectors"} & {o for p in command.params for o in p.opts}, name


def test_library_messages_name_the_flag_where_the_command_has_one():
    from cli import _flags, _speak_flags, train

    flags = _flags(train)
    assert flags["train.rank"] == "--rank" and flags["train.recipe"] == "--recipe" and flags["seed"] == "--seed"
    said = _speak_flags("train.rank must be between 1 and 383, got 400; train.ranked and xtrain.rank stay; "
                        "train.epochs must be >= 0 (seed 3)", flags)
    assert said == ("--rank must be between 1 and 383, got 400; train.ranked and xtrain.rank stay; "
                    "train.epochs must be >= 0 (--seed 3)")


def test_a_setting_reaches_the_command_and_a_bad_one_is_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import adapter.serve
    from cli import main

    seen = {}
    monkeypatch.setattr(adapter.serve, "serve", lambda path, cfg, **kw: seen.update(cfg=cfg))
    (tmp_path / "a.safetensors").write_bytes(b"")
    r = CliRunner().invoke(main, ["serve", "--adapter", str(tmp_path / "a.safetensors"), "--port", "9000", "--set",
                                  "serve.max_batch=8", "--set", "embedding.query_prefix=query: ", "--set", "seed=4"])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.serve.max_batch, cfg.serve.port, cfg.embedding.query_prefix, cfg.seed) == (8, 9000, "query: ", 4)
    r = CliRunner().invoke(main, ["serve", "--adapter", str(tmp_path / "a.safetensors"), "--set", "serve.max_bach=8"])
    assert r.exit_code == 2 and "Invalid value for '--set': unknown setting 'serve.max_bach'; did you mean " \
        "serve.max_batch" in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: ")
