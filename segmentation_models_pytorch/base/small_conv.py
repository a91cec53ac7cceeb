"""Training convolutions on small feature maps: the weight gradient as one matrix product.

A convolution's weight gradient sums ``grad_output x input-patch`` over every output pixel. On the
deep stages of an encoder there are few pixels and many channels (ResNet-34's layer4 at 256x256
input: 4 x 8 x 8 = 256 pixels, 512 channels; at 64x64 input 16-64 pixels), and oneDNN's CPU kernel
for that reduction in ``channels_last`` runs far below the matmul peak there, with weight-sized
copies per call. Per call, batch 4, two cores, median CPU time (oneDNN / here): 512 channels at
8x8 22 / 15 ms, at 4x4 14 / 7.7 ms, at 4x4 with dilation 2 55 / 7.6 ms, 256 channels at 4x4
4.2 / 1.3 ms; from about ``2 x pixels > in_channels`` on oneDNN is faster (256 at 16x16 16 / 22
ms), so only the smaller maps take this path.

Here the input patches are laid out once as a ``(pixels, k*k*in)`` matrix (one strided view of
the padded map and one copy) and the gradient is ``grad_output^T @ patches``: one GEMM with a long
inner dimension, already in the weight's ``channels_last`` order. Depthwise convolutions on at most
:data:`DEPTHWISE_MAX_PIXELS` output pixels multiply the same patches by the gradient and sum over
pixels. The forward is torch's own kernel, so outputs are bit-identical, and gradients are equal
to float rounding.

Depthwise stride-1 convolutions also take their *input* gradient another way, at any map size:
the transposed convolution of stride 1 is the convolution of the gradient with the flipped
filters (padding ``dilation x (k - 1) - padding``). oneDNN's ``channels_last`` depthwise data
gradient is 7-28x slower than that with dilation (DeepLabV3+'s dilated encoder stages: 1152
channels, 5x5, dilation 2 at 4x16x16, 15.5 vs 0.55 ms) and 1.1-2x slower without.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import recompute

# Depthwise convolutions (one filter per channel) take the path up to this many output pixels:
# their gradient is an elementwise product summed over pixels, 2-6x faster than oneDNN's at 8-64
# pixels (and without its scratch buffer: 28 MB for a 1152-channel 5x5 filter on a 2x2 map), even
# at 128, slower from 256 on.
DEPTHWISE_MAX_PIXELS = 64


def conv_for_training(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; in a CPU training forward, with the cheaper weight gradient on a small map
    and, for depthwise stride-1 convolutions, the cheaper input gradient.

    Falls back to ``conv(x)`` wherever the shortcut does not apply or could be observed differently:
    other layer types, grouped (but not depthwise) or non-zero-padded convolutions, forward hooks on
    the layer, and whatever :func:`conv2d_for_training` declines.
    """
    if not _layer_applies(conv):
        return conv(x)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    return conv2d_for_training(x, conv.weight, conv.bias, *args)


def conv2d_for_training(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` with the same arguments (``stride``/``padding``/``dilation`` as pairs of ints);
    on small maps in a CPU training forward, with the cheaper weight gradient. Declines GPUs,
    autocast, graph capture, non-``channels_last`` inputs, 1x1 kernels and larger maps."""
    plan = _applies(x, weight, stride, padding, dilation, groups)
    if not plan:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _SmallMapConv.apply(x, weight, bias, stride, padding, dilation, groups, plan)


def uses_small_map_path(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`conv_for_training` would take the cheaper weight gradient for ``x``."""
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    return _layer_applies(conv) and bool(_applies(x, conv.weight, *args))


def _layer_applies(conv: nn.Module) -> bool:
    from .modules import computes_plain_conv2d, global_module_hooks

    return (
        computes_plain_conv2d(conv)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not (conv._forward_hooks or conv._forward_pre_hooks or global_module_hooks())  # must see the call
    )


def _applies(x, weight, stride, padding, dilation, groups) -> Optional[Tuple[bool, bool]]:
    """The backward :func:`_plan` for this call, or ``None`` (falsy) where the path doesn't apply."""
    if not (
        x.dim() == 4
        and weight.dim() == 4
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dtype == weight.dtype  # else torch's own error
        and weight.requires_grad
        and recompute.scope_active()  # grad enabled, not tracing/compiling, inside a model forward
    ):
        return None
    out_ch, in_per_group, k_h, k_w = weight.shape
    depthwise = groups > 1 and in_per_group == 1 and out_ch == groups == x.shape[1]
    if (groups != 1 and not depthwise) or k_h * k_w == 1:  # 1x1: already one GEMM in oneDNN
        return None
    if not (recompute._plain_tensor(x) and type(weight) in (nn.Parameter, torch.Tensor)):
        return None
    if recompute._autocast_enabled("cpu") or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    return _plan(x, weight, stride, padding, dilation, groups)


def _plan(x, weight, stride, padding, dilation, groups) -> Optional[Tuple[bool, bool]]:
    """``(weight gradient by patches, input gradient by a flipped depthwise conv)`` for a conv that
    passed :func:`_applies`' other checks, or ``None`` where neither pays."""
    k_h, k_w = weight.shape[-2:]
    pixels = x.shape[0]
    for size, k, s, p, d in zip(x.shape[-2:], (k_h, k_w), stride, padding, dilation):
        pixels *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    if pixels <= 0:
        return None
    if groups == 1:
        return (True, False) if 2 * pixels <= x.shape[1] else None
    by_patches = pixels <= DEPTHWISE_MAX_PIXELS
    flipped = tuple(stride) == (1, 1) and all(
        p <= d * (k - 1) for k, p, d in zip((k_h, k_w), padding, dilation)
    )
    return (by_patches, flipped) if by_patches or flipped else None


def patch_matrix(
    x: torch.Tensor,
    kernel: Tuple[int, int],
    out_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> torch.Tensor:
    """``x``'s input patches as a ``(N * H_out * W_out, k_h * k_w * C)`` matrix, channels fastest.

    Row ``(n, i, j)`` holds tap ``(r, s)`` of channel ``c`` at column ``(r * k_w + s) * C + c``: the
    order of a ``channels_last`` ``(O, C, k_h, k_w)`` weight, so ``grad^T @ patches`` is its layout.
    Differentiable (a strided view and a copy), so gradients of gradients flow through it.
    """
    n, c = x.shape[0], x.shape[1]
    (k_h, k_w), (h_out, w_out) = kernel, out_size
    (s_h, s_w), (d_h, d_w) = stride, dilation
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    nhwc = padded.permute(0, 2, 3, 1).contiguous()  # a no-op for channels_last
    st_n, st_h, st_w, st_c = nhwc.stride()
    # Every patch as a strided window of the padded map, then one copy into matrix form.
    windows = nhwc.as_strided(
        (n, h_out, w_out, k_h, k_w, c),
        (st_n, s_h * st_h, s_w * st_w, d_h * st_h, d_w * st_w, st_c),
        nhwc.storage_offset(),
    )
    return windows.reshape(n * h_out * w_out, k_h * k_w * c)


class _SmallMapConv(torch.autograd.Function):
    """``F.conv2d`` whose backward takes the weight gradient from :func:`patch_matrix` (one GEMM
    for dense convs, an elementwise product summed over pixels for depthwise ones) and/or, for a
    depthwise stride-1 conv, the input gradient as the depthwise conv of the gradient with the
    flipped filters. ``plan`` says which (see :func:`_plan`); torch's kernel does the rest."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, plan):
        ctx.save_for_backward(x, weight)
        bias_shape = None if bias is None else bias.shape
        ctx.conf = (tuple(stride), tuple(padding), tuple(dilation), groups, bias_shape, plan)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, bias_shape, (by_patches, flipped) = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        torch_x, torch_w = need_x and not flipped, need_w and not by_patches
        grad_x: Optional[torch.Tensor] = None
        grad_w: Optional[torch.Tensor] = None
        grad_b: Optional[torch.Tensor] = None
        if torch_x or torch_w or need_b:
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, list(bias_shape) if bias_shape is not None else None,
                list(stride), list(padding), list(dilation), False, [0, 0], groups,
                [torch_x, torch_w, bool(need_b)],
            )  # fmt: skip
        o, c, k_h, k_w = weight.shape
        if need_x and flipped:
            # Stride 1: the transposed conv is a conv with the taps reversed. oneDNN's channels_last
            # depthwise data gradient is 7-28x slower than this with dilation (1152 channels, 5x5,
            # dilation 2, 4x16x16: 15.5 vs 0.55 ms) and 1.1-2x slower without.
            pad = [d * (k - 1) - p for k, p, d in zip((k_h, k_w), padding, dilation)]
            grad_x = F.conv2d(grad, weight.flip(-2, -1), None, 1, pad, dilation, groups)
        if need_w and by_patches:
            h_out, w_out = grad.shape[-2], grad.shape[-1]
            patches = patch_matrix(x, (k_h, k_w), (h_out, w_out), stride, padding, dilation)
            g = grad.permute(0, 2, 3, 1).reshape(-1, o)
            if groups == 1:
                grad_w = (g.t() @ patches).view(o, k_h, k_w, c).permute(0, 3, 1, 2)
            else:  # depthwise: channel c's taps against channel c's gradient only
                taps = (patches.view(g.shape[0], k_h * k_w, o) * g.unsqueeze(1)).sum(0)
                grad_w = taps.t().reshape(o, 1, k_h, k_w)
        return grad_x, grad_w, grad_b, None, None, None, None, None
