"""Building blocks shared by decoders: conv-norm-act, normalisation factory, attention, activations."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._thread_state import ThreadValue
from .recompute import _plain_tensor

NormSpec = Union[bool, str, Dict[str, Any]]
SUPPORTED_NORMS = ("batchnorm", "inplace", "groupnorm", "layernorm", "instancenorm", "identity")


class InPlaceABN(nn.BatchNorm2d):
    """BatchNorm followed by a (leaky) ReLU, standing in for ``inplace_abn.InPlaceABN``.

    It has the same parameters and buffers as BatchNorm2d, which is exactly the state-dict layout
    of ``inplace_abn``'s module, so checkpoints move freely between the two. When the ``inplace_abn``
    package is installed, :func:`get_norm_layer` uses the real memory-saving implementation instead.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, **kwargs)
        if activation not in ("leaky_relu", "elu", "identity"):
            raise ValueError(
                f"InPlaceABN activation must be leaky_relu, elu or identity, got {activation!r}."
            )
        self.activation = activation
        self.activation_param = activation_param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.activation_param, inplace=True)
        if self.activation == "elu":
            return F.elu(x, self.activation_param, inplace=True)
        return x


def _inplace_abn_class() -> type:
    try:
        from inplace_abn import InPlaceABN as RealInPlaceABN  # optional, CUDA-only speed-up

        return RealInPlaceABN
    except ImportError:
        return InPlaceABN


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (what a decoder needs).

    SMP 0.6.0 applies ``nn.LayerNorm(C)`` to NCHW maps, which normalises over the *width* and fails
    unless ``W == C``. This module has the same parameters (``weight``, ``bias`` of shape ``(C,)``),
    so checkpoints are interchangeable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _default_groups(channels: int, preferred: int = 32) -> int:
    """The largest group count <= ``preferred`` that divides ``channels``."""
    return math.gcd(channels, preferred) if channels % preferred else preferred


def _norm_params(use_norm: NormSpec) -> Dict[str, Any]:
    if use_norm is True:
        return {"type": "batchnorm"}
    if use_norm is False or use_norm is None:
        return {"type": "identity"}
    if isinstance(use_norm, str):
        kind = use_norm.lower()
        if kind == "inplace":
            return {"type": "inplace", "activation": "leaky_relu", "activation_param": 0.0}
        return {"type": kind}
    if isinstance(use_norm, dict):
        if "type" not in use_norm:
            raise ValueError(
                f"decoder_use_norm dict {use_norm} needs a 'type' key, e.g. {{'type': 'groupnorm', "
                "'num_groups': 8}."
            )
        return {**use_norm, "type": str(use_norm["type"]).lower()}
    raise ValueError(
        f"decoder_use_norm must be a bool, one of {SUPPORTED_NORMS} or a dict like "
        f"{{'type': 'batchnorm', ...}}; got {use_norm!r}."
    )


def get_norm_layer(use_norm: NormSpec, out_channels: int) -> nn.Module:
    """Create the normalisation layer described by ``use_norm`` for ``out_channels`` channels.

    ``use_norm`` is ``True`` (batchnorm), ``False`` (identity), a name from :data:`SUPPORTED_NORMS`,
    or a dict ``{"type": name, **kwargs}`` whose extra keys go to the layer (e.g. ``num_groups`` for
    groupnorm, ``eps``/``momentum`` for batchnorm).
    """
    params = _norm_params(use_norm)
    kind = params.pop("type")
    if kind not in SUPPORTED_NORMS:
        raise ValueError(f"Unknown normalisation {kind!r}; supported: {', '.join(SUPPORTED_NORMS)}.")
    if kind == "batchnorm":
        return nn.BatchNorm2d(out_channels, **params)
    if kind == "inplace":
        return _inplace_abn_class()(out_channels, **params)
    if kind == "groupnorm":
        groups = params.pop("num_groups", params.pop("groups", None)) or _default_groups(out_channels)
        if out_channels % groups:
            raise ValueError(f"groupnorm: {out_channels} channels are not divisible into {groups} groups.")
        return nn.GroupNorm(groups, out_channels, **params)
    if kind == "layernorm":
        return LayerNorm2d(out_channels, **params)
    if kind == "instancenorm":
        return nn.InstanceNorm2d(out_channels, **params)
    return nn.Identity()


def norm_has_activation(norm: nn.Module) -> bool:
    """Whether a norm layer applies its own activation (InPlaceABN variants)."""
    return type(norm).__name__ in ("InPlaceABN", "InPlaceABNSync", "ABN")


def batch_norm_into(bn: nn.Module, x: torch.Tensor, allowed: bool) -> torch.Tensor:
    """``bn(x)``, written into ``x`` when ``allowed`` (the caller's promise that nothing else
    holds ``x``, e.g. a convolution's fresh output) and ``bn`` is an eval-mode ``BatchNorm2d``
    under no autograd on CPU, without hooks that would expect the call.

    The affine map runs as one in-place multiply-add: PyTorch's channels_last BatchNorm kernel is
    2-4x slower on CPU (4x96x128x128 with warm buffers: 1.73 vs 0.39 ms), and a fresh full-size
    output costs about as much again. Values agree with the layer within an ulp.
    """
    if (
        allowed
        and type(bn) is nn.BatchNorm2d
        and not bn.training
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.weight is not None
        and bn.bias is not None
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == bn.weight.dtype
        and x.dim() == 4
        and not (bn._forward_hooks or bn._forward_pre_hooks or global_module_hooks())
        and not (torch.jit.is_tracing() or _compiling())  # graphs record the layer
    ):
        scale = torch.reciprocal(torch.sqrt(bn.running_var + bn.eps)) * bn.weight
        shift = bn.bias - bn.running_mean * scale
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1), out=x)
    return bn(x)


def _compiling() -> bool:
    from .model import is_torch_compiling

    return is_torch_compiling()


def global_module_hooks() -> bool:
    """Whether global module forward (pre-)hooks are registered: a shortcut that bypasses a
    layer's call must then call the layer."""
    module = torch.nn.modules.module
    return bool(
        getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None)
    )


class ConvNormAct(nn.Sequential):
    """``Sequential(conv, norm, act)`` whose eval forward without autograd writes an eval-mode
    BatchNorm into the convolution's fresh output (:func:`batch_norm_into`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not torch.is_grad_enabled() and len(self) == 3:
                return self._no_grad_forward(x)
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _no_grad_forward(self, x):
        conv, norm, act = self[0], self[1], self[2]
        y = conv(x)
        # only a plain (transposed) convolution is known to return a tensor of its own
        fresh = type(conv) in (nn.Conv2d, nn.ConvTranspose2d) and y is not x
        return act(batch_norm_into(norm, y, fresh))


class Conv2dReLU(ConvNormAct):
    """Conv -> norm -> ReLU; the conv has a bias only when there is no norm to absorb it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        stride: int = 1,
        use_norm: NormSpec = "batchnorm",
    ) -> None:
        norm = get_norm_layer(use_norm, out_channels)
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=isinstance(norm, nn.Identity),
        )
        act = nn.Identity() if norm_has_activation(norm) else nn.ReLU(inplace=True)
        super().__init__(conv, norm, act)


_PLAIN = ThreadValue(False)


def plain_module_calls() -> contextlib.AbstractContextManager:
    """Inside, blocks skip shortcuts that use a layer's weights without calling the layer (Unet's
    folded upsample+conv), so forward hooks see every layer's true input and output; used by
    :func:`~segmentation_models_pytorch.optimize_for_inference` to trace conv -> norm edges."""
    return _PLAIN.set(True)


def plain_module_calls_active() -> bool:
    return _PLAIN.get()


def conv_without_dead_taps(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, skipping the kernel rows/columns of a dilated convolution that read only padding.

    A 3x3 convolution with stride 1 and ``padding == dilation`` (ASPP's atrous branches) reads
    input row ``r - d`` and ``r + d`` for output row ``r``; once the dilation ``d`` is at least the
    input's height, both lie in the zero padding for every ``r`` (likewise for width). ASPP's rates
    24 and 36 on a 16x16 map leave only the centre tap: same values up to float rounding, a ninth
    of the work, and none of oneDNN's slow channels_last path for large dilations (3.5 ms instead of
    0.2 ms for a 512-channel depthwise 3x3 at 16x16 here). Other convolutions, TorchScript, graph
    capture and :func:`plain_module_calls` just call ``conv``.
    """
    if torch.jit.is_scripting():
        return conv(x)
    live = live_taps(conv, x)
    if live is None:
        return conv(x)
    weight, padding, dilation = live
    return F.conv2d(x, weight, conv.bias, 1, padding, dilation, conv.groups)


@torch.jit.unused
def live_taps(conv, x):
    """``(weight, padding, dilation)`` of ``conv`` without its dead taps on input ``x`` (see
    :func:`conv_without_dead_taps`), or ``None`` when it has none or the shortcut does not apply."""
    if not _has_dead_taps(conv, x):
        return None
    h, w = x.shape[-2], x.shape[-1]
    (dh, dw), weight = conv.dilation, conv.weight
    rows, cols = dh >= h, dw >= w
    weight = weight[:, :, 1:2] if rows else weight
    weight = weight[:, :, :, 1:2] if cols else weight
    return weight, (0 if rows else dh, 0 if cols else dw), (1 if rows else dh, 1 if cols else dw)


def computes_plain_conv2d(conv: nn.Module) -> bool:
    """``nn.Conv2d`` itself, or a subclass that declares it computes the same function with the
    same parameters (``computes_plain_conv2d = True``, e.g. the fast path's Winograd convolution):
    code that reads such a conv's weight and calls ``F.conv2d`` on its own gives the same result."""
    return type(conv) is nn.Conv2d or getattr(type(conv), "computes_plain_conv2d", False)


def is_plain_conv3x3(conv: nn.Module) -> bool:
    """A plain 3x3 convolution, stride 1, zero padding 1, no dilation or groups: what the
    upsampling folds (:func:`upsample2x_conv3x3`) can read by weight."""
    return (
        computes_plain_conv2d(conv)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


@torch.jit.unused  # no annotations: TorchScript cannot resolve them on unused functions
def _has_dead_taps(conv, x):
    return (
        computes_plain_conv2d(conv)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == conv.dilation
        and conv.padding_mode == "zeros"
        and x.dim() == 4
        and (conv.dilation[0] >= x.shape[-2] or conv.dilation[1] >= x.shape[-1])
        and not (torch.jit.is_tracing() or _compiling() or plain_module_calls_active())
    )


# A 3x3 kernel's rows (or columns) folded onto the 2 low-resolution rows that output phase ``a`` of
# a nearest-2x-upsampled image sees: phase 0 reads rows (i-1, i, i), phase 1 (i, i, i+1).
_PHASE_FOLD = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))
# The same as one (16, 9) matrix: row (a, b, p, q) of the folded kernels from tap (r, s).
_PHASE_FOLD_16x9 = tuple(
    tuple(_PHASE_FOLD[a][p][r] * _PHASE_FOLD[b][q][s] for r in range(3) for s in range(3))
    for a in range(2)
    for b in range(2)
    for p in range(2)
    for q in range(2)
)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)``, cheaper.

    Nearest 2x upsampling repeats every pixel in a 2x2 block, so each of the four output phases
    (even/odd row, even/odd column) of a 3x3 convolution sees only 2x2 distinct input pixels. The
    3x3 kernel is folded into four 2x2 kernels and run as one low-resolution convolution: 2.25x fewer
    FLOPs, and neither the upsampled image nor anything of its size is kept for backward. Same
    values up to float rounding (the folded kernels sum up to four weights). ``x`` must be
    channels_last: the phases are interleaved in NHWC.
    """
    out_channels, in_channels = weight.shape[:2]
    # One (16 x 9) @ (9 x in) product per output channel on the (out, 9 taps, in) view, which is the
    # weight's own memory when channels_last, then one copy into the phases' channels_last order.
    # The einsum of the two (2 x 3) fold matrices gave the same values in 3-4x the time, and at
    # small inputs building the kernels costs as much as the convolution itself.
    fold = torch.tensor(_PHASE_FOLD_16x9, dtype=weight.dtype, device=weight.device)
    kernels = fold @ weight.permute(0, 2, 3, 1).reshape(out_channels, 9, in_channels)
    kernels = kernels.view(out_channels, 4, 4, in_channels).transpose(0, 1)
    kernels = kernels.reshape(4 * out_channels, 2, 2, in_channels).permute(0, 3, 1, 2)
    y = F.conv2d(x, kernels, padding=1)
    if _plain_tensor(y):
        return _InterleavePhases.apply(y)
    # torch.func transforms and tensor subclasses: plain differentiable (and vmappable) indexing
    n, _, h1, w1 = y.shape
    h, w = h1 - 1, w1 - 1
    phases = y.permute(0, 2, 3, 1).unflatten(3, (2, 2, out_channels))
    rows = [torch.stack([phases[:, a : a + h, b : b + w, a, b] for b in range(2)], dim=3) for a in range(2)]
    return torch.stack(rows, dim=2).reshape(n, 2 * h, 2 * w, out_channels).permute(0, 3, 1, 2)


class _InterleavePhases(torch.autograd.Function):
    """``(n, 4c, h+1, w+1)`` phase maps -> ``(n, c, 2h, 2w)`` image, both channels_last.

    Phase ``(a, b)`` of output pixel ``(i, j)`` is channel block ``2a + b`` at ``(i + a, j + b)``.
    Written as one strided copy per phase each way: through slicing and ``stack``, autograd would
    zero-fill a full-size gradient per phase and sum the four (a third of a Unet-resnet34 train
    step's elementwise time went there). Only for plain tensors (see :func:`upsample2x_conv3x3`).
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        n, c4, h1, w1 = y.shape
        c, h, w = c4 // 4, h1 - 1, w1 - 1
        phases = y.permute(0, 2, 3, 1).unflatten(3, (2, 2, c))  # (n, h+1, w+1, a, b, c)
        out = y.new_empty(n, h, 2, w, 2, c)
        for a in range(2):
            for b in range(2):
                out[:, :, a, :, b].copy_(phases[:, a : a + h, b : b + w, a, b])
        return out.view(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        n, c, h2, w2 = grad.shape
        h, w = h2 // 2, w2 // 2
        g = grad.permute(0, 2, 3, 1).reshape(n, h, 2, w, 2, c)  # a view when channels_last
        out = grad.new_empty(n, h + 1, w + 1, 2, 2, c)
        for a in range(2):
            for b in range(2):
                out[:, a : a + h, b : b + w, a, b].copy_(g[:, :, a, :, b])
                # the one row and column of this phase that no output pixel reads
                out[:, h if a == 0 else 0, :, a, b].zero_()
                out[:, :, w if b == 0 else 0, a, b].zero_()
        return out.view(n, h + 1, w + 1, 4 * c).permute(0, 3, 1, 2)


class SCSEModule(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al., 2018)."""

    def __init__(self, in_channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = in_channels // reduction
        if hidden < 1:
            raise ValueError(f"scse attention needs at least {reduction} channels, got {in_channels}.")
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(in_channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cSE(x) + x * self.sSE(x)


class Attention(nn.Module):
    """Optional attention after a decoder block: ``None`` (identity) or ``"scse"``."""

    def __init__(self, name: Optional[str], **params: Any) -> None:
        super().__init__()
        if name is None:
            self.attention = nn.Identity()
        elif name == "scse":
            self.attention = SCSEModule(**params)
        else:
            raise ValueError(f"Unknown attention type {name!r}; supported: None, 'scse'.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


class ArgMax(nn.Module):
    def __init__(self, dim: Optional[int] = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argmax(x, dim=self.dim)


class Clamp(nn.Module):
    def __init__(self, min: float = 0, max: float = 1) -> None:  # noqa: A002 - SMP's argument names
        super().__init__()
        self.min, self.max = min, max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.min, self.max)


class _Lambda(nn.Module):
    """Wraps a plain function (e.g. ``torch.sigmoid``) given as an activation."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


ACTIVATIONS = (
    "identity",
    "sigmoid",
    "softmax",
    "softmax2d",
    "logsoftmax",
    "tanh",
    "argmax",
    "argmax2d",
    "clamp",
)


class Activation(nn.Module):
    """Activation applied to a head's output, chosen by name or given as a callable."""

    def __init__(self, name: Union[None, str, Callable], **params: Any) -> None:
        super().__init__()
        if name is None or name == "identity":
            self.activation: nn.Module = nn.Identity()
        elif name == "sigmoid":
            self.activation = nn.Sigmoid()
        elif name == "softmax2d":
            self.activation = nn.Softmax(dim=1, **params)
        elif name == "softmax":
            self.activation = nn.Softmax(**{"dim": 1, **params})
        elif name == "logsoftmax":
            self.activation = nn.LogSoftmax(**{"dim": 1, **params})
        elif name == "tanh":
            self.activation = nn.Tanh()
        elif name == "argmax":
            self.activation = ArgMax(**params)
        elif name == "argmax2d":
            self.activation = ArgMax(dim=1, **params)
        elif name == "clamp":
            self.activation = Clamp(**params)
        elif isinstance(name, nn.Module):
            self.activation = name
        elif isinstance(name, type) and callable(name):
            self.activation = name(**params)
        elif callable(name):
            self.activation = _Lambda(name)
        else:
            raise ValueError(
                f"Unknown activation {name!r}; use None or one of {', '.join(ACTIVATIONS)}, or pass a "
                "callable (an nn.Module class or instance, or a function)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x)
