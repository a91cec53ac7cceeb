"""Segmentation models with pretrained backbones, API-compatible with SMP 0.6.0.

Importing the package loads only torch; architectures, encoders, losses and metrics are imported on
first use (``smp.Unet``, ``smp.losses``...), and third-party backbones only when an encoder of theirs
is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, Optional

from .__version__ import __version__

# Public name -> module that defines it (imported on first access).
_ARCHITECTURES = {
    "Unet": "unet",
    "UnetPlusPlus": "unetplusplus",
    "MAnet": "manet",
    "Linknet": "linknet",
    "FPN": "fpn",
    "PSPNet": "pspnet",
    "DeepLabV3": "deeplabv3",
    "DeepLabV3Plus": "deeplabv3",
    "PAN": "pan",
    "UPerNet": "upernet",
    "Segformer": "segformer",
    "DPT": "dpt",
}
_SUBMODULES = ("encoders", "decoders", "losses", "metrics", "base", "utils", "datasets", "inference")
_OTHER = {"from_pretrained": ".base.hub_mixin", "optimize_for_inference": ".optimize"}

__all__ = [
    *_SUBMODULES[:5],
    "datasets",
    *_ARCHITECTURES,
    "inference",
    "from_pretrained",
    "optimize_for_inference",
    "create_model",
    "MODEL_ARCHITECTURES_MAPPING",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .base.hub_mixin import from_pretrained  # noqa: F401
    from .decoders.deeplabv3 import DeepLabV3, DeepLabV3Plus  # noqa: F401
    from .decoders.dpt import DPT  # noqa: F401
    from .decoders.fpn import FPN  # noqa: F401
    from .decoders.linknet import Linknet  # noqa: F401
    from .decoders.manet import MAnet  # noqa: F401
    from .decoders.pan import PAN  # noqa: F401
    from .decoders.pspnet import PSPNet  # noqa: F401
    from .decoders.segformer import Segformer  # noqa: F401
    from .decoders.unet import Unet  # noqa: F401
    from .decoders.unetplusplus import UnetPlusPlus  # noqa: F401
    from .decoders.upernet import UPerNet  # noqa: F401
    from .optimize import optimize_for_inference  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _ARCHITECTURES:
        module = importlib.import_module(f".decoders.{_ARCHITECTURES[name]}", __name__)
        value = getattr(module, name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _OTHER:
        value = getattr(importlib.import_module(_OTHER[name], __name__), name)
    elif name == "MODEL_ARCHITECTURES_MAPPING":
        value = {arch.lower(): __getattr__(arch) for arch in _ARCHITECTURES}
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def create_model(
    arch: str,
    encoder_name: str = "resnet34",
    encoder_weights: Optional[str] = "imagenet",
    in_channels: int = 3,
    classes: int = 1,
    **kwargs: Any,
):
    """Build any architecture by name, e.g. ``create_model("unet", "resnet34", classes=3)``.

    ``arch`` is case-insensitive (``"Unet"``, ``"unetplusplus"``, ``"deeplabv3plus"``...).
    """
    from ._errors import unknown_name

    mapping: Dict[str, Any] = __getattr__("MODEL_ARCHITECTURES_MAPPING")
    if not isinstance(arch, str) or arch.lower() not in mapping:
        raise unknown_name("architecture", arch, mapping)
    return mapping[arch.lower()](
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=classes,
        **kwargs,
    )
