"""Matthews correlation coefficient loss."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

__all__ = ["MCCLoss"]


class MCCLoss(_Loss):
    """``1 - MCC`` for binary segmentation, from soft confusion-matrix counts.

    The counts are summed over the whole batch; ``eps`` is added to each of them so the
    coefficient stays defined when one class is missing. Inputs are probabilities (apply a
    sigmoid to logits first).

    Reference: Abhishek & Hamarneh, "Matthews Correlation Coefficient Loss for Deep
    Convolutional Networks: Application to Skin Lesion Segmentation", ISBI 2021.

    Args:
        eps: Value added to TP, TN, FP and FN.

    Shape:
        - **y_pred**: ``(N, 1, H, W)`` or ``(N, H, W)`` probabilities.
        - **y_true**: same number of elements as ``y_pred``, values in ``{0, 1}``.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """Compute ``1 - MCC``.

        Args:
            y_pred: Predicted foreground probabilities.
            y_true: Binary ground truth.

        Returns:
            Scalar loss.
        """
        if y_pred.numel() != y_true.numel() or y_true.size(0) != y_pred.size(0):
            raise ValueError(
                f"MCCLoss: y_pred {tuple(y_pred.shape)} and y_true {tuple(y_true.shape)} must "
                "have the same batch size and number of elements."
            )
        y_pred = y_pred.reshape(-1)
        y_true = y_true.reshape(-1).to(y_pred.dtype)

        tp = (y_pred * y_true).sum() + self.eps
        tn = ((1 - y_pred) * (1 - y_true)).sum() + self.eps
        fp = (y_pred * (1 - y_true)).sum() + self.eps
        fn = ((1 - y_pred) * y_true).sum() + self.eps

        numerator = tp * tn - fp * fn
        denominator = torch.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return 1.0 - numerator / denominator
