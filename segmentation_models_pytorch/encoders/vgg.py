"""VGG encoders (torchvision's convolutional trunk, SMP's weight names and feature layout).

VGG differs from the other families in two ways decoders must know about: its first feature is the
full-resolution output of the first convolution block (64 channels, not the input image), and it
down-samples with max pooling only, so it cannot be dilated. Unet adds a center block for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import IMAGENET, hub

# torchvision's layer configurations: ints are 3x3 convolutions, "M" a 2x2 max pooling.
# fmt: off
cfg: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}
# fmt: on

# Keyword arguments of torchvision's VGG that only concern the classifier this encoder drops.
_CLASSIFIER_KWARGS = {"num_classes", "dropout", "init_weights"}


class VGGEncoder(nn.Module, EncoderMixin):
    """torchvision VGG ``features`` (no classifier), returning the map before every pooling.

    Args:
        out_channels: channels of the 6 features (the first is the stride-1 conv block output).
        config: torchvision layer configuration, e.g. ``cfg["A"]`` for VGG11.
        batch_norm: insert BatchNorm after every convolution (the ``*_bn`` variants).
        depth: number of features after the first one (1..5).
        output_stride: must stay 32 (VGG cannot be dilated); accepted for a uniform signature.
        **kwargs: torchvision VGG classifier options (``num_classes``, ``dropout``,
            ``init_weights``); accepted for compatibility and otherwise ignored except
            ``init_weights=False``, which keeps PyTorch's default initialisation.
    """

    _unet_center_block = True
    _ignored_weight_prefixes = ("classifier.",)

    def __init__(
        self,
        out_channels: Sequence[int],
        config: Sequence[int | str],
        batch_norm: bool = False,
        depth: int = 5,
        output_stride: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        if output_stride != 32:
            raise ValueError(
                f"{type(self).__name__} cannot be dilated (it down-samples with max pooling), so "
                f"output_stride must be 32, got {output_stride}."
            )
        unknown = set(kwargs) - _CLASSIFIER_KWARGS
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {sorted(unknown)}; accepted extra "
                f"arguments are {sorted(_CLASSIFIER_KWARGS)}."
            )
        if list(config).count("M") != 5:
            raise ValueError(f"VGG config must contain exactly 5 'M' poolings, got {list(config)}.")
        from torchvision.models.vgg import make_layers

        # Only the trunk is built: torchvision's classifier alone holds ~120M parameters.
        self.features = make_layers(list(config), batch_norm=batch_norm)
        if kwargs.get("init_weights", True):
            self._init_like_torchvision()

        # A feature is taken right before each pooling, plus the output of the last pooling.
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        self._out_indexes: list[int] = [i - 1 for i in pools] + [len(self.features) - 1]
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    def _init_like_torchvision(self) -> None:
        # Same scheme as torchvision's VGG so randomly initialised encoders train alike.
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def make_dilated(self, output_stride: int) -> None:
        raise ValueError(
            f"{type(self).__name__} does not support dilation (output_stride {output_stride}): VGG "
            "down-samples with max pooling. Use output_stride=32 or another encoder."
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features: list[torch.Tensor] = []
        for i, module in enumerate(self.features):
            # Modules past the deepest requested feature are skipped (a loop `break` would not
            # script).
            if len(features) <= self._depth:
                x = module(x)
                if i in self._out_indexes:
                    features.append(x)
        return features

    load_state_dict = load_state_dict_without_head


# name -> (config, batch_norm, smp-hub revision, torchvision checkpoint file)
_SPECS = {
    "vgg11": ("A", False, "ad8b90e1051c38fdbf399cf5016886a1be357390", "vgg11-bbd30ac9.pth"),
    "vgg11_bn": ("A", True, "59757f9215032c9f092977092d57d26a9df7fd9c", "vgg11_bn-6002323d.pth"),
    "vgg13": ("B", False, "1b70ff2580f101a8007a48b51e2b5d1e5925dc42", "vgg13-c768596a.pth"),
    "vgg13_bn": ("B", True, "9be454515193af6612261b7614fe90607e27b143", "vgg13_bn-abd245e5.pth"),
    "vgg16": ("D", False, "49d74b799006ee252b86e25acd6f1fd8ac9a99c1", "vgg16-397923af.pth"),
    "vgg16_bn": ("D", True, "2c186d02fb519e93219a99a1c2af6295aef0bf0d", "vgg16_bn-6c64b313.pth"),
    "vgg19": ("E", False, "2853d00d7bca364dbb98be4d6afa347e5aeec1f6", "vgg19-dcbb9e9d.pth"),
    "vgg19_bn": ("E", True, "f09a924cb0d201ea6f61601df9559141382271d7", "vgg19_bn-c79401a0.pth"),
}

# The original torchvision checkpoints (with classifier), kept as a public fact table like SMP's.
pretrained_settings = {
    name: {
        "imagenet": {
            "url": f"https://download.pytorch.org/models/{file}",
            "input_size": [3, 224, 224],
            "num_classes": 1000,
            **IMAGENET,
        }
    }
    for name, (_, _, _, file) in _SPECS.items()
}

ENCODERS = vgg_encoders = {
    name: {
        "encoder": VGGEncoder,
        "pretrained_settings": {"imagenet": hub(f"smp-hub/{name}.imagenet", revision)},
        "params": {
            "out_channels": [64, 128, 256, 512, 512, 512],
            "config": cfg[config],
            "batch_norm": batch_norm,
        },
    }
    for name, (config, batch_norm, revision, _) in _SPECS.items()
}
