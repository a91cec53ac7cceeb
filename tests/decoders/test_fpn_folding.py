"""FPN's folded finest level computes exactly what the plain ``p2`` + segmentation block computes."""

from __future__ import annotations

import pytest
import torch

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.decoders import fpn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _model(dtype=torch.float32, **kwargs) -> smp.FPN:
    torch.manual_seed(0)
    model = smp.FPN("resnet18", encoder_weights=None, classes=3, decoder_dropout=0.0, **kwargs)
    for m in model.decoder.modules():  # non-trivial GroupNorm affines and skip biases
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            torch.nn.init.normal_(m.bias, 0.0, 0.5)
    return model.to(dtype)


def _spy(monkeypatch) -> list:
    calls: list = []
    folded = fpn.FPNDecoder._finest_level_folded
    monkeypatch.setattr(fpn.FPNDecoder, "_finest_level_folded", lambda *a: calls.append(1) or folded(*a))
    return calls


def _run(model, x, fold: bool, monkeypatch):
    monkeypatch.setattr(fpn, "FOLD_MIN_PIXELS", 0 if fold else 1 << 40)
    model.zero_grad()
    y = model(x)
    if torch.is_grad_enabled():
        y.square().mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


@pytest.mark.parametrize("merge_policy", ["add", "cat"])
@pytest.mark.parametrize("shape", [(2, 3, 64, 96), (1, 3, 64, 64)])
def test_folded_fpn_matches_plain_fpn_forward_and_backward(merge_policy, shape, monkeypatch):
    # float64 and eval-mode norms: the two routes must agree to rounding, gradients included.
    model = _model(torch.float64, decoder_merge_policy=merge_policy).eval()
    x = torch.randn(shape, dtype=torch.float64)
    calls = _spy(monkeypatch)
    y_fold, g_fold = _run(model, x, True, monkeypatch)
    assert calls, "the finest level should take the folded route"
    calls.clear()
    y_plain, g_plain = _run(model, x, False, monkeypatch)
    assert not calls
    assert _rel(y_fold, y_plain) < 1e-12
    assert g_fold.keys() == g_plain.keys()
    for k in g_plain:
        assert _rel(g_fold[k], g_plain[k]) < 1e-10, k


def test_folded_fpn_trains_like_plain_fpn(monkeypatch):
    model = _model().train()
    x = torch.randn(2, 3, 64, 64)
    y_fold, _ = _run(model, x, True, monkeypatch)
    y_plain, _ = _run(model, x, False, monkeypatch)
    assert _rel(y_fold, y_plain) < 1e-4


def test_bias_through_padding_is_the_convolution_of_a_constant_map():
    torch.manual_seed(0)
    w, b = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for h, w_ in ((1, 1), (2, 5), (6, 4)):
        ref = torch.nn.functional.conv2d(b.view(1, 4, 1, 1).expand(1, 4, h, w_), w, padding=1)
        assert _rel(fpn._bias_through_padding(w, b, h, w_), ref) < 1e-12


def test_threshold_odd_sizes_and_hooks_take_the_plain_path(monkeypatch):
    model = _model().eval()
    calls = _spy(monkeypatch)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # p3 is 1x8x8 = 64 pixels, below the threshold
        assert not calls
        monkeypatch.setattr(fpn, "FOLD_MIN_PIXELS", 0)
        model(torch.randn(1, 3, 64, 64))
        assert len(calls) == 1
        calls.clear()
        model(torch.randn(1, 3, 96, 80))  # p3 6x5 -> c2 24x20: still exact 2x
        assert len(calls) == 1
        calls.clear()
        seen = []
        handle = model.decoder.p2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        model(torch.randn(1, 3, 64, 64))  # a hook on the bypassed level must still see it
        handle.remove()
        assert seen and not calls


def test_fast_path_keeps_the_folded_convs_plain(monkeypatch):
    # optimize_for_inference probes below the threshold; the convs the fold reads by weight must
    # stay readable, and the fast model must fold at a large size and match.
    model = _model().eval()
    fast = smp.optimize_for_inference(model)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(fpn, "FOLD_MIN_PIXELS", 16)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)
        calls.clear()
        got = fast(x)
    assert len(calls) == 1
    assert _rel(got, expected) < 1e-4
