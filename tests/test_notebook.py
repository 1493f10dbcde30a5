"""``notebooks/compare.ipynb`` runs top to bottom on a tiny sweep and draws its table and heatmap."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.sweep_helpers import REPO

# the session-wide tiny_sweep fixture, shared with the other sweep tests (one run for all)
pytest_plugins = ["tests.sweep_helpers"]


def test_compare_notebook_draws_table_and_heatmap(tiny_sweep: tuple[Path, subprocess.CompletedProcess],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDLAB_SWEEP_DIR", str(tiny_sweep[0]))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    notebook = nbformat.read(REPO / "notebooks" / "compare.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| attack \\ defense | none | flip |" in markdown and "| badnets |" in markdown
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the batch-size-0 grid has no values
