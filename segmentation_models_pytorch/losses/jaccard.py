"""Jaccard (IoU) loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._functional import soft_jaccard_score
from .dice import _OverlapLoss

__all__ = ["JaccardLoss"]


class JaccardLoss(_OverlapLoss):
    """Jaccard (soft IoU) loss for binary, multiclass and multilabel segmentation.

    The loss is ``1 - IoU`` (or ``-log(IoU)``), computed per class over the whole batch and
    averaged over the classes present in the target.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        classes: Indices of the classes included in the average (default: all).
            Not supported in binary mode.
        log_loss: Use ``-log(iou)`` instead of ``1 - iou``.
        from_logits: If ``True`` apply softmax (multiclass) or sigmoid (other modes) to
            ``y_pred`` first; otherwise ``y_pred`` must already be probabilities.
        smooth: Smoothing constant added to numerator and denominator.
        ignore_index: Target value marking pixels that do not contribute to the loss.
        eps: Lower bound of the denominator (and of the score before the log).
        class_weights: Per-class weights of the average (weights need not sum to 1).
            Not supported in binary mode.

    Shape:
        - **y_pred**: ``(N, C, H, W)``.
        - **y_true**: ``(N, H, W)`` or ``(N, C, H, W)`` depending on the mode.

    Raises:
        ValueError: Unknown mode, or ``classes``/``class_weights`` in binary mode.
    """

    def __init__(
        self,
        mode: str,
        classes: list[int] | None = None,
        log_loss: bool = False,
        from_logits: bool = True,
        smooth: float = 0.0,
        ignore_index: int | None = None,
        eps: float = 1e-7,
        class_weights: list[float] | None = None,
    ):
        super().__init__(
            mode, classes, log_loss, from_logits, smooth, ignore_index, eps, class_weights
        )

    def compute_score(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        smooth: float = 0.0,
        eps: float = 1e-7,
        dims: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Soft Jaccard score of ``output`` against ``target`` reduced over ``dims``."""
        return soft_jaccard_score(output, target, smooth, eps, dims)
