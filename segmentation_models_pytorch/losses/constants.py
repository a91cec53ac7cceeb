"""Names of the three segmentation problem types the losses understand."""

#: One foreground class. Prediction ``(N, 1, H, W)``; target ``(N, H, W)`` or ``(N, 1, H, W)``
#: with values 0 (background) and 1 (foreground).
BINARY_MODE: str = "binary"

#: ``C`` mutually exclusive classes. Prediction ``(N, C, H, W)``; target ``(N, H, W)`` holding
#: class indices ``0..C-1``.
MULTICLASS_MODE: str = "multiclass"

#: ``C`` independent (possibly overlapping) classes. Prediction and target ``(N, C, H, W)``; each
#: target channel holds 0 or 1.
MULTILABEL_MODE: str = "multilabel"
