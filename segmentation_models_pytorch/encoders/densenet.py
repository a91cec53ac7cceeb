"""DenseNet encoders (torchvision networks, SMP's weight names and feature layout).

Each skip feature is taken inside a transition block, after its BatchNorm + ReLU and before its
1x1 convolution and average pooling; the deepest feature is the final BatchNorm output (no ReLU).
Down-sampling uses pooling, so these encoders cannot be dilated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import hub

# Old torchvision checkpoints name dense-layer modules "norm.1", "conv.2"...; current ones "norm1".
_LEGACY_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


class DenseNetEncoder(nn.Module, EncoderMixin):
    """torchvision DenseNet ``features`` (no classifier), one feature per stride.

    Args:
        out_channels: channels of the 6 features, input first.
        depth: number of down-sampling stages to run (1..5).
        output_stride: must stay 32 (DenseNet cannot be dilated); accepted for a uniform signature.
        **kwargs: torchvision ``DenseNet`` arguments (``growth_rate``, ``block_config``,
            ``num_init_features``, ``bn_size``, ``drop_rate``, ``memory_efficient``...).
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
        if output_stride != 32:
            raise ValueError(
                f"{type(self).__name__} cannot be dilated (it down-samples with pooling), so "
                f"output_stride must be 32, got {output_stride}."
            )
        from torchvision.models.densenet import DenseNet

        self.features = DenseNet(**kwargs).features  # the classifier is left behind
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    def make_dilated(self, output_stride: int) -> None:
        raise ValueError(
            f"{type(self).__name__} does not support dilation (output_stride {output_stride}): "
            "DenseNet down-samples with pooling. Use output_stride=32 or another encoder."
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features
        features = [x]
        if self._depth >= 1:
            x = f.relu0(f.norm0(f.conv0(x)))
            features.append(x)
        if self._depth >= 2:
            x = f.denseblock1(f.pool0(x))
            x = f.transition1.relu(f.transition1.norm(x))
            features.append(x)
        if self._depth >= 3:
            x = f.transition1.pool(f.transition1.conv(x))
            x = f.denseblock2(x)
            x = f.transition2.relu(f.transition2.norm(x))
            features.append(x)
        if self._depth >= 4:
            x = f.transition2.pool(f.transition2.conv(x))
            x = f.denseblock3(x)
            x = f.transition3.relu(f.transition3.norm(x))
            features.append(x)
        if self._depth >= 5:
            x = f.transition3.pool(f.transition3.conv(x))
            x = f.norm5(f.denseblock4(x))
            features.append(x)
        return features

    @staticmethod
    def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """Rename legacy torchvision keys (``denselayer1.norm.1``) to current ones (``norm1``)."""
        return {_LEGACY_KEY.sub(r"\1\2.", k): v for k, v in state_dict.items()}

    load_state_dict = load_state_dict_without_head


# name -> (out_channels, num_init_features, growth_rate, block_config, smp-hub revision)
_SPECS = {
    "densenet121": ([3, 64, 256, 512, 1024, 1024], 64, 32, (6, 12, 24, 16),
                    "a17c96896a265b61338f66f61d3887b24f61995a"),
    "densenet169": ([3, 64, 256, 512, 1280, 1664], 64, 32, (6, 12, 32, 32),
                    "8facfba9fc72f7750879dac9ac6ceb3ab990de8d"),
    "densenet201": ([3, 64, 256, 512, 1792, 1920], 64, 32, (6, 12, 48, 32),
                    "ed5deb355d71659391d46fae5e7587460fbb5f84"),
    "densenet161": ([3, 96, 384, 768, 2112, 2208], 96, 48, (6, 12, 36, 24),
                    "9afe0fec51ab2a627141769d97d6f83756d78446"),
}

# All these weights expect ImageNet-normalised RGB in [0, 1].
ENCODERS = densenet_encoders = {
    name: {
        "encoder": DenseNetEncoder,
        "pretrained_settings": {"imagenet": hub(f"smp-hub/{name}.imagenet", revision)},
        "params": {
            "out_channels": out_channels,
            "num_init_features": num_init_features,
            "growth_rate": growth_rate,
            "block_config": block_config,
        },
    }
    for name, (out_channels, num_init_features, growth_rate, block_config, revision) in _SPECS.items()
}
