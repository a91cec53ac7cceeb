"""Every architecture: forward/backward, heads, input channels, depths, any input size, batch size 1,
decoder norms, deep supervision and clear errors for encoder/architecture combinations that cannot work.

Checkpoint/output parity with SMP 0.6.0 is replayed from golden fixtures in tests/test_golden_models.py.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict

import pytest
import torch

import segmentation_models_pytorch as smp

ARCHS = sorted(smp.MODEL_ARCHITECTURES_MAPPING)
VIT = "tu-vit_tiny_patch16_224"
# A 2-head, 64-wide ViT keeps DPT fast; dynamic_img_size lets it take any input size.
_DPT_SMALL = dict(
    encoder_name=VIT,
    dynamic_img_size=True,
    embed_dim=64,
    num_heads=2,
    decoder_intermediate_channels=(16, 32, 64, 64),
    decoder_fusion_channels=32,
)
_SMALL: Dict[str, Dict[str, Any]] = {
    "unet": dict(decoder_channels=(64, 32, 16, 16, 8)),
    "unetplusplus": dict(decoder_channels=(32, 16, 16, 8, 8)),
    "manet": dict(decoder_channels=(64, 32, 16, 16, 8), decoder_pab_channels=16),
    "fpn": dict(decoder_pyramid_channels=64, decoder_segmentation_channels=32),
    "pspnet": dict(psp_out_channels=64),
    "deeplabv3": dict(decoder_channels=32),
    "deeplabv3plus": dict(decoder_channels=32),
    "pan": dict(decoder_channels=16),
    "upernet": dict(decoder_channels=64),  # groupnorm needs 2+ channels per group on the 1x1 branch
    "segformer": dict(decoder_segmentation_channels=32),
    "dpt": _DPT_SMALL,
}
# Depths each architecture supports besides its default (with matching decoder arguments).
DEPTHS = [
    ("unet", 3, dict(decoder_channels=(32, 16, 8))),
    ("unetplusplus", 3, dict(decoder_channels=(32, 16, 8))),
    ("unetplusplus", 1, dict(decoder_channels=(8,))),
    ("manet", 4, dict(decoder_channels=(32, 16, 16, 8))),
    ("linknet", 3, {}),
    ("fpn", 4, {}),
    ("pspnet", 1, {}),
    ("pspnet", 5, {}),
    ("deeplabv3", 3, {}),
    ("deeplabv3", 4, dict(encoder_output_stride=16)),
    ("deeplabv3plus", 3, {}),
    ("deeplabv3plus", 4, dict(encoder_output_stride=8)),
    ("pan", 3, {}),
    ("pan", 4, dict(encoder_output_stride=32)),
    ("upernet", 3, {}),
    ("segformer", 4, {}),
    ("dpt", 2, dict(decoder_intermediate_channels=(16, 32), encoder_output_indices=[5, 11])),
]
ODD_SHAPES = [(1, 3, 63, 97), (1, 3, 33, 65)]
NORM_ARCHS = ["unet", "unetplusplus", "manet", "linknet", "pspnet", "upernet"]


def build(arch: str, **kw: Any) -> torch.nn.Module:
    params: Dict[str, Any] = {"encoder_name": "resnet18", **_SMALL.get(arch, {}), **kw}
    params["encoder_weights"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smp.MODEL_ARCHITECTURES_MAPPING[arch](**params)


def masks_of(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_with_aux_head(arch):
    model = build(arch, classes=3, aux_params={"classes": 4, "dropout": 0.2})
    mask, label = model(torch.randn(2, 3, 64, 64))
    assert mask.shape == (2, 3, 64, 64) and label.shape == (2, 4)
    (mask.square().mean() + label.square().mean()).backward()
    grads = [p.grad for p in model.decoder.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "every decoder parameter takes part"
    assert all(p.grad is not None for p in model.segmentation_head.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_input_channels_1_and_4(arch):
    for channels in (1, 4):
        model = build(arch, in_channels=channels, classes=2).eval()
        with torch.no_grad():
            assert model(torch.randn(1, channels, 64, 64)).shape == (1, 2, 64, 64)
        with pytest.raises(ValueError, match=f"Expected input with {channels} channels"):
            model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("arch,depth,extra", DEPTHS, ids=[f"{a}-d{d}" for a, d, _ in DEPTHS])
def test_encoder_depth_variants(arch, depth, extra):
    model = build(arch, encoder_depth=depth, **extra).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_any_input_size_gives_exactly_sized_masks(arch):
    model = build(arch).eval()
    with torch.no_grad():
        for shape in ODD_SHAPES:
            assert model(torch.randn(*shape)).shape == (shape[0], 1, *shape[2:]), shape
        if model.requires_divisible_input_shape:
            # Sizes the model takes as they are are untouched by the padding logic.
            x = torch.randn(1, 3, 64, 96)
            padded = model(x)
            model.pad_input = False
            assert torch.equal(padded, model(x))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v2"])
def test_activations_stay_channels_last(arch, encoder):
    """Models run in channels_last inside; one NCHW tensor (e.g. a resize of a 1x1 map) turns every
    op after it back to NCHW, which costs speed without changing any value, so only a test sees it."""
    if arch == "dpt":
        encoder = VIT  # its 4-D attention tensors are not images: only the decoder is checked
    model = build(arch, encoder_name=encoder).eval()
    leaks = []

    def check(name):
        def hook(module, args, out):
            image_like = isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1] > 1
            if image_like and out.shape[-1] * out.shape[-2] > 1:
                if not out.is_contiguous(memory_format=torch.channels_last):
                    leaks.append(f"{name} ({type(module).__name__}) {tuple(out.shape)}")

        return hook

    # A head that resizes makes the (contiguous) output there: it resizes in NCHW on purpose.
    resizes = any(isinstance(m, torch.nn.Upsample) for m in model.segmentation_head.children())
    for name, module in model.named_modules():
        if resizes and name in ("segmentation_head", "segmentation_head.1", "segmentation_head.2"):
            continue
        if name and (arch != "dpt" or not name.startswith("encoder")):
            module.register_forward_hook(check(name))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert not leaks, f"NCHW activations: {leaks[:3]}"
    assert out.is_contiguous()  # what the caller gets back is ordinary


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_size_one_in_training_works_or_says_why(arch):
    model = build(arch).train()
    x = torch.randn(1, 3, 64, 64)
    try:
        out = model(x)
    except ValueError as err:  # BatchNorm after a global pooling: needs two images
        assert "batch" in str(err) and "model.eval()" in str(err)
        assert arch in ("deeplabv3", "deeplabv3plus", "pan", "upernet")
        model.eval()
        with torch.no_grad():
            assert model(x).shape == (1, 1, 64, 64)
    else:
        assert out.shape == (1, 1, 64, 64)


@pytest.mark.parametrize("arch", NORM_ARCHS)
def test_decoder_use_norm_variants(arch):
    norms = ["groupnorm", "layernorm", "instancenorm", {"type": "groupnorm", "num_groups": 4}]
    for norm in norms:
        model = build(arch, decoder_use_norm=norm).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64), norm
    with pytest.raises(ValueError, match="Unknown normalisation 'bogus'"):
        build(arch, decoder_use_norm="bogus")


def test_pan_takes_deepest_maps_smaller_than_8x8():
    # SMP 0.6.0 fails below 128x128 (stride 16) / 256x256 (stride 32); the deepest map here is 2x2.
    for stride, side in ((16, 32), (32, 64), (16, 16)):
        model = build("pan", encoder_output_stride=stride).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, side, side)).shape == (2, 1, side, side)


def test_upernet_groupnorm_trains_with_batch_size_one():
    model = build("upernet", decoder_use_norm="groupnorm").train()
    model(torch.randn(1, 3, 64, 64)).mean().backward()


def test_dpt_fixed_size_encoder_explains_the_size_it_needs():
    model = build("dpt", dynamic_img_size=False, img_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
        assert model(torch.randn(1, 3, 57, 63)).shape == (1, 1, 57, 63)  # padded to 64x64
        with pytest.raises(ValueError, match="takes 64x64 images only.*dynamic_img_size=True"):
            model(torch.randn(1, 3, 96, 64))


_OLD_DEEPLAB_PREFIXES = (
    ("decoder.aspp.", "decoder.0."),
    ("decoder.conv.", "decoder.1."),
    ("decoder.bn.", "decoder.2."),
)


def test_deeplabv3_loads_old_sequential_decoder_keys():
    model = build("deeplabv3").eval()
    state = model.state_dict()
    renamed = {}
    for key, value in state.items():
        for new, old in _OLD_DEEPLAB_PREFIXES:
            if key.startswith(new):
                key = old + key[len(new) :]
        renamed[key] = value.clone()
    assert any(k.startswith("decoder.0.") for k in renamed)
    fresh = build("deeplabv3")
    fresh.load_state_dict(renamed)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- incompatible combinations
ERRORS = [
    ("deeplabv3", dict(encoder_name="vgg11"), "does not support dilation"),
    ("deeplabv3plus", dict(encoder_name="densenet121"), "does not support dilation"),
    ("pan", dict(encoder_name="vgg11"), "encoder_output_stride=32"),
    ("deeplabv3", dict(encoder_output_stride=32), "8 or 16"),
    ("pan", dict(encoder_output_stride=8), "16 or 32"),
    ("deeplabv3", dict(decoder_atrous_rates=(6, 12)), "three positive integers"),
    ("deeplabv3plus", dict(encoder_depth=2), "encoder_depth >= 3"),
    ("pan", dict(encoder_depth=2), "encoder_depth >= 3"),
    ("upernet", dict(encoder_depth=2), "encoder_depth >= 3"),
    ("segformer", dict(encoder_depth=2), "encoder_depth >= 3"),
    ("unetplusplus", dict(encoder_depth=4), "one entry per encoder stage"),
    ("manet", dict(encoder_depth=3), "one entry per encoder stage"),
    ("manet", dict(decoder_interpolation="linear"), "decoder_interpolation must be one of"),
    ("dpt", dict(encoder_name="resnet34"), "plain vision transformer from timm"),
    ("dpt", dict(decoder_readout="mean"), "decoder_readout must be one of"),
    ("dpt", dict(encoder_depth=2), "one entry per encoder feature"),
]


@pytest.mark.parametrize("arch,kw,match", ERRORS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(ERRORS)])
def test_incompatible_arguments_fail_clearly_at_construction(arch, kw, match):
    with pytest.raises(ValueError, match=match):
        build(arch, **kw)


@pytest.mark.parametrize("arch", ["unetplusplus", "manet", "upernet", "segformer", "pan"])
def test_encoder_without_stride2_feature(arch):
    """mit_b0 has no stride-2 stage (a 0-channel placeholder): these architectures still work."""
    extra = {"encoder_output_stride": 32} if arch == "pan" else {}
    model = build(arch, encoder_name="mit_b0", **extra)
    assert model.encoder.out_channels[1] == 0
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_deprecated_keyword_arguments_still_work():
    with pytest.warns(DeprecationWarning, match="decoder_interpolation"):
        model = smp.PAN("resnet18", encoder_weights=None, upscale_mode="nearest")
    assert model.decoder.gau1.interpolation_mode == "nearest"
    with pytest.warns(DeprecationWarning, match="decoder_use_norm"):
        model = smp.UnetPlusPlus("resnet18", encoder_weights=None, decoder_use_batchnorm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())


def test_smp_import_paths():
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPP  # noqa: F401
    from segmentation_models_pytorch.decoders.deeplabv3.model import DeepLabV3, DeepLabV3Plus  # noqa: F401
    from segmentation_models_pytorch.decoders.dpt.model import DPT
    from segmentation_models_pytorch.decoders.manet.model import MAnet
    from segmentation_models_pytorch.decoders.pan.decoder import PANDecoder  # noqa: F401
    from segmentation_models_pytorch.decoders.segformer.model import Segformer
    from segmentation_models_pytorch.decoders.unetplusplus.model import UnetPlusPlus
    from segmentation_models_pytorch.decoders.upernet.model import UPerNet

    assert smp.DPT is DPT and smp.MAnet is MAnet and smp.Segformer is Segformer
    assert smp.UnetPlusPlus is UnetPlusPlus and smp.UPerNet is UPerNet


# ---------------------------------------------------------------- deep supervision
@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_deep_supervision_off_by_default_and_state_dict_unchanged(arch):
    model = build(arch)
    assert model.deep_supervision is False
    assert not any(k.startswith("deep_supervision") for k in model.state_dict())
    assert isinstance(model.train()(torch.randn(2, 3, 64, 64)), torch.Tensor)


@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_deep_supervision_returns_intermediate_masks_in_training(arch):
    model = build(arch, deep_supervision=True, classes=2, aux_params={"classes": 3})
    assert model.config["deep_supervision"] is True
    masks, labels = model.train()(torch.randn(2, 3, 33, 65))
    assert len(masks) == 5 and labels.shape == (2, 3)
    assert all(m.shape == (2, 2, 33, 65) for m in masks)
    sum(m.square().mean() for m in masks).backward()
    assert all(h.weight.grad is not None for h in model.deep_supervision_heads)
    model.eval()
    with torch.no_grad():
        final, _ = model(torch.randn(2, 3, 33, 65))
    assert final.shape == (2, 2, 33, 65)


def test_deep_supervision_can_be_switched_on_after_construction():
    model = build("unetplusplus", encoder_depth=3, decoder_channels=(32, 16, 8), activation="sigmoid")
    model.deep_supervision = True
    assert model.config["deep_supervision"] is True
    masks = model.train()(torch.randn(2, 3, 64, 64))
    assert isinstance(masks, list) and len(masks) == 3
    assert all(float(m.detach().min()) >= 0 and float(m.detach().max()) <= 1 for m in masks), "activation"
    keys = [k for k in model.state_dict() if k.startswith("deep_supervision_heads.")]
    assert keys == [f"deep_supervision_heads.{i}.{p}" for i in range(2) for p in ("weight", "bias")]
    model.deep_supervision = False
    assert isinstance(model(torch.randn(2, 3, 64, 64)), torch.Tensor)
    with pytest.raises(TypeError, match="True or False"):
        model.deep_supervision = "yes"
