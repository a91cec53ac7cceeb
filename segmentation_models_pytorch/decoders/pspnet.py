"""PSPNet (Zhao et al., 2017): pyramid pooling over the deepest feature.

Blocks -> PSPDecoder -> PSPNet.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base import modules as md
from ..base.model import SegmentationModel, decoder_norm
from .fpn import head_upsampling


class PSPBlock(nn.Module):
    """Average-pool to ``pool_size`` x ``pool_size``, 1x1 conv, upsample back."""

    def __init__(
        self, in_channels: int, out_channels: int, pool_size: int, use_norm: md.NormSpec = "batchnorm"
    ) -> None:
        super().__init__()
        if pool_size == 1:
            use_norm = "identity"  # BatchNorm cannot normalise a single 1x1 value per channel
        self.pool_size = pool_size
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(output_size=(pool_size, pool_size)),
            md.Conv2dReLU(in_channels, out_channels, kernel_size=1, use_norm=use_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = self.pool(x)
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


class PSPModule(nn.Module):
    def __init__(
        self, in_channels: int, sizes: Sequence[int] = (1, 2, 3, 6), use_norm: md.NormSpec = "batchnorm"
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PSPBlock(in_channels, in_channels // len(sizes), size, use_norm=use_norm) for size in sizes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([block(x) for block in self.blocks] + [x], dim=1)


class PSPDecoder(nn.Module):
    def __init__(
        self,
        encoder_channels: Sequence[int],
        use_norm: md.NormSpec = "batchnorm",
        out_channels: int = 512,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        deepest = encoder_channels[-1]
        self.psp = PSPModule(deepest, sizes=(1, 2, 3, 6), use_norm=use_norm)
        self.conv = md.Conv2dReLU(deepest * 2, out_channels, kernel_size=1, use_norm=use_norm)
        self.dropout = nn.Dropout2d(p=dropout)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.dropout(self.conv(self.psp(features[-1])))


class PSPNet(SegmentationModel):
    """PSPNet: pyramid pooling on the deepest encoder feature.

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"``.
        encoder_weights: weights name, local path / state dict, or ``None``.
        encoder_depth: encoder stages used (1..5, default 3).
        psp_out_channels: channels after the pyramid pooling module.
        decoder_use_norm: decoder normalisation (see :class:`~segmentation_models_pytorch.Unet`).
        psp_dropout: spatial dropout after the pyramid pooling module.
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        upsampling: head up-sampling factor. The default 8 gives the input's size at every
            ``encoder_depth`` (SMP 0.6.0 scales by 8 at any depth); any other value is the literal
            factor, as in SMP.
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_weights: Optional[str] = "imagenet",
        encoder_depth: int = 3,
        psp_out_channels: int = 512,
        decoder_use_norm: Union[bool, str, Dict[str, Any]] = "batchnorm",
        psp_dropout: float = 0.2,
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        upsampling: int = 8,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        decoder_use_norm = decoder_norm(kwargs, decoder_use_norm)
        encoder = self.build_encoder(encoder_name, in_channels, encoder_depth, encoder_weights, **kwargs)
        self.decoder = self.build_decoder(
            PSPDecoder,
            encoder.out_channels,
            use_norm=decoder_use_norm,
            out_channels=psp_out_channels,
            dropout=psp_dropout,
        )
        head_scale = head_upsampling(upsampling, encoder.output_stride, default=8)
        self.build_heads(psp_out_channels, classes, activation, aux_params, 3, head_scale)
        self.name = f"psp-{encoder_name}"


_compat.alias_submodules(__name__, ("model", "decoder"))
