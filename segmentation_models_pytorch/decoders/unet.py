"""Unet (Ronneberger et al., 2015): a decoder that upsamples step by step and fuses skip connections.

Blocks -> UnetDecoder -> Unet. The decoder resizes to each skip's exact size, so any input size
works without padding.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from ..base import initialization as init
from ..base import modules as md
from ..base import recompute
from ..base.model import SegmentationModel, decoder_norm, is_torch_compiling


class UnetCenterBlock(nn.Sequential):
    """Two 3x3 conv-norm-ReLU on the deepest feature (used with VGG encoders)."""

    def __init__(self, in_channels: int, out_channels: int, use_norm: md.NormSpec = "batchnorm") -> None:
        super().__init__(
            md.Conv2dReLU(in_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm),
            md.Conv2dReLU(out_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm),
        )


# The fold pays once the low-resolution input has this many pixels (batch x height x width): it
# builds four 2x2 kernels from the 3x3 one on every call, a cost set by the channels alone, while
# what it saves grows with the pixels. Measured per block on one core (CPU time, 32-512 input
# channels, the kernels built by one matmul): below 256 the plain block was faster in eval and in
# training (up to 3-5x at a handful of pixels), at 256 about even in eval and 1.0-1.2x faster in a
# training step, at 1024 1.0-1.3x and 1.3-1.4x faster.
FOLD_MIN_PIXELS = 256


class UnetDecoderBlock(recompute.ChainedConvPair, nn.Module):
    """Upsample to the skip's size, concatenate the skip, then two 3x3 conv-norm-ReLU."""

    # The folded route reads conv1's weight itself: optimize_for_inference must keep conv1 a plain
    # convolution (no fused activation) even where its probe was too small for the fold.
    weight_read_convs = ("conv1.0",)

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        use_norm: md.NormSpec = "batchnorm",
        attention_type: Optional[str] = None,
        interpolation_mode: str = "nearest",
    ) -> None:
        super().__init__()
        self.interpolation_mode = interpolation_mode
        self.conv1 = md.Conv2dReLU(
            in_channels + skip_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm
        )
        self.attention1 = md.Attention(attention_type, in_channels=in_channels + skip_channels)
        self.conv2 = md.Conv2dReLU(out_channels, out_channels, kernel_size=3, padding=1, use_norm=use_norm)
        self.attention2 = md.Attention(attention_type, in_channels=out_channels)

    def forward(
        self,
        x: torch.Tensor,
        target_height: int,
        target_width: int,
        skip: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles the plain path only
            if self._can_fold(x, target_height, target_width):
                return self._folded_forward(x, skip)
        x = F.interpolate(x, size=(target_height, target_width), mode=self.interpolation_mode)
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))
        return self.attention2(self._conv_pair(x))

    @torch.jit.unused  # no annotations: TorchScript cannot resolve them on unused methods
    def _can_fold(self, x, target_height, target_width):
        """Whether :meth:`_folded_forward` computes exactly this block (eager, default layout) and
        the input is large enough for it to pay (:data:`FOLD_MIN_PIXELS`)."""
        conv = self.conv1[0]
        return (
            not (torch.jit.is_tracing() or is_torch_compiling())  # graphs keep the plain ops
            and not md.plain_module_calls_active()
            and self.interpolation_mode == "nearest"
            and isinstance(self.attention1.attention, nn.Identity)
            and md.is_plain_conv3x3(conv)
            and target_height == 2 * x.shape[2]
            and target_width == 2 * x.shape[3]
            and x.shape[0] * x.shape[2] * x.shape[3] >= FOLD_MIN_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last)
            # the model's default layout; after .to(memory_format=contiguous_format) stay bit-exact
            and conv.weight.is_contiguous(memory_format=torch.channels_last)
            and not conv.weight.is_contiguous()
        )

    @torch.jit.unused
    def _folded_forward(self, x, skip):
        """This block without materialising the upsampled input or the concatenation.

        ``conv1(cat([up(x), skip]))`` is ``conv(up(x), W[:, :C]) + conv(skip, W[:, C:])``; the first
        term is computed at low resolution (:func:`~..base.modules.upsample2x_conv3x3`). Saves a
        quarter to a half of this block's FLOPs and its two largest activations.
        """
        conv = self.conv1[0]
        c = x.shape[1]
        y = md.upsample2x_conv3x3(x, conv.weight[:, :c])
        if skip is not None and skip.shape[1] > 0:  # 0 channels: an encoder's stride-2 placeholder
            y = F.conv2d(skip, conv.weight[:, c:], conv.bias, padding=1).add_(y)
        elif conv.bias is not None:
            y = y + conv.bias.reshape(1, -1, 1, 1)
        # conv1's norm and activation, then conv2's convolution
        y = recompute.norm_act_into(y, self.conv1[1], self.conv1[2], self.conv2[0])
        return self.attention2(self.conv2[2](self.conv2[1](y)))


class UnetDecoder(nn.Module):
    """One block per encoder stage, deepest first; the last block reaches the input resolution."""

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        n_blocks: int = 5,
        use_norm: md.NormSpec = "batchnorm",
        attention_type: Optional[str] = None,
        add_center_block: bool = False,
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
        # Deepest feature first; the stride-1 "feature" (the input itself) is never a skip.
        skips = list(encoder_channels[1:])[::-1]
        head_channels = skips[0]
        in_channels = [head_channels, *decoder_channels[:-1]]
        skip_channels = [*skips[1:], 0]
        self.center = (
            UnetCenterBlock(head_channels, head_channels, use_norm=use_norm)
            if add_center_block
            else nn.Identity()
        )
        self.blocks = nn.ModuleList(
            UnetDecoderBlock(i, s, o, use_norm, attention_type, interpolation_mode)
            for i, s, o in zip(in_channels, skip_channels, decoder_channels)
        )

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        sizes = [f.shape[2:] for f in features][::-1]
        skips = features[1:][::-1]
        x = self.center(skips[0])
        for i, block in enumerate(self.blocks):
            skip = skips[i + 1] if i + 1 < len(skips) else None
            x = block(x, sizes[i + 1][0], sizes[i + 1][1], skip)  # no int(): keeps export dynamic
        return x

    def forward_stages(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """Like :meth:`forward`, but return every block's output (coarsest first, final last)."""
        sizes = [f.shape[2:] for f in features][::-1]
        skips = features[1:][::-1]
        x = self.center(skips[0])
        outputs: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            skip = skips[i + 1] if i + 1 < len(skips) else None
            x = block(x, sizes[i + 1][0], sizes[i + 1][1], skip)  # no int(): keeps export dynamic
            outputs.append(x)
        return outputs


class DeepSupervisionMixin:
    """Optional deep supervision for decoders that refine the mask stage by stage (Unet, Unet++).

    Off by default, and then the model, its state dict and its outputs are exactly SMP's. Turn it on
    with the constructor keyword ``deep_supervision=True`` or later with ``model.deep_supervision =
    True``. That adds ``deep_supervision_heads`` (one 1x1 convolution per intermediate decoder stage,
    ``decoder_channels[i] -> classes``); in training mode ``forward`` then returns a list of masks
    instead of one mask: ``[final, finest intermediate, ..., coarsest intermediate]``, each resized
    (bilinear) to the final mask's size and passed through the model's ``activation``. With
    ``aux_params`` it returns ``(masks, labels)``. In eval mode (and in ``predict``) the model returns
    the final mask only, as without deep supervision. Turning it off again keeps the heads (and their
    weights in the state dict) but stops using them.

    Architectures using the mixin implement ``_deep_supervision_channels()`` and give their decoder a
    ``forward_stages(features)`` method returning every stage's output, the final one last.
    """

    _deep_supervision = False

    def _deep_supervision_channels(self) -> List[int]:
        raise NotImplementedError

    def _setup_deep_supervision(self, kwargs: Dict[str, Any]) -> bool:
        """Pop ``deep_supervision`` from the constructor's ``**kwargs`` (it is not an encoder argument)."""
        return kwargs.pop("deep_supervision", False)

    @property
    @torch.jit.unused
    def deep_supervision(self) -> bool:
        """Whether training-mode ``forward`` also returns the intermediate stages' masks."""
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"deep_supervision must be True or False, got {value!r}.")
        if value and getattr(self, "deep_supervision_heads", None) is None:
            conv = self.segmentation_head[0]
            heads = nn.ModuleList(
                nn.Conv2d(c, conv.out_channels, kernel_size=1) for c in self._deep_supervision_channels()
            )
            init.initialize_head(heads)
            self.deep_supervision_heads = heads.to(device=conv.weight.device, dtype=conv.weight.dtype)
        object.__setattr__(self, "_deep_supervision", value)
        config = self.__dict__.get("_hub_mixin_config")
        if config is not None:  # keep save_pretrained's config in step with the model
            config["deep_supervision"] = value

    def forward(self, x: torch.Tensor):
        """The usual forward; in training mode with deep supervision on, masks are a list."""
        if self._deep_supervision and self.training:
            return self._forward_deep_supervision(x)
        return self._segmentation_forward(x)  # not super(): TorchScript cannot compile it

    @torch.jit.unused  # training-only path; a scripted model raises if it is reached
    def _forward_deep_supervision(self, x):  # unannotated: TorchScript can't read string hints here
        self.check_input_shape(x)
        h, w = x.shape[-2], x.shape[-1]
        pad = self._padding(h, w) if self.requires_divisible_input_shape and self.pad_input else [0, 0, 0, 0]
        if pad[1] > 0 or pad[3] > 0:
            x = F.pad(x, pad)
        if self.channels_last:  # same memory layout as the ordinary forward
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.encoder(x)
        stages = self.decoder.forward_stages(features)
        final = self.segmentation_head(stages[-1])
        activation = self.segmentation_head[-1]
        masks = [final]
        for head, stage in zip(list(self.deep_supervision_heads)[::-1], stages[-2::-1]):
            logits = F.interpolate(head(stage), size=final.shape[-2:], mode="bilinear", align_corners=False)
            masks.append(activation(logits))
        if pad[1] > 0 or pad[3] > 0:
            masks = [self._crop(m, pad, x.shape[-2], x.shape[-1], h, w) for m in masks]
        if self.channels_last:
            masks = [m.contiguous() for m in masks]
        if self.classification_head is not None:
            return masks, self.classification_head(features[-1])
        return masks


_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


class Unet(DeepSupervisionMixin, SegmentationModel):
    """Unet: an encoder with a symmetric decoder joined by skip connections.

    Args:
        encoder_name: backbone name (see ``smp.encoders.get_encoder_names()``) or ``"tu-<timm model>"``.
        encoder_depth: number of encoder stages used (1..5); ``decoder_channels`` must have as many
            entries.
        encoder_weights: ``"imagenet"`` or another weights name of the encoder, a local file path or
            state dict, or ``None`` for random initialisation.
        decoder_use_norm: normalisation in decoder blocks: ``True``/``"batchnorm"``, ``False``/
            ``"identity"``, ``"inplace"``, ``"groupnorm"``, ``"layernorm"``, ``"instancenorm"`` or a
            dict ``{"type": name, **kwargs}``.
        decoder_channels: output channels of each decoder block, deepest first.
        decoder_attention_type: ``None`` or ``"scse"`` attention in each block.
        decoder_interpolation: up-sampling mode (``"nearest"``, ``"bilinear"``, ``"bicubic"``,
            ``"area"``, ``"nearest-exact"``).
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (``"sigmoid"``, ``"softmax2d"``, ..., a callable or
            ``None``).
        aux_params: adds a classification head on the deepest feature: ``{"classes": N,
            "pooling": "avg"|"max", "dropout": p, "activation": ...}``.
        **kwargs: forwarded to the encoder (e.g. timm arguments for ``tu-`` encoders), except
            ``deep_supervision`` (see below).

    Deep supervision:
        ``deep_supervision=True`` (a keyword argument, or the attribute ``model.deep_supervision``
        set after construction) adds a 1x1 head to every decoder block but the last. In training
        mode ``forward`` then returns a list of masks ``[final, finest intermediate, ...,
        coarsest intermediate]``, all at the final mask's size, e.g. for a weighted loss
        ``sum(w * loss(m, y) for w, m in zip(weights, masks))``. Eval mode returns the final mask
        only. Off by default: the state dict is then exactly SMP's.

    Returns:
        ``torch.nn.Module``; ``forward`` returns the mask, or ``(mask, label)`` with ``aux_params``.
    """

    requires_divisible_input_shape = False

    def __init__(
        self,
        encoder_name: str = "resnet34",
        encoder_depth: int = 5,
        encoder_weights: Optional[str] = "imagenet",
        decoder_use_norm: Union[bool, str, Dict[str, Any]] = "batchnorm",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_attention_type: Optional[str] = None,
        decoder_interpolation: str = "nearest",
        in_channels: int = 3,
        classes: int = 1,
        activation: Optional[Union[str, Callable]] = None,
        aux_params: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        decoder_use_norm = decoder_norm(kwargs, decoder_use_norm)
        deep_supervision = self._setup_deep_supervision(kwargs)
        encoder = self.build_encoder(encoder_name, in_channels, encoder_depth, encoder_weights, **kwargs)
        self.decoder = self.build_decoder(
            UnetDecoder,
            encoder_channels=encoder.out_channels,
            decoder_channels=decoder_channels,
            n_blocks=encoder_depth,
            use_norm=decoder_use_norm,
            add_center_block=getattr(encoder, "_unet_center_block", False),
            attention_type=decoder_attention_type,
            interpolation_mode=decoder_interpolation,
        )
        self.build_heads(decoder_channels[-1], classes, activation, aux_params, kernel_size=3)
        self.name = f"u-{encoder_name}"
        self.deep_supervision = deep_supervision

    def _deep_supervision_channels(self) -> List[int]:
        return [block.conv2[0].out_channels for block in self.decoder.blocks][:-1]


_compat.alias_submodules(__name__, ("model", "decoder"))
