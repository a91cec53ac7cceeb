"""Recomputed norm/activation chains: same values and gradients, fewer tensors kept, safe fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import recompute, small_conv
from segmentation_models_pytorch.base.recompute import Chain, recompute_scope

DT = torch.float64


@pytest.fixture(autouse=True)
def _no_small_map_weight_gradients(monkeypatch):
    """Recomputation alone is bit-exact, which these tests check. The small-map weight gradients
    (``base.small_conv``, tested in test_small_conv.py) run in the same training forwards and
    differ by float rounding, so they are off here."""
    monkeypatch.setattr(small_conv, "_applies", lambda *args: False)


@pytest.fixture(autouse=True)
def _chains_at_any_size(monkeypatch):
    """The tensors here are tiny; chains below ``MIN_CHAIN_NUMEL`` are off by default."""
    monkeypatch.setattr(recompute, "MIN_CHAIN_NUMEL", 0)


def _layers(kind: str):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).to(DT)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    act = {
        "relu_inplace": nn.ReLU(inplace=True),
        "relu6_inplace": nn.ReLU6(inplace=True),
        "silu_pad": nn.SiLU(),
        "silu_gate": nn.SiLU(),
        "leaky": nn.LeakyReLU(0.1),
    }[kind]
    conv = nn.Conv2d(6, 6, 3, padding=0 if kind == "silu_pad" else 1, groups=1).to(DT)
    return bn, act, conv


def _run(kind: str, lean: bool, layers, x0: torch.Tensor, train: bool = True):
    """Chain ``bn -> act [-> pad | * gate] -> conv`` from ``z = 1.5 x``; returns output, grads and
    weak references to the intermediate tensors' storages."""
    bn, act, conv = layers
    bn.train(train)
    x = x0.clone().requires_grad_()
    for p in [*bn.parameters(), *conv.parameters()]:
        p.grad = None
    refs = []
    with recompute_scope(lean):
        chain = Chain(x * 1.5)
        refs.append(StorageWeakRef(chain.norm(bn).untyped_storage()))
        y = chain.act(act)
        refs.append(StorageWeakRef(y.untyped_storage()))
        if kind == "silu_pad":
            refs.append(StorageWeakRef(chain.act(nn.ZeroPad2d(1)).untyped_storage()))
        elif kind == "silu_gate":
            gate = torch.sigmoid(y.mean((2, 3), keepdim=True))
            refs.append(StorageWeakRef(chain.mul(gate).untyped_storage()))
        out = chain.consume(conv)
        del chain, y
    weights = torch.linspace(-1, 1, out.numel(), dtype=DT).reshape(out.shape)
    alive = [not r.expired() for r in refs]
    (out * weights).sum().backward()
    grads = [x.grad] + [p.grad for p in [*bn.parameters(), *conv.parameters()]]
    return out.detach(), grads, alive, {k: v.clone() for k, v in bn.state_dict().items()}


KINDS = ["relu_inplace", "relu6_inplace", "silu_pad", "silu_gate", "leaky"]


@pytest.mark.parametrize("train", [True, False], ids=["train-bn", "eval-bn"])
@pytest.mark.parametrize("kind", KINDS)
def test_chain_matches_plain_and_keeps_less(kind, train):
    x0 = torch.randn(2, 6, 7, 9, dtype=DT).contiguous(memory_format=torch.channels_last)
    layers = _layers(kind)
    state = copy.deepcopy(layers[0].state_dict())
    out0, grads0, alive0, stats0 = _run(kind, False, layers, x0, train)
    layers[0].load_state_dict(state)
    out1, grads1, alive1, stats1 = _run(kind, True, layers, x0, train)
    assert torch.equal(out0, out1)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-12)
    for k in stats0:  # running statistics updated exactly once, as usual
        assert torch.equal(stats0[k], stats1[k]), k
    # The ordinary path keeps the norm output (or what overwrote it) alive for backward; the chain
    # keeps none of its intermediate tensors.
    assert any(alive0)
    assert not any(alive1), alive1


def _upsample_cat(a, h):
    up = torch.nn.functional.interpolate(a, size=h.shape[-2:], mode="bilinear", align_corners=True)
    return torch.cat([up, h], dim=1)


def _run_derived(lean: bool, a0, h0, modify=False):
    torch.manual_seed(0)
    dw = nn.Conv2d(5, 5, 3, padding=1, groups=5, bias=False).to(DT)
    pw = nn.Conv2d(5, 4, 1).to(DT)
    a, h = a0.clone().requires_grad_(), h0.clone().requires_grad_()
    a2, h2 = a * 1.0, h * 1.0  # non-leaf inputs, so that one can be changed in place
    with recompute_scope(lean):
        chain = Chain.derived(_upsample_cat, a2, h2)
        refs = [StorageWeakRef(chain.current.untyped_storage())]
        refs.append(StorageWeakRef(chain.then(dw).untyped_storage()))
        out = chain.consume(pw)
        del chain
    alive = [not r.expired() for r in refs]
    if modify:
        h2.add_(1.0)
    (out * torch.linspace(-1, 1, out.numel(), dtype=DT).reshape(out.shape)).sum().backward()
    return out.detach(), [a.grad, h.grad, dw.weight.grad, pw.weight.grad, pw.bias.grad], alive


def test_derived_chain_recomputes_its_start_and_then_steps():
    a0, h0 = torch.randn(2, 3, 4, 4, dtype=DT), torch.randn(2, 2, 8, 8, dtype=DT)
    out0, grads0, alive0 = _run_derived(False, a0, h0)
    out1, grads1, alive1 = _run_derived(True, a0, h0)
    assert alive0 == [True, True]  # the plain path keeps the concatenation and the depthwise output
    assert alive1 == [False, False]  # the chain keeps neither
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-12)


def test_derived_chain_detects_in_place_change_of_its_inputs():
    a0, h0 = torch.randn(2, 3, 4, 4, dtype=DT), torch.randn(2, 2, 8, 8, dtype=DT)
    with pytest.raises(RuntimeError, match="modified in place"):
        _run_derived(True, a0, h0, modify=True)


def test_chain_outside_a_scope_is_the_plain_path():
    x0 = torch.randn(2, 6, 5, 5, dtype=DT)
    _, _, alive, _ = _run("silu_gate", False, _layers("silu_gate"), x0)
    assert all(alive)


def test_outer_saved_tensor_hooks_disable_chains():
    # Activation checkpointing / offloading install their own hooks: chains must not override them.
    x = torch.randn(2, 6, 5, 5, dtype=DT, requires_grad=True)
    with recompute_scope(True), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not Chain(x * 1.0).active
    with recompute_scope(True):
        assert Chain(x * 1.0).active
        with torch.no_grad():
            assert not Chain(x * 1.0).active
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not Chain(x * 1.0).active


def test_checkpointed_model_trains_like_plain():
    from torch.utils.checkpoint import checkpoint

    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4))
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for use_checkpoint in (False, True):
        m = copy.deepcopy(model).eval()
        y = checkpoint(m, x, use_reentrant=False) if use_checkpoint else m(x)
        y.square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


def _bn_act_conv(kind: str, act=None):
    """``conv(act(bn(1.5 x)))`` through a chain in a scope; returns x, the chain input and output."""
    bn, default_act, conv = _layers(kind)
    x = torch.randn(2, 6, 5, 5, dtype=DT, requires_grad=True)
    with recompute_scope(True):
        z = x * 1.5
        chain = Chain(z)
        chain.norm(bn)
        chain.act(default_act if act is None else act)
        active = chain.active
        out = chain.consume(conv)
    return x, z, out, conv, active


def test_higher_order_gradients_raise_a_clear_error():
    x, _, out, _, _ = _bn_act_conv("silu_gate")
    with pytest.raises(RuntimeError, match="recompute_activations = False"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_in_place_change_of_the_chain_input_is_detected():
    _, z, out, _, _ = _bn_act_conv("relu_inplace")
    with torch.no_grad():
        z.add_(1.0)
    with pytest.raises(RuntimeError, match="modified"):
        out.sum().backward()


def test_in_place_change_of_a_parameter_is_detected_as_by_autograd():
    _, _, out, conv, _ = _bn_act_conv("relu_inplace")
    with torch.no_grad():
        conv.weight.mul_(2.0)  # e.g. an optimizer step between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_unknown_module_stops_the_chain_safely():
    x, _, out, _, active = _bn_act_conv("relu_inplace", act=nn.Dropout(0.5))  # random: never recomputed
    assert not active
    out.sum().backward()  # ordinary autograd from there on
    assert x.grad is not None


@pytest.fixture
def recompute_calls(monkeypatch):
    """The list of recipe steps backward recomputed (appended to as it happens)."""
    calls = []
    value = recompute._Recipe.value
    monkeypatch.setattr(
        recompute._Recipe, "value", lambda self, step: calls.append(step) or value(self, step)
    )
    return calls


MODELS = [
    ("Unet", "resnet18"),  # BasicBlock + Unet blocks (folded and plain)
    ("Unet", "resnet50"),  # Bottleneck
    ("Unet", "efficientnet-b0"),  # MBConv with expansion, excitation, static padding
    ("UnetPlusPlus", "mobilenet_v2"),  # inverted residuals
    ("MAnet", "resnet18"),
    ("Linknet", "resnet18"),  # 1x1 conv -> transposed conv -> 1x1 conv blocks
    ("DeepLabV3Plus", "efficientnet-b0"),  # dilated: padding replaced by dilation
    ("DeepLabV3Plus", "resnet18"),  # ResNet stem chain; derived upsample+cat -> depthwise chain
    ("FPN", "resnet18"),  # the stem's output is no skip: kept by nobody
]


@pytest.mark.parametrize("arch,encoder", MODELS, ids=[f"{a}-{e}" for a, e in MODELS])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_models_train_identically_with_recomputation(arch, encoder, mode, recompute_calls):
    calls = recompute_calls

    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder, encoder_weights=None, classes=2)
    model.train(mode == "train")
    x = torch.randn(2, 3, 64, 64)
    results = []
    for flag in (False, True):
        m = copy.deepcopy(model)
        m.recompute_activations = flag
        calls.clear()
        torch.manual_seed(1)  # drop-connect draws
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((y.detach(), grads, copy.deepcopy(m.state_dict()), len(calls)))
    (y0, g0, s0, n0), (y1, g1, s1, n1) = results
    assert n0 == 0 and n1 > 0  # the flag decides, and the chains ran
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)
    for name in s0:
        assert torch.equal(s0[name], s1[name]), name


def test_chains_start_only_at_tensors_worth_recomputing(monkeypatch):
    monkeypatch.setattr(recompute, "MIN_CHAIN_NUMEL", 1 << 16)
    small = torch.randn(2, 32, 32, 31, requires_grad=True)  # 63488 elements
    large = torch.randn(2, 32, 32, 32, requires_grad=True)
    with recompute_scope(True):
        assert not Chain(small).active
        assert Chain(large).active


def test_recomputation_is_off_for_inference_and_standalone_encoders(recompute_calls):
    calls = recompute_calls
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
    model.encoder(x)[-1].sum().backward()  # an encoder on its own: ordinary autograd
    assert calls == []
    assert not recompute.scope_active()


def test_efficientnet_symmetric_padding_is_folded_into_the_convolution():
    from efficientnet_pytorch.utils import Conv2dStaticSamePadding

    encoder = smp.encoders.get_encoder("efficientnet-b0", weights=None).eval()
    convs = [m for m in encoder.modules() if type(m) is Conv2dStaticSamePadding]
    folded = [m for m in convs if m.padding != (0, 0)]
    assert folded, "stride-1 depthwise convs should carry their padding themselves"
    for m in convs:
        pad = m.static_padding
        if isinstance(pad, nn.ZeroPad2d):  # what stays: asymmetric "same" pads of strided convs
            left, right, top, bottom = pad.padding
            assert (left, top) != (right, bottom)
    # Reference: the package's own layout (explicit zero-padding, no conv padding).
    reference = copy.deepcopy(encoder)
    for m in reference.modules():
        if type(m) is Conv2dStaticSamePadding and m.padding != (0, 0):
            ph, pw = m.padding
            m.static_padding, m.padding = nn.ZeroPad2d((pw, pw, ph, ph)), (0, 0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(encoder(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False], ids=["train-bn", "eval-bn"])
def test_batchnorm_affine_without_saved_statistics(train):
    # Backends other than the native kernel (cuDNN, MIOpen) save other statistics: the affine map is
    # then computed from the norm's input. Detaching the output hides the autograd node the same way.
    bn = nn.BatchNorm2d(5).train(train)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    z = torch.randn(3, 5, 4, 6) * 2 + 1
    out = bn(z).detach()
    a, b = recompute._batchnorm_affine(bn, z, out)
    torch.testing.assert_close(z * a + b, out, rtol=1e-5, atol=1e-5)


def test_torch_func_transforms_take_the_plain_path():
    # torch.func wraps tensors (no storage to match) and rejects saved-tensor hooks.
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4)).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(2, 3, 32, 32)

    def loss(p):
        return torch.func.functional_call(model, {**p, **buffers}, (x,)).square().sum()

    grads = []
    for flag in (False, True):
        model.recompute_activations = flag
        grads.append(torch.func.grad(loss)(params))
    for name in params:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["nchw", "inplace", "groupnorm", "identity", "scse"])
def test_decoder_variants_train_identically(variant):
    # Norms the chain does not know (InPlaceABN's fused activation, GroupNorm, none) end the chain;
    # NCHW models and attention blocks take the other code paths of the same blocks.
    kwargs = {"encoder_depth": 3, "decoder_channels": (32, 16, 16)}
    if variant in ("inplace", "groupnorm", "identity"):
        kwargs["decoder_use_norm"] = variant
    if variant == "scse":
        kwargs["decoder_attention_type"] = "scse"
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, **kwargs)
    if variant == "nchw":
        model.channels_last = False
        model.to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for flag in (False, True):
        m = copy.deepcopy(model)
        m.recompute_activations = flag
        m(x).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_saved_tensors_can_be_inspected_outside_backward():
    # Graph visualisers read grad_fn._saved_* with gradients on; that is not a double backward.
    x, _, out, conv, _ = _bn_act_conv("relu_inplace")
    node = out.grad_fn
    saved = node._saved_input
    assert saved.shape == (2, 6, 5, 5)
    assert saved.min() >= 0  # a recomputed ReLU output


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_max_pool_keeping_input_gives_max_pool_gradients(ties):
    torch.manual_seed(0)
    x0 = torch.randint(0, 3, (2, 4, 9, 9)).to(DT) if ties else torch.randn(2, 4, 9, 9, dtype=DT)
    pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    grad = torch.randn(2, 4, 5, 5, dtype=DT)
    outs = []
    for fn in (pool, recompute.max_pool_keeping_input(pool)):
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(grad)
        outs.append((y.detach(), x.grad))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0, y1) and torch.equal(g0, g1)


def test_max_pool_keeping_input_falls_back_for_other_pools():
    pool = nn.MaxPool2d(2, return_indices=True)
    assert recompute.max_pool_keeping_input(pool) is pool
    avg = nn.AvgPool2d(2)
    assert recompute.max_pool_keeping_input(avg) is avg
