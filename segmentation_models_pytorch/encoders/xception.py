"""Xception encoder (``pretrainedmodels`` network, SMP's weight names and feature layout).

The backbone comes from the ``pretrainedmodels`` package, imported only when an encoder is built.
Its two stem convolutions get padding 1 (as in SMP) so the stride-2 feature is exactly half the
input. Xception cannot be dilated in SMP, and is not here either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._pretrainedmodels import backend
from ._registry import HALF, hub


class XceptionEncoder(nn.Module, EncoderMixin):
    """``pretrainedmodels`` Xception without its classifier, one feature per stride.

    Args:
        out_channels: channels of the 6 features, input first.
        depth: number of down-sampling stages to run (1..5).
        output_stride: must stay 32 (Xception cannot be dilated); accepted for a uniform
            signature.
        **kwargs: ``pretrainedmodels`` ``Xception`` arguments (``num_classes``).
    """

    _ignored_weight_prefixes = ("fc.", "last_linear.")

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
                f"{type(self).__name__} cannot be dilated, so output_stride must be 32, got "
                f"{output_stride}."
            )
        net = backend("xception").Xception(**kwargs)
        # Adopt the backbone's modules under the same names (the checkpoint keys); its single
        # shared stem ReLU becomes three, one per use.
        self.conv1, self.bn1, self.relu1 = net.conv1, net.bn1, nn.ReLU(inplace=True)
        self.conv2, self.bn2, self.relu2 = net.conv2, net.bn2, nn.ReLU(inplace=True)
        for i in range(1, 13):
            setattr(self, f"block{i}", getattr(net, f"block{i}"))
        self.conv3, self.bn3, self.relu3 = net.conv3, net.bn3, nn.ReLU(inplace=True)
        self.conv4, self.bn4 = net.conv4, net.bn4
        self.conv1.padding = (1, 1)
        self.conv2.padding = (1, 1)
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    def make_dilated(self, output_stride: int) -> None:
        raise ValueError(
            f"{type(self).__name__} does not support dilation (output_stride {output_stride}). Use "
            "output_stride=32 or another encoder."
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        if self._depth >= 1:
            x = self.relu1(self.bn1(self.conv1(x)))
            x = self.relu2(self.bn2(self.conv2(x)))
            features.append(x)
        if self._depth >= 2:
            x = self.block1(x)
            features.append(x)
        if self._depth >= 3:
            x = self.block2(x)
            features.append(x)
        if self._depth >= 4:
            x = self.block3(x)
            x = self.block4(x)
            x = self.block5(x)
            x = self.block6(x)
            x = self.block7(x)
            x = self.block8(x)
            x = self.block9(x)
            x = self.block10(x)
            x = self.block11(x)
            features.append(x)
        if self._depth >= 5:
            x = self.block12(x)
            x = self.relu3(self.bn3(self.conv3(x)))
            x = self.bn4(self.conv4(x))
            features.append(x)
        return features

    load_state_dict = load_state_dict_without_head


# The weights expect RGB in [0, 1] normalised to [-1, 1] (pretrainedmodels' settings).
ENCODERS = xception_encoders = {
    "xception": {
        "encoder": XceptionEncoder,
        "pretrained_settings": {
            "imagenet": hub(
                "smp-hub/xception.imagenet", "01cfaf27c11353b1f0c578e7e26d2c000ea91049", HALF
            ),
        },
        "params": {"out_channels": [3, 64, 128, 256, 728, 2048]},
    }
}
