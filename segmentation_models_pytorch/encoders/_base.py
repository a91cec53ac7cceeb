"""The encoder contract shared by every backbone.

An encoder is an ``nn.Module`` that also inherits :class:`EncoderMixin`. Its ``forward(x)`` returns
``depth + 1`` feature maps, highest resolution first: ``[x, f1, f2, ..., f_depth]`` where ``f_i`` has
spatial stride ``2**i`` (capped at ``output_stride`` when the encoder is dilated). Decoders only rely
on this list, on ``out_channels`` and on the capability attributes below — never on encoder names.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import nn

from . import _utils


class EncoderMixin:
    """Adds the attributes and helpers every segmentation encoder needs.

    Attributes expected on the instance (set them in ``__init__``):
        _out_channels: channels of each feature, including the input itself (index 0).
        _depth: number of down-sampling stages actually run (1..5).
        _in_channels: number of input channels the first convolution accepts.
        _output_stride: total stride of the deepest feature (32 unless dilated).

    Capability flags read by decoders (class attributes, override where they differ):
        _has_stride2_feature: ``False`` for encoders (e.g. transformers) whose first feature map is at
            stride 4; they report a 0-channel placeholder at stride 2.
        _unet_center_block: ``True`` when Unet should add its convolutional center block (VGG).
        _max_depth: deepest ``depth`` the encoder can produce.
    """

    _is_torch_scriptable = True
    _is_torch_exportable = True
    _is_torch_compilable = True

    # Class-level defaults so encoders that never call EncoderMixin.__init__ (as in SMP's docs) work.
    _depth = 5
    _in_channels = 3
    _output_stride = 32

    _has_stride2_feature = True
    _unet_center_block = False
    _min_depth = 1
    _max_depth = 5

    def __init__(self) -> None:
        self._depth = 5
        self._in_channels = 3
        self._output_stride = 32

    @property
    def out_channels(self) -> List[int]:
        """Channels of each tensor returned by ``forward`` (input first)."""
        return list(self._out_channels[: self._depth + 1])

    @property
    def output_stride(self) -> int:
        """Total stride of the deepest returned feature."""
        return min(self._output_stride, 1 << self._depth)  # int (2**n is a float in TorchScript)

    @property
    def reductions(self) -> List[int]:
        """Spatial stride of each returned feature relative to the input."""
        return [min(1 << i, self.output_stride) for i in range(self._depth + 1)]

    @property
    @torch.jit.unused
    def supports_dilation(self) -> bool:
        """Whether :meth:`make_dilated` can turn the last stages' strides into dilation."""
        return type(self).get_stages is not EncoderMixin.get_stages

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Adapt the first convolution to ``in_channels`` inputs.

        With pretrained weights, 1 channel gets the sum of the RGB kernels and any other count gets the
        RGB kernels cycled over the new channels, scaled by ``3 / in_channels`` so the response to a
        constant image keeps its magnitude. Without pretrained weights the layer is re-initialised.
        """
        if in_channels == 3:
            return
        self._in_channels = in_channels
        if self._out_channels[0] == 3:
            self._out_channels = [in_channels, *list(self._out_channels)[1:]]
        _utils.patch_first_conv(self, new_in_channels=in_channels, pretrained=pretrained)

    def get_stages(self) -> Dict[int, Sequence[nn.Module]]:
        """Map each stride (16, 32) to the modules that produce it; used by :meth:`make_dilated`."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support dilation (output_stride 8/16): it does not "
            "define get_stages()."
        )

    def make_dilated(self, output_stride: int) -> None:
        """Replace the strides of the stages deeper than ``output_stride`` with dilation."""
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16 to dilate an encoder, got {output_stride}.")
        for stage_stride, modules in self.get_stages().items():
            if stage_stride <= output_stride:
                continue
            rate = stage_stride // output_stride
            for module in modules:
                _utils.replace_strides_with_dilation(module, rate)
        self._output_stride = output_stride


def strip_head(module: nn.Module, state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """``state_dict`` with the keys ``module`` holds: old key names renamed first where its class
    has a ``convert_state_dict`` (DenseNet), the original classifier's keys (the class's
    ``_ignored_weight_prefixes``) dropped. The caller's mapping is not modified."""
    convert = getattr(module, "convert_state_dict", None)
    state_dict = convert(dict(state_dict)) if callable(convert) else dict(state_dict)
    prefixes = tuple(getattr(module, "_ignored_weight_prefixes", ()))
    if prefixes:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
    return state_dict


def load_state_dict_without_head(
    self: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
):
    """``load_state_dict`` for an encoder: a whole ImageNet checkpoint loads, as in SMP.

    Encoder classes use it as ``load_state_dict = load_state_dict_without_head``. It loads
    :func:`strip_head` of the checkpoint and does nothing else, which ``_weights.load_into``
    relies on (it strips the same keys itself).
    """
    return nn.Module.load_state_dict(self, strip_head(self, state_dict), strict=strict, assign=assign)


def check_features(encoder: nn.Module, features: List[torch.Tensor]) -> None:
    """Validate a custom encoder's output against its declared ``out_channels`` (clear errors)."""
    expected = list(encoder.out_channels)
    if len(features) != len(expected):
        raise RuntimeError(
            f"Encoder {type(encoder).__name__} returned {len(features)} features but declares "
            f"{len(expected)} out_channels {expected}; forward must return depth + 1 tensors."
        )
    for i, (f, c) in enumerate(zip(features, expected)):
        if f.shape[1] != c:
            raise RuntimeError(
                f"Encoder {type(encoder).__name__} feature {i} has {f.shape[1]} channels but "
                f"out_channels[{i}] = {c}."
            )
