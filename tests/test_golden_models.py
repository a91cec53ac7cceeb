"""Checkpoint compatibility with SMP 0.6.0, replayed from golden fixtures (SMP itself not needed).

Each record in tests/fixtures/golden/models.json was produced by SMP 0.6.0: a model config, its
state-dict keys and shapes, and a summary of its output after ``fill_state_dict`` (weights derived
from key names only). Same keys + same weights must give the same output (relative error < 1e-4).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from golden_utils import compare_summary, fill_state_dict, load_golden, make_input, state_dict_signature
from torch import nn

import segmentation_models_pytorch as smp

RECORDS = load_golden("models")
# Fast default run: the first config of every (architecture, encoder) pair; the rest under -m slow.
_seen = set()
_DEFAULT = set()
for _r in RECORDS:
    _pair = (_r["arch"], _r["kwargs"].get("encoder_name", "resnet34"))
    if _pair not in _seen:
        _seen.add(_pair)
        _DEFAULT.add(_r["id"])
PARAMS = [pytest.param(r, id=r["id"], marks=() if r["id"] in _DEFAULT else pytest.mark.slow) for r in RECORDS]
# SMP scales the head by `upsampling` whatever the depth; ours keeps the input size (documented).
_SMP_HEAD_SCALE = {"FPN": 4, "PSPNet": 8}


def _build(record) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(smp, record["arch"])(**record["kwargs"])


@pytest.mark.parametrize("record", PARAMS)
def test_checkpoint_layout_and_output_match_smp(record):
    model = _build(record)
    ours = state_dict_signature(model)
    golden = record["keys"]
    assert dict(map(tuple, [(k, tuple(s)) for k, s in ours])) == {k: tuple(s) for k, s in golden}, (
        f"state-dict layout differs: missing {sorted({k for k, _ in golden} - {k for k, _ in ours})[:5]}, "
        f"extra {sorted({k for k, _ in ours} - {k for k, _ in golden})[:5]}"
    )
    fill_state_dict(model)
    model.eval()
    x = make_input(record["input_shape"])
    expected_shape = record["output"]["shape"]
    with torch.no_grad():
        out = model(x)
    mask = out[0] if isinstance(out, tuple) else out
    if "upsampling" not in record["kwargs"]:  # an explicit upsampling scales the mask, as in SMP
        assert list(mask.shape[-2:]) == list(x.shape[-2:]), "masks have the input's size by default"
    if list(mask.shape) != expected_shape and record["arch"] in _SMP_HEAD_SCALE:
        # Reproduce SMP's head scale at this non-default depth to compare everything else.
        scale = record["kwargs"].get("upsampling", _SMP_HEAD_SCALE[record["arch"]])
        model.segmentation_head[1] = (
            nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=True)
            if scale > 1
            else nn.Identity()
        )
        model.pad_input = False
        with torch.no_grad():
            out = model(x)
        mask = out[0] if isinstance(out, tuple) else out
    ok, msg = compare_summary(mask, record["output"])
    assert ok, msg
    if record.get("aux") is not None:
        ok, msg = compare_summary(out[1], record["aux"])
        assert ok, f"aux label: {msg}"
