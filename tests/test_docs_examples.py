"""The code of docs/custom_encoder.md runs as written (so the guide cannot silently go stale)."""

from __future__ import annotations

import re
from pathlib import Path

import segmentation_models_pytorch as smp

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(page: str) -> list:
    return re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), flags=re.S | re.M)


def test_custom_encoder_guide_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the guide writes tiny_encoder.pth to the working directory
    blocks = _python_blocks("custom_encoder.md")
    assert len(blocks) >= 4
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, "custom_encoder.md", "exec"), namespace)
    finally:
        smp.encoders.encoders.pop("tiny_cnn", None)
    printed = capsys.readouterr().out
    assert "torch.Size([1, 2, 64, 64])" in printed
    assert "[3, 16, 32, 64]" in printed
    assert "[0.5, 0.5, 0.5]" in printed
    model = namespace["model"]  # the last one: built from the registered "mine" weights
    encoder_state = namespace["encoder"].state_dict()
    assert all(v.equal(encoder_state[k]) for k, v in model.encoder.state_dict().items())
