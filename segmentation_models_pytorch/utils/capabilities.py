"""Check which deployment paths a model supports, and that each one gives the eager model's output.

Used by ``benchmarks/export_matrix.py`` (which writes ``docs/capability_matrix.md``) and by the test
suite. Every check runs the converted model on the example input and, where the conversion claims
to handle other sizes, on a second shape (another batch size and non-divisible height/width), and
compares with the eager model.

A check returns a :class:`CheckResult`; it raises :class:`CheckFailed` when a conversion runs but
gives a wrong result, and lets :class:`~segmentation_models_pytorch.utils.export.CapabilityError`
through for models that declare the conversion unsupported.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .export import (
    CapabilityError,
    _as_list,
    _input_divisor,
    _other_shape,
    eval_mode,
    export_onnx,
    export_program,
    relative_error,
    require_capability,
    script_model,
    static_axes,
)

#: Relative error accepted for conversions that should reproduce float32 results.
RTOL = 1e-4
#: Relative error accepted under mixed precision (bfloat16 keeps ~3 significant digits).
MIXED_PRECISION_RTOL = 0.1

#: Small, representative configuration of each architecture for the checks: a ResNet-18 encoder
#: (a 2-head, 64-wide ViT for DPT) and narrow decoders. Widths do not change what can be converted.
REPRESENTATIVE_CONFIGS: Dict[str, Dict[str, Any]] = {
    "unet": {"decoder_channels": (64, 32, 16, 16, 8)},
    "unetplusplus": {"decoder_channels": (64, 32, 16, 16, 8)},
    "manet": {"decoder_channels": (64, 32, 16, 16, 8), "decoder_pab_channels": 16},
    "linknet": {},
    "fpn": {"decoder_pyramid_channels": 64, "decoder_segmentation_channels": 32},
    "pspnet": {"psp_out_channels": 64},
    "deeplabv3": {"decoder_channels": 32},
    "deeplabv3plus": {"decoder_channels": 32},
    "pan": {"decoder_channels": 16},
    "upernet": {"decoder_channels": 32},
    "segformer": {"decoder_segmentation_channels": 32},
    "dpt": {
        "encoder_name": "tu-vit_tiny_patch16_224",
        "dynamic_img_size": True,
        "embed_dim": 64,
        "num_heads": 2,
        "decoder_intermediate_channels": (16, 32, 64, 64),
        "decoder_fusion_channels": 32,
    },
}
DEFAULT_ENCODER = "resnet18"


def representative_config(arch: str) -> Dict[str, Any]:
    """Constructor arguments of the small model the checks use for ``arch``."""
    return {"encoder_name": DEFAULT_ENCODER, **REPRESENTATIVE_CONFIGS.get(arch.lower(), {})}


def representative_model(arch: str, classes: int = 2, **overrides: Any) -> nn.Module:
    """Build ``arch`` (a key of ``smp.MODEL_ARCHITECTURES_MAPPING``) small, with random weights."""
    import segmentation_models_pytorch as smp

    config = {**representative_config(arch), **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smp.create_model(arch, encoder_weights=None, classes=classes, **config)
    return model.eval()


class CheckFailed(AssertionError):
    """A conversion ran but its output differs from the eager model's (or it crashed)."""


@dataclass
class CheckResult:
    """Outcome of one check.

    ``status`` is ``"ok"``, ``"partial"`` (works with the limitation in ``detail``),
    ``"unsupported"`` (the model declares it and raises a clear :class:`CapabilityError`),
    ``"fail"`` or ``"n/a"`` (e.g. no CUDA device).
    """

    status: str
    detail: str = ""
    errors: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def max_error(self) -> Optional[float]:
        return max(self.errors.values()) if self.errors else None


def _shape_key(x: torch.Tensor) -> str:
    return "x".join(str(s) for s in x.shape)


def _compare(
    run: Callable[[torch.Tensor], Any],
    reference: nn.Module,
    inputs: Sequence[torch.Tensor],
    rtol: float,
    what: str,
) -> Dict[str, float]:
    """Run ``run`` and the eager ``reference`` on each input; raise CheckFailed beyond ``rtol``."""
    errors: Dict[str, float] = {}
    with torch.no_grad():
        for x in inputs:
            expected = _as_list(reference(x))
            try:
                actual = _as_list(run(x))
            except Exception as e:  # the conversion crashed on this input
                raise CheckFailed(f"{what} failed on input {tuple(x.shape)}: {type(e).__name__}: {e}") from e
            if len(actual) != len(expected):
                raise CheckFailed(f"{what} returned {len(actual)} outputs, eager {len(expected)}.")
            err = max(relative_error(a.float(), e.float()) for a, e in zip(actual, expected))
            if not all(torch.isfinite(a).all() for a in actual):
                raise CheckFailed(f"{what} produced non-finite values on input {tuple(x.shape)}.")
            if not err <= rtol:
                raise CheckFailed(
                    f"{what} differs from eager on {tuple(x.shape)}: rel err {err:.2e} > {rtol:g}."
                )
            errors[_shape_key(x)] = err
    return errors


def _second_input(model: nn.Module, x: torch.Tensor, spatial: bool = True) -> torch.Tensor:
    shape = _other_shape(x, _input_divisor(model) if spatial else 0)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(x)


# ------------------------------------------------------------------------------------ checks
def check_script(model: nn.Module, x: torch.Tensor, rtol: float = RTOL) -> CheckResult:
    """``torch.jit.script``: any input size, compared on two shapes."""
    with eval_mode(model):
        scripted = script_model(model)
        errors = _compare(scripted, model, [x, _second_input(model, x)], rtol, "torch.jit.script")
    return CheckResult("ok", errors=errors)


def check_trace(model: nn.Module, x: torch.Tensor, rtol: float = RTOL) -> CheckResult:
    """``torch.jit.trace``: must reproduce the example; reports whether other sizes work too."""
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
        errors = _compare(traced, model, [x], rtol, "torch.jit.trace")
        try:
            errors.update(_compare(traced, model, [_second_input(model, x)], rtol, "torch.jit.trace"))
        except CheckFailed:
            return CheckResult("partial", "traced graph is fixed to the example's input size", errors)
    return CheckResult("ok", errors=errors)


def check_export(model: nn.Module, x: torch.Tensor, rtol: float = RTOL) -> CheckResult:
    """``torch.export.export`` with dynamic batch/height/width (where the network allows)."""
    program = export_program(model, tuple(x.shape), dynamic=True)
    fixed = [a for a in static_axes(program) if a != 1]
    spatial = 2 not in fixed and 3 not in fixed
    with eval_mode(model):
        inputs = [x] if 0 in fixed else [x, _second_input(model, x, spatial=spatial)]
        errors = _compare(program.module(), model, inputs, rtol, "torch.export")
    if fixed:
        names = ", ".join({0: "batch", 2: "height", 3: "width"}[a] for a in fixed)
        return CheckResult("partial", f"static {names}", errors)
    return CheckResult("ok", errors=errors)


def check_compile(model: nn.Module, x: torch.Tensor, rtol: float = RTOL) -> CheckResult:
    """``torch.compile(fullgraph=True)`` with the default (inductor) backend, on the example."""
    require_capability(model, "compilable")
    import torch._dynamo

    torch._dynamo.reset()
    with eval_mode(model):
        compiled = torch.compile(model, fullgraph=True)
        errors = _compare(compiled, model, [x], rtol, "torch.compile(fullgraph=True)")
    torch._dynamo.reset()
    return CheckResult("ok", errors=errors)


def check_onnx(model: nn.Module, x: torch.Tensor, rtol: float = RTOL, dynamo: bool = True) -> CheckResult:
    """``export_onnx`` with dynamic batch/height/width, run in onnxruntime and compared."""
    from .export import check_onnx as run_onnx_check

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(model, Path(tmp) / "model.onnx", tuple(x.shape), check=False, dynamo=dynamo)
        fixed = [str(w.message) for w in caught if "fixes the input" in str(w.message)]
        try:
            shape_errors = run_onnx_check(model, path, x, rtol=rtol, dynamic_spatial=not fixed)
        except RuntimeError as e:
            raise CheckFailed(str(e)) from e
    errors = {"x".join(map(str, s)): e for s, e in shape_errors.items()}
    if fixed:
        return CheckResult("partial", "static height/width", errors)
    return CheckResult("ok", errors=errors)


def check_channels_last(model: nn.Module, x: torch.Tensor, rtol: float = RTOL) -> CheckResult:
    """``channels_last`` weights and inputs give the results of the plain contiguous layout."""
    converted = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model).eval().to(memory_format=torch.contiguous_format)
    if hasattr(reference, "channels_last"):  # models may switch to channels_last internally
        reference.channels_last = False
    errors = _compare(
        lambda t: converted(t.contiguous(memory_format=torch.channels_last)),
        reference,
        [x, _second_input(model, x)],
        rtol,
        "channels_last",
    )
    return CheckResult("ok", errors=errors)


def check_autocast(
    model: nn.Module,
    x: torch.Tensor,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    rtol: float = MIXED_PRECISION_RTOL,
) -> CheckResult:
    """Mixed precision: ``torch.autocast(device, dtype)`` output close to float32 and finite."""
    if device == "cuda" and not torch.cuda.is_available():
        return CheckResult("n/a", "no CUDA device")
    moved = copy.deepcopy(model).eval().to(device)
    reference = copy.deepcopy(model).eval().to(device)

    def run(t: torch.Tensor) -> Any:
        with torch.autocast(device_type=device, dtype=dtype):
            return moved(t)

    errors = _compare(run, reference, [x.to(device)], rtol, f"autocast({device}, {dtype})")
    return CheckResult("ok", errors=errors)


CHECKS: Dict[str, Callable[..., CheckResult]] = {
    "script": check_script,
    "trace": check_trace,
    "export": check_export,
    "compile": check_compile,
    "onnx": check_onnx,
    "channels_last": check_channels_last,
    "autocast_cpu_bf16": lambda m, x: check_autocast(m, x, "cpu", torch.bfloat16),
    "autocast_cuda_fp16": lambda m, x: check_autocast(m, x, "cuda", torch.float16),
}


def run_check(name: str, model: nn.Module, x: torch.Tensor) -> CheckResult:
    """Run one check, turning declared incapability and failures into results (for reports)."""
    start = time.perf_counter()
    try:
        result = CHECKS[name](model, x)
    except CapabilityError as e:
        result = CheckResult("unsupported", str(e))
    except Exception as e:
        message = str(e).strip().splitlines()
        result = CheckResult("fail", f"{type(e).__name__}: {message[0] if message else ''}"[:300])
    result.seconds = time.perf_counter() - start
    return result


def check_model(
    model: nn.Module,
    input_shape: Tuple[int, int, int, int] = (2, 3, 64, 64),
    checks: Optional[List[str]] = None,
) -> Dict[str, CheckResult]:
    """Run the named ``checks`` (default: all of :data:`CHECKS`) on ``model``."""
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    return {name: run_check(name, model, x) for name in (checks or list(CHECKS))}
