"""Data: the embedded MNIST default, data-set layouts, splits, the prepared index and loading."""
from kdlib.data.dataset import IndexedImageDataset, load_image
from kdlib.data.index import DatasetIndex, DatasetMeta, Record, build_manifest, read_index, write_index
from kdlib.data.layouts import LAYOUTS, LayoutScan, ScannedImage
from kdlib.data.transforms import TRAIN_PRESETS, Augmentation, BatchNormalizer, RandomShift, build_transforms

__all__ = [
    "LAYOUTS", "TRAIN_PRESETS", "Augmentation", "BatchNormalizer", "RandomShift", "DatasetIndex", "DatasetMeta", "IndexedImageDataset",
    "LayoutScan", "Record", "ScannedImage", "build_manifest", "build_transforms", "load_image",
    "read_index", "write_index",
]
