"""MobileOne-S0..S4 encoders (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone").

MobileOne is a MobileNet-style stack of depthwise 3x3 and pointwise 1x1 blocks whose training-time
form has several parallel *linear* branches per block: ``num_conv_branches`` conv+BN branches, a 1x1
conv+BN "scale" branch (for kernels larger than 1) and a BN-only identity branch (when the shape is
kept). Because every branch is linear, they fold into one convolution with a bias after training
(:meth:`MobileOneBlock.reparameterize`, :func:`reparameterize_model`), giving a plain, fast network
with the same outputs in eval mode. Parameter names follow SMP 0.6.0 so its checkpoints load as is.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _utils
from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import hub

__all__ = ["MobileOne", "MobileOneBlock", "SEBlock", "reparameterize_model"]


class SEBlock(nn.Module):
    """Squeeze-and-excitation: rescale channels by a gate computed from their global average.

    Args:
        in_channels: channels of the input.
        rd_ratio: width of the bottleneck relative to ``in_channels``.
    """

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = int(in_channels * rd_ratio)
        self.reduce = nn.Conv2d(in_channels, hidden, kernel_size=1, stride=1, bias=True)
        self.expand = nn.Conv2d(hidden, in_channels, kernel_size=1, stride=1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(inputs.mean((2, 3), keepdim=True))))
        return inputs * torch.sigmoid(gate)


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, groups: int
) -> nn.Sequential:
    branch = nn.Sequential()
    branch.add_module(
        "conv",
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                  groups=groups, bias=False),
    )
    branch.add_module("bn", nn.BatchNorm2d(out_channels))
    return branch


def _fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``bn(conv(x))`` as a single convolution (BN in eval mode)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class MobileOneBlock(nn.Module):
    """A MobileOne block: parallel linear branches summed, then optional SE and ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel of the main branches (3 for depthwise blocks, 1 for pointwise ones).
        stride: stride of the block.
        padding: padding of the main branches.
        dilation: dilation of the fused convolution (inference mode only).
        groups: convolution groups (``in_channels`` for depthwise blocks).
        inference_mode: build the fused single-convolution form directly.
        use_se: apply squeeze-excitation before the activation.
        num_conv_branches: number of parallel kxk conv+BN branches.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        inference_mode: bool = False,
        use_se: bool = False,
        num_conv_branches: int = 1,
    ) -> None:
        super().__init__()
        self.inference_mode = inference_mode
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches

        # Registration order below is the state-dict order of SMP checkpoints.
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip: Optional[nn.BatchNorm2d] = None
        self.rbr_scale: Optional[nn.Sequential] = None
        if inference_mode:
            self.reparam_conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias=True,
            )
            self.rbr_conv = nn.ModuleList()
        else:
            self.reparam_conv = nn.Identity()
            if in_channels == out_channels and stride == 1:
                self.rbr_skip = nn.BatchNorm2d(in_channels)
            self.rbr_conv = nn.ModuleList(
                _conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups)
                for _ in range(num_conv_branches)
            )
            if kernel_size > 1:
                self.rbr_scale = _conv_bn(in_channels, out_channels, 1, stride, 0, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        # Sum order (scale, identity, conv branches) mirrors the reference implementation.
        terms: List[torch.Tensor] = []
        if self.rbr_scale is not None:
            terms.append(self.rbr_scale(x))
        if self.rbr_skip is not None:
            terms.append(self.rbr_skip(x))
        for branch in self.rbr_conv:
            terms.append(branch(x))
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return self.activation(self.se(out))

    def _identity_kernel(self, like: torch.Tensor) -> torch.Tensor:
        """The kxk (grouped) kernel of the identity map."""
        per_group = self.in_channels // self.groups
        kernel = torch.zeros(
            (self.in_channels, per_group, self.kernel_size, self.kernel_size),
            dtype=like.dtype, device=like.device,
        )
        centre = self.kernel_size // 2
        channels = torch.arange(self.in_channels, device=like.device)
        kernel[channels, channels % per_group, centre, centre] = 1.0
        return kernel

    @torch.no_grad()
    def _get_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the single convolution equal to the sum of all branches (eval BN)."""
        kernel, bias = _fold_bn(self.rbr_conv[0].conv.weight, self.rbr_conv[0].bn)
        for branch in list(self.rbr_conv)[1:]:
            k, b = _fold_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + k, bias + b
        if self.rbr_scale is not None:
            k, b = _fold_bn(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            pad = self.kernel_size // 2  # the 1x1 kernel sits at the centre of the kxk one
            kernel, bias = kernel + F.pad(k, [pad, pad, pad, pad]), bias + b
        if self.rbr_skip is not None:
            k, b = _fold_bn(self._identity_kernel(kernel), self.rbr_skip)
            kernel, bias = kernel + k, bias + b
        return kernel, bias

    def reparameterize(self) -> None:
        """Fold all branches into ``reparam_conv`` in place (outputs unchanged in eval mode)."""
        if self.inference_mode:
            return
        kernel, bias = self._get_kernel_bias()
        ref = self.rbr_conv[0].conv
        conv = nn.Conv2d(
            ref.in_channels, ref.out_channels, ref.kernel_size, stride=ref.stride,
            padding=ref.padding, dilation=ref.dilation, groups=ref.groups, bias=True,
            device=kernel.device, dtype=kernel.dtype,
        )
        conv.weight.data.copy_(kernel)
        conv.bias.data.copy_(bias)
        self.reparam_conv = conv
        self.rbr_conv = nn.ModuleList()
        self.rbr_scale = None
        self.rbr_skip = None
        self.inference_mode = True


class MobileOne(nn.Module, EncoderMixin):
    """MobileOne encoder: a stem block and four stages, one feature per stride.

    Args:
        out_channels: channels of the input and of each feature.
        num_blocks_per_stage: (depthwise + pointwise) block pairs in each of the four stages.
        width_multipliers: width scaling of the four stages.
        inference_mode: build the re-parameterised (single-branch) form directly.
        use_se: squeeze-excitation in the second half of stage 3 and all of stage 4.
        depth: number of stages to run (1..5).
        in_channels: input channels of the stem.
        output_stride: 32, or 16/8 once :meth:`make_dilated` is applied.
        num_conv_branches: parallel kxk branches per block (the stem always has one).
    """

    _ignored_weight_prefixes = ("linear.",)

    def __init__(
        self,
        out_channels: List[int],
        num_blocks_per_stage: Sequence[int] = (2, 8, 10, 1),
        width_multipliers: Optional[Sequence[float]] = None,
        inference_mode: bool = False,
        use_se: bool = False,
        depth: int = 5,
        in_channels: int = 3,
        output_stride: int = 32,
        num_conv_branches: int = 1,
    ) -> None:
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        if width_multipliers is None or len(width_multipliers) != 4:
            raise ValueError(
                f"MobileOne needs 4 width_multipliers (one per stage), got {width_multipliers}."
            )
        if len(num_blocks_per_stage) != 4:
            raise ValueError(
                f"MobileOne needs 4 num_blocks_per_stage, got {list(num_blocks_per_stage)}."
            )
        super().__init__()
        self.inference_mode = inference_mode
        self.use_se = use_se
        self.num_conv_branches = num_conv_branches
        self.in_planes = min(64, int(64 * width_multipliers[0]))

        self._depth = depth
        self._in_channels = in_channels
        self._out_channels = list(out_channels)
        if self._out_channels[0] == 3:
            self._out_channels[0] = in_channels
        self._output_stride = output_stride

        self.stage0 = MobileOneBlock(
            in_channels, self.in_planes, kernel_size=3, stride=2, padding=1,
            inference_mode=inference_mode,
        )
        self.cur_layer_idx = 1
        blocks = list(num_blocks_per_stage)
        self.stage1 = self._make_stage(int(64 * width_multipliers[0]), blocks[0], 0)
        self.stage2 = self._make_stage(int(128 * width_multipliers[1]), blocks[1], 0)
        self.stage3 = self._make_stage(
            int(256 * width_multipliers[2]), blocks[2], blocks[2] // 2 if use_se else 0
        )
        self.stage4 = self._make_stage(
            int(512 * width_multipliers[3]), blocks[3], blocks[3] if use_se else 0
        )

    def _make_stage(self, planes: int, num_blocks: int, num_se_blocks: int) -> nn.Sequential:
        """``num_blocks`` (depthwise 3x3, pointwise 1x1) pairs; the first one has stride 2 and the
        last ``num_se_blocks`` pairs use squeeze-excitation."""
        if num_se_blocks > num_blocks:
            raise ValueError(f"Number of SE blocks ({num_se_blocks}) exceeds blocks ({num_blocks}).")
        layers = []
        for i in range(num_blocks):
            use_se = i >= num_blocks - num_se_blocks
            common = dict(
                inference_mode=self.inference_mode, use_se=use_se,
                num_conv_branches=self.num_conv_branches,
            )
            layers.append(
                MobileOneBlock(self.in_planes, self.in_planes, kernel_size=3,
                               stride=2 if i == 0 else 1, padding=1, groups=self.in_planes, **common)
            )
            layers.append(MobileOneBlock(self.in_planes, planes, kernel_size=1, stride=1, padding=0,
                                         groups=1, **common))
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*layers)

    load_state_dict = load_state_dict_without_head

    def get_stages(self) -> Dict[int, Sequence[nn.Module]]:
        return {16: [self.stage3], 32: [self.stage4]}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = [x]
        if self._depth >= 1:
            x = self.stage0(x)
            features.append(x)
        if self._depth >= 2:
            x = self.stage1(x)
            features.append(x)
        if self._depth >= 3:
            x = self.stage2(x)
            features.append(x)
        if self._depth >= 4:
            x = self.stage3(x)
            features.append(x)
        if self._depth >= 5:
            x = self.stage4(x)
            features.append(x)
        return features

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Adapt every stem convolution (all parallel branches, or the fused one) to ``in_channels``."""
        if in_channels == self._in_channels:
            return
        old = self._in_channels
        stem = self.stage0
        for module in list(stem.modules()):
            if isinstance(module, nn.Conv2d) and module.in_channels == old:
                _utils.patch_first_conv(
                    module, new_in_channels=in_channels, default_in_channels=old,
                    pretrained=pretrained,
                )
        stem.in_channels = in_channels
        if self._out_channels[0] == old:
            self._out_channels[0] = in_channels
        self._in_channels = in_channels

    def reparameterize(self) -> None:
        """Fold every block's branches into a single convolution, in place (see
        :func:`reparameterize_model` for a copying version)."""
        for module in list(self.modules()):
            if isinstance(module, MobileOneBlock):
                module.reparameterize()
        self.inference_mode = True


def reparameterize_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every MobileOne block re-parameterised for inference.

    Args:
        model: any module containing MobileOne blocks (an encoder or a whole segmentation model);
            every sub-module with a ``reparameterize()`` method is re-parameterised.

    Returns:
        A deep copy in which each block is a single convolution; in eval mode it computes the same
        outputs as ``model``.
    """
    model = copy.deepcopy(model)
    # Like SMP, any sub-module offering ``reparameterize()`` is folded (blocks are idempotent).
    for module in list(model.modules()):
        fold = getattr(module, "reparameterize", None)
        if callable(fold):
            fold()
    return model


# name -> (out_channels, extra params, hub revision of the ImageNet weights)
_SPECS = {
    "mobileone_s0": ([3, 48, 48, 128, 256, 1024],
                     {"width_multipliers": (0.75, 1.0, 1.0, 2.0), "num_conv_branches": 4},
                     "f52815cf0ad29278a9860c9cd5fabf19f904bedf"),
    "mobileone_s1": ([3, 64, 96, 192, 512, 1280], {"width_multipliers": (1.5, 1.5, 2.0, 2.5)},
                     "5707a98852b762cd8e0c43b5c8c729cd28496677"),
    "mobileone_s2": ([3, 64, 96, 256, 640, 2048], {"width_multipliers": (1.5, 2.0, 2.5, 4.0)},
                     "ddc3db8fa40d271902c7a8c95cee6691f617d551"),
    "mobileone_s3": ([3, 64, 128, 320, 768, 2048], {"width_multipliers": (2.0, 2.5, 3.0, 4.0)},
                     "da89b84a91b7400c366c358bfbf8dd0b2fa4dde2"),
    "mobileone_s4": ([3, 64, 192, 448, 896, 2048],
                     {"width_multipliers": (3.0, 3.5, 3.5, 4.0), "use_se": True},
                     "16197c55d599076b6aae67a83d3b3f70c31b097c"),
}

# Apple's ImageNet weights (unfused checkpoints), ImageNet-normalised RGB in [0, 1].
ENCODERS = mobileone_encoders = {
    name: {
        "encoder": MobileOne,
        "pretrained_settings": {"imagenet": hub(f"smp-hub/{name}.imagenet", revision)},
        "params": {"out_channels": channels, **extra, "inference_mode": False},
    }
    for name, (channels, extra, revision) in _SPECS.items()
}
