"""Encoder registry: ``encoders``, ``get_encoder`` and preprocessing helpers.

Importing this module imports only torch: each family file declares its entries with plain classes,
and third-party backbones (torchvision, timm, pretrainedmodels, efficientnet-pytorch) are imported
when an encoder of that family is built.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import json
import os
from typing import Any, Dict, List, Mapping, Union

import torch

from .._compat import _DEPRECATED_TIMM_PREFIXES, resolve_encoder_alias, warn_timm_prefix
from .._errors import unknown_name
from ..base import initialization as init
from . import _weights
from ._base import EncoderMixin
from ._preprocessing import preprocess_input
from ._registry import EncoderEntry, register

__all__ = [
    "encoders",
    "get_encoder",
    "get_encoder_names",
    "get_preprocessing_params",
    "get_preprocessing_fn",
    "EncoderMixin",
    "preprocess_input",
]

# One module per family; each exposes ``<family>_encoders`` (or ``ENCODERS``) for the registry.
_FAMILY_MODULES = (
    "resnet", "dpn", "vgg", "senet", "densenet", "inceptionresnetv2", "inceptionv4", "efficientnet",
    "mobilenet", "xception", "timm_efficientnet", "timm_sknet", "mix_transformer", "mobileone",
)

encoders: Dict[str, EncoderEntry] = {}
for _module_name in _FAMILY_MODULES:
    _module = importlib.import_module(f".{_module_name}", __name__)
    register(encoders, _module.ENCODERS, _module_name)

# SMP exposes each family's dict as ``smp.encoders.<family>_encoders``.
from .densenet import densenet_encoders  # noqa: E402
from .dpn import dpn_encoders  # noqa: E402
from .efficientnet import efficient_net_encoders  # noqa: E402
from .inceptionresnetv2 import inceptionresnetv2_encoders  # noqa: E402
from .inceptionv4 import inceptionv4_encoders  # noqa: E402
from .mix_transformer import mix_transformer_encoders  # noqa: E402
from .mobilenet import mobilenet_encoders  # noqa: E402
from .mobileone import mobileone_encoders  # noqa: E402
from .resnet import resnet_encoders  # noqa: E402
from .senet import senet_encoders  # noqa: E402
from .timm_efficientnet import timm_efficientnet_encoders  # noqa: E402
from .timm_sknet import timm_sknet_encoders  # noqa: E402
from .vgg import vgg_encoders  # noqa: E402
from .xception import xception_encoders  # noqa: E402


def is_equivalent_to_timm_universal(name: str) -> bool:
    """Whether ``name`` is one of SMP's deprecated ``timm-*`` encoders now served by ``tu-`` (SMP API)."""
    return name.startswith(_DEPRECATED_TIMM_PREFIXES)


_LAZY = {
    "TimmUniversalEncoder": ".timm_universal",
    "TimmViTEncoder": ".timm_vit",
}


def __getattr__(name: str) -> Any:
    # timm-backed classes load timm; import them only when asked for.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


WeightsArg = Union[None, bool, str, os.PathLike, Mapping[str, torch.Tensor]]


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    return value


def get_encoder(
    name: str,
    in_channels: int = 3,
    depth: int = 5,
    weights: WeightsArg = None,
    output_stride: int = 32,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build an encoder by registry name.

    Args:
        name: a registry name (see :func:`get_encoder_names`) or ``"tu-<timm model>[.<tag>]"``.
        in_channels: number of input channels; the first convolution is adapted when not 3.
        depth: number of down-sampling stages (1..5 for most encoders).
        weights: ``None``/``False`` for random init; a weights name from the entry's
            ``pretrained_settings`` (e.g. ``"imagenet"``); a local ``.safetensors``/``.pth`` path or
            ``file://`` URL; or a state dict. ``True`` picks ``"imagenet"`` (tu-: the tag's weights).
        output_stride: 32, or 16/8 to dilate the last stages (encoders that support it).
        **kwargs: passed to timm for ``tu-`` encoders; native encoders accept none.
    """
    if not isinstance(name, str):
        raise TypeError(f"encoder name must be a string, got {name!r}.")
    _check_int("in_channels", in_channels)
    _check_int("depth", depth)
    _check_int("output_stride", output_stride)
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be one of 8, 16, 32; got {output_stride}.")

    warn_timm_prefix(name)
    name = resolve_encoder_alias(name)
    if name.startswith("tu-"):
        from .timm_universal import build_timm_encoder

        return build_timm_encoder(
            name[3:], in_channels=in_channels, depth=depth, weights=weights,
            output_stride=output_stride, **kwargs,
        )

    if name not in encoders:
        raise unknown_name("encoder", name, encoders, "smp.encoders.get_encoder_names()")
    entry = encoders[name]
    cls = entry["encoder"]
    if kwargs:
        raise TypeError(
            f"get_encoder() got unexpected keyword arguments {sorted(kwargs)} for encoder {name!r}. "
            "Native encoders accept only in_channels, depth, weights and output_stride (extra "
            "keyword arguments are only forwarded to timm for 'tu-' encoders)."
        )
    min_depth = getattr(cls, "_min_depth", 1)
    max_depth = getattr(cls, "_max_depth", 5)
    if not min_depth <= depth <= max_depth:
        raise ValueError(
            f"Encoder {name!r} supports depth {min_depth}..{max_depth}, got depth={depth}."
        )
    if output_stride != 32 and isinstance(cls, type) and issubclass(cls, EncoderMixin):
        if cls.get_stages is EncoderMixin.get_stages:
            raise ValueError(
                f"Encoder {name!r} cannot be dilated, so output_stride={output_stride} is not "
                "supported (use 32, or an encoder that supports dilation such as resnet34)."
            )

    params = copy.deepcopy(entry["params"])
    params["depth"] = depth
    if "output_stride" in inspect.signature(cls).parameters or _accepts_var_kwargs(cls):
        params["output_stride"] = output_stride
    # Weights first: an unavailable file fails before the build, and a build whose every tensor the
    # strict load overwrites can skip drawing random values. Only for our own families, whose
    # constructors derive nothing else from those values: an encoder registered by hand is built
    # with its usual initialisation, even inside an outer skip_fills() (from_pretrained).
    state_dict, source = _resolve_weights(name, entry, weights)
    if not init.is_own(cls):
        building = init.drawn_fills()  # yields None: nothing skipped
    elif state_dict is not None:
        building = init.skip_fills()
    else:
        building = contextlib.nullcontext()
    with building as skipped:
        encoder = cls(**params)
    if state_dict is not None:
        _weights.load_into(encoder, state_dict, source)
    if skipped is not None:
        skipped.run_uncovered(encoder)
    encoder.set_in_channels(in_channels, pretrained=state_dict is not None)
    if output_stride != 32:
        encoder.make_dilated(output_stride)
    return encoder


def _accepts_var_kwargs(cls: type) -> bool:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _resolve_weights(name: str, entry: EncoderEntry, weights: WeightsArg):
    """Turn the ``weights`` argument into ``(state_dict or None, description)``."""
    if weights is None or weights is False:
        return None, ""
    settings = entry.get("pretrained_settings") or {}
    if isinstance(weights, Mapping) and not isinstance(weights, str):
        return _weights.unwrap_state_dict(weights), "the given state dict"
    if weights is True:
        if not settings:
            raise ValueError(f"Encoder {name!r} has no pretrained weights; use weights=None.")
        weights = "imagenet" if "imagenet" in settings else next(iter(settings))
    if isinstance(weights, str) and weights in settings:
        return _weights.fetch_setting(settings[weights]), f"{name} '{weights}' weights"
    if _weights.looks_like_path(weights):
        text = str(weights)
        if text.startswith("file://"):
            return _weights.read_state_dict(_weights.download_url(text)), text
        return _weights.read_state_dict(text), text
    raise unknown_name(
        f"weights for encoder {name!r}", weights, settings,
    )


def get_encoder_names() -> List[str]:
    """Names of all registered (native) encoders; any timm model is also usable as ``tu-<name>``."""
    return list(encoders.keys())


_PREPROCESSING_KEYS = ("input_space", "input_range", "mean", "std")


def get_preprocessing_params(encoder_name: str, pretrained: str = "imagenet") -> Dict[str, Any]:
    """Normalisation parameters (``input_space``, ``input_range``, ``mean``, ``std``) of some weights.

    Read from the registry (no network) for native encoders and from timm's pretrained config for
    ``tu-`` encoders. Settings registered by hand with only a hub ``repo_id`` fall back to the hub's
    ``config.json``.
    """
    encoder_name = resolve_encoder_alias(encoder_name)
    if encoder_name.startswith("tu-"):
        from .timm_universal import timm_preprocessing_params

        return timm_preprocessing_params(encoder_name[3:])
    if encoder_name not in encoders:
        raise unknown_name("encoder", encoder_name, encoders, "smp.encoders.get_encoder_names()")
    settings = encoders[encoder_name]["pretrained_settings"]
    if pretrained not in settings:
        raise unknown_name(f"weights for encoder {encoder_name!r}", pretrained, settings)
    setting: Mapping[str, Any] = settings[pretrained]
    if "mean" not in setting or "std" not in setting:
        if "repo_id" not in setting:
            raise ValueError(
                f"Pretrained setting {pretrained!r} of {encoder_name!r} has no mean/std."
            )
        path = _weights.hf_hub_file(setting["repo_id"], "config.json", setting.get("revision"))
        setting = {**json.loads(path.read_text()), **setting}
    return {
        "input_space": setting.get("input_space", "RGB"),
        "input_range": list(setting.get("input_range", [0, 1])),
        "mean": list(setting["mean"]),
        "std": list(setting["std"]),
    }


def get_preprocessing_fn(encoder_name: str, pretrained: str = "imagenet"):
    """A function normalising images (numpy HWC or torch NCHW) for ``encoder_name``'s weights."""
    params = get_preprocessing_params(encoder_name, pretrained=pretrained)
    return functools.partial(preprocess_input, **params)
