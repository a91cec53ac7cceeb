"""Inception-v4 encoder (``pretrainedmodels`` network, SMP's weight names and feature layout).

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


class InceptionV4Encoder(nn.Module, EncoderMixin):
    """``pretrainedmodels`` Inception-v4 ``features`` (no classifier), one feature per stride.

    Args:
        out_channels: channels of the 6 features, input first.
        depth: number of down-sampling stages to run (1..5).
        output_stride: must stay 32 (Inception-v4 cannot be dilated); accepted for a uniform
            signature.
        **kwargs: ``pretrainedmodels`` ``InceptionV4`` arguments (``num_classes``).
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
        net = backend("inceptionv4").InceptionV4(**kwargs)
        self.features = net.features  # the classifier is left behind
        pad_for_halving(self)
        # Blocks whose outputs are the stride 2..32 features (stride 8 is read after the third of
        # the four Inception-A blocks, as SMP does).
        self._out_indexes: list[int] = [2, 4, 8, 14, len(self.features) - 1]
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
        for i, module in enumerate(self.features):
            # Blocks past the deepest requested feature are skipped (a loop `break` would not
            # script).
            if len(features) <= self._depth:
                x = module(x)
                if i in self._out_indexes:
                    features.append(x)
        return features

    load_state_dict = load_state_dict_without_head


# Both weight sets expect RGB in [0, 1] normalised to [-1, 1] (pretrainedmodels' settings).
ENCODERS = inceptionv4_encoders = {
    "inceptionv4": {
        "encoder": InceptionV4Encoder,
        "pretrained_settings": {
            "imagenet": hub(
                "smp-hub/inceptionv4.imagenet", "918fb54f07811d82a4ecde3a51156041d0facba9", HALF
            ),
            "imagenet+background": hub(
                "smp-hub/inceptionv4.imagenet-background",
                "8c2a48e20d2709ee64f8421c61be309f05bfa536",
                HALF,
            ),
        },
        "params": {"out_channels": [3, 64, 192, 384, 1024, 1536], "num_classes": 1001},
    }
}
