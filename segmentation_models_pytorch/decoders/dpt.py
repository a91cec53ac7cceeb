"""DPT (Ranftl et al., 2021): Dense Prediction Transformer on a plain vision transformer.

Blocks (readout, ReassembleBlock, FusionBlock) -> DPTDecoder -> DPTSegmentationHead -> DPT. Token maps
of a few transformer blocks (all at the patch stride) are reassembled to strides 4, 8, 16, 32 and
fused from coarse to fine.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base.model import SegmentationModel, is_torch_compiling
from ..base.modules import Activation

_READOUTS = ("ignore", "add", "cat")


class ReadoutConcatBlock(nn.Module):
    """Concatenate the first prefix (class) token to every patch token and project back (Linear+GELU)."""

    def __init__(self, embed_dim: int, has_prefix_tokens: bool) -> None:
        super().__init__()
        in_features = embed_dim * 2 if has_prefix_tokens else embed_dim
        self.project = nn.Sequential(nn.Linear(in_features, embed_dim), nn.GELU())

    def forward(self, features: torch.Tensor, prefix_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, HW, C)
        if prefix_tokens is not None:
            tokens = torch.cat([tokens, prefix_tokens[:, :1].expand_as(tokens)], dim=2)
        return self.project(tokens).transpose(1, 2).reshape(b, -1, h, w)


class ReadoutAddBlock(nn.Module):
    """Add the mean of the prefix tokens to every patch token."""

    def forward(self, features: torch.Tensor, prefix_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if prefix_tokens is None:
            return features
        return features + prefix_tokens.mean(dim=1)[:, :, None, None]


class ReadoutIgnoreBlock(nn.Module):
    """Drop the prefix tokens."""

    def forward(self, features: torch.Tensor, prefix_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return features


class ReassembleBlock(nn.Module):
    """1x1 projection, resampling by ``upsample_factor`` (transposed conv / identity / strided conv),
    3x3 projection to the fusion width."""

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, upsample_factor: float
    ) -> None:
        super().__init__()
        self.project_to_out_channel = nn.Conv2d(in_channels, mid_channels, kernel_size=1)
        if upsample_factor > 1:
            factor = int(upsample_factor)
            self.upsample: nn.Module = nn.ConvTranspose2d(mid_channels, mid_channels, factor, stride=factor)
        elif upsample_factor == 1:
            self.upsample = nn.Identity()
        else:
            stride = int(1 / upsample_factor)
            self.upsample = nn.Conv2d(mid_channels, mid_channels, kernel_size=3, stride=stride, padding=1)
        self.project_to_feature_dim = nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_to_feature_dim(self.upsample(self.project_to_out_channel(x)))


class ResidualConvBlock(nn.Module):
    """Pre-activation residual unit: (ReLU, 3x3 conv, BatchNorm) x 2 plus the input."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(feature_dim, feature_dim, kernel_size=3, padding=1, bias=False)
        self.batch_norm_1 = nn.BatchNorm2d(feature_dim)
        self.conv_2 = nn.Conv2d(feature_dim, feature_dim, kernel_size=3, padding=1, bias=False)
        self.batch_norm_2 = nn.BatchNorm2d(feature_dim)
        self.activation = nn.ReLU()  # not in-place: the input is the residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.batch_norm_1(self.conv_1(self.activation(x)))
        y = self.batch_norm_2(self.conv_2(self.activation(y)))
        return y + x


class FusionBlock(nn.Module):
    """Refine a level, add the coarser fused level, refine again, upsample, 1x1 projection."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.residual_conv_block1 = ResidualConvBlock(feature_dim)
        self.residual_conv_block2 = ResidualConvBlock(feature_dim)
        self.project = nn.Conv2d(feature_dim, feature_dim, kernel_size=1)
        self.activation = nn.ReLU()

    def forward(
        self,
        feature: torch.Tensor,
        previous_feature: Optional[torch.Tensor] = None,
        size: Optional[List[int]] = None,
    ) -> torch.Tensor:
        """Upsample to ``size`` (the next finer level) or, without it, by 2 (SMP's fixed factor;
        the same thing whenever the levels are exactly 2x apart)."""
        feature = self.residual_conv_block1(feature)
        if previous_feature is not None:
            feature = feature + previous_feature
        feature = self.residual_conv_block2(feature)
        if size is None:
            size = [feature.shape[-2] * 2, feature.shape[-1] * 2]
        feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=True)
        return self.project(feature)


class DPTDecoder(nn.Module):
    """Readout -> reassemble each block's token map to strides 4, 8, 16, 32... -> fuse deepest first.

    The output is at half the input resolution.
    """

    def __init__(
        self,
        encoder_out_channels: Sequence[int] = (756, 756, 756, 756),
        encoder_output_strides: Sequence[int] = (16, 16, 16, 16),
        encoder_has_prefix_tokens: bool = True,
        readout: str = "cat",
        intermediate_channels: Sequence[int] = (256, 512, 1024, 1024),
        fusion_channels: int = 256,
    ) -> None:
        super().__init__()
        n = len(encoder_out_channels)
        if not n == len(encoder_output_strides) == len(intermediate_channels):
            raise ValueError(
                f"decoder_intermediate_channels must have one entry per encoder feature: the encoder "
                f"returns {n} features (encoder_depth) but decoder_intermediate_channels="
                f"{tuple(intermediate_channels)} has {len(intermediate_channels)}."
            )
        if readout == "cat":
            blocks: List[nn.Module] = [
                ReadoutConcatBlock(c, encoder_has_prefix_tokens) for c in encoder_out_channels
            ]
        elif readout == "add":
            blocks = [ReadoutAddBlock() for _ in encoder_out_channels]
        elif readout == "ignore":
            blocks = [ReadoutIgnoreBlock() for _ in encoder_out_channels]
        else:
            raise ValueError(f"decoder_readout must be one of {_READOUTS}, got {readout!r}.")
        self.projection_blocks = nn.ModuleList(blocks)
        # Feature i is brought from its own stride to stride 2 ** (i + 2).
        specs = zip(encoder_out_channels, intermediate_channels, encoder_output_strides)
        self.reassemble_blocks = nn.ModuleList(
            ReassembleBlock(c, mid, fusion_channels, stride / 2 ** (i + 2))
            for i, (c, mid, stride) in enumerate(specs)
        )
        self.fusion_blocks = nn.ModuleList(FusionBlock(fusion_channels) for _ in range(n))

    def forward(
        self, features: List[torch.Tensor], prefix_tokens: List[Optional[torch.Tensor]]
    ) -> torch.Tensor:
        levels = [
            reassemble(readout(f, tokens))
            for readout, reassemble, f, tokens in zip(
                self.projection_blocks, self.reassemble_blocks, features, prefix_tokens
            )
        ][::-1]  # deepest first
        fused: Optional[torch.Tensor] = None
        for i, (block, level) in enumerate(zip(self.fusion_blocks, levels)):
            size = list(levels[i + 1].shape[-2:]) if i + 1 < len(levels) else None
            fused = block(level, fused, size)
        assert fused is not None
        return fused


class DPTSegmentationHead(nn.Module):
    """3x3 conv, BatchNorm, ReLU, dropout, 1x1 conv to classes, bilinear up-sampling, activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        activation: Optional[Union[str, Callable]] = None,
        kernel_size: int = 3,
        upsampling: float = 2.0,
    ) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=kernel_size, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.1, inplace=False),
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
        )
        self.activation = Activation(activation)
        self.upsampling_factor = upsampling

    def forward(self, x: torch.Tensor, size: Optional[List[int]] = None) -> torch.Tensor:
        """Up-sample by ``upsampling`` or, when given, to ``size`` (the model passes the input size)."""
        x = self.head(x)
        if size is None:
            x = F.interpolate(x, scale_factor=self.upsampling_factor, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.activation(x)


class DPT(SegmentationModel):
    """DPT: a convolutional decoder over the token maps of a plain vision transformer.

    Args:
        encoder_name: ``"tu-<timm ViT>"``, e.g. ``"tu-vit_base_patch16_224.augreg_in21k"`` (a plain,
            non-hierarchical timm model with ``forward_intermediates``).
        encoder_depth: number of transformer blocks read (1..number of blocks, default 4).
        encoder_weights: ``None`` for random initialisation; anything else loads the timm pretrained
            weights of the tag in ``encoder_name``.
        encoder_output_indices: which blocks to read (``encoder_depth`` indices; default: evenly
            spaced, ending at the last block).
        decoder_readout: use of the prefix (class) tokens: ``"cat"``, ``"add"`` or ``"ignore"``.
        decoder_intermediate_channels: width of each reassembled level (``encoder_depth`` entries).
        decoder_fusion_channels: width of the fusion blocks.
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        aux_params: optional classification head on the last token map (see ``Unet``).
        **kwargs: forwarded to ``timm.create_model``, e.g. ``img_size=512`` or
            ``dynamic_img_size=True``.

    Input size: a ViT built for a fixed image size (timm's default) takes exactly that size; other
    sizes raise a clear error. With ``dynamic_img_size=True`` any size works: inputs are padded to a
    multiple of the patch size and the mask is cropped back (SMP 0.6.0 also needs the number of
    patches per side to be even, and returns a wrongly sized mask for patch sizes that are not a power
    of two).
    """

    _is_torch_scriptable = False
    _is_torch_compilable = True
    requires_divisible_input_shape = True

    def __init__(
        self,
        encoder_name: str = "tu-vit_base_patch16_224.augreg_in21k",
        encoder_depth: int = 4,
        encoder_weights: Optional[str] = "imagenet",
        encoder_output_indices: Optional[List[int]] = None,
        decoder_readout: str = "cat",
        decoder_intermediate_channels: Sequence[int] = (256, 512, 1024, 1024),
        decoder_fusion_channels: int = 256,
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(encoder_name, str) or not encoder_name.startswith("tu-"):
            raise ValueError(
                "DPT needs a plain vision transformer from timm, named 'tu-<timm model>' (e.g. "
                f"'tu-vit_base_patch16_224'); got encoder_name={encoder_name!r}."
            )
        if decoder_readout not in _READOUTS:
            raise ValueError(f"decoder_readout must be one of {_READOUTS}, got {decoder_readout!r}.")
        from ..encoders.timm_vit import TimmViTEncoder

        self.encoder = TimmViTEncoder(
            name=encoder_name[3:],
            in_channels=in_channels,
            depth=encoder_depth,
            pretrained=encoder_weights is not None,
            output_indices=encoder_output_indices,
            **kwargs,
        )
        if not self.encoder.has_prefix_tokens and decoder_readout != "ignore":
            warnings.warn(
                f"Encoder does not have prefix tokens (e.g. cls_token), but `decoder_readout` is set to "
                f"'{decoder_readout}'. It's recommended to set `decoder_readout='ignore'` when using a "
                "encoder without prefix tokens.",
                UserWarning,
                stacklevel=2,
            )
        self.decoder = self.build_decoder(
            DPTDecoder,
            encoder_out_channels=self.encoder.out_channels,
            encoder_output_strides=self.encoder.output_strides,
            encoder_has_prefix_tokens=self.encoder.has_prefix_tokens,
            readout=decoder_readout,
            intermediate_channels=decoder_intermediate_channels,
            fusion_channels=decoder_fusion_channels,
        )
        self.segmentation_head = DPTSegmentationHead(
            decoder_fusion_channels, classes, activation=activation, kernel_size=3, upsampling=2
        )
        self.classification_head = self._classification_head(aux_params)
        self.initialize()
        self.name = f"dpt-{encoder_name[3:]}"

    def _fixed_image_size(self) -> Optional[List[int]]:
        """The only input size a non-dynamic timm ViT accepts, or ``None``."""
        embed = getattr(self.encoder.model, "patch_embed", None)
        img_size = getattr(embed, "img_size", None)
        if img_size is None or getattr(embed, "dynamic_img_size", False):
            return None
        if not getattr(embed, "strict_img_size", True):
            return None
        return [int(img_size[0]), int(img_size[1])]

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Also explain the input size a fixed-size ViT needs (instead of timm's assertion)."""
        super().check_input_shape(x)
        fixed = self._fixed_image_size()
        if fixed is None:
            return
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if self.pad_input:
            pad = self._padding(h, w)
            h, w = h + pad[2] + pad[3], w + pad[0] + pad[1]
        if [h, w] != fixed:
            raise ValueError(
                f"The encoder of this DPT takes {fixed[0]}x{fixed[1]} images only, got "
                f"{int(x.shape[-2])}x{int(x.shape[-1])}. Build the model with dynamic_img_size=True "
                f"for any input size, or with img_size=<your size>."
            )

    def forward(self, x: torch.Tensor):
        """Encoder (token maps + prefix tokens) -> decoder -> head, with padding to the patch size."""
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(x)
        h, w = x.shape[-2], x.shape[-1]
        pad = self._padding(h, w) if self.pad_input else [0, 0, 0, 0]
        # Pad unconditionally while a graph is captured, so it stays valid for every input size.
        capturing = torch.jit.is_tracing() or is_torch_compiling()
        padded = self.pad_input and (capturing or pad[1] > 0 or pad[3] > 0)
        if padded:
            x = F.pad(x, pad)
        features, prefix_tokens = self.encoder(x)
        decoded = self.decoder(features, prefix_tokens)
        masks = self.segmentation_head(decoded, [x.shape[-2], x.shape[-1]])
        if padded:
            masks = self._crop(masks, pad, x.shape[-2], x.shape[-1], h, w)
        if self.classification_head is not None:
            return masks, self.classification_head(features[-1])
        return masks


_compat.alias_submodules(__name__, ("model", "decoder"))
