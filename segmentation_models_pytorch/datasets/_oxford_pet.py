"""The Oxford-IIIT Pet dataset (foreground/background masks), as in SMP 0.6.0, but offline-safe.

``OxfordPetDataset(root)`` reads an already-extracted copy; ``OxfordPetDataset.download(root)`` fetches
the two archives only when they are not there yet, and without network access it fails with a message
saying which files to put where instead of a bare ``URLError``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

_ARCHIVES = {
    "images": "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
    "annotations": "https://www.robots.ox.ac.uk/~vgg/data/pets/data/annotations.tar.gz",
}
_MODES = ("train", "valid", "test")


def _layout_help(root: str) -> str:
    return (
        f"Expected the extracted Oxford-IIIT Pet dataset under {root!r}: "
        "'images/<name>.jpg', 'annotations/trimaps/<name>.png', 'annotations/trainval.txt' and "
        "'annotations/test.txt'. Run OxfordPetDataset.download(root) with network access, or download "
        f"{_ARCHIVES['images']} and {_ARCHIVES['annotations']} yourself and extract both into root."
    )


class OxfordPetDataset(torch.utils.data.Dataset):
    """Oxford-IIIT Pet images with binary pet masks (SMP 0.6.0's class and signature).

    Args:
        root: folder holding ``images/`` and ``annotations/`` (see :meth:`download`).
        mode: ``"train"`` (90% of ``trainval.txt``), ``"valid"`` (the other 10%) or ``"test"``.
        transform: optional callable applied as ``transform(image=..., mask=..., trimap=...)`` (the
            albumentations convention); it must return the sample dict.

    Each item is a dict with ``"image"`` (``uint8`` array ``(H, W, 3)``), ``"mask"`` (``float32`` array
    ``(H, W)``: 1 for pet and pet border, 0 for background) and ``"trimap"`` (the raw annotation).
    """

    def __init__(
        self, root: str, mode: str = "train", transform: Optional[Callable[..., Any]] = None
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        self.root = os.fspath(root)
        self.mode = mode
        self.transform = transform
        self.images_directory = os.path.join(self.root, "images")
        self.masks_directory = os.path.join(self.root, "annotations", "trimaps")
        self.filenames = self._read_split()

    def __len__(self) -> int:
        return len(self.filenames)

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        from PIL import Image

        filename = self.filenames[idx]
        image = np.array(Image.open(os.path.join(self.images_directory, filename + ".jpg")).convert("RGB"))
        trimap = np.array(Image.open(os.path.join(self.masks_directory, filename + ".png")))
        sample = {"image": image, "mask": self._preprocess_mask(trimap), "trimap": trimap}
        if self.transform is not None:
            sample = self.transform(**sample)
        return sample

    @staticmethod
    def _preprocess_mask(mask: np.ndarray) -> np.ndarray:
        # Trimap values: 1 = pet, 2 = background, 3 = border (counted as pet).
        mask = mask.astype(np.float32)
        return np.isin(mask, (1.0, 3.0)).astype(np.float32)

    def _read_split(self) -> List[str]:
        split = os.path.join(self.root, "annotations", "test.txt" if self.mode == "test" else "trainval.txt")
        if not os.path.isfile(split) or not os.path.isdir(self.images_directory):
            raise FileNotFoundError(f"Oxford-IIIT Pet dataset not found. {_layout_help(self.root)}")
        with open(split) as f:
            names = [line.split(" ")[0] for line in f.read().strip("\n").split("\n") if line.strip()]
        if self.mode == "train":
            return [x for i, x in enumerate(names) if i % 10 != 0]
        if self.mode == "valid":
            return [x for i, x in enumerate(names) if i % 10 == 0]
        return names

    @staticmethod
    def download(root: str) -> None:
        """Download and extract the dataset into ``root``, skipping whatever is already there.

        An existing ``images/`` or ``annotations/`` folder (or its ``.tar.gz``) is reused, so this is
        a no-op offline once the data is in place.

        Raises:
            RuntimeError: an archive is missing and could not be downloaded (the message lists the
                URLs to fetch manually).
        """
        root = os.fspath(root)
        os.makedirs(root, exist_ok=True)
        for name, url in _ARCHIVES.items():
            if os.path.isdir(os.path.join(root, name)):
                continue
            archive = os.path.join(root, f"{name}.tar.gz")
            if not os.path.isfile(archive):
                download_url(url, archive)
            extract_archive(archive)


class SimpleOxfordPetDataset(OxfordPetDataset):
    """:class:`OxfordPetDataset` resized to 256x256 and laid out channels-first.

    Items hold ``"image"`` ``(3, 256, 256)`` ``uint8``, ``"mask"`` and ``"trimap"`` ``(1, 256, 256)``.
    """

    def __getitem__(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        from PIL import Image

        sample = super().__getitem__(*args, **kwargs)
        image = np.array(Image.fromarray(sample["image"]).resize((256, 256), Image.BILINEAR))
        mask = np.array(Image.fromarray(sample["mask"]).resize((256, 256), Image.NEAREST))
        trimap = np.array(Image.fromarray(sample["trimap"]).resize((256, 256), Image.NEAREST))
        sample["image"] = np.moveaxis(image, -1, 0)
        sample["mask"] = np.expand_dims(mask, 0)
        sample["trimap"] = np.expand_dims(trimap, 0)
        return sample


def download_url(url: str, filepath: str) -> None:
    """Download ``url`` to ``filepath`` (skipped if it exists) with a progress bar.

    The file is written under a temporary name and renamed when complete, so an interrupted download
    never looks finished.
    """
    from urllib.request import urlretrieve

    from tqdm import tqdm

    if os.path.exists(filepath):
        return
    directory = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(directory, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".part")
    os.close(fd)
    try:
        with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(filepath)) as bar:

            def hook(blocks: int, block_size: int, total: int) -> None:
                if total > 0:
                    bar.total = total
                bar.update(blocks * block_size - bar.n)

            urlretrieve(url, filename=partial, reporthook=hook)
        os.replace(partial, filepath)
    except Exception as err:  # URLError, socket errors, offline guards...
        raise RuntimeError(
            f"Could not download {url} ({type(err).__name__}: {err}). Without network access, fetch it "
            f"elsewhere and place it at {filepath!r} (or extract it next to it); "
            "OxfordPetDataset.download() then skips the download."
        ) from err
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def extract_archive(filepath: str) -> None:
    """Extract a ``.tar.gz`` next to itself unless its folder already exists."""
    extract_dir = os.path.dirname(os.path.abspath(filepath))
    target = os.path.join(extract_dir, os.path.basename(filepath).split(".")[0])
    if not os.path.exists(target):
        shutil.unpack_archive(filepath, extract_dir)
