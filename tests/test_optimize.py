"""``smp.optimize_for_inference``: what it folds, what it leaves alone, and that outputs do not move."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import segmentation_models_pytorch as smp

ARCHS = sorted(smp.MODEL_ARCHITECTURES_MAPPING)
ENCODERS = ["resnet18", "efficientnet-b0", "mobilenet_v2"]


def build(arch: str, encoder: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smp.MODEL_ARCHITECTURES_MAPPING[arch](encoder_name=encoder, encoder_weights=None)
    # Non-trivial statistics, so that a wrong fold cannot hide behind mean 0 / var 1.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def batch_norms(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def called_modules(model: nn.Module, x: torch.Tensor) -> set:
    called = set()
    handles = [m.register_forward_hook(lambda *_, name=n: called.add(name)) for n, m in model.named_modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return called


# Every architecture with resnet18; the depthwise encoders (other conv subclasses, SiLU/ReLU6
# fusion) with the decoders that differ most in how they use the features.
CASES = [(a, "resnet18") for a in ARCHS if a != "dpt"] + [
    (a, e) for a in ("unet", "fpn", "linknet", "deeplabv3plus") for e in ENCODERS[1:]
]


@pytest.mark.parametrize("arch, encoder", CASES)
def test_every_batchnorm_after_a_conv_is_folded_and_outputs_match(arch, encoder):
    model = build(arch, encoder)
    x = torch.randn(2, 3, 64, 64)
    fast = smp.optimize_for_inference(model, example_input=x[:1])
    # Left alone: layers the model never runs (efficientnet's head, stages beyond encoder_depth).
    assert set(batch_norms(fast)) & called_modules(model, x) == set()
    assert not any(isinstance(m, nn.Dropout) for m in fast.modules())
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert out.is_contiguous()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4
    with_grad = fast(x).detach()  # blocks may route differently with autograd on
    assert ((with_grad - ref).abs().max() / ref.abs().max()).item() < 1e-4
    assert batch_norms(model), "the original model is left untouched"


def test_bfloat16_option_returns_the_callers_dtype_within_its_documented_error():
    model = build("fpn", "resnet18")
    x = torch.randn(2, 3, 64, 64)
    fast = smp.optimize_for_inference(model, dtype=torch.bfloat16)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert out.dtype == torch.float32
    assert next(fast.parameters()).dtype == torch.bfloat16
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-2


def test_convs_that_transform_their_weight_are_not_folded():
    from timm.layers import Conv2dSame, StdConv2d

    net = nn.Sequential(
        StdConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Conv2dSame(8, 8, 3), nn.BatchNorm2d(8)
    )
    with torch.no_grad():
        for bn in (net[1], net[3]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    fast = smp.optimize_for_inference(net, example_input=x)
    # StdConv2d standardises its weight, which would undo a folded scale; Conv2dSame only pads.
    assert isinstance(fast[1], nn.BatchNorm2d) and isinstance(fast[3], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)


def test_a_conv_called_twice_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    net = Shared().eval()
    with torch.no_grad():
        net.bn.running_var.fill_(4.0)
    x = torch.randn(1, 4, 8, 8)
    fast = smp.optimize_for_inference(net, example_input=x)
    assert isinstance(fast.bn, nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x))


def test_unet_folded_blocks_are_traced_through_their_layers():
    # Unet's eval forward computes conv1 of each decoder block without calling the layer; the
    # probe runs the plain path so its BatchNorm is still found and folded.
    model = build("unet", "resnet18")
    fast = smp.optimize_for_inference(model)
    assert all(isinstance(b.conv1[1], nn.Identity) for b in fast.decoder.blocks)
    assert all(b.conv1[0].bias is not None for b in fast.decoder.blocks)


def test_bad_dtype_is_rejected_with_the_accepted_values():
    with pytest.raises(ValueError, match="torch.bfloat16"):
        smp.optimize_for_inference(nn.Conv2d(3, 3, 1), dtype=torch.int8)


@pytest.mark.parametrize("groups", [1, 2])
def test_batchnorm_after_a_transposed_conv_is_folded(groups):
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, groups=groups), nn.BatchNorm2d(6))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(2, 4, 8, 8)
    fast = smp.optimize_for_inference(net, example_input=x)
    assert isinstance(fast[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-5)


class _ConvThen(nn.Module):
    """conv -> act, with the conv's output read again in one of several ways."""

    def __init__(self, reuse: str):
        super().__init__()
        self.reuse = reuse
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.SiLU(inplace=reuse == "after_in_place")
        self.act2 = nn.SiLU()

    def forward(self, x):
        z = self.conv(x)
        if self.reuse == "before":
            peek = z.sum()
            return self.act(z) + peek
        y = self.act(z)
        if self.reuse in ("after", "after_in_place"):
            return y + z  # after an in-place act, z *is* y: fusing keeps that
        if self.reuse == "shared":
            return self.act(y)
        return y


@pytest.mark.parametrize(
    "reuse, fused",
    [("none", True), ("after_in_place", True), ("after", False), ("before", False), ("shared", False)],
)
def test_conv_and_activation_fused_only_when_nothing_else_reads_the_conv_output(reuse, fused):
    from segmentation_models_pytorch.optimize import ConvAct

    net = _ConvThen(reuse).eval()
    x = torch.randn(2, 4, 8, 8)
    fast = smp.optimize_for_inference(net, example_input=x)
    assert isinstance(fast.conv, ConvAct) == fused
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-6)


def test_fused_conv_activation_blocks_fall_back_off_cpu_float():
    model = build("unet", "mobilenet_v2")
    fast = smp.optimize_for_inference(model)
    assert sum(type(m).__name__ == "ConvAct" for m in fast.modules()) > 10
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.double()(x.double())
        out = fast.double()(x.double())  # float64: not a oneDNN post-op dtype, the two modules run
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4
    plain = smp.optimize_for_inference(model.float(), fuse_activations=False)
    assert not any(type(m).__name__ == "ConvAct" for m in plain.modules())


class _RoutesByGradMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act_inference = nn.SiLU()
        self.act_autograd = nn.ReLU()

    def forward(self, x):
        z = self.conv(x)
        return self.act_autograd(z) if torch.is_grad_enabled() else self.act_inference(z)


def test_a_pair_seen_on_one_route_only_is_not_fused():
    net = _RoutesByGradMode().eval()
    x = torch.randn(2, 4, 8, 8)
    fast = smp.optimize_for_inference(net, example_input=x)
    assert isinstance(fast.conv, nn.Conv2d)
    torch.testing.assert_close(fast(x), net(x))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x))


def test_fused_fast_model_scripts_and_traces_to_the_same_values():
    model = smp.Unet("efficientnet-b0", encoder_weights=None, decoder_channels=(32, 16, 16, 8, 8)).eval()
    fast = smp.optimize_for_inference(model)
    assert sum(type(m).__name__ == "ConvAct" for m in fast.modules()) > 10
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = fast(x)
        traced = torch.jit.trace(fast, x)
        torch.testing.assert_close(traced(x), ref, rtol=1e-4, atol=1e-5)
    scripted = torch.jit.script(fast)
    torch.testing.assert_close(scripted(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(4, 4), (4, 16), (16, 16)])  # all, row-only and no taps dead
def test_fused_atrous_conv_skips_dead_taps_with_the_same_values(size, monkeypatch):
    from segmentation_models_pytorch.base import modules as md
    from segmentation_models_pytorch.optimize import ConvAct

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=6, dilation=6), nn.ReLU()).eval()
    x = torch.randn(2, 8, *size).contiguous(memory_format=torch.channels_last)
    fast = smp.optimize_for_inference(net, example_input=x)
    assert isinstance(fast[0], ConvAct)
    live = []
    original = md.live_taps
    monkeypatch.setattr(md, "live_taps", lambda c, t: live.append(original(c, t)) or live[-1])
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-6)
    assert (live[-1] is not None) == (size[0] <= 6)
