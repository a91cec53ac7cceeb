"""Mix Transformer (MiT-B0..B5), the hierarchical backbone of SegFormer, in plain PyTorch.

Written from the paper (Xie et al., "SegFormer: Simple and Efficient Design for Semantic
Segmentation with Transformers", NeurIPS 2021). Each of the four stages is

* an *overlapping patch embedding*: a strided convolution whose kernel is larger than its stride
  (7x7/4 for the first stage, 3x3/2 after), followed by LayerNorm;
* a stack of transformer blocks with *efficient self-attention*: keys and values come from a copy of
  the tokens shrunk by a strided ``sr_ratio`` x ``sr_ratio`` convolution (plus LayerNorm), which cuts
  the attention cost by ``sr_ratio**2``;
* a *Mix-FFN*: ``Linear -> 3x3 depthwise conv -> GELU -> Linear``; the depthwise convolution leaks
  enough positional information that no positional embedding is needed;
* a final LayerNorm.

Stochastic depth grows linearly over all blocks. Module and parameter names follow SMP 0.6.0 so its
checkpoints load unchanged. The four stages have strides 4, 8, 16 and 32: there is no stride-2
feature, so the encoder reports a 0-channel placeholder there.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._base import EncoderMixin, load_state_dict_without_head
from ._registry import hub


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension of tokens, or over channels of an ``NCHW`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class DropPath(nn.Module):
    """Stochastic depth: during training drop a residual branch for whole samples."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep


class DWConv(nn.Module):
    """3x3 depthwise convolution applied to a token sequence laid out on an ``height x width`` grid."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim, bias=True)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(batch, channels, height, width))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Mix-FFN: ``fc1 -> depthwise 3x3 conv -> activation -> fc2`` on tokens."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), height, width)))
        return self.drop(self.fc2(x))


class Attention(nn.Module):
    """Multi-head self-attention whose keys/values come from a spatially reduced copy of the tokens.

    Args:
        dim: token width.
        num_heads: number of heads (must divide ``dim``).
        qkv_bias: whether the query/key/value projections have a bias.
        qk_scale: attention logit scale; ``head_dim ** -0.5`` when ``None``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        sr_ratio: spatial reduction of keys/values (1 = full attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention dim {dim} must be divisible by num_heads {num_heads}.")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = float(qk_scale or (dim // num_heads) ** -0.5)
        self.attn_drop_rate = float(attn_drop)

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = int(sr_ratio)
        if self.sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
            self.norm = LayerNorm(dim)
        else:  # kept as attributes so scripted code sees the same structure
            self.sr = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, tokens, channels = x.shape
        head_dim = channels // self.num_heads
        q = self.q(x).reshape(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(batch, channels, height, width)
            x = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        kv = self.kv(x).reshape(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, kv[0], kv[1],
            dropout_p=self.attn_drop_rate if self.training else 0.0,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block (efficient attention + Mix-FFN) on an ``NCHW`` map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        sr_ratio: int = 1,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
            attn_drop=attn_drop, proj_drop=drop, sr_ratio=sr_ratio,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.drop_path(self.attn(self.norm1(t), height, width))
        t = t + self.drop_path(self.mlp(self.norm2(t), height, width))
        return t.transpose(1, 2).reshape(batch, channels, height, width)


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with a kernel larger than its stride (patches overlap), then LayerNorm."""

    def __init__(
        self, img_size: int = 224, patch_size: int = 7, stride: int = 4, in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2
        )
        self.norm = LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def _init_weights(module: nn.Module) -> None:
    """SegFormer's initialisation: truncated-normal linears, fan-out normal convolutions."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MixVisionTransformer(nn.Module):
    """The four-stage MiT backbone; ``forward`` returns the stride 4, 8, 16 and 32 maps.

    ``img_size``, ``patch_size`` and ``num_classes`` are accepted for compatibility and unused: the
    patch embeddings are always 7x7/4 then 3x3/2, and there is no classification head.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm,
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
    ) -> None:
        super().__init__()
        for arg, value in (("embed_dims", embed_dims), ("num_heads", num_heads),
                           ("mlp_ratios", mlp_ratios), ("depths", depths), ("sr_ratios", sr_ratios)):
            if len(value) != 4:
                raise ValueError(f"MixVisionTransformer needs 4 {arg} (one per stage), got {value}.")
        self.num_classes = num_classes
        self.depths = list(depths)

        # (kernel, stride) of each stage's patch embedding; the module order is SMP's key order.
        patches = ((7, 4), (3, 2), (3, 2), (3, 2))
        in_dims = [in_chans, *embed_dims[:3]]
        for i, (kernel, stride) in enumerate(patches):
            self.add_module(
                f"patch_embed{i + 1}",
                OverlapPatchEmbed(img_size, kernel, stride, in_dims[i], embed_dims[i]),
            )
        # Stochastic depth rate rises linearly from 0 over all blocks (plain floats: meta-safe).
        total = sum(depths)
        rates = [drop_path_rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]
        start = 0
        for i in range(4):
            blocks = [
                Block(
                    embed_dims[i], num_heads[i], mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                    qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                    drop_path=rates[start + j], norm_layer=norm_layer, sr_ratio=sr_ratios[i],
                )
                for j in range(depths[i])
            ]
            start += depths[i]
            self.add_module(f"block{i + 1}", nn.Sequential(*blocks))
            self.add_module(f"norm{i + 1}", norm_layer(embed_dims[i]))
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four stage outputs (strides 4, 8, 16, 32)."""
        x1 = self.norm1(self.block1(self.patch_embed1(x))).contiguous()
        x2 = self.norm2(self.block2(self.patch_embed2(x1))).contiguous()
        x3 = self.norm3(self.block3(self.patch_embed3(x2))).contiguous()
        x4 = self.norm4(self.block4(self.patch_embed4(x3))).contiguous()
        return [x1, x2, x3, x4]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_features(x)


class MixVisionTransformerEncoder(MixVisionTransformer, EncoderMixin):
    """MiT as an SMP encoder: ``[x, placeholder (0 channels, stride 2), s4, s8, s16, s32]``.

    Args:
        out_channels: channels of the input, the placeholder (0) and each stage.
        depth: number of features after the input (1..5); depth 1 returns only the placeholder.
        output_stride: 32, or 16/8 once :meth:`make_dilated` is applied (as SMP does, the
            last stages' strided convolutions, including the attention's spatial reduction,
            become dilated).
        **kwargs: passed to :class:`MixVisionTransformer`.
    """

    _has_stride2_feature = False
    _ignored_weight_prefixes = ("head.",)

    def __init__(
        self, out_channels: List[int], depth: int = 5, output_stride: int = 32, **kwargs
    ) -> None:
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        super().__init__(**kwargs)
        self._depth = depth
        self._in_channels = 3
        self._out_channels = list(out_channels)
        self._output_stride = output_stride

    load_state_dict = load_state_dict_without_head

    def get_stages(self) -> Dict[int, Sequence[nn.Module]]:
        return {
            16: [self.patch_embed3, self.block3, self.norm3],
            32: [self.patch_embed4, self.block4, self.norm4],
        }

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        batch, _, height, width = x.shape
        # No stride-2 stage: decoders get an empty map of the right size in its place.
        placeholder = x.new_empty([batch, 0, height // 2, width // 2])
        features = [x, placeholder]
        # Stage norms are this module's LayerNorm, which normalises the channels of NCHW maps.
        if self._depth >= 2:
            x = self.norm1(self.block1(self.patch_embed1(x))).contiguous()
            features.append(x)
        if self._depth >= 3:
            x = self.norm2(self.block2(self.patch_embed2(x))).contiguous()
            features.append(x)
        if self._depth >= 4:
            x = self.norm3(self.block3(self.patch_embed3(x))).contiguous()
            features.append(x)
        if self._depth >= 5:
            x = self.norm4(self.block4(self.patch_embed4(x))).contiguous()
            features.append(x)
        return features


def _mit_params(embed_dims: List[int], depths: List[int]) -> Dict[str, object]:
    return {
        "out_channels": [3, 0, *embed_dims],
        "patch_size": 4,
        "embed_dims": embed_dims,
        "num_heads": [1, 2, 5, 8],
        "mlp_ratios": [4, 4, 4, 4],
        "qkv_bias": True,
        "norm_layer": partial(LayerNorm, eps=1e-6),
        "depths": depths,
        "sr_ratios": [8, 4, 2, 1],
        "drop_rate": 0.0,
        "drop_path_rate": 0.1,
    }


_WIDE = [64, 128, 320, 512]
# name -> (embed dims, blocks per stage, hub revision of the ImageNet weights)
_SPECS = {
    "mit_b0": ([32, 64, 160, 256], [2, 2, 2, 2], "9ce53d104d92d75aabb00aae70677aaab67e7c84"),
    "mit_b1": (_WIDE, [2, 2, 2, 2], "a04bf4f13a549bce677cf79b04852e7510782817"),
    "mit_b2": (_WIDE, [3, 4, 6, 3], "868ab6f13871dcf8c3d9f90ee4519403475b65ef"),
    "mit_b3": (_WIDE, [3, 4, 18, 3], "32558d12a65f1daa0ebcf4f4053c4285e2c1cbda"),
    "mit_b4": (_WIDE, [3, 8, 27, 3], "3a3454e900a4b4f11dd60eeb59101a9a1a36b017"),
    "mit_b5": (_WIDE, [3, 6, 40, 3], "ced04d96c586b6297fd59a7a1e244fc78fdb6531"),
}

# ImageNet-1k weights, ImageNet-normalised RGB in [0, 1].
ENCODERS = mix_transformer_encoders = {
    name: {
        "encoder": MixVisionTransformerEncoder,
        "pretrained_settings": {"imagenet": hub(f"smp-hub/{name}.imagenet", revision)},
        "params": _mit_params(list(dims), list(depths)),
    }
    for name, (dims, depths, revision) in _SPECS.items()
}
