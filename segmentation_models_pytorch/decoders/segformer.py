"""SegFormer (Xie et al., 2021): an all-MLP decoder over a hierarchical encoder's features.

Blocks (MLP) -> SegformerDecoder -> Segformer. Every feature is projected by a per-pixel linear layer,
resized to 1/4 of the input, concatenated and fused by a 1x1 conv.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base import modules as md
from ..base.model import SegmentationModel


class MLP(nn.Module):
    """A linear layer applied to every pixel (channels -> ``segmentation_channels``)."""

    def __init__(self, skip_channels: int, segmentation_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(skip_channels, segmentation_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.linear(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).reshape(b, -1, h, w)


class SegformerDecoder(nn.Module):
    """One MLP per encoder feature (all but the input; a 0-channel stride-2 placeholder is skipped),
    resized to 1/4 of the input, concatenated (deepest first) and fused."""

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_depth: int = 5,
        segmentation_channels: int = 256,
    ) -> None:
        super().__init__()
        if encoder_depth < 3:
            raise ValueError(f"Segformer needs encoder_depth >= 3, got {encoder_depth}.")
        channels = [c for i, c in enumerate(encoder_channels) if i > 0 and not (i == 1 and c == 0)]
        self.mlp_stage = nn.ModuleList(MLP(c, segmentation_channels) for c in channels[::-1])
        self.fuse_stage = md.Conv2dReLU(
            len(channels) * segmentation_channels, segmentation_channels, kernel_size=1, use_norm="batchnorm"
        )

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        size = [features[0].shape[2] // 4, features[0].shape[3] // 4]
        used = features[2:] if features[1].shape[1] == 0 else features[1:]
        resized: List[torch.Tensor] = []
        for i, mlp in enumerate(self.mlp_stage):  # TorchScript: iterate the ModuleList itself
            resized.append(F.interpolate(mlp(used[-1 - i]), size=size, mode="bilinear", align_corners=False))
        return self.fuse_stage(torch.cat(resized, dim=1))


class Segformer(SegmentationModel):
    """SegFormer: a light all-MLP decoder, designed for Mix Transformer (``mit_b*``) encoders.

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"`` (``mit_b0`` ... ``mit_b5`` as in the
            paper; convolutional encoders work too).
        encoder_depth: encoder stages used (3..5).
        encoder_weights: weights name, local path / state dict, or ``None``.
        decoder_segmentation_channels: width of the MLP projections and of the decoder output.
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        upsampling: head up-sampling of the 1/4-resolution decoder output (4 gives the input size).
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        decoder_segmentation_channels: int = 256,
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        upsampling: int = 4,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        encoder = self.build_encoder(encoder_name, in_channels, encoder_depth, encoder_weights, **kwargs)
        self.decoder = self.build_decoder(
            SegformerDecoder,
            encoder_channels=encoder.out_channels,
            encoder_depth=encoder_depth,
            segmentation_channels=decoder_segmentation_channels,
        )
        self.build_heads(decoder_segmentation_channels, classes, activation, aux_params, 1, upsampling)
        self.name = f"segformer-{encoder_name}"


_compat.alias_submodules(__name__, ("model", "decoder"))
