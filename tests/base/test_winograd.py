"""Winograd F(4x4, 3x3) convolution of the fast path: values, when it runs, and its kernel cache."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import winograd as wg


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize(
    "n, c, h, w, cout, bias",
    [
        (2, 16, 8, 8, 8, True),
        (1, 8, 7, 9, 5, False),
        (3, 4, 13, 6, 6, True),
        (1, 3, 1, 1, 2, True),
        (2, 32, 4, 20, 16, False),
    ],
)
def test_conv3x3_matches_the_direct_convolution(n, c, h, w, cout, bias, dilation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(cout, c, 3, 3, generator=g)
    b = torch.randn(cout, generator=g) if bias else None
    y = wg.conv3x3(x, wg.transform_weight(weight), b, dilation)
    b64 = None if b is None else b.double()
    ref = F.conv2d(x.double(), weight.double(), b64, padding=dilation, dilation=dilation)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) < 5e-5  # ~1e-5 is the method's float32 rounding
    # A wrong kernel (output channels swapped) is far off, so the bound can fail.
    other = wg.transform_weight(weight.roll(1, 0))
    assert rel_err(wg.conv3x3(x, other, b, dilation), ref) > 1e-2


def test_conv3x3_in_chunks_equals_one_pass(monkeypatch):
    x = torch.randn(5, 8, 12, 12)
    kernel = wg.transform_weight(torch.randn(6, 8, 3, 3))
    whole = wg.conv3x3(x, kernel, None)
    monkeypatch.setattr(wg, "CHUNK_BYTES", 1)  # one image per matrix product
    # Not bit-exact everywhere: some BLAS builds (seen on AMD EPYC) pick other kernels for the
    # smaller products and round differently. A wrong chunk would be off by O(1).
    scale = whole.abs().max().item()
    torch.testing.assert_close(wg.conv3x3(x, kernel, None), whole, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "kwargs, ok",
    [
        ({}, True),
        ({"stride": 2}, False),
        ({"dilation": 2, "padding": 2}, True),
        ({"dilation": 2, "padding": 1}, False),
        ({"dilation": (1, 2), "padding": (1, 2)}, False),
        ({"groups": 2}, False),
        ({"padding": 0}, False),
        ({"padding_mode": "reflect"}, False),
        ({"in_channels": 64}, False),
        ({"out_channels": 64}, False),
        ({"out_channels": 2}, False),  # PSPNet's head: the transforms cost more than the conv
    ],
)
def test_qualifies(kwargs, ok):
    args = {"in_channels": 128, "out_channels": 128, "kernel_size": 3, "padding": 1, **kwargs}
    assert wg.qualifies(nn.Conv2d(**args)) is ok


class Counting:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = wg.conv3x3

        def spy(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(wg, "conv3x3", spy)


def converted(cin=128, cout=32) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    plain = copy.deepcopy(conv)
    return wg.WinogradConv2d.convert(conv), plain


def test_runs_where_it_pays_and_falls_back_elsewhere(monkeypatch):
    spy = Counting(monkeypatch)
    conv, plain = converted()
    assert isinstance(conv, nn.Conv2d) and conv.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 128, 16, 16)  # 16 tiles
    with torch.no_grad():
        assert rel_err(conv(x), plain(x)) < 5e-5 and spy.calls == 1
        for other in (
            torch.randn(1, 128, 8, 8),  # 4 tiles: reading the kernel costs more than it saves
            torch.randn(1, 128, 72, 72),  # larger than MAX_SIZE
            torch.randn(4, 128, 3, 3),  # 4 tiles, each smaller than the 4x4 it computes
        ):
            assert rel_err(conv(other), plain(other)) < 1e-6
        assert rel_err(copy.deepcopy(conv).double()(x.double()), plain.double()(x.double())) < 1e-12
        plain.float()
        assert spy.calls == 1
    # With autograd the plain convolution runs, so the weight gets its gradient.
    y = conv(x)
    y.sum().backward()
    assert spy.calls == 1 and conv.weight.grad is not None
    # TorchScript and tracing record the plain convolution.
    scripted = torch.jit.script(conv)
    traced = torch.jit.trace(conv, x, check_trace=False)  # the check would rerun it eagerly
    with torch.no_grad():
        assert rel_err(scripted(x), plain(x)) < 1e-6 and rel_err(traced(x), plain(x)) < 1e-6
    assert spy.calls == 1


def test_dilated_runs_below_the_map_size_and_keeps_dead_taps_elsewhere(monkeypatch):
    from segmentation_models_pytorch.base import modules as md

    spy = Counting(monkeypatch)
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 16, 3, padding=2, dilation=2)
    plain = copy.deepcopy(conv)
    wg.WinogradConv2d.convert(conv)
    with torch.no_grad():
        x = torch.randn(2, 128, 16, 16)  # 2 images x 4 sub-images x 2x2 tiles
        assert rel_err(conv(x), plain(x)) < 5e-5 and spy.calls == 1
        wide = nn.Conv2d(128, 16, 3, padding=24, dilation=24)
        ref = wide(x)
        wg.WinogradConv2d.convert(wide)
        assert md.live_taps(wide, x) is not None  # still recognised: ASPP drops the dead taps
        assert rel_err(md.conv_without_dead_taps(wide, x), ref) < 1e-6
        assert rel_err(wide(x), ref) < 1e-6 and spy.calls == 1


def test_kernel_cache_follows_the_weight(monkeypatch):
    conv, plain = converted()
    x = torch.randn(2, 128, 16, 16)
    with torch.no_grad():
        conv(x)
        plain.weight.mul_(-2)  # a new state dict, loaded in place
        conv.load_state_dict(plain.state_dict())
        assert rel_err(conv(x), plain(x)) < 5e-5
        conv.weight.add_(1.0)  # an in-place edit
        plain.weight.add_(1.0)
        assert rel_err(conv(x), plain(x)) < 5e-5
        conv.weight = nn.Parameter(plain.weight * 3)  # a new parameter
        plain.weight.mul_(3)
        assert rel_err(conv(x), plain(x)) < 5e-5


def test_saving_and_copying_leave_the_kernel_cache_behind(tmp_path):
    conv, plain = converted()
    x = torch.randn(2, 128, 16, 16)
    with torch.no_grad():
        conv(x)
    assert conv._winograd_kernel is not None
    for other in (copy.deepcopy(conv), _saved_and_loaded(conv, tmp_path / "conv.pt")):
        assert isinstance(other, wg.WinogradConv2d) and other._winograd_kernel is None
        with torch.no_grad():
            assert rel_err(other(x), plain(x)) < 5e-5  # rebuilt for the copy's own weight
        assert other._winograd_kernel is not None
    assert conv._winograd_kernel is not None  # the original keeps its cache
    size = lambda m: len(pickle.dumps(m))  # noqa: E731
    assert size(conv) < 2 * size(plain)  # the pickled module holds the weight, not 4x it
    conv.to(torch.float64)  # moving or casting drops the cache (it would only hold memory)
    assert conv._winograd_kernel is None


def _saved_and_loaded(module, path):
    torch.save(module, path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("arch", ["Unet", "FPN", "Linknet", "UPerNet", "DeepLabV3Plus"])
def test_fast_path_uses_winograd_and_keeps_outputs(arch, monkeypatch):
    torch.manual_seed(0)
    model = smp.create_model(arch, encoder_name="resnet18", encoder_weights=None).eval()
    x = torch.randn(2, 3, 128, 128)  # layer2 is 16x16: 32 tiles
    fast = smp.optimize_for_inference(model)
    plain = smp.optimize_for_inference(model, winograd=False)
    assert any(isinstance(m, wg.WinogradConv2d) for m in fast.modules())
    assert not any(isinstance(m, wg.WinogradConv2d) for m in plain.modules())
    spy = Counting(monkeypatch)
    with torch.no_grad():
        expected = model(x)
        assert rel_err(fast(x), expected) < 1e-4
    assert spy.calls >= 3  # resnet18 layer2 at 16x16; layer3 (8x8 x 2 images) has too few tiles
    assert fast.state_dict().keys() == plain.state_dict().keys()


def test_unet_fast_path_still_folds_its_upsampling(monkeypatch):
    from segmentation_models_pytorch.decoders import unet

    calls = []
    folded = unet.UnetDecoderBlock._folded_forward
    monkeypatch.setattr(unet.UnetDecoderBlock, "_folded_forward", lambda *a: calls.append(1) or folded(*a))
    monkeypatch.setattr(unet, "FOLD_MIN_PIXELS", 0)  # fold every block, the deepest (2x4x4) too
    model = smp.Unet("resnet18", encoder_weights=None, decoder_channels=(128, 128, 64, 32, 16)).eval()
    fast = smp.optimize_for_inference(model)
    blocks = fast.decoder.blocks
    assert any(isinstance(b.conv1[0], wg.WinogradConv2d) for b in blocks)  # in >= 128 channels
    x = torch.randn(2, 3, 128, 128)
    calls.clear()  # optimize_for_inference ran its own probes
    with torch.no_grad():
        expected = model(x)
        assert len(calls) == len(blocks)
        calls.clear()
        assert rel_err(fast(x), expected) < 1e-4
    assert len(calls) == len(blocks)  # Winograd-converted conv1s keep the low-resolution fold


def test_not_used_for_bfloat16():
    model = smp.Unet("resnet18", encoder_weights=None).eval()
    fast = smp.optimize_for_inference(model, dtype=torch.bfloat16)
    assert not any(isinstance(m, wg.WinogradConv2d) for m in fast.modules())
