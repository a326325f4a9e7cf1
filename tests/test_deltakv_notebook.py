"""notebooks/kv_similarity.ipynb executes top to bottom on the shipped model (a few hundred tokens)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "kv_similarity.ipynb"


def test_kv_similarity_notebook_runs():
    pytest.importorskip("ipykernel")
    try:
        from data_prepare.resources import shipped_model_dir, shipped_text_path

        shipped_model_dir(), shipped_text_path()
    except FileNotFoundError as e:
        pytest.skip(f"shipped resources missing: {e}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "joined KV width 384" in text
    assert "more than 16 positions away" in text and "components for 90% energy" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2
