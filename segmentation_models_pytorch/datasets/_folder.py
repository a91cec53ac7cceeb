"""Your own data: a folder of images and same-named class-index masks."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class MaskFolderDataset(Dataset):
    """Images and masks from ``root/images/`` and ``root/masks/``, paired by file name stem.

    A mask is a single-channel image whose pixel values are class indices (``0`` = background, ``1``,
    ``2``...), e.g. an 8-bit PNG; ``cat.jpg`` pairs with ``cat.png``. Both are resized to
    ``image_size`` (bilinear for images, nearest for masks).

    Args:
        root: folder containing ``images/`` and ``masks/``.
        image_size: output height and width (``int``) or ``(height, width)``; ``None`` keeps the
            original size (all images must then share one size to be batched).
        names: optional subset of file stems to use (e.g. a train/validation split).

    Each item is a dict with ``"image"`` (``float32`` ``(3, H, W)`` in ``[0, 1]``) and ``"mask"``
    (``int64`` ``(H, W)``).
    """

    def __init__(
        self, root: str, image_size: Optional[int | Sequence[int]] = 64, names: Optional[Sequence[str]] = None
    ):
        self.root = os.fspath(root)
        self.image_dir = os.path.join(self.root, "images")
        self.mask_dir = os.path.join(self.root, "masks")
        if not (os.path.isdir(self.image_dir) and os.path.isdir(self.mask_dir)):
            raise FileNotFoundError(
                f"Expected '{self.image_dir}' and '{self.mask_dir}' folders: images in 'images/' and "
                "masks with the same file name stem (class indices as pixel values) in 'masks/'."
            )
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.images = _by_stem(self.image_dir)
        masks = _by_stem(self.mask_dir)
        stems = sorted(set(self.images) & set(masks))
        if names is not None:
            unknown = sorted(set(names) - set(stems))
            if unknown:
                raise ValueError(f"No image+mask pair for names {unknown[:5]} in {self.root!r}.")
            stems = list(names)
        if not stems:
            raise FileNotFoundError(
                f"No image/mask pairs found in {self.root!r} (matched by file name stem; image "
                f"extensions {IMAGE_EXTENSIONS})."
            )
        self.names: List[str] = stems
        self.masks = masks

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        from PIL import Image

        name = self.names[index]
        image = Image.open(self.images[name]).convert("RGB")
        mask = Image.open(self.masks[name])
        if mask.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(
                f"Mask {self.masks[name]!r} has mode {mask.mode!r}; masks must be single-channel images "
                "whose pixel values are class indices."
            )
        if self.image_size is not None:
            size = (self.image_size[1], self.image_size[0])  # PIL wants (width, height)
            image = image.resize(size, Image.BILINEAR)
            mask = mask.resize(size, Image.NEAREST)
        image_t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        mask_t = torch.from_numpy(np.asarray(mask).astype(np.int64))
        return {"image": image_t, "mask": mask_t}

    def count_classes(self) -> int:
        """Scan all masks and return ``max class index + 1`` (at least 2)."""
        from PIL import Image

        top = 0
        for name in self.names:
            top = max(top, int(np.asarray(Image.open(self.masks[name])).max()))
        return max(top + 1, 2)


def _by_stem(folder: str) -> Dict[str, str]:
    files = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(entry)
        if ext.lower() in IMAGE_EXTENSIONS:
            files.setdefault(stem, os.path.join(folder, entry))
    return files
