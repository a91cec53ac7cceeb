from .heads import ClassificationHead, SegmentationHead
from .model import SegmentationModel
from . import modules

__all__ = ["SegmentationModel", "SegmentationHead", "ClassificationHead", "modules"]
