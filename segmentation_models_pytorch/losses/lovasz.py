"""Lovász losses: convex surrogates of the Jaccard loss.

Reference: Berman, Rannen Triki, Blaschko, "The Lovász-Softmax loss: A tractable surrogate for
the optimization of the intersection-over-union measure in neural networks", CVPR 2018
(https://arxiv.org/abs/1705.08790).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from ._functional import check_mode
from .constants import MULTICLASS_MODE

__all__ = ["LovaszLoss"]


def _lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss (Alg. 1 of the paper).

    Args:
        fg_sorted: Float foreground indicators ``(P, ...)``, ordered by decreasing error along
            dim 0.

    Returns:
        ``jaccard_loss(first k errors) - jaccard_loss(first k - 1 errors)`` for every ``k``.
    """
    total = fg_sorted.sum(0, keepdim=True)
    intersection = total - fg_sorted.cumsum(0)
    union = total + (1.0 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.diff(jaccard, dim=0, prepend=torch.zeros_like(jaccard[:1]))


def _lovasz_extension(errors: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Lovász extension of the Jaccard loss evaluated at ``errors``, column-wise.

    Args:
        errors: Non-negative errors ``(P,)`` or ``(P, C)``.
        fg: Foreground indicators with the same shape.

    Returns:
        Scalar (or ``(C,)``) loss.
    """
    errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
    grad = _lovasz_grad(torch.gather(fg, 0, perm))
    return (errors_sorted * grad).sum(0)


def _hinge_flat(margins: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary Lovász hinge of 1-D logits against 1-D {0, 1} labels."""
    if labels.numel() == 0:
        return margins.sum() * 0.0  # keeps the graph connected with a zero gradient
    signs = 2.0 * labels - 1.0
    return _lovasz_extension(F.relu(1.0 - margins * signs), labels)


def _sigmoid_flat(probas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász extension of 1-D foreground probabilities against 1-D {0, 1} labels."""
    if labels.numel() == 0:
        return probas.sum() * 0.0
    return _lovasz_extension((labels - probas).abs(), labels)


def _softmax_flat(probas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász-Softmax of ``(P, C)`` probabilities, averaged over the classes present in labels."""
    if labels.numel() == 0:
        return probas.sum() * 0.0
    classes = torch.arange(probas.size(1), device=labels.device)
    fg = (labels.unsqueeze(1) == classes).to(probas.dtype)
    per_class = _lovasz_extension((fg - probas).abs(), fg)
    # Averaging over the present classes without a host sync: absent classes get weight 0.
    present = (fg.sum(0) > 0).to(probas.dtype)
    return (per_class * present).sum() / present.sum().clamp_min(1.0)


def _drop_ignored(
    scores: torch.Tensor, labels: torch.Tensor, ignore: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if ignore is None:
        return scores, labels
    keep = labels != ignore
    return scores[keep], labels[keep]


def _binary_lovasz(
    flat_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scores: torch.Tensor,
    labels: torch.Tensor,
    per_image: bool,
    ignore: int | None,
) -> torch.Tensor:
    """Apply ``flat_fn`` to the whole batch or to each image (then average)."""

    def one(s: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        s, lab = _drop_ignored(s.reshape(-1), lab.reshape(-1), ignore)
        return flat_fn(s, lab.to(s.dtype))

    if not per_image:
        return one(scores, labels)
    return torch.stack([one(s, lab) for s, lab in zip(scores, labels)]).mean()


def _multiclass_lovasz(
    probas: torch.Tensor, labels: torch.Tensor, per_image: bool, ignore: int | None
) -> torch.Tensor:
    """Lovász-Softmax of ``(N, C, ...)`` probabilities against ``(N, ...)`` labels."""

    def one(p: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        p = torch.movedim(p, 1, -1).reshape(-1, p.size(1))  # (N, C, ...) -> (P, C)
        p, lab = _drop_ignored(p, lab.reshape(-1), ignore)
        return _softmax_flat(p, lab)

    if not per_image:
        return one(probas, labels)
    return torch.stack([one(p[None], lab) for p, lab in zip(probas, labels)]).mean()


class LovaszLoss(_Loss):
    """Lovász loss for binary, multiclass and multilabel segmentation.

    * binary / multilabel: the Lovász hinge on the logits. In multilabel mode all channels are
      pooled into one binary problem (as in SMP).
    * multiclass: the Lovász-Softmax loss, averaged over the classes present in the target.

    With ``from_logits=False`` the input is taken as probabilities:

    * multiclass: the softmax is skipped and ``y_pred`` is used as the class probabilities;
    * binary / multilabel: the hinge (which needs unbounded margins) is replaced by the Lovász
      extension of the Jaccard loss evaluated at the errors ``|y_true - y_pred|`` -- the
      single-class ("sigmoid") variant of Lovász-Softmax. Its gradients stay bounded even for
      saturated probabilities, unlike mapping probabilities back to logits.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        per_image: Compute the loss for every image and average, instead of over the batch.
        ignore_index: Target value marking pixels that do not contribute to the loss.
        from_logits: Whether ``y_pred`` holds logits (default) or probabilities.

    Shape:
        - **y_pred**: ``(N, C, H, W)``.
        - **y_true**: ``(N, H, W)`` or ``(N, C, H, W)`` depending on the mode.

    Raises:
        ValueError: Unknown mode.
    """

    def __init__(
        self,
        mode: str,
        per_image: bool = False,
        ignore_index: int | None = None,
        from_logits: bool = True,
    ):
        super().__init__()
        check_mode(mode, owner="LovaszLoss")
        self.mode = mode
        self.ignore_index = ignore_index
        self.per_image = per_image
        self.from_logits = from_logits

    def _check_shapes(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> None:
        if self.mode == MULTICLASS_MODE:
            ok = y_pred.dim() >= 2 and y_true.numel() * y_pred.size(1) == y_pred.numel()
        else:
            ok = y_pred.dim() >= 1 and y_true.numel() == y_pred.numel()
        ok = ok and y_true.dim() >= 1 and y_true.size(0) == y_pred.size(0)
        if not ok:
            raise ValueError(
                f"LovaszLoss (mode={self.mode!r}): shapes of y_pred {tuple(y_pred.shape)} and "
                f"y_true {tuple(y_true.shape)} do not match."
            )

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            y_pred: Logits (or probabilities if ``from_logits=False``), ``(N, C, H, W)``.
            y_true: Targets, ``(N, H, W)`` or ``(N, C, H, W)`` depending on the mode.

        Returns:
            Scalar loss.
        """
        self._check_shapes(y_pred, y_true)
        if self.mode == MULTICLASS_MODE:
            probas = y_pred.softmax(dim=1) if self.from_logits else y_pred
            labels = y_true.reshape(y_true.size(0), -1)
            return _multiclass_lovasz(probas, labels, self.per_image, self.ignore_index)

        flat_fn = _hinge_flat if self.from_logits else _sigmoid_flat
        return _binary_lovasz(flat_fn, y_pred, y_true, self.per_image, self.ignore_index)
