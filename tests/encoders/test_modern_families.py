"""Encoder families: EfficientNet (efficientnet-pytorch), timm EfficientNet/Lite, timm SK-ResNet,
Mix Transformer (MiT) and MobileOne.

Shape-level checks run on the ``meta`` device (no compute); numerical checks run on CPU with the
cheapest member of each family. When the SMP 0.6.0 golden file ``tests/fixtures/golden/encoders.json``
exists, state-dict keys/shapes, out_channels and (for the cheap names) features are compared to it.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segmentation_models_pytorch.encoders import get_encoder, get_preprocessing_params

_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_spec = importlib.util.spec_from_file_location("golden_utils", _FIXTURES / "golden_utils.py")
gu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gu)

GOLDEN_DIR = Path(os.environ.get("SMP_GOLDEN_DIR", _FIXTURES / "golden"))
REPO = Path(__file__).resolve().parents[2]

FAMILY_MODULES = ("efficientnet", "timm_efficientnet", "timm_sknet", "mix_transformer", "mobileone")
CHEAPEST = ["efficientnet-b0", "timm-efficientnet-b0", "timm-skresnet18", "mit_b0", "mobileone_s0"]
# Golden key checks: every hand-written family member plus a few library-built ones (each name is
# built once on the meta device; all of them would be too slow).
GOLDEN_KEY_NAMES = {
    "efficientnet-b0", "efficientnet-b3", "timm-efficientnet-b0", "timm-tf_efficientnet_lite0",
    "timm-skresnet18", "timm-skresnext50_32x4d",
    *[f"mit_b{i}" for i in range(6)], *[f"mobileone_s{i}" for i in range(5)],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: one thread is fastest and avoids OpenMP spinning on a shared machine.
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
        return get_encoder(name, weights=None, **kwargs).eval()


@functools.cache
def default_meta_encoder(name: str):
    return meta_encoder(name)


def meta_features(encoder, in_channels: int = 3, size: int = 64) -> list[torch.Tensor]:
    return encoder(torch.empty(1, in_channels, size, size, device="meta"))


def check_features(encoder, features, in_channels: int, size: int, depth: int, stride_cap=32):
    assert len(features) == depth + 1
    assert [f.shape[1] for f in features] == list(encoder.out_channels)
    assert features[0].shape[1] == in_channels == encoder.out_channels[0]
    for i, f in enumerate(features):
        stride = min(2**i, stride_cap)
        assert tuple(f.shape[2:]) == (size // stride, size // stride), (i, tuple(f.shape))
    assert encoder.output_stride == min(stride_cap, 2**depth)
    assert encoder.reductions == [min(2**i, stride_cap) for i in range(depth + 1)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max() / (b.abs().max() + 1e-12)) if b.numel() else 0.0


def test_all_names_registered():
    expected = {
        *[f"efficientnet-b{i}" for i in range(8)],
        *[f"timm-efficientnet-b{i}" for i in range(9)], "timm-efficientnet-l2",
        *[f"timm-tf_efficientnet_lite{i}" for i in range(5)],
        "timm-skresnet18", "timm-skresnet34", "timm-skresnext50_32x4d",
        *[f"mit_b{i}" for i in range(6)], *[f"mobileone_s{i}" for i in range(5)],
    }
    assert set(family_names()) == expected


@pytest.mark.parametrize("name", CHEAPEST)
def test_shapes_depths_and_in_channels(name):
    enc = default_meta_encoder(name)
    check_features(enc, meta_features(enc), 3, 64, 5)
    enc = meta_encoder(name, depth=3)
    check_features(enc, meta_features(enc), 3, 64, 3)
    # MiT's first real stage is at depth 2 (depth 1 is only the stride-2 placeholder).
    stem_depth = 2 if name.startswith("mit") else 1
    for in_channels in (1, 4):
        enc = meta_encoder(name, in_channels=in_channels, depth=stem_depth)
        check_features(enc, meta_features(enc, in_channels), in_channels, 64, stem_depth)


@pytest.mark.parametrize("name", CHEAPEST)
@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilation(name, output_stride):
    enc = meta_encoder(name, output_stride=output_stride)
    assert enc.supports_dilation
    check_features(enc, meta_features(enc), 3, 64, 5, stride_cap=output_stride)


def test_bad_arguments_are_clear_errors():
    for depth in (0, 6):
        with pytest.raises(ValueError, match="depth"):
            get_encoder("mit_b0", weights=None, depth=depth)
    with pytest.raises(ValueError, match="output_stride"):
        get_encoder("mobileone_s0", weights=None, output_stride=4)
    from segmentation_models_pytorch.encoders.efficientnet import EfficientNetEncoder
    from segmentation_models_pytorch.encoders.mobileone import MobileOne

    with pytest.raises(ValueError, match="depth"):
        EfficientNetEncoder([2, 4, 8, 15], [3, 32, 24, 40, 112, 320], "efficientnet-b0", depth=0)
    with pytest.raises(ValueError, match="efficientnet-b0"):
        EfficientNetEncoder([2, 4, 8, 15], [3, 32, 24, 40, 112, 320], "efficientnet-b9")
    with pytest.raises(ValueError, match="width_multipliers"):
        MobileOne([3, 48, 48, 128, 256, 1024])


def test_efficientnet_depth_1():
    """SMP rejects depth 1 (while claiming 1..5 is valid); it must give the stem feature."""
    torch.manual_seed(0)
    full = get_encoder("efficientnet-b0", weights=None, depth=5).eval()
    gu.fill_state_dict(full)
    shallow = get_encoder("efficientnet-b0", weights=None, depth=1).eval()
    shallow.load_state_dict(full.state_dict())  # depth does not change the parameters
    x = gu.make_input([1, 3, 64, 64])
    with torch.no_grad():
        feats, ref = shallow(x), full(x)
    assert shallow.out_channels == [3, 32] and len(feats) == 2
    assert rel_err(feats[1], ref[1]) == 0.0


def test_efficientnet_in_place_inference_path_gives_the_autograd_paths_features(monkeypatch):
    # Without autograd the blocks write norms, activations, excitations and residual sums in
    # place. The eval-mode norms are one multiply-add there instead of BatchNorm's kernel, which
    # rounds within an ulp of it.
    torch.manual_seed(0)
    enc = get_encoder("efficientnet-b0", weights=None).eval()
    gu.fill_state_dict(enc)
    x = gu.make_input([2, 3, 64, 64])
    from segmentation_models_pytorch.base import modules as md

    in_place = []
    norm = md.batch_norm_into

    def spy(bn, t, allowed):
        out = norm(bn, t, allowed)
        in_place.append(out is t)
        return out

    monkeypatch.setattr(md, "batch_norm_into", spy)
    with torch.no_grad():
        fast = enc(x)
    assert in_place and all(in_place)  # every eval-mode norm wrote into its input
    in_place.clear()
    slow = enc(x)  # grad enabled: the ordinary out-of-place ops
    assert in_place and not any(in_place)
    assert torch.equal(fast[0], slow[0])
    for a, b in zip(fast[1:], slow[1:]):
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-5 * scale)
    assert torch.equal(x, gu.make_input([2, 3, 64, 64]))  # the input itself is never written
    # In train mode the blocks' stochastic depth applies with or without autograd.
    enc.train()
    torch.manual_seed(1)
    with torch.no_grad():
        dropped = enc(x)[-1]
    torch.manual_seed(1)
    assert torch.equal(dropped, enc(x)[-1].detach())


def test_mit_placeholder_feature():
    enc = get_encoder("mit_b0", weights=None).eval()
    assert enc._has_stride2_feature is False
    assert enc.out_channels == [3, 0, 32, 64, 160, 256]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = enc(x)
    placeholder = feats[1]
    assert tuple(placeholder.shape) == (2, 0, 32, 48)
    assert placeholder.dtype == x.dtype and placeholder.device == x.device
    assert [tuple(f.shape[2:]) for f in feats[2:]] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(torch.isfinite(f).all() for f in feats[2:])
    depth1 = get_encoder("mit_b0", weights=None, depth=1)
    assert [tuple(f.shape) for f in depth1(x)] == [(2, 3, 64, 96), (2, 0, 32, 48)]


def test_mit_attention_matches_explicit_softmax():
    """Efficient self-attention with spatial reduction, written out by hand as the paper states."""
    from segmentation_models_pytorch.encoders.mix_transformer import Attention

    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, qkv_bias=True, sr_ratio=2).eval()
    h, w = 6, 4
    x = torch.randn(1, h * w, 32)
    with torch.no_grad():
        out = attn(x, h, w)
        q = attn.q(x).reshape(1, h * w, 2, 16).transpose(1, 2)
        reduced = attn.sr(x.transpose(1, 2).reshape(1, 32, h, w)).flatten(2).transpose(1, 2)
        k, v = attn.kv(attn.norm(reduced)).reshape(1, -1, 2, 2, 16).permute(2, 0, 3, 1, 4)
        assert k.shape[2] == (h // 2) * (w // 2)  # keys/values come from the reduced grid
        weights = (q @ k.transpose(-2, -1) * 16**-0.5).softmax(-1)
        ref = attn.proj((weights @ v).transpose(1, 2).reshape(1, h * w, 32))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("kwargs", [{}, {"in_channels": 4, "output_stride": 16}])
def test_mobileone_reparameterize(kwargs):
    from segmentation_models_pytorch.encoders.mobileone import MobileOneBlock, reparameterize_model

    torch.manual_seed(0)
    enc = get_encoder("mobileone_s0", weights=None, **kwargs)
    gu.fill_state_dict(enc)
    enc.eval()
    x = gu.make_input([1, kwargs.get("in_channels", 3), 64, 64])
    with torch.no_grad():
        ref = enc(x)
    fused = reparameterize_model(enc)
    assert any(k.startswith("stage1.0.rbr_conv.") for k in enc.state_dict())  # original kept
    keys = list(fused.state_dict())
    assert keys and all(".reparam_conv." in k or ".se." in k for k in keys)
    blocks = [m for m in fused.modules() if isinstance(m, MobileOneBlock)]
    assert blocks and all(b.inference_mode and len(b.rbr_conv) == 0 for b in blocks)
    with torch.no_grad():
        out = fused(x)
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-4
    # The in-place method gives the same network.
    enc.reparameterize()
    assert list(enc.state_dict()) == keys
    with torch.no_grad():
        assert all(rel_err(a, b) == 0.0 for a, b in zip(enc(x), out))


def test_mobileone_inference_mode_checkpoint_loads_reparameterized_weights():
    from segmentation_models_pytorch.encoders.mobileone import MobileOne, reparameterize_model

    params = {"out_channels": [3, 64, 96, 192, 512, 1280], "width_multipliers": (1.5, 1.5, 2.0, 2.5)}
    with torch.device("meta"):
        fused = reparameterize_model(MobileOne(**params))
        direct = MobileOne(**params, inference_mode=True)
    assert gu.state_dict_signature(direct) == gu.state_dict_signature(fused)


@pytest.mark.parametrize("name", CHEAPEST)
def test_pretrained_in_channels_patching(name):
    """Patching to 1 channel sums the RGB kernels of *every* stem convolution (MobileOne's stem has
    parallel branches): a grey image then gives the same stem features as its RGB copy."""
    depth = 2 if name.startswith("mit") else 1
    torch.manual_seed(0)
    enc = get_encoder(name, weights=None, depth=depth).eval()
    gu.fill_state_dict(enc)
    patched = copy.deepcopy(enc)
    patched.set_in_channels(1, pretrained=True)
    assert patched.out_channels[0] == 1
    grey = gu.make_input([1, 1, 64, 64])
    with torch.no_grad():
        out = patched(grey)[-1]
        ref = enc(grey.expand(1, 3, 64, 64).contiguous())[-1]
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "name, extra",
    [
        ("efficientnet-b0", {"_fc.weight": (1000, 1280), "_fc.bias": (1000,)}),
        ("timm-efficientnet-b0", {"classifier.weight": (1000, 1280)}),
        ("timm-skresnet18", {"fc.weight": (1000, 512)}),
        ("mit_b0", {"head.weight": (1000, 256)}),
        ("mobileone_s0", {"linear.weight": (1000, 1024)}),
    ],
)
def test_classifier_keys_are_ignored(name, extra):
    state = dict(default_meta_encoder(name).state_dict())
    state.update({k: torch.empty(shape, device="meta") for k, shape in extra.items()})
    with torch.device("meta"):
        enc = get_encoder(name, weights=state)
    assert not any(k in enc.state_dict() for k in extra)
    enc.load_state_dict(state)  # direct loading drops them too (strict), as SMP does
    assert set(extra) <= set(state)  # ... without mutating the caller's dict


@pytest.mark.parametrize(
    "name, weights, half",
    [
        ("efficientnet-b0", "imagenet", False),
        ("efficientnet-b7", "advprop", True),
        ("timm-efficientnet-b3", "noisy-student", False),
        ("timm-efficientnet-b3", "advprop", True),
        ("timm-efficientnet-l2", "noisy-student-475", False),
        ("timm-tf_efficientnet_lite2", "imagenet", True),
        ("timm-skresnext50_32x4d", "imagenet", False),
        ("mit_b3", "imagenet", False),
        ("mobileone_s4", "imagenet", False),
    ],
)
def test_preprocessing_params_offline(name, weights, half):
    params = get_preprocessing_params(name, pretrained=weights)  # registry only, no hub access
    mean, std = ([0.5] * 3, [0.5] * 3) if half else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert params["mean"] == pytest.approx(mean) and params["std"] == pytest.approx(std)
    assert params["input_space"] == "RGB" and params["input_range"] == [0, 1]


def test_every_weights_setting_is_pinned():
    from segmentation_models_pytorch import encoders as E

    for name in family_names():
        settings = E.encoders[name]["pretrained_settings"]
        assert settings, name
        for weights, setting in settings.items():
            assert setting["repo_id"] == f"smp-hub/{name}.{weights}"
            assert len(setting["revision"]) == 40 and {"mean", "std"} <= set(setting)


def test_torchscript():
    from segmentation_models_pytorch.encoders.mobileone import reparameterize_model

    x = torch.randn(1, 3, 64, 64)
    for enc in (
        get_encoder("efficientnet-b0", weights=None, depth=3).eval(),
        reparameterize_model(get_encoder("mobileone_s0", weights=None, depth=3)).eval(),
    ):
        scripted = torch.jit.script(enc)
        with torch.no_grad():
            for a, b in zip(scripted(x), enc(x)):
                assert rel_err(a, b) < 1e-6


def test_import_is_lazy():
    code = (
        "import sys\n"
        + "".join(f"import segmentation_models_pytorch.encoders.{m}\n" for m in FAMILY_MODULES)
        + "print(sorted(m for m in ('timm', 'efficientnet_pytorch', 'torchvision') "
        "if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- golden (SMP 0.6.0)
def golden_records() -> list[dict]:
    path = GOLDEN_DIR / "encoders.json"
    if not path.exists():
        pytest.skip(f"{path} not generated yet (tests/fixtures/make_golden.py writes it)")
    rows = gu.load_golden("encoders", str(GOLDEN_DIR))
    names = set(family_names())
    return [r for r in rows if r.get("name") in names]


def test_golden_keys_and_out_channels():
    records = [r for r in golden_records() if r["name"] in GOLDEN_KEY_NAMES]
    assert records, "no golden record for these families"
    built = {}
    for rec in records:
        name, kwargs = rec["name"], rec["kwargs"]
        in_channels = kwargs.get("in_channels", 3)
        # Keys never depend on depth or dilation here: build each (name, in_channels) once.
        if (name, in_channels) not in built:
            built[name, in_channels] = meta_encoder(name, in_channels=in_channels)
        enc = built[name, in_channels]
        assert gu.state_dict_signature(enc) == rec["keys"], rec["id"]
        if kwargs.get("depth", 5) != 5 or kwargs.get("output_stride", 32) != 32:
            if name not in CHEAPEST:
                continue
            enc = meta_encoder(name, **kwargs)
        assert list(enc.out_channels) == rec["out_channels"], rec["id"]
        assert enc.output_stride == rec["output_stride"], rec["id"]
    assert GOLDEN_KEY_NAMES <= {n for n, _ in built}


def test_golden_registry_entries():
    """Class, module, hub repo/revision per weights name and constructor params equal SMP's."""
    import json

    from segmentation_models_pytorch import encoders as E

    path = GOLDEN_DIR / "api.json"
    if not path.exists():
        pytest.skip(f"{path} not generated yet (tests/fixtures/make_golden.py writes it)")
    golden = json.loads(path.read_text())["encoders"]
    for name in family_names():
        entry, ref = E.encoders[name], golden[name]
        assert entry["encoder"].__name__ == ref["encoder_class"], name
        assert entry["encoder"].__module__ == ref["encoder_module"], name
        ours = {w: {"repo_id": s["repo_id"], "revision": s["revision"]}
                for w, s in entry["pretrained_settings"].items()}
        assert ours == ref["pretrained_settings"], name
        params = dict(entry["params"])
        ref_params = dict(ref["params"])
        if "norm_layer" in params:  # a functools.partial of our LayerNorm: compare its repr
            assert repr(params.pop("norm_layer")) == ref_params.pop("norm_layer"), name
        if "block" in params:  # SMP names the timm class; we name it (timm is imported lazily)
            block = params.pop("block")
            assert ref_params.pop("block").endswith(
                {"basic": "SelectiveKernelBasic", "bottleneck": "SelectiveKernelBottleneck"}[block]
            ), name
        assert json.loads(json.dumps(params)) == ref_params, name


@pytest.mark.parametrize("name", CHEAPEST)
def test_golden_features(name):
    records = [r for r in golden_records() if r["name"] == name and r.get("features")]
    if not records:
        pytest.skip(f"no golden features recorded for {name}")
    for rec in records:
        torch.manual_seed(0)
        enc = get_encoder(rec["name"], weights=None, **rec["kwargs"]).eval()
        gu.fill_state_dict(enc)
        with torch.no_grad():
            feats = enc(gu.make_input(rec["input_shape"]))
        assert len(feats) == len(rec["features"]), rec["id"]
        for i, (f, g) in enumerate(zip(feats, rec["features"])):
            ok, msg = gu.compare_summary(f, g)
            assert ok, f"{rec['id']} feature {i}: {msg}"
