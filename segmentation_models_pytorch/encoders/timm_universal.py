"""Any timm model as a segmentation encoder: the ``tu-<model>[.<tag>]`` names.

:class:`TimmUniversalEncoder` asks timm for a feature extractor (``features_only=True``) and arranges
its outputs in the encoder contract: ``[x, f2, f4, f8, f16, f32]`` (strides 1..32) truncated to
``depth + 1``. timm models come in a few layouts; the first three are handled as in SMP 0.6.0, so the
state dict (``model.*``), ``out_channels`` and outputs are the same:

* CNN-style (features at strides 2, 4, 8, 16, 32): returned as is, after the input.
* transformer-style (strides 4, 8, 16, 32; Swin, ConvNeXt, MaxViT-like hybrids...): a 0-channel
  placeholder stands for stride 2 (``_has_stride2_feature`` is ``False``); channels-last (NHWC)
  outputs are permuted to NCHW.
* VGG-style (strides 1, 2, ..., 32): the stride-1 feature replaces the input.

Everything else is an extension ("resampled" layout): plain ViT-like models (every block at the
patch stride), models with gaps or non-power-of-two strides (EfficientViT-M at 16/32/64, PiT,
Sequencer, CrossViT...) and models with fewer stages than ``depth``. For each stride 4..2**depth one
timm feature is picked (plain models: four evenly spaced blocks; others: the nearest stride, in log
scale) and resized to exactly ``ceil(H / stride)`` (bilinear up-sampling, area down-sampling).
"""

# No ``from __future__ import annotations`` here: TorchScript needs the real annotations.
import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat
from .._errors import UnknownNameError, unknown_name
from . import _utils, _weights
from ._base import EncoderMixin

WeightsArg = Union[None, bool, str, "os.PathLike[str]", Mapping[str, torch.Tensor]]

# Arguments the encoder sets itself; users choose them through the encoder's own arguments.
_OWN_ARGS = {
    "in_chans": "in_channels",
    "features_only": "(always True)",
    "pretrained": "encoder_weights",
    "out_indices": "encoder_depth",
    "output_stride": "output_stride",
}


class UnknownTimmModelError(UnknownNameError, RuntimeError):
    """Unknown timm model or tag (a ``RuntimeError`` too, like timm's own error)."""


def _timm():
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a dependency
        raise ImportError("'tu-' encoders need the `timm` package: pip install timm") from err
    return timm


def merge_timm_kwargs(ours: Dict[str, Any], user: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge the encoder's own ``timm.create_model`` arguments with the user's, refusing overlaps."""
    duplicates = sorted(set(ours) & set(user))
    if duplicates:
        hints = ", ".join(f"{k} -> {_OWN_ARGS.get(k, 'the encoder argument')}" for k in duplicates)
        raise ValueError(
            f"'{set(duplicates)}' already specified internally: the encoder sets these timm "
            f"arguments itself; use its own arguments instead ({hints})."
        )
    return {**ours, **user}


def _check_name(name: str) -> None:
    """Clear errors for unknown timm models / tags (timm's are terse)."""
    timm = _timm()
    if not isinstance(name, str) or not name:
        raise TypeError(f"timm model name must be a non-empty string, got {name!r}.")
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        err = unknown_name("timm model", arch, timm.list_models(), "timm.list_models()")
        raise UnknownTimmModelError(
            f"{err} Any timm model can be used as 'tu-<model>' (plus an optional '.<pretrained tag>')."
        )
    if tag:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*")
            raise UnknownTimmModelError(
                f"Unknown pretrained tag {tag!r} for timm model {arch!r}. "
                + (f"Available: {', '.join(tags)}." if tags else f"{arch} has no pretrained tags.")
            ) from None


def _has_weight_source(name: str, create_kwargs: Mapping[str, Any]) -> bool:
    if create_kwargs.get("pretrained_cfg_overlay") or create_kwargs.get("pretrained_cfg"):
        return True  # e.g. pretrained_cfg_overlay=dict(file="/path/to/timm_checkpoint.pth")
    return bool(_timm().models.is_model_pretrained(name))


def create_timm_model(name: str, create_kwargs: Dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with clear errors for unknown names, bad arguments and missing weights."""
    _check_name(name)
    timm = _timm()
    pretrained = bool(create_kwargs.get("pretrained", False))
    if pretrained and not _has_weight_source(name, create_kwargs):
        tags = timm.list_pretrained(name.split(".")[0] + ".*")
        raise ValueError(
            f"timm model {name!r} has no pretrained weights (timm would silently use random ones). "
            f"Use encoder_weights=None, or a tag with weights: {tags}."
        )
    try:
        return timm.create_model(name, **create_kwargs)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise TypeError(f"timm model {name!r} does not accept an argument it was given: {err}") from err
    except Exception as err:
        if not pretrained:
            raise
        # Tell a download problem apart from a configuration problem: the same model without
        # weights must build (on the meta device: no memory is allocated).
        try:
            with torch.device("meta"):
                timm.create_model(name, **{**create_kwargs, "pretrained": False})
        except Exception:
            raise err from None
        overlay = create_kwargs.get("pretrained_cfg_overlay") or {}
        if "state_dict" in overlay or "file" in overlay:
            raise ValueError(
                f"timm could not load the given weights into timm model {name!r}: "
                f"{type(err).__name__}: {err}"
            ) from err
        raise _weights.WeightsUnavailableError(
            f"Could not load the pretrained weights of timm model {name!r} "
            f"({type(err).__name__}: {err}).\nWithout network: download them on a connected machine "
            "(they land in the Hugging Face cache, which you can copy; set HF_HUB_OFFLINE=1 to use "
            "it), or pass a local file as encoder_weights='/path/to/weights.safetensors', or use "
            "encoder_weights=None for random initialisation."
        ) from err


# create_model arguments that only say where weights come from
_WEIGHT_KWARGS = ("pretrained_cfg_overlay", "pretrained_cfg", "checkpoint_path", "cache_dir")
_OOM = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", ()))

_CACHE: Dict[Tuple[str, str, str], Any] = {}


def _cached(kind: str, name: str, kwargs: Mapping[str, Any], compute: Any) -> Any:
    """Memoise probes (meta-device builds cost about as much as real ones) per model and kwargs."""
    key = (kind, name, repr(sorted(kwargs.items(), key=lambda kv: kv[0])))
    if key not in _CACHE:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = compute()
    return _CACHE[key]


def _layout(name: str, kwargs: Dict[str, Any]) -> Tuple[List[Any], List[Dict[str, Any]], bool]:
    """``(default feature strides, every feature's info, channels-last?)`` from a weightless build."""

    def compute():
        probe = _meta_features_model(name, kwargs)
        info = probe.feature_info
        reductions = [int(r) if float(r).is_integer() else float(r) for r in info.reduction()]
        full = [{"reduction": i["reduction"], "num_chs": i["num_chs"]} for i in info.info]
        return reductions, full, str(getattr(probe, "output_fmt", "")).endswith("NHWC")

    return _cached("layout", name, kwargs, compute)


def _meta_features_model(name: str, create_kwargs: Dict[str, Any]) -> nn.Module:
    """Build a feature extractor without allocating weights (meta device), falling back to CPU."""
    timm = _timm()
    kwargs = {**create_kwargs, "pretrained": False, "features_only": True}
    try:
        with torch.device("meta"):
            return timm.create_model(name, **kwargs)
    except Exception:
        return create_timm_model(name, kwargs)


def _as_hw(size: Any) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[-2], size[-1]) if len(size) >= 2 else (size[0], size[0])


@torch.jit.unused
def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # very old torch
        return False


def _resize(feature: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a feature map to exactly ``height x width`` (area for shrinking, bilinear otherwise)."""
    h, w = feature.shape[-2], feature.shape[-1]
    if h == height and w == width:
        return feature
    if h >= height and w >= width:
        return F.adaptive_avg_pool2d(feature, (height, width))
    return F.interpolate(feature, size=(height, width), mode="bilinear", align_corners=False)


def _pick_sources(
    infos: Sequence[Mapping[str, Any]], depth: int
) -> Tuple[List[int], bool, bool]:
    """Timm feature index for each level 1..depth of a non-SMP layout (``-1``: 0-channel placeholder).

    Returns ``(sources, plain, has_stride2)``.
    """
    reductions = [float(info["reduction"]) for info in infos]
    plain = len(set(reductions)) == 1
    exact2 = [i for i, r in enumerate(reductions) if r == 2]
    sources = [exact2[-1] if exact2 else -1]
    if plain:
        from .timm_vit import vit_level_blocks

        sources += list(vit_level_blocks(len(infos), depth))
    else:
        for level in range(2, depth + 1):
            # nearest stride in log scale; on ties the deeper feature (more semantic)
            best = min(
                range(len(reductions)),
                key=lambda i: (round(abs(math.log2(reductions[i]) - level), 6), -i),
            )
            sources.append(best)
    return sources[:depth], plain, bool(exact2)


class TimmUniversalEncoder(nn.Module, EncoderMixin):
    """A timm model as a multi-scale encoder (``tu-`` names); SMP 0.6.0's class, extended.

    Attributes:
        name: the timm model name (with its pretrained tag, without ``tu-``).
        model: the timm feature extractor; its parameters are the encoder's state dict (``model.*``).
    """

    __jit_unused_properties__ = ["out_channels", "output_stride", "reductions", "supports_dilation"]
    _level_sources: List[int]  # annotated so TorchScript types the (possibly empty) list

    _is_torch_scriptable = True
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(
        self,
        name: str,
        pretrained: bool = True,
        in_channels: int = 3,
        depth: int = 5,
        output_stride: int = 32,
        **kwargs: dict[str, Any],  # (sic) SMP 0.6.0's annotation, kept for signature compatibility
    ) -> None:
        """Build the timm feature extractor.

        Args:
            name: timm model name, optionally with a pretrained tag (``"convnext_tiny.fb_in22k"``).
            pretrained: load timm's weights for the tag (needs the network or the HF cache).
            in_channels: number of input channels (timm adapts the first convolution).
            depth: number of down-sampling stages (1..5).
            output_stride: 32, or 16 / 8 for models that support timm's ``output_stride`` (dilation).
            **kwargs: passed to ``timm.create_model`` (e.g. ``img_size=512`` for fixed-size models,
                ``drop_path_rate=0.1``).
        """
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be one of 8, 16, 32; got {output_stride!r}.")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")
        self.name = name
        user_kwargs = dict(kwargs)
        own = {"in_chans": in_channels, "features_only": True, "pretrained": pretrained, "out_indices": None}
        merge_timm_kwargs(own, user_kwargs)  # clear error for arguments the encoder sets itself
        # Weight sources (pretrained_cfg_overlay=dict(file=...)) do not change the architecture: keep
        # them (possibly a whole state dict) out of the probes and their cache keys.
        weight_kwargs = {k: user_kwargs.pop(k) for k in _WEIGHT_KWARGS if k in user_kwargs}
        base = {"in_chans": in_channels, **user_kwargs}

        reductions, full, self._is_channel_last = _layout(name, base)
        n = len(reductions)
        style = _smp_style(reductions)
        available = {"transformer": n + 1, "traditional": n, "vgg": n - 1}.get(style or "", 0)
        if style is not None and depth > available:
            style = None  # SMP would fail; resample to reach the requested depth instead
        self._is_transformer_style = style == "transformer"
        self._is_vgg_style = style == "vgg"
        self._resampled = style is None
        self._level_sources: List[int] = []

        if self._resampled:
            sources, plain, has2 = _pick_sources(full, depth)
            if output_stride != 32:
                raise ValueError(
                    f"tu-{name} cannot be dilated (output_stride={output_stride}): its features are "
                    "resampled to the encoder strides (see docs/timm_encoders.md). Use output_stride=32."
                )
            if plain and not any(
                k in user_kwargs for k in ("img_size", "dynamic_img_size", "dynamic_img_pad")
            ):
                base = _with_dynamic_size(name, base)
            used = sorted({s for s in sources if s >= 0}) or [0]  # depth 1: a feature is needed
            out_indices: Tuple[int, ...] = tuple(used)
            self._level_sources = [used.index(s) if s >= 0 else -1 for s in sources]
            self._has_stride2_feature = has2
            self._plain = plain
            if plain:  # timm's forward_intermediates (ViT & co) cannot be scripted
                self._is_torch_scriptable = False
        else:
            self._plain = False
            self._has_stride2_feature = not self._is_transformer_style
            count = {"transformer": depth - 1, "traditional": depth, "vgg": depth + 1}[style]
            start = _default_start(name, style)
            out_indices = tuple(range(start, start + count))

        create_kwargs = {**base, **weight_kwargs}
        create_kwargs.update(features_only=True, out_indices=out_indices, pretrained=bool(pretrained))
        if output_stride != 32:
            create_kwargs["output_stride"] = output_stride
        try:
            self.model = create_timm_model(name, create_kwargs)
        except TypeError as err:
            if output_stride != 32 and "output_stride" in str(err):
                raise ValueError(_no_dilation_message(name, output_stride)) from err
            raise
        channels = list(self.model.feature_info.channels())
        if output_stride != 32:
            got = max(self.model.feature_info.reduction() or [1])
            if got > output_stride:
                raise ValueError(_no_dilation_message(name, output_stride))

        if self._resampled:
            self._out_channels = [in_channels] + [
                channels[s] if s >= 0 else 0 for s in self._level_sources
            ]
        elif self._is_transformer_style:
            self._out_channels = [in_channels, 0] + channels
        elif self._is_vgg_style:
            self._out_channels = channels
        else:
            self._out_channels = [in_channels] + channels

        self._in_channels = in_channels
        self._depth = depth
        self._output_stride = output_stride
        self._max_depth = 5
        self._supports_dilation: Optional[bool] = None if output_stride == 32 else True
        self._probe_kwargs = base
        self._fixed_input_size = _fixed_input_size(name, base)
        img_size = _as_hw(user_kwargs.get("img_size"))
        if img_size is not None:
            arch_kwargs = {k: v for k, v in create_kwargs.items() if k not in _WEIGHT_KWARGS}
            self._check_input_size(img_size, arch_kwargs)

    # ------------------------------------------------------------------ capabilities
    @property
    def out_channels(self) -> List[int]:
        """Channels of each tensor returned by ``forward`` (input first; 0 for a placeholder)."""
        return list(self._out_channels[: self._depth + 1])

    @property
    def supports_dilation(self) -> bool:
        """Whether timm supports ``output_stride`` 8/16 for this model (checked on the meta device)."""
        if self._supports_dilation is None:
            self._supports_dilation = (not self._resampled) and _probe_dilation(
                self.name, self._probe_kwargs
            )
        return bool(self._supports_dilation)

    def make_dilated(self, output_stride: int) -> None:
        """timm dilates at construction: pass ``output_stride`` to ``get_encoder`` / the model."""
        if output_stride == self._output_stride:
            return
        raise ValueError(
            f"tu-{self.name} was built with output_stride={self._output_stride}; timm encoders are "
            f"dilated when created: build it again with output_stride={output_stride}."
        )

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Adapt the first convolution (normally timm does it at construction via ``in_chans``)."""
        if in_channels == self._in_channels:
            return
        _utils.patch_first_conv(
            self.model, new_in_channels=in_channels, default_in_channels=self._in_channels,
            pretrained=pretrained,
        )
        if self._out_channels[0] == self._in_channels and not self._is_vgg_style:
            self._out_channels = [in_channels, *self._out_channels[1:]]
        self._in_channels = in_channels

    # ------------------------------------------------------------------ weights
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights; checkpoints of SMP's deprecated ``timm-*`` encoders (and state dicts of the
        bare timm feature extractor, without ``model.``) are renamed to this layout first.

        The caller's mapping is not modified.
        """
        state_dict = _compat.remap_encoder_state_dict(dict(state_dict), self.name)
        if state_dict and not any(k.startswith("model.") for k in state_dict):
            state_dict = {f"model.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Strictly load an encoder state dict, adapting a 3-channel first conv to ``in_channels``."""
        state_dict = _compat.remap_encoder_state_dict(dict(state_dict), self.name)
        if state_dict and not any(k.startswith("model.") for k in state_dict):
            state_dict = {f"model.{k}": v for k, v in state_dict.items()}
        own = self.state_dict()
        for key, value in list(state_dict.items()):
            target = own.get(key)
            if (
                target is not None and value.dim() == 4 and target.dim() == 4
                and value.shape[1] != target.shape[1] and target.shape[1] == self._in_channels
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
            ):
                from timm.models import adapt_input_conv

                state_dict[key] = adapt_input_conv(self._in_channels, value)
        _weights.load_into(self, state_dict, source)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Return ``depth + 1`` NCHW features, highest resolution first (the input itself first)."""
        if torch.jit.is_scripting() or torch.jit.is_tracing() or _is_compiling():
            features = self.model(x)
        else:
            features = self._checked_forward(x)

        if self._is_channel_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]

        if self._resampled:
            return self._arrange(x, features)
        if self._is_transformer_style:
            b, h, w = x.shape[0], x.shape[2], x.shape[3]
            placeholder = torch.empty([b, 0, h // 2, w // 2], dtype=x.dtype, device=x.device)
            features = [placeholder] + features
        if not self._is_vgg_style:
            features = [x] + features
        return self._fix_sizes(x, features)

    def _fix_sizes(self, x: torch.Tensor, features: List[torch.Tensor]) -> List[torch.Tensor]:
        """Resize the rare features whose size is neither floor nor ceil of ``input / stride``.

        E.g. MobileViTv2 pads its stride-32 map to 8x8 for a 224 input; decoders that add pyramid
        levels (FPN) need 7x7. A no-op for every well-behaved model (SMP 0.6.0's outputs).
        """
        h, w = x.shape[2], x.shape[3]
        out: List[torch.Tensor] = []
        for i, f in enumerate(features):
            s = min(1 << i, self._output_stride)
            fh, fw = f.shape[-2], f.shape[-1]
            if h // s <= fh <= (h + s - 1) // s and w // s <= fw <= (w + s - 1) // s:
                out.append(f)
            else:
                out.append(_resize(f, (h + s - 1) // s, (w + s - 1) // s))
        return out

    def _arrange(self, x: torch.Tensor, features: List[torch.Tensor]) -> List[torch.Tensor]:
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        out = [x]
        for level, source in enumerate(self._level_sources):
            stride = 1 << (level + 1)
            th, tw = (h + stride - 1) // stride, (w + stride - 1) // stride
            if source < 0:
                out.append(torch.empty([b, 0, th, tw], dtype=x.dtype, device=x.device))
            else:
                out.append(_resize(features[source], th, tw))
        return out

    @torch.jit.unused
    def _checked_forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        try:
            return self.model(x)
        except (RuntimeError, AssertionError, ValueError) as err:
            if isinstance(err, _OOM) or x.dim() != 4:
                raise
            got = (int(x.shape[-2]), int(x.shape[-1]))
            fixed = self._fixed_input_size
            least = _min_input_size(self.name)
            detail = f"({type(err).__name__}: {err})"
            if fixed is not None and got != fixed:
                raise ValueError(
                    f"tu-{self.name} failed on a {got[0]}x{got[1]} input: this timm model was built "
                    f"for {fixed[0]}x{fixed[1]} inputs {detail}. Resize the input, or create the "
                    f"model with img_size=({got[0]}, {got[1]}) (a keyword argument of the model / "
                    "get_encoder, passed to timm)."
                ) from err
            if least is not None and (got[0] < least[0] or got[1] < least[1]):
                raise ValueError(
                    f"tu-{self.name} failed on a {got[0]}x{got[1]} input {detail}: timm declares a "
                    f"minimum input size of {least[0]}x{least[1]} for this model."
                ) from err
            raise

    # ------------------------------------------------------------------ input-size check
    def _check_input_size(self, size: Tuple[int, int], create_kwargs: Dict[str, Any]) -> None:
        """Fail now, naming sizes that work, if the model cannot run at the ``img_size`` it was given."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, self._in_channels, *size))
            return
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        finally:
            self.train(was_training)
        working = _working_sizes(self.name, create_kwargs, self._in_channels, size)
        hint = (
            f"Sizes near it that work: img_size={' / '.join(map(str, working))}."
            if working
            else f"The pretrained input size is {_default_size(self.name)}."
        )
        raise ValueError(
            f"tu-{self.name} cannot take {size[0]}x{size[1]} inputs (img_size={size}): {error}\n{hint}"
        )


# ---------------------------------------------------------------------- helpers
def _smp_style(reductions: Sequence[Union[int, float]]) -> Optional[str]:
    """SMP 0.6.0's three layouts, from the default feature strides."""
    n = len(reductions)
    if n == 0:
        return None
    if list(reductions) == [2 ** (i + 2) for i in range(n)]:
        return "transformer"
    if list(reductions) == [2 ** (i + 1) for i in range(n)]:
        return "traditional"
    if list(reductions) == [2**i for i in range(n)]:
        return "vgg"
    return None


def _default_start(name: str, style: str) -> int:
    """First timm feature index to take (as SMP: TResNet and DLA list a feature before stride 2 / 4)."""
    if (style == "transformer" and "tresnet" in name) or (style == "traditional" and "dla" in name):
        return 1
    return 0


def _no_dilation_message(name: str, output_stride: int) -> str:
    return (
        f"tu-{name} does not support output_stride={output_stride}: timm cannot dilate this model "
        "(it has no `output_stride` option). Use output_stride=32, or an encoder timm can dilate "
        "(e.g. tu-resnet34, tu-efficientnet_b0, tu-regnety_016, tu-convnext_tiny)."
    )


def _probe_dilation(name: str, kwargs: Dict[str, Any]) -> bool:
    def compute():
        try:
            model = _meta_features_model(name, {**kwargs, "output_stride": 16})
        except Exception:
            return False
        return max(model.feature_info.reduction() or [32]) <= 16

    return _cached("dilation", name, kwargs, compute)


def _with_dynamic_size(name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Let a plain ViT take any input size: ``dynamic_img_size`` (position embeddings resampled to the
    token grid) and ``dynamic_img_pad`` (input padded to a multiple of the patch size), where timm
    supports them."""
    timm = _timm()

    def compute():
        for extra in ({"dynamic_img_size": True, "dynamic_img_pad": True}, {"dynamic_img_size": True}):
            try:
                with torch.device("meta"):
                    timm.create_model(name, **{**kwargs, **extra, "pretrained": False})
            except Exception:
                continue
            return extra
        return {}

    return {**kwargs, **_cached("dynamic", name, kwargs, compute)}


def _fixed_input_size(name: str, user_kwargs: Mapping[str, Any]) -> Optional[Tuple[int, int]]:
    size = _as_hw(user_kwargs.get("img_size"))
    if size is not None:
        return size
    if user_kwargs.get("dynamic_img_size") or user_kwargs.get("strict_img_size") is False:
        return None
    try:
        cfg = _timm().models.get_pretrained_cfg(name)
    except Exception:
        return None
    if cfg is None or not cfg.fixed_input_size or not cfg.input_size:
        return None
    return _as_hw(cfg.input_size)


def _min_input_size(name: str) -> Optional[Tuple[int, int]]:
    try:
        return _as_hw(_timm().models.get_pretrained_cfg(name).min_input_size)
    except Exception:
        return None


def _default_size(name: str) -> str:
    try:
        size = _timm().models.get_pretrained_cfg(name).input_size
        return f"{size[-2]}x{size[-1]}"
    except Exception:
        return "of the model's pretrained config"


def _dry_run(
    name: str, create_kwargs: Dict[str, Any], in_channels: int, size: Tuple[int, int]
) -> Optional[str]:
    """Run the model on a meta tensor of ``size``; the error text, or ``None`` if it works."""
    kwargs = {**create_kwargs, "pretrained": False, "img_size": size}
    try:
        with torch.device("meta"):
            model = _timm().create_model(name, **kwargs)
            model(torch.empty(1, in_channels, *size))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _working_sizes(
    name: str, create_kwargs: Dict[str, Any], in_channels: int, size: Tuple[int, int]
) -> List[int]:
    """Which of a few square sizes near ``size`` (multiples of 32) and the pretrained size work."""
    side = max(size)
    candidates = {max(32, side // 32 * 32), -(-side // 32) * 32}
    try:
        candidates.add(int(_timm().models.get_pretrained_cfg(name).input_size[-1]))
    except Exception:
        pass
    return [c for c in sorted(candidates) if _dry_run(name, create_kwargs, in_channels, (c, c)) is None]


# ---------------------------------------------------------------------- registry entry points
def resolve_timm_weights(
    name: str, weights: WeightsArg
) -> Tuple[bool, Optional[Dict[str, torch.Tensor]], str]:
    """Turn an ``encoder_weights`` value into ``(pretrained, state_dict, source)`` for a timm model.

    ``None``/``False``: random init (never downloads). ``True``: timm's weights for the tag in the name.
    A local file / ``file://`` URL / state dict: random init, then these weights. Any other string
    behaves like ``True`` with a warning (as in SMP: for ``tu-`` the tag in the name picks the weights).
    """
    if weights is None or weights is False:
        return False, None, ""
    if weights is True:
        return True, None, ""
    if isinstance(weights, Mapping):
        return False, _weights.unwrap_state_dict(weights), "the given state dict"
    if _weights.looks_like_path(weights) or (isinstance(weights, str) and os.path.isfile(weights)):
        text = str(weights)
        path = _weights.download_url(text) if text.startswith("file://") else text
        return False, _weights.read_state_dict(path), text
    if isinstance(weights, str):
        warnings.warn(
            "For 'tu-' (timm universal) encoders, `encoder_weights` should be set to True to "
            "download pretrained weights or None for random initialization. The pretrained variant "
            "is defined in the encoder name i.e 'tu-<model_name>.<pretrained_tag>'. "
            f"Got encoder_weights='{weights}'.",
            UserWarning,
            stacklevel=4,
        )
        return True, None, ""
    raise TypeError(
        f"encoder_weights for tu-{name} must be None, a bool, a weights file path or a state dict; "
        f"got {type(weights).__name__}."
    )


def build_timm_encoder(
    name: str,
    in_channels: int = 3,
    depth: int = 5,
    weights: WeightsArg = None,
    output_stride: int = 32,
    **kwargs: Any,
) -> TimmUniversalEncoder:
    """Build ``tu-<name>`` for the registry (``name`` without the ``tu-`` prefix).

    A local weights file / state dict may be either this encoder's own state dict (``model.*`` keys,
    or the same without ``model.``) or an original timm checkpoint of the whole network (classifier
    included, e.g. a ``model.safetensors`` of a ``timm/...`` hub repository), which timm then loads
    itself (dropping the classifier, adapting the first conv to ``in_channels``).
    """
    pretrained, state_dict, source = resolve_timm_weights(name, weights)
    args = dict(in_channels=in_channels, depth=depth, output_stride=output_stride)
    encoder = TimmUniversalEncoder(name, pretrained=pretrained, **args, **kwargs)
    if state_dict is None:
        return encoder
    try:
        encoder.load_weights(state_dict, source)
        return encoder
    except ValueError as err:
        if any(k.startswith("model.") for k in state_dict):
            raise
        fit_error = err
    overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "state_dict": state_dict}
    try:
        return TimmUniversalEncoder(
            name, pretrained=True, **args, pretrained_cfg_overlay=overlay, **kwargs
        )
    except ValueError as err:
        raise ValueError(
            f"Weights from {source} fit neither the tu-{name} encoder ({fit_error}) nor, as a timm "
            f"checkpoint, the timm model ({err})."
        ) from err


def timm_preprocessing_params(name: str) -> Dict[str, Any]:
    """Input normalisation of timm model ``name``'s pretrained weights (from timm's config, offline)."""
    _check_name(name)
    timm = _timm()
    if not timm.models.is_model_pretrained(name):
        tags = timm.list_pretrained(name.split(".")[0] + ".*")
        raise ValueError(
            f"{name} does not have pretrained weights and preprocessing parameters (timm has no "
            f"pretrained config for it). Tags with weights: {tags}."
        )
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    return {
        "input_space": cfg.get("input_space", "RGB"),
        "input_range": list(cfg.get("input_range", [0, 1])),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
    }
