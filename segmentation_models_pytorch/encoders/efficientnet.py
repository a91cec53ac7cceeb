"""EfficientNet-B0..B7 encoders built from the ``efficientnet-pytorch`` package (SMP's layout).

The package's network is built once and its layers are adopted under the package's own attribute
names (``_conv_stem``, ``_blocks.N._depthwise_conv``...), which are the checkpoint keys. Each
``MBConvBlock`` is re-wrapped in :class:`MBConvBlock` below: same sub-modules, but a forward that
TorchScript can compile (the package's reads a namedtuple attribute) and a plain SiLU activation.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base import modules as md
from ..base import recompute, small_conv
from ..base.initialization import DEFAULT_INIT_TYPES, default_init, deferred_init
from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import HALF, IMAGENET, hub


def _drop_connect(x: torch.Tensor, p: float) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability ``p`` and rescale the survivors."""
    keep = 1.0 - p
    mask = torch.floor(keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device))
    return x / keep * mask


class _SiLU(nn.SiLU):
    """SiLU that works in place when autograd is off (nothing else holds its input then).

    One instance per call site, used by the autograd and the inference path alike, so that tools
    which trace modules (the fast path's conv + activation fusion) see the same graph in both."""

    onednn_post_op = "swish"  # computes exactly this activation: optimize_for_inference may fuse it

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(input, inplace=not torch.is_grad_enabled())


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (expand -> depthwise -> squeeze-excite -> project [+ skip]).

    Args:
        block: an ``efficientnet_pytorch.model.MBConvBlock`` whose layers are taken over.
        drop_connect_rate: stochastic-depth probability of this block (training only).
    """

    def __init__(self, block: nn.Module, drop_connect_rate: float = 0.0) -> None:
        super().__init__()
        args = block._block_args
        self._has_expansion = args.expand_ratio != 1
        self._has_se = bool(block.has_se)
        # The package keeps the first block of a stage's stride as a one-element list.
        stride = args.stride[0] if isinstance(args.stride, (list, tuple)) else args.stride
        self._has_skip = bool(args.id_skip) and stride == 1 and args.input_filters == args.output_filters
        self._drop_connect_rate = float(drop_connect_rate)

        # Registration order matters: it is the state-dict key order of SMP checkpoints.
        self._expand_conv = block._expand_conv if self._has_expansion else nn.Identity()
        self._bn0 = block._bn0 if self._has_expansion else nn.Identity()
        self._depthwise_conv = block._depthwise_conv
        self._bn1 = block._bn1
        if self._has_se:
            self._se_reduce = block._se_reduce
            self._se_expand = block._se_expand
        else:  # placeholders so TorchScript sees the attributes (no parameters)
            self._se_reduce = nn.Identity()
            self._se_expand = nn.Identity()
        self._project_conv = block._project_conv
        self._bn2 = block._bn2
        self._swish = nn.SiLU()  # squeeze-excitation and the training chains
        self._act0 = _SiLU()  # after _bn0 and _bn1 (no parameters: no state-dict keys)
        self._act1 = _SiLU()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if recompute.scope_active():
                return self._chained_forward(inputs)
        # Without autograd the excitation and the residual sum write into the tensor their layer
        # just made (nothing else holds it; the SiLUs do the same): one full-size buffer per layer
        # instead of two or three, and a fresh buffer costs as much as the pass that fills it.
        in_place = not torch.is_grad_enabled()
        x = inputs
        if self._has_expansion:
            x = self._expand_conv(x)
            x = self._act0(self._bn0(x) if torch.jit.is_scripting() else self._norm("_bn0", x, in_place))
        x = self._depthwise_conv(x)
        x = self._act1(self._bn1(x) if torch.jit.is_scripting() else self._norm("_bn1", x, in_place))
        if self._has_se:
            s = x.mean((2, 3), keepdim=True)
            s = torch.sigmoid(self._se_expand(self._swish(self._se_reduce(s))))
            x = x.mul_(s) if in_place else s * x
        x = self._project_conv(x)
        x = self._bn2(x) if torch.jit.is_scripting() else self._norm("_bn2", x, in_place)
        return self._residual(x, inputs, in_place)

    @torch.jit.unused  # TorchScript calls the norm layer itself
    def _norm(self, name: str, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        return md.batch_norm_into(getattr(self, name), x, in_place)

    def _residual(self, x: torch.Tensor, inputs: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        if self._has_skip:
            if self.training and self._drop_connect_rate > 0:
                x = _drop_connect(x, self._drop_connect_rate)
            x = x.add_(inputs) if in_place else x + inputs
        return x

    @torch.jit.unused
    def _chained_forward(self, inputs):
        """:meth:`forward` in a model's training forward: of the expanded (widest) tensors only the
        two convolution outputs are kept; norms, activations, padding and the excitation product are
        recomputed in backward."""
        pad, depthwise = _split_static_padding(self._depthwise_conv)
        if self._has_expansion:
            chain = recompute.Chain(self._expand_conv(inputs))
            chain.norm(self._bn0)
            chain.act(self._swish)
            chain.act(pad)
            x = chain.consume(depthwise)
        else:
            x = self._depthwise_conv(inputs)
        chain = recompute.Chain(x)
        chain.norm(self._bn1)
        x = chain.act(self._swish)
        if self._has_se:
            s = x.mean((2, 3), keepdim=True)
            s = self._se_expand(self._swish(self._se_reduce(s)))
            chain.mul(torch.sigmoid(s))
        pad, project = _split_static_padding(self._project_conv)
        chain.act(pad)
        return self._residual(self._bn2(chain.consume(project)), inputs)


def _fold_symmetric_padding(module: nn.Module) -> None:
    """Give "same"-padding convs whose static pad is symmetric (all stride-1 ones) that padding
    as their own ``padding``: the same zeros without a padded copy of the input (no parameters
    change). Asymmetric pads (stride 2 on even sizes) stay."""
    from efficientnet_pytorch.utils import Conv2dStaticSamePadding

    for m in module.modules():
        if type(m) is Conv2dStaticSamePadding and type(m.static_padding) is nn.ZeroPad2d:
            left, right, top, bottom = m.static_padding.padding
            if left == right and top == bottom and tuple(m.padding) == (0, 0):
                m.padding = (top, left)
                m.static_padding = nn.Identity()


_NO_PADDING = nn.Identity()


def _split_static_padding(conv: nn.Module):
    """``(padding module, convolution without it)`` for efficientnet-pytorch's static "same"-padding
    conv (its forward is exactly the two), so that a chain can recompute the padded copy too."""
    from efficientnet_pytorch.utils import Conv2dStaticSamePadding

    if type(conv) is not Conv2dStaticSamePadding:
        # _NO_PADDING is a shared module: this runs in every training forward
        return _NO_PADDING, functools.partial(small_conv.conv_for_training, conv)

    def convolve(t: torch.Tensor) -> torch.Tensor:  # small maps: the cheaper weight gradient
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        return small_conv.conv2d_for_training(t, conv.weight, conv.bias, *args)

    return conv.static_padding, convolve


class EfficientNetEncoder(nn.Module, EncoderMixin):
    """EfficientNet (``efficientnet-pytorch``) without its classifier, one feature per stride.

    Args:
        out_indexes: indexes of the blocks whose outputs are the stride 4, 8, 16 and 32 features.
        out_channels: channels of the input and of each feature.
        model_name: ``efficientnet-b0`` ... ``efficientnet-b7``.
        depth: number of stages to run (1..5).
        output_stride: 32, or 16/8 once :meth:`make_dilated` is applied.
    """

    _ignored_weight_prefixes = ("_fc.",)

    def __init__(
        self,
        out_indexes: List[int],
        out_channels: List[int],
        model_name: str,
        depth: int = 5,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        if len(out_indexes) != 4 or len(out_channels) != 6:
            raise ValueError(
                "EfficientNetEncoder needs 4 out_indexes (blocks ending strides 4..32) and 6 "
                f"out_channels, got {list(out_indexes)} and {list(out_channels)}."
            )
        from efficientnet_pytorch import EfficientNet

        if model_name not in _MODEL_NAMES:
            raise ValueError(
                f"Unknown efficientnet-pytorch model {model_name!r}; expected one of {_MODEL_NAMES}."
            )
        # The package only runs PyTorch's default layer init: the same, in one parallel pass.
        build = lambda: EfficientNet.from_name(model_name, include_top=False)  # noqa: E731
        with deferred_init(build, DEFAULT_INIT_TYPES) as net:
            default_init(net)
        self._global_params = net._global_params
        self._blocks_args = net._blocks_args
        self._drop_connect_rate = float(self._global_params.drop_connect_rate or 0.0)

        n_blocks = len(net._blocks)
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        # SMP scales the drop-connect rate linearly with the block index.
        self._blocks = nn.ModuleList(
            MBConvBlock(b, self._drop_connect_rate * i / n_blocks) for i, b in enumerate(net._blocks)
        )
        self._conv_head = net._conv_head
        self._bn1 = net._bn1
        self._swish = nn.SiLU()
        self._stem_act = _SiLU()
        _fold_symmetric_padding(self)

        self._out_indexes = [int(i) for i in out_indexes]
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    load_state_dict = load_state_dict_without_head

    @torch.jit.unused  # TorchScript calls the norm layer itself
    def _norm(self, name: str, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        return md.batch_norm_into(getattr(self, name), x, in_place)

    def get_stages(self) -> Dict[int, Sequence[nn.Module]]:
        i = self._out_indexes
        return {16: [self._blocks[i[1] + 1 : i[2] + 1]], 32: [self._blocks[i[2] + 1 :]]}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = [x]
        if self._depth >= 1:
            x = self._conv_stem(x)
            in_place = not torch.is_grad_enabled()
            x = self._stem_act(self._bn0(x) if torch.jit.is_scripting() else self._norm("_bn0", x, in_place))
            features.append(x)
        # Blocks after the deepest requested feature are never run.
        last_block = self._out_indexes[self._depth - 2] if self._depth >= 2 else -1
        for i, block in enumerate(self._blocks):
            if i <= last_block:
                x = block(x)
                if i in self._out_indexes:
                    features.append(x)
        return features


_MODEL_NAMES = tuple(f"efficientnet-b{i}" for i in range(8))

# name -> (out_channels, out_indexes, hub revisions of the "imagenet" and "advprop" weights)
_SPECS = {
    "efficientnet-b0": ([3, 32, 24, 40, 112, 320], [2, 4, 8, 15], (
        "1bbe7ecc1d5ea1d2058de1a2db063b8701aff314", "29043c08140d9c6ee7de1468d55923f2b06bcec2")),
    "efficientnet-b1": ([3, 32, 24, 40, 112, 320], [4, 7, 15, 22], (
        "5d637466a5215de300a8ccb13a39357df2df2bf4", "2e518b8b0955bbab467f50525578dab6b6086afc")),
    "efficientnet-b2": ([3, 32, 24, 48, 120, 352], [4, 7, 15, 22], (
        "a96d4f0295ffbae18ebba173bf7f3c0c8f21990e", "be788c20dfb0bbe83b4c439f9cfe0dd937c0783e")),
    "efficientnet-b3": ([3, 40, 32, 48, 136, 384], [4, 7, 17, 25], (
        "074c54a6c473e0d294690d49cedb6cf463e7127d", "9ccc166d87bd9c08d6bed4477638c7f4bb3eec78")),
    "efficientnet-b4": ([3, 48, 32, 56, 160, 448], [5, 9, 21, 31], (
        "05cd5dde5dab658f00c463f9b9aa0ced76784f40", "f04caa809ea4eb08ee9e7fd555f5514ebe2a9ef5")),
    "efficientnet-b5": ([3, 48, 40, 64, 176, 512], [7, 12, 26, 38], (
        "69f4d28460a4e421b7860bc26ee7d832e03e01ca", "dabe78fc8ab7ce93ddc2bb156b01db227caede88")),
    "efficientnet-b6": ([3, 56, 40, 72, 200, 576], [8, 14, 30, 44], (
        "8570752016f7c62ae149cffa058550fe44e21c8b", "c2dbb4d1359151165ec7b96cfe54a9cac2142a31")),
    "efficientnet-b7": ([3, 64, 48, 80, 224, 640], [10, 17, 37, 54], (
        "5a5dbe687d612ebc3dca248274fd1191111deda6", "ce33edb4e80c0cde268f098ae2299e23f615577d")),
}

# "imagenet" weights expect ImageNet normalisation; "advprop" ones were trained on [-1, 1] inputs.
ENCODERS = efficient_net_encoders = {
    name: {
        "encoder": EfficientNetEncoder,
        "pretrained_settings": {
            "imagenet": hub(f"smp-hub/{name}.imagenet", imagenet_rev, IMAGENET),
            "advprop": hub(f"smp-hub/{name}.advprop", advprop_rev, HALF),
        },
        "params": {"out_channels": channels, "out_indexes": indexes, "model_name": name},
    }
    for name, (channels, indexes, (imagenet_rev, advprop_rev)) in _SPECS.items()
}
