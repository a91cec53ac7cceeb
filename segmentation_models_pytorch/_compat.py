"""Every deprecated name, argument and alias of SMP that we keep working, in one place."""

from __future__ import annotations

import sys
import warnings
from types import ModuleType
from typing import Any, Dict, Iterable, MutableMapping, Optional, Tuple

# SMP <= 0.4 shipped hand-ported timm encoders under "timm-<name>"; they are now plain timm models.
_DEPRECATED_TIMM_PREFIXES = ("timm-regnet", "timm-res2", "timm-resnest", "timm-mobilenetv3", "timm-gernet")
# The same families, by timm model name, for remapping old checkpoints (see remap_state_dict).
_DEPRECATED_TIMM_MODEL_PREFIXES = ("regnet", "res2", "resnest", "mobilenetv3", "tf_mobilenetv3", "gernet")


def resolve_encoder_alias(name: str) -> str:
    """Map a deprecated ``timm-*`` encoder name to its ``tu-*`` equivalent (with a warning)."""
    if not name.startswith(_DEPRECATED_TIMM_PREFIXES):
        return name
    new = "tu-" + name[len("timm-") :]
    if "mobilenetv3" in new:
        new = new.replace("tu-", "tu-tf_", 1)  # SMP's ports used the TF-ported weights
    warnings.warn(
        f"Encoder name {name!r} is deprecated; use {new!r} (same network and weights, loaded through "
        "timm).",
        DeprecationWarning,
        stacklevel=3,
    )
    return new


def warn_timm_prefix(name: str) -> None:
    """SMP deprecates every ``timm-`` encoder in favour of ``tu-``; say so once per call site."""
    if name.startswith("timm-"):
        warnings.warn(
            "`timm-` encoders are deprecated; prefer the `tu-` equivalent (see the Timm encoders "
            "section of the docs).",
            DeprecationWarning,
            stacklevel=3,
        )


def pop_renamed_kwarg(kwargs: Dict[str, Any], old: str, new: str, value: Any) -> Any:
    """Return ``kwargs[old]`` (warning that ``new`` replaces it) if given, else ``value``."""
    old_value = kwargs.pop(old, None)
    if old_value is None:
        return value
    warnings.warn(
        f"The argument `{old}` is deprecated; use `{new}` instead.", DeprecationWarning, stacklevel=3
    )
    return old_value


def is_deprecated_timm_family(timm_model_name: Optional[str]) -> bool:
    """Whether a timm model belongs to a family SMP once shipped as a hand-ported ``timm-*`` encoder."""
    return bool(timm_model_name) and timm_model_name.startswith(_DEPRECATED_TIMM_MODEL_PREFIXES)


def _rename_old_timm_key(key: str, timm_model_name: str) -> str:
    # The old ports subclassed the timm network; the new encoder wraps it as ``model``, and timm's
    # feature extractor flattens gernet's ``stages`` Sequential into ``stages_<i>``.
    if "gernet" in timm_model_name:
        key = key.replace(".stages.", ".stages_")
    return key


def remap_state_dict(state_dict: MutableMapping[str, Any], timm_model_name: Optional[str]) -> Dict[str, Any]:
    """Rename keys of checkpoints saved with the old ``timm-*`` encoders to the ``tu-`` layout.

    Works on whole-model keys (``encoder.*``). Returns a new dict; the caller's mapping is left untouched.
    """
    out = dict(state_dict)
    if not is_deprecated_timm_family(timm_model_name):
        return out
    renamed = {}
    for key, value in out.items():
        new = key
        if key.startswith("encoder.") and not key.startswith("encoder.model."):
            new = "encoder.model." + key[len("encoder.") :]
        renamed[_rename_old_timm_key(new, timm_model_name)] = value
    return renamed


def remap_encoder_state_dict(
    state_dict: MutableMapping[str, Any], timm_model_name: Optional[str]
) -> Dict[str, Any]:
    """Like :func:`remap_state_dict`, for a state dict of the encoder alone (keys without ``encoder.``)."""
    out = dict(state_dict)
    if not is_deprecated_timm_family(timm_model_name):
        return out
    renamed = {}
    for key, value in out.items():
        new = key if key.startswith("model.") else "model." + key
        renamed[_rename_old_timm_key(new, timm_model_name)] = value
    return renamed


def alias_submodules(module_name: str, aliases: Iterable[str]) -> None:
    """Make ``<module>.<alias>`` importable, pointing at ``<module>`` itself.

    SMP splits each architecture into ``decoders/<arch>/{model,decoder}.py``; we keep one file per
    architecture, so ``from segmentation_models_pytorch.decoders.unet.model import Unet`` is served by
    registering these names in ``sys.modules``.
    """
    module: ModuleType = sys.modules[module_name]
    for alias in aliases:
        sys.modules[f"{module_name}.{alias}"] = module
        setattr(module, alias, module)


# Keyword arguments renamed between SMP versions: (old, new).
RENAMED_DECODER_KWARGS: Tuple[Tuple[str, str], ...] = (
    ("decoder_use_batchnorm", "decoder_use_norm"),
    ("psp_use_batchnorm", "decoder_use_norm"),
)
