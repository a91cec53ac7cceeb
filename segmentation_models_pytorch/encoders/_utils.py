"""Small surgery helpers for encoders: first-conv patching and stride-to-dilation."""

from __future__ import annotations

import torch
from torch import nn


def find_first_conv(model: nn.Module, in_channels: int = 3) -> nn.Conv2d:
    """Return the first ``Conv2d`` (in module order) that takes ``in_channels`` inputs."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == in_channels:
            return module
    raise ValueError(
        f"{type(model).__name__} has no Conv2d with {in_channels} input channels to adapt; "
        "override set_in_channels() for this encoder."
    )


def patch_first_conv(
    model: nn.Module, new_in_channels: int, default_in_channels: int = 3, pretrained: bool = True
) -> None:
    """Give the model's first convolution ``new_in_channels`` inputs.

    Pretrained kernels are reused: 1 channel -> their sum over RGB; N channels -> the RGB kernels
    cycled over the N inputs and scaled by ``default_in_channels / N``. Without pretrained weights the
    new kernel is freshly initialised.
    """
    if new_in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {new_in_channels}.")
    conv = find_first_conv(model, default_in_channels)
    old = conv.weight.detach()
    conv.in_channels = new_in_channels
    shape = (conv.out_channels, new_in_channels // conv.groups, *conv.kernel_size)
    if not pretrained:
        conv.weight = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device))
        conv.reset_parameters()
        return
    if new_in_channels == 1:
        new = old.sum(dim=1, keepdim=True)
    else:
        index = torch.arange(new_in_channels, device=old.device) % default_in_channels
        new = old[:, index] * (default_in_channels / new_in_channels)
    conv.weight = nn.Parameter(new.contiguous())


def replace_strides_with_dilation(module: nn.Module, dilation_rate: int) -> None:
    """Turn every strided convolution of ``module`` into a dilated stride-1 one (same padding)."""
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            mod.stride = (1, 1)
            mod.dilation = (dilation_rate, dilation_rate)
            kh, kw = mod.kernel_size
            mod.padding = ((kh // 2) * dilation_rate, (kw // 2) * dilation_rate)
            # efficientnet-pytorch's "same"-padding convs carry a static pad that must go.
            if hasattr(mod, "static_padding"):
                mod.static_padding = nn.Identity()
