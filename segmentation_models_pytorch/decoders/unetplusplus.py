"""Unet++ (Zhou et al., 2018): Unet with nested, densely connected skip pathways.

Blocks -> UnetPlusPlusDecoder -> UnetPlusPlus. Like Unet, every node resizes to the exact size of
the skip it is fused with, so any input size works without padding.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import _compat
from ..base import modules as md
from ..base.model import SegmentationModel, decoder_norm
from .unet import _INTERPOLATIONS, DeepSupervisionMixin, UnetCenterBlock, UnetDecoderBlock


class EmptyBlock(nn.Module):
    """A node with 0 output channels (its skip level has no feature, e.g. a transformer's stride 2).

    It has no parameters, exactly like SMP's "empty" decoder block, and returns a 0-channel map of
    the target size so that the concatenations downstream keep working.
    """

    def forward(
        self, x: torch.Tensor, target_height: int, target_width: int, skip: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return x.new_empty(x.shape[0], 0, target_height, target_width)


class UnetPlusPlusDecoder(nn.Module):
    """The nested decoder.

    Node ``x_{d}_{l}`` lives at the resolution of the ``(l + 1)``-th skip counted from the deepest
    feature; ``d = 0`` is the main path (``decoder_channels[l]`` channels), ``d > 0`` are the nested
    nodes (as many channels as that skip). Node ``x_{d}_{l}`` upsamples ``x_{d}_{l-1}`` (or, for
    ``d == l``, the encoder feature one level deeper) and fuses it with every node to its right at its
    level plus the encoder skip. ``x_0_{n-1}`` is the last node, at the input's resolution.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        n_blocks: int = 5,
        use_norm: md.NormSpec = "batchnorm",
        attention_type: Optional[str] = None,
        interpolation_mode: str = "nearest",
        center: bool = False,
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
        # skips[0] is the deepest feature; skip_channels[l] is the channel count of level l + 1.
        skips = list(encoder_channels[1:])[::-1]
        skip_channels = [*skips[1:], 0]
        main_in = [skips[0], *decoder_channels[:-1]]
        self.depth = n_blocks - 1
        # SMP builds this block for VGG encoders but never runs it; we keep both (same checkpoints,
        # same outputs).
        self.center = UnetCenterBlock(skips[0], skips[0], use_norm=use_norm) if center else nn.Identity()

        def node(in_ch: int, skip_ch: int, out_ch: int) -> nn.Module:
            if out_ch == 0:
                return EmptyBlock()
            return UnetDecoderBlock(in_ch, skip_ch, out_ch, use_norm, attention_type, interpolation_mode)

        blocks: Dict[str, nn.Module] = {}
        for level in range(self.depth):
            for d in range(level + 1):
                # The fused skips: nodes x_{d+1..level}_{level} and the encoder feature of this level.
                fused = skip_channels[level] * (level + 1 - d)
                if d == 0:
                    blocks[f"x_0_{level}"] = node(main_in[level], fused, decoder_channels[level])
                else:
                    blocks[f"x_{d}_{level}"] = node(skip_channels[level - 1], fused, skip_channels[level])
        blocks[f"x_0_{self.depth}"] = node(main_in[-1], 0, decoder_channels[-1])
        self.blocks = nn.ModuleDict(blocks)  # SMP's key order: by level, then nesting depth

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.forward_stages(features)[-1]

    def forward_stages(self, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """Return the main-path nodes ``x_0_0 ... x_0_{n-1}`` (coarsest first, final last)."""
        height, width = features[0].shape[2], features[0].shape[3]  # no int(): keeps export dynamic
        skips = features[1:][::-1]
        nodes: Dict[str, torch.Tensor] = {}
        for level in range(self.depth):
            th, tw = skips[level + 1].shape[2], skips[level + 1].shape[3]
            for d in range(level, -1, -1):  # right to left: a node fuses the nodes to its right
                below = skips[d] if d == level else nodes[f"x_{d}_{level - 1}"]
                fused = [nodes[f"x_{i}_{level}"] for i in range(d + 1, level + 1)]
                skip = torch.cat([*fused, skips[level + 1]], dim=1)
                nodes[f"x_{d}_{level}"] = self.blocks[f"x_{d}_{level}"](below, th, tw, skip)
        last = nodes[f"x_0_{self.depth - 1}"] if self.depth > 0 else skips[0]
        final = self.blocks[f"x_0_{self.depth}"](last, height, width, None)
        return [*(nodes[f"x_0_{level}"] for level in range(self.depth)), final]


class UnetPlusPlus(DeepSupervisionMixin, SegmentationModel):
    """Unet++: Unet whose skip connections are replaced by nested, dense convolution blocks.

    Args:
        encoder_name: backbone name (see ``smp.encoders.get_encoder_names()``) or ``"tu-<timm model>"``.
        encoder_depth: number of encoder stages used (1..5); ``decoder_channels`` must have as many
            entries.
        encoder_weights: weights name (e.g. ``"imagenet"``), local path / state dict, or ``None``.
        decoder_use_norm: normalisation in decoder blocks: ``True``/``"batchnorm"``, ``False``/
            ``"identity"``, ``"inplace"``, ``"groupnorm"``, ``"layernorm"``, ``"instancenorm"`` or a
            dict ``{"type": name, **kwargs}``.
        decoder_channels: output channels of the main-path nodes, deepest first.
        decoder_attention_type: ``None`` or ``"scse"`` attention in each node.
        decoder_interpolation: up-sampling mode (``"nearest"``, ``"bilinear"``, ``"bicubic"``,
            ``"area"``, ``"nearest-exact"``).
        in_channels: channels of the input images.
        classes: number of output mask channels.
        activation: activation of the mask (name, callable or ``None``).
        aux_params: adds a classification head on the deepest feature (see ``Unet``).
        **kwargs: forwarded to the encoder, except ``deep_supervision`` (see below).

    Deep supervision:
        ``deep_supervision=True`` (keyword argument, or ``model.deep_supervision = True`` later) adds a
        1x1 head on every main-path node but the last (``x_0_0 ... x_0_{n-2}``). In training mode
        ``forward`` then returns ``[final, finest intermediate, ..., coarsest intermediate]``, all
        resized to the final mask's size; eval mode returns the final mask only. Off by default (the
        state dict is then exactly SMP's).

    Encoders without a stride-2 feature (e.g. ``mit_b*``) work: the nodes of that level are empty
    (SMP 0.6.0 refuses them).

    Returns:
        ``torch.nn.Module``; ``forward`` returns the mask, or ``(mask, label)`` with ``aux_params``.
    """

    _is_torch_scriptable = False
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
            UnetPlusPlusDecoder,
            encoder_channels=encoder.out_channels,
            decoder_channels=decoder_channels,
            n_blocks=encoder_depth,
            use_norm=decoder_use_norm,
            attention_type=decoder_attention_type,
            interpolation_mode=decoder_interpolation,
            center=getattr(encoder, "_unet_center_block", False),
        )
        self.build_heads(decoder_channels[-1], classes, activation, aux_params, kernel_size=3)
        self.name = f"unetplusplus-{encoder_name}"
        self.deep_supervision = deep_supervision

    def _deep_supervision_channels(self) -> List[int]:
        blocks = self.decoder.blocks
        return [blocks[f"x_0_{level}"].conv2[0].out_channels for level in range(self.decoder.depth)]


_compat.alias_submodules(__name__, ("model", "decoder"))
