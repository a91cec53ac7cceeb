"""Tversky loss (a Dice loss with separate weights for false positives and false negatives)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._functional import soft_tversky_score
from .dice import DiceLoss

__all__ = ["TverskyLoss"]


class TverskyLoss(DiceLoss):
    """Tversky loss for binary, multiclass and multilabel segmentation.

    The Tversky index ``TP / (TP + alpha * FP + beta * FN)`` generalises Dice
    (``alpha = beta = 0.5``) and Jaccard (``alpha = beta = 1``). The aggregated loss is raised
    to the power ``gamma`` (``gamma > 1`` gives the "focal Tversky" loss).

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        classes: Indices of the classes included in the average (default: all).
            Not supported in binary mode.
        log_loss: Use ``-log(tversky)`` instead of ``1 - tversky``.
        from_logits: If ``True`` apply softmax (multiclass) or sigmoid (other modes) first.
        smooth: Smoothing constant added to numerator and denominator.
        ignore_index: Target value marking pixels that do not contribute to the loss.
        eps: Lower bound of the denominator (and of the score before the log).
        alpha: Weight of the false positives.
        beta: Weight of the false negatives.
        gamma: Exponent applied to the aggregated loss.
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
        alpha: float = 0.5,
        beta: float = 0.5,
        gamma: float = 1.0,
        class_weights: list[float] | None = None,
    ):
        super().__init__(
            mode, classes, log_loss, from_logits, smooth, ignore_index, eps, class_weights
        )
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma

    def aggregate_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """(Class-weighted) mean of the per-class losses, raised to the power ``gamma``."""
        return self._weighted_mean(loss) ** self.gamma

    def compute_score(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        smooth: float = 0.0,
        eps: float = 1e-7,
        dims: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Soft Tversky score of ``output`` against ``target`` reduced over ``dims``."""
        return soft_tversky_score(output, target, self.alpha, self.beta, smooth, eps, dims)
