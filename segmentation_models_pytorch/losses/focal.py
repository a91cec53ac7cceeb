"""Focal loss (sigmoid form, applied one-vs-rest per class in the multi-class modes)."""

from __future__ import annotations

from functools import partial

import torch
from torch.nn.modules.loss import _Loss

from ._functional import check_mode, focal_loss_with_logits, to_tensor
from .constants import BINARY_MODE, MULTICLASS_MODE

__all__ = ["FocalLoss"]

_REDUCING = ("mean", "sum", "batchwise_mean")


class FocalLoss(_Loss):
    """Focal loss for binary, multiclass and multilabel segmentation.

    Every class is treated as an independent sigmoid (one-vs-rest) problem: in multiclass mode
    channel ``c`` is compared with ``y_true == c``. The per-class losses are averaged (optionally
    weighted by ``class_weights``).

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        alpha: Weight of the positive targets in ``[0, 1]``; ``None`` disables it.
        gamma: Focusing parameter (``0`` gives binary cross-entropy).
        ignore_index: Target value marking pixels that do not contribute to the loss.
        from_logits: If ``False``, ``y_pred`` holds per-class probabilities; they are clamped to
            ``[eps, 1 - eps]`` and mapped back to logits with the inverse sigmoid.
        eps: Clamping margin used when ``from_logits=False``.
        reduction: ``"mean"``, ``"sum"``, ``"batchwise_mean"`` or ``"none"``. In the
            multi-class modes the reduction is applied per class and the class losses are then
            averaged; ``"none"`` returns a loss map shaped like ``y_pred`` (0 at ignored
            pixels, class weights applied) -- in binary mode the 1-D loss of the non-ignored
            pixels.
        normalized: Normalise by the sum of the focal terms (https://arxiv.org/abs/1909.07829).
        reduced_threshold: Use the reduced focal loss (https://arxiv.org/abs/1903.01347).
        class_weights: Per-class weights of the average. Not supported in binary mode.

    Shape:
        - **y_pred**: ``(N, C, H, W)``.
        - **y_true**: ``(N, H, W)`` or ``(N, C, H, W)`` depending on the mode.

    Raises:
        ValueError: Unknown mode, or ``class_weights`` in binary mode.
    """

    def __init__(
        self,
        mode: str,
        alpha: float | None = None,
        gamma: float | None = 2.0,
        ignore_index: int | None = None,
        from_logits: bool = True,
        eps: float = 1e-7,
        reduction: str | None = "mean",
        normalized: bool = False,
        reduced_threshold: float | None = None,
        class_weights: list[float] | None = None,
    ):
        super().__init__()
        check_mode(mode, owner="FocalLoss")
        if class_weights is not None and mode == BINARY_MODE:
            raise ValueError("FocalLoss: class_weights are not supported with mode='binary'.")

        self.mode = mode
        self.from_logits = from_logits
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.eps = eps
        self.focal_loss_fn = partial(
            focal_loss_with_logits,
            alpha=alpha,
            gamma=gamma,
            reduced_threshold=reduced_threshold,
            reduction=reduction,
            normalized=normalized,
        )
        self.class_weights = (
            to_tensor(class_weights, dtype=torch.float) if class_weights is not None else None
        )

    def _check_shapes(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> None:
        if self.mode == MULTICLASS_MODE:
            # One class index per pixel: y_true has C times fewer elements than y_pred.
            ok = y_pred.dim() >= 2 and y_true.numel() * y_pred.size(1) == y_pred.numel()
        else:
            ok = y_true.numel() == y_pred.numel()
        if self.mode != BINARY_MODE:
            ok = ok and y_true.dim() >= 1 and y_true.size(0) == y_pred.size(0)
        if ok and self.class_weights is not None and self.class_weights.numel() != y_pred.size(1):
            raise ValueError(
                f"FocalLoss: got {self.class_weights.numel()} class_weights for "
                f"{y_pred.size(1)} classes."
            )
        if not ok:
            raise ValueError(
                f"FocalLoss (mode={self.mode!r}): shapes of y_pred {tuple(y_pred.shape)} and "
                f"y_true {tuple(y_true.shape)} do not match."
            )

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            y_pred: Logits (or probabilities if ``from_logits=False``), ``(N, C, H, W)``.
            y_true: Targets, ``(N, H, W)`` or ``(N, C, H, W)`` depending on the mode.

        Returns:
            The reduced loss.
        """
        self._check_shapes(y_pred, y_true)
        if not self.from_logits:
            # Inverse sigmoid, because every channel is scored as an independent sigmoid.
            y_pred = torch.clamp(y_pred, self.eps, 1 - self.eps)
            y_pred = torch.log(y_pred / (1 - y_pred))

        if self.mode == BINARY_MODE:
            y_pred = y_pred.reshape(-1)
            y_true = y_true.reshape(-1)
            if self.ignore_index is not None:
                keep = y_true != self.ignore_index
                y_pred, y_true = y_pred[keep], y_true[keep]
            return self.focal_loss_fn(y_pred, y_true)

        bs, num_classes = y_pred.size(0), y_pred.size(1)
        flat_pred = y_pred.reshape(bs, num_classes, -1)
        if self.mode == MULTICLASS_MODE:
            labels = y_true.reshape(bs, -1)
        else:
            labels = y_true.reshape(bs, num_classes, -1)
        reduce = self.reduction in _REDUCING

        per_class = []
        for cls in range(num_classes):
            if self.mode == MULTICLASS_MODE:
                cls_true, cls_raw = (labels == cls).long(), labels
            else:
                cls_true = cls_raw = labels[:, cls]
            cls_pred = flat_pred[:, cls]
            keep = None if self.ignore_index is None else cls_raw != self.ignore_index

            if reduce:
                if keep is not None:
                    cls_pred, cls_true = cls_pred[keep], cls_true[keep]
                per_class.append(self.focal_loss_fn(cls_pred, cls_true))
            else:
                per_class.append(self._unreduced(cls_pred, cls_true, keep))

        if not reduce:
            loss_map = torch.stack(per_class, dim=1)
            if self.class_weights is not None:
                weights = self.class_weights.to(loss_map.device, loss_map.dtype)
                loss_map = loss_map * weights.view(1, -1, 1)
            return loss_map.reshape(y_pred.shape)

        class_losses = torch.stack(per_class)
        if self.class_weights is None:
            return class_losses.mean()
        # "batchwise_mean" leaves one value per pixel; reduce each class to its mean first so
        # that the weighted average matches the unweighted one for equal weights.
        class_losses = class_losses.reshape(num_classes, -1).mean(1)
        weights = self.class_weights.to(class_losses.device, class_losses.dtype)
        return (class_losses * weights).sum() / weights.sum()

    def _unreduced(
        self, pred: torch.Tensor, true: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-pixel loss of one class with ignored pixels set to 0."""
        if keep is None:
            return self.focal_loss_fn(pred, true, reduction="none")
        values = self.focal_loss_fn(pred[keep], true[keep], reduction="none")
        return torch.zeros_like(pred).masked_scatter(keep, values)
