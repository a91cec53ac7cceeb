"""The default models on a CUDA device: channels_last inside, AMP, the fast path and compile.

Skipped without a GPU (CI has none); ``benchmarks/gpu_check.sh`` runs this file on a lent GPU
machine. TF32 is switched off where outputs are compared with a 1e-4 tolerance: with it, cuDNN
rounds convolution inputs to 10-bit mantissas, and layouts that pick other kernels differ by ~1e-3.
"""

from __future__ import annotations

import copy

import pytest
import torch

import segmentation_models_pytorch as smp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ARCHS = ["Unet", "FPN", "DeepLabV3Plus"]


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.create_model(arch, encoder_name="resnet18", encoder_weights=None, classes=3).cuda()


def _train_without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode with dropout off: its masks are drawn in memory order, so they differ between
    layouts, and they make a few-step loss curve noisy."""
    model.train()
    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
            m.eval()
    return model


def _nchw_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights computed in NCHW, as SMP does."""
    twin = copy.deepcopy(model)
    twin.channels_last = False
    return twin.to(memory_format=torch.contiguous_format)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_model_matches_its_nchw_computation_in_eval_and_training(arch, no_tf32):
    model = _build(arch)
    twin = _nchw_twin(model)
    x = torch.randn(2, 3, 128, 128, device="cuda")
    with torch.no_grad():
        y, ref = model.eval()(x), twin.eval()(x)
    assert y.is_contiguous() and _rel(y, ref) < 1e-4
    y, ref = _train_without_dropout(model)(x), _train_without_dropout(twin)(x)
    assert _rel(y, ref) < 1e-4
    y.square().mean().backward()
    ref.square().mean().backward()
    # Loose: through batch statistics of a small batch, float rounding of the two layouts moves
    # the deepest gradients by up to ~1e-2 (the same on the CPU; see docs/performance.md).
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and p.grad.norm() > 0, name
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 3e-2, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_amp_training_steps_reduce_the_loss(arch, dtype):
    model = _train_without_dropout(_build(arch))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    target = (x.mean(1) > 0).long()  # a learnable per-pixel target
    losses = []
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
        assert logits.dtype == dtype and logits.is_contiguous()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_on_cuda_keeps_outputs(arch, no_tf32):
    model = _build(arch).eval()
    x = torch.randn(2, 3, 128, 128, device="cuda")
    with torch.no_grad():
        expected = model(x)
        fast = smp.optimize_for_inference(model)
        assert next(fast.parameters()).is_cuda
        assert _rel(fast(x), expected) < 1e-4
        fast_bf16 = smp.optimize_for_inference(model, dtype=torch.bfloat16)
        y = fast_bf16(x)
    assert y.dtype == expected.dtype and _rel(y, expected) < 5e-2


def test_compiled_model_matches_eager_on_cuda(no_tf32):
    model = _build("Unet").eval()
    x = torch.randn(2, 3, 128, 128, device="cuda")
    compiled = torch.compile(model)
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 1e-4
