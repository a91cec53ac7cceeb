"""smp.inference.sliding_window: agreement with whole-image prediction, shapes, batching, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.inference import sliding_window, window_weights


def _pointwise(in_ch: int = 3, out_ch: int = 5) -> nn.Module:
    torch.manual_seed(1)
    return nn.Conv2d(in_ch, out_ch, kernel_size=1).eval()


class _Counting(nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, (0.5, 0.1)])
def test_pointwise_model_matches_whole_image(blend, overlap):
    # A 1x1 convolution sees one pixel, so any blend of windows must equal the whole-image output.
    model = _pointwise()
    image = torch.randn(2, 3, 70, 53)
    expected = model(image)
    got = sliding_window(model, image, window=(32, 24), overlap=overlap, batch_size=3, blend=blend)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_non_overlapping_windows_are_placed_where_they_belong():
    # With zero overlap and a size that tiles exactly, the result is the model applied to each tile.
    torch.manual_seed(2)
    model = nn.Conv2d(3, 2, kernel_size=3, padding=1).eval()  # border pixels depend on the tile
    image = torch.randn(1, 3, 48, 64)
    got = sliding_window(model, image, window=(16, 32), overlap=0.0, blend="gaussian")
    expected = torch.zeros(1, 2, 48, 64)
    for y in range(0, 48, 16):
        for x in range(0, 64, 32):
            expected[..., y : y + 16, x : x + 32] = model(image[..., y : y + 16, x : x + 32])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # And it is not simply the whole-image output (which has no seams).
    assert not torch.allclose(got, model(image), atol=1e-3)


def test_chw_input_gives_chw_output_and_odd_sizes():
    model = _pointwise(out_ch=4)
    image = torch.randn(3, 37, 91)
    got = sliding_window(model, image, window=16, overlap=0.3, batch_size=5)
    assert got.shape == (4, 37, 91)
    assert got.dtype == torch.float32 and got.device == image.device
    torch.testing.assert_close(got, model(image[None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad_mode", ["reflect", "replicate", "constant"])
def test_image_smaller_than_window_is_padded_and_cropped(pad_mode):
    model = _pointwise()
    image = torch.randn(1, 3, 5, 20)
    got = sliding_window(model, image, window=32, pad_mode=pad_mode)
    assert got.shape == (1, 5, 5, 20)
    torch.testing.assert_close(got, model(image), atol=1e-5, rtol=1e-5)


def test_windows_are_batched():
    model = _Counting(_pointwise())
    image = torch.randn(2, 3, 64, 64)
    # stride 16 -> offsets 0, 16, 32 on each axis: 9 windows per image, 18 in all.
    sliding_window(model, image, window=32, overlap=0.5, batch_size=4)
    assert model.calls == [4, 4, 4, 4, 2]


def test_batched_input_equals_per_image_calls():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).eval()
    image = torch.randn(2, 3, 40, 50)
    both = sliding_window(model, image, window=24, overlap=0.25)
    for i in range(2):
        torch.testing.assert_close(both[i], sliding_window(model, image[i], window=24, overlap=0.25))


def test_smp_model_end_to_end_and_mode_restored():
    model = smp.Unet(
        "resnet18", encoder_weights=None, classes=2, encoder_depth=3, decoder_channels=(32, 16, 8)
    )
    model.train()
    image = torch.rand(3, 70, 90)
    logits = sliding_window(model, image, window=32, overlap=0.25, batch_size=8)
    assert logits.shape == (2, 70, 90)
    assert torch.isfinite(logits).all()
    assert model.training  # the caller's mode comes back
    # In eval mode a window covering the whole image gives exactly the model's own prediction.
    full = sliding_window(model, image[:, :64, :64], window=64)
    torch.testing.assert_close(full, model.eval()(image[None, :, :64, :64])[0], atol=1e-5, rtol=1e-5)


def test_aux_output_tuple_is_reduced_to_masks():
    model = smp.Unet(
        "resnet18",
        encoder_weights=None,
        classes=3,
        encoder_depth=3,
        decoder_channels=(16, 8, 8),
        aux_params={"classes": 2},
    ).eval()
    out = sliding_window(model, torch.rand(1, 3, 40, 40), window=32)
    assert out.shape == (1, 3, 40, 40)


def test_half_precision_model_gets_half_windows_and_float_output():
    model = _pointwise().to(torch.bfloat16)
    image = torch.randn(1, 3, 40, 40)
    got = sliding_window(model, image, window=16, overlap=0.25)
    assert got.dtype == torch.float32
    expected = model(image.to(torch.bfloat16)).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_gaussian_weights():
    w = window_weights((9, 7), "gaussian")
    assert w.shape == (9, 7)
    assert w.max() == 1 and w.min() > 0
    assert w[4, 3] == w.max() and w[0, 0] == w.min()
    assert torch.equal(window_weights(5, "constant"), torch.ones(5, 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window": 0}, "window must be a positive int"),
        ({"window": (16, 16, 16)}, "window must be a positive int"),
        ({"window": 16.0}, "window must be a positive int"),
        ({"window": 16, "overlap": 1.0}, "overlap must be a fraction"),
        ({"window": 16, "overlap": -0.1}, "overlap must be a fraction"),
        ({"window": 16, "batch_size": 0}, "batch_size must be a positive int"),
        ({"window": 16, "blend": "linear"}, "blend must be one of"),
        ({"window": 16, "pad_mode": "wrap"}, "pad_mode must be one of"),
        ({"window": 16, "sigma_scale": 0}, "sigma_scale must be a positive number"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sliding_window(_pointwise(), torch.randn(3, 20, 20), **kwargs)


def test_bad_image_and_model():
    with pytest.raises(TypeError, match="image must be a torch.Tensor"):
        sliding_window(_pointwise(), [[0.0]], window=8)
    with pytest.raises(ValueError, match=r"got shape \(20, 20\)"):
        sliding_window(_pointwise(), torch.randn(20, 20), window=8)
    with pytest.raises(TypeError, match="model must be a callable"):
        sliding_window("unet", torch.randn(3, 20, 20), window=8)
    downsampling = nn.Conv2d(3, 2, kernel_size=2, stride=2)
    with pytest.raises(ValueError, match="outputs at the input resolution"):
        sliding_window(downsampling, torch.randn(3, 20, 20), window=8)
    with pytest.raises(ValueError, match=r"must return a \(B, C, H, W\) tensor"):
        sliding_window(lambda x: x.mean(), torch.randn(3, 20, 20), window=8)


def test_lazy_submodule():
    assert smp.inference.sliding_window is sliding_window
