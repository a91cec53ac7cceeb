"""The shared SegmentationModel skeleton: heads, input checks, padding, freezing, loading."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import modules as md
from segmentation_models_pytorch.encoders import EncoderMixin

SEED_ARCHS = ["Unet", "Linknet", "FPN", "PSPNet"]


def build(arch="Unet", **kw):
    kw.setdefault("encoder_name", "resnet18")
    kw.setdefault("encoder_weights", None)
    return getattr(smp, arch)(**kw)


@pytest.mark.parametrize("arch", SEED_ARCHS)
def test_forward_backward_and_aux(arch):
    model = build(arch, classes=3, aux_params={"classes": 4, "dropout": 0.5})
    x = torch.randn(2, 3, 64, 64)
    mask, label = model(x)
    assert mask.shape == (2, 3, 64, 64) and label.shape == (2, 4)
    (mask.mean() + label.mean()).backward()
    assert all(p.grad is not None for p in model.segmentation_head.parameters())


@pytest.mark.parametrize("arch", SEED_ARCHS)
@pytest.mark.parametrize("shape", [(1, 3, 63, 97), (1, 3, 33, 65)])
def test_any_input_size(arch, shape):
    model = build(arch).eval()
    assert model(torch.randn(*shape)).shape == (shape[0], 1, *shape[2:])


def test_padding_keeps_divisible_output_identical():
    model = build("FPN").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model(x)
        model.pad_input = False
        b = model(x)
    assert torch.equal(a, b)


def test_strict_shape_check_names_valid_sizes():
    model = build("FPN").eval()
    model.pad_input = False
    with pytest.raises(RuntimeError, match=r"divisible by 32: use height 32 or 64 and width 96"):
        model(torch.randn(1, 3, 63, 97))


def test_wrong_channel_count_is_clear():
    model = build("Unet", in_channels=4)
    with pytest.raises(ValueError, match="Expected input with 4 channels.*got 3 channels"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="4D input"):
        model(torch.randn(4, 64, 64))


@pytest.mark.parametrize("in_channels", [1, 2, 5])
def test_in_channels(in_channels):
    model = build("Unet", in_channels=in_channels)
    assert model(torch.randn(1, in_channels, 64, 64)).shape == (1, 1, 64, 64)


def test_depth_errors():
    with pytest.raises(ValueError, match="depth 1..5"):
        build("Unet", encoder_depth=6, decoder_channels=(8,) * 6)
    with pytest.raises(ValueError, match="decoder_channels must have one entry per encoder stage"):
        build("Unet", encoder_depth=3)
    with pytest.raises(ValueError, match="FPN needs encoder_depth >= 3"):
        build("FPN", encoder_depth=2)


@pytest.mark.parametrize("depth", [3, 4])
def test_fpn_pspnet_return_input_size_at_any_depth(depth):
    x = torch.randn(1, 3, 64, 64)
    assert build("FPN", encoder_depth=depth)(x).shape[-2:] == (64, 64)
    assert build("PSPNet", encoder_depth=depth)(x).shape[-2:] == (64, 64)
    # Any other upsampling is SMP's literal factor: the PSP output is at stride 2**depth, FPN's
    # finest level at stride 2**(depth - 3).
    assert build("PSPNet", encoder_depth=depth, upsampling=4)(x).shape[-2:] == (256 // 2**depth,) * 2
    assert build("FPN", encoder_depth=depth, upsampling=2)(x).shape[-2:] == (128 // 2 ** (depth - 3),) * 2


def test_unknown_names_suggest_close_matches():
    with pytest.raises(KeyError, match="Did you mean: resnet34"):
        build("Unet", encoder_name="resnet43")
    with pytest.raises(ValueError, match="Unknown architecture 'unte'.*Did you mean: unet"):
        smp.create_model("unte", encoder_weights=None)
    with pytest.raises(KeyError, match="Unknown weights .*imagenet"):
        build("Unet", encoder_weights="imagenett")
    with pytest.raises(ValueError, match="Unknown activation"):
        build("Unet", activation="relu6")
    with pytest.raises(ValueError, match="pooling must be 'avg' or 'max'"):
        build("Unet", aux_params={"classes": 2, "pooling": "min"})
    with pytest.raises(ValueError, match="aux_params accepts the keys"):
        build("Unet", aux_params={"classes": 2, "pool": "avg"})


def test_unknown_kwargs_are_rejected():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['decoder_chanels'\]"):
        build("Unet", decoder_chanels=(8, 8, 8, 8, 8))


@pytest.mark.parametrize(
    "name,expected",
    [
        (None, torch.Tensor),
        ("sigmoid", torch.Tensor),
        ("softmax2d", torch.Tensor),
        ("softmax", torch.Tensor),
        ("logsoftmax", torch.Tensor),
        ("tanh", torch.Tensor),
        ("identity", torch.Tensor),
        ("clamp", torch.Tensor),
    ],
)
def test_activations(name, expected):
    model = build("Linknet", classes=3, activation=name).eval()
    y = model(torch.randn(1, 3, 64, 64))
    assert isinstance(y, expected) and y.shape == (1, 3, 64, 64)
    if name == "softmax2d":
        assert torch.allclose(y.sum(1), torch.ones(1, 64, 64), atol=1e-5)


def test_argmax_and_callable_activations():
    y = build("Linknet", classes=3, activation="argmax2d").eval()(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 64, 64) and y.dtype == torch.long
    y = build("Linknet", classes=3, activation=torch.sigmoid).eval()(torch.randn(1, 3, 64, 64))
    assert 0 <= float(y.min()) and float(y.max()) <= 1
    assert isinstance(build("Linknet", activation=nn.Sigmoid).segmentation_head[2].activation, nn.Sigmoid)


@pytest.mark.parametrize(
    "norm,cls",
    [
        (True, nn.BatchNorm2d),
        (False, nn.Identity),
        ("batchnorm", nn.BatchNorm2d),
        ("identity", nn.Identity),
        ("instancenorm", nn.InstanceNorm2d),
        ("layernorm", md.LayerNorm2d),
        ("groupnorm", nn.GroupNorm),
        ("inplace", nn.BatchNorm2d),
        ({"type": "groupnorm", "num_groups": 4}, nn.GroupNorm),
    ],
)
def test_decoder_norms(norm, cls):
    model = build("Unet", decoder_use_norm=norm, decoder_channels=(32, 32, 32, 32, 32))
    assert isinstance(model.decoder.blocks[0].conv1[1], cls)
    # SMP's layernorm normalises over the width and crashes unless W == C; ours works at any size.
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 1, 64, 96)


def test_bad_norm_is_clear():
    with pytest.raises(ValueError, match="Unknown normalisation 'batch'"):
        build("Unet", decoder_use_norm="batch")
    with pytest.raises(ValueError, match="needs a 'type' key"):
        build("Unet", decoder_use_norm={"eps": 1e-3})


def test_deprecated_decoder_use_batchnorm():
    with pytest.warns(DeprecationWarning, match="decoder_use_batchnorm"):
        model = build("Unet", decoder_use_batchnorm=False)
    assert isinstance(model.decoder.blocks[0].conv1[1], nn.Identity)
    with pytest.warns(DeprecationWarning, match="psp_use_batchnorm"):
        build("PSPNet", psp_use_batchnorm=False)


def test_freeze_keeps_frozen_bn_in_eval():
    model = build("Unet")
    model.freeze_encoder()
    model.train()
    assert not model.encoder.bn1.training and model.decoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    before = model.encoder.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.encoder.bn1.running_mean)
    model.unfreeze_encoder()
    assert model.encoder.bn1.training and all(p.requires_grad for p in model.encoder.parameters())


def test_predict_is_eval_and_no_grad():
    model = build("Unet")
    y = model.predict(torch.randn(1, 3, 64, 64))
    assert not model.training and not y.requires_grad


def test_load_state_dict_does_not_mutate_and_accepts_positional_strict():
    a, b = build("Unet", classes=2), build("Unet", classes=2)
    sd = a.state_dict()
    keys = list(sd)
    b.load_state_dict(sd, True)
    assert list(sd) == keys
    c = build("Unet", classes=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c.load_state_dict(sd, False)
    assert list(sd) == keys
    assert any("segmentation_head.0.weight" in str(w.message) for w in caught)
    assert torch.equal(c.encoder.conv1.weight, a.encoder.conv1.weight)


def test_every_architecture_initialises_decoder_and_heads_the_same_way():
    torch.manual_seed(0)
    model = build("PSPNet")
    bias = model.segmentation_head[0].bias
    assert torch.count_nonzero(bias) == 0


def test_config_records_constructor_arguments():
    model = build("FPN", classes=3, decoder_dropout=0.1)
    assert model.config["classes"] == 3 and model.config["decoder_dropout"] == 0.1
    assert model.config["encoder_name"] == "resnet18" and model.config["upsampling"] == 4


class MyEncoder(nn.Module, EncoderMixin):
    """The seed documentation's custom encoder, verbatim in spirit: a tiny strided conv stack."""

    def __init__(self, out_channels=(3, 8, 16, 24, 32, 40), depth=5, **kwargs):
        super().__init__()
        self._out_channels = list(out_channels)
        self._depth = depth
        self._in_channels = 3
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU())
            for cin, cout in zip(out_channels[:-1], out_channels[1:])
        )

    def forward(self, x):
        features = [x]
        for stage in self.stages[: self._depth]:
            x = stage(x)
            features.append(x)
        return features


@pytest.fixture
def my_encoder():
    smp.encoders.encoders["my_awesome_encoder"] = {
        "encoder": MyEncoder,
        "pretrained_settings": {
            "imagenet": {"mean": [0.5] * 3, "std": [0.25] * 3, "url": "file:///nonexistent.pth"}
        },
        "params": {"out_channels": (3, 8, 16, 24, 32, 40)},
    }
    yield "my_awesome_encoder"
    del smp.encoders.encoders["my_awesome_encoder"]


@pytest.mark.parametrize("arch", SEED_ARCHS)
def test_custom_encoder_seed_example(my_encoder, arch):
    depth = 4 if arch != "PSPNet" else 3
    kw = {"decoder_channels": (32, 32, 16, 16)} if arch == "Unet" else {}
    if arch == "FPN":
        kw = {"decoder_segmentation_channels": 32}
    model = build(arch, encoder_name=my_encoder, encoder_depth=depth, **kw)
    assert len(model.encoder(torch.randn(1, 3, 64, 64))) == depth + 1
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert smp.encoders.get_preprocessing_params(my_encoder)["std"] == [0.25] * 3
