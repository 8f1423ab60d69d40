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
