"""Every registered encoder against SMP 0.6.0's golden records (``tests/fixtures/golden``).

For each name of ``smp.encoders.get_encoder_names()``: build it with random weights, check its
state-dict keys and shapes against ``encoders.json``, run a 1x3x64x64 input and check the feature
list (``depth + 1`` maps, channels equal to ``out_channels``, strides 1, 2, 4, ... 32), then give it
the deterministic weights of ``fill_state_dict`` and compare every feature with SMP's (relative error
1e-4) where the golden file recorded them (encoders under 30M parameters).

The default run covers the cheapest name of each family (the module defining the encoder class) and
the golden depth / in_channels / output_stride variants; every other name is marked ``slow``
(``pytest -m slow tests/encoders/test_zoo.py``). ``tu_encoders.json`` covers timm-universal (``tu-``)
encoders and the deprecated ``timm-`` aliases SMP maps onto them.
"""

from __future__ import annotations

import gc
import math
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from golden_utils import compare_summary, fill_state_dict, load_golden, make_input, state_dict_signature

from segmentation_models_pytorch.encoders import encoders, get_encoder, get_encoder_names

GOLDEN: Dict[str, Dict[str, Any]] = {r["id"]: r for r in load_golden("encoders")}
TU_GOLDEN: List[Dict[str, Any]] = load_golden("tu_encoders")
NAMES = get_encoder_names()
RTOL = 1e-4


def family(name: str) -> str:
    """The family of a registered encoder: the module that defines its class."""
    return encoders[name]["encoder"].__module__.rsplit(".", 1)[-1]


def _cost(name: str) -> float:
    record = GOLDEN.get(name)
    return record["n_params"] if record else math.inf


def _cheapest_per_family() -> Dict[str, str]:
    by_family: Dict[str, List[str]] = {}
    for name in NAMES:
        by_family.setdefault(family(name), []).append(name)
    return {fam: min(names, key=_cost) for fam, names in by_family.items()}


CHEAPEST = _cheapest_per_family()
_DEFAULT = set(CHEAPEST.values())
VARIANTS = [rid for rid in GOLDEN if "@" in rid]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 64x64 inputs: extra intra-op threads only add overhead, and thrash on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, **kwargs: Any) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated timm- aliases
        encoder = get_encoder(name, weights=None, **kwargs)
    return encoder.eval()


def _check_keys(encoder: torch.nn.Module, record: Dict[str, Any]) -> None:
    ours = {k: tuple(s) for k, s in state_dict_signature(encoder)}
    golden = {k: tuple(s) for k, s in record["keys"]}
    if ours != golden:
        missing = sorted(set(golden) - set(ours))
        extra = sorted(set(ours) - set(golden))
        shapes = sorted(k for k in set(ours) & set(golden) if ours[k] != golden[k])
        pytest.fail(
            f"{record['id']}: state dict differs from SMP 0.6.0: {len(missing)} missing {missing[:5]}, "
            f"{len(extra)} extra {extra[:5]}, {len(shapes)} with other shapes "
            f"{[(k, ours[k], golden[k]) for k in shapes[:3]]}"
        )


def _check_features(encoder: torch.nn.Module, features: List[torch.Tensor], x: torch.Tensor, depth: int):
    """The EncoderMixin contract: depth + 1 maps, declared channels, strides 1, 2, 4, ... (capped)."""
    assert len(features) == depth + 1, f"{len(features)} features for depth {depth}"
    assert [f.shape[1] for f in features] == list(encoder.out_channels)
    output_stride = encoder.output_stride
    has_stride2 = getattr(encoder, "_has_stride2_feature", True)
    for i, f in enumerate(features):
        if f.shape[1] == 0 and i == 1 and not has_stride2:
            continue  # placeholder of an encoder without a stride-2 stage
        stride = min(2**i, output_stride)
        expected = [x.shape[-2] // stride, x.shape[-1] // stride]
        assert list(f.shape[-2:]) == expected, f"feature {i}: {list(f.shape)}, expected stride {stride}"
        assert f.shape[0] == x.shape[0]


def _check_record(encoder: torch.nn.Module, record: Dict[str, Any]) -> None:
    """Keys, out_channels and output stride as recorded; features too where recorded."""
    _check_keys(encoder, record)
    assert list(encoder.out_channels) == record["out_channels"]
    assert encoder.output_stride == record["output_stride"]
    in_channels = record["kwargs"].get("in_channels", 3)
    x = make_input(record.get("input_shape") or [1, in_channels, 64, 64])
    fill_state_dict(encoder)
    with torch.no_grad():
        features = encoder(x)
    _check_features(encoder, features, x, record["kwargs"].get("depth", 5))
    golden_features = record.get("features")
    if golden_features:
        assert len(features) == len(golden_features)
        for i, (f, g) in enumerate(zip(features, golden_features)):
            ok, msg = compare_summary(f, g, rtol=RTOL)
            assert ok, f"{record['id']} feature {i}: {msg}"
    assert all(torch.isfinite(f).all() for f in features)


def test_every_registered_name_has_a_golden_record():
    missing = [n for n in NAMES if n not in GOLDEN]
    assert not missing, f"no SMP 0.6.0 record for {missing}"
    assert len(_DEFAULT) == len({family(n) for n in NAMES})


@pytest.mark.parametrize(
    "name", [pytest.param(n, id=n, marks=() if n in _DEFAULT else pytest.mark.slow) for n in NAMES]
)
def test_encoder(name):
    encoder = _build(name)
    try:
        _check_record(encoder, GOLDEN[name])
    finally:
        del encoder
        gc.collect()  # the biggest encoders hold gigabytes


@pytest.mark.parametrize("record_id", VARIANTS)
def test_golden_variant(record_id):
    """Depth, in_channels and output_stride variants recorded by SMP 0.6.0."""
    record = GOLDEN[record_id]
    _check_record(_build(record["name"], **record["kwargs"]), record)


@pytest.mark.parametrize("record", [pytest.param(r, id=r["id"]) for r in TU_GOLDEN])
def test_timm_universal(record):
    """``tu-`` encoders and the deprecated ``timm-`` aliases SMP maps onto TimmUniversalEncoder."""
    encoder = _build(record["name"], **record["kwargs"])
    assert type(encoder).__name__ == record["encoder_class"]
    if record.get("encoder_attr_name") is not None:
        assert getattr(encoder, "name", None) == record["encoder_attr_name"]
    _check_record(encoder, record)


def test_docs_table_lists_every_encoder():
    """docs/encoders_table.md (benchmarks/encoder_table.py) is regenerated when the registry changes."""
    table = Path(__file__).resolve().parents[2] / "docs" / "encoders_table.md"
    if not table.exists():
        pytest.skip("docs/encoders_table.md not generated (python benchmarks/encoder_table.py)")
    listed = re.findall(r"^\| `([^`]+)` \|", table.read_text(), flags=re.M)
    assert listed == NAMES, "docs/encoders_table.md is stale: run python benchmarks/encoder_table.py"
