"""Segmentation metrics built from per-image, per-class confusion counts.

Usage::

    tp, fp, fn, tn = get_stats(output, target, mode="multilabel", threshold=0.5)
    iou = iou_score(tp, fp, fn, tn, reduction="micro")
    f2 = fbeta_score(tp, fp, fn, tn, beta=2, reduction="macro-imagewise")

:func:`get_stats` returns four ``(N, C)`` integer tensors (true positives, false positives,
false negatives, true negatives for every image and class); every metric function takes them
and a ``reduction`` describing how to aggregate over images and classes.

Reference: https://en.wikipedia.org/wiki/Confusion_matrix
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "f1_score",
    "false_discovery_rate",
    "false_negative_rate",
    "false_omission_rate",
    "false_positive_rate",
    "fbeta_score",
    "get_stats",
    "iou_score",
    "negative_likelihood_ratio",
    "negative_predictive_value",
    "positive_likelihood_ratio",
    "positive_predictive_value",
    "precision",
    "recall",
    "sensitivity",
    "specificity",
]

_MODES = ("binary", "multiclass", "multilabel")
_REDUCTIONS = (
    "micro",
    "macro",
    "weighted",
    "micro-imagewise",
    "macro-imagewise",
    "weighted-imagewise",
    "none",
    None,
)
Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Confusion counts
# ------------------------------------------------------------------------------------------------


def get_stats(
    output: torch.Tensor,
    target: torch.Tensor,
    mode: str,
    ignore_index: int | None = None,
    threshold: float | list[float] | None = None,
    num_classes: int | None = None,
) -> Stats:
    """Count true/false positive/negative pixels for every image and class.

    Args:
        output: Model output.

            * ``"binary"``: ``(N, 1, ...)``, integer labels or scores (with ``threshold``);
            * ``"multilabel"``: ``(N, C, ...)``, integer labels or scores (with ``threshold``);
            * ``"multiclass"``: ``(N, ...)`` integer class indices (e.g. ``logits.argmax(1)``).

        target: Integer ground truth with the same shape as ``output``.
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        ignore_index: Target value whose pixels are left out of every count. Must lie outside
            the class range (e.g. ``-1`` or ``255``). Unlike SMP 0.6.0 it is also accepted in
            binary and multilabel modes.
        threshold: Binarisation threshold for ``output`` in binary/multilabel mode: values
            ``>= threshold`` count as positive. A list gives one threshold per channel. As in
            SMP, the target is binarised with the same threshold.
        num_classes: Number of classes; required in multiclass mode, where class values must lie
            in ``0 .. num_classes - 1``.

    Returns:
        ``(tp, fp, fn, tn)``, each a ``torch.long`` tensor of shape ``(N, C)`` (``C = 1`` in
        binary mode), on the device of ``output``.

    Raises:
        ValueError: On an unknown mode, mismatched shapes, wrong dtypes, a missing
            ``num_classes``/``threshold``, an ``ignore_index`` inside the class range, or
            multiclass values outside ``0 .. num_classes - 1``.
    """
    if mode not in _MODES:
        raise ValueError(f"get_stats: mode should be one of {list(_MODES)}, got mode={mode!r}.")
    if torch.is_floating_point(target):
        raise ValueError(f"Target should be one of the integer types, got {target.dtype}.")
    if torch.is_floating_point(output) and mode == "multiclass":
        raise ValueError(
            "For 'multiclass' mode `output` should hold integer class indices (e.g. "
            f"`logits.argmax(dim=1)`), got {output.dtype}."
        )
    if torch.is_floating_point(output) and threshold is None:
        raise ValueError(
            f"Output should be one of the integer types if `threshold` is None, got {output.dtype}."
        )
    if mode == "multiclass" and threshold is not None:
        raise ValueError("`threshold` is not supported in 'multiclass' mode.")
    if output.shape != target.shape:
        raise ValueError(
            "Dimensions should match, but `output` shape is not equal to `target` shape, "
            f"{tuple(output.shape)} != {tuple(target.shape)}."
        )
    if output.dim() < 2:
        raise ValueError(
            f"`output` and `target` need a batch dimension and at least one more dimension, "
            f"got shape {tuple(output.shape)}."
        )

    if mode == "multiclass":
        if num_classes is None:
            raise ValueError("`num_classes` should be given for 'multiclass' mode.")
        _check_ignore_index(ignore_index, num_classes)
        return _multiclass_stats(output, target, num_classes, ignore_index)

    _check_ignore_index(ignore_index, 2)
    valid = None if ignore_index is None else target != ignore_index
    if threshold is not None:
        thr = _threshold_tensor(threshold, output)
        output = (output >= thr).long()
        target = (target >= thr).long()
    return _multilabel_stats(output, target, valid)


def _check_ignore_index(ignore_index: int | None, num_classes: int) -> None:
    if ignore_index is not None and 0 <= ignore_index <= num_classes - 1:
        raise ValueError(
            f"`ignore_index` should be outside the class values range 0..{num_classes - 1}, got "
            f"ignore_index={ignore_index}. Hint: relabel so that the ignored value is e.g. -1 "
            "or 255."
        )


def _threshold_tensor(threshold: float | Sequence[float], output: torch.Tensor):
    """A scalar threshold, or per-channel thresholds shaped to broadcast along dim 1."""
    if isinstance(threshold, (int, float)):
        return threshold
    thr = torch.as_tensor(threshold, dtype=torch.float64, device=output.device).reshape(-1)
    if thr.numel() == 1:
        return thr.item()
    if thr.numel() != output.size(1):
        raise ValueError(
            f"Got {thr.numel()} thresholds for {output.size(1)} channels; pass one threshold or "
            "one per channel."
        )
    return thr.view(1, -1, *([1] * (output.dim() - 2)))


@torch.no_grad()
def _multilabel_stats(
    output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None
) -> Stats:
    batch_size, num_classes = target.shape[:2]
    output = output.reshape(batch_size, num_classes, -1).long()
    target = target.reshape(batch_size, num_classes, -1).long()
    if valid is None:
        total = output.size(2)
    else:
        valid = valid.reshape(batch_size, num_classes, -1).long()
        output, target = output * valid, target * valid
        total = valid.sum(2)

    tp = (output * target).sum(2)
    fp = output.sum(2) - tp
    fn = target.sum(2) - tp
    tn = total - (tp + fp + fn)
    return tp, fp, fn, tn


@torch.no_grad()
def _multiclass_stats(
    output: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None
) -> Stats:
    batch_size = output.size(0)
    output = output.reshape(batch_size, -1).long()
    target = target.reshape(batch_size, -1).long()
    valid = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        valid = target != ignore_index

    for name, values in (("output", output), ("target", target)):
        bad = valid & ((values < 0) | (values >= num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"{name} values should be in range 0..{num_classes - 1} (got "
                f"{values[bad].unique()[:10].tolist()}); pixels to skip must be marked in the "
                "target with `ignore_index`."
            )

    # One bincount over (image, class) pairs counts every image at once.
    offsets = torch.arange(batch_size, device=output.device).unsqueeze(1) * num_classes
    size = batch_size * num_classes

    def count(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.bincount((values + offsets)[mask], minlength=size).view(batch_size, -1)

    tp = count(target, valid & (output == target))
    fp = count(output, valid) - tp
    fn = count(target, valid) - tp
    tn = valid.sum(1, keepdim=True) - (tp + fp + fn)
    return tp, fp, fn, tn


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------


def _handle_zero_division(x: torch.Tensor, zero_division: str | float) -> torch.Tensor:
    """Replace the NaNs produced by ``0 / 0`` with ``zero_division`` (``"warn"`` -> 0 + warning)."""
    nans = torch.isnan(x)
    if zero_division == "warn":
        if bool(nans.any()):
            warnings.warn("Zero division in metric calculation!", stacklevel=4)
        zero_division = 0.0
    return torch.where(nans, torch.as_tensor(zero_division, dtype=x.dtype, device=x.device), x)


def _compute_metric(
    metric_fn: Callable[..., torch.Tensor],
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    tn: torch.Tensor,
    reduction: str | None = None,
    class_weights: list[float] | None = None,
    zero_division: str | float = "warn",
    **metric_kwargs,
) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` should be one of {list(_REDUCTIONS)}, got {reduction!r}.")
    if not (tp.shape == fp.shape == fn.shape == tn.shape):
        raise ValueError(
            "tp, fp, fn and tn must have the same shape, got "
            f"{[tuple(t.shape) for t in (tp, fp, fn, tn)]}."
        )
    if reduction not in ("micro", "none", None) and tp.dim() != 2:
        raise ValueError(
            f"reduction={reduction!r} needs (N, C) statistics, got shape {tuple(tp.shape)}."
        )

    def score_of(*stats: torch.Tensor) -> torch.Tensor:
        return _handle_zero_division(metric_fn(*stats, **metric_kwargs), zero_division)

    weights = None
    if reduction in ("weighted", "weighted-imagewise"):
        weights = _normalized_weights(class_weights, tp, reduction)

    if reduction == "micro":
        return score_of(tp.sum(), fp.sum(), fn.sum(), tn.sum())
    if reduction in ("macro", "weighted"):
        scores = score_of(tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0))
        return scores.mean() if weights is None else (scores * weights).sum()
    if reduction == "micro-imagewise":
        return score_of(tp.sum(1), fp.sum(1), fn.sum(1), tn.sum(1)).mean()
    scores = score_of(tp, fp, fn, tn)
    if reduction == "macro-imagewise":
        return scores.mean()
    if reduction == "weighted-imagewise":
        return (scores.mean(0) * weights).sum()
    return scores


def _normalized_weights(
    class_weights: Sequence[float] | None, tp: torch.Tensor, reduction: str
) -> torch.Tensor:
    if class_weights is None:
        raise ValueError(f"Class weights should be provided for `{reduction}` reduction.")
    weights = torch.as_tensor(class_weights, device=tp.device).float().reshape(-1)
    if weights.numel() != tp.size(-1):
        raise ValueError(f"Got {weights.numel()} class weights for {tp.size(-1)} classes.")
    total = weights.sum()
    if total == 0:
        raise ValueError("class_weights must not sum to zero.")
    return weights / total


# ------------------------------------------------------------------------------------------------
# Per-element formulas
# ------------------------------------------------------------------------------------------------


def _fbeta_score(tp, fp, fn, tn, beta=1.0):
    b2 = beta**2
    return (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)


def _iou_score(tp, fp, fn, tn):
    return tp / (tp + fp + fn)


def _accuracy(tp, fp, fn, tn):
    return (tp + tn) / (tp + fp + fn + tn)


def _sensitivity(tp, fp, fn, tn):
    return tp / (tp + fn)


def _specificity(tp, fp, fn, tn):
    return tn / (tn + fp)


def _balanced_accuracy(tp, fp, fn, tn):
    return (_sensitivity(tp, fp, fn, tn) + _specificity(tp, fp, fn, tn)) / 2


def _positive_predictive_value(tp, fp, fn, tn):
    return tp / (tp + fp)


def _negative_predictive_value(tp, fp, fn, tn):
    return tn / (tn + fn)


def _false_negative_rate(tp, fp, fn, tn):
    return 1 - _sensitivity(tp, fp, fn, tn)


def _false_positive_rate(tp, fp, fn, tn):
    return 1 - _specificity(tp, fp, fn, tn)


def _false_discovery_rate(tp, fp, fn, tn):
    return 1 - _positive_predictive_value(tp, fp, fn, tn)


def _false_omission_rate(tp, fp, fn, tn):
    return 1 - _negative_predictive_value(tp, fp, fn, tn)


def _positive_likelihood_ratio(tp, fp, fn, tn):
    return _sensitivity(tp, fp, fn, tn) / _false_positive_rate(tp, fp, fn, tn)


def _negative_likelihood_ratio(tp, fp, fn, tn):
    return _false_negative_rate(tp, fp, fn, tn) / _specificity(tp, fp, fn, tn)


# ------------------------------------------------------------------------------------------------
# Public metric functions
# ------------------------------------------------------------------------------------------------

_ARGS_DOC = """

    Args:
        tp: ``(N, C)`` true positive counts (from :func:`get_stats`).
        fp: ``(N, C)`` false positive counts.
        fn: ``(N, C)`` false negative counts.
        tn: ``(N, C)`` true negative counts.{extra}
        reduction: How to aggregate over images and classes:

            * ``"micro"``: sum the counts over images and classes, then compute one score.
            * ``"macro"``: sum over images, score each class, average the class scores.
            * ``"weighted"``: like ``"macro"`` but a ``class_weights``-weighted average.
            * ``"micro-imagewise"``: sum over classes, score each image, average the images.
            * ``"macro-imagewise"``: score every (image, class) pair, average everything.
            * ``"weighted-imagewise"``: score every (image, class) pair, then average over
              images and take the ``class_weights``-weighted average over classes.
            * ``"none"`` / ``None``: the ``(N, C)`` scores, unreduced.

            In binary mode (``C = 1``) micro = macro = weighted and the three imagewise
            reductions coincide.
        class_weights: One weight per class; required by (and only used by) the
            ``weighted*`` reductions. Normalised to sum to 1.
        zero_division: Value used where the score is ``0 / 0``. ``"warn"`` uses 0 and
            emits a warning.

    Returns:
        A scalar tensor, or the ``(N, C)`` scores for ``reduction`` ``"none"``/``None``.

    Raises:
        ValueError: On an unknown reduction, mismatched shapes, or missing / wrong-length
            ``class_weights`` for a weighted reduction.
"""


def _make_metric(name: str, formula: Callable[..., torch.Tensor], summary: str):
    """Build a public metric function with SMP's signature around ``formula``."""

    def metric(
        tp: torch.Tensor,
        fp: torch.Tensor,
        fn: torch.Tensor,
        tn: torch.Tensor,
        reduction: str | None = None,
        class_weights: list[float] | None = None,
        zero_division: str | float = 1.0,
    ) -> torch.Tensor:
        return _compute_metric(
            formula,
            tp,
            fp,
            fn,
            tn,
            reduction=reduction,
            class_weights=class_weights,
            zero_division=zero_division,
        )

    metric.__name__ = metric.__qualname__ = name
    metric.__module__ = __name__
    metric.__doc__ = summary + _ARGS_DOC.format(extra="")
    return metric


def fbeta_score(
    tp: torch.Tensor,
    fp: torch.Tensor,
    fn: torch.Tensor,
    tn: torch.Tensor,
    beta: float = 1.0,
    reduction: str | None = None,
    class_weights: list[float] | None = None,
    zero_division: str | float = 1.0,
) -> torch.Tensor:
    return _compute_metric(
        _fbeta_score,
        tp,
        fp,
        fn,
        tn,
        beta=beta,
        reduction=reduction,
        class_weights=class_weights,
        zero_division=zero_division,
    )


fbeta_score.__doc__ = (
    "F-beta score ``(1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP)``."
    + _ARGS_DOC.format(extra="\n        beta: Weight of recall relative to precision.")
)

f1_score = _make_metric(
    "f1_score", _fbeta_score, "F1 score (Dice coefficient) ``2 TP / (2 TP + FP + FN)``."
)
iou_score = _make_metric(
    "iou_score", _iou_score, "IoU score (Jaccard index) ``TP / (TP + FP + FN)``."
)
accuracy = _make_metric("accuracy", _accuracy, "Accuracy ``(TP + TN) / (TP + FP + FN + TN)``.")
sensitivity = _make_metric(
    "sensitivity",
    _sensitivity,
    "Sensitivity, recall, hit rate or true positive rate ``TP / (TP + FN)``.",
)
specificity = _make_metric(
    "specificity",
    _specificity,
    "Specificity, selectivity or true negative rate ``TN / (TN + FP)``.",
)
balanced_accuracy = _make_metric(
    "balanced_accuracy",
    _balanced_accuracy,
    "Balanced accuracy ``(sensitivity + specificity) / 2``.",
)
positive_predictive_value = _make_metric(
    "positive_predictive_value",
    _positive_predictive_value,
    "Precision or positive predictive value ``TP / (TP + FP)``.",
)
negative_predictive_value = _make_metric(
    "negative_predictive_value",
    _negative_predictive_value,
    "Negative predictive value ``TN / (TN + FN)``.",
)
false_negative_rate = _make_metric(
    "false_negative_rate",
    _false_negative_rate,
    "Miss rate or false negative rate ``1 - sensitivity``.",
)
false_positive_rate = _make_metric(
    "false_positive_rate",
    _false_positive_rate,
    "Fall-out or false positive rate ``1 - specificity``.",
)
false_discovery_rate = _make_metric(
    "false_discovery_rate",
    _false_discovery_rate,
    "False discovery rate ``1 - precision``.",
)
false_omission_rate = _make_metric(
    "false_omission_rate",
    _false_omission_rate,
    "False omission rate ``1 - negative predictive value``.",
)
positive_likelihood_ratio = _make_metric(
    "positive_likelihood_ratio",
    _positive_likelihood_ratio,
    "Positive likelihood ratio ``sensitivity / false positive rate``.",
)
negative_likelihood_ratio = _make_metric(
    "negative_likelihood_ratio",
    _negative_likelihood_ratio,
    "Negative likelihood ratio ``false negative rate / specificity``.",
)

# Aliases, as in SMP.
precision = positive_predictive_value
recall = sensitivity
