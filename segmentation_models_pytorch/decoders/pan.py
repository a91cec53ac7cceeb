"""PAN (Li et al., 2018): Pyramid Attention Network.

Blocks (ConvBnRelu, FPABlock, GAUBlock) -> PANDecoder -> PAN. A feature pyramid attention block on
the deepest feature, then global attention up-sampling blocks down to stride 4.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base.model import SegmentationModel, feature_strides
from .deeplabv3 import check_dilatable, check_output_stride, check_pooled_norm
from .fpn import head_upsampling
from .unet import _INTERPOLATIONS


class ConvBnRelu(nn.Module):
    """Conv (with bias), BatchNorm, optional ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        add_relu: bool = True,
        interpolate: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias,
            groups=groups,
        )
        self.activation = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(out_channels)
        self.add_relu = add_relu
        self.interpolate = interpolate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if self.add_relu:
            x = self.activation(x)
        if self.interpolate:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return x


class PooledConvBnRelu(ConvBnRelu):
    """ConvBnRelu applied to a globally pooled (1x1) map: says clearly when BatchNorm cannot work."""

    def __init__(self, *args: Any, where: str = "PAN", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if not torch.jit.is_scripting():  # TorchScript cannot pass modules to helpers
            check_pooled_norm(self.bn, y, self.where)
        y = self.bn(y)
        return self.activation(y) if self.add_relu else y


class HalvingMaxPool2d(nn.MaxPool2d):
    """2x2 max pooling that never returns an empty map.

    On maps of at least 2x2 it is exactly ``MaxPool2d(2, 2)``; a side of 1 is kept at 1 (ceil mode)
    instead of vanishing, so the pyramid also works when the deepest feature is smaller than 8x8.
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ceil_mode exactly when a side is 1, written without branching on sizes (pad by the ceil
        # amount with -inf) so traced and exported graphs stay valid for every input size.
        h, w = x.shape[-2], x.shape[-1]
        tiny = (1 // h + 1 // w + 1) // 2  # 1 if a side is 1, else 0
        x = F.pad(x, [0, tiny * (w % 2), 0, tiny * (h % 2)], value=float("-inf"))
        return F.max_pool2d(x, 2, 2)


class FPABlock(nn.Module):
    """Feature pyramid attention: a 3-level U-shaped attention map (7x7, 5x5, 3x3 convolutions)
    multiplies a 1x1 projection of the feature; a global-pooling branch is added."""

    def __init__(self, in_channels: int, out_channels: int, upscale_mode: str = "bilinear") -> None:
        super().__init__()
        self.upscale_mode = upscale_mode
        self.align_corners = upscale_mode == "bilinear"
        self.branch1 = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), PooledConvBnRelu(in_channels, out_channels, 1, where="PAN's FPA block")
        )
        self.mid = nn.Sequential(ConvBnRelu(in_channels, out_channels, 1))
        self.down1 = nn.Sequential(HalvingMaxPool2d(), ConvBnRelu(in_channels, 1, 7, padding=3))
        self.down2 = nn.Sequential(HalvingMaxPool2d(), ConvBnRelu(1, 1, 5, padding=2))
        self.down3 = nn.Sequential(
            HalvingMaxPool2d(), ConvBnRelu(1, 1, 3, padding=1), ConvBnRelu(1, 1, 3, padding=1)
        )
        self.conv2 = ConvBnRelu(1, 1, 5, padding=2)
        self.conv1 = ConvBnRelu(1, 1, 7, padding=3)

    def _resize(self, x: torch.Tensor, size: List[int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode=self.upscale_mode, align_corners=self.align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = list(x.shape[-2:])
        global_context = self._resize(self.branch1(x), size)
        middle = self.mid(x)
        x1 = self.down1(x)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        # Each level is resized to the next finer one (h//4, h//2 in SMP: the same sizes for maps of
        # at least 8x8, and still consistent below that).
        attention = self.conv2(x2) + self._resize(x3, list(x2.shape[-2:]))
        attention = self.conv1(x1) + self._resize(attention, list(x1.shape[-2:]))
        return self._resize(attention, size) * middle + global_context


class GAUBlock(nn.Module):
    """Global attention up-sampling: the high-level feature, globally pooled, gates the low-level one."""

    def __init__(self, in_channels: int, out_channels: int, interpolation_mode: str = "bilinear") -> None:
        super().__init__()
        self.interpolation_mode = interpolation_mode
        self.align_corners = True if interpolation_mode == "bilinear" else None
        self.conv1 = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            PooledConvBnRelu(out_channels, out_channels, 1, add_relu=False, where="PAN's GAU block"),
            nn.Sigmoid(),
        )
        self.conv2 = ConvBnRelu(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``: low-level feature, ``y``: high-level feature."""
        y_up = F.interpolate(
            y, size=x.shape[-2:], mode=self.interpolation_mode, align_corners=self.align_corners
        )
        return y_up + self.conv2(x) * self.conv1(y)


class PANDecoder(nn.Module):
    """FPA on the deepest feature, then GAU blocks for the stride-16 (depth 5), 8 (depth >= 4) and 4
    features."""

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_depth: int,
        decoder_channels: int,
        interpolation_mode: str = "bilinear",
    ) -> None:
        super().__init__()
        if encoder_depth < 3:
            raise ValueError(f"PAN needs encoder_depth >= 3, got {encoder_depth}.")
        if interpolation_mode not in _INTERPOLATIONS:
            raise ValueError(
                f"decoder_interpolation must be one of {_INTERPOLATIONS}, got {interpolation_mode!r}."
            )
        channels = list(encoder_channels[2:])
        self.fpa = FPABlock(channels[-1], decoder_channels)
        if encoder_depth == 5:
            self.gau3 = GAUBlock(channels[2], decoder_channels, interpolation_mode)
        if encoder_depth >= 4:
            self.gau2 = GAUBlock(channels[1], decoder_channels, interpolation_mode)
        self.gau1 = GAUBlock(channels[0], decoder_channels, interpolation_mode)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        features = features[2:]
        out = self.fpa(features[-1])
        if hasattr(self, "gau3"):
            out = self.gau3(features[2], out)
        if hasattr(self, "gau2"):
            out = self.gau2(features[1], out)
        return self.gau1(features[0], out)


class PAN(SegmentationModel):
    """PAN: Pyramid Attention Network.

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"``.
        encoder_depth: encoder stages used (3..5).
        encoder_weights: weights name, local path / state dict, or ``None``.
        encoder_output_stride: 16 (the last stage is dilated; the encoder must support dilation) or 32.
        decoder_channels: channels of the decoder blocks.
        decoder_interpolation: up-sampling mode of the GAU blocks (``"bilinear"``, ``"nearest"``, ...).
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        upsampling: head up-sampling of the stride-4 decoder output (4 gives the input size).
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder (``upscale_mode`` is the deprecated name of
            ``decoder_interpolation``).

    Any input size works: inputs are padded to a multiple of the encoder's output stride, and the
    pyramid attention block also works on deepest features smaller than 8x8 (SMP 0.6.0 fails there,
    i.e. below 128x128 inputs at output stride 16). In training mode the global-pooling branches need
    a batch of at least 2 (BatchNorm on a 1x1 map); batch size 1 raises a clear error.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        encoder_output_stride: int = 16,
        decoder_channels: int = 32,
        decoder_interpolation: str = "bilinear",
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        upsampling: int = 4,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if encoder_output_stride not in (16, 32) or isinstance(encoder_output_stride, bool):
            raise ValueError(f"PAN supports encoder_output_stride 16 or 32, got {encoder_output_stride!r}.")
        decoder_interpolation = _compat.pop_renamed_kwarg(
            kwargs, "upscale_mode", "decoder_interpolation", decoder_interpolation
        )
        check_dilatable(
            "PAN", encoder_name, encoder_output_stride, "Use encoder_output_stride=32 with this encoder."
        )
        encoder = self.build_encoder(
            encoder_name,
            in_channels,
            encoder_depth,
            encoder_weights,
            output_stride=encoder_output_stride,
            **kwargs,
        )
        check_output_stride("PAN", encoder, encoder_output_stride)
        self.decoder = self.build_decoder(
            PANDecoder,
            encoder_channels=encoder.out_channels,
            encoder_depth=encoder_depth,
            decoder_channels=decoder_channels,
            interpolation_mode=decoder_interpolation,
        )
        head_scale = head_upsampling(upsampling, feature_strides(encoder)[2], default=4)
        self.build_heads(decoder_channels, classes, activation, aux_params, 3, head_scale)
        self.name = f"pan-{encoder_name}"


_compat.alias_submodules(__name__, ("model", "decoder"))
