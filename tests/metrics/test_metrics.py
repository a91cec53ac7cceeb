"""Tests for ``segmentation_models_pytorch.metrics``.

Expected values come from hand-written confusion matrices and from a deliberately naive
reference (pixel loops and plain Python arithmetic) written below, not from the library itself.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import segmentation_models_pytorch.metrics as M

METRIC_NAMES = [
    "fbeta_score",
    "f1_score",
    "iou_score",
    "accuracy",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
    "balanced_accuracy",
    "positive_predictive_value",
    "negative_predictive_value",
    "false_negative_rate",
    "false_positive_rate",
    "false_discovery_rate",
    "false_omission_rate",
    "positive_likelihood_ratio",
    "negative_likelihood_ratio",
]
REDUCTIONS = [
    "micro",
    "macro",
    "weighted",
    "micro-imagewise",
    "macro-imagewise",
    "weighted-imagewise",
    "none",
    None,
]


# ------------------------------------------------------------------------------------------------
# Naive reference implementation
# ------------------------------------------------------------------------------------------------


def _div(a: float, b: float) -> float:
    """Float division with IEEE semantics (0/0 -> nan, x/0 -> +-inf), like torch."""
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def _ref_formula(name: str, tp: float, fp: float, fn: float, tn: float, beta: float = 1.0):
    sens = _div(tp, tp + fn)
    spec = _div(tn, tn + fp)
    ppv = _div(tp, tp + fp)
    npv = _div(tn, tn + fn)
    table = {
        "fbeta_score": _div((1 + beta**2) * tp, (1 + beta**2) * tp + beta**2 * fn + fp),
        "f1_score": _div(2 * tp, 2 * tp + fn + fp),
        "iou_score": _div(tp, tp + fp + fn),
        "accuracy": _div(tp + tn, tp + fp + fn + tn),
        "precision": ppv,
        "recall": sens,
        "sensitivity": sens,
        "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2,
        "positive_predictive_value": ppv,
        "negative_predictive_value": npv,
        "false_negative_rate": 1 - sens,
        "false_positive_rate": 1 - spec,
        "false_discovery_rate": 1 - ppv,
        "false_omission_rate": 1 - npv,
        "positive_likelihood_ratio": _div(sens, 1 - spec),
        "negative_likelihood_ratio": _div(1 - sens, spec),
    }
    return table[name]


def _ref_metric(name, stats, reduction, class_weights=None, zero_division=1.0, beta=1.0):
    """Metric of (N, C) nested-list stats, aggregated exactly as documented."""
    tp, fp, fn, tn = stats
    n_img, n_cls = len(tp), len(tp[0])
    zd = 0.0 if zero_division == "warn" else zero_division

    def score(a, b, c, d):
        value = _ref_formula(name, a, b, c, d, beta)
        return zd if math.isnan(value) else value

    def total(t, imgs, classes):
        return sum(t[i][k] for i in imgs for k in classes)

    imgs, classes = range(n_img), range(n_cls)
    if reduction == "micro":
        return score(*(total(t, imgs, classes) for t in stats))
    if reduction in ("macro", "weighted"):
        per_class = [score(*(total(t, imgs, [k]) for t in stats)) for k in classes]
        if reduction == "macro":
            return sum(per_class) / n_cls
        return sum(w * s for w, s in zip(class_weights, per_class)) / sum(class_weights)
    if reduction == "micro-imagewise":
        return sum(score(*(total(t, [i], classes) for t in stats)) for i in imgs) / n_img
    grid = [[score(tp[i][k], fp[i][k], fn[i][k], tn[i][k]) for k in classes] for i in imgs]
    if reduction == "macro-imagewise":
        return sum(map(sum, grid)) / (n_img * n_cls)
    if reduction == "weighted-imagewise":
        class_means = [sum(grid[i][k] for i in imgs) / n_img for k in classes]
        return sum(w * m for w, m in zip(class_weights, class_means)) / sum(class_weights)
    return grid


def _ref_stats(output, target, mode, ignore_index=None, threshold=None, num_classes=None):
    """Confusion counts by visiting every pixel."""
    n_img = output.shape[0]
    if mode == "multiclass":
        n_cls = num_classes
        out = output.reshape(n_img, -1).tolist()
        tgt = target.reshape(n_img, -1).tolist()
    else:
        n_cls = output.shape[1]
        out = output.reshape(n_img, n_cls, -1).tolist()
        tgt = target.reshape(n_img, n_cls, -1).tolist()
    stats = [[[0] * n_cls for _ in range(n_img)] for _ in range(4)]  # tp, fp, fn, tn
    for i in range(n_img):
        for k in range(n_cls):
            if mode == "multiclass":
                pairs = [(o == k, t == k) for o, t in zip(out[i], tgt[i]) if t != ignore_index]
            else:
                pairs = [
                    (o >= threshold if threshold is not None else o == 1, t == 1)
                    for o, t in zip(out[i][k], tgt[i][k])
                    if t != ignore_index
                ]
            for pred, true in pairs:
                slot = {(1, 1): 0, (1, 0): 1, (0, 1): 2, (0, 0): 3}[(int(pred), int(true))]
                stats[slot][i][k] += 1
    return stats


def _close(actual, expected, tol=1e-5):
    if isinstance(expected, list):
        flat_a = torch.as_tensor(actual, dtype=torch.float64).reshape(-1).tolist()
        flat_e = torch.as_tensor(expected, dtype=torch.float64).reshape(-1).tolist()
        return len(flat_a) == len(flat_e) and all(_close(a, e, tol) for a, e in zip(flat_a, flat_e))
    actual = float(actual)
    if math.isinf(expected) or math.isinf(actual):
        return actual == expected
    return abs(actual - expected) <= tol * max(1.0, abs(expected))


# ------------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------------


def _binary_case(ignore: bool):
    output = torch.tensor([[[[0.9, 0.2], [0.6, 0.4]]], [[[0.1, 0.7], [0.8, 0.3]]]])
    target = torch.tensor([[[[1, 0], [0, 1]]], [[[0, 1], [1, 1]]]])
    if ignore:
        target[1, 0, 1, 1] = 255
    return output, target


def test_get_stats_binary_by_hand():
    output, target = _binary_case(ignore=False)
    tp, fp, fn, tn = M.get_stats(output, target, mode="binary", threshold=0.5)
    # image 0: pred [[1,0],[1,0]] vs [[1,0],[0,1]]; image 1: pred [[0,1],[1,0]] vs [[0,1],[1,1]]
    assert tp.tolist() == [[1], [2]]
    assert fp.tolist() == [[1], [0]]
    assert fn.tolist() == [[1], [1]]
    assert tn.tolist() == [[1], [1]]
    assert tp.dtype == torch.long
    # micro IoU = 3 / (3 + 1 + 2); imagewise = mean(1/3, 2/3); micro F1 = 6 / 9; acc = 5 / 8
    assert M.iou_score(tp, fp, fn, tn, reduction="micro").item() == pytest.approx(0.5)
    assert M.iou_score(tp, fp, fn, tn, reduction="micro-imagewise").item() == pytest.approx(0.5)
    assert M.f1_score(tp, fp, fn, tn, reduction="micro").item() == pytest.approx(2 / 3)
    assert M.accuracy(tp, fp, fn, tn, reduction="micro").item() == pytest.approx(5 / 8)
    assert M.iou_score(tp, fp, fn, tn).flatten().tolist() == pytest.approx([1 / 3, 2 / 3])


def test_get_stats_binary_ignore_index_by_hand():
    output, target = _binary_case(ignore=True)
    tp, fp, fn, tn = M.get_stats(output, target, mode="binary", threshold=0.5, ignore_index=255)
    assert tp.tolist() == [[1], [2]]
    assert fp.tolist() == [[1], [0]]
    assert fn.tolist() == [[1], [0]]  # the missed pixel of image 1 is now ignored
    assert tn.tolist() == [[1], [1]]
    assert M.recall(tp, fp, fn, tn, reduction="micro").item() == pytest.approx(3 / 4)


def test_get_stats_multiclass_by_hand():
    output = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    target = torch.tensor([[[0, 1, 1], [2, 1, 0]]])
    tp, fp, fn, tn = M.get_stats(output, target, mode="multiclass", num_classes=3)
    assert tp.tolist() == [[2, 2, 1]]
    assert fp.tolist() == [[0, 0, 1]]
    assert fn.tolist() == [[0, 1, 0]]
    assert tn.tolist() == [[4, 3, 4]]
    # per-class IoU: 1, 2/3, 1/2
    assert M.iou_score(tp, fp, fn, tn, reduction="macro").item() == pytest.approx(
        (1 + 2 / 3 + 1 / 2) / 3
    )
    assert M.iou_score(tp, fp, fn, tn, reduction="micro").item() == pytest.approx(5 / 7)


def test_get_stats_multiclass_ignore_index_by_hand():
    output = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    target = torch.tensor([[[0, 1, 1], [2, -1, 0]]])
    tp, fp, fn, tn = M.get_stats(output, target, mode="multiclass", num_classes=3, ignore_index=-1)
    assert tp.tolist() == [[2, 1, 1]]
    assert fp.tolist() == [[0, 0, 1]]
    assert fn.tolist() == [[0, 1, 0]]
    assert tn.tolist() == [[3, 3, 3]]  # 5 valid pixels
    assert M.iou_score(tp, fp, fn, tn, reduction="macro").item() == pytest.approx(
        (1 + 1 / 2 + 1 / 2) / 3
    )


def test_get_stats_multilabel_ignore_index_by_hand():
    output = torch.tensor([[[[1, 0], [1, 1]], [[0, 0], [1, 0]]]])
    target = torch.tensor([[[[1, 1], [0, 1]], [[0, 1], [1, 255]]]])
    tp, fp, fn, tn = M.get_stats(output, target, mode="multilabel", ignore_index=255)
    assert tp.tolist() == [[2, 1]]
    assert fp.tolist() == [[1, 0]]
    assert fn.tolist() == [[1, 1]]
    assert tn.tolist() == [[0, 1]]
    # per-class precision 2/3 and 1; weighted with weights (1, 3) -> (2/3 + 3) / 4
    value = M.precision(tp, fp, fn, tn, reduction="weighted", class_weights=[1, 3])
    assert value.item() == pytest.approx((2 / 3 + 3) / 4)


def test_get_stats_per_channel_threshold():
    output = torch.tensor([[[[0.4, 0.6]], [[0.4, 0.6]]]])
    target = torch.tensor([[[[1, 1]], [[1, 1]]]])
    tp, fp, fn, tn = M.get_stats(output, target, mode="multilabel", threshold=[0.3, 0.5])
    assert tp.tolist() == [[2, 1]]
    assert fn.tolist() == [[0, 1]]


# ------------------------------------------------------------------------------------------------
# Table of random cases against the naive reference
# ------------------------------------------------------------------------------------------------


def _random_case(mode: str, ignore_index, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n_img, n_cls, h, w = 3, 3, 4, 5
    kwargs = {"mode": mode, "ignore_index": ignore_index}
    if mode == "multiclass":
        output = torch.randint(0, n_cls, (n_img, h, w), generator=gen)
        target = torch.randint(0, n_cls, (n_img, h, w), generator=gen)
        target[0] = 0  # classes 1 and 2 absent from image 0 -> exercises zero division
        output[0, :2] = 0
        kwargs["num_classes"] = n_cls
    else:
        channels = 1 if mode == "binary" else n_cls
        output = torch.rand(n_img, channels, h, w, generator=gen)
        target = torch.randint(0, 2, (n_img, channels, h, w), generator=gen)
        target[0] = 0
        output[0] = output[0] * 0.4  # nothing predicted in image 0
        kwargs["threshold"] = 0.5
    if ignore_index is not None:
        mask = torch.rand(target.shape, generator=gen) < 0.25
        target = target.masked_fill(mask, ignore_index)
    return output, target, kwargs


@pytest.mark.parametrize("mode", ["binary", "multiclass", "multilabel"])
@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_metrics_match_reference(mode, ignore_index, reduction):
    output, target, kwargs = _random_case(mode, ignore_index, seed=len(mode) * 7 + 3)
    stats = M.get_stats(output, target, **kwargs)
    expected_stats = _ref_stats(output, target, **kwargs)
    assert [s.tolist() for s in stats] == expected_stats

    n_cls = stats[0].shape[1]
    weights = [1.0, 2.0, 0.5][:n_cls]
    for name in METRIC_NAMES:
        for zero_division in (1.0, 0.0):
            extra = {"beta": 2.0} if name == "fbeta_score" else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                actual = getattr(M, name)(
                    *stats,
                    reduction=reduction,
                    class_weights=weights,
                    zero_division=zero_division,
                    **extra,
                )
            expected = _ref_metric(
                name, expected_stats, reduction, weights, zero_division, extra.get("beta", 1.0)
            )
            assert _close(actual, expected), (name, zero_division, actual, expected)


def test_binary_reductions_coincide():
    output, target, kwargs = _random_case("binary", None, seed=5)
    stats = M.get_stats(output, target, **kwargs)
    micro = M.f1_score(*stats, reduction="micro")
    for reduction in ("macro", "weighted"):
        assert M.f1_score(*stats, reduction=reduction, class_weights=[3.0]) == pytest.approx(micro)
    imagewise = M.f1_score(*stats, reduction="micro-imagewise")
    for reduction in ("macro-imagewise", "weighted-imagewise"):
        value = M.f1_score(*stats, reduction=reduction, class_weights=[3.0])
        assert value == pytest.approx(imagewise)


# ------------------------------------------------------------------------------------------------
# zero_division, class weights
# ------------------------------------------------------------------------------------------------


def _empty_stats():
    zeros = torch.zeros(2, 2, dtype=torch.long)
    return zeros, zeros, zeros, torch.full((2, 2), 4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("zero_division", [1.0, 0.0, 0.25])
def test_zero_division_value(reduction, zero_division):
    # tp = fp = fn = 0 everywhere: IoU is 0/0 for every image and class.
    value = M.iou_score(
        *_empty_stats(),
        reduction=reduction,
        class_weights=[1.0, 3.0],
        zero_division=zero_division,
    )
    assert torch.all(value == zero_division)
    assert not torch.isnan(value).any()


def test_zero_division_warn():
    with pytest.warns(UserWarning, match="Zero division"):
        value = M.iou_score(*_empty_stats(), reduction="macro", zero_division="warn")
    assert value.item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing divides by zero
        tp = torch.ones(2, 2, dtype=torch.long)
        M.iou_score(tp, tp, tp, tp, reduction="macro", zero_division="warn")


def test_micro_reduction_honours_zero_division():
    """SMP 0.6.0 returns NaN here; we apply zero_division like every other reduction."""
    for zero_division in (1.0, 0.0):
        value = M.precision(*_empty_stats(), reduction="micro", zero_division=zero_division)
        assert value.item() == zero_division


def test_likelihood_ratio_division_by_zero_is_inf():
    tp, fp, fn, tn = (torch.tensor([[v]]) for v in (3, 0, 1, 4))
    # sensitivity 3/4 over false positive rate 0 -> +inf (only 0/0 is replaced)
    assert M.positive_likelihood_ratio(tp, fp, fn, tn, reduction="micro").item() == math.inf


def test_weighted_reductions_need_class_weights():
    stats = _empty_stats()
    for reduction in ("weighted", "weighted-imagewise"):
        with pytest.raises(ValueError, match="Class weights"):
            M.f1_score(*stats, reduction=reduction)
        with pytest.raises(ValueError, match="class weights for 2 classes"):
            M.f1_score(*stats, reduction=reduction, class_weights=[1.0, 2.0, 3.0])


def test_weighted_imagewise_is_a_weighted_average():
    """A perfect prediction scores 1 (SMP 0.6.0 divides the weighted sum by C again)."""
    tp = torch.tensor([[3, 1, 2], [1, 4, 1]])
    zeros = torch.zeros_like(tp)
    value = M.iou_score(tp, zeros, zeros, zeros, "weighted-imagewise", class_weights=[1, 2, 5])
    assert value.item() == pytest.approx(1.0)

    # image 0 IoU per class (1, 1/2, 1/3), image 1 (1, 1, 1): class means (1, 3/4, 2/3)
    tp = torch.tensor([[1, 1, 1], [1, 1, 1]])
    fp = torch.tensor([[0, 1, 2], [0, 0, 0]])
    value = M.iou_score(tp, fp, zeros, zeros, "weighted-imagewise", class_weights=[1, 1, 2])
    assert value.item() == pytest.approx((1 + 3 / 4 + 2 * 2 / 3) / 4)


def test_macro_reductions_ignore_class_weights():
    tp = torch.tensor([[1, 1], [1, 1]])
    fp = torch.tensor([[0, 1], [0, 3]])
    zeros = torch.zeros_like(tp)
    for reduction in ("macro", "macro-imagewise"):
        plain = M.iou_score(tp, fp, zeros, zeros, reduction=reduction)
        weighted = M.iou_score(tp, fp, zeros, zeros, reduction=reduction, class_weights=[1, 9])
        assert weighted.item() == pytest.approx(plain.item())


def test_fbeta_matches_f1_for_beta_one():
    output, target, kwargs = _random_case("multilabel", None, seed=11)
    stats = M.get_stats(output, target, **kwargs)
    f1 = M.f1_score(*stats, reduction="none")
    assert torch.allclose(M.fbeta_score(*stats, beta=1.0, reduction="none"), f1)


def test_aliases_and_exports():
    assert M.precision is M.positive_predictive_value
    assert M.recall is M.sensitivity
    assert sorted(M.__all__) == sorted(["get_stats", *METRIC_NAMES])


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_get_stats_errors():
    ints = torch.zeros(2, 1, 3, 3, dtype=torch.long)
    floats = torch.rand(2, 1, 3, 3)
    with pytest.raises(ValueError, match="mode"):
        M.get_stats(ints, ints, mode="multi-class")
    with pytest.raises(ValueError, match="Dimensions should match"):
        M.get_stats(ints, ints[:, 0], mode="binary")
    with pytest.raises(ValueError, match="Target should be one of the integer types"):
        M.get_stats(ints, floats, mode="binary", threshold=0.5)
    with pytest.raises(ValueError, match="integer types if `threshold` is None"):
        M.get_stats(floats, ints, mode="binary")
    with pytest.raises(ValueError, match="integer class indices"):
        M.get_stats(floats, ints, mode="multiclass", num_classes=2)
    with pytest.raises(ValueError, match="threshold"):
        M.get_stats(ints, ints, mode="multiclass", num_classes=2, threshold=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        M.get_stats(ints, ints, mode="multiclass")
    with pytest.raises(ValueError, match="outside the class values range"):
        M.get_stats(ints, ints, mode="multiclass", num_classes=3, ignore_index=2)
    with pytest.raises(ValueError, match="outside the class values range"):
        M.get_stats(ints, ints, mode="binary", ignore_index=1)
    with pytest.raises(ValueError, match="output values should be in range"):
        M.get_stats(ints + 3, ints, mode="multiclass", num_classes=3)
    with pytest.raises(ValueError, match="target values should be in range"):
        M.get_stats(ints, ints - 1, mode="multiclass", num_classes=3)
    with pytest.raises(ValueError, match="thresholds for 1 channels"):
        M.get_stats(floats, ints, mode="binary", threshold=[0.5, 0.5])


def test_metric_errors():
    stats = _empty_stats()
    with pytest.raises(ValueError, match="reduction"):
        M.iou_score(*stats, reduction="average")
    with pytest.raises(ValueError, match="same shape"):
        M.iou_score(stats[0], stats[1][:1], stats[2], stats[3], reduction="micro")
