"""The walkthrough notebook runs top to bottom (its own cells assert what they show)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient


def test_walkthrough_notebook_executes(tmp_path):
    path = Path(__file__).parent.parent / "notebooks" / "walkthrough.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "bits per image: k-means PSNR" in text
