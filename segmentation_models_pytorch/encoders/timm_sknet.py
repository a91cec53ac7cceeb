"""Selective-Kernel ResNet / ResNeXt encoders (timm's ``ResNet`` with SK blocks, SMP's layout)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Union

import torch
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import hub


def _block_class(block: Union[str, type]) -> type:
    from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck

    if isinstance(block, str):
        blocks = {"basic": SelectiveKernelBasic, "bottleneck": SelectiveKernelBottleneck}
        if block not in blocks:
            raise ValueError(f"SkNetEncoder block must be one of {sorted(blocks)}, got {block!r}.")
        return blocks[block]
    return block  # SMP's registry passes the timm class itself


class SkNetEncoder(nn.Module, EncoderMixin):
    """timm SK-ResNet/SK-ResNeXt without its classifier, returning one feature per stride.

    Args:
        out_channels: channels of the input and of each feature.
        depth: number of stages to run (1..5).
        output_stride: 32, or 16/8 once :meth:`make_dilated` is applied.
        **kwargs: passed to ``timm.models.resnet.ResNet``; ``block`` may be ``"basic"``,
            ``"bottleneck"`` or a timm block class.
    """

    _ignored_weight_prefixes = ("fc.",)

    def __init__(
        self,
        out_channels: List[int],
        depth: int = 5,
        output_stride: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        from timm.models.resnet import ResNet

        kwargs["block"] = _block_class(kwargs.get("block", "basic"))
        kwargs.setdefault("num_classes", 0)  # no classifier to build only to throw away
        net = ResNet(**kwargs)
        # Adopt the backbone's modules under timm's names: they are the checkpoint keys.
        for name in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    load_state_dict = load_state_dict_without_head

    def get_stages(self) -> Dict[int, Sequence[nn.Module]]:
        return {16: [self.layer3], 32: [self.layer4]}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = [x]
        if self._depth >= 1:
            x = self.act1(self.bn1(self.conv1(x)))
            features.append(x)
        if self._depth >= 2:
            x = self.layer1(self.maxpool(x))
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


# All three were trained by timm on ImageNet-normalised RGB in [0, 1].
ENCODERS = timm_sknet_encoders = {
    "timm-skresnet18": {
        "encoder": SkNetEncoder,
        "pretrained_settings": {
            "imagenet": hub(
                "smp-hub/timm-skresnet18.imagenet", "6c97652bb744d89177b68274d2fda3923a7d1f95"
            ),
        },
        "params": {
            "out_channels": [3, 64, 64, 128, 256, 512],
            "block": "basic",
            "layers": [2, 2, 2, 2],
            "zero_init_last": False,
            "block_args": {"sk_kwargs": {"rd_ratio": 1 / 8, "split_input": True}},
        },
    },
    "timm-skresnet34": {
        "encoder": SkNetEncoder,
        "pretrained_settings": {
            "imagenet": hub(
                "smp-hub/timm-skresnet34.imagenet", "2367796924a8182cc835ef6b5dc303917f923f99"
            ),
        },
        "params": {
            "out_channels": [3, 64, 64, 128, 256, 512],
            "block": "basic",
            "layers": [3, 4, 6, 3],
            "zero_init_last": False,
            "block_args": {"sk_kwargs": {"rd_ratio": 1 / 8, "split_input": True}},
        },
    },
    "timm-skresnext50_32x4d": {
        "encoder": SkNetEncoder,
        "pretrained_settings": {
            "imagenet": hub(
                "smp-hub/timm-skresnext50_32x4d.imagenet",
                "50207e407cc4c6ea9e6872963db6844ca7b7b9de",
            ),
        },
        "params": {
            "out_channels": [3, 64, 256, 512, 1024, 2048],
            "block": "bottleneck",
            "layers": [3, 4, 6, 3],
            "zero_init_last": False,
            "cardinality": 32,
            "base_width": 4,
        },
    },
}
