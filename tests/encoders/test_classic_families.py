"""Encoder families backed by torchvision (VGG, DenseNet, MobileNetV2) and pretrainedmodels (SENet,
DPN, Inception-v4, Inception-ResNet-v2, Xception).

Shape-level checks run on the ``meta`` device (no compute), so every family is covered cheaply;
numerical checks run on CPU for the smaller networks. When the SMP 0.6.0 golden file
``tests/fixtures/golden/encoders.json`` exists, state-dict keys/shapes and out_channels of every
recorded configuration of these families, and the features of the cheap ones, are compared to it.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import golden_utils as gu  # tests/fixtures, put on sys.path by tests/conftest.py
import pytest
import torch

from segmentation_models_pytorch.encoders import get_encoder, get_preprocessing_params

_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

GOLDEN = _FIXTURES / "golden" / "encoders.json"
REPO = Path(__file__).resolve().parents[2]

FAMILY_MODULES = (
    "vgg", "densenet", "mobilenet", "senet", "dpn", "inceptionv4", "inceptionresnetv2", "xception",
)
# The cheapest member of each family, and whether SMP can dilate it.
CHEAPEST = {
    "vgg11": False,
    "densenet121": False,
    "mobilenet_v2": True,
    "se_resnet50": True,
    "dpn68": True,
    "inceptionv4": False,
    "inceptionresnetv2": False,
    "xception": False,
}
DILATABLE = [n for n, d in CHEAPEST.items() if d]
NOT_DILATABLE = [n for n, d in CHEAPEST.items() if not d]
# Under ~30M parameters: cheap enough for a real CPU forward pass.
CPU_NAMES = ["vgg11", "densenet121", "mobilenet_v2", "se_resnet50", "dpn68", "xception"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny inputs: intra-op threads only add overhead (and spin on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family_names() -> list[str]:
    from segmentation_models_pytorch import encoders as E

    mods = {f"segmentation_models_pytorch.encoders.{m}" for m in FAMILY_MODULES}
    return [n for n, e in E.encoders.items() if e["encoder"].__module__ in mods]


def meta_encoder(name: str, **kwargs):
    with torch.device("meta"):
        return get_encoder(name, weights=None, **kwargs)


def meta_features(encoder, in_channels: int = 3, size: int = 64) -> list[torch.Tensor]:
    return encoder(torch.empty(1, in_channels, size, size, device="meta"))


def check_features(encoder, features, in_channels: int, size: int, depth: int, stride_cap=32):
    assert len(features) == depth + 1
    assert [f.shape[1] for f in features] == list(encoder.out_channels)
    # VGG's first feature is its stride-1 conv block output, every other family's is the input.
    first = features[0].shape[1]
    assert first == in_channels or encoder.out_channels[0] == 64
    for i, f in enumerate(features):
        stride = min(2**i, stride_cap)
        assert tuple(f.shape[2:]) == (size // stride, size // stride), (i, tuple(f.shape))
    assert encoder.output_stride == min(stride_cap, 2**depth)


def test_all_names_registered():
    names = set(family_names())
    expected = {
        *[f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")],
        "densenet121", "densenet169", "densenet201", "densenet161", "mobilenet_v2",
        "senet154", "se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50_32x4d",
        "se_resnext101_32x4d", "dpn68", "dpn68b", "dpn92", "dpn98", "dpn107", "dpn131",
        "inceptionv4", "inceptionresnetv2", "xception",
    }
    assert names == expected


@functools.cache
def default_meta_encoder(name: str):
    return meta_encoder(name)


@pytest.mark.parametrize("name", list(CHEAPEST))
def test_shapes_depths_and_in_channels(name):
    if name not in CPU_NAMES:  # the others run depth 5 for real in test_cpu_forward
        enc = default_meta_encoder(name)
        check_features(enc, meta_features(enc), 3, 64, 5)
    enc = meta_encoder(name, depth=3)
    check_features(enc, meta_features(enc), 3, 64, 3)
    for in_channels in (1, 4):  # only the stem sees the input: depth 1 is enough (and cheap)
        enc = meta_encoder(name, in_channels=in_channels, depth=1)
        check_features(enc, meta_features(enc, in_channels), in_channels, 64, 1)
        # VGG's first feature is a conv output, not an input-channel placeholder.
        assert enc.out_channels[0] == (64 if name == "vgg11" else in_channels)


@pytest.mark.parametrize("name", DILATABLE)
@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilation(name, output_stride):
    enc = meta_encoder(name, output_stride=output_stride)
    assert enc.supports_dilation
    check_features(enc, meta_features(enc), 3, 64, 5, stride_cap=output_stride)


@pytest.mark.parametrize("name", NOT_DILATABLE)
def test_no_dilation_clear_error(name):
    with pytest.raises(ValueError, match="output_stride"):
        get_encoder(name, weights=None, output_stride=16)
    enc = default_meta_encoder(name)
    assert not enc.supports_dilation
    with pytest.raises(ValueError, match="dilat"):
        enc.make_dilated(16)


@pytest.mark.parametrize("depth", [0, 6])
def test_bad_depth_rejected(depth):
    with pytest.raises(ValueError, match="depth"):
        get_encoder("dpn68", weights=None, depth=depth)
    from segmentation_models_pytorch.encoders.vgg import VGGEncoder, cfg

    with pytest.raises(ValueError, match="depth"):
        VGGEncoder([64, 128, 256, 512, 512, 512], cfg["A"], depth=depth)


def test_capability_flags():
    assert default_meta_encoder("vgg11")._unet_center_block is True
    assert default_meta_encoder("densenet121")._unet_center_block is False
    assert default_meta_encoder("dpn68")._is_torch_scriptable is False


@pytest.mark.parametrize("name", CPU_NAMES)
def test_cpu_forward_and_in_channels(name):
    torch.manual_seed(0)
    enc = get_encoder(name, weights=None).eval()
    golden = golden_record(name)
    if golden is not None:
        gu.fill_state_dict(enc)
    x = gu.make_input([1, 3, 64, 64])
    with torch.no_grad():
        feats = enc(x)
    check_features(enc, feats, 3, 64, 5)
    assert all(torch.isfinite(f).all() for f in feats)
    if golden is not None:  # same features as SMP 0.6.0 given the same weights
        compare_golden(feats, golden)
    # Pretrained-style patching to 1 channel sums the RGB kernels: a grey image then gives the
    # same stem features as its RGB version, which shows the right convolution was patched.
    patched = copy.deepcopy(enc)
    patched.set_in_channels(1, pretrained=True)
    enc._depth = patched._depth = 1  # only the stem is needed
    grey = x[:, :1]
    with torch.no_grad():
        out = patched(grey)[-1]
        ref = enc(grey.expand(1, 3, 64, 64).contiguous())[-1]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_classifier_keys_dropped_and_legacy_densenet_keys():
    enc = meta_encoder("densenet121")
    sd = enc.state_dict()
    # Old torchvision checkpoints spell dense-layer modules "norm.1", "conv.2"...
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
              for k, v in sd.items()}
    assert legacy.keys() != sd.keys()
    legacy["classifier.weight"] = torch.empty(1000, 1024, device="meta")
    enc.load_state_dict(legacy, strict=True)  # converted and filtered, no error
    mob = meta_encoder("mobilenet_v2")
    sd = {**mob.state_dict(), "classifier.1.weight": torch.empty(1000, 1280, device="meta")}
    mob.load_state_dict(sd, strict=True)


@pytest.mark.parametrize(
    "name, weights, mean, std",
    [
        ("vgg11", "imagenet", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ("xception", "imagenet", [0.5] * 3, [0.5] * 3),
        ("inceptionv4", "imagenet+background", [0.5] * 3, [0.5] * 3),
        ("dpn92", "imagenet+5k", [124 / 255, 117 / 255, 104 / 255], [1 / (0.0167 * 255)] * 3),
    ],
)
def test_preprocessing_params_offline(name, weights, mean, std):
    params = get_preprocessing_params(name, pretrained=weights)  # no hub access needed
    assert params["mean"] == pytest.approx(mean) and params["std"] == pytest.approx(std)
    assert params["input_space"] == "RGB" and params["input_range"] == [0, 1]


def test_import_is_lazy():
    code = (
        "import sys\n"
        + "".join(f"import segmentation_models_pytorch.encoders.{m}\n" for m in FAMILY_MODULES)
        + "print(sorted(m for m in ('torchvision', 'pretrainedmodels') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- golden (SMP 0.6.0)
@functools.cache
def _golden_rows() -> tuple:
    if not GOLDEN.exists():
        return ()
    loader = getattr(gu, "load_golden", None)
    rows = loader(GOLDEN.name, str(GOLDEN.parent)) if loader else gu.load_json(str(GOLDEN))
    names = set(family_names())
    return tuple(r for r in rows if r.get("name") in names)


def golden_records() -> list[dict]:
    if not GOLDEN.exists():
        pytest.skip(f"{GOLDEN} not generated yet (tests/fixtures/make_golden.py writes it)")
    return list(_golden_rows())


def golden_record(record_id: str):
    """The golden record ``record_id`` with recorded features, or None (no golden file/features)."""
    return next((r for r in _golden_rows() if r["id"] == record_id and r.get("features")), None)


def compare_golden(feats, rec) -> None:
    assert len(feats) == len(rec["features"]), rec["id"]
    for i, (f, g) in enumerate(zip(feats, rec["features"])):
        ok, msg = gu.compare_summary(f, g)
        assert ok, f"{rec['id']} feature {i}: {msg}"


def test_golden_keys_and_out_channels():
    records = golden_records()
    assert records, "no golden record for these families"
    for rec in records:
        enc = meta_encoder(rec["name"], **rec["kwargs"])
        assert gu.state_dict_signature(enc) == rec["keys"], rec["id"]
        assert list(enc.out_channels) == rec["out_channels"], rec["id"]
        assert enc.output_stride == rec["output_stride"], rec["id"]


# Variants (the default configurations are compared in test_cpu_forward_and_in_channels).
@pytest.mark.parametrize("record_id", ["mobilenet_v2@os16", "dpn68@os8", "vgg11@in1"])
def test_golden_feature_variants(record_id):
    golden_records()  # skips without the golden file
    rec = golden_record(record_id)
    if rec is None:
        pytest.skip(f"no golden features recorded for {record_id}")
    torch.manual_seed(0)
    enc = get_encoder(rec["name"], weights=None, **rec["kwargs"]).eval()
    gu.fill_state_dict(enc)
    with torch.no_grad():
        feats = enc(gu.make_input(rec["input_shape"]))
    compare_golden(feats, rec)
