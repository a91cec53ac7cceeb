"""A synthetic, seeded segmentation dataset: textured shapes on textured backgrounds.

Every sample is a pure function of ``(seed, index)``, so the data needs no download, is identical on
every machine and in every DataLoader worker or DDP rank, and can be regenerated at will.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES: Tuple[str, ...] = ("background", "circle", "rectangle", "triangle")


class SyntheticShapesDataset(Dataset):
    """Images of circles, rectangles and triangles with a per-pixel class mask.

    Shapes (1 to ``max_objects`` per image) have random size, position, rotation and colour, and may
    occlude one another; the background is a colour gradient with a low-frequency wave pattern, and
    sensor-like noise is added on top. Like real object classes, each class has a typical surface
    texture (circles are mostly flat, rectangles mostly striped, triangles mostly checkered) but
    every texture occurs in every class, and colour says nothing about the class: a model has to
    combine texture and shape.

    Args:
        length: number of samples.
        image_size: height and width of the square images.
        seed: base seed; sample ``i`` depends only on ``(seed, i)``.
        max_objects: largest number of shapes in one image (at least 1).
        noise: standard deviation of the additive Gaussian pixel noise (images are in ``[0, 1]``).

    Each item is a dict with ``"image"`` (``float32`` tensor ``(3, H, W)`` in ``[0, 1]``) and
    ``"mask"`` (``int64`` tensor ``(H, W)`` of class indices into :attr:`classes`).

    Example:
        >>> ds = SyntheticShapesDataset(length=8, image_size=64)
        >>> ds[0]["image"].shape, ds[0]["mask"].shape
        (torch.Size([3, 64, 64]), torch.Size([64, 64]))
    """

    classes: Tuple[str, ...] = CLASSES

    def __init__(
        self,
        length: int = 512,
        image_size: int = 64,
        seed: int = 0,
        max_objects: int = 4,
        noise: float = 0.04,
    ) -> None:
        for name, value, low in (
            ("length", length, 0),
            ("image_size", image_size, 8),
            ("max_objects", max_objects, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        if not isinstance(noise, (int, float)) or noise < 0:
            raise ValueError(f"noise must be a non-negative number, got {noise!r}.")
        self.length = length
        self.image_size = image_size
        self.seed = seed
        self.max_objects = max_objects
        self.noise = float(noise)

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}.")
        image, mask = render_sample(self.seed, index, self.image_size, self.max_objects, self.noise)
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)}


# ---------------------------------------------------------------------------------------------- drawing


def render_sample(seed: int, index: int, size: int, max_objects: int = 4, noise: float = 0.04):
    """Draw sample ``index`` of the dataset seeded with ``seed``.

    Returns:
        ``(image, mask)``: ``float32`` array ``(3, size, size)`` in ``[0, 1]`` and ``int64`` array
        ``(size, size)``.
    """
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = _background(rng, xx, yy, size)
    mask = np.zeros((size, size), dtype=np.int64)
    background_colour = image.reshape(3, -1).mean(axis=1)

    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(1, len(CLASSES)))
        region = _shape_region(rng, label, xx, yy, size)
        if not region.any():
            continue
        colour = _contrasting_colour(rng, background_colour)
        image[:, region] = (colour[:, None, None] * _texture(rng, label, xx, yy))[:, region]
        mask[region] = label

    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """A colour gradient in a random direction plus a faint low-frequency wave."""
    start, end = rng.uniform(0.1, 0.9, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5
    t = np.clip(t, 0, 1)
    image = start[:, None, None] * (1 - t) + end[:, None, None] * t
    freq = rng.uniform(1.0, 3.0) * 2 * np.pi / size
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.08 * np.sin(freq * (xx * np.cos(angle + 1) + yy * np.sin(angle + 1)) + phase)
    return (image + wave[None]).astype(np.float32)


def _shape_region(
    rng: np.random.Generator, label: int, xx: np.ndarray, yy: np.ndarray, size: int
) -> np.ndarray:
    """Boolean mask of one circle (1), rotated rectangle (2) or triangle (3)."""
    radius = rng.uniform(0.09, 0.24) * size
    cx, cy = rng.uniform(0.15 * size, 0.85 * size, size=2)
    dx, dy = xx - cx, yy - cy
    if label == 1:
        return dx**2 + dy**2 <= radius**2
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    if label == 2:
        aspect = rng.uniform(0.45, 1.0)
        return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
    # Triangle: three vertices around the centre, jittered so not all triangles are equilateral.
    thetas = angle + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, size=3)
    px, py = cx + radius * 1.2 * np.cos(thetas), cy + radius * 1.2 * np.sin(thetas)
    inside = np.ones_like(xx, dtype=bool)
    for i in range(3):
        j = (i + 1) % 3
        # Same side of edge (i -> j) as the opposite vertex k.
        k = (i + 2) % 3
        edge = lambda x, y, i=i, j=j: (px[j] - px[i]) * (y - py[i]) - (py[j] - py[i]) * (x - px[i])  # noqa: E731
        inside &= edge(xx, yy) * edge(px[k], py[k]) >= 0
    return inside


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour far enough from the mean background colour to be visible."""
    colour = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
    for _ in range(20):
        if np.abs(colour - background).sum() > 0.6:
            break
        colour = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
    return colour


# Probability of each texture (flat, stripes, checkerboard, speckle) for classes 1, 2, 3.
_TEXTURE_PROBS = {1: (0.7, 0.1, 0.1, 0.1), 2: (0.1, 0.7, 0.1, 0.1), 3: (0.1, 0.1, 0.7, 0.1)}


def _texture(rng: np.random.Generator, label: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A multiplicative pattern in about ``[0.6, 1.2]``: flat, stripes, checkerboard or speckle."""
    kind = int(rng.choice(4, p=_TEXTURE_PROBS[label]))
    if kind == 0:
        return np.ones_like(xx)
    if kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 8.0)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
        return 0.9 + 0.25 * np.sin(phase)
    if kind == 2:
        cell = int(rng.integers(2, 6))
        return np.where(((xx // cell) + (yy // cell)) % 2 == 0, 1.15, 0.7).astype(np.float32)
    return (0.9 + 0.2 * rng.standard_normal(xx.shape)).astype(np.float32)
