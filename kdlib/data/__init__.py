"""Data: the embedded MNIST default, data-set layouts, splits, the prepared index and loading."""
from kdlib.data.dataset import IndexedImageDataset, load_image
from kdlib.data.decode import decode_at_short_side, decode_image, decode_jpeg_views, draft_scale, fit_short_side
from kdlib.data.index import DatasetIndex, DatasetMeta, Record, build_manifest, read_index, write_index
from kdlib.data.layouts import LAYOUTS, LayoutScan, ScannedImage
from kdlib.data.pixel_cache import PixelCache, PixelCacheError, open_or_build
from kdlib.data.transforms import TRAIN_PRESETS, Augmentation, BatchNormalizer, RandomShift, build_transforms

__all__ = [
    "LAYOUTS", "TRAIN_PRESETS", "Augmentation", "BatchNormalizer", "RandomShift", "DatasetIndex", "DatasetMeta", "IndexedImageDataset",
    "LayoutScan", "PixelCache", "PixelCacheError", "Record", "ScannedImage", "build_manifest", "build_transforms",
    "decode_at_short_side", "decode_image", "decode_jpeg_views", "draft_scale", "fit_short_side", "load_image",
    "open_or_build", "read_index", "write_index",
]
