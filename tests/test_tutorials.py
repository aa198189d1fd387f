"""The quick-start tutorial runs end to end (fast mode: tiny model, one epoch), so the tutorials cannot rot.

The other notebooks are executed by ``make docs-notebooks`` (``tutorials/run_notebooks.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "tutorials" / "01_quickstart.ipynb"


@pytest.mark.slow
@pytest.mark.realdata
def test_quickstart_notebook_runs(her2st_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("COMTIP_TUTORIAL_FAST", "1")
    monkeypatch.setenv("COMTIP_DATA_DIR", str(her2st_dir))
    monkeypatch.setenv("COMTIP_CACHE_DIR", os.environ.get("COMTIP_CACHE_DIR", str(tmp_path / "cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel draws inline

    nb = nbformat.read(QUICKSTART, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "\n".join(
        o.get("text", "") + o.get("data", {}).get("text/plain", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "Recall@5" in text  # the last step ran
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # training curves, UMAP, gene scores, predicted vs measured
