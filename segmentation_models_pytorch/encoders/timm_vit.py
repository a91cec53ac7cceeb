"""Plain (non-hierarchical) timm vision transformers as encoders.

:class:`TimmViTEncoder` is SMP 0.6.0's ViT wrapper used by DPT: it keeps the whole timm model under
``model`` and returns, for a few evenly spaced blocks, the patch-token maps (all at the patch stride)
plus the prefix (class / register) tokens of each block.

For the ``tu-`` registry path, plain models are turned into a multi-scale encoder by
:class:`~segmentation_models_pytorch.encoders.timm_universal.TimmUniversalEncoder` (see
``docs/timm_encoders.md``); it shares :func:`sample_block_indices_uniformly` with this module.
"""

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn


def sample_block_indices_uniformly(n: int, total_num_blocks: int) -> List[int]:
    """Indices of ``n`` blocks spread evenly over ``total_num_blocks``, ending at the last block.

    E.g. 4 of 12 blocks -> ``[2, 5, 8, 11]`` (the convention of DPT and of SMP 0.6.0).
    """
    return [int(total_num_blocks / n * k) - 1 for k in range(1, n + 1)]


def validate_output_indices(output_indices: Sequence[int], model_num_blocks: int, depth: int) -> None:
    """Raise a ``ValueError`` unless every index addresses one of the ``model_num_blocks`` blocks."""
    for index in output_indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"`output_indices` must hold integers, got {list(output_indices)}.")
        if not -model_num_blocks <= index < model_num_blocks:
            raise ValueError(
                f"Output indices for feature extraction should be in range [-{model_num_blocks}, "
                f"{model_num_blocks}), because the model has {model_num_blocks} blocks, got "
                f"index = {index}."
            )


def preprocess_output_indices(
    output_indices: Optional[Sequence[int]], model_num_blocks: int, depth: int
) -> List[int]:
    """The blocks to read: ``output_indices`` validated, or ``depth`` evenly spaced ones if ``None``."""
    if output_indices is None:
        return sample_block_indices_uniformly(depth, model_num_blocks)
    if not isinstance(output_indices, (list, tuple)):
        raise ValueError(
            "`output_indices` for encoder should be a list/tuple/None, got "
            f"{type(output_indices)}"
        )
    validate_output_indices(output_indices, model_num_blocks, depth)
    return list(output_indices)


class TimmViTEncoder(nn.Module):
    """A plain timm ViT returning per-block feature maps and prefix tokens (SMP 0.6.0 compatible).

    Attributes:
        model: the timm model (all of it, classifier included: its keys are ``model.*``).
        out_channels: channels of each returned feature map.
        output_strides: stride of each returned feature map (the patch size).
        output_stride: stride of the last one.
        has_prefix_tokens: whether ``forward`` returns prefix (class / register) tokens.
        input_size: the pretrained config's ``(C, H, W)`` input size, if known.
        is_fixed_input_size: whether the model only takes ``input_size`` images (unless built with
            ``img_size=...`` or ``dynamic_img_size=True``).
    """

    # Prefix tokens make the forward untypable for TorchScript.
    _is_torch_scriptable = False
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        in_channels: int = 3,
        depth: int = 4,
        output_indices: Optional[list[int]] = None,
        **kwargs: dict[str, Any],  # (sic) SMP 0.6.0's annotation, kept for signature compatibility
    ) -> None:
        """Build the timm model ``name`` and choose the blocks to read.

        Args:
            name: timm model name, optionally with a pretrained tag
                (``"vit_small_patch16_224.augreg_in21k"``).
            pretrained: load timm's pretrained weights for that tag (needs the network or the HF cache);
                or a local weights file / state dict (this encoder's or an original timm checkpoint).
            in_channels: number of input channels (timm adapts the patch embedding).
            depth: number of blocks to read features from.
            output_indices: which blocks (negative counts from the end); default: ``depth`` evenly spaced
                blocks ending at the last one.
            **kwargs: passed to ``timm.create_model`` (e.g. ``img_size=512``, ``dynamic_img_size=True``).
        """
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"`encoder_depth` should be greater than 1, got {depth}.")
        if kwargs.pop("output_stride", None) is not None:
            raise ValueError("Dilated mode not supported, set output stride to None")
        if isinstance(output_indices, (list, tuple)) and len(output_indices) != depth:
            raise ValueError(
                "Length of output indices for feature extraction should be equal to the depth of "
                f"the encoder architecture, got output indices length - {len(output_indices)}, "
                f"encoder depth - {depth}"
            )
        from .timm_universal import create_timm_model, merge_timm_kwargs, resolve_timm_weights

        self.name = name
        # Besides a bool, ``pretrained`` may be a local file or a state dict (an extension): this
        # encoder's own (``model.*``) or an original timm checkpoint, which timm loads itself.
        flag, state_dict, source = resolve_timm_weights(name, pretrained)
        own_layout = state_dict is not None and any(k.startswith("model.") for k in state_dict)
        if state_dict is not None and not own_layout:
            overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "state_dict": state_dict}
            kwargs["pretrained_cfg_overlay"] = overlay
            flag = True
        create_kwargs = merge_timm_kwargs({"in_chans": in_channels, "pretrained": flag}, kwargs)
        self.model = create_timm_model(name, create_kwargs)
        if own_layout:
            from . import _weights

            _weights.load_into(self, state_dict, source)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"Encoder `{name}` does not support `forward_intermediates` for feature extraction. "
                "Please update `timm` or use another encoder."
            )
        feature_info = self.model.feature_info
        num_blocks = len(feature_info)
        if depth > num_blocks:
            raise ValueError(
                "Depth of the encoder cannot exceed the number of blocks in the model got "
                f"{depth} depth, model has {num_blocks} blocks"
            )
        output_indices = preprocess_output_indices(output_indices, num_blocks, depth)

        self._num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self._has_cls_token = bool(getattr(self.model, "has_cls_token", False))
        self._output_indices = output_indices
        self._in_channels = in_channels
        self._depth = depth

        self.output_strides = [feature_info[i]["reduction"] for i in output_indices]
        self.output_stride = self.output_strides[-1]
        self.out_channels = [feature_info[i]["num_chs"] for i in output_indices]
        self.has_prefix_tokens = self._num_prefix_tokens > 0
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.input_size: Optional[Tuple[int, ...]] = cfg.get("input_size", None)
        self.is_fixed_input_size: bool = bool(cfg.get("fixed_input_size", False))

    def forward(
        self, x: torch.Tensor
    ) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """Return ``(features, prefix_tokens)``: NCHW maps of the chosen blocks and their prefix tokens.

        ``prefix_tokens[i]`` is ``(B, num_prefix_tokens, C)``, or ``None`` for models without them.
        """
        if self.has_prefix_tokens:
            outputs = self.model.forward_intermediates(
                x, indices=self._output_indices, intermediates_only=True, return_prefix_tokens=True
            )
            features = [out[0] for out in outputs]
            prefix_tokens: List[Optional[torch.Tensor]] = [out[1] for out in outputs]
            return features, prefix_tokens
        features = self.model.forward_intermediates(
            x, indices=self._output_indices, intermediates_only=True
        )
        return features, [None] * len(features)


def vit_level_blocks(num_blocks: int, depth: int) -> Sequence[int]:
    """Blocks feeding the multi-scale levels (strides 4, 8, ..., ``2**depth``) of a plain model.

    Four evenly spaced blocks are chosen for the four levels of a depth-5 encoder; a shallower encoder
    keeps the first ones, so a level's feature does not depend on ``depth`` (as with CNNs).
    """
    return [max(0, i) for i in sample_block_indices_uniformly(4, num_blocks)][: max(0, depth - 1)]
