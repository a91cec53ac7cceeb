"""Unet's folded upsample+conv fast path computes exactly what the plain block computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import modules as md
from segmentation_models_pytorch.base.model import to_channels_last
from segmentation_models_pytorch.decoders import unet


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 1), (2, 16, 4, 4)])
def test_upsample2x_conv3x3_matches_upsample_then_conv(shape):
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, shape[1], 3, 3, requires_grad=True)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)
    got = md.upsample2x_conv3x3(x, w)
    assert got.shape == ref.shape and _rel(got, ref) < 1e-5
    g = torch.randn_like(ref)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w), g)
    gx, gw = torch.autograd.grad(got, (x, w), g)
    assert _rel(gx, gx_ref) < 1e-5 and _rel(gw, gw_ref) < 1e-5



def test_upsample2x_conv3x3_layout_and_second_order_gradients():
    # The phase interleave is a hand-written autograd step: channels_last in and out, any layout
    # of incoming gradient, and differentiable once more (gradient penalties).
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 4, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(5, 3, 3, 3, dtype=torch.double, requires_grad=True)
    y = md.upsample2x_conv3x3(x, w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)
    g = torch.randn(2, 5, 6, 8, dtype=torch.double)  # contiguous (NCHW) incoming gradient
    for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert _rel(got, want) < 1e-12
    assert torch.autograd.gradgradcheck(md.upsample2x_conv3x3, (x, w))


def _forward_backward(model, x, fold: bool, monkeypatch):
    if not fold:
        monkeypatch.setattr(unet.UnetDecoderBlock, "_can_fold", lambda *a: False)
    model.zero_grad()
    y = model(x)
    y.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    monkeypatch.undo()
    return y.detach(), grads


@pytest.mark.parametrize("use_norm", ["batchnorm", False])
@pytest.mark.parametrize("skip_channels", [0, 24])
def test_folded_block_matches_plain_block_forward_and_backward(use_norm, skip_channels, monkeypatch):
    torch.manual_seed(0)
    block = unet.UnetDecoderBlock(32, skip_channels, 16, use_norm=use_norm).train()
    to_channels_last(block)
    x = torch.randn(4, 32, 12, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    skip = torch.randn(4, skip_channels, 24, 20).contiguous(memory_format=torch.channels_last)
    skip = skip.requires_grad_() if skip_channels else None
    params = [p for p in block.parameters()]
    inputs = [x] + ([skip] if skip is not None else []) + params
    g = torch.randn(4, 16, 24, 20)

    def run(fold: bool):
        if not fold:
            monkeypatch.setattr(unet.UnetDecoderBlock, "_can_fold", lambda *a: False)
        y = block(x, 24, 20, skip)
        monkeypatch.undo()
        return y, torch.autograd.grad(y, inputs, g)

    y_fold, g_fold = run(True)
    y_plain, g_plain = run(False)
    assert _rel(y_fold, y_plain) < 1e-5
    for a, b in zip(g_fold, g_plain):
        assert _norm_rel(a, b) < 1e-5


def test_folded_unet_matches_plain_unet(monkeypatch):
    monkeypatch.setattr(unet, "FOLD_MIN_PIXELS", 0)  # every block folds, the 2x3 deepest one too
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=3).eval()
    x = torch.randn(2, 3, 64, 96)
    calls = []
    original = unet.UnetDecoderBlock._folded_forward
    monkeypatch.setattr(
        unet.UnetDecoderBlock, "_folded_forward", lambda self, *a: calls.append(1) or original(self, *a)
    )
    with torch.no_grad():
        y_fold = model(x)
        assert calls, "the default Unet should take the folded path"
        monkeypatch.undo()
        monkeypatch.setattr(unet.UnetDecoderBlock, "_can_fold", lambda *a: False)
        y_plain = model(x)
    assert _rel(y_fold, y_plain) < 1e-5


def test_folded_unet_trains_like_plain_unet(monkeypatch):
    # Whole-model gradients are not compared: with batch statistics over 2x3 maps of a tiny batch, a
    # 1e-6 change of one conv output (any re-ordering of its sums) moves them by up to 1e-2 (measured
    # by perturbing the plain block). The block test above checks the backward exactly.
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).train()
    x = torch.randn(2, 3, 64, 64)
    monkeypatch.setattr(unet, "FOLD_MIN_PIXELS", 0)
    y_fold, _ = _forward_backward(model, x, True, monkeypatch)  # undoes the threshold patch
    y_plain, _ = _forward_backward(model, x, False, monkeypatch)
    assert _rel(y_fold, y_plain) < 1e-4


def test_small_inputs_take_the_plain_path_large_ones_fold(monkeypatch):
    # Building the folded kernels costs the same at any input size; below FOLD_MIN_PIXELS low-res
    # pixels (batch x h x w) the plain block is faster, so it runs instead.
    block = unet.UnetDecoderBlock(32, 16, 16).eval()
    to_channels_last(block)
    calls = []
    folded = unet.UnetDecoderBlock._folded_forward
    monkeypatch.setattr(unet.UnetDecoderBlock, "_folded_forward", lambda *a: calls.append(1) or folded(*a))
    side = 8
    small = unet.FOLD_MIN_PIXELS // (side * side) - 1  # one image short of the threshold
    with torch.no_grad():
        for n, expect in ((small, 0), (small + 1, 1)):
            calls.clear()
            x = torch.randn(n, 32, side, side).contiguous(memory_format=torch.channels_last)
            skip = torch.randn(n, 16, 2 * side, 2 * side).contiguous(memory_format=torch.channels_last)
            assert block(x, 2 * side, 2 * side, skip).shape == (n, 16, 2 * side, 2 * side)
            assert len(calls) == expect, (n, calls)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({"decoder_attention_type": "scse"}, (1, 3, 64, 64)),
        ({"decoder_interpolation": "bilinear"}, (1, 3, 64, 64)),
        ({}, (1, 3, 50, 70)),
    ],  # odd intermediate sizes: upsampling is not exactly 2x everywhere
)
def test_unfoldable_configurations_take_the_plain_path(kwargs, shape, monkeypatch):
    model = smp.Unet("resnet18", encoder_weights=None, **kwargs).eval()
    checks = []
    original = unet.UnetDecoderBlock._can_fold
    monkeypatch.setattr(
        unet.UnetDecoderBlock, "_can_fold", lambda self, *a: checks.append(original(self, *a)) or checks[-1]
    )
    with torch.no_grad():
        assert model(torch.randn(shape)).shape[-2:] == shape[-2:]
    if "decoder_attention_type" in kwargs or "decoder_interpolation" in kwargs:
        assert not any(checks)
    else:
        assert not all(checks)


def test_fast_path_keeps_blocks_foldable_that_its_small_probe_ran_plain(monkeypatch):
    # optimize_for_inference probes with 1x3x64x64, where the deep blocks are below the fold
    # threshold and run conv1 as a layer; fusing that conv with its ReLU would switch the fold
    # off for the large inputs the model is then used on.
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None).eval()
    fast = smp.optimize_for_inference(model)
    calls = []
    folded = unet.UnetDecoderBlock._folded_forward
    monkeypatch.setattr(unet.UnetDecoderBlock, "_folded_forward", lambda *a: calls.append(1) or folded(*a))
    monkeypatch.setattr(unet, "FOLD_MIN_PIXELS", 16)  # a "large" input: 128x128 then folds everywhere
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)
        calls.clear()
        got = fast(x)
    assert len(calls) == len(fast.decoder.blocks)
    assert _rel(got, expected) < 1e-4
