"""EfficientNet / EfficientNet-Lite encoders assembled from timm's EfficientNet builder (SMP layout).

These are SMP's historical ``timm-efficientnet-*`` encoders: timm's generic ``EfficientNet`` class
driven by an explicit architecture definition (symmetric padding, PyTorch BatchNorm defaults), which
is what their checkpoints were converted for. timm is imported only when one is built.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import HALF, IMAGENET, hub

# EfficientNet-B0 stages in timm's block-string notation (type_repeats_kernel_stride_expand_chs[_se]).
_EFFICIENTNET_ARCH = (
    ("ds_r1_k3_s1_e1_c16_se0.25",),
    ("ir_r2_k3_s2_e6_c24_se0.25",),
    ("ir_r2_k5_s2_e6_c40_se0.25",),
    ("ir_r3_k3_s2_e6_c80_se0.25",),
    ("ir_r3_k5_s1_e6_c112_se0.25",),
    ("ir_r4_k5_s2_e6_c192_se0.25",),
    ("ir_r1_k3_s1_e6_c320_se0.25",),
)
# Lite variants drop squeeze-excitation (and use ReLU6, a fixed stem and a fixed head width).
_LITE_ARCH = tuple((stage[0].replace("_se0.25", ""),) for stage in _EFFICIENTNET_ARCH)


def get_efficientnet_kwargs(
    channel_multiplier: float = 1.0, depth_multiplier: float = 1.0, drop_rate: float = 0.2
) -> Dict[str, Any]:
    """Keyword arguments of timm's ``EfficientNet`` for a scaled EfficientNet (Swish, with SE).

    Args:
        channel_multiplier: width scaling of every stage.
        depth_multiplier: scaling of the number of blocks per stage.
        drop_rate: dropout before the (unused) classifier.
    """
    from timm.layers.activations import Swish
    from timm.models._efficientnet_builder import decode_arch_def, round_channels

    return dict(
        block_args=decode_arch_def([list(s) for s in _EFFICIENTNET_ARCH], depth_multiplier),
        num_features=round_channels(1280, channel_multiplier, 8, None),
        stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=channel_multiplier),
        act_layer=Swish,
        drop_rate=drop_rate,
        drop_path_rate=0.2,
    )


def gen_efficientnet_lite_kwargs(
    channel_multiplier: float = 1.0, depth_multiplier: float = 1.0, drop_rate: float = 0.2
) -> Dict[str, Any]:
    """Keyword arguments of timm's ``EfficientNet`` for EfficientNet-Lite (ReLU6, no SE).

    Args:
        channel_multiplier: width scaling of every stage (stem and head stay fixed).
        depth_multiplier: scaling of the number of blocks per stage (first/last stage fixed).
        drop_rate: dropout before the (unused) classifier.
    """
    from timm.models._efficientnet_builder import decode_arch_def, round_channels

    return dict(
        block_args=decode_arch_def(
            [list(s) for s in _LITE_ARCH], depth_multiplier, fix_first_last=True
        ),
        num_features=1280,
        stem_size=32,
        fix_stem=True,
        round_chs_fn=partial(round_channels, multiplier=channel_multiplier),
        act_layer=nn.ReLU6,
        drop_rate=drop_rate,
        drop_path_rate=0.2,
    )


class EfficientNetBaseEncoder(nn.Module, EncoderMixin):
    """timm ``EfficientNet`` without its classifier, returning one feature per stride.

    Args:
        stage_idxs: indexes of the timm stages that start strides 8, 16 and 32.
        out_channels: channels of the input and of each feature.
        depth: number of stages to run (1..5).
        output_stride: 32, or 16/8 once :meth:`make_dilated` is applied.
        **kwargs: passed to ``timm.models.efficientnet.EfficientNet``.
    """

    _ignored_weight_prefixes = ("classifier.",)

    def __init__(
        self,
        stage_idxs: List[int],
        out_channels: List[int],
        depth: int = 5,
        output_stride: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        from timm.models.efficientnet import EfficientNet

        kwargs.setdefault("num_classes", 0)  # no classifier to build only to throw away
        net = EfficientNet(**kwargs)
        # Adopt the backbone's modules under timm's names (the checkpoint keys), in timm's order.
        for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"):
            setattr(self, name, getattr(net, name))

        self._stage_idxs = [int(i) for i in stage_idxs]
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    load_state_dict = load_state_dict_without_head

    def get_stages(self) -> Dict[int, Sequence[nn.Module]]:
        i = self._stage_idxs
        return {16: [self.blocks[i[1] : i[2]]], 32: [self.blocks[i[2] :]]}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = [x]
        if self._depth >= 1:
            x = self.bn1(self.conv_stem(x))  # timm's BatchNormAct2d includes the activation
            features.append(x)
        if self._depth >= 2:
            x = self.blocks[1](self.blocks[0](x))
            features.append(x)
        if self._depth >= 3:
            x = self.blocks[2](x)
            features.append(x)
        if self._depth >= 4:
            x = self.blocks[4](self.blocks[3](x))
            features.append(x)
        if self._depth >= 5:
            x = self.blocks[6](self.blocks[5](x))
            features.append(x)
        return features


class EfficientNetEncoder(EfficientNetBaseEncoder):
    """EfficientNet-B* (Swish, squeeze-excitation) scaled by width/depth multipliers."""

    def __init__(
        self,
        stage_idxs: List[int],
        out_channels: List[int],
        depth: int = 5,
        channel_multiplier: float = 1.0,
        depth_multiplier: float = 1.0,
        drop_rate: float = 0.2,
        output_stride: int = 32,
    ) -> None:
        kwargs = get_efficientnet_kwargs(channel_multiplier, depth_multiplier, drop_rate)
        super().__init__(
            stage_idxs=stage_idxs, out_channels=out_channels, depth=depth,
            output_stride=output_stride, **kwargs,
        )


class EfficientNetLiteEncoder(EfficientNetBaseEncoder):
    """EfficientNet-Lite (ReLU6, no squeeze-excitation) scaled by width/depth multipliers."""

    def __init__(
        self,
        stage_idxs: List[int],
        out_channels: List[int],
        depth: int = 5,
        channel_multiplier: float = 1.0,
        depth_multiplier: float = 1.0,
        drop_rate: float = 0.2,
        output_stride: int = 32,
    ) -> None:
        kwargs = gen_efficientnet_lite_kwargs(channel_multiplier, depth_multiplier, drop_rate)
        super().__init__(
            stage_idxs=stage_idxs, out_channels=out_channels, depth=depth,
            output_stride=output_stride, **kwargs,
        )


# Weights names -> normalisation. These are TF checkpoints ported by timm: AdvProp and all Lite
# weights expect inputs scaled to [-1, 1]; the others ImageNet mean/std.
_NORM = {"imagenet": IMAGENET, "advprop": HALF, "noisy-student": IMAGENET, "noisy-student-475": IMAGENET}

# name -> (class, out_channels, channel multiplier, depth multiplier, drop rate, {weights: revision})
_SPECS = {
    "timm-efficientnet-b0": (EfficientNetEncoder, [3, 32, 24, 40, 112, 320], 1.0, 1.0, 0.2, {
        "imagenet": "8419e9cc19da0b68dcd7bb12f19b7c92407ad7c4",
        "advprop": "a5870af2d24ce79e0cc7fae2bbd8e0a21fcfa6d8",
        "noisy-student": "bea8b0ff726a50e48774d2d360c5fb1ac4815836",
    }),
    "timm-efficientnet-b1": (EfficientNetEncoder, [3, 32, 24, 40, 112, 320], 1.0, 1.1, 0.2, {
        "imagenet": "63bdd65ef6596ef24f1cadc7dd4f46b624442349",
        "advprop": "79b3d102080ef679b16c2748e608a871112233d0",
        "noisy-student": "36856124a699f6032574ceeefab02040daa90a9a",
    }),
    "timm-efficientnet-b2": (EfficientNetEncoder, [3, 32, 24, 48, 120, 352], 1.1, 1.2, 0.3, {
        "imagenet": "e693adb39d3cb3847e71e3700a0c2aa58072cff1",
        "advprop": "b58479bf78007cfbb365091d64eeee369bddfa21",
        "noisy-student": "67c558827c6d3e0975ff9b4bce8557bc2ca80931",
    }),
    "timm-efficientnet-b3": (EfficientNetEncoder, [3, 40, 32, 48, 136, 384], 1.2, 1.4, 0.3, {
        "imagenet": "1666b835b5151d6bb2067c7cd67e67ada6c39edf",
        "advprop": "70474cdb9f1ff4fcbd7434e66560ead1ab8e506b",
        "noisy-student": "2367bc9f61e79ee97684169a71a87db280bcf4db",
    }),
    "timm-efficientnet-b4": (EfficientNetEncoder, [3, 48, 32, 56, 160, 448], 1.4, 1.8, 0.4, {
        "imagenet": "07868c28ab308f4de4cf1e7ec54b33b8b002ccdb",
        "advprop": "8ea1772ee9a2a0d18c1b56dce0dfac8dd33d537d",
        "noisy-student": "faeb77b6e8292a700380c840d39442d7ce4d6443",
    }),
    "timm-efficientnet-b5": (EfficientNetEncoder, [3, 48, 40, 64, 176, 512], 1.6, 2.2, 0.4, {
        "imagenet": "004153b4ddd93d30afd9bbf34329d7f57396d413",
        "advprop": "1d1c5f05aab5ed9a1d5052847ddd4024c06a464d",
        "noisy-student": "9bc3a1e5490de92b1af061d5c2c474ab3129e38c",
    }),
    "timm-efficientnet-b6": (EfficientNetEncoder, [3, 56, 40, 72, 200, 576], 1.8, 2.6, 0.5, {
        "imagenet": "dbbf28a5c33f021486db4070de693caad6b56c3d",
        "advprop": "3b5d3412047f7711c56ffde997911cfefe79f835",
        "noisy-student": "9b899ea9e8e0ce2ccada0f34a8cb8b5028e9bb36",
    }),
    "timm-efficientnet-b7": (EfficientNetEncoder, [3, 64, 48, 80, 224, 640], 2.0, 3.1, 0.5, {
        "imagenet": "8ef7ffccf54dad9baceb21d05b7ef86b6b70f4cc",
        "advprop": "fcbc576ffb939c12d5cd8dad523fdae6eb0177ca",
        "noisy-student": "6b1dd73e61bf934d485d7bd4381dc3e2ab374664",
    }),
    "timm-efficientnet-b8": (EfficientNetEncoder, [3, 72, 56, 88, 248, 704], 2.2, 3.6, 0.5, {
        "imagenet": "b5e9dde35605a3a6d17ea2a727382625f9066a37",
        "advprop": "e43f381de72e7467383c2c80bacbb7fcb9572866",
    }),
    "timm-efficientnet-l2": (EfficientNetEncoder, [3, 136, 104, 176, 480, 1376], 4.3, 5.3, 0.5, {
        "noisy-student": "cdc711e76d1becdd9197169f1a8bb1b2094e980c",
        "noisy-student-475": "35f5ba667a64bf4f3f0689daf84fc6d0f8e1311b",
    }),
    "timm-tf_efficientnet_lite0": (EfficientNetLiteEncoder, [3, 32, 24, 40, 112, 320], 1.0, 1.0, 0.2, {
        "imagenet": "f5729249af07e5d923fb8b16922256ce2865d108",
    }),
    "timm-tf_efficientnet_lite1": (EfficientNetLiteEncoder, [3, 32, 24, 40, 112, 320], 1.0, 1.1, 0.2, {
        "imagenet": "7b5e3f8dbb0c13b74101773584bba7523721be72",
    }),
    "timm-tf_efficientnet_lite2": (EfficientNetLiteEncoder, [3, 32, 24, 48, 120, 352], 1.1, 1.2, 0.3, {
        "imagenet": "cc5f6cd4c7409ebacc13292f09d369ae88547f6a",
    }),
    "timm-tf_efficientnet_lite3": (EfficientNetLiteEncoder, [3, 32, 32, 48, 136, 384], 1.2, 1.4, 0.3, {
        "imagenet": "ab29c8402991591d66f813bbb1f061565d9b0cd0",
    }),
    "timm-tf_efficientnet_lite4": (EfficientNetLiteEncoder, [3, 32, 32, 56, 160, 448], 1.4, 1.8, 0.4, {
        "imagenet": "91a822e0f03c255b34dfb7846d3858397e50ba39",
    }),
}


ENCODERS = timm_efficientnet_encoders = {
    name: {
        "encoder": cls,
        "pretrained_settings": {
            weights: hub(
                f"smp-hub/{name}.{weights}", revision,
                HALF if cls is EfficientNetLiteEncoder else _NORM[weights],
            )
            for weights, revision in revisions.items()
        },
        "params": {
            "out_channels": channels,
            "stage_idxs": [2, 3, 5],
            "channel_multiplier": width,
            "depth_multiplier": depth_mult,
            "drop_rate": drop,
        },
    }
    for name, (cls, channels, width, depth_mult, drop, revisions) in _SPECS.items()
}
