"""Deployment utilities: ONNX export with a numerical check, TorchScript and ``torch.export``.

``onnx``/``onnxruntime`` are imported only when an export runs.

SMP 0.6.0's ``smp.utils`` held a deprecated training toolkit (``smp.utils.train``, ``.losses``,
``.metrics``) that this package does not ship; asking for those names explains what replaces them.
"""

from __future__ import annotations

from typing import Any

from .export import (
    DEFAULT_OPSET,
    CapabilityError,
    check_onnx,
    export_onnx,
    export_program,
    onnx_compatible,
    require_capability,
    script_model,
    static_axes,
)

__all__ = [
    "DEFAULT_OPSET",
    "CapabilityError",
    "check_onnx",
    "export_onnx",
    "export_program",
    "onnx_compatible",
    "require_capability",
    "script_model",
    "static_axes",
]

_REMOVED = {
    "train": "write the loop yourself (see examples/) or use a trainer such as PyTorch Lightning",
    "losses": "use smp.losses (DiceLoss, JaccardLoss, FocalLoss, ...) or torch.nn losses",
    "metrics": "use smp.metrics (get_stats + iou_score, f1_score, accuracy, ...)",
    "functional": "use smp.metrics (get_stats + iou_score, f1_score, accuracy, ...)",
    "meter": "average values yourself or use torchmetrics",
    "base": "subclass torch.nn.Module",
}


def __getattr__(name: str) -> Any:
    if name in _REMOVED:
        raise AttributeError(
            f"segmentation_models_pytorch.utils.{name} (SMP's deprecated training toolkit) is not "
            f"provided by this package: {_REMOVED[name]}."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
