"""Inference fast path: ``smp.optimize_for_inference(model)``.

Rewrites an eval-mode model for speed without changing what it computes (beyond float rounding):

1. re-parameterises multi-branch blocks (MobileOne-style modules exposing ``reparameterize()``);
2. folds every BatchNorm that directly follows a convolution (plain, transposed, or a zero-padding
   "same" variant) into that convolution. Pairs are found by running the model once with hooks
   (blocks take their plain module-by-module path for it) and matching the BatchNorm's input tensor
   with a convolution's output tensor, so only true conv -> BN edges are folded, whatever the
   module layout;
3. replaces dropout layers (no-ops in eval) with identities;
4. keeps weights in ``channels_last``;
5. optionally casts weights to ``bfloat16``/``float16``; inputs are cast on the way in and outputs
   back to the caller's dtype on the way out;
6. in float32 on CPU, turns dense 3x3 convolutions with many channels into Winograd convolutions
   (:mod:`.base.winograd`), which run where they pay and fall back to the plain one elsewhere.

The result is checked against the original on a probe input before it is returned.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .base import modules as md
from .base.winograd import WinogradConv2d
from .base.winograd import qualifies as _winograd_qualifies

_BN = (nn.BatchNorm2d,)
_DROPOUT = (nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# Conv2d subclasses whose forward only zero-pads the input and then convolves with ``self.weight``
# and ``self.bias`` (checked against their sources), so a following BatchNorm folds into them.
# Others may transform the weight (timm's StdConv2d standardises it, which would undo a fold).
_STATIC_SAME = "efficientnet_pytorch.utils.Conv2dStaticSamePadding"  # pads with a fixed module
_PAD_THEN_CONV = {
    _STATIC_SAME,
    "efficientnet_pytorch.utils.Conv2dDynamicSamePadding",
    "timm.layers.conv2d_same.Conv2dSame",
    "timm.layers.conv2d_same.Conv2dSameExport",
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain_conv2d(cls: type) -> bool:
    """``nn.Conv2d`` or a subclass that keeps its forward (adds attributes only)."""
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


def _foldable_conv(mod: nn.Module) -> bool:
    if type(mod) is nn.ConvTranspose2d:
        return True
    return isinstance(mod, nn.Conv2d) and (_plain_conv2d(type(mod)) or _qualname(type(mod)) in _PAD_THEN_CONV)


def _find_conv_bn_pairs(model: nn.Module, probe: torch.Tensor) -> List[Tuple[str, str]]:
    """(conv name, bn name) pairs where the BN consumes exactly that conv's output tensor."""
    names = {m: n for n, m in model.named_modules()}
    conv_out: Dict[int, str] = {}
    pairs: List[Tuple[str, str]] = []
    uses: Dict[str, int] = {}
    keep_alive: List[torch.Tensor] = []  # so tensor ids are not recycled during the probe
    handles = []

    def on_conv(mod, inputs, output):
        keep_alive.append(output)
        conv_out[id(output)] = names[mod]
        uses[names[mod]] = uses.get(names[mod], 0) + 1

    def on_bn(mod, inputs, output):
        src = conv_out.get(id(inputs[0]))
        if src is not None:
            pairs.append((src, names[mod]))
        uses[names[mod]] = uses.get(names[mod], 0) + 1

    for mod in model.modules():
        if _foldable_conv(mod):
            handles.append(mod.register_forward_hook(on_conv))
        elif type(mod) in _BN:
            handles.append(mod.register_forward_hook(on_bn))
    from .base.modules import plain_module_calls

    try:
        with torch.no_grad(), plain_module_calls():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    # A module called several times (shared weights) cannot be folded safely.
    return [(c, b) for c, b in pairs if uses.get(c) == 1 and uses.get(b) == 1]


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    scale = (
        bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine
        else torch.rsqrt(bn.running_var + bn.eps)
    )
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    w = conv.weight
    if isinstance(conv, nn.ConvTranspose2d):  # (in, out / groups, kh, kw): outputs are dim 1 per group
        g = conv.groups
        weight = (w.unflatten(0, (g, -1)) * scale.reshape(g, 1, -1, 1, 1)).flatten(0, 1)
    else:
        weight = w * scale.reshape(-1, 1, 1, 1)
    conv.weight = nn.Parameter(weight.detach())
    conv.bias = nn.Parameter((bias * scale + shift).detach())


# Activation module -> oneDNN post-op (name, scalars, algorithm) of mkldnn._convolution_pointwise.
def _post_op(act: nn.Module) -> Optional[Tuple[str, list, str]]:
    declared = getattr(type(act), "onednn_post_op", None)  # a module computing exactly that op
    if isinstance(declared, str):
        return declared, [], ""
    if type(act) is nn.ReLU:
        return "relu", [], ""
    if type(act) is nn.SiLU:
        return "swish", [], ""
    if type(act) is nn.ReLU6:
        return "hardtanh", [0.0, 6.0], ""
    if type(act) is nn.Sigmoid:
        return "sigmoid", [], ""
    return None


def _fusable_conv(mod: nn.Module) -> bool:
    """Convs whose forward is exactly (zero-pad, then) ``conv2d(x, weight, bias, ...)`` with
    numeric padding, so that oneDNN's fused convolution can replace it."""
    if not isinstance(mod, nn.Conv2d) or isinstance(mod.padding, str) or mod.padding_mode != "zeros":
        return False
    # ConvAct applies a static pad module itself; dynamic "same" pads depend on the input size.
    return _plain_conv2d(type(mod)) or _qualname(type(mod)) == _STATIC_SAME


class ConvAct(nn.Module):
    """A convolution and the activation that consumes its output, run as one oneDNN primitive on
    CPU (float32/bfloat16): the activation is applied while each output tile is still in cache, and
    no second full-size tensor is allocated. Elsewhere (other devices and dtypes, TorchScript,
    tracing, export, compile) it runs the two modules."""

    def __init__(self, conv: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.act = act
        self.post_op = _post_op(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not self._fusable(x):
            return self.act(self.conv(x))
        conv = self.conv
        pad = getattr(conv, "static_padding", None)
        if pad is not None:
            x = pad(x)
        name, scalars, algorithm = self.post_op
        if isinstance(conv, WinogradConv2d) and conv._pays(x):
            return _post_op_inplace(conv._winograd(x), name, scalars)
        weight, padding, dilation = md.live_taps(conv, x) or (conv.weight, conv.padding, conv.dilation)
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, conv.bias, padding, conv.stride, dilation, conv.groups,
            name, scalars, algorithm,
        )  # fmt: skip

    @torch.jit.unused  # no annotations: TorchScript cannot resolve them on unused methods
    def _fusable(self, x):
        from .base.model import is_torch_compiling

        # Graph capture (tracing, export, compile) records the two plain ops; compilers fuse them.
        graph = torch.jit.is_tracing() or is_torch_compiling()
        return not graph and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16)


def _post_op_inplace(y: torch.Tensor, name: str, scalars: list) -> torch.Tensor:
    """Apply a oneDNN post-op (see :func:`_post_op`) to a fresh tensor in place."""
    if name == "relu":
        return y.relu_()
    if name == "swish":
        return nn.functional.silu(y, inplace=True)
    if name == "hardtanh":
        return y.clamp_(scalars[0], scalars[1])
    if name == "sigmoid":
        return y.sigmoid_()
    raise NotImplementedError(f"post-op {name!r}")  # _post_op declares no others for dense convs


class _CallLog(torch.overrides.TorchFunctionMode):
    """Records, for every torch function call, the ids of the tensors it reads."""

    # Reads of shape, layout or address only (attributes come in as ``__get__``).
    _METADATA = {"__get__", "size", "dim", "is_contiguous", "stride", "numel", "data_ptr", "storage_offset"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[set] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") not in self._METADATA:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            self.calls.append({id(t) for t in leaves if isinstance(t, torch.Tensor)})
        return out


def _find_conv_act_pairs(model: nn.Module, probe: torch.Tensor) -> List[Tuple[str, str]]:
    """(conv name, activation name) pairs where the activation is the first op to read the conv's
    output and, unless it works in place, the only one: fusing then changes nothing any other op
    sees. Traced on the model's own paths (shortcuts included) with and without autograd: a pair
    must hold in both, as blocks may take different routes in the two. Convs that a block reads by
    weight on some route (``weight_read_convs``, e.g. Unet's fold, taken only for inputs larger
    than a small probe) stay plain, whatever route the probe took."""
    found = [set(_conv_act_pairs(model, probe, grad)) for grad in (False, True)]
    keep_plain = _weight_read_convs(model)
    return sorted((conv, act) for conv, act in found[0] & found[1] if conv not in keep_plain)


def _weight_read_convs(model: nn.Module) -> set:
    """Names of the convs whose weights a module's forward may use directly instead of calling
    them: its class lists them, relative to itself, in ``weight_read_convs``."""
    names = set()
    for prefix, mod in model.named_modules():
        for rel in getattr(type(mod), "weight_read_convs", ()):
            names.add(f"{prefix}.{rel}" if prefix else rel)
    return names


def _conv_act_pairs(model: nn.Module, probe: torch.Tensor, grad: bool) -> List[Tuple[str, str]]:
    names = {m: n for n, m in model.named_modules()}
    log = _CallLog()
    produced: Dict[int, Tuple[str, int]] = {}  # output id -> (conv name, call index after it)
    # (conv, its output id, call index after it, act, act's first call index, index after it, in place)
    events: List[Tuple[str, int, int, str, int, int, bool]] = []
    uses: Dict[str, int] = {}
    keep_alive: List[torch.Tensor] = []
    starts: Dict[int, int] = {}

    def count(mod):
        uses[names[mod]] = uses.get(names[mod], 0) + 1

    def on_conv(mod, inputs, output):
        count(mod)
        keep_alive.append(output)
        produced[id(output)] = (names[mod], len(log.calls))

    def before_act(mod, inputs):
        starts[id(mod)] = len(log.calls)

    def on_act(mod, inputs, output):
        count(mod)
        src = produced.get(id(inputs[0]))
        if src is not None:
            in_place = output is inputs[0]
            conv, conv_end = src
            events.append(
                (conv, id(inputs[0]), conv_end, names[mod], starts[id(mod)], len(log.calls), in_place)
            )
            keep_alive.append(output)

    handles = []
    for mod in model.modules():
        if _fusable_conv(mod):
            handles.append(mod.register_forward_hook(on_conv))
        elif _post_op(mod) is not None:
            handles.append(mod.register_forward_pre_hook(before_act))
            handles.append(mod.register_forward_hook(on_act))
    try:
        with torch.set_grad_enabled(grad), log:
            model(probe)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for conv, tensor, conv_end, act, start, end, in_place in events:
        read = [k for k, ids in enumerate(log.calls) if tensor in ids]
        before = [k for k in read if conv_end <= k < start]
        after = [k for k in read if k >= end]
        if uses.get(conv) == 1 and uses.get(act) == 1 and not before and (in_place or not after):
            pairs.append((conv, act))
    return pairs


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def optimize_for_inference(
    model: nn.Module,
    dtype: Optional[torch.dtype] = None,
    example_input: Optional[torch.Tensor] = None,
    inplace: bool = False,
    check: bool = True,
    fuse_activations: bool = True,
    winograd: bool = True,
) -> nn.Module:
    """Return a faster, inference-only version of ``model`` (see the module docstring).

    Args:
        model: a segmentation model (any ``nn.Module`` taking an NCHW tensor works).
        dtype: ``None`` keeps float32; ``torch.bfloat16`` / ``torch.float16`` cast the weights.
        example_input: probe used to find conv->BN pairs and to check the result; defaults to a
            random ``1 x C x 64 x 64`` tensor (C from the encoder's ``_in_channels``).
        inplace: modify ``model`` itself instead of a deep copy.
        check: compare the optimised model with the original on the probe (float32 only; raises if
            the max relative difference exceeds 1e-4).
        fuse_activations: on CPU, run each convolution and the ReLU/ReLU6/SiLU/sigmoid that
            consumes its output as one oneDNN primitive (:class:`ConvAct`).
        winograd: in float32, run dense 3x3 convolutions with at least 128 input and output
            channels as Winograd F(4x4, 3x3) convolutions on CPU maps up to 64x64
            (:mod:`~segmentation_models_pytorch.base.winograd`): 1.4-2.1x faster per layer, at
            about 1e-5 relative rounding per layer. Each converted convolution caches its
            transformed kernel on first use, 4x its weight's size (310-360 MB for most ResNet-34 models).

    Returns:
        The optimised model, in eval mode. It is for inference only: folded BatchNorms no longer
        learn statistics.
    """
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}."
        )
    original = model
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if example_input is None:
        in_channels = getattr(getattr(model, "encoder", None), "_in_channels", 3)
        example_input = torch.randn(1, in_channels, 64, 64, device=device)
    reference = None
    if check and not inplace:  # both autograd modes: blocks may take other routes with it on
        original.eval()
        reference = {grad: _run(original, example_input, grad) for grad in (False, True)}

    if getattr(model, "recompute_activations", False):
        model.recompute_activations = False  # saves training memory only; inference has one path
    for mod in list(model.modules()):
        if hasattr(mod, "reparameterize") and callable(mod.reparameterize) and mod is not model:
            mod.reparameterize()
    for conv_name, bn_name in _find_conv_bn_pairs(model, example_input):
        with torch.no_grad():
            _fold(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _set_submodule(model, bn_name, nn.Identity())
    for name, mod in list(model.named_modules()):
        if isinstance(mod, _DROPOUT):
            _set_submodule(model, name, nn.Identity())
    if fuse_activations and device.type == "cpu" and torch.backends.mkldnn.is_available():
        for conv_name, act_name in _find_conv_act_pairs(model, example_input):
            act = model.get_submodule(act_name)
            _set_submodule(model, conv_name, ConvAct(model.get_submodule(conv_name), act))
            _set_submodule(model, act_name, nn.Identity())

    if winograd and device.type == "cpu" and dtype in (None, torch.float32):
        for mod in list(model.modules()):
            if _winograd_qualifies(mod):
                WinogradConv2d.convert(mod)

    from .base.model import to_channels_last

    to_channels_last(model)
    if reference is not None:
        for grad, expected in reference.items():
            for a, b in zip(_as_tuple(_run(model, example_input, grad)), _as_tuple(expected)):
                a, b = a.detach().float(), b.detach().float()
                err = float((a - b).abs().max() / (b.abs().max() + 1e-12))
                if err > 1e-4:
                    raise RuntimeError(
                        f"optimize_for_inference changed the output (max relative difference "
                        f"{err:.2e}, autograd {'on' if grad else 'off'}); please report this model "
                        "configuration."
                    )
    if dtype is not None and dtype is not torch.float32:
        model.to(dtype)
        model.register_forward_pre_hook(_cast_inputs(dtype))
        model.register_forward_hook(_cast_outputs)
    return model


def _run(model: nn.Module, x: torch.Tensor, grad: bool):
    with torch.set_grad_enabled(grad):
        out = model(x)
    return tuple(t.detach() for t in _as_tuple(out))


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _cast_inputs(dtype: torch.dtype):
    def hook(module, args):
        x = args[0]
        module._caller_dtype = x.dtype
        return (x.to(dtype), *args[1:])

    return hook


def _cast_outputs(module, args, output):
    dtype = getattr(module, "_caller_dtype", torch.float32)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return tuple(cast(t) for t in output) if isinstance(output, tuple) else cast(output)
