"""UPerNet (Xiao et al., 2018): pyramid pooling on the deepest feature plus an FPN, fused at stride 4.

Blocks (PSPModule, FPNLateralBlock) -> UPerNetDecoder -> UPerNet.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base import modules as md
from ..base.model import SegmentationModel, decoder_norm, feature_strides
from .deeplabv3 import check_pooled_norm
from .fpn import head_upsampling


class PyramidPoolingBranch(nn.Sequential):
    """Adaptive average pooling to ``size`` x ``size`` then a 1x1 conv-norm-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, size: int, use_norm: md.NormSpec) -> None:
        conv = md.Conv2dReLU(in_channels, out_channels, kernel_size=1, use_norm=use_norm)
        if size == 1 and isinstance(conv[1], nn.InstanceNorm2d):
            # InstanceNorm cannot normalise one value per channel (SMP 0.6.0 always fails here); the
            # 1x1 branch goes without it, as PSPNet's does for every norm.
            conv = md.Conv2dReLU(in_channels, out_channels, kernel_size=1, use_norm="identity")
        super().__init__(nn.AdaptiveAvgPool2d(size), conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[1][0](self[0](x))  # pool, conv (indexed, not unpacked: TorchScript)
        if not torch.jit.is_scripting():  # TorchScript cannot pass modules to helpers
            check_pooled_norm(self[1][1], y, "UPerNet's pyramid pooling module")
        return self[1][2](self[1][1](y))


class PSPModule(nn.Module):
    """Pool the feature at several grid sizes, resize back, concatenate with it, 3x3 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        sizes: Sequence[int] = (1, 2, 3, 6),
        use_norm: md.NormSpec = "batchnorm",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PyramidPoolingBranch(in_channels, out_channels, size, use_norm) for size in sizes
        )
        # Always BatchNorm here, whatever decoder_use_norm says (as in SMP 0.6.0).
        fused = in_channels + len(sizes) * out_channels
        self.out_conv = md.Conv2dReLU(fused, out_channels, kernel_size=3, padding=1, use_norm="batchnorm")

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        size = feature.shape[-2:]
        pyramid = [feature]
        for block in self.blocks:
            pyramid.append(F.interpolate(block(feature), size=size, mode="bilinear", align_corners=False))
        return self.out_conv(torch.cat(pyramid, dim=1))


class FPNLateralBlock(nn.Module):
    """1x1 conv-norm-ReLU on the lateral feature, plus the coarser level resized to it."""

    def __init__(self, lateral_channels: int, out_channels: int, use_norm: md.NormSpec = "batchnorm") -> None:
        super().__init__()
        self.conv_norm_relu = md.Conv2dReLU(lateral_channels, out_channels, kernel_size=1, use_norm=use_norm)

    def forward(self, state_feature: torch.Tensor, lateral_feature: torch.Tensor) -> torch.Tensor:
        lateral = self.conv_norm_relu(lateral_feature)
        state = F.interpolate(state_feature, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return state + lateral


class UPerNetDecoder(nn.Module):
    """LayerNorm on every feature from stride 4 on, PSP on the deepest, top-down FPN, fusion at
    stride 4."""

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_depth: int = 5,
        decoder_channels: int = 256,
        use_norm: md.NormSpec = "batchnorm",
    ) -> None:
        super().__init__()
        if encoder_depth < 3:
            raise ValueError(f"UPerNet needs encoder_depth >= 3, got {encoder_depth}.")
        channels = list(encoder_channels[2:])  # stride 4 and deeper
        self.feature_norms = nn.ModuleList(md.LayerNorm2d(c, eps=1e-6) for c in channels)
        self.psp = PSPModule(channels[-1], decoder_channels, sizes=(1, 2, 3, 6), use_norm=use_norm)
        laterals = channels[:-1][::-1]
        self.fpn_lateral_blocks = nn.ModuleList(
            FPNLateralBlock(c, decoder_channels, use_norm=use_norm) for c in laterals
        )
        self.fpn_conv_blocks = nn.ModuleList(
            md.Conv2dReLU(decoder_channels, decoder_channels, kernel_size=3, padding=1, use_norm=use_norm)
            for _ in laterals
        )
        fused = (len(laterals) + 1) * decoder_channels
        self.fusion_block = md.Conv2dReLU(fused, decoder_channels, 3, padding=1, use_norm=use_norm)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        # Indexed loops over the ModuleLists: TorchScript cannot zip them with lists.
        normed: List[torch.Tensor] = []
        for i, norm in enumerate(self.feature_norms):
            normed.append(norm(features[2 + i]))
        levels = [self.psp(normed[-1])]  # deepest first
        for i, block in enumerate(self.fpn_lateral_blocks):
            levels.append(block(levels[-1], normed[len(normed) - 2 - i]))
        for i, conv in enumerate(self.fpn_conv_blocks):
            levels[i + 1] = conv(levels[i + 1])
        size = levels[-1].shape[-2:]  # stride 4
        resized = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in levels]
        return self.fusion_block(torch.cat(resized[::-1], dim=1))


class UPerNet(SegmentationModel):
    """UPerNet: unified perceptual parsing network (PSP + FPN decoder).

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"``.
        encoder_depth: encoder stages used (3..5).
        encoder_weights: weights name, local path / state dict, or ``None``.
        decoder_channels: channels of the pyramid and FPN levels.
        decoder_use_norm: decoder normalisation: ``True``/``"batchnorm"``, ``False``/``"identity"``,
            ``"inplace"``, ``"groupnorm"``, ``"layernorm"``, ``"instancenorm"`` or a dict
            ``{"type": name, **kwargs}`` (the PSP output conv always uses BatchNorm).
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        upsampling: head up-sampling of the stride-4 decoder output (4 gives the input size).
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder.

    In training mode with BatchNorm the 1x1 pyramid-pooling branch needs a batch of at least 2;
    batch size 1 raises a clear error (use e.g. ``decoder_use_norm="groupnorm"`` to train with it).
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        decoder_channels: int = 256,
        decoder_use_norm: Union[bool, str, Dict[str, Any]] = "batchnorm",
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        upsampling: int = 4,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        decoder_use_norm = decoder_norm(kwargs, decoder_use_norm)
        encoder = self.build_encoder(encoder_name, in_channels, encoder_depth, encoder_weights, **kwargs)
        self.decoder = self.build_decoder(
            UPerNetDecoder,
            encoder_channels=encoder.out_channels,
            encoder_depth=encoder_depth,
            decoder_channels=decoder_channels,
            use_norm=decoder_use_norm,
        )
        head_scale = head_upsampling(upsampling, feature_strides(encoder)[2], default=4)
        self.build_heads(decoder_channels, classes, activation, aux_params, 1, head_scale)
        self.name = f"upernet-{encoder_name}"


_compat.alias_submodules(__name__, ("model", "decoder"))
