"""Input normalisation matching the statistics an encoder's weights were trained with."""

from __future__ import annotations

from typing import Any, Optional, Sequence


def preprocess_input(
    x: Any,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    input_space: str = "RGB",
    input_range: Optional[Sequence[float]] = None,
    **kwargs: Any,
) -> Any:
    """Normalise an image batch.

    Accepts a numpy array with channels last (``HWC`` / ``NHWC``, as SMP does) or a torch tensor with
    channels first (``CHW`` / ``NCHW``). Steps: optional RGB->BGR flip, scaling from [0, 255] to
    [0, 1] when the weights expect [0, 1] and the data exceeds 1, then ``(x - mean) / std``.
    """
    import torch

    is_torch = isinstance(x, torch.Tensor)
    if is_torch:
        channel_dim = 1 if x.dim() == 4 else 0
        if not x.is_floating_point():
            x = x.float()
    else:
        import numpy as np

        x = np.asarray(x)
        channel_dim = x.ndim - 1
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)

    if input_space == "BGR":
        x = x.flip(channel_dim) if is_torch else x[..., ::-1].copy()
    if input_range is not None and input_range[1] == 1 and float(x.max()) > 1:
        x = x / 255.0

    def shaped(values: Sequence[float]):
        if is_torch:
            view = [1] * x.dim()
            view[channel_dim] = -1
            return torch.as_tensor(values, dtype=x.dtype, device=x.device).view(view)
        import numpy as np

        return np.asarray(values, dtype=x.dtype)

    if mean is not None:
        x = x - shaped(mean)
    if std is not None:
        x = x / shaped(std)
    return x
