"""The quickstart notebook runs top to bottom on a CPU."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from runner import REPO


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    # The kernel inherits FINETUNE_CACHE_DIR (set by conftest) and writes its outputs/ under tmp_path.
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "final_eval_loss" in outputs and "Where does the frog live? ->" in outputs
    assert any("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))
    assert os.listdir(tmp_path / "outputs")
