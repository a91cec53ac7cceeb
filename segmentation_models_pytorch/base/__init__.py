from . import modules
from .heads import ClassificationHead, SegmentationHead
from .model import SegmentationModel
from .modules import Attention, Conv2dReLU

__all__ = [
    "SegmentationModel",
    "SegmentationHead",
    "ClassificationHead",
    "Conv2dReLU",
    "Attention",
    "modules",
]
