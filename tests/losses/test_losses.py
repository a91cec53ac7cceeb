"""Tests for ``segmentation_models_pytorch.losses``.

Expected values come from hand calculations and from naive reference formulas written in this
file (explicit per-class sums, per-pixel focal terms, set-based Jaccard for Lovász), not from
the library code itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segmentation_models_pytorch.losses as L
from segmentation_models_pytorch.losses import _functional as LF

MODES = ["binary", "multiclass", "multilabel"]


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threading only adds overhead (and thrashes on busy CI machines)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _random_batch(mode: str, seed: int, ignore_index=None, n=2, c=3, h=4, w=5):
    gen = torch.Generator().manual_seed(seed)
    channels = 1 if mode == "binary" else c
    logits = torch.randn(n, channels, h, w, generator=gen, dtype=torch.float64) * 2
    if mode == "multiclass":
        target = torch.randint(0, c, (n, h, w), generator=gen)
        target[target == c - 1] = 0  # last class absent: its loss term must be dropped
    else:
        target = torch.randint(0, 2, (n, channels, h, w), generator=gen)
    if ignore_index is not None:
        target = target.masked_fill(torch.rand(target.shape, generator=gen) < 0.3, ignore_index)
    return logits, target


def _per_class_counts(probas, target, mode, ignore_index):
    """(I, O, T) per class with explicit masks: soft intersection, prediction and target sums."""
    if mode == "binary":
        probas = probas.reshape(probas.shape[0], 1, -1)
        target = target.reshape(target.shape[0], 1, -1)
    counts = []
    for k in range(probas.shape[1]):
        p = probas[:, k].reshape(-1)
        if mode == "multiclass":
            labels = target.reshape(-1)
            t = (labels == k).double()
        else:
            labels = target[:, k].reshape(-1)
            t = labels.double()
        valid = (
            (labels != ignore_index).double() if ignore_index is not None else torch.ones_like(p)
        )
        p, t = p * valid, t * valid
        counts.append(((p * t).sum().item(), p.sum().item(), t.sum().item()))
    return counts


def _ref_overlap_loss(
    kind,
    logits,
    target,
    mode,
    ignore_index=None,
    smooth=0.0,
    log_loss=False,
    alpha=0.5,
    beta=0.5,
    classes=None,
    weights=None,
):
    probas = logits.softmax(1) if mode == "multiclass" else logits.sigmoid()
    losses = []
    for i_, o_, t_ in _per_class_counts(probas, target, mode, ignore_index):
        if kind == "dice":
            score = (2 * i_ + 2 * smooth) / (o_ + t_ + 2 * smooth)
        elif kind == "jaccard":
            score = (i_ + smooth) / (o_ + t_ - i_ + smooth)
        else:
            score = (i_ + smooth) / (i_ + alpha * (o_ - i_) + beta * (t_ - i_) + smooth)
        loss = -math.log(score) if log_loss else 1 - score
        losses.append(loss if t_ > 0 else 0.0)  # classes absent from the target count as 0
    idx = classes if classes is not None else range(len(losses))
    w = [weights[i] for i in idx] if weights is not None else [1.0] * len(idx)
    return sum(w_ * losses[i] for w_, i in zip(w, idx)) / sum(w)


def _ref_focal_elementwise(x, t, gamma, alpha):
    p = torch.sigmoid(x)
    pt = torch.where(t == 1, p, 1 - p)
    loss = -((1 - pt) ** gamma) * torch.log(pt)
    if alpha is not None:
        loss = loss * torch.where(t == 1, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha))
    return loss


def _ref_lovasz_extension(errors, fg):
    """Lovász extension of the Jaccard loss by explicit set operations."""
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    fg_set = {i for i, f in enumerate(fg) if f}

    def jaccard_loss(mispredicted):
        predicted = (fg_set - mispredicted) | (mispredicted - fg_set)
        union = fg_set | predicted
        return 1 - len(fg_set & predicted) / len(union) if union else 0.0

    total, previous, chosen = 0.0, 0.0, set()
    for i in order:
        chosen.add(i)
        current = jaccard_loss(chosen)
        total += errors[i] * (current - previous)
        previous = current
    return total


def _ref_lovasz_hinge(logits, labels):
    margins = [1 - m * (2 * y - 1) for m, y in zip(logits.tolist(), labels.tolist())]
    return _ref_lovasz_extension([max(0.0, e) for e in margins], labels.tolist())


# ------------------------------------------------------------------------------------------------
# Exports and hand-computed values
# ------------------------------------------------------------------------------------------------


def test_exports():
    expected = {
        "BINARY_MODE",
        "MULTICLASS_MODE",
        "MULTILABEL_MODE",
        "JaccardLoss",
        "DiceLoss",
        "FocalLoss",
        "LovaszLoss",
        "SoftBCEWithLogitsLoss",
        "SoftCrossEntropyLoss",
        "TverskyLoss",
        "MCCLoss",
    }
    assert set(L.__all__) == expected
    assert [L.BINARY_MODE, L.MULTICLASS_MODE, L.MULTILABEL_MODE] == MODES
    from segmentation_models_pytorch.losses.dice import DiceLoss

    assert DiceLoss is L.DiceLoss
    assert issubclass(L.TverskyLoss, L.DiceLoss)


@pytest.mark.parametrize(
    "cls, expected", [(L.DiceLoss, 0.5), (L.JaccardLoss, 2 / 3), (L.TverskyLoss, 0.5)]
)
def test_overlap_losses_by_hand(cls, expected):
    # I = 1, |pred| = 2, |target| = 2: Dice 2*1/4, IoU 1/3
    y_pred = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    y_true = torch.tensor([1, 1, 0, 0]).view(1, 1, 4)
    loss = cls(mode="binary", from_logits=False)(y_pred, y_true)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_soft_scores_by_hand():
    ones = torch.ones(4)
    half = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert LF.soft_dice_score(half, ones).item() == pytest.approx(2 / 3)
    assert LF.soft_jaccard_score(half, ones).item() == pytest.approx(0.5)
    # alpha weighs FP, beta FN: TP = 2, FN = 2 -> 2 / (2 + 0.7 * 2)
    tversky = LF.soft_tversky_score(half, ones, alpha=0.3, beta=0.7)
    assert tversky.item() == pytest.approx(2 / 3.4)
    # soft targets: TP is the sum of element-wise minima
    soft = LF.soft_dice_score(torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.5]))
    assert soft.item() == pytest.approx(0.7 / 1.0)


def test_multiclass_dice_by_hand():
    # class 0 predicted on pixels {0, 1}, class 1 on {2, 3}; target class 0 on {0}, 1 on {1, 2, 3}
    y_pred = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    y_true = torch.tensor([[0, 1, 1, 1]])
    loss = L.DiceLoss("multiclass", from_logits=False)(y_pred, y_true)
    # Dice class 0: 2*1/(2+1); class 1: 2*2/(2+3)
    assert loss.item() == pytest.approx(1 - (2 / 3 + 4 / 5) / 2)
    weighted = L.DiceLoss("multiclass", from_logits=False, class_weights=[1, 3])(y_pred, y_true)
    assert weighted.item() == pytest.approx(((1 - 2 / 3) + 3 * (1 - 4 / 5)) / 4)


def test_mcc_by_hand():
    y_pred = torch.tensor([0.9, 0.1, 0.8, 0.3]).view(1, 1, 2, 2)
    y_true = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    eps = 1e-5
    tp, tn, fp, fn = 0.9 + 0.3 + eps, 0.9 + 0.2 + eps, 0.1 + 0.8 + eps, 0.1 + 0.7 + eps
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert L.MCCLoss()(y_pred, y_true).item() == pytest.approx(1 - mcc, rel=1e-5)


def test_wing_loss_by_hand():
    out = LF.wing_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 10.0]), 5, 0.5, "none")
    offset = 5 - 5 * math.log(1 + 5 / 0.5)
    assert out.tolist() == pytest.approx([5 * math.log(1 + 1 / 0.5), 10 - offset])


# ------------------------------------------------------------------------------------------------
# Table of cases against the reference formulas
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("kind", ["dice", "jaccard", "tversky"])
@pytest.mark.parametrize("variant", ["plain", "smooth_log", "classes_weights"])
def test_overlap_losses_match_reference(mode, ignore_index, kind, variant):
    logits, target = _random_batch(mode, seed=len(mode) + len(kind), ignore_index=ignore_index)
    kwargs = {"ignore_index": ignore_index}
    if variant == "smooth_log":
        kwargs.update(smooth=1.0, log_loss=True)
    if variant == "classes_weights" and mode != "binary":
        kwargs.update(classes=[0, 2], class_weights=[0.5, 1.0, 2.0])
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "class_weights"}
    ref_kwargs["weights"] = kwargs.get("class_weights")
    if kind == "tversky":
        kwargs.update(alpha=0.3, beta=0.7)
        ref_kwargs.update(alpha=0.3, beta=0.7)
    cls = {"dice": L.DiceLoss, "jaccard": L.JaccardLoss, "tversky": L.TverskyLoss}[kind]
    loss = cls(mode, **kwargs)(logits, target)
    expected = _ref_overlap_loss(kind, logits, target, mode, **ref_kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_tversky_gamma_and_dice_equivalence():
    logits, target = _random_batch("multilabel", seed=3)
    dice = L.DiceLoss("multilabel")(logits, target)
    assert L.TverskyLoss("multilabel")(logits, target).item() == pytest.approx(dice.item())
    focal = L.TverskyLoss("multilabel", gamma=2.0)(logits, target)
    assert focal.item() == pytest.approx(dice.item() ** 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_focal_matches_reference(mode, ignore_index, reduction):
    logits, target = _random_batch(mode, seed=7, ignore_index=ignore_index)
    gamma, alpha = 2.0, 0.25
    crit = L.FocalLoss(
        mode, alpha=alpha, gamma=gamma, ignore_index=ignore_index, reduction=reduction
    )
    per_class = []
    for k in range(logits.shape[1]):
        x = logits[:, k]
        labels = target if mode == "multiclass" else target.reshape(logits.shape)[:, k]
        t = (labels == k).double() if mode == "multiclass" else labels.double()
        keep = labels != ignore_index if ignore_index is not None else torch.ones_like(x).bool()
        elem = _ref_focal_elementwise(x[keep], t[keep], gamma, alpha)
        per_class.append(elem.mean() if reduction == "mean" else elem.sum())
    expected = torch.stack(per_class).mean()
    assert crit(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_class_weights_and_from_logits_false():
    logits, target = _random_batch("multiclass", seed=8)
    plain = L.FocalLoss("multiclass", reduction="sum")
    weighted = L.FocalLoss("multiclass", reduction="sum", class_weights=[1.0, 1.0, 1.0])
    assert weighted(logits, target).item() == pytest.approx(plain(logits, target).item())
    # Probabilities are mapped back through the inverse sigmoid in every mode.
    for mode in MODES:
        logits, target = _random_batch(mode, seed=9)
        from_logits = L.FocalLoss(mode)(logits, target)
        from_probas = L.FocalLoss(mode, from_logits=False)(logits.sigmoid(), target)
        assert from_probas.item() == pytest.approx(from_logits.item(), rel=1e-5)


def test_focal_reduction_none_shapes():
    logits, target = _random_batch("multiclass", seed=4, ignore_index=255)
    crit = L.FocalLoss("multiclass", reduction="none", ignore_index=255)
    loss_map = crit(logits, target)
    assert loss_map.shape == logits.shape
    assert torch.all(loss_map.permute(1, 0, 2, 3)[:, target == 255] == 0)
    mean = L.FocalLoss("multiclass", reduction="sum", ignore_index=255)(logits, target)
    assert loss_map.sum().item() / logits.shape[1] == pytest.approx(mean.item())


@pytest.mark.parametrize("mode", ["binary", "multilabel"])
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_lovasz_hinge_matches_reference(mode, per_image, ignore_index):
    logits, target = _random_batch(mode, seed=13, ignore_index=ignore_index)
    loss = L.LovaszLoss(mode, per_image=per_image, ignore_index=ignore_index)(logits, target)
    groups = (
        [(logits[i], target[i]) for i in range(len(logits))] if per_image else [(logits, target)]
    )
    values = []
    for x, y in groups:
        x, y = x.reshape(-1), y.reshape(-1)
        if ignore_index is not None:
            x, y = x[y != ignore_index], y[y != ignore_index]
        values.append(_ref_lovasz_hinge(x, y))
    assert loss.item() == pytest.approx(sum(values) / len(values), rel=1e-6)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_lovasz_softmax_matches_reference(per_image, ignore_index):
    logits, target = _random_batch("multiclass", seed=17, ignore_index=ignore_index)
    loss = L.LovaszLoss("multiclass", per_image=per_image, ignore_index=ignore_index)
    probas = logits.softmax(1)
    groups = [(probas[i : i + 1], target[i : i + 1]) for i in range(len(probas))]
    values = []
    for p, y in groups if per_image else [(probas, target)]:
        p = p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])
        y = y.reshape(-1)
        if ignore_index is not None:
            p, y = p[y != ignore_index], y[y != ignore_index]
        per_class = []
        for k in range(p.shape[1]):
            fg = (y == k).double()
            if fg.sum() > 0:  # only classes present in the target
                per_class.append(_ref_lovasz_extension((fg - p[:, k]).abs().tolist(), fg.tolist()))
        values.append(sum(per_class) / len(per_class))
    assert loss(logits, target).item() == pytest.approx(sum(values) / len(values), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Fixes relative to SMP 0.6.0
# ------------------------------------------------------------------------------------------------


def test_soft_bce_mean_over_non_ignored_pixels():
    y_pred = torch.tensor([-2.0, 3.0, 0.5, 1.0, -1.0])
    y_true = torch.tensor([0.0, 1.0, -100.0, 1.0, -100.0])
    keep = y_true != -100
    expected = F.binary_cross_entropy_with_logits(y_pred[keep], y_true[keep])
    loss = L.SoftBCEWithLogitsLoss()(y_pred, y_true)
    assert loss.item() == pytest.approx(expected.item())
    # smoothing only changes the targets of the kept pixels
    smoothed = L.SoftBCEWithLogitsLoss(smooth_factor=0.1)(y_pred, y_true)
    soft = y_true[keep] * 0.9 + (1 - y_true[keep]) * 0.1
    expected = F.binary_cross_entropy_with_logits(y_pred[keep], soft)
    assert smoothed.item() == pytest.approx(expected.item())
    # everything ignored -> 0 rather than NaN
    assert L.SoftBCEWithLogitsLoss()(y_pred, torch.full_like(y_true, -100)).item() == 0.0
    summed = L.SoftBCEWithLogitsLoss(reduction="sum")(y_pred, y_true)
    none = L.SoftBCEWithLogitsLoss(reduction="none")(y_pred, y_true)
    assert summed.item() == pytest.approx(none.sum().item())
    assert torch.all(none[~keep] == 0)


def test_soft_ce_default_smooth_factor_none():
    logits, target = _random_batch("multiclass", seed=21)
    loss = L.SoftCrossEntropyLoss()(logits, target)  # SMP 0.6.0 raises TypeError here
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target).item())


@pytest.mark.parametrize("smooth", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_ce_matches_torch_label_smoothing(smooth, reduction):
    logits, target = _random_batch("multiclass", seed=22, ignore_index=-100)
    loss = L.SoftCrossEntropyLoss(reduction=reduction, smooth_factor=smooth)(logits, target)
    expected = F.cross_entropy(
        logits, target, ignore_index=-100, label_smoothing=smooth, reduction=reduction
    )
    assert loss.shape == expected.shape
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("mode", MODES)
def test_lovasz_from_logits_false(mode):
    logits, target = _random_batch(mode, seed=31)
    from_logits = L.LovaszLoss(mode)
    from_probas = L.LovaszLoss(mode, from_logits=False)
    if mode == "multiclass":
        # The softmax is skipped, so probabilities give the same value as their logits.
        assert from_probas(logits.softmax(1), target).item() == pytest.approx(
            from_logits(logits, target).item()
        )
        return
    # Binary/multilabel: Lovász extension of the errors |y - p| (bounded in [0, 1]).
    probas = logits.sigmoid()
    value = from_probas(probas, target)
    expected = _ref_lovasz_extension(
        (target.reshape(-1) - probas.reshape(-1)).abs().tolist(), target.reshape(-1).tolist()
    )
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert value.item() != pytest.approx(from_logits(probas, target).item())
    # A perfect probability map has zero loss; its mirror image has the maximal loss of 1.
    perfect = target.double()
    assert from_probas(perfect, target).item() == pytest.approx(0.0)
    assert from_probas(1 - perfect, target).item() == pytest.approx(1.0)


def test_lovasz_all_ignored_is_zero_with_gradient():
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    target = torch.full((2, 2, 2), 255)
    for per_image in (False, True):
        loss = L.LovaszLoss("multiclass", ignore_index=255, per_image=per_image)(logits, target)
        assert loss.item() == 0.0
        loss.backward()


def test_focal_multilabel_with_ignore_index():
    logits, target = _random_batch("multilabel", seed=41, ignore_index=255)
    loss = L.FocalLoss("multilabel", ignore_index=255)(logits, target)  # SMP 0.6.0 raises
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

MODE_LOSSES = [L.DiceLoss, L.JaccardLoss, L.TverskyLoss, L.FocalLoss, L.LovaszLoss]


@pytest.mark.parametrize("cls", MODE_LOSSES)
def test_bad_mode_raises_value_error(cls):
    with pytest.raises(ValueError, match="'binary', 'multiclass', 'multilabel'"):
        cls("multi-class")


@pytest.mark.parametrize("cls", MODE_LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_shape_mismatch_raises_value_error(cls, mode):
    logits, target = _random_batch(mode, seed=1)
    with pytest.raises(ValueError, match="y_true"):
        cls(mode)(logits, target[..., :-1])


def test_other_bad_inputs():
    for cls in (L.DiceLoss, L.JaccardLoss, L.TverskyLoss):
        with pytest.raises(ValueError, match="binary"):
            cls("binary", classes=[0])
        with pytest.raises(ValueError, match="binary"):
            cls("binary", class_weights=[1.0])
    with pytest.raises(ValueError, match="binary"):
        L.FocalLoss("binary", class_weights=[1.0])
    logits, target = _random_batch("multiclass", seed=1)
    with pytest.raises(ValueError, match="class_weights"):
        L.DiceLoss("multiclass", class_weights=[1.0, 2.0])(logits, target)
    with pytest.raises(ValueError, match="class_weights"):
        L.FocalLoss("multiclass", class_weights=[1.0, 2.0])(logits, target)
    with pytest.raises(ValueError, match="same shape"):
        L.SoftBCEWithLogitsLoss()(logits[:, :1], target)
    with pytest.raises(ValueError, match="y_true must have shape"):
        L.SoftCrossEntropyLoss()(logits, target[:, :-1])
    with pytest.raises(ValueError, match="MCCLoss"):
        L.MCCLoss()(logits, target)
    with pytest.raises(ValueError, match="same shape"):
        LF.soft_dice_score(torch.ones(3), torch.ones(4))


# ------------------------------------------------------------------------------------------------
# Every loss can drive a small network
# ------------------------------------------------------------------------------------------------


def _adam(params, lr=0.02, betas=(0.9, 0.999), eps=1e-8):
    """Minimal Adam; ``torch.optim`` is avoided because building it imports torch._dynamo (slow)."""
    params = list(params)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    step = 0

    def update():
        nonlocal step
        step += 1
        with torch.no_grad():
            for p, (m, v) in zip(params, moments):
                m.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
                m_hat = m / (1 - betas[0] ** step)
                v_hat = v / (1 - betas[1] ** step)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
                p.grad = None

    return update


def _overfit(criterion, mode, activation=None, steps=30):
    torch.manual_seed(0)
    n, c, size = 2, 3, 8
    x = torch.randn(n, 3, size, size)
    # Targets that are a simple function of the input, so a tiny conv net can fit them.
    if mode == "multiclass":
        y = x[:, :c].argmax(1)
    elif mode == "binary":
        y = (x[:, :1] > 0).long()
    else:
        y = (x[:, :c] > 0).long()
    out_channels = 1 if mode == "binary" else c
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, out_channels, 1))
    optimizer_step = _adam(model.parameters())

    def loss_value():
        out = model(x)
        return criterion(activation(out) if activation else out, y)

    with torch.no_grad():
        initial = loss_value().item()
    for _ in range(steps):
        loss_value().backward()
        optimizer_step()
    with torch.no_grad():
        final = loss_value().item()
    return initial, final


TRAINING_CASES = [
    *[(cls.__name__, mode) for cls in MODE_LOSSES for mode in MODES],
    ("SoftBCEWithLogitsLoss", "binary"),
    ("SoftBCEWithLogitsLoss", "multilabel"),
    ("SoftCrossEntropyLoss", "multiclass"),
    ("MCCLoss", "binary"),
]


@pytest.mark.parametrize("name, mode", TRAINING_CASES)
def test_loss_decreases_when_overfitting(name, mode):
    activation = None
    if name in ("SoftBCEWithLogitsLoss", "SoftCrossEntropyLoss"):
        criterion = getattr(L, name)()
    elif name == "MCCLoss":
        criterion, activation = L.MCCLoss(), torch.sigmoid
    else:
        criterion = getattr(L, name)(mode)
    if name == "SoftBCEWithLogitsLoss":
        initial, final = _overfit(lambda p, t: criterion(p, t.float()), mode)
    else:
        initial, final = _overfit(criterion, mode, activation)
    assert final < 0.9 * initial, (initial, final)
