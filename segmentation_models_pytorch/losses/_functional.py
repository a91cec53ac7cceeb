"""Stateless building blocks shared by the loss modules.

Everything here works on plain tensors so it can also be used without the ``nn.Module`` wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .constants import BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE

__all__ = [
    "focal_loss_with_logits",
    "soft_dice_score",
    "soft_jaccard_score",
    "softmax_focal_loss_with_logits",
    "wing_loss",
]

_ALL_MODES = (BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE)


def check_mode(mode: str, allowed: Iterable[str] = _ALL_MODES, owner: str = "loss") -> str:
    """Validate a loss ``mode`` string.

    Args:
        mode: The mode passed by the user.
        allowed: Accepted modes.
        owner: Name used in the error message (usually the class name).

    Returns:
        The validated mode.

    Raises:
        ValueError: If ``mode`` is not one of ``allowed``.
    """
    allowed = tuple(allowed)
    if mode not in allowed:
        raise ValueError(
            f"{owner}: unsupported mode {mode!r}; expected one of {', '.join(map(repr, allowed))}."
        )
    return mode


def to_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Convert a tensor, NumPy array, list or tuple to a tensor (``None`` stays ``None``).

    Args:
        x: Value to convert.
        dtype: Optional dtype of the result.

    Returns:
        The converted tensor, or ``None`` for unsupported inputs (as SMP does).
    """
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    # ``torch.as_tensor`` understands NumPy arrays natively, so NumPy is never imported here.
    if isinstance(x, (list, tuple)) or type(x).__module__ == "numpy":
        return torch.as_tensor(x, dtype=dtype)
    return None


def _reduce(loss: torch.Tensor, reduction: str | None) -> torch.Tensor:
    """Apply one of the reductions understood by the focal functions."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchwise_mean":
        return loss.sum(0)
    return loss


def _focal_term(pt: torch.Tensor, gamma: float, reduced_threshold: float | None) -> torch.Tensor:
    """Modulating factor ``(1 - pt) ** gamma`` (or its "reduced" variant)."""
    if reduced_threshold is None:
        return (1.0 - pt).pow(gamma)
    # Reduced focal loss: easy examples (pt >= threshold) are down-weighted, the rest count fully.
    term = ((1.0 - pt) / reduced_threshold).pow(gamma)
    return torch.where(pt < reduced_threshold, torch.ones_like(term), term)


def focal_loss_with_logits(
    output: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    reduction: str | None = "mean",
    normalized: bool = False,
    reduced_threshold: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Binary (sigmoid) focal loss computed from logits.

    Args:
        output: Logits of any shape.
        target: Binary targets with the same shape as ``output``.
        gamma: Focusing parameter; ``0`` gives plain binary cross-entropy.
        alpha: Weight of the positive class in ``[0, 1]`` (negatives get ``1 - alpha``);
            ``None`` disables the class balancing.
        reduction: ``"mean"``, ``"sum"``, ``"batchwise_mean"`` (sum over dim 0) or
            ``"none"``.
        normalized: Divide by the sum of the focal terms (https://arxiv.org/abs/1909.07829).
        reduced_threshold: Use the reduced focal loss (https://arxiv.org/abs/1903.01347).
        eps: Lower bound of the normalization factor.

    Returns:
        The reduced loss.
    """
    target = target.to(dtype=output.dtype, device=output.device)
    logpt = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    pt = torch.exp(-logpt)
    focal_term = _focal_term(pt, gamma, reduced_threshold)
    loss = focal_term * logpt

    if alpha is not None:
        loss = loss * (alpha * target + (1.0 - alpha) * (1.0 - target))
    if normalized:
        loss = loss / focal_term.sum().clamp_min(eps)
    return _reduce(loss, reduction)


def softmax_focal_loss_with_logits(
    output: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    reduction: str | None = "mean",
    normalized: bool = False,
    reduced_threshold: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Softmax focal loss computed from logits.

    Args:
        output: Logits of shape ``(N, C, ...)``.
        target: Class indices of shape ``(N, ...)``.
        gamma: Focusing parameter.
        reduction: ``"mean"``, ``"sum"``, ``"batchwise_mean"`` or ``"none"``.
        normalized: Divide by the sum of the focal terms.
        reduced_threshold: Use the reduced focal loss.
        eps: Lower bound of the normalization factor.

    Returns:
        The reduced loss.
    """
    logpt = F.nll_loss(F.log_softmax(output, dim=1), target, reduction="none")
    pt = torch.exp(-logpt)
    focal_term = _focal_term(pt, gamma, reduced_threshold)
    loss = focal_term * logpt
    if normalized:
        loss = loss / focal_term.sum().clamp_min(eps)
    return _reduce(loss, reduction)


def _check_same_shape(output: torch.Tensor, target: torch.Tensor) -> None:
    if output.shape != target.shape:
        raise ValueError(
            f"output and target must have the same shape, got {tuple(output.shape)} and "
            f"{tuple(target.shape)}."
        )


def soft_tversky_score(
    output: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    smooth: float = 0.0,
    eps: float = 1e-7,
    dims: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Soft Tversky index ``(TP + s) / (TP + alpha * FP + beta * FN + s)``.

    The soft true positives are ``sum(min(output, target))``, written as
    ``(sum(output) + sum(target) - |output - target|_1) / 2`` so that soft (non-binary) targets
    are handled correctly (https://arxiv.org/abs/2303.16296). For binary targets this equals
    ``sum(output * target)``.

    Args:
        output: Predicted probabilities.
        target: Targets in ``[0, 1]``, same shape as ``output``.
        alpha: Weight of the false positives.
        beta: Weight of the false negatives.
        smooth: Added to numerator and denominator.
        eps: Lower bound of the denominator.
        dims: Dimensions to sum over; ``None`` sums over everything.

    Returns:
        The score, reduced over ``dims``.
    """
    _check_same_shape(output, target)
    if dims is None:
        output_sum = output.sum()
        target_sum = target.sum()
        l1 = torch.linalg.vector_norm(output - target, ord=1)
    else:
        output_sum = output.sum(dim=dims)
        target_sum = target.sum(dim=dims)
        l1 = torch.linalg.vector_norm(output - target, ord=1, dim=dims)

    tp = (output_sum + target_sum - l1) / 2
    fp = output_sum - tp
    fn = target_sum - tp
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth).clamp_min(eps)


def soft_dice_score(
    output: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 0.0,
    eps: float = 1e-7,
    dims: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Soft Dice coefficient, i.e. the Tversky index with ``alpha = beta = 0.5``."""
    return soft_tversky_score(output, target, 0.5, 0.5, smooth, eps, dims)


def soft_jaccard_score(
    output: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 0.0,
    eps: float = 1e-7,
    dims: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Soft Jaccard index (IoU), i.e. the Tversky index with ``alpha = beta = 1``."""
    return soft_tversky_score(output, target, 1.0, 1.0, smooth, eps, dims)


def wing_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    width: float = 5,
    curvature: float = 0.5,
    reduction: str | None = "mean",
) -> torch.Tensor:
    """Wing loss for regression (https://arxiv.org/abs/1711.06753).

    ``w * log(1 + |d| / curvature)`` for ``|d| < w``, ``|d| - C`` otherwise, where ``C`` makes
    the two pieces meet.

    Args:
        output: Predictions.
        target: Targets, same shape as ``output``.
        width: Width ``w`` of the non-linear part.
        curvature: Curvature of the non-linear part.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss.
    """
    diff = (target - output).abs()
    offset = width - width * math.log(1 + width / curvature)
    loss = torch.where(diff < width, width * torch.log1p(diff / curvature), diff - offset)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def label_smoothed_nll_loss(
    lprobs: torch.Tensor,
    target: torch.Tensor,
    epsilon: float | None,
    ignore_index: int | None = None,
    reduction: str | None = "mean",
    dim: int = -1,
) -> torch.Tensor:
    """Negative log-likelihood with label smoothing.

    The smoothed target puts ``1 - epsilon + epsilon / C`` on the true class and ``epsilon / C``
    on every other class, so the loss is ``(1 - epsilon) * nll + epsilon / C * sum_c(-lprobs_c)``.

    Unlike SMP 0.6.0, ``epsilon=None`` means no smoothing, ``"mean"`` averages over the
    non-ignored elements only (like ``torch.nn.CrossEntropyLoss``), and ``"none"`` always returns
    the target's shape.

    Args:
        lprobs: Log-probabilities (e.g. ``log_softmax`` output).
        target: Class indices; same shape as ``lprobs`` without ``dim`` (or with size 1 there).
        epsilon: Smoothing factor in ``[0, 1]``; ``None`` is treated as ``0``.
        ignore_index: Target value excluded from the loss.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        dim: Class dimension of ``lprobs``.

    Returns:
        The reduced loss.
    """
    epsilon = 0.0 if epsilon is None else float(epsilon)
    if target.dim() == lprobs.dim() - 1:
        target = target.unsqueeze(dim)
    target = target.long()

    keep = None
    if ignore_index is not None:
        ignored = target == ignore_index
        keep = ~ignored
        # Any valid index works for gather; ignored positions are zeroed right after.
        target = target.masked_fill(ignored, 0)

    nll = -lprobs.gather(dim=dim, index=target)
    smooth = -lprobs.sum(dim=dim, keepdim=True)
    if keep is not None:
        nll = nll.masked_fill(~keep, 0.0)
        smooth = smooth.masked_fill(~keep, 0.0)
    nll = nll.squeeze(dim)
    smooth = smooth.squeeze(dim)

    if reduction == "sum":
        nll, smooth = nll.sum(), smooth.sum()
    elif reduction == "mean":
        if keep is None:
            nll, smooth = nll.mean(), smooth.mean()
        else:
            # Average over the elements that actually contribute; 0 when everything is ignored.
            count = keep.sum().clamp_min(1).to(nll.dtype)
            nll, smooth = nll.sum() / count, smooth.sum() / count

    return (1.0 - epsilon) * nll + (epsilon / lprobs.size(dim)) * smooth
