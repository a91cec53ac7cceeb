"""ResNet and ResNeXt encoders (torchvision networks, SMP's weight names and layout)."""

from __future__ import annotations

import functools
from typing import Dict, List, Sequence, Union

import torch
from torch import nn

from ..base import modules as md
from ..base import recompute
from ..base.initialization import TORCHVISION_INIT_TYPES, deferred_init, torchvision_init
from ..base.small_conv import conv_for_training
from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import hub


def _block_class(block: Union[str, type]) -> type:
    from torchvision.models import resnet as tv

    if isinstance(block, str):
        return {"basic": tv.BasicBlock, "bottleneck": tv.Bottleneck}[block]
    return block  # SMP-style hand-made entries pass the torchvision class itself


def _init_like_torchvision(net: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's ResNet initialisation: He-normal (fan_out) convs, unit norms, fresh statistics."""
    from torchvision.models import resnet as tv

    torchvision_init(net)
    if zero_init_residual:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, tv.Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, tv.BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


class ResNetEncoder(nn.Module, EncoderMixin):
    """torchvision ResNet/ResNeXt without its classifier, returning one feature per stride."""

    _ignored_weight_prefixes = ("fc.",)

    def __init__(
        self,
        out_channels: Sequence[int],
        block: Union[str, type] = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        depth: int = 5,
        output_stride: int = 32,
        groups: int = 1,
        width_per_group: int = 64,
        **kwargs,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        from torchvision.models.resnet import ResNet

        # torchvision would run every layer's default init and then overwrite it with its own scheme:
        # skip the first (twice the work otherwise) and run the second, on parallel RNG streams.
        build = lambda: ResNet(  # noqa: E731
            _block_class(block), list(layers), groups=groups, width_per_group=width_per_group, **kwargs
        )
        with deferred_init(build, TORCHVISION_INIT_TYPES) as net:
            del net.fc  # the classifier is never used
            _init_like_torchvision(net, zero_init_residual=kwargs.get("zero_init_residual", False))
        # Adopt the backbone's modules under the same attribute names: they are the checkpoint keys.
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    def get_stages(self) -> Dict[int, Sequence[nn.Module]]:
        return {16: [self.layer3], 32: [self.layer4]}

    load_state_dict = load_state_dict_without_head

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if not torch.jit.is_scripting():
            if recompute.scope_active():
                return self._chained_forward(x)
        features = [x]
        if self._depth >= 1:
            x = self.conv1(x)
            x = self.bn1(x) if torch.jit.is_scripting() else self._stem_norm(x)
            x = self.relu(x)
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

    @torch.jit.unused  # TorchScript runs the layer
    def _stem_norm(self, x):
        """The stem's norm, in place on the conv output without autograd (:func:`batch_norm_into`)."""
        return md.batch_norm_into(self.bn1, x, md.computes_plain_conv2d(self.conv1))

    @torch.jit.unused
    def _chained_forward(self, x):
        """:meth:`forward` in a model's training forward: residual blocks keep fewer tensors."""
        features = [x]
        if self._depth < 1:
            return features
        stem = recompute.Chain(self.conv1(x))
        stem.norm(self.bn1)
        x = stem.act(self.relu)  # also the stride-2 feature: kept only if a decoder keeps it
        features.append(x)
        for i, layer in enumerate([self.layer1, self.layer2, self.layer3, self.layer4]):
            if self._depth >= i + 2:
                if i == 0:  # the pool keeps its (recomputed) input, not int64 indices
                    pool = recompute.max_pool_keeping_input(self.maxpool) if stem.active else self.maxpool
                    x = stem.consume(pool)
                for block in layer:
                    x = _chained_block(block, x)
                features.append(x)
        return features


def _chained_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision residual block with each norm and ReLU chained into the next convolution.

    Same operations as ``BasicBlock.forward`` / ``Bottleneck.forward``; other block types run as is.
    """
    from torchvision.models import resnet as tv

    if type(block) is tv.BasicBlock:
        links = [(block.bn1, block.conv2)]  # each norm (+ ReLU) feeds the next convolution
        last_bn = block.bn2
    elif type(block) is tv.Bottleneck:
        links = [(block.bn1, block.conv2), (block.bn2, block.conv3)]
        last_bn = block.bn3
    else:
        return block(x)
    y = conv_for_training(block.conv1, x)
    for bn, conv in links:
        y = recompute.norm_act_into(y, bn, block.relu, functools.partial(conv_for_training, conv))
    out = last_bn(y)
    identity = x if block.downsample is None else block.downsample(x)
    out += identity
    return block.relu(out)


_BASIC = [3, 64, 64, 128, 256, 512]
_BOTTLENECK = [3, 64, 256, 512, 1024, 2048]

# name -> (block, layers, groups, width_per_group, {weights name: (hub repo revision)})
_SPECS = {
    "resnet18": ("basic", [2, 2, 2, 2], 1, 64, {
        "imagenet": "3f2325ff978283d47aa6a1d6878ca20565622683",
        "ssl": "d600d5116aac2e6e595f99f40612074c723c00b2",
        "swsl": "0e3a35d4d8e344088c14a96eee502a88ac70eae1",
    }),
    "resnet34": ("basic", [3, 4, 6, 3], 1, 64, {
        "imagenet": "7a57b34f723329ff020b3f8bc41771163c519d0c",
    }),
    "resnet50": ("bottleneck", [3, 4, 6, 3], 1, 64, {
        "imagenet": "00cb74e366966d59cd9a35af57e618af9f88efe9",
        "ssl": "d07daf5b4377f3700c6ac61906b0aafbc4eca46b",
        "swsl": "b9520cce124f91c6fe7eee45721a2c7954f0d8c0",
    }),
    "resnet101": ("bottleneck", [3, 4, 23, 3], 1, 64, {
        "imagenet": "cd7c15e8c51da86ae6a084515fdb962d0c94e7d1",
    }),
    "resnet152": ("bottleneck", [3, 8, 36, 3], 1, 64, {
        "imagenet": "951dd835e9d086628e447b484584c8983f9e1dd0",
    }),
    "resnext50_32x4d": ("bottleneck", [3, 4, 6, 3], 32, 4, {
        "imagenet": "329793c85d62fd340ae42ae39fb905a63df872e7",
        "ssl": "9b67cff77d060c7044493a58c24d1007c1eb06c3",
        "swsl": "52e6e49da61b8e26ca691e1aef2cbb952884057d",
    }),
    "resnext101_32x4d": ("bottleneck", [3, 4, 23, 3], 32, 4, {
        "ssl": "b39796c8459084d13523b7016c3ef13a2e9e472b",
        "swsl": "3f8355b4892a31f001a832b49b2b01484d48516a",
    }),
    "resnext101_32x8d": ("bottleneck", [3, 4, 23, 3], 32, 8, {
        "imagenet": "221af6198d03a4ee88992f78a1ee81b46a52d339",
        "instagram": "44cd927aa6e64673ffe9d31230bad44abc18b823",
        "ssl": "723a95ddeed335c9488c37c6cbef13d779ac8f97",
        "swsl": "58cf0bb65f91365470398080d9588b187d1777c4",
    }),
    "resnext101_32x16d": ("bottleneck", [3, 4, 23, 3], 32, 16, {
        "instagram": "64e8e320eeae6501185b0627b2429a68e52d050c",
        "ssl": "1283fe03fbb6aa2599b2df24095255acb93c3d5c",
        "swsl": "30ba61bbd4d6af0d955c513dbb4f557b84eb094f",
    }),
    "resnext101_32x32d": ("bottleneck", [3, 4, 23, 3], 32, 32, {
        "instagram": "c9405de121fdaa275a89de470fb19409e3eeaa86",
    }),
    "resnext101_32x48d": ("bottleneck", [3, 4, 23, 3], 32, 48, {
        "instagram": "53e61a962b824ad7027409821f9ac3e3336dd024",
    }),
}

# All these weights expect ImageNet-normalised RGB in [0, 1].
ENCODERS = resnet_encoders = {
    name: {
        "encoder": ResNetEncoder,
        "pretrained_settings": {
            weights: hub(f"smp-hub/{name}.{weights}", revision)
            for weights, revision in revisions.items()
        },
        "params": {
            "out_channels": list(_BASIC if block == "basic" else _BOTTLENECK),
            "block": block,
            "layers": layers,
            **({"groups": groups, "width_per_group": width} if groups != 1 else {}),
        },
    }
    for name, (block, layers, groups, width, revisions) in _SPECS.items()
}
