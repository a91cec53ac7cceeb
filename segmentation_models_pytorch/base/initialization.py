"""Weight initialisation of decoders and heads (encoders keep their own or pretrained weights)."""

from __future__ import annotations

import math

import torch
from torch import nn

_NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


def fresh_channels_last(conv: nn.Module) -> None:
    """Give a conv new, uninitialised channels_last weight storage before it is (re)initialised.

    Models keep convolution weights in channels_last; allocating them that way when they are
    initialised anyway avoids copying every weight once more at the end of construction.
    """
    conv.weight.data = torch.empty_like(conv.weight, memory_format=torch.channels_last)


def _dense_view(w: torch.Tensor) -> torch.Tensor:
    """The same storage as a contiguous tensor: random fills on it take torch's fast path.

    Samples are i.i.d., so filling the NHWC view of a channels_last weight gives the same
    distribution as filling the NCHW tensor.
    """
    if w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        return w.permute(0, 2, 3, 1)
    return w


def kaiming_(w: torch.Tensor, mode: str = "fan_in", normal: bool = False) -> None:
    """He init for ReLU networks (same distribution as ``nn.init.kaiming_{normal,uniform}_``)."""
    std = nn.init.calculate_gain("relu") / math.sqrt(nn.init._calculate_correct_fan(w, mode))
    with torch.no_grad():
        if normal:
            _dense_view(w).normal_(0, std)
        else:
            bound = math.sqrt(3.0) * std
            _dense_view(w).uniform_(-bound, bound)


def xavier_uniform_(w: torch.Tensor) -> None:
    """Glorot uniform init (same distribution as ``nn.init.xavier_uniform_``)."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
    bound = math.sqrt(6.0 / float(fan_in + fan_out))
    with torch.no_grad():
        _dense_view(w).uniform_(-bound, bound)


def initialize_decoder(module: nn.Module) -> None:
    """He-uniform convolutions, unit norms, Xavier linears, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fresh_channels_last(m)
            kaiming_(m.weight, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def initialize_head(module: nn.Module) -> None:
    """Xavier-uniform convolutions and linears with zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Conv2d):
                fresh_channels_last(m)
            xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
