"""Fast construction: parallel RNG streams, deferred default init, and the distributions they give."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import initialization as init
from segmentation_models_pytorch.encoders import get_encoder


def _plan_fill(seed: int, threads: int) -> list:
    tensors = [torch.empty(300, 400), torch.empty(64, 3, 7, 7), torch.empty(1 << 20)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        plan = init.InitPlan()
        plan.normal_(tensors[0], 0.0, 2.0)
        plan.uniform_(tensors[1], -3.0, 3.0)
        plan.normal_(tensors[2], 1.0, 0.5)
        plan.run()
    finally:
        torch.set_num_threads(old)
    return tensors


def test_plan_is_reproducible_and_independent_of_core_count():
    a, b, c = _plan_fill(0, 2), _plan_fill(0, 1), _plan_fill(1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])


def test_plan_draws_the_requested_distributions():
    normal, uniform, big = _plan_fill(0, 2)
    assert abs(normal.mean()) < 0.05 and abs(normal.std() - 2.0) < 0.05
    assert uniform.min() >= -3.0 and uniform.max() <= 3.0 and abs(uniform.std() - 3.0 / math.sqrt(3)) < 0.1
    assert abs(big.mean() - 1.0) < 0.01 and abs(big.std() - 0.5) < 0.01


def test_plan_fills_channels_last_weights_completely():
    w = torch.full((32, 16, 3, 3), float("nan")).contiguous(memory_format=torch.channels_last)
    init.kaiming_(w, mode="fan_in")  # no plan: runs at once
    assert torch.isfinite(w).all() and w.is_contiguous(memory_format=torch.channels_last)


class _Custom(nn.Module):
    """A layer outside the handled types that initialises itself through torch.nn.init."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(8))
        nn.init.constant_(self.scale, 3.0)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), _Custom(), nn.BatchNorm2d(8))


def test_deferred_init_skips_handled_layers_and_replays_the_rest():
    sentinel = 123.0
    with init.deferred_init(_net, (nn.Conv2d, nn.BatchNorm2d)) as net:
        nn.init.constant_(net[0].weight, sentinel)  # the caller's own init runs normally
        nn.init.zeros_(net[0].bias)
        init.reset_norm(net[2])
    assert torch.all(net[0].weight == sentinel)  # not overwritten by the deferred default init
    assert torch.all(net[1].scale == 3.0)  # not handled by the caller: replayed on exit
    assert torch.all(net[2].weight == 1) and torch.all(net[2].running_var == 1)


def test_deferred_init_touches_no_other_thread():
    results = {}
    started, release = threading.Event(), threading.Event()

    def other():
        started.wait()
        layer = nn.Linear(64, 64)  # built while the main thread is inside deferred_init
        results["std"] = float(layer.weight.detach().std())
        release.set()

    t = threading.Thread(target=other)
    t.start()

    def build():
        started.set()
        release.wait(10)
        return nn.Linear(4, 4)

    with init.deferred_init(build, (nn.Linear,)) as net:
        init.default_init(net)
    t.join()
    assert results["std"] > 0.01  # initialised as usual in the other thread


def test_deferred_init_restores_normal_init_after_errors():
    def broken():
        raise ValueError("bad argument")

    with pytest.raises(ValueError, match="bad argument"):
        with init.deferred_init(broken, (nn.Conv2d,)):
            pass
    assert nn.Conv2d(3, 4, 3).weight.abs().sum() > 0


@pytest.mark.parametrize("arch", ["Unet", "FPN", "Linknet", "PSPNet", "DeepLabV3Plus", "MAnet", "PAN"])
def test_built_models_are_fully_initialised(arch):
    torch.manual_seed(0)
    model = getattr(smp, arch)("resnet18", encoder_weights=None, classes=3)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(t.float()).all(), name
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1), name
        if isinstance(m, nn.Conv2d) and m.weight.numel() > 1000:
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            expected = math.sqrt(2.0 / (fan_out if name.startswith("encoder") else fan_in))
            if name.startswith("segmentation_head"):
                expected = math.sqrt(2.0 / (fan_in + fan_out))
            assert abs(float(m.weight.std()) / expected - 1) < 0.15, name


def test_linknet_transposed_convs_keep_torch_default_init():
    model = smp.Linknet("resnet18", encoder_weights=None)
    deconv = next(m for m in model.decoder.modules() if isinstance(m, nn.ConvTranspose2d))
    bound = 1 / math.sqrt(deconv.weight.shape[1] * 16)  # torch: fan_in from dim 1 and the kernel
    assert float(deconv.weight.abs().max()) <= bound + 1e-6
    assert abs(float(deconv.weight.std()) / (bound / math.sqrt(3)) - 1) < 0.15


def test_same_seed_same_model_and_initialize_reinitialises_the_decoder():
    torch.manual_seed(3)
    a = smp.Unet("resnet18", encoder_weights=None)
    torch.manual_seed(3)
    b = smp.Unet("resnet18", encoder_weights=None)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    before = a.decoder.blocks[0].conv1[0].weight.clone()
    a.initialize()
    assert not torch.equal(before, a.decoder.blocks[0].conv1[0].weight)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet-b0"])
def test_encoder_families_initialise_like_their_libraries(name):
    torch.manual_seed(0)
    enc = get_encoder(name, weights=None)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 5000]
    for m in convs:
        w = m.weight
        if name == "mobilenet_v2":  # torchvision: He-normal, fan_out
            expected = math.sqrt(2.0 / (w.shape[0] * w[0, 0].numel()))
        else:  # efficientnet-pytorch keeps torch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            expected = 1 / math.sqrt(w[0].numel()) / math.sqrt(3)
        assert abs(float(w.std()) / expected - 1) < 0.15
        assert w.is_contiguous(memory_format=torch.channels_last)


class _WithDerivedBuffer(nn.Module):
    """A conv (in its state dict) and a non-persistent buffer set by ``nn.init`` (not in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.register_buffer("scale", nn.init.ones_(torch.empty(8)), persistent=False)


def test_skip_fills_draws_nothing_and_replays_what_the_load_does_not_cover():
    source = _WithDerivedBuffer().state_dict()
    rng = torch.get_rng_state()
    with init.skip_fills() as skipped:
        m = _WithDerivedBuffer()
        plan = init.InitPlan()
        plan.normal_(m.conv.weight, 0.0, 1.0)
        plan.run()
    assert torch.equal(torch.get_rng_state(), rng)  # neither nn.init nor the plan drew a value
    assert len(skipped) == 4  # conv weight + bias (nn.init), the buffer, the plan's fill
    m.load_state_dict(source, strict=True)
    skipped.run_uncovered(m)
    assert torch.equal(m.scale, torch.ones(8))  # replayed: the load does not hold it
    assert torch.equal(m.conv.weight, source["conv.weight"])  # not redrawn over the loaded values
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(skipped) == 0
    # Outside the context everything initialises as usual again.
    assert not torch.equal(nn.Conv2d(3, 8, 3).weight, nn.Conv2d(3, 8, 3).weight)


def test_skip_fills_inside_deferred_init_also_skips_the_replayed_calls():
    rng = torch.get_rng_state()
    with init.skip_fills() as skipped:
        with init.deferred_init(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)), (nn.Linear,)):
            pass  # nn.Linear is claimed but left alone; the conv's calls are replayed -> skipped
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(skipped) == 2


def test_drawn_fills_initialise_as_usual_inside_skip_fills():
    with init.skip_fills() as skipped:
        with init.drawn_fills():
            rng = torch.get_rng_state()
            conv = nn.Conv2d(3, 8, 3)
            assert not torch.equal(torch.get_rng_state(), rng)  # drawn at once
        nn.Conv2d(3, 8, 3)  # skipped again after the inner block
    assert len(skipped) == 2
    bound = 1 / math.sqrt(27)
    assert conv.weight.abs().max() <= bound and conv.weight.std() > bound / 4
