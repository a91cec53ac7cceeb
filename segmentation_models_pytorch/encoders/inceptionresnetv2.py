"""Inception-ResNet-v2 encoder (``pretrainedmodels`` network, SMP's weight names and features).

The backbone comes from the ``pretrainedmodels`` package, imported only when an encoder is built.
Its 3x3 convolutions and max poolings get padding 1 (as in SMP) so every stage exactly halves the
resolution. Down-sampling mixes pooling and convolution branches, so it cannot be dilated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._pretrainedmodels import backend, pad_for_halving
from ._registry import HALF, hub

# Backbone modules in network order (their names are the checkpoint keys).
_MODULES = (
    "conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "maxpool_5a",
    "mixed_5b", "repeat", "mixed_6a", "repeat_1", "mixed_7a", "repeat_2", "block8", "conv2d_7b",
)


class InceptionResNetV2Encoder(nn.Module, EncoderMixin):
    """``pretrainedmodels`` Inception-ResNet-v2 without its classifier, one feature per stride.

    Args:
        out_channels: channels of the 6 features, input first.
        depth: number of down-sampling stages to run (1..5).
        output_stride: must stay 32 (this encoder cannot be dilated); accepted for a uniform
            signature.
        **kwargs: ``pretrainedmodels`` ``InceptionResNetV2`` arguments (``num_classes``).
    """

    _ignored_weight_prefixes = ("last_linear.",)

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
        if output_stride != 32:
            raise ValueError(
                f"{type(self).__name__} cannot be dilated (it down-samples with pooling), so "
                f"output_stride must be 32, got {output_stride}."
            )
        net = backend("inceptionresnetv2").InceptionResNetV2(**kwargs)
        for name in _MODULES:
            setattr(self, name, getattr(net, name))
        pad_for_halving(self)
        # The last block is built without ReLU and so lacks the attribute; TorchScript compiles
        # both branches of its forward, so give it a no-op one.
        self.block8.relu = nn.Identity()
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    def make_dilated(self, output_stride: int) -> None:
        raise ValueError(
            f"{type(self).__name__} does not support dilation (output_stride {output_stride}): it "
            "down-samples with pooling. Use output_stride=32 or another encoder."
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        if self._depth >= 1:
            x = self.conv2d_2b(self.conv2d_2a(self.conv2d_1a(x)))
            features.append(x)
        if self._depth >= 2:
            x = self.conv2d_4a(self.conv2d_3b(self.maxpool_3a(x)))
            features.append(x)
        if self._depth >= 3:
            x = self.repeat(self.mixed_5b(self.maxpool_5a(x)))
            features.append(x)
        if self._depth >= 4:
            x = self.repeat_1(self.mixed_6a(x))
            features.append(x)
        if self._depth >= 5:
            x = self.block8(self.repeat_2(self.mixed_7a(x)))
            x = self.conv2d_7b(x)
            features.append(x)
        return features

    load_state_dict = load_state_dict_without_head


# Both weight sets expect RGB in [0, 1] normalised to [-1, 1] (pretrainedmodels' settings).
ENCODERS = inceptionresnetv2_encoders = {
    "inceptionresnetv2": {
        "encoder": InceptionResNetV2Encoder,
        "pretrained_settings": {
            "imagenet": hub(
                "smp-hub/inceptionresnetv2.imagenet",
                "120c5afdbb80a1c989db0a7423ebb7a9db9b1e6c",
                HALF,
            ),
            "imagenet+background": hub(
                "smp-hub/inceptionresnetv2.imagenet-background",
                "3ecf3491658dc0f6a76d69c9d1cb36511b1ee56c",
                HALF,
            ),
        },
        "params": {"out_channels": [3, 64, 192, 320, 1088, 1536], "num_classes": 1000},
    }
}
