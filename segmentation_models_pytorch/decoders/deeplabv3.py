"""DeepLabV3 (Chen et al., 2017) and DeepLabV3+ (Chen et al., 2018): atrous spatial pyramid pooling
on a dilated encoder; V3+ adds a light decoder that fuses a stride-4 feature.

Blocks (SeparableConv2d, ASPP) -> DeepLabV3Decoder / DeepLabV3PlusDecoder -> DeepLabV3 /
DeepLabV3Plus. Both run the encoder with ``output_stride`` 8 or 16, so the encoder must support
dilation.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base import modules as md
from ..base import recompute
from ..base.model import SegmentationModel, feature_strides
from .fpn import head_upsampling


def check_pooled_norm(norm: nn.Module, x: torch.Tensor, where: str) -> None:
    """Raise a clear error where ``norm`` in training mode would see a single value per channel.

    Global-pooling branches (ASPP, PAN, UPerNet) normalise a 1x1 map: BatchNorm then needs a batch of
    at least 2 in training mode, GroupNorm needs more than one value per group, and InstanceNorm
    (without running statistics) cannot work at all.
    """
    if x.shape[-1] * x.shape[-2] != 1:
        return
    if isinstance(norm, nn.GroupNorm) and x.shape[0] == 1 and norm.num_channels == norm.num_groups:
        raise ValueError(
            f"{where} applies GroupNorm with one channel per group ({norm.num_groups} groups) to a 1x1 "
            "pooled map of a single image, which cannot be normalised. Use fewer groups, e.g. "
            f"decoder_use_norm={{'type': 'groupnorm', 'num_groups': {max(1, norm.num_groups // 4)}}}, "
            "or more decoder channels."
        )
    if isinstance(norm, nn.InstanceNorm2d) and (norm.training or not norm.track_running_stats):
        raise ValueError(
            f"{where} applies InstanceNorm to a 1x1 pooled map, which cannot be normalised; choose "
            "another decoder_use_norm (e.g. 'batchnorm' or 'groupnorm')."
        )
    if norm.training and isinstance(norm, nn.modules.batchnorm._BatchNorm) and x.shape[0] == 1:
        raise ValueError(
            f"{where} applies BatchNorm to a 1x1 pooled map, which in training mode needs a batch of "
            "at least 2 images (got batch size 1). Train with batch size >= 2, or call model.eval() "
            "to use the running statistics."
        )


def check_dilatable(arch: str, encoder_name: str, output_stride: int, hint: str) -> None:
    """Fail early, with the architecture's own advice, for registered encoders that cannot dilate."""
    if output_stride == 32 or not isinstance(encoder_name, str):
        return
    from ..encoders import encoders
    from ..encoders._base import EncoderMixin

    cls = encoders[encoder_name]["encoder"] if encoder_name in encoders else None
    if isinstance(cls, type) and issubclass(cls, EncoderMixin) and cls.get_stages is EncoderMixin.get_stages:
        raise ValueError(
            f"{arch} with encoder_output_stride={output_stride} runs the encoder dilated, but "
            f"encoder {encoder_name!r} does not support dilation. {hint}"
        )


def check_output_stride(arch: str, encoder: nn.Module, output_stride: int) -> None:
    """A custom/timm encoder must really have been dilated to the requested stride."""
    actual = getattr(encoder, "output_stride", output_stride)
    if actual > output_stride:
        raise ValueError(
            f"{arch} asked for encoder_output_stride={output_stride} but the encoder's deepest feature "
            f"is at stride {actual}: this encoder does not support dilation."
        )


class SeparableConv2d(nn.Sequential):
    """Depthwise convolution followed by a 1x1 pointwise convolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        depthwise = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
        )
        pointwise = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)
        super().__init__(depthwise, pointwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript cannot pass modules to helpers
            return self[1](md.conv_without_dead_taps(self[0], x))
        return self[1](self[0](x))


def _conv_bn_relu(conv: nn.Module, out_channels: int) -> List[nn.Module]:
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU()]


class ASPPConv(nn.Sequential):
    """3x3 atrous convolution, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        conv = nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        super().__init__(*_conv_bn_relu(conv, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript cannot pass modules to helpers
            return self[2](self[1](md.conv_without_dead_taps(self[0], x)))
        return self[2](self[1](self[0](x)))


class ASPPSeparableConv(nn.Sequential):
    """3x3 atrous depthwise-separable convolution, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        conv = SeparableConv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        super().__init__(*_conv_bn_relu(conv, out_channels))


class ASPPPooling(nn.Sequential):
    """Image-level features: global average pool, 1x1 conv, BatchNorm, ReLU, resized back."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        super().__init__(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(conv, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = self[1](self[0](x))  # pool, conv (indexed, not unpacked: TorchScript)
        if not torch.jit.is_scripting():  # TorchScript cannot pass modules to helpers
            check_pooled_norm(self[2], y, "The ASPP image-pooling branch")
        out = F.interpolate(self[3](self[2](y)), size=size, mode="bilinear", align_corners=False)
        # An (N, C, 1, 1) tensor counts as contiguous, so the resize comes back in NCHW; one NCHW
        # branch makes the concatenation, the projection and the x4 resize after it NCHW too
        # (DeepLabV3+-resnet34 eval: that resize alone went from 0.5 ms to 50 ms).
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 conv, three atrous convs, image pooling; concat, project."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        atrous_rates: Iterable[int],
        separable: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        rates = _three_rates(atrous_rates)
        branch = ASPPSeparableConv if separable else ASPPConv
        pointwise = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.convs = nn.ModuleList(
            [
                nn.Sequential(*_conv_bn_relu(pointwise, out_channels)),
                *(branch(in_channels, out_channels, rate) for rate in rates),
                ASPPPooling(in_channels, out_channels),
            ]
        )
        project = nn.Conv2d(5 * out_channels, out_channels, kernel_size=1, bias=False)
        self.project = nn.Sequential(*_conv_bn_relu(project, out_channels), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


def _three_rates(atrous_rates: Iterable[int]) -> Tuple[int, int, int]:
    try:
        rates = tuple(atrous_rates)
    except TypeError:
        rates = ()
    if len(rates) != 3 or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in rates):
        raise ValueError(
            f"decoder_atrous_rates must be three positive integers, e.g. (12, 24, 36); got {atrous_rates!r}."
        )
    return rates  # type: ignore[return-value]


class DeepLabV3Decoder(nn.Module):
    """ASPP on the deepest feature, then a 3x3 conv, BatchNorm, ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        atrous_rates: Iterable[int],
        aspp_separable: bool,
        aspp_dropout: float,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(
            in_channels, out_channels, atrous_rates, separable=aspp_separable, dropout=aspp_dropout
        )
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.relu(self.bn(self.conv(self.aspp(features[-1]))))


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the deepest feature, upsampled to the stride-4 feature and fused with it."""

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_depth: int,
        out_channels: int,
        atrous_rates: Iterable[int],
        output_stride: int,
        aspp_separable: bool,
        aspp_dropout: float,
    ) -> None:
        super().__init__()
        if encoder_depth < 3:
            raise ValueError(
                "DeepLabV3Plus needs encoder_depth >= 3 (it fuses the stride-4 feature), got "
                f"{encoder_depth}."
            )
        aspp = ASPP(
            encoder_channels[-1], out_channels, atrous_rates, separable=aspp_separable, dropout=aspp_dropout
        )
        self.aspp = nn.Sequential(
            aspp,
            SeparableConv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        highres_channels = 48  # the paper's reduction of the low-level feature
        self.block1 = nn.Sequential(
            *_conv_bn_relu(nn.Conv2d(encoder_channels[2], highres_channels, 1, bias=False), highres_channels)
        )
        fuse = SeparableConv2d(highres_channels + out_channels, out_channels, 3, padding=1, bias=False)
        self.block2 = nn.Sequential(*_conv_bn_relu(fuse, out_channels))

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        highres = self.block1(features[2])
        aspp = self.aspp(features[-1])
        if not torch.jit.is_scripting():  # TorchScript compiles the plain path only
            if recompute.scope_active():
                return self._chained_fuse(aspp, highres)
        return self.block2(_upsample_cat(aspp, highres))

    @torch.jit.unused
    def _chained_fuse(self, aspp, highres):
        """``block2(_upsample_cat(aspp, highres))`` keeping neither the concatenation nor the
        depthwise convolution's output for backward: both are recomputed from ``aspp`` and
        ``highres``, which autograd keeps anyway (each is its ReLU's saved output)."""
        separable, norm, act = self.block2
        chain = recompute.Chain.derived(_upsample_cat, aspp, highres)
        chain.then(separable[0])  # depthwise 3x3: 9 multiply-adds per element to redo
        return act(norm(chain.consume(separable[1])))


def _upsample_cat(aspp: torch.Tensor, highres: torch.Tensor) -> torch.Tensor:
    # Resizing to the stride-4 feature's size equals SMP's fixed x2/x4 up-sampling at valid sizes.
    aspp = F.interpolate(aspp, size=highres.shape[-2:], mode="bilinear", align_corners=True)
    return torch.cat([aspp, highres], dim=1)


_OS_HINT = "Use an encoder that supports dilation (e.g. resnet34, efficientnet-b0, mobilenet_v2)."


def _check_os(arch: str, output_stride: Any) -> None:
    if output_stride not in (8, 16) or isinstance(output_stride, bool):
        raise ValueError(f"{arch} supports encoder_output_stride 8 or 16, got {output_stride!r}.")


class DeepLabV3(SegmentationModel):
    """DeepLabV3: ASPP on a dilated encoder, bilinear up-sampling to the input size.

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"``; it must support dilation.
        encoder_depth: encoder stages used (1..5).
        encoder_weights: weights name, local path / state dict, or ``None``.
        encoder_output_stride: 8 or 16: stride of the deepest feature (the later stages are dilated).
        decoder_channels: channels of the ASPP branches and of the decoder output.
        decoder_atrous_rates: dilation rates of the three atrous ASPP branches.
        decoder_aspp_separable: depthwise-separable atrous convolutions in ASPP.
        decoder_aspp_dropout: dropout after the ASPP projection.
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        upsampling: head up-sampling factor; ``None`` up-samples back to the input size.
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder.

    In training mode the ASPP image-pooling branch needs a batch of at least 2 (BatchNorm on a 1x1
    map); batch size 1 raises a clear error.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        encoder_output_stride: int = 8,
        decoder_channels: int = 256,
        decoder_atrous_rates: Iterable[int] = (12, 24, 36),
        decoder_aspp_separable: bool = False,
        decoder_aspp_dropout: float = 0.5,
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        upsampling: Optional[int] = None,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_os("DeepLabV3", encoder_output_stride)
        check_dilatable("DeepLabV3", encoder_name, encoder_output_stride, _OS_HINT)
        encoder = self.build_encoder(
            encoder_name,
            in_channels,
            encoder_depth,
            encoder_weights,
            output_stride=encoder_output_stride,
            **kwargs,
        )
        check_output_stride("DeepLabV3", encoder, encoder_output_stride)
        self.decoder = self.build_decoder(
            DeepLabV3Decoder,
            in_channels=encoder.out_channels[-1],
            out_channels=decoder_channels,
            atrous_rates=decoder_atrous_rates,
            aspp_separable=decoder_aspp_separable,
            aspp_dropout=decoder_aspp_dropout,
        )
        # Default: back to the input size (the deepest feature's stride: 2**depth below depth 4).
        scale = feature_strides(encoder)[-1] if upsampling is None else upsampling
        self.build_heads(decoder_channels, classes, activation, aux_params, kernel_size=1, upsampling=scale)
        self.name = f"deeplabv3-{encoder_name}"

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights; also accepts checkpoints of old SMP versions whose decoder was a Sequential."""
        renames = {"decoder.0.": "decoder.aspp.", "decoder.1.": "decoder.conv.", "decoder.2.": "decoder.bn."}
        remapped: Dict[str, Any] = {}
        for key, value in state_dict.items():
            for old, new in renames.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            remapped[key] = value
        return super().load_state_dict(remapped, strict=strict, assign=assign)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+: DeepLabV3's ASPP plus a decoder that fuses the stride-4 encoder feature.

    Args:
        encoder_name: backbone name or ``"tu-<timm model>"``; it must support dilation.
        encoder_depth: encoder stages used (3..5).
        encoder_weights: weights name, local path / state dict, or ``None``.
        encoder_output_stride: 8 or 16: stride of the deepest feature (the later stages are dilated).
        decoder_channels: channels of the ASPP branches and of the decoder.
        decoder_atrous_rates: dilation rates of the three atrous ASPP branches.
        decoder_aspp_separable: depthwise-separable atrous convolutions in ASPP (default ``True``).
        decoder_aspp_dropout: dropout after the ASPP projection.
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        upsampling: head up-sampling of the stride-4 decoder output (4 gives the input size).
        aux_params: optional classification head parameters (see ``Unet``).
        **kwargs: forwarded to the encoder.

    In training mode the ASPP image-pooling branch needs a batch of at least 2 (BatchNorm on a 1x1
    map); batch size 1 raises a clear error.
    """

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        encoder_output_stride: int = 16,
        decoder_channels: int = 256,
        decoder_atrous_rates: Iterable[int] = (12, 24, 36),
        decoder_aspp_separable: bool = True,
        decoder_aspp_dropout: float = 0.5,
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        upsampling: int = 4,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _check_os("DeepLabV3Plus", encoder_output_stride)
        check_dilatable("DeepLabV3Plus", encoder_name, encoder_output_stride, _OS_HINT)
        encoder = self.build_encoder(
            encoder_name,
            in_channels,
            encoder_depth,
            encoder_weights,
            output_stride=encoder_output_stride,
            **kwargs,
        )
        check_output_stride("DeepLabV3Plus", encoder, encoder_output_stride)
        self.decoder = self.build_decoder(
            DeepLabV3PlusDecoder,
            encoder_channels=encoder.out_channels,
            encoder_depth=encoder_depth,
            out_channels=decoder_channels,
            atrous_rates=decoder_atrous_rates,
            output_stride=encoder_output_stride,
            aspp_separable=decoder_aspp_separable,
            aspp_dropout=decoder_aspp_dropout,
        )
        head_scale = head_upsampling(upsampling, feature_strides(encoder)[2], default=4)
        self.build_heads(decoder_channels, classes, activation, aux_params, 1, head_scale)
        self.name = f"deeplabv3plus-{encoder_name}"


_compat.alias_submodules(__name__, ("model", "decoder"))
