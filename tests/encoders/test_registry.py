"""The public encoder registry, name handling and preprocessing (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.encoders import get_encoder, get_preprocessing_fn, get_preprocessing_params
from segmentation_models_pytorch.encoders._registry import register


def test_every_registered_encoder_declares_offline_preprocessing():
    for name, entry in smp.encoders.encoders.items():
        for weights, setting in entry["pretrained_settings"].items():
            params = get_preprocessing_params(name, weights)  # would raise or hit the hub otherwise
            assert len(params["mean"]) == len(params["std"]) == 3, (name, weights)
            assert "repo_id" in setting or "url" in setting, (name, weights)


def test_duplicate_registration_is_an_error():
    with pytest.raises(RuntimeError, match="already registered"):
        register(smp.encoders.encoders, {"resnet18": smp.encoders.encoders["resnet18"]}, "dup")


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_resnet_depths_and_strides(depth):
    enc = get_encoder("resnet18", depth=depth)
    feats = enc(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == enc.out_channels
    assert [64 // f.shape[-1] for f in feats] == [2**i for i in range(depth + 1)]


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet_dilation(output_stride):
    enc = get_encoder("resnet18", output_stride=output_stride)
    assert enc.output_stride == output_stride
    assert enc(torch.randn(1, 3, 64, 64))[-1].shape[-1] == 64 // output_stride


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="output_stride must be one of 8, 16, 32"):
        get_encoder("resnet18", output_stride=4)
    with pytest.raises(TypeError, match="depth must be an int"):
        get_encoder("resnet18", depth="5")
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        get_encoder("resnet18", in_channels=0)


def test_preprocessing_numpy_hwc_and_torch_nchw():
    fn = get_preprocessing_fn("resnet18", "imagenet")
    img = np.full((4, 4, 3), 255, dtype=np.uint8)
    out = fn(img)
    expected = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(out[0, 0], expected, atol=1e-5)
    t = torch.full((2, 3, 4, 4), 255.0)
    out_t = fn(t)
    assert out_t.shape == (2, 3, 4, 4)
    assert torch.allclose(out_t[0, :, 0, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_unknown_preprocessing_weights():
    with pytest.raises(KeyError, match="Did you mean: imagenet"):
        get_preprocessing_params("resnet34", "imagenett")
