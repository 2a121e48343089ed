"""CUB-200-2011 + Stanford Dogs merged into one 320-class data set (``cub_dogs``), as the
DeiT+ConvNeXt FGVC project's CUB_DOG.

``root`` is the CUB-200-2011 root (read by the ``cub200`` layout) and the required option
``dogs_root`` the Stanford Dogs root (read by the ``stanford_dogs`` layout); see those modules
for the files each needs. Classes 0..199 are CUB's, named ``cub/<name>``
(``cub/001.Black_footed_Albatross``); classes 200..319 are Dogs', offset by 200 and named
``dogs/<name>`` (``dogs/n02085620-Chihuahua``). Each part keeps its own official split, so the
real merged set has 5,994 + 12,000 = 17,994 train and 5,794 + 8,580 = 14,374 test images.
CUB images come first, then Dogs, each in its own layout's order.

The two roots can be anywhere, so the scan is rooted at their deepest common parent directory
(after resolving both to absolute paths; ``/`` in the worst case) and each image path is
prefixed with its data set root's path relative to that parent. For
``/data/CUB_200_2011`` and ``/data/dogs`` the scan root is ``/data`` and paths read
``CUB_200_2011/images/...`` and ``dogs/Images/...``.

Source-project behaviour replaced: that project passed both roots in one ``--data-path`` string
separated by a space (so neither root could contain a space) and needed the Dogs root to end in
``/``; here they are two separate arguments, and either may be spelled as str or Path, with or
without a trailing slash.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout
from kdlib.data.layouts.cub200 import scan_cub200
from kdlib.data.layouts.stanford_dogs import scan_stanford_dogs

PREFIXES = ("cub", "dogs")  # class-name prefixes, in class-index order


@register_layout("cub_dogs", root_marker=("images.txt", "images"))  # the CUB root
def scan_cub_dogs(root: Path | str, staging: Path | None = None, dogs_root: Path | str | None = None) -> LayoutScan:
    """Scan CUB at ``root`` and Stanford Dogs at ``dogs_root`` as one 320-class data set."""
    if dogs_root is None:
        raise ValueError(
            "layout 'cub_dogs' needs the option dogs_root=<Stanford Dogs root> "
            "(root is the CUB-200-2011 root)"
        )
    scans = (scan_cub200(root), scan_stanford_dogs(dogs_root))
    absolute = [Path(scan.root).resolve() for scan in scans]
    common = Path(os.path.commonpath(absolute))
    classes: list[str] = []
    images: list[ScannedImage] = []
    for prefix, scan, scan_root in zip(PREFIXES, scans, absolute):
        offset = len(classes)
        base = PurePosixPath(scan_root.relative_to(common).as_posix())
        classes.extend(f"{prefix}/{name}" for name in scan.classes)
        images.extend(
            ScannedImage((base / im.path).as_posix(), im.label + offset, im.split) for im in scan.images
        )
    paths = [im.path for im in images]
    if len(set(paths)) != len(paths):
        raise ValueError(
            f"cub_dogs: the CUB root {str(absolute[0])!r} and the Dogs root {str(absolute[1])!r} "
            "list the same image file twice"
        )
    return LayoutScan(common, classes, images)
