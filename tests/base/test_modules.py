"""Shared building blocks: convolutions that skip taps reading only padding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import modules as md


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "size, dilation, groups",
    [
        ((6, 6), 6, 1),  # every outer tap dead: a 1x1 convolution
        ((6, 6), 9, 4),  # grouped, dilation past the size
        ((4, 9), 5, 1),  # only the outer rows dead
        ((9, 4), (2, 4), 1),  # only the outer columns dead
        ((1, 1), 1, 4),  # a 1x1 map: even dilation 1 reads only padding around the centre
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_conv_without_dead_taps_matches_the_full_convolution(size, dilation, groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=dilation, dilation=dilation, groups=groups, bias=bias)
    x = torch.randn(2, 8, *size).contiguous(memory_format=torch.channels_last).requires_grad_()
    calls = []
    conv.register_forward_hook(lambda *a: calls.append(1))
    y = md.conv_without_dead_taps(conv, x)
    assert not calls  # the shortcut ran, not the module
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, *conv.parameters()), g)
    ref = conv(x)
    assert y.shape == ref.shape and _rel(y, ref) < 1e-6
    # input and weight gradients: the dead taps' weight gradient is zero in both
    for got, want in zip(grads, torch.autograd.grad(ref, (x, *conv.parameters()), g)):
        assert _rel(got, want) < 1e-6
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "conv, size",
    [
        (nn.Conv2d(4, 4, 3, padding=2, dilation=2), (8, 8)),  # dilation smaller than the input
        (nn.Conv2d(4, 4, 3, padding=7, dilation=6), (4, 4)),  # padding != dilation
        (nn.Conv2d(4, 4, 3, stride=2, padding=6, dilation=6), (4, 4)),
        (nn.Conv2d(4, 4, 3, padding=6, dilation=6, padding_mode="reflect"), (8, 8)),
    ],
)
def test_conv_without_dead_taps_calls_other_convolutions(conv, size):
    calls = []
    conv.register_forward_hook(lambda *a: calls.append(1))
    md.conv_without_dead_taps(conv, torch.randn(1, 4, *size))
    assert calls == [1]


def test_plain_module_calls_disable_the_shortcut():
    conv = nn.Conv2d(4, 4, 3, padding=8, dilation=8)
    calls = []
    conv.register_forward_hook(lambda *a: calls.append(1))
    with md.plain_module_calls():
        md.conv_without_dead_taps(conv, torch.randn(1, 4, 4, 4))
    assert calls == [1]


@pytest.mark.parametrize("arch", ["DeepLabV3", "DeepLabV3Plus"])
def test_deeplab_aspp_skips_dead_taps_with_the_same_outputs(arch):
    # 64x64 input: the ASPP map is 8x8 (V3, stride 8) or 4x4 (V3+, stride 16), so rates 12/24/36 all
    # reach past it; the model must give what the plain modules give, in eval and in training.
    torch.manual_seed(0)
    model = getattr(smp, arch)("resnet18", encoder_weights=None, classes=3)
    x = torch.randn(2, 3, 64, 64)
    skipped = []
    for branch in model.decoder.modules():
        if isinstance(branch, nn.Conv2d) and branch.dilation[0] > 1 and branch.kernel_size == (3, 3):
            branch.register_forward_hook(lambda *a: skipped.append(False))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.manual_seed(1)
        y = model(x)
        assert not skipped, "the atrous convolutions should not have been called as modules"
        torch.manual_seed(1)
        with md.plain_module_calls():
            ref = model(x)
        assert len(skipped) == 3
        skipped.clear()
        assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("upsampling", [1, 4])
def test_segmentation_head_resizes_in_nchw_with_the_same_values(upsampling):
    from segmentation_models_pytorch.base.heads import SegmentationHead

    torch.manual_seed(0)
    head = SegmentationHead(8, 21, kernel_size=3, upsampling=upsampling).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    y = head(x)
    ref = nn.Sequential.forward(head, x)  # the plain chain, resize in channels_last
    assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6)
    # resizing heads hand back NCHW directly; others keep the layout (the model makes it contiguous)
    assert y.is_contiguous() == (upsampling > 1)
    assert torch.jit.script(head)(x).shape == y.shape


def _eval_bn(channels=6):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(channels).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 2.0)
    torch.nn.init.normal_(bn.weight)
    torch.nn.init.normal_(bn.bias)
    return bn


def test_batch_norm_into_writes_the_layer_output_into_its_input():
    bn = _eval_bn()
    x = torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = bn(x)
        y = md.batch_norm_into(bn, x, True)
    assert y is x and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_batch_norm_into_calls_the_layer_where_in_place_could_be_wrong_or_unseen():
    bn, x = _eval_bn(), torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        assert md.batch_norm_into(bn, x, False) is not x  # the caller did not promise x is free
        bn.train()
        assert md.batch_norm_into(bn, x, True) is not x  # batch statistics
        bn.eval()
        handle = bn.register_forward_hook(lambda *a: None)
        assert md.batch_norm_into(bn, x, True) is not x  # the hook must see the call
        handle.remove()
        traced = torch.jit.trace(md.Conv2dReLU(6, 6, kernel_size=1).eval(), x)
        graph = str(traced.inlined_graph)
        assert "batch_norm" in graph and "addcmul" not in graph  # graphs record the layer
    assert md.batch_norm_into(bn, x, True) is not x  # autograd: out of place


def test_conv_norm_act_no_grad_forward_matches_and_leaves_the_input_alone():
    block = md.Conv2dReLU(3, 6, kernel_size=3, padding=1).eval()
    block[1].load_state_dict(_eval_bn().state_dict())
    x = torch.randn(2, 3, 8, 8)
    x0 = x.clone()
    ref = block(x)  # autograd on: the plain Sequential path
    with torch.no_grad():
        got = block(x)
    assert torch.equal(x, x0)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    identity_conv = md.Conv2dReLU(6, 6, kernel_size=1).eval()
    identity_conv[0] = torch.nn.Identity()  # returns its input: the norm must not write into it
    y = torch.randn(2, 6, 4, 4)
    y0 = y.clone()
    with torch.no_grad():
        identity_conv(y)
    assert torch.equal(y, y0)
