"""The walkthrough notebook runs headless, top to bottom, in its reduced setting, and is stored without outputs."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_headless(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("WALKTHROUGH_QUICK", "1")
    monkeypatch.setenv("WALKTHROUGH_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "chunks," in text and "won: validation ndcg@10" in text and "coverage: " in text
    assert "KiB, full 384x384" in text or "KiB, lowrank 384x384" in text
    assert (tmp_path / "work" / "report" / "report.md").is_file()
    assert (tmp_path / "work" / "finetuned" / "modules.json").is_file()
    assert os.environ.get("ADAPTER_CACHE")  # the kernel inherits the test session's private cache
