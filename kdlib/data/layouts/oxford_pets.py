"""Oxford-IIIT Pet (``oxford_pets``): 37 cat and dog breeds.

On-disk layout under ``root`` (as extracted from images.tar.gz and annotations.tar.gz)::

    annotations/trainval.txt    "<image_name> <class_id> <species> <breed_id>" per line
    annotations/test.txt        same format
    images/<image_name>.jpg     e.g. images/Abyssinian_100.jpg, images/american_bulldog_12.jpg

``class_id`` is 1..37 (label = class_id - 1), ``species`` is 1 (cat) or 2 (dog) and ``breed_id``
numbers the breeds within a species; lines starting with ``#`` are comments, blank lines are
skipped. The class name is the image name with its trailing ``_<number>`` removed
(``Abyssinian_100`` -> ``Abyssinian``, ``american_bulldog_12`` -> ``american_bulldog``); every
class id must always carry the same name and two ids never the same one, and the ids seen must
be exactly 1..K, so ``classes`` has K entries (37 for the real set, ordered by class id, which
is alphabetical ignoring case). ``trainval.txt`` gives split ``"train"`` and ``test.txt`` split
``"test"``; the real set has 3,680 trainval and 3,669 test images, listed in file order.

The teacher-architecture study ``random_split`` trainval 80/20 into train/val and used identical
(non-augmenting) train and test transforms; here the official test set is kept as ``test`` and
the prepare stage carves a seeded validation set from ``train``.
"""
from __future__ import annotations

import re
from pathlib import Path

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout, require_root

NUM_CLASSES = 37
SPECIES = {1, 2}
SPLIT_FILES: tuple[tuple[Path, str], ...] = (
    (Path("annotations") / "trainval.txt", "train"),
    (Path("annotations") / "test.txt", "test"),
)
_IMAGE_NAME = re.compile(r"^(?P<name>.+)_(?P<number>\d+)$")
_INT = re.compile(r"^-?\d+$")


@register_layout("oxford_pets", root_marker=("annotations/trainval.txt", "images"))
def scan_oxford_pets(root: Path, staging: Path | None = None) -> LayoutScan:
    """Read Oxford-IIIT Pet from ``root``; ``staging`` is unused (the images are plain files)."""
    root = require_root(root, "oxford_pets")
    # class id -> (name, "file:line" where first seen)
    names: dict[int, tuple[str, str]] = {}
    ids_of_name: dict[str, tuple[int, str]] = {}
    seen_images: dict[str, str] = {}
    images: list[ScannedImage] = []
    for rel_path, split in SPLIT_FILES:
        path = root / rel_path
        if not path.is_file():
            raise FileNotFoundError(f"oxford_pets: annotation file {str(path)!r} not found")
        for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}:{line_no}"
            parts = text.split()
            if len(parts) != 4 or not all(_INT.match(p) for p in parts[1:]):
                raise ValueError(
                    f"{where}: expected '<image_name> <class_id> <species> <breed_id>' "
                    f"with integer ids, got {line!r}"
                )
            image_name = parts[0]
            class_id, species = int(parts[1]), int(parts[2])
            if not 1 <= class_id <= NUM_CLASSES:
                raise ValueError(f"{where}: class_id {class_id} out of range 1..{NUM_CLASSES}")
            if species not in SPECIES:
                raise ValueError(f"{where}: species {species} is not 1 (cat) or 2 (dog)")
            match = _IMAGE_NAME.match(image_name)
            if match is None:
                raise ValueError(
                    f"{where}: image name {image_name!r} does not end in '_<number>' "
                    f"(expected e.g. 'Abyssinian_100')"
                )
            name = match.group("name")
            if class_id in names and names[class_id][0] != name:
                first_name, first_where = names[class_id]
                raise ValueError(
                    f"{where}: class_id {class_id} is named {name!r} here but {first_name!r} "
                    f"at {first_where}"
                )
            if name in ids_of_name and ids_of_name[name][0] != class_id:
                first_id, first_where = ids_of_name[name]
                raise ValueError(
                    f"{where}: class name {name!r} has class_id {class_id} here but {first_id} "
                    f"at {first_where}"
                )
            names.setdefault(class_id, (name, where))
            ids_of_name.setdefault(name, (class_id, where))
            if image_name in seen_images:
                raise ValueError(f"{where}: image {image_name!r} already listed at {seen_images[image_name]}")
            seen_images[image_name] = where
            images.append(ScannedImage(f"images/{image_name}.jpg", class_id - 1, split))
    if not images:
        raise ValueError(f"{root / 'annotations'}: trainval.txt and test.txt list no images")
    missing = sorted(set(range(1, max(names) + 1)) - set(names))
    if missing:
        raise ValueError(
            f"{root / 'annotations'}: class ids must be 1..{max(names)} with none skipped; "
            f"ids {missing} never appear, so their names are unknown"
        )
    classes = [names[i][0] for i in range(1, max(names) + 1)]
    return LayoutScan(root, classes, images)
