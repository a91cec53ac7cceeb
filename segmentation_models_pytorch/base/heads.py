"""Heads shared by every architecture: the segmentation head and the optional classification head."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from .modules import Activation

ActivationArg = Union[None, str, Callable]


class SegmentationHead(nn.Sequential):
    """Conv to ``out_channels`` classes, optional bilinear up-sampling, then the activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        activation: ActivationArg = None,
        upsampling: float = 1,
    ) -> None:
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"classes must be a positive integer, got {out_channels!r}.")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2)
        up = (
            nn.Upsample(scale_factor=upsampling, mode="bilinear", align_corners=True)
            if upsampling > 1
            else nn.Identity()
        )
        super().__init__(conv, up, Activation(activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self[0](x)
        if not torch.jit.is_scripting():
            if isinstance(self[1], nn.Upsample):
                # The model hands back a contiguous (NCHW) mask anyway, and resizing a few class
                # maps is 4-6x faster in NCHW than in channels_last plus the copy to NCHW after it
                # on CPU (21 classes, 4x32x32 -> 256x256: 3.5 vs 21 ms).
                x = x.contiguous()
        return self[2](self[1](x))


class ClassificationHead(nn.Sequential):
    """Global pooling -> dropout -> linear on the deepest encoder feature (``aux_params``)."""

    def __init__(
        self,
        in_channels: int,
        classes: int,
        pooling: str = "avg",
        dropout: Optional[float] = 0.2,
        activation: ActivationArg = None,
    ) -> None:
        if pooling not in ("avg", "max"):
            raise ValueError(f"aux_params pooling must be 'avg' or 'max', got {pooling!r}.")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise ValueError(f"aux_params classes must be a positive integer, got {classes!r}.")
        if dropout is not None and not 0 <= dropout < 1:
            raise ValueError(f"aux_params dropout must be in [0, 1), got {dropout!r}.")
        pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        drop = nn.Dropout(p=dropout, inplace=True) if dropout else nn.Identity()
        super().__init__(pool, nn.Flatten(), drop, nn.Linear(in_channels, classes), Activation(activation))
