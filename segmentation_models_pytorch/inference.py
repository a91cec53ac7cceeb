"""Sliding-window inference: predict images larger than the model (or the GPU) can take at once.

The image is cut into overlapping windows, the windows are run through the model in batches, and the
window predictions are blended back into one full-size map (weighted by a Gaussian that trusts
window centres more than their borders, or uniformly). Only one batch of windows lives on the
model's device at a time; the full-size result is accumulated on the image's device.

Example:
    >>> model = smp.Unet("resnet18", encoder_weights=None, classes=3).eval()
    >>> image = torch.rand(3, 1000, 1500)  # CHW, stays on the CPU
    >>> logits = smp.inference.sliding_window(model, image, window=256, overlap=0.25, batch_size=8)
    >>> logits.shape
    torch.Size([3, 1000, 1500])
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sliding_window", "window_weights"]

_BLENDS = ("gaussian", "constant")
_PAD_MODES = ("reflect", "replicate", "constant")


def _pair(name: str, value: Any) -> Tuple[int, int]:
    items = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(items, Sequence)
        or len(items) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items)
    ):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of them, got {value!r}.")
    return int(items[0]), int(items[1])


def _overlap_pair(value: Any) -> Tuple[float, float]:
    items = (value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    ok = isinstance(items, Sequence) and len(items) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in items)
    if not ok:
        raise ValueError(
            f"overlap must be a fraction of the window in [0, 1) (e.g. 0.25), or a (height, width) pair of "
            f"them, got {value!r}."
        )
    return float(items[0]), float(items[1])


def _starts(size: int, window: int, stride: int) -> List[int]:
    """Window offsets covering ``[0, size)``; the last window is aligned to the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


def window_weights(
    window: Union[int, Tuple[int, int]], blend: str = "gaussian", sigma_scale: float = 0.125
) -> torch.Tensor:
    """Blending weights of one window, shape ``(height, width)``, maximum 1.

    Args:
        window: window size, ``int`` or ``(height, width)``.
        blend: ``"gaussian"`` (centre pixels count most; hides seams between windows) or
            ``"constant"`` (plain average of overlapping windows).
        sigma_scale: Gaussian standard deviation as a fraction of the window size.
    """
    wh, ww = _pair("window", window)
    if blend not in _BLENDS:
        raise ValueError(f"blend must be one of {_BLENDS}, got {blend!r}.")
    if blend == "constant":
        return torch.ones(wh, ww)
    if not (isinstance(sigma_scale, (int, float)) and sigma_scale > 0):
        raise ValueError(f"sigma_scale must be a positive number, got {sigma_scale!r}.")

    def gauss(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (sigma_scale * n)) ** 2)

    weights = torch.outer(gauss(wh), gauss(ww))
    # Keep border weights positive: where only one window covers a pixel, its prediction must count.
    return (weights / weights.max()).clamp_min(1e-4).float()


def _parameters(model: Callable[..., Any]) -> List[torch.Tensor]:
    return list(model.parameters()) if isinstance(model, nn.Module) else []


def _default_device(model: Callable[..., Any], image: torch.Tensor) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return image.device


def sliding_window(
    model: Callable[[torch.Tensor], Any],
    image: torch.Tensor,
    window: Union[int, Tuple[int, int]],
    overlap: Union[float, Tuple[float, float]] = 0.25,
    batch_size: int = 4,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    pad_mode: str = "reflect",
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``model`` over ``image`` window by window and blend the outputs into full-size logits.

    Args:
        model: a module or function mapping ``(B, C_in, h, w)`` to ``(B, C_out, h, w)`` (a
            ``(masks, labels)`` tuple, as models with ``aux_params`` return, is reduced to ``masks``).
            An ``nn.Module`` is run in eval mode without gradients; its previous train/eval mode is
            restored afterwards.
        image: ``(C_in, H, W)`` or ``(N, C_in, H, W)`` tensor, on any device (it can stay on the CPU
            while the model runs on a GPU).
        window: window size, ``int`` or ``(height, width)``; for SMP models a multiple of
            ``model.input_divisor`` (usually 32) avoids internal padding.
        overlap: fraction of the window shared by neighbouring windows, in ``[0, 1)``, or a
            ``(height, width)`` pair. More overlap means smoother seams and more model calls.
        batch_size: windows per model call.
        blend: ``"gaussian"`` or ``"constant"``, see :func:`window_weights`.
        sigma_scale: Gaussian standard deviation as a fraction of the window (``blend="gaussian"``).
        pad_mode: how images smaller than the window are padded up to it: ``"reflect"`` (falls back
            to ``"replicate"`` when the image is too small to reflect), ``"replicate"`` or
            ``"constant"`` (zeros). The padding is cropped from the result.
        device: where the model runs; defaults to the device of the model's parameters (for a plain
            function, the image's device).
        progress: show a tqdm progress bar over batches.

    Returns:
        ``float32`` logits (accumulated in ``float32`` whatever the model's dtype) of shape
        ``(C_out, H, W)`` or ``(N, C_out, H, W)`` (matching ``image``), on ``image``'s device.

    Raises:
        TypeError: ``image`` is not a tensor or ``model`` is not callable.
        ValueError: a bad argument, or a model whose output is not ``(B, C_out, h, w)`` at the window's
            resolution.
    """
    if not callable(model):
        raise TypeError(f"model must be a callable (e.g. an nn.Module), got {type(model).__name__}.")
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"image must be a torch.Tensor of shape (C, H, W) or (N, C, H, W), got {type(image)}."
        )
    if image.dim() not in (3, 4) or image.numel() == 0:
        raise ValueError(
            f"image must be a non-empty (C, H, W) or (N, C, H, W) tensor, got shape {tuple(image.shape)}."
        )
    wh, ww = _pair("window", window)
    oh, ow = _overlap_pair(overlap)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}.")
    weights = window_weights((wh, ww), blend, sigma_scale)

    unbatched = image.dim() == 3
    batch = image.unsqueeze(0) if unbatched else image
    n, _, h, w = batch.shape
    run_device = torch.device(device) if device is not None else _default_device(model, image)
    # Windows are cast to the model's floating dtype (e.g. a half-precision model, float32 image).
    run_dtype = next((p.dtype for p in _parameters(model) if p.is_floating_point()), None)
    out_device = image.device

    # Pad images smaller than the window (bottom/right) so that every window is full-size.
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    if ph or pw:
        mode = pad_mode
        if mode == "reflect" and (ph >= h or pw >= w):
            mode = "replicate"  # reflection needs more pixels than it pads
        padded = F.pad(batch.float() if not batch.is_floating_point() else batch, (0, pw, 0, ph), mode=mode)
        batch = padded.to(image.dtype)
    hp, wp = batch.shape[-2:]

    stride_h, stride_w = max(1, wh - round(wh * oh)), max(1, ww - round(ww * ow))
    ys, xs = _starts(hp, wh, stride_h), _starts(wp, ww, stride_w)
    positions = [(i, y, x) for i in range(n) for y in ys for x in xs]

    norm = torch.zeros(hp, wp, device=out_device)
    weights_out = weights.to(out_device)
    for y in ys:
        for x in xs:
            norm[y : y + wh, x : x + ww] += weights_out

    is_module = isinstance(model, nn.Module)
    was_training = is_module and model.training  # type: ignore[union-attr]
    if was_training:
        model.eval()  # type: ignore[union-attr]
    output: Optional[torch.Tensor] = None
    chunks = range(0, len(positions), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="sliding window", unit="batch")
    try:
        with torch.no_grad():
            for start in chunks:
                chunk = positions[start : start + batch_size]
                crops = torch.stack([batch[i, :, y : y + wh, x : x + ww] for i, y, x in chunk])
                crops = crops.to(run_device, dtype=run_dtype if crops.is_floating_point() else None)
                pred = model(crops)
                if isinstance(pred, (tuple, list)):
                    pred = pred[0]
                if not isinstance(pred, torch.Tensor) or pred.dim() != 4 or pred.shape[0] != len(chunk):
                    shape = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
                    raise ValueError(
                        f"The model must return a (B, C, H, W) tensor for a batch of {len(chunk)} windows, "
                        f"got {shape}."
                    )
                if tuple(pred.shape[-2:]) != (wh, ww):
                    raise ValueError(
                        f"The model returned maps of size {tuple(pred.shape[-2:])} for {wh}x{ww} windows; "
                        "sliding_window needs outputs at the input resolution (upsample inside the model)."
                    )
                if output is None:
                    output = torch.zeros(n, pred.shape[1], hp, wp, device=out_device)
                pred = pred.to(out_device, torch.float32) * weights_out
                for k, (i, y, x) in enumerate(chunk):
                    output[i, :, y : y + wh, x : x + ww] += pred[k]
    finally:
        if was_training:
            model.train()  # type: ignore[union-attr]

    assert output is not None  # there is always at least one window
    output = (output / norm)[..., :h, :w]
    return output[0] if unbatched else output
