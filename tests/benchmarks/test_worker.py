"""The benchmark worker's allocator-independent memory measurement (benchmarks/_worker.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

WORKER = Path(__file__).resolve().parents[2] / "benchmarks" / "_worker.py"
_spec = importlib.util.spec_from_file_location("_bench_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

MB = 2**20


def test_peak_tensor_memory_is_the_most_alive_at_once_not_the_sum():
    def step():
        a = torch.ones(4 * MB // 4)  # 4 MB
        del a
        b = torch.ones(3 * MB // 4)  # reuses nothing of a's accounting: 3 MB alive, never 7
        c = torch.ones(2 * MB // 4)  # 5 MB alive at once
        return b.sum() + c.sum()

    peak = worker._peak_tensor_mb(step, [], torch.device("cpu"))
    assert 5.0 <= peak < 5.5


def test_tensors_alive_before_the_step_count_once_per_storage():
    weight = torch.zeros(MB // 4)  # 1 MB
    view = weight[:10]  # same storage: not counted twice
    peak = worker._peak_tensor_mb(lambda: torch.ones(2 * MB // 4).sum(), [weight, view], torch.device("cpu"))
    assert 3.0 <= peak < 3.5


def test_autograd_activations_are_counted():
    x = torch.randn(1, 8, 128, 128, requires_grad=True)  # 0.5 MB
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def step():  # four saved 0.5 MB activations alive before backward frees them
        y = x
        for _ in range(4):
            y = torch.relu(conv(y))
        y.sum().backward()

    peak = worker._peak_tensor_mb(step, [x], torch.device("cpu"))
    assert peak >= 0.5 + 4 * 0.5


def _throughput_args(**kw):
    import argparse

    base = dict(size=64, batch=2, modes="eager,amp", amp_dtype="bfloat16", iters=1, reps=1, warmup=1)
    base.update(kw)
    return argparse.Namespace(**base)


def _build():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=2)


def test_throughput_reports_images_per_second_for_each_mode_and_phase():
    out = {}
    worker._throughput(torch, _build, _throughput_args(), torch.device("cpu"), lambda: None, out)
    for mode in ("eager", "amp"):
        for phase in ("eval", "train"):
            assert out[f"{mode}_{phase}_ips"] > 0
            assert out[f"{mode}_{phase}_warmup_s"] > 0


def test_throughput_rejects_unknown_modes():
    import pytest

    with pytest.raises(SystemExit, match="eager, amp or compile"):
        args = _throughput_args(modes="fast")
        worker._throughput(torch, _build, args, torch.device("cpu"), lambda: None, {})


def test_hf_weights_make_the_default_pretrained_build_work_offline(tmp_path, monkeypatch):
    """The bench's stand-in weights land where `smp.Unet(name)` (encoder_weights="imagenet") looks."""
    from safetensors.torch import load_file

    import segmentation_models_pytorch as smp

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path), raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    worker._write_hf_weights(torch, smp, "resnet18")
    [path] = tmp_path.glob("models--smp-hub--resnet18.imagenet/snapshots/*/model.safetensors")
    written = load_file(str(path))
    model = smp.Unet("resnet18", classes=2)
    state = model.encoder.state_dict()
    assert state.keys() == written.keys()
    assert all(torch.equal(state[k], v) for k, v in written.items())
