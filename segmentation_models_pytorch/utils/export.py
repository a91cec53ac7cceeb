"""Deployment helpers: ONNX export with a numerical check, TorchScript and ``torch.export``.

All of them put the model in eval mode for the duration of the call (restoring the previous mode
afterwards) and refuse, with an explanation, models that declare a capability they lack through the
``_is_torch_scriptable`` / ``_is_torch_exportable`` flags of the model or its encoder.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

#: ONNX opset used when none is given: what torch's exporter emits natively, and what every
#: onnxruntime since 1.14 (and TensorRT 8.6+) runs.
DEFAULT_OPSET = 18
#: Largest relative error (max |onnx - torch| / max |torch|) ``export_onnx(check=True)`` accepts.
DEFAULT_RTOL = 1e-4
# Files larger than protobuf's 2 GB limit must keep their weights in a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, ...], List[torch.Tensor]]


class CapabilityError(RuntimeError):
    """The model (or its encoder) declares that it does not support the requested conversion."""


# ------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model.eval()``, restoring the previous training flags afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def _flag(model: nn.Module, flag: str) -> Tuple[bool, str]:
    """``(supported, who)``: the model's own flag and its encoder's must both allow ``flag``."""
    if not getattr(model, flag, True):
        return False, type(model).__name__
    encoder = getattr(model, "encoder", None)
    if encoder is not None and not getattr(encoder, flag, True):
        name = getattr(model, "config", {}).get("encoder_name") or type(encoder).__name__
        return False, f"its encoder {name!r}"
    return True, ""


def require_capability(model: nn.Module, capability: str) -> None:
    """Raise :class:`CapabilityError` if ``model`` declares it cannot be ``capability``.

    Args:
        model: a segmentation model (any ``nn.Module`` is accepted; plain modules pass).
        capability: ``"scriptable"``, ``"exportable"`` or ``"compilable"``.
    """
    alternatives = {
        "scriptable": "Use torch.jit.trace, torch.export.export or export_onnx instead",
        "exportable": "Use torch.jit.trace or export_onnx(..., dynamo=False) instead",
        "compilable": "Run it eagerly instead",
    }
    if capability not in alternatives:
        raise ValueError(f"capability must be one of {sorted(alternatives)}, got {capability!r}.")
    ok, who = _flag(model, f"_is_torch_{capability}")
    if not ok:
        verb = {"scriptable": "scripted", "exportable": "exported", "compilable": "compiled"}[capability]
        tool = {"scriptable": "torch.jit.script", "exportable": "torch.export", "compilable": "torch.compile"}
        raise CapabilityError(
            f"{type(model).__name__} cannot be {verb} with {tool[capability]}: {who} is marked "
            f"_is_torch_{capability} = False. {alternatives[capability]}."
        )


def _model_in_channels(model: nn.Module) -> int:
    encoder = getattr(model, "encoder", None)
    return int(getattr(encoder, "_in_channels", None) or getattr(model, "config", {}).get("in_channels", 3))


def _example_input(model: nn.Module, input_shape: Optional[Sequence[int]], min_batch: int) -> torch.Tensor:
    if input_shape is None:
        input_shape = (1, _model_in_channels(model), 256, 256)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(
            f"input_shape must be (batch, channels, height, width) of positive ints, got {input_shape!r}."
        )
    # dynamo treats a size-1 dimension as a constant, so a dynamic batch needs an example of 2+.
    shape = (max(shape[0], min_batch),) + shape[1:]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device)


def _as_list(outputs: Outputs) -> List[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (both compared in float64)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / (scale + 1e-12)


def _other_shape(x: torch.Tensor, divisor: int) -> Tuple[int, ...]:
    """A second test shape: another batch size and (with ``divisor``) other, non-divisible H/W."""
    b, c, h, w = x.shape
    if divisor <= 0:
        return (b + 1, c, h, w)
    return (b + 1, c, h + divisor + divisor // 2, w + divisor // 2)


def _input_divisor(model: nn.Module) -> int:
    divisor = getattr(model, "input_divisor", None)
    return int(divisor) if isinstance(divisor, int) else 32


# ------------------------------------------------------------------------------------ TorchScript
def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` the model, with a clear error for models that cannot be scripted.

    TorchScript is deprecated in PyTorch; prefer :func:`export_program` or :func:`export_onnx` for
    new deployments.
    """
    require_capability(model, "scriptable")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        return torch.jit.script(model)


# ------------------------------------------------------------------------------------ torch.export
def _dynamic_shapes(dynamic: bool, spatial: bool = True) -> Optional[Dict[str, Dict[int, Any]]]:
    if not dynamic:
        return None
    from torch.export import Dim

    # AUTO lets the exporter keep H/W static where the network fixes them (e.g. ViT position
    # embeddings) instead of failing; the batch is always dynamic.
    axes: Dict[int, Any] = {0: Dim.AUTO}
    if spatial:
        axes.update({2: Dim.AUTO, 3: Dim.AUTO})
    return {"x": axes}


def export_program(
    model: nn.Module,
    input_shape: Optional[Sequence[int]] = None,
    dynamic: bool = True,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` the model with dynamic batch, height and width.

    Args:
        model: the segmentation model.
        input_shape: example ``(batch, channels, height, width)``; default ``(2, C, 256, 256)``.
        dynamic: make batch/height/width dynamic (where the network allows; see
            :func:`static_axes`).
        strict: passed to ``torch.export.export``.
    """
    require_capability(model, "exportable")
    x = _example_input(model, input_shape, min_batch=2 if dynamic else 1)
    with eval_mode(model):
        return torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes(dynamic), strict=strict)


def static_axes(program: torch.export.ExportedProgram) -> List[int]:
    """Input axes an exported program fixed to the example's size (empty: all dynamic)."""
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x")
    shape = node.meta["val"].shape
    return [i for i, s in enumerate(shape) if isinstance(s, int)]


# ------------------------------------------------------------------------------------ ONNX
def _pooling_matrix(n: Any, size: int, like: torch.Tensor) -> torch.Tensor:
    """``(size, n)`` matrix averaging ``n`` positions into ``size`` bins, as adaptive pooling does."""
    i = torch.arange(size, device=like.device)
    start = torch.div(i * n, size, rounding_mode="floor")
    end = torch.div((i + 1) * n + size - 1, size, rounding_mode="floor")
    k = torch.arange(n, device=like.device)
    inside = (k[None, :] >= start[:, None]) & (k[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def _adaptive_avg_pool2d_by_matmul(output_size: Tuple[int, int], x: torch.Tensor) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` written as two matrix products, valid for any input size."""
    rows = _pooling_matrix(x.shape[-2], output_size[0], x)
    cols = _pooling_matrix(x.shape[-1], output_size[1], x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


@contextlib.contextmanager
def onnx_compatible(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily rewrite layers whose ONNX translation would be fixed to the example's size.

    ONNX has no adaptive pooling: the exporters turn ``AdaptiveAvgPool2d(k)`` (k > 1, e.g. PSPNet's
    and UPerNet's pyramid pooling) into an ``AveragePool`` whose kernel is computed from the example
    input, silently wrong for other sizes. Inside this block such layers compute the same average as
    matrix products built from the actual input size. Global pooling (k = 1) exports fine as is.
    """
    patched = []
    for module in model.modules():
        if isinstance(module, nn.AdaptiveAvgPool2d):
            size = module.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            if size != (1, 1) and all(isinstance(s, int) for s in size):
                module.forward = functools.partial(_adaptive_avg_pool2d_by_matmul, size)  # type: ignore
                patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward


def _output_names(model: nn.Module) -> List[str]:
    return ["masks", "labels"] if getattr(model, "classification_head", None) is not None else ["masks"]


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike[str]],
    input_shape: Optional[Sequence[int]] = None,
    dynamic: bool = True,
    opset: Optional[int] = None,
    check: bool = True,
    rtol: float = DEFAULT_RTOL,
    dynamo: bool = True,
    external_data: Optional[bool] = None,
) -> Path:
    """Export a model to ONNX, validate the file and compare onnxruntime with PyTorch.

    The graph has one input ``input`` of shape ``(batch, channels, height, width)`` and one output
    ``masks`` (plus ``labels`` for models built with ``aux_params``). Inputs whose size the
    architecture cannot take directly are padded and cropped inside the graph, as in eager mode.

    Args:
        model: the segmentation model (exported in eval mode; its mode is restored afterwards).
        path: ``.onnx`` file to write (parent folders are created).
        input_shape: example input ``(batch, channels, height, width)``; default
            ``(1, in_channels, 256, 256)``. With ``dynamic=True`` a batch of 1 is traced as 2.
        dynamic: make batch, height and width dynamic. Networks that fix the spatial size (e.g. ViT
            encoders with fixed position embeddings) keep the example's height/width, with a warning.
        opset: ONNX opset version; default :data:`DEFAULT_OPSET` (18).
        check: validate with ``onnx.checker`` and, when ``onnxruntime`` is installed, run the file
            on the example input (and, if dynamic, on a second shape) and compare with PyTorch.
        rtol: largest accepted ``max|onnx - torch| / max|torch|``.
        dynamo: use the ``torch.export``-based exporter (default). ``False`` uses the older
            TorchScript-based exporter (faster, deprecated by PyTorch).
        external_data: store the weights in a side file ``<path>.data``; default only for models too
            large for a single protobuf (> ~2 GB).

    Returns:
        The path of the written file.

    Raises:
        CapabilityError: the model is marked non-exportable (``dynamo=True``).
        RuntimeError: onnxruntime's output differs from PyTorch's by more than ``rtol``.
    """
    if opset is None:
        opset = DEFAULT_OPSET
    if not isinstance(opset, int) or not 7 <= opset <= 30:
        raise ValueError(f"opset must be an int ONNX opset version (e.g. 17 or 18), got {opset!r}.")
    if dynamo:
        require_capability(model, "exportable")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _param_bytes(model) > _EXTERNAL_DATA_BYTES
    x = _example_input(model, input_shape, min_batch=2 if dynamic else 1)
    output_names = _output_names(model)

    with eval_mode(model), onnx_compatible(model), warnings.catch_warnings():
        # The exporters' own deprecation and tracer chatter is not actionable for our users.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if dynamo:
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(dynamic),
                input_names=["input"],
                output_names=output_names,
                opset_version=opset,
                verbose=False,
            )
            program.save(str(path), external_data=external_data)
        else:
            axes = {0: "batch", 2: "height", 3: "width"}
            dynamic_axes = {"input": axes, "masks": axes, "labels": {0: "batch"}} if dynamic else None
            if dynamic_axes and "labels" not in output_names:
                dynamic_axes.pop("labels")
            try:
                torch.onnx.export(
                    model,
                    (x,),
                    str(path),
                    dynamo=False,
                    input_names=["input"],
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                )
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise RuntimeError(
                    f"The TorchScript-based ONNX exporter (dynamo=False) cannot export "
                    f"{type(model).__name__}{' with dynamic height/width' if dynamic else ''}: {first} "
                    "Use the default dynamo=True exporter"
                    f"{', or dynamic=False' if dynamic else ''}."
                ) from e

    fixed = _onnx_static_input_axes(path) if dynamic else []
    if dynamic and fixed:
        names = {0: "batch", 1: "channels", 2: "height", 3: "width"}
        fixed_names = [names[i] for i in fixed if i != 1]
        if fixed_names:
            warnings.warn(
                f"{type(model).__name__} fixes the input {', '.join(fixed_names)} of the ONNX graph to "
                f"the example's {tuple(x.shape)}: the network does not support other sizes there.",
                stacklevel=2,
            )
    if check:
        check_onnx(model, path, x, rtol=rtol, dynamic_spatial=dynamic and 2 not in fixed)
    return path


def _onnx_static_input_axes(path: Path) -> List[int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    return [i for i, d in enumerate(dims) if d.HasField("dim_value")]


def check_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike[str]],
    example: torch.Tensor,
    rtol: float = DEFAULT_RTOL,
    dynamic_spatial: bool = True,
) -> Dict[Tuple[int, ...], float]:
    """Validate an exported file and compare onnxruntime's outputs with the PyTorch model's.

    Runs ``onnx.checker`` (always) and, if ``onnxruntime`` is installed, the example input plus a
    second shape (another batch size, and other non-divisible height/width when
    ``dynamic_spatial``). Returns ``{input shape: largest relative error}`` (empty without
    onnxruntime).

    Raises:
        RuntimeError: an output differs by more than ``rtol`` (the message names output and shape).
    """
    import onnx

    onnx.checker.check_model(str(path))
    try:
        import onnxruntime as ort
    except ImportError:
        warnings.warn("onnxruntime is not installed: the ONNX file was validated but not run.", stacklevel=2)
        return {}

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    shapes = [tuple(example.shape)]
    if session.get_inputs()[0].shape[0] != example.shape[0]:  # batch is dynamic
        second = _other_shape(example, _input_divisor(model) if dynamic_spatial else 0)
        shapes.append(second)
    errors: Dict[Tuple[int, ...], float] = {}
    generator = torch.Generator().manual_seed(1)
    with eval_mode(model), torch.no_grad():
        for shape in shapes:
            same = shape == tuple(example.shape)
            x = example if same else torch.randn(shape, generator=generator).to(example)
            expected = _as_list(model(x))
            actual = session.run(None, {input_name: x.detach().cpu().numpy()})
            worst = 0.0
            for name, a, e in zip(_output_names(model), actual, expected):
                err = relative_error(torch.from_numpy(a), e)
                if not err <= rtol:
                    raise RuntimeError(
                        f"ONNX output {name!r} differs from PyTorch for input shape {shape}: relative "
                        f"error {err:.2e} > rtol={rtol:g} ({path})."
                    )
                worst = max(worst, err)
            errors[shape] = worst
    return errors
