"""Deployment capability matrix: every architecture x TorchScript / torch.export / torch.compile /
ONNX / channels_last / autocast, each compared with the eager model; plus the export helpers.

Parametrized over ``smp.MODEL_ARCHITECTURES_MAPPING`` so new architectures are checked automatically.
Default run: TorchScript (script and trace), channels_last and bf16 autocast for every architecture;
the slow conversions (torch.export, ONNX through it, inductor compile: several seconds to a minute
each) for a representative subset, and for every architecture under ``-m slow``.
``benchmarks/export_matrix.py`` runs the same checks and writes docs/capability_matrix.md.
"""

from __future__ import annotations

import warnings
from typing import Dict, Tuple

import pytest
import torch

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.utils import (
    CapabilityError,
    check_onnx,
    export_onnx,
    export_program,
    onnx_compatible,
    script_model,
)
from segmentation_models_pytorch.utils import capabilities as cap

ARCHS = sorted(smp.MODEL_ARCHITECTURES_MAPPING)
X_SHAPE = (2, 3, 64, 64)

# Results other than "ok" that are expected, with the reason (also in docs/capability_matrix.md).
# Declared incapabilities (``_is_torch_scriptable = False`` ...) are derived from the model flags.
EXPECTED: Dict[Tuple[str, str], str] = {}
# Architectures whose slow conversions run in the default suite (the others under -m slow).
# Chosen among the quickest (see the seconds table of docs/capability_matrix.md; measured alone in
# a fresh process, torch.export of deeplabv3 took 9 s and of segformer 15 s); all of them go
# through the base forward's internal pad/crop, the path that needed work for dynamic shapes.
EXPORT_DEFAULT = {"deeplabv3"}
ONNX_DEFAULT = {"deeplabv3"}
COMPILE_DEFAULT = {"segformer"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models on a shared CPU: one intra-op thread avoids OpenMP spinning (much faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _param(archs, default):
    return [pytest.param(a, marks=() if a in default else pytest.mark.slow) for a in archs]


_MODELS: Dict[str, torch.nn.Module] = {}


def _model(arch: str) -> torch.nn.Module:
    if arch not in _MODELS:
        _MODELS[arch] = cap.representative_model(arch)
    return _MODELS[arch].eval()


def _x() -> torch.Tensor:
    return torch.randn(X_SHAPE, generator=torch.Generator().manual_seed(0))


def _declared(model: torch.nn.Module, flag: str) -> bool:
    return getattr(model, flag, True) and getattr(model.encoder, flag, True)


def _assert_expected(arch: str, check: str, result: cap.CheckResult) -> None:
    expected = EXPECTED.get((arch, check), "ok")
    message = f"{arch}/{check}: {result.status} ({result.detail}), expected {expected}"
    assert result.status == expected, message
    if result.status in ("ok", "partial"):
        assert result.errors, "a passing check must have compared outputs"


# ------------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("arch", ARCHS)
def test_script(arch):
    model = _model(arch)
    if not _declared(model, "_is_torch_scriptable"):
        with pytest.raises(CapabilityError, match="cannot be scripted"):
            script_model(model)
        return
    _assert_expected(arch, "script", cap.check_script(model, _x()))


@pytest.mark.parametrize("arch", ARCHS)
def test_trace(arch):
    _assert_expected(arch, "trace", cap.check_trace(_model(arch), _x()))


@pytest.mark.parametrize("arch", _param(ARCHS, EXPORT_DEFAULT))
def test_torch_export_dynamic_shapes(arch):
    model = _model(arch)
    if not _declared(model, "_is_torch_exportable"):
        with pytest.raises(CapabilityError, match="cannot be exported"):
            export_program(model, X_SHAPE)
        return
    _assert_expected(arch, "export", cap.check_export(model, _x()))


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last(arch):
    _assert_expected(arch, "channels_last", cap.check_channels_last(_model(arch), _x()))


@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_bfloat16_cpu(arch):
    _assert_expected(arch, "autocast_cpu_bf16", cap.check_autocast(_model(arch), _x(), "cpu", torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_float16_cuda(arch):
    result = cap.check_autocast(_model(arch), _x(), "cuda", torch.float16)
    _assert_expected(arch, "autocast_cuda_fp16", result)


@pytest.mark.parametrize("arch", _param(ARCHS, COMPILE_DEFAULT))
def test_compile_fullgraph_inductor(arch):
    model = _model(arch)
    if not _declared(model, "_is_torch_compilable"):
        with pytest.raises(CapabilityError, match="cannot be compiled"):
            cap.check_compile(model, _x())
        return
    _assert_expected(arch, "compile", cap.check_compile(model, _x()))


@pytest.mark.parametrize("arch", _param(ARCHS, ONNX_DEFAULT))
def test_onnx_matches_pytorch(arch):
    model = _model(arch)
    if not _declared(model, "_is_torch_exportable"):
        with pytest.raises(CapabilityError, match="cannot be exported"):
            cap.check_onnx(model, _x())
        return
    result = cap.check_onnx(model, _x())
    _assert_expected(arch, "onnx", result)
    assert len(result.errors) == 2, "dynamic batch/H/W: the second shape must have been run too"
    assert max(result.errors.values()) < 1e-4


# ------------------------------------------------------------------------------------ helpers
def test_export_onnx_with_classification_head_legacy_exporter(tmp_path):
    """Two outputs (masks, labels), dynamic axes, the TorchScript-based exporter; mode restored."""
    onnx = pytest.importorskip("onnx")
    model = cap.representative_model("unet", aux_params={"classes": 3}).train()
    path = export_onnx(model, tmp_path / "sub" / "unet.onnx", input_shape=(1, 3, 64, 64), dynamo=False)
    assert path == tmp_path / "sub" / "unet.onnx" and path.exists()
    assert not list(tmp_path.glob("sub/*.data")), "small models are written as one file"
    assert model.training, "the caller's training mode must be restored"
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["masks", "labels"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    assert onnx.load(str(path)).opset_import[0].version == 18


def test_check_onnx_detects_a_wrong_graph(tmp_path):
    pytest.importorskip("onnxruntime")
    model = cap.representative_model("linknet")
    path = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 3, 64, 64), dynamo=False, check=False)
    other = cap.representative_model("linknet")  # same architecture, other random weights
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        check_onnx(other, path, torch.randn(2, 3, 64, 64))
    errors = check_onnx(model, path, torch.randn(2, 3, 64, 64))
    assert len(errors) == 2 and max(errors.values()) < 1e-4


def test_exporter_failure_is_explained(tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nlong details")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    model = cap.representative_model("pspnet")
    with pytest.raises(RuntimeError, match=r"dynamo=False\) cannot export PSPNet with dynamic height/width: "
                       r"Unsupported: ONNX export of operator foo Use the default dynamo=True exporter"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 3, 64, 64), dynamo=False)


@pytest.mark.parametrize("size", [(9, 7), (64, 3), (5, 5)])
def test_onnx_compatible_adaptive_pooling_is_exact(size):
    """PSPNet/UPerNet pyramid pooling is rewritten for ONNX; same numbers for any input size."""
    model = cap.representative_model("pspnet")
    x = torch.randn(2, 3, *size)
    pools = [m for m in model.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    expected = [p(x) for p in pools]
    with onnx_compatible(model):
        assert all("forward" in vars(p) for p in pools if p.output_size not in (1, (1, 1)))
        actual = [p(x) for p in pools]
    assert not any("forward" in vars(p) for p in pools), "the rewrite must be undone"
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_export_onnx_rejects_bad_arguments(tmp_path):
    model = cap.representative_model("pspnet")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", opset="18")
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 64, 64))
    assert not (tmp_path / "m.onnx").exists()


def test_declared_incapability_is_a_clear_error():
    model = cap.representative_model("pspnet")
    model.encoder._is_torch_exportable = False
    message = "its encoder 'resnet18' is marked _is_torch_exportable = False"
    with pytest.raises(CapabilityError, match=message):
        export_program(model)
    with pytest.raises(CapabilityError, match="dynamo=False"):
        export_onnx(model, "unused.onnx")
    model._is_torch_scriptable = False
    with pytest.raises(CapabilityError, match="PSPNet is marked _is_torch_scriptable = False"):
        script_model(model)


def test_traced_graph_pads_any_input_size():
    """Under tracing the internal padding is unconditional, so other sizes still work."""
    model = cap.representative_model("fpn")  # needs H, W divisible by 32: pads otherwise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-5)


def test_run_check_reports_instead_of_raising():
    model = cap.representative_model("pspnet")
    model._is_torch_scriptable = False
    result = cap.run_check("script", model, _x())
    assert result.status == "unsupported" and "CapabilityError" not in result.detail
    assert cap.run_check("autocast_cuda_fp16", model, _x()).status in ("n/a", "ok")
