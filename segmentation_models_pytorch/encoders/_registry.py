"""Typed shape of the encoder registry and the helpers families use to fill it.

The registry itself is the public dict ``segmentation_models_pytorch.encoders.encoders`` (SMP's seed
API): ``{name: {"encoder": cls, "pretrained_settings": {weights_name: setting}, "params": {...}}}``.
Users may add entries by hand; families add theirs through :func:`register`, which refuses
duplicates.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Type, TypedDict

from torch import nn


class PretrainedSetting(TypedDict, total=False):
    """Where one set of weights lives and how inputs must be normalised for it."""

    repo_id: str  # Hugging Face hub repository
    revision: str  # pinned commit of that repository
    filename: str  # file in the repository (default model.safetensors)
    url: str  # http(s):// or file:// URL (alternative to repo_id)
    sha256: str  # expected hash of the file at ``url``
    size: int  # expected size in bytes
    mean: List[float]
    std: List[float]
    input_space: str  # "RGB" or "BGR"
    input_range: List[float]  # [0, 1] or [0, 255]
    num_classes: int


class EncoderEntry(TypedDict):
    """One registry entry: the encoder class, its weights and its constructor parameters."""

    encoder: Type[nn.Module]
    pretrained_settings: Dict[str, PretrainedSetting]
    params: Dict[str, Any]


IMAGENET: PretrainedSetting = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "input_space": "RGB",
    "input_range": [0, 1],
}
HALF: PretrainedSetting = {  # Inception / TF-style models normalise to [-1, 1]
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "input_space": "RGB",
    "input_range": [0, 1],
}


def hub(
    repo_id: str, revision: str, preset: Optional[Mapping[str, Any]] = None, **extra: Any
) -> PretrainedSetting:
    """A setting for weights stored on the HF hub at a pinned revision."""
    setting: Dict[str, Any] = dict(preset if preset is not None else IMAGENET)
    setting.update(repo_id=repo_id, revision=revision, **extra)
    return setting  # type: ignore[return-value]


def register(
    registry: MutableMapping[str, EncoderEntry], entries: Mapping[str, EncoderEntry], family: str
) -> None:
    """Add a family's entries to ``registry``; a name registered twice is a programming error."""
    for name, entry in entries.items():
        if name in registry:
            raise RuntimeError(f"Encoder name {name!r} from family {family!r} is already registered.")
        missing = {"encoder", "pretrained_settings", "params"} - set(entry)
        if missing:
            raise RuntimeError(f"Encoder entry {name!r} of family {family!r} lacks {sorted(missing)}.")
        registry[name] = entry
