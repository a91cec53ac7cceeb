"""examples/finetune.ipynb runs top to bottom, offline, in a fresh kernel."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "finetune.ipynb"

nbformat = pytest.importorskip("nbformat", reason="executing the notebook needs nbformat (the 'test' extra)")
nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs nbclient (the 'test' extra)")
pytest.importorskip("ipykernel", reason="executing the notebook needs ipykernel (the 'test' extra)")


def test_finetune_notebook_executes(tmp_path, monkeypatch):
    # The kernel is a subprocess: it inherits this environment (offline hub, the checkout on the path).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # One intra-op thread: on a busy shared CPU, spinning OpenMP threads slow small models down a lot.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error

    text = "\n".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    scores = {name: float(v) for name, v in re.findall(r"(encoder frozen|fine-tuned): mIoU ([0-9.]+)", text)}
    assert set(scores) == {"encoder frozen", "fine-tuned"}, text
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert "torch.Size([3, 96, 144]) -> torch.Size([4, 96, 144])" in text
    images = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2
    # The notebook wrote its checkpoints relative to its working directory.
    assert (tmp_path / "outputs" / "shapes-finetuned" / "model.safetensors").is_file()
