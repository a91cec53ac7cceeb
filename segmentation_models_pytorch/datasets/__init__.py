"""Datasets: a seeded synthetic shapes dataset (no download), a folder of your own images and masks,
and SMP 0.6.0's Oxford-IIIT Pet dataset (downloads only on request, clear error when offline)."""

from ._folder import MaskFolderDataset
from ._oxford_pet import OxfordPetDataset, SimpleOxfordPetDataset
from ._synthetic import SyntheticShapesDataset

__all__ = ["OxfordPetDataset", "SimpleOxfordPetDataset", "SyntheticShapesDataset", "MaskFolderDataset"]
