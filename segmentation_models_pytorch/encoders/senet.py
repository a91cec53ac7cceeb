"""SENet, SE-ResNet and SE-ResNeXt encoders (``pretrainedmodels`` networks, SMP's weight names).

The backbone comes from the ``pretrainedmodels`` package, imported only when an encoder is built
(it takes seconds to import). Its stem ``layer0`` ends with a max pooling that SMP moves to
``layer0_pool`` so the stride-2 feature can be read before it; parameter names are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._pretrainedmodels import backend
from ._registry import hub

_BLOCKS = ("SEBottleneck", "SEResNetBottleneck", "SEResNeXtBottleneck")



def _block_class(block: str | type) -> type:
    if not isinstance(block, str):
        return block  # SMP-style hand-made entries pass the class itself
    if block not in _BLOCKS:
        raise ValueError(f"Unknown SENet block {block!r}; expected one of {list(_BLOCKS)}.")
    return getattr(backend("senet"), block)


class SENetEncoder(nn.Module, EncoderMixin):
    """``pretrainedmodels`` SENet without its classifier, one feature per stride.

    Args:
        out_channels: channels of the 6 features, input first.
        depth: number of down-sampling stages to run (1..5).
        output_stride: 32, or 16/8 once :meth:`make_dilated` has run (``get_encoder`` does it).
        block: bottleneck type, a name from ``"SEBottleneck"``, ``"SEResNetBottleneck"``,
            ``"SEResNeXtBottleneck"`` (or the class itself).
        layers: number of blocks in ``layer1`` .. ``layer4``.
        **kwargs: other ``pretrainedmodels`` ``SENet`` arguments (``groups``, ``reduction``,
            ``inplanes``, ``input_3x3``, ``downsample_kernel_size``, ``downsample_padding``,
            ``dropout_p``, ``num_classes``).
    """

    _ignored_weight_prefixes = ("last_linear.",)

    def __init__(
        self,
        out_channels: Sequence[int],
        depth: int = 5,
        output_stride: int = 32,
        *,
        block: str | type,
        layers: Sequence[int],
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        kwargs.setdefault("groups", 1)
        kwargs.setdefault("reduction", 16)
        net = backend("senet").SENet(_block_class(block), list(layers), **kwargs)
        # Adopt the backbone's modules under the same names: they are the checkpoint keys.
        for name in ("layer0", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        # The stem's pooling runs after the stride-2 feature is taken.
        self.layer0_pool = self.layer0.pool
        self.layer0.pool = nn.Identity()
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    def get_stages(self) -> dict[int, Sequence[nn.Module]]:
        return {16: [self.layer3], 32: [self.layer4]}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        if self._depth >= 1:
            x = self.layer0(x)
            features.append(x)
        if self._depth >= 2:
            x = self.layer1(self.layer0_pool(x))
            features.append(x)
        if self._depth >= 3:
            x = self.layer2(x)
            features.append(x)
        if self._depth >= 4:
            x = self.layer3(x)
            features.append(x)
        if self._depth >= 5:
            x = self.layer4(x)
            features.append(x)
        return features

    load_state_dict = load_state_dict_without_head


# SE-ResNet / SE-ResNeXt share a 7x7 stem and 1x1 down-sampling convolutions.
_RESNET_STYLE = {
    "downsample_kernel_size": 1,
    "downsample_padding": 0,
    "dropout_p": None,
    "inplanes": 64,
    "input_3x3": False,
}

# name -> (block, layers, groups, stem channels, extra params, smp-hub revision)
_SPECS = {
    "senet154": ("SEBottleneck", [3, 8, 36, 3], 64, 128, {"dropout_p": 0.2},
                 "249f45efc9881ba560a0c480128edbc34ab87e40"),
    "se_resnet50": ("SEResNetBottleneck", [3, 4, 6, 3], 1, 64, _RESNET_STYLE,
                    "e6b4bc2dc85226c3d3474544410724a485455459"),
    "se_resnet101": ("SEResNetBottleneck", [3, 4, 23, 3], 1, 64, _RESNET_STYLE,
                     "71fe95cc0a27f444cf83671f354de02dc741b18b"),
    "se_resnet152": ("SEResNetBottleneck", [3, 8, 36, 3], 1, 64, _RESNET_STYLE,
                     "e79fc3d9d76f197bd76a2593c2054edf1083fe32"),
    "se_resnext50_32x4d": ("SEResNeXtBottleneck", [3, 4, 6, 3], 32, 64, _RESNET_STYLE,
                           "73246406d879a2b0e3fdfe6fddd56347d38f38ae"),
    "se_resnext101_32x4d": ("SEResNeXtBottleneck", [3, 4, 23, 3], 32, 64, _RESNET_STYLE,
                            "18808a4276f46421d358a9de554e0b93c2795df4"),
}

# All these weights expect ImageNet-normalised RGB in [0, 1] (pretrainedmodels' settings).
ENCODERS = senet_encoders = {
    name: {
        "encoder": SENetEncoder,
        "pretrained_settings": {"imagenet": hub(f"smp-hub/{name}.imagenet", revision)},
        "params": {
            "out_channels": [3, stem, 256, 512, 1024, 2048],
            "block": block,
            "layers": layers,
            "groups": groups,
            "reduction": 16,
            "num_classes": 1000,
            **extra,
        },
    }
    for name, (block, layers, groups, stem, extra, revision) in _SPECS.items()
}
