"""Dice loss, plus the shared machinery of the overlap-based (Dice/Jaccard/Tversky) losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from ._functional import check_mode, soft_dice_score, to_tensor
from .constants import BINARY_MODE, MULTICLASS_MODE

__all__ = ["DiceLoss"]


class _OverlapLoss(_Loss):
    """Common code of the losses built on a soft overlap score (Dice, Jaccard, Tversky).

    Subclasses provide :meth:`compute_score`; the score is computed per class over the whole
    batch (dims ``(0, 2)`` of the ``(N, C, H*W)`` view) and turned into ``1 - score`` or
    ``-log(score)``.
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
        super().__init__()
        name = type(self).__name__
        check_mode(mode, owner=name)
        if class_weights is not None and mode == BINARY_MODE:
            raise ValueError(f"{name}: class_weights are not supported with mode='binary'.")
        if classes is not None and mode == BINARY_MODE:
            raise ValueError(f"{name}: masking classes is not supported with mode='binary'.")

        self.mode = mode
        self.classes = to_tensor(classes, dtype=torch.long) if classes is not None else None
        self.from_logits = from_logits
        self.smooth = smooth
        self.eps = eps
        self.log_loss = log_loss
        self.ignore_index = ignore_index
        # A plain attribute (not a buffer) so state_dicts stay identical to SMP's.
        self.class_weights = (
            to_tensor(class_weights, dtype=torch.float) if class_weights is not None else None
        )

    def _activate(self, y_pred: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities (``exp(log_softmax)`` / ``exp(logsigmoid)`` for stability)."""
        if not self.from_logits:
            return y_pred
        if self.mode == MULTICLASS_MODE:
            return y_pred.log_softmax(dim=1).exp()
        return F.logsigmoid(y_pred).exp()

    def _check_shapes(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> None:
        name = type(self).__name__
        if y_pred.dim() < 2 or y_true.dim() < 1 or y_true.size(0) != y_pred.size(0):
            raise ValueError(
                f"{name}: y_pred and y_true must share the batch size (dim 0), got shapes "
                f"{tuple(y_pred.shape)} and {tuple(y_true.shape)}."
            )
        if self.mode == MULTICLASS_MODE:
            # Target holds one class index per pixel: (N, H, W), (N, 1, H, W) both accepted.
            ok = y_true.numel() * y_pred.size(1) == y_pred.numel()
            expected = "(N, *spatial) class indices for y_pred of shape (N, C, *spatial)"
        else:
            ok = y_true.numel() == y_pred.numel()
            expected = "as many elements as y_pred"
        if not ok:
            raise ValueError(
                f"{name} (mode={self.mode!r}): y_true must have {expected}; got y_pred "
                f"{tuple(y_pred.shape)} and y_true {tuple(y_true.shape)}."
            )

    def _flatten(
        self, y_pred: torch.Tensor, y_true: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring prediction and target to ``(N, C, P)`` with ignored pixels zeroed in both."""
        bs = y_true.size(0)
        if self.mode == MULTICLASS_MODE:
            num_classes = y_pred.size(1)
            y_pred = y_pred.reshape(bs, num_classes, -1)
            labels = y_true.reshape(bs, -1).long()
            if self.ignore_index is None:
                return y_pred, F.one_hot(labels, num_classes).permute(0, 2, 1)
            valid = (labels != self.ignore_index).unsqueeze(1)
            one_hot = F.one_hot(labels * valid.squeeze(1), num_classes).permute(0, 2, 1)
            return y_pred * valid, one_hot * valid

        channels = 1 if self.mode == BINARY_MODE else y_pred.size(1)
        y_pred = y_pred.reshape(bs, channels, -1)
        y_true = y_true.reshape(bs, channels, -1)
        if self.ignore_index is not None:
            valid = y_true != self.ignore_index
            y_pred = y_pred * valid
            y_true = y_true * valid
        return y_pred, y_true

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            y_pred: ``(N, C, H, W)`` logits (or probabilities if ``from_logits=False``).
            y_true: ``(N, H, W)`` class indices (multiclass), or 0/1 masks with as many
                elements as ``y_pred`` (binary/multilabel).

        Returns:
            Scalar loss.
        """
        self._check_shapes(y_pred, y_true)
        y_pred = self._activate(y_pred)
        y_pred, y_true = self._flatten(y_pred, y_true)
        dims = (0, 2)

        scores = self.compute_score(
            y_pred, y_true.type_as(y_pred), smooth=self.smooth, eps=self.eps, dims=dims
        )
        if self.log_loss:
            loss = -torch.log(scores.clamp_min(self.eps))
        else:
            loss = 1.0 - scores

        # The score is undefined for a class absent from the whole batch; such classes
        # contribute 0 instead of pushing the prediction towards an arbitrary value.
        present = y_true.sum(dims) > 0
        loss = loss * present.to(loss.dtype)

        if self.class_weights is not None and self.class_weights.numel() != loss.numel():
            raise ValueError(
                f"{type(self).__name__}: got {self.class_weights.numel()} class_weights for "
                f"{loss.numel()} classes."
            )
        if self.classes is not None:
            loss = loss[self.classes.to(loss.device)]
        return self.aggregate_loss(loss)

    def _weighted_mean(self, loss: torch.Tensor) -> torch.Tensor:
        """Mean of the per-class losses, weighted by ``class_weights`` when given."""
        if self.class_weights is None:
            return loss.mean()
        weights = self.class_weights.to(device=loss.device, dtype=loss.dtype)
        if self.classes is not None:
            weights = weights[self.classes.to(loss.device)]
        return (loss * weights).sum() / weights.sum()

    def aggregate_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Reduce the per-class losses ``(C,)`` to a scalar.

        Args:
            loss: Per-class losses.

        Returns:
            The (class-weighted) mean.
        """
        return self._weighted_mean(loss)

    def compute_score(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        smooth: float = 0.0,
        eps: float = 1e-7,
        dims: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Per-class overlap score; implemented by subclasses."""
        raise NotImplementedError


class DiceLoss(_OverlapLoss):
    """Dice loss for binary, multiclass and multilabel segmentation.

    The loss is ``1 - Dice`` (or ``-log(Dice)``), computed per class over the whole batch and
    averaged over the classes present in the target.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        classes: Indices of the classes included in the average (default: all).
            Not supported in binary mode.
        log_loss: Use ``-log(dice)`` instead of ``1 - dice``.
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
        """Soft Dice score of ``output`` against ``target`` reduced over ``dims``."""
        return soft_dice_score(output, target, smooth, eps, dims)
