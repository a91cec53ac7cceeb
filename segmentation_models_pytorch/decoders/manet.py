"""MA-Net (Fan et al., 2020): a Unet-like decoder with position-wise and multi-scale attention.

Blocks (PABBlock, MFABBlock, DecoderBlock) -> MAnetDecoder -> MAnet. Every block resizes to the
exact size of its skip, so any input size works without padding.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base import modules as md
from ..base import recompute
from ..base.model import SegmentationModel, decoder_norm
from .unet import _INTERPOLATIONS


class PABBlock(nn.Module):
    """Position-wise attention block: self-attention over all positions of the deepest feature."""

    def __init__(self, in_channels: int, pab_channels: int = 64) -> None:
        super().__init__()
        self.pab_channels = pab_channels
        self.in_channels = in_channels
        self.top_conv = nn.Conv2d(in_channels, pab_channels, kernel_size=1)
        self.center_conv = nn.Conv2d(in_channels, pab_channels, kernel_size=1)
        self.bottom_conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)
        self.map_softmax = nn.Softmax(dim=1)
        self.out_conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        keys = self.top_conv(x).flatten(2)  # (B, P, HW)
        queries = self.center_conv(x).flatten(2).transpose(1, 2)  # (B, HW, P)
        values = self.bottom_conv(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # One softmax over the whole HW x HW map (not per row), as the reference implementation does.
        attention = self.map_softmax(torch.bmm(queries, keys).reshape(b, -1)).reshape(b, h * w, h * w)
        # The (B, HW, C) result is reshaped to (B, C, H, W) without a transpose; trained checkpoints
        # depend on this exact layout.
        context = torch.bmm(attention, values).reshape(b, self.in_channels, h, w)
        return self.out_conv(x + context)


def _squeeze_excite(channels: int, reduced: int) -> nn.Sequential:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(channels, reduced, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(reduced, channels, 1),
        nn.Sigmoid(),
    )


class MFABBlock(recompute.ChainedConvPair, nn.Module):
    """Multi-scale fusion attention: the upsampled deep feature is re-weighted by channel attention
    computed from both itself and the skip, then fused with the skip."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        interpolation_mode: str = "nearest",
        use_norm: md.NormSpec = "batchnorm",
        reduction: int = 16,
    ) -> None:
        super().__init__()
        self.hl_conv = nn.Sequential(
            md.Conv2dReLU(in_channels, in_channels, kernel_size=3, padding=1, use_norm=use_norm),
            md.Conv2dReLU(in_channels, skip_channels, kernel_size=1, use_norm=use_norm),
        )
        reduced = max(1, skip_channels // reduction)
        self.SE_ll = _squeeze_excite(skip_channels, reduced)
        self.SE_hl = _squeeze_excite(skip_channels, reduced)
        # The deep feature, projected to the skip's width, is concatenated with the skip.
        self.conv1 = md.Conv2dReLU(
            2 * skip_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm
        )
        self.conv2 = md.Conv2dReLU(out_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm)
        self.interpolation_mode = interpolation_mode

    def forward(self, x: torch.Tensor, size: List[int], skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        # DecoderBlock's signature, so the decoder loop compiles under TorchScript.
        if skip is None:
            raise ValueError("MFABBlock needs a skip connection.")
        x = F.interpolate(self.hl_conv(x), size=size, mode=self.interpolation_mode)
        x = x * (self.SE_hl(x) + self.SE_ll(skip))
        return self._conv_pair(torch.cat([x, skip], dim=1))


class DecoderBlock(recompute.ChainedConvPair, nn.Module):
    """Upsample to the target size, concatenate the skip (if any), two 3x3 conv-norm-ReLU."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        interpolation_mode: str = "nearest",
        use_norm: md.NormSpec = "batchnorm",
    ) -> None:
        super().__init__()
        self.conv1 = md.Conv2dReLU(
            in_channels + skip_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm
        )
        self.conv2 = md.Conv2dReLU(out_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm)
        self.interpolation_mode = interpolation_mode

    def forward(self, x: torch.Tensor, size: List[int], skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode=self.interpolation_mode)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self._conv_pair(x)


class MAnetDecoder(nn.Module):
    """PAB on the deepest feature, then one MFAB per skip (a plain block where a skip has 0 channels)
    and a final plain block up to the input resolution."""

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        n_blocks: int = 5,
        reduction: int = 16,
        use_norm: md.NormSpec = "batchnorm",
        pab_channels: int = 64,
        interpolation_mode: str = "nearest",
    ) -> None:
        super().__init__()
        if n_blocks != len(decoder_channels):
            raise ValueError(
                f"decoder_channels must have one entry per encoder stage: encoder_depth={n_blocks} "
                f"but decoder_channels={tuple(decoder_channels)} has {len(decoder_channels)}."
            )
        if interpolation_mode not in _INTERPOLATIONS:
            raise ValueError(
                f"decoder_interpolation must be one of {_INTERPOLATIONS}, got {interpolation_mode!r}."
            )
        skips = list(encoder_channels[1:])[::-1]
        in_channels = [skips[0], *decoder_channels[:-1]]
        skip_channels = [*skips[1:], 0]
        self.center = PABBlock(skips[0], pab_channels=pab_channels)
        self.blocks = nn.ModuleList(
            MFABBlock(i, s, o, interpolation_mode, use_norm, reduction)
            if s > 0
            else DecoderBlock(i, s, o, interpolation_mode, use_norm)
            for i, s, o in zip(in_channels, skip_channels, decoder_channels)
        )

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        skips = features[1:][::-1]
        x = self.center(skips[0])
        for i, block in enumerate(self.blocks):
            if i + 1 < len(skips):
                skip = skips[i + 1]
                x = block(x, list(skip.shape[-2:]), skip)
            else:
                x = block(x, list(features[0].shape[-2:]))
        return x


class MAnet(SegmentationModel):
    """MA-Net: multi-scale attention network (position-wise attention + multi-scale fusion attention).

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"``.
        encoder_depth: number of encoder stages used (1..5); ``decoder_channels`` must have as many
            entries.
        encoder_weights: weights name, local path / state dict, or ``None``.
        decoder_use_norm: decoder normalisation: ``True``/``"batchnorm"``, ``False``/``"identity"``,
            ``"inplace"``, ``"groupnorm"``, ``"layernorm"``, ``"instancenorm"`` or a dict
            ``{"type": name, **kwargs}``.
        decoder_channels: output channels of each decoder block, deepest first.
        decoder_pab_channels: channels of the query/key projections of the position attention block.
        decoder_interpolation: up-sampling mode (``"nearest"``, ``"bilinear"``, ``"bicubic"``,
            ``"area"``, ``"nearest-exact"``).
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder.

    The position attention block builds an ``(H*W) x (H*W)`` map of the deepest feature, so memory
    grows with the fourth power of the input side.
    """

    requires_divisible_input_shape = False

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        decoder_use_norm: Union[bool, str, Dict[str, Any]] = "batchnorm",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_pab_channels: int = 64,
        decoder_interpolation: str = "nearest",
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
            MAnetDecoder,
            encoder_channels=encoder.out_channels,
            decoder_channels=decoder_channels,
            n_blocks=encoder_depth,
            use_norm=decoder_use_norm,
            pab_channels=decoder_pab_channels,
            interpolation_mode=decoder_interpolation,
        )
        self.build_heads(decoder_channels[-1], classes, activation, aux_params, kernel_size=3)
        self.name = f"manet-{encoder_name}"


_compat.alias_submodules(__name__, ("model", "decoder"))
