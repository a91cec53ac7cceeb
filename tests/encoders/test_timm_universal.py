"""``tu-`` (timm universal) encoders, the plain-ViT adapter, deprecated ``timm-*`` aliases (offline)."""

from __future__ import annotations

import functools
import os
import warnings

import golden_utils as gu
import pytest
import torch

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.encoders import get_encoder, get_encoder_names, get_preprocessing_params
from segmentation_models_pytorch.encoders._weights import WeightsUnavailableError

timm = pytest.importorskip("timm")

GOLDEN_TU = os.path.join(os.path.dirname(gu.__file__), "golden", "tu_encoders.json")
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@functools.cache
def _cached(name: str, **kwargs):
    """Encoders shared by tests that only read them (building timm models dominates the runtime)."""
    return get_encoder(name, **kwargs).eval()


def _decoders():
    try:
        return smp.Unet, smp.FPN
    except Exception as err:  # pragma: no cover - only while the decoders are being written
        pytest.skip(f"smp.Unet / smp.FPN not importable yet: {err}")


@pytest.fixture
def no_download(monkeypatch):
    """Make every way timm / the hub fetch weights fail loudly."""

    def boom(*args, **kwargs):
        raise OSError("download attempted (offline test)")

    import huggingface_hub
    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", boom)
    monkeypatch.setattr(builder, "load_state_dict_from_hf", boom, raising=False)
    monkeypatch.setattr(builder, "load_state_dict_from_url", boom, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    return boom


# (name, extra timm kwargs, input size)
MODELS = [
    ("tu-resnet10t", {}, 64),
    ("tu-tinynet_e", {}, 64),  # the smallest EfficientNet
    ("tu-convnext_atto", {}, 64),
    ("tu-regnetx_002", {}, 64),
    ("tu-maxvit_rmlp_pico_rw_256", {"img_size": 64}, 64),
    ("tu-vit_tiny_patch16_224", {}, 64),
]


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=[m[0] for m in MODELS])
def test_in_unet_and_fpn_depth3_in1(name, kwargs, size, no_download):
    unet_cls, fpn_cls = _decoders()
    x = torch.randn(1, 1, size, size)
    unet = unet_cls(name, encoder_weights=None, encoder_depth=3, in_channels=1, classes=2,
                    decoder_channels=(32, 16, 8), **kwargs).eval()
    enc = unet.encoder
    assert enc.name == name[3:]
    # a 0-channel placeholder exactly when there is no real stride-2 feature
    assert enc._has_stride2_feature == (enc.out_channels[1] > 0)
    feats = enc(x)
    assert [f.shape[1] for f in feats] == enc.out_channels
    assert [size // f.shape[-1] for f in feats] == [1, 2, 4, 8]
    # FPN needs four real pyramid levels: depth 5 when stride 2 is a placeholder
    fpn_depth = 3 if enc._has_stride2_feature else 5
    fpn = fpn_cls(name, encoder_weights=False, encoder_depth=fpn_depth, in_channels=1, classes=2,
                  **kwargs).eval()
    for model in (unet, fpn):
        with torch.no_grad():
            out = model(x)
        assert out.shape == (1, 2, size, size), (type(model).__name__, name)
        assert torch.isfinite(out).all()


def test_capability_flags_follow_the_model():
    resnet = _cached("tu-resnet10t", depth=3)
    convnext = _cached("tu-convnext_atto", depth=3)
    vit = _cached("tu-vit_tiny_patch16_224")
    assert resnet._has_stride2_feature and resnet.supports_dilation
    assert not convnext._has_stride2_feature and convnext.supports_dilation
    assert convnext.out_channels[:2] == [3, 0]
    assert not vit._has_stride2_feature and not vit.supports_dilation


@pytest.mark.parametrize("name", ["tu-resnet10t", "tu-convnext_atto"])
def test_output_stride_16(name):
    enc = get_encoder(name, output_stride=16)
    assert enc.output_stride == 16
    feats = enc(torch.randn(1, 3, 64, 64))
    assert feats[-1].shape[-1] == 64 // 16 and feats[-2].shape[-1] == 64 // 16


def test_output_stride_refused_where_timm_cannot_dilate():
    with pytest.raises(ValueError, match="does not support output_stride=16"):
        get_encoder("tu-maxvit_rmlp_pico_rw_256", output_stride=16, img_size=64)
    with pytest.raises(ValueError, match="cannot be dilated"):
        get_encoder("tu-vit_tiny_patch16_224", output_stride=8)


def test_plain_vit_multiscale_adapter():
    enc = _cached("tu-vit_tiny_patch16_224")  # 12 blocks -> blocks 2, 5, 8, 11
    assert enc.out_channels == [3, 0, 192, 192, 192, 192]
    assert list(enc.model.out_indices) == [2, 5, 8, 11]
    x = torch.randn(2, 3, 96, 96)  # not 224 and not a multiple of 32: dynamic_img_size is on
    feats = enc(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(96, 96), (48, 48), (24, 24), (12, 12), (6, 6), (3, 3)]
    # stride 16 is the block output itself; stride 32 is its 2x2 average
    raw = enc.model(x)
    assert torch.allclose(feats[4], raw[2])
    assert torch.allclose(feats[5], torch.nn.functional.avg_pool2d(raw[3], 2), atol=1e-6)


def test_gapped_hierarchy_is_resampled():
    enc = get_encoder("tu-efficientvit_m0")  # timm features at strides 16, 32, 64
    feats = enc(torch.randn(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in feats] == [1, 2, 4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == enc.out_channels


def test_fixed_size_models_explain_the_size():
    enc = get_encoder("tu-maxvit_rmlp_pico_rw_256", depth=4)  # built for 256x256
    with pytest.raises(ValueError, match="img_size"):
        enc(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"cannot take 50x50 inputs.*\n.*img_size=.*64"):
        get_encoder("tu-coatnet_nano_rw_224", img_size=50, depth=4)


def test_weights_none_and_false_never_download(no_download):
    for weights in (None, False):
        get_encoder("tu-resnet10t", weights=weights, depth=2)


def test_pretrained_weights_offline_give_a_clear_error(no_download):
    with pytest.raises(WeightsUnavailableError, match="Could not load the pretrained weights"):
        get_encoder("tu-resnet10t", weights=True, depth=2)
    with pytest.warns(UserWarning, match="tag"), pytest.raises(WeightsUnavailableError):
        get_encoder("tu-resnet10t", weights="imagenet", depth=2)
    with pytest.raises(ValueError, match="no pretrained weights"):
        get_encoder("tu-coatnet_nano_cc_224", weights=True)


def test_unknown_names_and_tags():
    with pytest.raises(KeyError, match="Did you mean: resnet18"):
        get_encoder("tu-resnet18x")
    with pytest.raises(RuntimeError, match="Available: resnet18.a1_in1k"):
        get_encoder("tu-resnet18.not_a_tag")
    with pytest.raises(ValueError, match="already specified internally"):
        get_encoder("tu-resnet10t", features_only=False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file(tmp_path, suffix, no_download):
    src = get_encoder("tu-resnet10t", depth=3)
    gu.fill_state_dict(src)
    path = tmp_path / f"enc{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    enc = get_encoder("tu-resnet10t", depth=3, weights=str(path))
    for key, value in src.state_dict().items():
        assert torch.equal(enc.state_dict()[key], value), key

    # keys of the bare timm feature extractor (no "model.") and an in-memory dict work too
    bare = {k[len("model."):]: v for k, v in src.state_dict().items()}
    enc2 = get_encoder("tu-resnet10t", depth=3, weights=bare)
    assert torch.equal(enc2.model.conv1[0].weight, src.model.conv1[0].weight)

    # 3-channel weights into a 1-channel encoder: the first conv is adapted (sum over RGB)
    enc1 = get_encoder("tu-resnet10t", depth=3, weights=str(path), in_channels=1)
    assert torch.allclose(enc1.model.conv1[0].weight, src.model.conv1[0].weight.sum(1, keepdim=True))


def test_local_weights_mismatch_names_keys(tmp_path):
    other = get_encoder("tu-resnet10t", depth=2)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys: model\.layer2"):
        get_encoder("tu-resnet10t", depth=3, weights=str(path))


def test_deprecated_aliases_warn_and_are_not_listed():
    names = get_encoder_names()
    assert not any(n.startswith(("timm-regnet", "timm-res2", "timm-resnest", "timm-mobilenetv3",
                                 "timm-gernet")) for n in names)
    with pytest.warns(DeprecationWarning, match="tu-regnetx_002"):
        enc = get_encoder("timm-regnetx_002", depth=3)
    assert type(enc).__name__ == "TimmUniversalEncoder" and enc.name == "regnetx_002"
    with pytest.warns(DeprecationWarning, match="tu-tf_mobilenetv3_small_100"):
        enc = get_encoder("timm-mobilenetv3_small_100", depth=2)
    assert enc.name == "tf_mobilenetv3_small_100"


@pytest.mark.parametrize("alias", ["timm-regnetx_002", "timm-gernet_s"])
def test_old_checkpoints_are_remapped(alias):
    unet_cls, _ = _decoders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = unet_cls(alias, encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4))
    gu.fill_state_dict(model)
    new = model.state_dict()
    # the hand-ported SMP <= 0.4 encoders had no "model." level, and gernet had "stages.<i>"
    old = {}
    for key, value in new.items():
        if key.startswith("encoder.model."):
            key = "encoder." + key[len("encoder.model."):]
            key = key.replace("stages_", "stages.")
        old[key] = value
    assert old.keys() != new.keys()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fresh = unet_cls(alias, encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4))
    frozen = dict(old)
    fresh.load_state_dict(old)
    assert old == frozen  # the caller's dict is not modified
    for key, value in new.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # the same at encoder level
    enc_old = {k[len("encoder."):]: v for k, v in old.items() if k.startswith("encoder.")}
    fresh.encoder.load_state_dict(enc_old)


def test_preprocessing_params_offline(no_download):
    params = get_preprocessing_params("tu-resnet18")
    assert params == {"input_space": "RGB", "input_range": [0, 1], **IMAGENET}
    vit = get_preprocessing_params("tu-vit_tiny_patch16_224.augreg_in21k")
    assert vit["mean"] == [0.5, 0.5, 0.5]
    with pytest.warns(DeprecationWarning):
        assert get_preprocessing_params("timm-regnetx_002")["mean"] == IMAGENET["mean"]
    with pytest.raises(ValueError, match="does not have pretrained weights"):
        get_preprocessing_params("tu-coatnet_nano_cc_224")


def test_torchscript_and_direct_class():
    from segmentation_models_pytorch.encoders import TimmUniversalEncoder

    enc = _cached("tu-convnext_atto", depth=3)
    assert isinstance(enc, TimmUniversalEncoder)
    scripted = torch.jit.script(enc)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(scripted(x), enc(x)):
        assert torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"depth should be in range \[1, 5\]"):
        TimmUniversalEncoder("resnet10t", pretrained=False, depth=6)


def test_timm_vit_encoder_smp_api():
    from segmentation_models_pytorch.encoders import TimmViTEncoder

    enc = TimmViTEncoder("vit_tiny_patch16_224", pretrained=False, depth=4, img_size=64).eval()
    assert enc.out_channels == [192] * 4 and enc.output_strides == [16] * 4 and enc.output_stride == 16
    assert enc._output_indices == [2, 5, 8, 11] and enc.has_prefix_tokens
    assert enc.input_size == (3, 224, 224) and enc.is_fixed_input_size
    assert "model.head.weight" in enc.state_dict()
    feats, prefix = enc(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 4)] * 4
    assert [tuple(p.shape) for p in prefix] == [(2, 1, 192)] * 4
    with pytest.raises(ValueError, match="Length of output indices"):
        TimmViTEncoder("vit_tiny_patch16_224", pretrained=False, depth=2, output_indices=[1])
    with pytest.raises(ValueError, match="Dilated mode not supported"):
        TimmViTEncoder("vit_tiny_patch16_224", pretrained=False, output_stride=16)


# A fast, representative subset of golden/tu_encoders.json: every layout, depth 3, in_channels 1,
# dilation and the deprecated aliases.
GOLDEN_IDS = (
    "tu-convnext_atto@depth3", "tu-resnet18@in1", "tu-resnet18@os8", "tu-mobilenetv3_small_100@depth3",
    "timm-regnetx_002@depth3", "timm-mobilenetv3_small_100", "timm-gernet_s", "tu-vgg11@depth5",
)


def _golden_rows():
    if not os.path.exists(GOLDEN_TU):
        return []
    return [r for r in gu.load_golden("tu_encoders") if r["id"] in GOLDEN_IDS and r.get("features")]


@pytest.mark.skipif(not os.path.exists(GOLDEN_TU), reason="golden/tu_encoders.json not generated yet")
@pytest.mark.parametrize("rec", _golden_rows(), ids=lambda r: r["id"])
def test_matches_smp_golden(rec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        enc = get_encoder(rec["name"], weights=None, **rec["kwargs"])
    assert gu.state_dict_signature(enc) == rec["keys"]
    assert list(enc.out_channels) == rec["out_channels"]
    assert enc.output_stride == rec["output_stride"]
    assert enc.name == rec["encoder_attr_name"]
    gu.fill_state_dict(enc)
    enc.eval()
    with torch.no_grad():
        feats = enc(gu.make_input(rec["input_shape"]))
    assert len(feats) == len(rec["features"])
    for i, (f, g) in enumerate(zip(feats, rec["features"])):
        ok, msg = gu.compare_summary(f, g)
        assert ok, f"feature {i}: {msg}"
