"""The small-map training convolution: same forward, weight gradient from one matrix product."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import small_conv
from segmentation_models_pytorch.base.recompute import recompute_scope
from segmentation_models_pytorch.base.small_conv import _SmallMapConv, conv_for_training, patch_matrix

CL = torch.channels_last


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (in, out, kernel, stride, padding, dilation, bias, input size, groups)
CONFIGS = [
    (5, 4, 3, 1, 1, 1, False, 4, 1),
    (5, 4, 3, 2, 1, 1, True, 5, 1),  # stride 2 on an odd size
    (3, 6, 3, 1, 2, 2, False, 4, 1),  # dilated, padding == dilation
    (4, 3, (3, 1), (1, 2), (1, 0), 1, True, 6, 1),  # rectangular kernel, mixed strides
    (2, 3, 5, 1, 0, 1, False, 7, 1),  # no padding
    (6, 6, 5, 1, 2, 1, False, 4, 6),  # depthwise (EfficientNet's 5x5)
    (4, 4, 3, 2, 1, 1, True, 5, 4),  # depthwise, stride 2, bias
    (5, 5, 3, 1, 2, 2, True, 5, 5),  # depthwise, dilated (DeepLabV3+'s encoders)
    (3, 3, (3, 5), 1, (0, 1), 1, False, 6, 3),  # depthwise, rectangular, less padding than "same"
]


def _plans(cfg):
    """Every backward plan the config can take: (weight by patches, input by flipped conv)."""
    _, _, _, s, _, _, _, _, groups = cfg
    if groups == 1 or _pair(s) != (1, 1):
        return [(True, False)]
    return [(True, False), (False, True), (True, True)]


PLANNED = [(cfg, plan) for cfg in CONFIGS for plan in _plans(cfg)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_patch_matrix_matches_unfold(cfg):
    cin, _, k, s, p, d, _, size, _ = cfg
    k, s, p, d = map(_pair, (k, s, p, d))
    x = torch.randn(2, cin, size, size + 1, dtype=torch.float64).to(memory_format=CL)
    ref = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*kh*kw, L), channel slowest
    h_out = (size + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w_out = (size + 1 + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    got = patch_matrix(x, k, (h_out, w_out), s, p, d)
    n, taps = x.shape[0], k[0] * k[1]
    ref = ref.view(n, cin, taps, h_out * w_out).permute(0, 3, 2, 1).reshape(n * h_out * w_out, taps * cin)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("cfg, plan", PLANNED, ids=[f"{CONFIGS.index(c)}-{p}" for c, p in PLANNED])
def test_gradients_and_second_order_gradients_are_exact(cfg, plan):
    cin, cout, k, s, p, d, bias, size, groups = cfg
    k, s, p, d = map(_pair, (k, s, p, d))
    torch.manual_seed(0)
    x = torch.randn(2, cin, size, size, dtype=torch.float64).to(memory_format=CL).requires_grad_()
    w = torch.randn(cout, cin // groups, *k, dtype=torch.float64).to(memory_format=CL).requires_grad_()
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w) + ((b,) if bias else ())

    def fn(*t):
        return _SmallMapConv.apply(t[0], t[1], t[2] if bias else None, s, p, d, groups, plan)

    assert torch.equal(fn(*inputs), F.conv2d(x, w, b, s, p, d, groups))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_weight_gradient_only_when_asked():
    x = torch.randn(1, 4, 3, 3).to(memory_format=CL)  # no grad for the input
    w = torch.randn(2, 4, 3, 3).to(memory_format=CL).requires_grad_()
    out = _SmallMapConv.apply(x, w, None, (1, 1), (1, 1), (1, 1), 1, (True, False))
    out.sum().backward()
    ref = torch.ops.aten.convolution_backward(
        torch.ones_like(out), x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]
    torch.testing.assert_close(w.grad, ref, rtol=1e-5, atol=1e-6)


def _deep_conv(cin=512, cout=8):
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False).to(memory_format=CL)


def _small_map(cin=512, size=4, batch=2):
    return torch.randn(batch, cin, size, size).to(memory_format=CL).requires_grad_()


def test_which_calls_take_the_path():
    conv, x = _deep_conv(), _small_map()
    assert not small_conv.uses_small_map_path(conv, x)  # outside a model's training forward
    with recompute_scope(True):
        assert small_conv.uses_small_map_path(conv, x)  # 2 x 4 x 4 = 32 pixels, 512 channels
        assert not small_conv.uses_small_map_path(conv, _small_map(size=16))  # 512 pixels: oneDNN
        assert not small_conv.uses_small_map_path(conv, x.contiguous())  # NCHW input
        assert not small_conv.uses_small_map_path(conv, x.double())  # weight is float32: conv raises
        grouped = nn.Conv2d(512, 512, 3, padding=1, groups=256).to(memory_format=CL)
        assert not small_conv.uses_small_map_path(grouped, x)
        depthwise = nn.Conv2d(512, 512, 3, padding=1, groups=512).to(memory_format=CL)
        assert small_conv.uses_small_map_path(depthwise, x)  # 32 pixels
        # larger maps: stride 1 still takes the flipped-filter input gradient, stride 2 nothing
        assert small_conv.uses_small_map_path(depthwise, _small_map(size=8))  # 128 pixels
        strided = nn.Conv2d(512, 512, 3, stride=2, padding=1, groups=512).to(memory_format=CL)
        assert small_conv.uses_small_map_path(strided, x)  # 2 x 2 x 2 = 8 pixels
        assert not small_conv.uses_small_map_path(strided, _small_map(size=32))  # 512 pixels
        assert not small_conv.uses_small_map_path(nn.Conv2d(512, 8, 1).to(memory_format=CL), x)
        reflect = nn.Conv2d(512, 8, 3, padding=1, padding_mode="reflect").to(memory_format=CL)
        assert not small_conv.uses_small_map_path(reflect, x)
        frozen = _deep_conv().requires_grad_(False)
        assert not small_conv.uses_small_map_path(frozen, x)
        with torch.no_grad():
            assert not small_conv.uses_small_map_path(conv, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not small_conv.uses_small_map_path(conv, x)
        handle = conv.register_forward_hook(lambda *a: None)
        assert not small_conv.uses_small_map_path(conv, x)  # the hook must see the call
        handle.remove()
        assert small_conv.uses_small_map_path(conv, x)


def test_conv_for_training_matches_the_layer():
    torch.manual_seed(0)
    conv, x = _deep_conv(), _small_map()
    ref_conv, ref_x = copy.deepcopy(conv), x.detach().clone().requires_grad_()
    with recompute_scope(True):
        y = conv_for_training(conv, x)
    assert y.grad_fn is not None and "SmallMapConv" in type(y.grad_fn).__name__
    y_ref = ref_conv(ref_x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, ref_x.grad)  # the same kernel computes the input gradient
    torch.testing.assert_close(conv.weight.grad, ref_conv.weight.grad, rtol=1e-5, atol=1e-5)


def test_backward_plans():
    def plan(x_shape, groups, stride=1, padding=1, dilation=1, k=3, cout=None):
        x = torch.empty(x_shape).to(memory_format=CL)
        w = torch.empty(cout or x_shape[1], x_shape[1] // groups, k, k)
        args = (_pair(stride), _pair(padding), _pair(dilation), groups)
        return small_conv._plan(x, w, *args)

    assert plan((2, 512, 4, 4), 1, cout=8) == (True, False)  # dense, 32 pixels
    assert plan((2, 512, 16, 16), 1, cout=8) is None  # dense, 512 pixels: oneDNN
    assert plan((2, 64, 4, 4), 64) == (True, True)  # depthwise, small
    assert plan((4, 64, 16, 16), 64, padding=2, dilation=2) == (False, True)  # depthwise, larger
    assert plan((4, 64, 16, 16), 64, stride=2) is None  # strided, larger: oneDNN
    assert plan((2, 64, 8, 8), 64, stride=2) == (True, False)  # strided, 32 pixels
    assert plan((1, 64, 2, 2), 64, padding=3) == (True, False)  # padding > dilation x (k - 1)


def _train_with_and_without(monkeypatch, model, x):
    calls = []
    original = _SmallMapConv.apply
    monkeypatch.setattr(_SmallMapConv, "apply", lambda *a: calls.append(a) or original(*a))
    results = []
    for on in (True, False):
        if not on:
            monkeypatch.setattr(small_conv, "_applies", lambda *args: False)
        m = copy.deepcopy(model)
        torch.manual_seed(1)  # dropout masks, drop-connect
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (y1, g1), (y0, g0) = results
    assert torch.equal(y1, y0)
    assert g1.keys() == g0.keys()
    top = max(float(g.abs().max()) for g in g0.values())
    for name in g0:  # gradients that vanish in theory (a BN's bias before another BN) are noise
        scale = g0[name].abs().max().clamp_min(1e-9 * top)
        torch.testing.assert_close(g1[name] / scale, g0[name] / scale, rtol=0, atol=1e-5, msg=name)
    return calls


def test_resnet_models_take_the_path_on_small_maps_and_train_the_same(monkeypatch):
    torch.manual_seed(0)
    model = smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=2)
    model.segmentation_head[0].register_forward_hook(lambda *a: None)  # hooks elsewhere are fine
    calls = _train_with_and_without(monkeypatch, model, torch.randn(2, 3, 64, 64))
    # layer3 (its stride-2 conv reads 128 x 8x8, the rest 256 x 4x4) and the dilated layer4 (4x4)
    expected = [(2, 128, 8, 8)] + [(2, 256, 4, 4)] * 4 + [(2, 512, 4, 4)] * 3
    assert [tuple(a[0].shape) for a in calls] == expected


@pytest.mark.parametrize("encoder", ["efficientnet-b0", "mobilenet_v2"])
def test_depthwise_encoders_take_the_path_on_small_maps_and_train_the_same(monkeypatch, encoder):
    torch.manual_seed(0)
    model = smp.Unet(encoder, encoder_weights=None, classes=2, decoder_channels=(32, 16, 16, 8, 8))
    # float64: the flipped-filter input gradient changes the order of sums in every stride-1
    # depthwise layer, and float32 rounding through train-mode norms then exceeds a tight bound
    calls = _train_with_and_without(monkeypatch, model.double(), torch.randn(1, 3, 64, 64).double())
    depthwise = [a for a in calls if a[-2] > 1]  # (x, weight, bias, stride, pad, dil, groups, plan)
    assert depthwise and all(a[-2] == a[0].shape[1] == a[1].shape[0] for a in depthwise)
    # every stride-1 one takes the flipped-filter input gradient, at any map size
    stride1 = [a for a in depthwise if tuple(a[3]) == (1, 1)]
    assert stride1 and all(a[-1][1] for a in stride1)
    assert any(not a[-1][0] for a in stride1)  # larger maps keep oneDNN's weight gradient
