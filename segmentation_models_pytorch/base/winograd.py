"""Winograd F(4x4, 3x3) convolution for the inference fast path (CPU, float32).

A 3x3 convolution (stride 1, padding 1) computes each 4x4 output tile from a 6x6 input tile.
Winograd's minimal filtering algorithm does that with 36 products per (input, output) channel
pair instead of 144: the input tiles and the kernels are mapped by fixed linear transforms
(``B^T d B`` and ``G g G^T``), multiplied elementwise -- 36 independent matrix products over the
channels -- and mapped back (``A^T m A``). The matrix products are 4x fewer FLOPs than the direct
convolution; the transforms are memory passes, written here as two small matmuls over all tiles.

That pays where the channel count is large and the map small (the deep stages of a ResNet:
128-512 channels at 8x8-64x64), and loses for 64 channels or large maps, where the direct
convolution is cheap and the transforms' traffic dominates. The rounding is larger than the
direct convolution's (the transforms have entries up to 8 and 1/24): about 1e-5 relative per
convolution, and 4e-6 on whole ResNet-34 models, the same as the direct fast path's against
float64. Inference only: the kernel transform is cached and gradients would not reach the weight,
so under autograd the ordinary convolution runs. Dilated convolutions (padding = dilation) are
the same computation on polyphase sub-images (see :func:`conv3x3`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
# The 2-D transforms of a flattened 6x6 tile (Kronecker products): integers, exact in float32.
_IN = torch.kron(torch.tensor(_BT, dtype=torch.float64), torch.tensor(_BT, dtype=torch.float64)).float()
_OUT = torch.kron(torch.tensor(_AT, dtype=torch.float64), torch.tensor(_AT, dtype=torch.float64)).float()

# Measured break-even (see docs/performance.md), for inputs and outputs alike: 64 input channels
# lose at any size, and so do few outputs (PSPNet's segmentation head, 512 -> 2 at 32x32, took
# 18.8 ms against 3.2 ms direct: the input transform costs more than the whole direct conv).
MIN_CHANNELS = 128
MAX_SIZE = 64  # larger maps: the transforms' memory traffic outweighs the saved FLOPs
MIN_TILES = 16  # fewer 4x4 output tiles: reading the 4x larger kernel costs more than it saves
CHUNK_BYTES = 8 << 20  # transformed input per matrix product; larger ones fall out of cache


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in, 3, 3)`` kernel -> ``(36, in, out)`` float32 Winograd kernel (``G g G^T``)."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = g @ weight.detach().double() @ g.T  # (out, in, 6, 6), exact products then one rounding
    return u.permute(2, 3, 1, 0).reshape(36, weight.shape[1], weight.shape[0]).float().contiguous()


def tiles_of(h: int, w: int, dilation: int = 1) -> Tuple[int, int]:
    """Rows and columns of 4x4 output tiles per image (per polyphase sub-image when dilated)."""
    return -(-h // (4 * dilation)), -(-w // (4 * dilation))


def conv3x3(
    x: torch.Tensor, kernel: torch.Tensor, bias: Optional[torch.Tensor], dilation: int = 1
) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding ``dilation``, of an ``N x C x H x W`` float32 tensor
    with a :func:`transform_weight` kernel. Returns a channels_last tensor (any ``H``, ``W``).

    A dilated convolution is an ordinary one on each of its ``d x d`` polyphase sub-images
    (every ``d``-th row and column): output row ``d (4i + r) + a`` is row ``4i + r`` of sub-image
    ``a``, so tiles of all sub-images are read by one strided view and written back by another.
    """
    n, c, h, w = x.shape
    d = dilation
    th, tw = tiles_of(h, w, d)
    cout = kernel.shape[-1]
    # NHWC, padded by d on top/left and up to whole tiles plus d on bottom/right.
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, d, 4 * d * tw - w + d, d, 4 * d * th - h + d))
    s_n, s_h, s_w, s_c = xp.stride()
    # tiles[p, q, n, a, b, i, j, c] = xp[n, d (4i + p) + a, d (4j + q) + b, c]: every overlapping
    # 6x6 tile of every sub-image, as a view.
    tiles = xp.as_strided(
        (6, 6, n, d, d, th, tw, c), (d * s_h, d * s_w, s_n, s_h, s_w, 4 * d * s_h, 4 * d * s_w, s_c)
    )
    out = x.new_empty(n, th, 4, d, tw, 4, d, cout)  # row (4i + r) d + a, column (4j + s) d + b
    transform_in, transform_out = _IN.to(x.device), _OUT.to(x.device)
    per_image = 36 * d * d * th * tw * max(c, cout) * 4
    step = max(1, CHUNK_BYTES // per_image)
    for i in range(0, n, step):
        k = min(n, i + step) - i
        t = k * d * d * th * tw
        v = torch.mm(transform_in, tiles[:, :, i : i + k].reshape(36, t * c))  # B^T d B
        m = torch.bmm(v.view(36, t, c), kernel)  # 36 products over the channels
        y = torch.mm(transform_out, m.view(36, t * cout))  # A^T m A: (4 * 4, t * cout)
        y = y.view(4, 4, k, d, d, th, tw, cout)  # (r, s, n, a, b, i, j, co)
        out[i : i + k].copy_(y.permute(2, 5, 0, 3, 6, 1, 4, 7))
    y = out.view(n, 4 * d * th, 4 * d * tw, cout)
    if 4 * d * th != h or 4 * d * tw != w:
        y = y[:, :h, :w].contiguous()
    if bias is not None:
        y.add_(bias)
    return y.permute(0, 3, 1, 2)


def qualifies(conv: nn.Module) -> bool:
    """A plain dense 3x3 convolution, stride 1, zero padding equal to its (square) dilation."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.dilation[0] == conv.dilation[1]
        and conv.padding == conv.dilation
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels >= MIN_CHANNELS
        and conv.out_channels >= MIN_CHANNELS
    )


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that runs :func:`conv3x3` where it pays (CPU float32 without autograd,
    maps up to ``MAX_SIZE``, at least ``MIN_TILES`` output tiles in the batch, dilation below the
    map's size); anywhere else, and under TorchScript, tracing and compile, the ordinary
    convolution. Same parameters and state-dict keys; the transformed kernel is a cache rebuilt
    whenever the weight changes (``load_state_dict``, in-place edits)."""

    # Computes nn.Conv2d's function: md.live_taps may drop dead taps, Unet may fold its upsampling.
    computes_plain_conv2d = True

    @classmethod
    def convert(cls, conv: nn.Conv2d) -> WinogradConv2d:
        conv.__class__ = cls  # keeps the parameters, hooks and every attribute in place
        conv._winograd_kernel = None
        conv._winograd_key = None
        return conv

    def __getstate__(self):
        # The cache is derived data, 4x the weight: torch.save(model) and copy.deepcopy(model)
        # would otherwise store or duplicate it (the copy rebuilds its own on first use).
        state = super().__getstate__()
        state["_winograd_kernel"] = state["_winograd_key"] = None
        return state

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() replace the weight: the old kernel would only hold memory.
        self._winograd_kernel = self._winograd_key = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not self._pays(x):
            return self._conv_forward(x, self.weight, self.bias)
        return self._winograd(x)

    @torch.jit.unused
    def _pays(self, x):
        from .model import is_torch_compiling

        if torch.jit.is_tracing() or is_torch_compiling():  # graphs record the plain convolution
            return False
        need_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return (
            not need_grad
            and x.is_cpu
            and x.dim() == 4
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and max(x.shape[-2:]) <= MAX_SIZE
            and self._tiles_pay(x.shape[0], x.shape[-2], x.shape[-1])
        )

    @torch.jit.unused
    def _tiles_pay(self, n, h, w):
        d = self.dilation[0]
        if d >= min(h, w):  # the outer taps read only padding: callers drop them (md.live_taps)
            return False
        th, tw = tiles_of(h, w, d)
        per_image = d * d * th * tw
        # Enough tiles to amortise reading the 4x larger kernel, and at most half of their 16
        # outputs each cropped away (a 5x5 map needs 2x2 tiles).
        return n * per_image >= MIN_TILES and h * w >= 8 * per_image

    @torch.jit.unused
    def _winograd(self, x):
        w = self.weight
        key = (w.data_ptr(), w._version, w.device)
        if self._winograd_key != key:
            self._winograd_kernel = transform_weight(w)
            self._winograd_key = key
        return conv3x3(x, self._winograd_kernel, self.bias, self.dilation[0])
