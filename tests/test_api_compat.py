"""Drop-in API compatibility with SMP 0.6.0, checked against ``tests/fixtures/golden/api.json``.

The golden file was written by SMP 0.6.0 itself (``tests/fixtures/make_golden.py``), so SMP is not
needed here. Checked: constructor/function signatures (parameter names, order, kinds and the
``repr`` of defaults) of the 12 architectures, heads, encoder helpers, ``create_model``,
``from_pretrained``, every loss and metric; the public names of ``smp``, ``smp.encoders``,
``smp.losses``, ``smp.metrics`` and ``smp.base``; the encoder names (same order) and, for every
encoder, its class, its weights names and their hub ``repo_id``/``revision``.

A difference is only allowed when it is a documented, deliberate choice: it is then listed in
``DELIBERATE`` below with its reason. A difference that is not deliberate is listed in
``KNOWN_MISMATCHES`` and the test case is marked ``xfail(strict=True)``: it stays visible in every
run and the marker must be removed once the difference is fixed.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import segmentation_models_pytorch as smp

API: Dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "golden" / "api.json").read_text()
)
SIGNATURES: Dict[str, Dict[str, Any]] = {
    key: value for key, value in API["signatures"].items() if not key.endswith(".methods")
}

ARCHITECTURES = [
    "Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet",
    "DeepLabV3", "DeepLabV3Plus", "PAN", "UPerNet", "Segformer", "DPT",
]

# Documented, deliberate differences: {golden signature key: {parameter name: reason}}. A parameter
# listed here may differ in default (or be absent from ours); everything else must match exactly.
DELIBERATE: Dict[str, Dict[str, str]] = {}

# Differences found that are NOT deliberate (reported to the lead): {golden key: exact difference}.
# Each makes its test case xfail(strict=True), so fixing it turns the case into an XPASS failure
# that reminds to delete the entry.
KNOWN_MISMATCHES: Dict[str, str] = {
    "from_pretrained": (
        "inspect.signature(smp.from_pretrained) is (pretrained_model_name_or_path, *args, strict=True, "
        "**kwargs); SMP's (functools.wraps of PyTorchModelHubMixin.from_pretrained) is "
        "(pretrained_model_name_or_path, *, force_download=False, token=None, cache_dir=None, "
        "local_files_only=False, revision=None, **model_kwargs)"
    ),
}

# Names in dir(smp.encoders) of SMP 0.6.0 that are incidental imports of its implementation, not
# API: {name: reason}. Everything else SMP's module exposes must be exposed by ours.
INCIDENTAL_ENCODER_NAMES: Dict[str, str] = {
    "timm": "SMP imports timm at module level; ours must import it lazily (import-time rule)",
    "hf_hub_download": "huggingface_hub function SMP imports for its own use; imported lazily here",
    "load_file": "safetensors function SMP imports for its own use; imported lazily here",
    "warnings": "standard-library module SMP happens to import",
}


# ----------------------------------------------------------------------------------- signatures
def _resolve(key: str) -> Any:
    """The object of our package that golden signature ``key`` describes."""
    if key in ("SegmentationHead", "ClassificationHead"):  # recorded from smp.base
        return getattr(importlib.import_module("segmentation_models_pytorch.base"), key)
    if key.startswith("base.") and not hasattr(smp.base, key[5:]):
        # Whether smp.base exports the name is test_submodule_all's business; compare the signature.
        return getattr(importlib.import_module("segmentation_models_pytorch.base.modules"), key[5:])
    obj: Any = smp
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


Param = Tuple[str, str, Any]  # (name, kind, repr(default) or None)


def _our_params(obj: Any) -> List[Param]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    out = []
    for p in inspect.signature(target).parameters.values():
        default = None if p.default is inspect.Parameter.empty else repr(p.default)
        out.append((p.name, p.kind.name, default))
    return out


def _golden_params(record: Dict[str, Any]) -> List[Param]:
    return [(p["name"], p["kind"], p["default"] if p["has_default"] else None) for p in record["params"]]


def _signature_differences(key: str, ours: List[Param], golden: List[Param]) -> List[str]:
    """Human-readable differences, ignoring the parameters listed in ``DELIBERATE[key]``."""
    allowed = DELIBERATE.get(key, {})
    ours_f = [p for p in ours if p[0] not in allowed]
    golden_f = [p for p in golden if p[0] not in allowed]
    if ours_f == golden_f:
        return []
    diffs = []
    our_names = [p[0] for p in ours_f]
    golden_names = [p[0] for p in golden_f]
    missing = [n for n in golden_names if n not in our_names]
    extra = [n for n in our_names if n not in golden_names]
    if missing:
        diffs.append(f"missing parameters {missing}")
    if extra:
        diffs.append(f"extra parameters {extra}")
    common = [n for n in golden_names if n in our_names]
    if [n for n in our_names if n in common] != common:
        diffs.append(f"order differs: ours {our_names}, SMP {golden_names}")
    ours_by_name = {p[0]: p for p in ours_f}
    for name, kind, default in golden_f:
        if name not in ours_by_name:
            continue
        _, our_kind, our_default = ours_by_name[name]
        if our_kind != kind:
            diffs.append(f"{name}: kind {our_kind} != SMP {kind}")
        if our_default != default:
            diffs.append(f"{name}: default {our_default} != SMP {default}")
    return diffs


def _marks(key: str):
    """``xfail(strict=True)`` for a known, not yet fixed difference; no mark otherwise."""
    if key in KNOWN_MISMATCHES:
        return pytest.mark.xfail(strict=True, reason=KNOWN_MISMATCHES[key])
    return ()


def _signature_params():
    return [pytest.param(key, id=key, marks=_marks(key)) for key in SIGNATURES]


def test_golden_covers_the_required_api():
    """Guard against a regenerated golden file that silently dropped part of the API."""
    required = [
        *ARCHITECTURES,
        "encoders.get_encoder", "encoders.get_encoder_names",
        "encoders.get_preprocessing_params", "encoders.get_preprocessing_fn",
        "create_model", "from_pretrained", "SegmentationHead", "ClassificationHead",
    ]
    required += [f"losses.{n}" for n in API["smp.losses.__all__"] if not n.endswith("_MODE")]
    required += [f"metrics.{n}" for n in API["smp.metrics.__all__"]]
    assert not [k for k in required if k not in SIGNATURES]
    assert not [k for k in DELIBERATE if k not in SIGNATURES], "stale DELIBERATE entry"
    golden_names = {f"smp.{n}" for n in API["smp.__all__"]}
    golden_names |= {f"smp.encoders.{n}" for n in API["dir(smp.encoders)"]}
    for module in ("losses", "metrics", "base"):
        golden_names |= {f"smp.{module}.{n}" for n in API[f"smp.{module}.__all__"]}
    stale = [k for k in KNOWN_MISMATCHES if k not in SIGNATURES and k not in golden_names]
    assert not stale, f"stale KNOWN_MISMATCHES entries {stale}"


@pytest.mark.parametrize("key", _signature_params())
def test_signature_matches_smp(key):
    record = SIGNATURES[key]
    assert "error" not in record, f"golden has no signature for {key}: {record['error']}"
    obj = _resolve(key)
    diffs = _signature_differences(key, _our_params(obj), _golden_params(record))
    assert not diffs, f"{key}: " + "; ".join(diffs)


# Class attributes whose value differs on purpose: {(architecture, attribute): reason}.
DELIBERATE_ATTRIBUTES: Dict[Tuple[str, str], str] = {
    (arch, "requires_divisible_input_shape"): (
        "resizes each decoder stage to its skip connection, so any input size works as it is "
        "(docs/architectures.md, 'Any input size'); SMP 0.6.0 says True"
    )
    for arch in ("UnetPlusPlus", "MAnet")
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architecture_class_attributes(name):
    """Flags SMP sets on every architecture class (read by export helpers and user code)."""
    record = SIGNATURES[name]
    cls = getattr(smp, name)
    attributes = ("requires_divisible_input_shape", "_is_torch_scriptable", "_is_torch_exportable")
    for attr in (*attributes, "_is_torch_compilable"):
        assert hasattr(cls, attr), f"{name}.{attr} is missing"
        if (name, attr) not in DELIBERATE_ATTRIBUTES and record.get(attr) is not None:
            assert getattr(cls, attr) == record[attr], f"{name}.{attr}"


def test_segmentation_model_public_methods():
    ours = {m for m in dir(smp.base.SegmentationModel) if not m.startswith("_")}
    missing = sorted(set(API["signatures"]["base.SegmentationModel.methods"]) - ours)
    assert not missing, f"SegmentationModel lacks SMP's public methods {missing}"


# --------------------------------------------------------------------------------- public names
def _name_params(module: str, names: List[str]):
    return [pytest.param(name, id=name, marks=_marks(f"{module}.{name}")) for name in names]


@pytest.mark.parametrize("name", _name_params("smp", API["smp.__all__"]))
def test_top_level_name(name):
    assert name in smp.__all__, f"smp.__all__ lacks {name!r}"
    assert getattr(smp, name) is not None


def test_architecture_mapping():
    mapping = {k: v.__name__ for k, v in smp.MODEL_ARCHITECTURES_MAPPING.items()}
    assert mapping == API["MODEL_ARCHITECTURES_MAPPING"]


_SMP_ENCODER_NAMES = [n for n in API["dir(smp.encoders)"] if n not in INCIDENTAL_ENCODER_NAMES]


@pytest.mark.parametrize("name", _name_params("smp.encoders", _SMP_ENCODER_NAMES))
def test_encoders_module_name(name):
    """Every public name of SMP's ``smp.encoders`` (family modules, ``<family>_encoders`` dicts...)."""
    assert hasattr(smp.encoders, name), f"smp.encoders.{name} is missing"


def test_encoders_all():
    missing = sorted(set(API["smp.encoders.__all__"]) - set(smp.encoders.__all__))
    assert not missing, f"smp.encoders.__all__ lacks {missing}"


@pytest.mark.parametrize(
    "module, name",
    [
        pytest.param(module, name, id=f"{module}.{name}", marks=_marks(f"smp.{module}.{name}"))
        for module in ("losses", "metrics", "base")
        for name in API[f"smp.{module}.__all__"]
    ],
)
def test_submodule_all(module, name):
    sub = getattr(smp, module)
    assert name in sub.__all__, f"smp.{module}.__all__ lacks {name!r}"
    assert hasattr(sub, name), f"smp.{module}.{name} is missing"


def test_loss_mode_constants():
    for name, value in API["loss_constants"].items():
        assert getattr(smp.losses, name) == value


# ------------------------------------------------------------------------------------- encoders
def test_encoder_names_same_list_and_order():
    assert smp.encoders.get_encoder_names() == API["encoder_names"]


@pytest.mark.parametrize("name", API["encoder_names"])
def test_encoder_registry_entry(name):
    golden = API["encoders"][name]
    entry = smp.encoders.encoders[name]
    cls = entry["encoder"]
    assert cls.__name__ == golden["encoder_class"]
    assert cls.__module__ == golden["encoder_module"]
    assert list(entry["params"]["out_channels"]) == list(golden["params"]["out_channels"])

    settings = entry["pretrained_settings"]
    assert list(settings) == list(golden["pretrained_settings"]), "weights names (and their order)"
    for weights, expected in golden["pretrained_settings"].items():
        ours = settings[weights]
        for field in ("repo_id", "revision"):
            if field in expected:
                assert ours.get(field) == expected[field], f"{name} {weights!r} {field}"
        # SMP reads mean/std from the hub; ours are in the registry so preprocessing is offline.
        for field in ("mean", "std"):
            assert len(ours.get(field, ())) == 3, f"{name} {weights!r} lacks {field}"
        assert ours.get("input_space", "RGB") in ("RGB", "BGR")
        assert list(ours.get("input_range", [0, 1])) in ([0, 1], [0, 255])
