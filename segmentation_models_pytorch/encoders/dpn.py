"""Dual Path Network encoders (``pretrainedmodels`` networks, SMP's weight names and features).

The backbone comes from the ``pretrainedmodels`` package, imported only when an encoder is built.
A DPN block passes a ``(residual, dense)`` pair along; the skip features of stages 2-4 are the
pair concatenated and passed through a ReLU, the deepest one is the network's final
``conv5_bn_ac`` output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._pretrainedmodels import backend
from ._registry import hub


class DPNEncoder(nn.Module, EncoderMixin):
    """``pretrainedmodels`` DPN without its classifier, one feature per stride.

    Args:
        stage_idxs: indexes in ``features`` where stages 3, 4, 5 start and where the network ends
            (``[1 + k_sec[0], + k_sec[1], + k_sec[2], + k_sec[3] + 1]``).
        out_channels: channels of the 6 features, input first.
        depth: number of down-sampling stages to run (1..5).
        output_stride: 32, or 16/8 once :meth:`make_dilated` has run (``get_encoder`` does it).
        **kwargs: ``pretrainedmodels`` ``DPN`` arguments (``small``, ``num_init_features``,
            ``k_r``, ``groups``, ``b``, ``k_sec``, ``inc_sec``, ``num_classes``,
            ``test_time_pool``).
    """

    # DPN blocks take and return tuples of tensors in ways TorchScript does not compile.
    _is_torch_scriptable = False
    _is_torch_exportable = True
    _ignored_weight_prefixes = ("last_linear.",)

    def __init__(
        self,
        stage_idxs: Sequence[int],
        out_channels: Sequence[int],
        depth: int = 5,
        output_stride: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        k_sec = list(kwargs.get("k_sec", (3, 4, 20, 3)))
        expected = [1 + k_sec[0]]
        for n in k_sec[1:]:
            expected.append(expected[-1] + n)
        expected[-1] += 1  # the final conv5_bn_ac module
        if list(stage_idxs) != expected:
            raise ValueError(
                f"stage_idxs {list(stage_idxs)} do not match k_sec {k_sec}; expected {expected}."
            )
        net = backend("dpn").DPN(**kwargs)
        self.features = net.features  # the 1x1-conv classifier (last_linear) is left behind
        self._stage_idxs = list(stage_idxs)
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    def get_stages(self) -> dict[int, Sequence[nn.Module]]:
        s = self._stage_idxs
        return {16: [self.features[s[1] : s[2]]], 32: [self.features[s[2] : s[3]]]}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s = self._stage_idxs
        stem = self.features[0]
        features = [x]
        if self._depth >= 1:
            x = stem.act(stem.bn(stem.conv(x)))
            features.append(x)
        if self._depth >= 2:
            pair = self.features[1 : s[0]](stem.pool(x))
            features.append(F.relu(torch.cat(pair, dim=1), inplace=True))
        if self._depth >= 3:
            pair = self.features[s[0] : s[1]](pair)
            features.append(F.relu(torch.cat(pair, dim=1), inplace=True))
        if self._depth >= 4:
            pair = self.features[s[1] : s[2]](pair)
            features.append(F.relu(torch.cat(pair, dim=1), inplace=True))
        if self._depth >= 5:
            features.append(self.features[s[2] : s[3]](pair))
        return features

    load_state_dict = load_state_dict_without_head


# DPN weights were trained on RGB in [0, 1] normalised with these (pretrainedmodels' settings).
DPN_PRESET = {
    "mean": [124 / 255, 117 / 255, 104 / 255],
    "std": [1 / (0.0167 * 255)] * 3,
    "input_space": "RGB",
    "input_range": [0, 1],
}

# name -> (params, {weights name: (hub repo suffix, revision)})
_SPECS = {
    "dpn68": (
        {"stage_idxs": [4, 8, 20, 24], "out_channels": [3, 10, 144, 320, 704, 832],
         "groups": 32, "inc_sec": (16, 32, 32, 64), "k_r": 128, "k_sec": (3, 4, 12, 3),
         "num_init_features": 10, "small": True},
        {"imagenet": ("imagenet", "c209aefdeae6bc93937556629e974b44d4e58535")},
    ),
    "dpn68b": (
        {"stage_idxs": [4, 8, 20, 24], "out_channels": [3, 10, 144, 320, 704, 832], "b": True,
         "groups": 32, "inc_sec": (16, 32, 32, 64), "k_r": 128, "k_sec": (3, 4, 12, 3),
         "num_init_features": 10, "small": True},
        {"imagenet+5k": ("imagenet-5k", "6c6615e77688e390ae0eaa81e26821fbd83cee4b")},
    ),
    "dpn92": (
        {"stage_idxs": [4, 8, 28, 32], "out_channels": [3, 64, 336, 704, 1552, 2688],
         "groups": 32, "inc_sec": (16, 32, 24, 128), "k_r": 96, "k_sec": (3, 4, 20, 3),
         "num_init_features": 64},
        {"imagenet+5k": ("imagenet-5k", "d231f51ce4ad2c84ed5fcaf4ef0cfece6814a526")},
    ),
    "dpn98": (
        {"stage_idxs": [4, 10, 30, 34], "out_channels": [3, 96, 336, 768, 1728, 2688],
         "groups": 40, "inc_sec": (16, 32, 32, 128), "k_r": 160, "k_sec": (3, 6, 20, 3),
         "num_init_features": 96},
        {"imagenet": ("imagenet", "b2836c86216c1ddce980d832f7deaa4ca22babd3")},
    ),
    "dpn107": (
        {"stage_idxs": [5, 13, 33, 37], "out_channels": [3, 128, 376, 1152, 2432, 2688],
         "groups": 50, "inc_sec": (20, 64, 64, 128), "k_r": 200, "k_sec": (4, 8, 20, 3),
         "num_init_features": 128},
        {"imagenet+5k": ("imagenet-5k", "dab4cd6b8b79de3db970f2dbff85359a8847db05")},
    ),
    "dpn131": (
        {"stage_idxs": [5, 13, 41, 45], "out_channels": [3, 128, 352, 832, 1984, 2688],
         "groups": 40, "inc_sec": (16, 32, 32, 128), "k_r": 160, "k_sec": (4, 8, 28, 3),
         "num_init_features": 128},
        {"imagenet": ("imagenet", "04bbb9f415ca2bb59f3d8227857967b74698515e")},
    ),
}

ENCODERS = dpn_encoders = {
    name: {
        "encoder": DPNEncoder,
        "pretrained_settings": {
            weights: hub(f"smp-hub/{name}.{suffix}", revision, DPN_PRESET)
            for weights, (suffix, revision) in settings.items()
        },
        "params": {**params, "num_classes": 1000, "test_time_pool": True},
    }
    for name, (params, settings) in _SPECS.items()
}
