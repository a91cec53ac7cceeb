"""Linknet (Chaurasia & Culurciello, 2017): a light decoder that adds, rather than concatenates, skips.

Blocks -> LinknetDecoder -> Linknet.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import _compat
from ..base import modules as md
from ..base import recompute
from ..base.model import SegmentationModel, decoder_norm


class TransposeX2(md.ConvNormAct):
    """Stride-2 transposed convolution, norm, ReLU: doubles the resolution."""

    def __init__(self, in_channels: int, out_channels: int, use_norm: md.NormSpec = "batchnorm") -> None:
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1),
            md.get_norm_layer(use_norm, out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderBlock(nn.Module):
    """1x1 squeeze to a quarter of the channels, x2 transposed conv, 1x1 expand; then add the skip."""

    def __init__(self, in_channels: int, out_channels: int, use_norm: md.NormSpec = "batchnorm") -> None:
        super().__init__()
        mid = in_channels // 4
        self.block = nn.Sequential(
            md.Conv2dReLU(in_channels, mid, kernel_size=1, use_norm=use_norm),
            TransposeX2(mid, mid, use_norm=use_norm),
            md.Conv2dReLU(mid, out_channels, kernel_size=1, use_norm=use_norm),
        )

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = self.block(x)
        else:
            x = self._chained_block(x)
        if skip is not None and skip.shape[1] != 0:
            x = x + skip
        return x

    @torch.jit.unused
    def _chained_block(self, x):
        """``self.block(x)``; in a training forward only the three convolution outputs are kept."""
        return recompute.conv_norm_act_stack(x, list(self.block))


class LinknetDecoder(nn.Module):
    def __init__(
        self,
        encoder_channels: Sequence[int],
        prefinal_channels: int = 32,
        n_blocks: int = 5,
        use_norm: md.NormSpec = "batchnorm",
    ) -> None:
        super().__init__()
        channels = [*list(encoder_channels[1:])[::-1], prefinal_channels]
        # A 0-channel placeholder (no stride-2 stage) keeps the previous width: nothing to add there.
        for i in range(1, len(channels) - 1):
            if channels[i] == 0:
                channels[i] = channels[i - 1]
        self.blocks = nn.ModuleList(
            DecoderBlock(channels[i], channels[i + 1], use_norm=use_norm) for i in range(n_blocks)
        )

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        skips = features[1:][::-1]
        x = skips[0]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i + 1] if i + 1 < len(skips) else None)
        return x


class Linknet(SegmentationModel):
    """Linknet: encoder + residual-style decoder, very fast.

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"``.
        encoder_depth: number of encoder stages used (1..5).
        encoder_weights: weights name, local path / state dict, or ``None``.
        decoder_use_norm: decoder normalisation (see :class:`~segmentation_models_pytorch.Unet`).
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        decoder_use_norm: Union[bool, str, Dict[str, Any]] = "batchnorm",
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        decoder_use_norm = decoder_norm(kwargs, decoder_use_norm)
        encoder = self.build_encoder(encoder_name, in_channels, encoder_depth, encoder_weights, **kwargs)
        self.decoder = self.build_decoder(
            LinknetDecoder,
            encoder.out_channels,
            prefinal_channels=32,
            n_blocks=encoder_depth,
            use_norm=decoder_use_norm,
        )
        self.build_heads(32, classes, activation, aux_params, kernel_size=1)
        self.name = f"link-{encoder_name}"


_compat.alias_submodules(__name__, ("model", "decoder"))
