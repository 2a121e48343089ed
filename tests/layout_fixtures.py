"""Tiny but valid copies of every data-set layout kdlib reads, in their real on-disk formats.

``build_dataset(layout, root)`` writes one data set under ``root`` (JPEG/PNG images written with
PIL, MATLAB split lists written with ``scipy.io.savemat`` as (N, 1) cell columns, VOC XML, COCO
JSON, CSV/TXT tables, CIFAR pickles with ``bytes`` keys) and returns the ``datasets.<layout>``
overrides that point the preset at it (``root`` and, where needed, ``options``).
``tiny_params`` turns params.yaml into a fast one-epoch run on such a fixture, and ``FACTS`` says
what each fixture holds (classes in index order, official train/test image counts, task), so a
test can check what the pipeline made of it.

Image content depends on the class (a class colour under per-pixel noise, so every file is
distinct and a model can learn something); sizes vary between 40 and 64 px (CIFAR: 32×32).
Every class has at least 6 training and 2 test images (CIFAR-10: 4 / 2, CIFAR-100: 3 / 1), and
every class of a multi-label set is present in many training images and at least one test image.

Used by tests/test_pipeline_layouts.py and scripts/layouts_smoke.py.
"""
from __future__ import annotations

import copy
import json
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.io
from PIL import Image

LAYOUTS_ALL = [
    "imagefolder", "cub200", "stanford_dogs", "cub_dogs", "foodx251", "intel_scenes", "oxford_pets",
    "cifar10", "cifar100", "voc2007", "coco2014",
]
MULTILABEL = {"voc2007", "coco2014"}

TRAIN_PER_CLASS = 6  # official training images per class (single-label layouts but CIFAR)
TEST_PER_CLASS = 2  # official test images per class

# ------------------------------------------------------------------------------ class names
IMAGEFOLDER_CLASSES = ["apple", "banana", "cherry"]
# CUB's classes.txt: real names, listed in id order (label = class_id - 1).
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# Stanford Dogs folders <wnid>-<name>; classes are the sorted folder names.
DOGS_CLASSES = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02086240-Shih-Tzu"]
FOOD_CLASSES = ["macaron", "beignet", "cruller"]  # class_list.txt ids 0, 1, 2 (not sorted)
INTEL_CLASSES = ["buildings", "forest", "sea"]
# Oxford pets: (class name, species 1 = cat / 2 = dog, breed id within the species), class_id 1..3.
PETS = [("Abyssinian", 1, 1), ("american_bulldog", 2, 1), ("american_pit_bull_terrier", 2, 2)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [f"fine_{i:02d}" for i in range(100)]
CIFAR10_TRAIN, CIFAR10_TEST = 4, 2  # per class
CIFAR100_TRAIN, CIFAR100_TEST = 3, 1  # per class
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
VOC_TRAINVAL, VOC_TEST = 60, 20  # images
# COCO: category ids with gaps, listed out of id order in the json; classes follow id order.
COCO_CATEGORIES = [(62, "chair", "furniture"), (1, "person", "person"), (18, "dog", "animal")]
COCO_TRAIN, COCO_TEST = 24, 8  # annotated images; each json also lists one unannotated image


@dataclass(frozen=True)
class Facts:
    """What a fixture holds, as the prepared index should show it."""

    classes: list[str]  # in class-index order
    train: int  # official training images (prepare carves val out of these)
    test: int  # official test images
    task: str = "multiclass"
    test_per_class: int | None = None  # single-label: test images of every class


FACTS: dict[str, Facts] = {
    "imagefolder": Facts(IMAGEFOLDER_CLASSES, 3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS, test_per_class=TEST_PER_CLASS),
    "cub200": Facts(CUB_CLASSES, 3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS, test_per_class=TEST_PER_CLASS),
    "stanford_dogs": Facts(DOGS_CLASSES, 3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS, test_per_class=TEST_PER_CLASS),
    "cub_dogs": Facts([f"cub/{n}" for n in CUB_CLASSES] + [f"dogs/{n}" for n in DOGS_CLASSES],
                      6 * TRAIN_PER_CLASS, 6 * TEST_PER_CLASS, test_per_class=TEST_PER_CLASS),
    "foodx251": Facts(FOOD_CLASSES, 3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS, test_per_class=TEST_PER_CLASS),
    "intel_scenes": Facts(INTEL_CLASSES, 3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS, test_per_class=TEST_PER_CLASS),
    "oxford_pets": Facts([n for n, _, _ in PETS], 3 * TRAIN_PER_CLASS, 3 * TEST_PER_CLASS,
                         test_per_class=TEST_PER_CLASS),
    "cifar10": Facts(CIFAR10_CLASSES, 10 * CIFAR10_TRAIN, 10 * CIFAR10_TEST, test_per_class=CIFAR10_TEST),
    "cifar100": Facts(CIFAR100_CLASSES, 100 * CIFAR100_TRAIN, 100 * CIFAR100_TEST, test_per_class=CIFAR100_TEST),
    "voc2007": Facts(VOC_CLASSES, VOC_TRAINVAL, VOC_TEST, task="multilabel"),
    "coco2014": Facts([name for _, name, _ in sorted(COCO_CATEGORIES)], COCO_TRAIN, COCO_TEST, task="multilabel"),
}

# ------------------------------------------------------------------------------ images


def _rng(layout: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(layout.encode()))


def class_color(c: int) -> np.ndarray:
    """A distinct, saturated-enough RGB colour per class index (works for 100 classes)."""
    palette = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40), (200, 40, 200), (40, 200, 200),
               (240, 140, 20), (120, 60, 20), (150, 150, 150), (20, 20, 20)]
    if c < len(palette):
        return np.array(palette[c], dtype=np.int16)
    return np.array([(c * 37) % 200 + 30, (c * 91) % 200 + 30, (c * 151) % 200 + 30], dtype=np.int16)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(40, 65)), int(rng.integers(40, 65))  # (height, width)


def class_pixels(rng: np.random.Generator, c: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 image: the class colour under noise, with a brighter class-placed square."""
    h, w = shape or _size(rng)
    pixels = class_color(c) + rng.integers(-35, 36, (h, w, 3))
    y, x = (c * 5) % max(h // 2, 1), (c * 11) % max(w // 2, 1)
    pixels[y: y + h // 3, x: x + w // 3] += 40
    return np.clip(pixels, 0, 255).astype(np.uint8)


def multilabel_pixels(rng: np.random.Generator, present: list[int], num_classes: int) -> np.ndarray:
    """Noise background with one band in each present class's colour, at a class-dependent row."""
    h, w = _size(rng)
    pixels = rng.integers(90, 160, (h, w, 3)).astype(np.int16)
    band = max(h // num_classes, 2)
    for c in present:
        top = (c * h) // num_classes
        pixels[top: top + band] = class_color(c) + rng.integers(-20, 21, (min(band, h - top), w, 3))
        left = (c * 7) % max(w // 2, 1)  # plus a block, so a crop keeps some evidence
        pixels[h // 3: h // 3 + h // 4, left: left + w // 4] = class_color(c)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def save_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if path.suffix.lower() == ".png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=92)


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _interleaved(num_classes: int, per_class: int) -> list[tuple[int, int]]:
    """(class, k) pairs in round-robin class order, as data sets rarely list one class in a block."""
    return [(c, k) for k in range(per_class) for c in range(num_classes)]


# ------------------------------------------------------------------------------ builders


def _imagefolder(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """root/train/<class>/* and root/test/<class>/* (no val folder: prepare carves val from train)."""
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for c, name in enumerate(IMAGEFOLDER_CLASSES):
            for k in range(per_class):
                suffix = ".png" if k % 3 == 0 else ".jpg"  # both formats, as real folders mix them
                save_image(root / split / name / f"{name}_{k:03d}{suffix}", class_pixels(rng, c))
    return {"root": str(root)}


def _cub200(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """CUB_200_2011: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/."""
    images, labels, split = [], [], []
    pairs = _interleaved(len(CUB_CLASSES), TRAIN_PER_CLASS + TEST_PER_CLASS)
    for image_id, (c, k) in enumerate(pairs, start=1):
        folder = CUB_CLASSES[c]
        bird = folder.split(".", 1)[1]
        rel = f"{folder}/{bird}_{image_id:04d}_{100 + k}.jpg"
        save_image(root / "images" / rel, class_pixels(rng, c))
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {c + 1}")
        split.append(f"{image_id} {1 if k < TRAIN_PER_CLASS else 0}")
    write_lines(root / "images.txt", images)
    write_lines(root / "image_class_labels.txt", labels)
    write_lines(root / "train_test_split.txt", split)
    write_lines(root / "classes.txt", [f"{i} {name}" for i, name in enumerate(CUB_CLASSES, start=1)])
    return {"root": str(root)}


def _cell_column(strings: list[str]) -> np.ndarray:
    """An (N, 1) object array of 1-element string arrays: how a MATLAB cell column loads."""
    column = np.empty((len(strings), 1), dtype=object)
    for row, text in enumerate(strings):
        column[row, 0] = np.array([text])
    return column


def _stanford_dogs(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Stanford Dogs: Images/<wnid>-<name>/<wnid>_<n>.jpg and splits/{train,test}_list.mat."""
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for c, k in _interleaved(len(DOGS_CLASSES), TRAIN_PER_CLASS + TEST_PER_CLASS):
        folder = DOGS_CLASSES[c]
        rel = f"{folder}/{folder.split('-')[0]}_{1000 + 37 * k + c}.jpg"
        save_image(root / "Images" / rel, class_pixels(rng, 5 + c))
        lists["train" if k < TRAIN_PER_CLASS else "test"].append((rel, c + 1))
    for split, rows in lists.items():
        files = [rel for rel, _ in rows]
        path = root / "splits" / f"{split}_list.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(str(path), {
            "file_list": _cell_column(files),
            "annotation_list": _cell_column([f.rsplit(".", 1)[0] for f in files]),
            "labels": np.asarray([label for _, label in rows], dtype=np.float64).reshape(-1, 1),
        })
    return {"root": str(root)}


def _cub_dogs(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Both data sets side by side: root/CUB_200_2011 (the preset root) and root/StanfordDogs."""
    cub = _cub200(root / "CUB_200_2011", rng)
    dogs = _stanford_dogs(root / "StanfordDogs", rng)
    return {"root": cub["root"], "options": {"dogs_root": dogs["root"]}}


def _foodx251(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """FoodX-251: annot/class_list.txt, header-less annot/{train,val}_info.csv, train_set/, val_set/."""
    write_lines(root / "annot" / "class_list.txt", [f"{i} {name}" for i, name in enumerate(FOOD_CLASSES)])
    for csv_name, folder, prefix, per_class in (("train_info.csv", "train_set", "train", TRAIN_PER_CLASS),
                                                ("val_info.csv", "val_set", "val", TEST_PER_CLASS)):
        pairs = _interleaved(len(FOOD_CLASSES), per_class)
        order = rng.permutation(len(pairs))  # file numbers are not in CSV order in the real set
        rows = []
        for number, (c, _) in zip(order, pairs):
            name = f"{prefix}_{int(number) + 1:06d}.jpg"
            save_image(root / folder / name, class_pixels(rng, c))
            rows.append(f"{name},{c}")
        write_lines(root / "annot" / csv_name, rows)
    return {"root": str(root)}


def _intel_scenes(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Kaggle form: seg_train/seg_train/<class>/<n>.jpg, seg_test/seg_test/..., unlabelled seg_pred/."""
    number = 0
    for folder, per_class in (("seg_train", TRAIN_PER_CLASS), ("seg_test", TEST_PER_CLASS)):
        for c, name in enumerate(INTEL_CLASSES):
            for _ in range(per_class):
                number += 1
                save_image(root / folder / folder / name / f"{number}.jpg", class_pixels(rng, c))
    for number in range(2):
        save_image(root / "seg_pred" / "seg_pred" / f"{9000 + number}.jpg", class_pixels(rng, number))
    return {"root": str(root)}


def _oxford_pets(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Oxford-IIIT Pet: annotations/{trainval,test}.txt (with the real comment header) and images/."""
    header = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog",
              "#BREED ID: 1-25:Cat 1:12:Dog", "#All images with 1st letter as captial are cat images",
              "#images with small first letter are dog images"]
    files = {"trainval.txt": list(header), "test.txt": []}
    for c, k in _interleaved(len(PETS), TRAIN_PER_CLASS + TEST_PER_CLASS):
        name, species, breed = PETS[c]
        image_name = f"{name}_{k * 13 + 1}"
        save_image(root / "images" / f"{image_name}.jpg", class_pixels(rng, c))
        files["trainval.txt" if k < TRAIN_PER_CLASS else "test.txt"].append(f"{image_name} {c + 1} {species} {breed}")
    for file_name, lines in files.items():
        write_lines(root / "annotations" / file_name, lines)
    return {"root": str(root)}


def _dump_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(rng: np.random.Generator, labels: list[int]) -> np.ndarray:
    """(N, 3072) uint8: each 32×32 image as its red, green and blue planes, row-major."""
    rows = [class_pixels(rng, c, (32, 32)).transpose(2, 0, 1).reshape(-1) for c in labels]
    return np.stack(rows).astype(np.uint8)


def _cifar10(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta (bytes keys, as Python 2 wrote)."""
    folder = root / "cifar-10-batches-py"
    train = [c for c, _ in _interleaved(10, CIFAR10_TRAIN)]
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    per_batch = len(train) // 5
    batches = {f"data_batch_{b + 1}": train[b * per_batch:(b + 1) * per_batch] for b in range(5)}
    batches["test_batch"] = [c for c, _ in _interleaved(10, CIFAR10_TEST)]
    for name, labels in batches.items():
        _dump_pickle(folder / name, {
            b"batch_label": f"{name} of 5".encode(), b"labels": labels, b"data": _cifar_rows(rng, labels),
            b"filenames": [f"{CIFAR10_CLASSES[c]}_s_{i:06d}.png".encode() for i, c in enumerate(labels)],
        })
    _dump_pickle(folder / "batches.meta", {b"num_cases_per_batch": per_batch,
                                           b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072})
    return {"root": str(root)}  # the folder holding cifar-10-batches-py/


def _cifar100(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """cifar-100-python/: train, test, meta; fine labels are the classes (coarse ones differ)."""
    folder = root / "cifar-100-python"
    for name, per_class in (("train", CIFAR100_TRAIN), ("test", CIFAR100_TEST)):
        labels = [c for c, _ in _interleaved(100, per_class)]
        _dump_pickle(folder / name, {
            b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": labels, b"coarse_labels": [(c * 7) % 20 for c in labels],
            b"data": _cifar_rows(rng, labels),
        })
    _dump_pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES],
                                   b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)]})
    return {"root": str(folder)}  # the cifar-100-python folder itself


def _voc_xml(image_id: str, size: tuple[int, int], objects: list[tuple[int, int]]) -> str:
    h, w = size
    body = "".join(
        f"\t<object>\n\t\t<name>{VOC_CLASSES[c]}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>{difficult}</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>1</xmin>\n\t\t\t<ymin>1</ymin>\n"
        f"\t\t\t<xmax>{w}</xmax>\n\t\t\t<ymax>{h}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for c, difficult in objects
    )
    return (f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>The VOC2007 Database</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{body}</annotation>\n")


def voc_present(i: int) -> list[int]:
    """Classes in VOC fixture image ``i`` (0-based over trainval then test): 2 or 3 of the 20."""
    present = {i % 20, (7 * i + 3) % 20}
    if i % 2 == 0:
        present.add((3 * i + 11) % 20)
    return sorted(present)


def _voc2007(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """VOCdevkit/VOC2007/: ImageSets/Main/{trainval,test}.txt, Annotations/<id>.xml, JPEGImages/<id>.jpg."""
    voc = root / "VOCdevkit" / "VOC2007"
    ids: list[str] = []
    for i in range(VOC_TRAINVAL + VOC_TEST):
        image_id = f"{2 * i + 5:06d}"  # ids with gaps, as in the real lists
        ids.append(image_id)
        present = voc_present(i)
        pixels = multilabel_pixels(rng, present, len(VOC_CLASSES))
        save_image(voc / "JPEGImages" / f"{image_id}.jpg", pixels)
        # every 5th image: its first class also has a difficult object; every 9th: only difficult ones
        objects = [(c, 0) for c in present]
        if i % 5 == 0:
            objects.append((present[0], 1))
        if i % 9 == 4:
            objects[-1] = (objects[-1][0], 1)
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, pixels.shape[:2], objects))
    write_lines(voc / "ImageSets" / "Main" / "trainval.txt", ids[:VOC_TRAINVAL])
    write_lines(voc / "ImageSets" / "Main" / "test.txt", ids[VOC_TRAINVAL:])
    return {"root": str(root)}  # the folder containing VOCdevkit/


def coco_present(i: int) -> list[int]:
    """Class indices (0..2, in category-id order) of COCO fixture image ``i``: 1 or 2 of them."""
    return sorted({i % 3, (i // 3) % 3})


def _coco2014(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """annotations/instances_{train,val}2014.json, train2014/, val2014/ (COCO_<split>2014_<id:012>.jpg)."""
    category_ids = sorted(cat_id for cat_id, _, _ in COCO_CATEGORIES)
    categories = [{"supercategory": sup, "id": cat_id, "name": name} for cat_id, name, sup in COCO_CATEGORIES]
    offset = 0
    for split, count in (("train", COCO_TRAIN), ("val", COCO_TEST)):
        images, annotations = [], []
        for i in range(count + 1):
            image_id = 9 + 17 * (offset + i)
            file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
            annotated = i != count // 2  # one image per json has no annotation: the scan drops it
            present = coco_present(offset + i) if annotated else []
            pixels = multilabel_pixels(rng, present, len(category_ids))
            save_image(root / f"{split}2014" / file_name, pixels)
            h, w = pixels.shape[:2]
            images.append({"license": 1, "file_name": file_name, "coco_url": "", "height": h, "width": w,
                           "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
            for k, c in enumerate(present):
                for _ in range(1 + (k == 0 and i % 4 == 0)):  # sometimes two objects of one class
                    annotations.append({"segmentation": [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]], "area": 16.0,
                                        "iscrowd": int(i % 5 == 1), "image_id": image_id,
                                        "bbox": [1.0, 1.0, 4.0, 4.0], "category_id": category_ids[c],
                                        "id": 100000 + len(annotations) + 1000 * offset})
        offset += count + 1
        data = {"info": {"description": "COCO 2014 Dataset (fixture)", "year": 2014}, "images": images,
                "licenses": [{"url": "", "id": 1, "name": "fixture"}], "annotations": annotations,
                "categories": categories}
        path = root / "annotations" / f"instances_{split}2014.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return {"root": str(root)}


BUILDERS: dict[str, Callable[[Path, np.random.Generator], dict[str, Any]]] = {
    "imagefolder": _imagefolder, "cub200": _cub200, "stanford_dogs": _stanford_dogs, "cub_dogs": _cub_dogs,
    "foodx251": _foodx251, "intel_scenes": _intel_scenes, "oxford_pets": _oxford_pets, "cifar10": _cifar10,
    "cifar100": _cifar100, "voc2007": _voc2007, "coco2014": _coco2014,
}
assert list(BUILDERS) == LAYOUTS_ALL == list(FACTS)


def build_dataset(layout: str, root: Path) -> dict[str, Any]:
    """Write a tiny ``layout`` data set under ``root``; return its ``datasets.<layout>`` overrides."""
    if layout not in BUILDERS:
        raise ValueError(f"no fixture for layout {layout!r}; known: {', '.join(LAYOUTS_ALL)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return BUILDERS[layout](root, _rng(layout))


def tiny_params(base_params: dict[str, Any], dataset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's dict made into a quick one-epoch cnn_small run on a fixture; validated."""
    from stages.params import validate

    params = copy.deepcopy(base_params)
    params["dataset"] = dataset
    params["datasets"][dataset].update(copy.deepcopy(overrides))
    params["datasets"][dataset].update(image_size=32, val_fraction=0.25)
    params["teacher"] = params["student"] = "cnn_small"
    params["distill"]["method"] = "sigmoid_kd" if dataset in MULTILABEL else "kd"
    for preset in params["models"].values():
        preset.update(epochs=1, warmup_epochs=0, batch_size=8)
    validate(params)
    return params
