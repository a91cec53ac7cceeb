"""smp.datasets: the seeded synthetic dataset, the mask-folder dataset and offline-safe Oxford Pet."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.datasets import (
    MaskFolderDataset,
    OxfordPetDataset,
    SimpleOxfordPetDataset,
    SyntheticShapesDataset,
)

# ----------------------------------------------------------------------------------- synthetic


def test_synthetic_sample_format_and_determinism():
    ds = SyntheticShapesDataset(length=6, image_size=48, seed=3)
    assert len(ds) == 6 and ds.num_classes == 4
    sample = ds[2]
    assert sample["image"].shape == (3, 48, 48) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (48, 48) and sample["mask"].dtype == torch.int64
    assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    again = SyntheticShapesDataset(length=6, image_size=48, seed=3)[2]  # same (seed, index) -> same pixels
    assert torch.equal(sample["image"], again["image"]) and torch.equal(sample["mask"], again["mask"])
    assert torch.equal(ds[-1]["mask"], ds[5]["mask"])
    other = SyntheticShapesDataset(length=6, image_size=48, seed=4)[2]
    assert not torch.equal(sample["image"], other["image"])


def test_synthetic_dataset_covers_all_classes_with_varied_layouts():
    ds = SyntheticShapesDataset(length=40, image_size=64)
    masks = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    counts = torch.bincount(masks.flatten(), minlength=4)
    assert (counts > 0).all()  # background and every shape class occur
    fg = (masks > 0).float().mean((1, 2))
    assert 0.02 < fg.mean() < 0.6 and fg.std() > 0.02  # objects vary in size and number
    # Every shape class is drawn with many different colours: colour alone cannot give the class.
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    for label in (1, 2, 3):
        colours = torch.stack(
            [images[i][:, masks[i] == label].mean(1) for i in range(40) if (masks[i] == label).any()]
        )
        assert colours.std(0).mean() > 0.1


def test_synthetic_argument_errors():
    with pytest.raises(ValueError, match="image_size must be an int >= 8"):
        SyntheticShapesDataset(image_size=4)
    with pytest.raises(ValueError, match="length"):
        SyntheticShapesDataset(length=-1)
    with pytest.raises(ValueError, match="seed"):
        SyntheticShapesDataset(seed=-2)
    with pytest.raises(IndexError, match="out of range"):
        SyntheticShapesDataset(length=2)[2]


# ----------------------------------------------------------------------------------- folder


def _write_folder(root, n=3, size=(20, 30)):
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.jpg")
        Image.fromarray((np.arange(size[1])[None].repeat(size[0], 0) % (i + 2)).astype(np.uint8)).save(
            root / "masks" / f"s{i}.png"
        )


def test_mask_folder_dataset(tmp_path):
    _write_folder(tmp_path)
    ds = MaskFolderDataset(tmp_path, image_size=(16, 24))
    assert ds.names == ["s0", "s1", "s2"]
    sample = ds[1]
    assert sample["image"].shape == (3, 16, 24) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (16, 24) and sample["mask"].dtype == torch.int64
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2}
    assert ds.count_classes() == 4  # s2 holds labels 0..3
    assert len(MaskFolderDataset(tmp_path, image_size=None, names=["s2"])) == 1
    with pytest.raises(ValueError, match="No image\\+mask pair"):
        MaskFolderDataset(tmp_path, names=["nope"])


def test_mask_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images"):
        MaskFolderDataset(tmp_path)
    os.makedirs(tmp_path / "images")
    os.makedirs(tmp_path / "masks")
    with pytest.raises(FileNotFoundError, match="No image/mask pairs"):
        MaskFolderDataset(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match="single-channel"):
        MaskFolderDataset(tmp_path)[0]


# ----------------------------------------------------------------------------------- oxford pet


def _write_oxford(root, names=("cat_1", "dog_2", "cat_3")):
    os.makedirs(root / "images")
    os.makedirs(root / "annotations" / "trimaps")
    for name in names:
        Image.new("RGB", (40, 30), (10, 20, 30)).save(root / "images" / f"{name}.jpg")
        trimap = np.full((30, 40), 2, dtype=np.uint8)
        trimap[5:15, 5:15] = 1
        trimap[15:17, 5:15] = 3
        Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
    lines = "\n".join(f"{n} 1 1 1" for n in names)
    (root / "annotations" / "trainval.txt").write_text(lines + "\n")
    (root / "annotations" / "test.txt").write_text(lines + "\n")


def test_oxford_pet_reads_local_folder(tmp_path):
    _write_oxford(tmp_path)
    assert OxfordPetDataset(tmp_path, "train").filenames == ["dog_2", "cat_3"]  # 90%: i % 10 != 0
    assert OxfordPetDataset(tmp_path, "valid").filenames == ["cat_1"]
    assert len(OxfordPetDataset(tmp_path, "test")) == 3
    sample = OxfordPetDataset(tmp_path, "test")[0]
    assert sample["image"].shape == (30, 40, 3)
    assert sample["mask"].dtype == np.float32 and sample["mask"].sum() == 120  # pet (100) + border (20)
    simple = SimpleOxfordPetDataset(tmp_path, "test")[0]
    assert simple["image"].shape == (3, 256, 256) and simple["mask"].shape == (1, 256, 256)
    seen = {}
    OxfordPetDataset(tmp_path, "test", transform=lambda **s: seen.update(s) or s)[0]
    assert set(seen) == {"image", "mask", "trimap"}


def test_oxford_pet_missing_data_and_bad_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="OxfordPetDataset.download"):
        OxfordPetDataset(tmp_path)
    with pytest.raises(ValueError, match="mode must be one of"):
        OxfordPetDataset(tmp_path, mode="val")


def test_oxford_pet_download_is_offline_safe(tmp_path):
    # Nothing local and no network (the suite blocks it): a clear error naming what to fetch.
    with pytest.raises(RuntimeError, match="Could not download .*images.tar.gz"):
        OxfordPetDataset.download(tmp_path)
    assert not any(p.suffix == ".part" for p in tmp_path.iterdir())  # no half-written archive left behind
    # Extracted folders already there: nothing to download.
    _write_oxford(tmp_path / "ready")
    OxfordPetDataset.download(tmp_path / "ready")
    # Archives placed by hand are extracted without any download.
    src = tmp_path / "src"
    _write_oxford(src)
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("images", "annotations"):
        with tarfile.open(manual / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(src / name, arcname=name)
    OxfordPetDataset.download(manual)
    assert len(OxfordPetDataset(manual, "test")) == 3


def test_lazy_submodule():
    assert smp.datasets.SyntheticShapesDataset is SyntheticShapesDataset
