"""Shared helpers for the encoders built on the ``pretrainedmodels`` package.

That package is imported only when such an encoder is built: importing it loads all of its models
(seconds) and its old code emits ``SyntaxWarning``/``DeprecationWarning`` noise on first compile.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from torch import nn


def backend(module: str) -> ModuleType:
    """Import ``pretrainedmodels.models.<module>`` quietly, with a clear error when it is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(f"pretrainedmodels.models.{module}")
    except ImportError as err:
        raise ImportError(
            f"This encoder needs the 'pretrainedmodels' package ({err}); install it with "
            "`pip install pretrainedmodels`."
        ) from err


def pad_for_halving(module: nn.Module) -> None:
    """Give every 3x3 convolution and max pooling padding 1, so stride-2 ones halve sizes exactly.

    Inception-style networks use unpadded ("valid") stride-2 layers; SMP pads them so each stage's
    feature is exactly half the previous one and decoders can align skips.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            m.padding = (1, 1)
        if isinstance(m, nn.MaxPool2d):
            m.padding = (1, 1)
