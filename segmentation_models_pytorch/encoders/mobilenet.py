"""MobileNetV2 encoder (torchvision network, SMP's weight names and feature layout)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..base import recompute, small_conv
from ..base.initialization import TORCHVISION_INIT_TYPES, deferred_init, torchvision_init
from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import hub


class MobileNetV2Encoder(nn.Module, EncoderMixin):
    """torchvision MobileNetV2 ``features`` (no classifier), one feature per stride.

    Args:
        out_channels: channels of the 6 features, input first.
        depth: number of down-sampling stages to run (1..5).
        output_stride: 32, or 16/8 once :meth:`make_dilated` has run (``get_encoder`` does it).
        **kwargs: torchvision ``MobileNetV2`` arguments (``width_mult``, ``round_nearest``...).
    """

    _ignored_weight_prefixes = ("classifier.",)

    def __init__(
        self,
        out_channels: Sequence[int],
        depth: int = 5,
        output_stride: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        from torchvision.models import MobileNetV2

        # Initialised once with torchvision's scheme (torchvision would run every layer's default
        # init first, then overwrite it).
        with deferred_init(lambda: MobileNetV2(**kwargs).features, TORCHVISION_INIT_TYPES) as features:
            torchvision_init(features)  # the classifier is left behind
        self.features = features
        # Indexes of the blocks whose outputs are the stride 2, 4, 8, 16 and 32 features.
        self._out_indexes: list[int] = [1, 3, 6, 13, len(self.features) - 1]
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    def get_stages(self) -> dict[int, Sequence[nn.Module]]:
        return {16: [self.features[7:14]], 32: [self.features[14:]]}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_scripting():
            if recompute.scope_active():
                return self._chained_forward(x)
        features = [x]
        for i, module in enumerate(self.features):
            # Blocks past the deepest requested feature are skipped (a loop `break` would not
            # script).
            if len(features) <= self._depth:
                x = module(x)
                if i in self._out_indexes:
                    features.append(x)
        return features

    @torch.jit.unused
    def _chained_forward(self, x):
        """:meth:`forward` in a model's training forward: each inverted residual keeps only its
        convolution outputs (norm + ReLU6 recomputed in backward)."""
        features = [x]
        for i, module in enumerate(self.features):
            if len(features) <= self._depth:
                x = _chained_inverted_residual(module, x)
                if i in self._out_indexes:
                    features.append(x)
        return features

    load_state_dict = load_state_dict_without_head


def _chained_inverted_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``InvertedResidual`` (expand -> depthwise -> project [+ x]) with every
    conv-norm-ReLU6 chained into the next convolution; other modules run as they are."""
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.ops.misc import Conv2dNormActivation

    if type(block) is not InvertedResidual:
        return block(x)
    *stages, project, norm = list(block.conv)  # [conv-norm-ReLU6...], project conv, its norm
    if not stages or not all(type(s) is Conv2dNormActivation and len(s) == 3 for s in stages):
        return block(x)
    y = small_conv.conv_for_training(stages[0][0], x)
    for stage, consumer in zip(stages, [s[0] for s in stages[1:]] + [project]):
        consume = functools.partial(small_conv.conv_for_training, consumer)  # small maps: cheaper
        y = recompute.norm_act_into(y, stage[1], stage[2], consume)
    y = norm(y)
    return x + y if block.use_res_connect else y


# The weights expect ImageNet-normalised RGB in [0, 1].
ENCODERS = mobilenet_encoders = {
    "mobilenet_v2": {
        "encoder": MobileNetV2Encoder,
        "pretrained_settings": {
            "imagenet": hub("smp-hub/mobilenet_v2.imagenet", "e67aa804e17f7b404b629127eabbd224c4e0690b"),
        },
        "params": {"out_channels": [3, 16, 24, 32, 96, 1280]},
    }
}
