"""Cross-entropy with label smoothing and ``ignore_index``."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._functional import label_smoothed_nll_loss

__all__ = ["SoftCrossEntropyLoss"]


class SoftCrossEntropyLoss(nn.Module):
    """Drop-in replacement for :class:`torch.nn.CrossEntropyLoss` with label smoothing.

    The smoothed target puts ``1 - s + s / C`` on the true class and ``s / C`` elsewhere.

    Args:
        reduction: ``"mean"`` (over the non-ignored elements), ``"sum"`` or ``"none"``.
        smooth_factor: Smoothing factor ``s`` in ``[0, 1]``; ``None`` (the default) means no
            smoothing (SMP 0.6.0 raises a ``TypeError`` for ``None``).
        ignore_index: Target value to ignore; ``None`` disables it.
        dim: Class dimension of ``y_pred``.

    Shape:
        - **y_pred**: ``(N, C, H, W)`` logits.
        - **y_true**: ``(N, H, W)`` class indices.
    """

    __constants__: ClassVar[list[str]] = ["reduction", "ignore_index", "smooth_factor"]

    def __init__(
        self,
        reduction: str = "mean",
        smooth_factor: float | None = None,
        ignore_index: int | None = -100,
        dim: int = 1,
    ):
        super().__init__()
        self.smooth_factor = smooth_factor
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.dim = dim

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            y_pred: Logits with classes along ``dim``.
            y_true: Class indices, shaped like ``y_pred`` without ``dim``.

        Returns:
            The reduced loss (per-element loss of shape ``y_true`` for ``reduction="none"``).
        """
        d = self.dim % y_pred.dim()
        without_dim = tuple(y_pred.shape[:d]) + tuple(y_pred.shape[d + 1 :])
        with_unit_dim = tuple(y_pred.shape[:d]) + (1,) + tuple(y_pred.shape[d + 1 :])
        if tuple(y_true.shape) not in (without_dim, with_unit_dim):
            raise ValueError(
                f"SoftCrossEntropyLoss: y_true must have shape {without_dim} (class indices for "
                f"y_pred of shape {tuple(y_pred.shape)} with classes along dim {self.dim}), got "
                f"{tuple(y_true.shape)}."
            )
        log_prob = F.log_softmax(y_pred, dim=self.dim)
        return label_smoothed_nll_loss(
            log_prob,
            y_true,
            epsilon=self.smooth_factor,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            dim=self.dim,
        )
