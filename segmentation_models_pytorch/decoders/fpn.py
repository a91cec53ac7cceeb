"""FPN (Kirillov et al., 2019, panoptic FPN head): a feature pyramid merged at stride 4.

Blocks -> FPNDecoder -> FPN.
"""

from __future__ import annotations

from typing import Any, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base import modules as md
from ..base.model import SegmentationModel, feature_strides, is_torch_compiling

# The finest level's fold (see FPNDecoder._finest_level_folded) pays from this many pixels of the
# level above it (batch x height x width), as Unet's fold does (unet.FOLD_MIN_PIXELS).
FOLD_MIN_PIXELS = 256


class Conv3x3GNReLU(nn.Module):
    """3x3 conv, GroupNorm(32), ReLU, then optionally x2 bilinear up-sampling."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool = False) -> None:
        super().__init__()
        self.upsample = upsample
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(32, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        return x


class FPNBlock(nn.Module):
    """Top-down step: upsample the coarser level to the skip's size and add the projected skip."""

    def __init__(
        self, pyramid_channels: int, skip_channels: int, interpolation_mode: str = "nearest"
    ) -> None:
        super().__init__()
        self.skip_conv = nn.Conv2d(skip_channels, pyramid_channels, kernel_size=1)
        self.interpolation_mode = interpolation_mode

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(skip.shape[-2], skip.shape[-1]), mode=self.interpolation_mode)
        return x + self.skip_conv(skip)


class SegmentationBlock(nn.Module):
    """``n_upsamples`` conv blocks that bring one pyramid level to stride 4 (at least one conv)."""

    def __init__(self, in_channels: int, out_channels: int, n_upsamples: int = 0) -> None:
        super().__init__()
        blocks = [Conv3x3GNReLU(in_channels, out_channels, upsample=bool(n_upsamples))]
        blocks += [Conv3x3GNReLU(out_channels, out_channels, upsample=True) for _ in range(1, n_upsamples)]
        self.block = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class MergeBlock(nn.Module):
    """Merge the pyramid levels by sum (``"add"``) or channel concatenation (``"cat"``)."""

    def __init__(self, policy: Literal["add", "cat"]) -> None:
        super().__init__()
        if policy not in ("add", "cat"):
            raise ValueError(f"decoder_merge_policy must be 'add' or 'cat', got {policy!r}.")
        self.policy = policy

    def forward(self, x: List[torch.Tensor]) -> torch.Tensor:
        if self.policy == "cat":
            return torch.cat(x, dim=1)
        out = x[0]
        for t in x[1:]:
            out = out + t
        return out


class FPNDecoder(nn.Module):
    """Top-down pyramid (``p5`` .. ``p2``), one :class:`SegmentationBlock` per level, merged."""

    # The folded finest level reads these convs' weights: optimize_for_inference keeps them plain.
    weight_read_convs = ("p2.skip_conv", "seg_blocks.3.block.0.block.0")

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_depth: int = 5,
        pyramid_channels: int = 256,
        segmentation_channels: int = 128,
        dropout: float = 0.2,
        merge_policy: Literal["add", "cat"] = "add",
        interpolation_mode: str = "nearest",
    ) -> None:
        super().__init__()
        if encoder_depth < 3:
            raise ValueError(f"FPN needs encoder_depth >= 3 (four pyramid levels), got {encoder_depth}.")
        if segmentation_channels % 32:
            raise ValueError(
                f"decoder_segmentation_channels must be a multiple of 32 (GroupNorm with 32 groups), "
                f"got {segmentation_channels}."
            )
        self.out_channels = segmentation_channels * (4 if merge_policy == "cat" else 1)
        c5, c4, c3, c2 = list(encoder_channels[::-1])[:4]
        if 0 in (c4, c3, c2):
            raise ValueError(
                "This encoder has no stride-2 feature (0-channel placeholder), so FPN needs "
                "encoder_depth=5 with it."
            )
        self.p5 = nn.Conv2d(c5, pyramid_channels, kernel_size=1)
        self.p4 = FPNBlock(pyramid_channels, c4, interpolation_mode)
        self.p3 = FPNBlock(pyramid_channels, c3, interpolation_mode)
        self.p2 = FPNBlock(pyramid_channels, c2, interpolation_mode)
        self.seg_blocks = nn.ModuleList(
            SegmentationBlock(pyramid_channels, segmentation_channels, n_upsamples=n) for n in (3, 2, 1, 0)
        )
        self.merge = MergeBlock(merge_policy)
        self.dropout = nn.Dropout2d(p=dropout, inplace=True)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        c2, c3, c4, c5 = features[-4:]
        p5 = self.p5(c5)
        p4 = self.p4(p5, c4)
        p3 = self.p3(p4, c3)
        fold = False
        if not torch.jit.is_scripting():  # TorchScript compiles the plain path only
            fold = self._can_fold(p3, c2)
        if fold:
            finest = self._finest_level_folded(p3, c2)
        else:
            finest = self.seg_blocks[3](self.p2(p3, c2))
        if self.merge.policy == "cat":
            levels = [self.seg_blocks[0](p5), self.seg_blocks[1](p4), self.seg_blocks[2](p3), finest]
            return self.dropout(self.merge(levels))
        # "add": sum each level as soon as it is made (same order as merging all four at the end),
        # so one full-size level is alive at a time instead of four.
        merged = self.seg_blocks[0](p5) + self.seg_blocks[1](p4)
        merged += self.seg_blocks[2](p3)
        merged += finest
        return self.dropout(merged)

    @torch.jit.unused  # no annotations: TorchScript cannot resolve them on unused methods
    def _can_fold(self, p3, c2):
        """Whether :meth:`_finest_level_folded` computes exactly the finest level here (eager,
        default layout, nothing hooked that it would bypass) and ``p3`` is large enough to pay."""
        skip, seg = self.p2.skip_conv, self.seg_blocks[3].block[0]
        conv = seg.block[0]
        modules = (self.p2, skip, self.seg_blocks[3], self.seg_blocks[3].block, seg, seg.block, conv)
        return (
            not (torch.jit.is_tracing() or is_torch_compiling())  # graphs keep the plain ops
            and not md.plain_module_calls_active()
            and not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
            and not md.global_module_hooks()
            and self.p2.interpolation_mode == "nearest"
            and type(self.p2) is FPNBlock
            and type(seg) is Conv3x3GNReLU
            and not seg.upsample
            and md.computes_plain_conv2d(skip)
            and skip.kernel_size == (1, 1)
            and skip.stride == (1, 1)
            and skip.padding == (0, 0)
            and skip.groups == 1
            and md.is_plain_conv3x3(conv)
            and conv.bias is None
            and c2.shape[-2] == 2 * p3.shape[-2]
            and c2.shape[-1] == 2 * p3.shape[-1]
            and p3.shape[0] * p3.shape[2] * p3.shape[3] >= FOLD_MIN_PIXELS
            and p3.is_contiguous(memory_format=torch.channels_last)
            and c2.is_contiguous(memory_format=torch.channels_last)
            and conv.weight.is_contiguous(memory_format=torch.channels_last)
            and not conv.weight.is_contiguous()
        )

    @torch.jit.unused
    def _finest_level_folded(self, p3, c2):
        """``seg_blocks[3](p2(p3, c2))`` without the stride-4 pyramid level ``p2``.

        The level's 3x3 conv ``W`` is linear, so ``W * (up(p3) + skip(c2))`` is the sum of
        ``W * up(p3)``, computed at ``p3``'s resolution (:func:`~..base.modules.upsample2x_conv3x3`,
        2.25x fewer FLOPs), and of one 3x3 conv of ``c2`` itself with ``W`` composed with the 1x1
        ``skip`` (``c2`` has 24-64 channels for the usual encoders, the pyramid 256), plus the skip's
        bias seen through ``W``'s zero padding. Same values to float rounding; at 4x3x256x256
        this is 3-4x fewer FLOPs for the largest convolution of the decoder, and neither ``p2`` nor
        the upsampled ``p3`` is made.
        """
        skip, seg = self.p2.skip_conv, self.seg_blocks[3].block[0]
        weight = seg.block[0].weight
        y = md.upsample2x_conv3x3(p3, weight)
        # (out, mid, 3, 3) x (mid, in) -> (out, in, 3, 3), built in the channels_last order
        composed = torch.einsum("ohwm,mi->ohwi", weight.permute(0, 2, 3, 1), skip.weight.flatten(1))
        y = F.conv2d(c2, composed.permute(0, 3, 1, 2), padding=1).add_(y)
        if skip.bias is not None:
            y.add_(_bias_through_padding(weight, skip.bias, y.shape[-2], y.shape[-1]))  # in place:
            # a fresh full-size output costs as much again as the pass that fills it
        return seg.block[2](seg.block[1](y))


def _bias_through_padding(weight: torch.Tensor, bias: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``conv2d(b, weight, padding=1)`` for the constant ``height x width`` map ``b = bias``: the
    taps that fall into the zero padding are missing at the border rows and columns."""
    taps = torch.einsum("omhw,m->ohw", weight, bias)  # each tap's contribution
    rows = torch.ones(height, 3, dtype=weight.dtype, device=weight.device)
    cols = torch.ones(width, 3, dtype=weight.dtype, device=weight.device)
    rows[0, 0] = rows[-1, 2] = 0.0  # row r reads r - 1 .. r + 1
    cols[0, 0] = cols[-1, 2] = 0.0
    return torch.einsum("yh,xw,ohw->oyx", rows, cols, taps).unsqueeze(0)


class FPN(SegmentationModel):
    """FPN: a feature pyramid decoder merged at 1/4 of the input resolution.

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"``.
        encoder_depth: encoder stages used (3..5); the pyramid uses the deepest four features.
        encoder_weights: weights name, local path / state dict, or ``None``.
        decoder_pyramid_channels: channels of the pyramid levels.
        decoder_segmentation_channels: channels of each level after its conv blocks (multiple of 32).
        decoder_merge_policy: ``"add"`` or ``"cat"`` to merge the levels.
        decoder_dropout: spatial dropout before the head.
        decoder_interpolation: top-down up-sampling mode.
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        upsampling: head up-sampling factor of the pyramid output. The default 4 gives the input's
            size at every ``encoder_depth`` (SMP 0.6.0 returns twice or four times that at depth 4
            or 3); any other value is the literal factor, as in SMP.
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        decoder_pyramid_channels: int = 256,
        decoder_segmentation_channels: int = 128,
        decoder_merge_policy: str = "add",
        decoder_dropout: float = 0.2,
        decoder_interpolation: str = "nearest",
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[str] = None,
        upsampling: int = 4,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        encoder = self.build_encoder(encoder_name, in_channels, encoder_depth, encoder_weights, **kwargs)
        self.decoder = self.build_decoder(
            FPNDecoder,
            encoder_channels=encoder.out_channels,
            encoder_depth=encoder_depth,
            pyramid_channels=decoder_pyramid_channels,
            segmentation_channels=decoder_segmentation_channels,
            dropout=decoder_dropout,
            merge_policy=decoder_merge_policy,
            interpolation_mode=decoder_interpolation,
        )
        # The pyramid's finest level sits at the stride of the 4th-deepest feature (4 at depth 5).
        head_scale = head_upsampling(upsampling, feature_strides(encoder)[-4], default=4)
        self.build_heads(self.decoder.out_channels, classes, activation, aux_params, 1, head_scale)
        self.name = f"fpn-{encoder_name}"


def head_upsampling(upsampling: float, decoder_stride: int, default: int) -> float:
    """The head's up-sampling factor for ``upsampling`` given to the model.

    The default value means "back to the input size": the factor is the decoder output's stride,
    which equals ``default`` at the architecture's default depth (SMP 0.6.0 keeps ``default`` at
    every depth, so its FPN/PSPNet masks are smaller or larger than the input elsewhere). Any
    other value is the literal factor, exactly as in SMP, so configs that set it explicitly give
    SMP's output shape and values at every depth.
    """
    if upsampling == default:
        return decoder_stride
    return upsampling


_compat.alias_submodules(__name__, ("model", "decoder"))
