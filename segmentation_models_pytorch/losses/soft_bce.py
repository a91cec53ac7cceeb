"""Binary cross-entropy with logits, plus ``ignore_index`` and label smoothing."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftBCEWithLogitsLoss"]


class SoftBCEWithLogitsLoss(nn.Module):
    """Drop-in replacement for :class:`torch.nn.BCEWithLogitsLoss` with extras.

    Adds ``ignore_index`` (pixels whose target equals it do not contribute) and label
    smoothing (targets ``t`` become ``t * (1 - s) + (1 - t) * s``).

    With ``reduction="mean"`` the loss is averaged over the non-ignored elements only
    (SMP 0.6.0 divides by the total number of elements, ignored ones included).

    Args:
        weight: Manual rescaling weight broadcast to the loss (as in ``BCEWithLogitsLoss``).
        ignore_index: Target value to ignore; ``None`` disables it.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        smooth_factor: Label smoothing factor ``s`` in ``[0, 1]``; ``None`` disables it.
        pos_weight: Weight of the positive examples (as in ``BCEWithLogitsLoss``).

    Shape:
        - **y_pred**: any shape, e.g. ``(N, 1, H, W)``.
        - **y_true**: same shape as ``y_pred``.
    """

    __constants__: ClassVar[list[str]] = [
        "weight",
        "pos_weight",
        "reduction",
        "ignore_index",
        "smooth_factor",
    ]

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int | None = -100,
        reduction: str = "mean",
        smooth_factor: float | None = None,
        pos_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.smooth_factor = smooth_factor
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            y_pred: Logits.
            y_true: Binary (or soft) targets with the same shape as ``y_pred``.

        Returns:
            The reduced loss (or the per-element loss for ``reduction="none"``, 0 at ignored
            positions).
        """
        if y_pred.shape != y_true.shape:
            raise ValueError(
                f"SoftBCEWithLogitsLoss: y_pred {tuple(y_pred.shape)} and y_true "
                f"{tuple(y_true.shape)} must have the same shape."
            )
        targets = y_true.to(y_pred.dtype)
        if self.smooth_factor is not None:
            targets = (1 - targets) * self.smooth_factor + targets * (1 - self.smooth_factor)

        loss = F.binary_cross_entropy_with_logits(
            y_pred, targets, self.weight, pos_weight=self.pos_weight, reduction="none"
        )

        keep = None
        if self.ignore_index is not None:
            keep = y_true != self.ignore_index
            loss = loss * keep.to(loss.dtype)

        if self.reduction == "mean":
            if keep is None:
                return loss.mean()
            # Only the non-ignored elements count; an all-ignored batch gives 0, not NaN.
            return loss.sum() / keep.sum().clamp_min(1).to(loss.dtype)
        if self.reduction == "sum":
            return loss.sum()
        return loss
