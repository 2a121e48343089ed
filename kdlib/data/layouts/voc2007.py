"""PASCAL VOC 2007 as a multi-label classification set (``voc2007``, 20 classes).

On-disk layout, as the ``VOCtrainval_06-Nov-2007.tar`` and ``VOCtest_06-Nov-2007.tar`` archives
extract (both into the same tree)::

    VOCdevkit/VOC2007/
        ImageSets/Main/trainval.txt   one image id per line (e.g. 000005) -> split "train"
        ImageSets/Main/test.txt       one image id per line                -> split "test"
        Annotations/<id>.xml          <annotation> with one <object> per object:
                                      <name>class</name> and <difficult>0|1</difficult>
                                      (a missing or empty <difficult> tag means 0)
        JPEGImages/<id>.jpg

``root`` may be the folder containing ``VOCdevkit/``, ``VOCdevkit`` itself, or ``VOC2007`` itself;
the scan is rooted at ``VOC2007`` and image paths are ``JPEGImages/<id>.jpg``. Official splits:
5,011 trainval / 4,952 test images (trainval is this library's "train"; the source projects train on
trainval and report mAP on test).

Classes, in the canonical VOC order (index = position): aeroplane, bicycle, bird, boat, bottle,
bus, car, cat, chair, cow, diningtable, dog, horse, motorbike, person, pottedplant, sheep, sofa,
train, tvmonitor.

Labels (task ``multilabel``, ``label = -1``), per image:

- ``positives``: the classes with at least one object in the image, difficult or not (LSHFM, Wang et al.,
  TPAMI 2021, maps VOC's "present only as difficult" label 0 to positive when training);
- ``difficult``: the classes whose objects in that image are *all* difficult; they are also in
  ``positives`` and are ignored (neither true nor false positive) when scoring VOC AP.

An image with no objects has no positives (allowed). An unknown class name, a malformed XML file,
a missing annotation file, a ``<difficult>`` value other than 0/1, an object without a name, or an
image id listed twice raise errors naming the file. Images keep the order of the id lists
(trainval first, then test).

Annotation files are parsed by :func:`read_xml`, which refuses any ``<!DOCTYPE>`` (VOC files have
none): no DTD is read, so no entity is declared or expanded (no "billion laughs") and no external
entity (``SYSTEM "file:///…"``) is fetched.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.parsers import expat

from kdlib.data.layouts import LayoutScan, ScannedImage, register_layout, require_root

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
SPLIT_FILES: tuple[tuple[str, str], ...] = (("trainval.txt", "train"), ("test.txt", "test"))


def _voc_dir(root: Path) -> Path:
    root = require_root(root, "voc2007")
    candidates = (root / "VOCdevkit" / "VOC2007", root / "VOC2007", root)
    for candidate in candidates:
        if (candidate / "ImageSets").is_dir() or (candidate / "Annotations").is_dir():
            return candidate
    raise FileNotFoundError(
        f"voc2007: no VOC2007 folder (with ImageSets/ and Annotations/) found under {str(root)!r}; "
        "root must be the folder containing VOCdevkit/, VOCdevkit/ itself or VOC2007/ itself"
    )


def _read_ids(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, image id) for each non-blank line of an ImageSets list."""
    if not path.is_file():
        raise FileNotFoundError(f"voc2007: missing image list {str(path)!r}")
    ids: list[tuple[int, str]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if len(text.split()) != 1 or "/" in text or "\\" in text or text in (".", ".."):
            raise ValueError(
                f"{path}:{lineno}: expected one image id (e.g. 000005) per line, got {line!r}"
            )
        ids.append((lineno, text))
    return ids


class _Refused(Exception):
    """Raised from an expat handler to stop the parse at a declaration we do not allow."""


def read_xml(path: Path) -> ET.Element:
    """The root element of the XML file ``path``, parsed without any DTD.

    Guarantee: a file with a ``<!DOCTYPE …>`` is refused (``ValueError`` naming the file) when
    expat reaches the declaration, before its internal subset is read, so no entity is ever
    declared, expanded or fetched; an entity reference other than XML's five predefined ones
    (``&amp;`` …; character references such as ``&#38;`` are fine) is then a parse error. Elements, attributes and text
    are built into an :class:`xml.etree.ElementTree.Element` as ``ElementTree.parse`` would.
    """
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()

    def refuse(what: str) -> Any:
        def handler(*args: Any) -> None:
            raise _Refused(what)
        return handler

    # Refusing the DOCTYPE alone stops every DTD; the other handlers are a second line in case
    # an expat build reports declarations differently.
    parser.StartDoctypeDeclHandler = refuse("a <!DOCTYPE> declaration")
    parser.EntityDeclHandler = refuse("an <!ENTITY> declaration")
    parser.UnparsedEntityDeclHandler = refuse("an unparsed <!ENTITY> declaration")
    parser.ExternalEntityRefHandler = refuse("an external entity reference")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        with path.open("rb") as f:
            parser.ParseFile(f)
        return builder.close()
    except _Refused as exc:
        raise ValueError(
            f"{path}: refuses {exc} — VOC annotations have no DTD, and a DTD can declare entities "
            "that expand without bound or read other files"
        ) from None
    except (expat.ExpatError, AssertionError) as exc:  # TreeBuilder asserts on a tree left open
        raise ValueError(f"{path}: malformed XML ({exc})") from exc


def _labels(path: Path, class_index: dict[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(positives, difficult) of one annotation file."""
    if not path.is_file():
        raise FileNotFoundError(f"voc2007: missing annotation file {str(path)!r}")
    annotation = read_xml(path)
    if annotation.tag != "annotation":
        raise ValueError(f"{path}: root element is <{annotation.tag}>, expected <annotation>")
    present: set[int] = set()
    not_difficult: set[int] = set()
    for number, obj in enumerate(annotation.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{path}: <object> number {number} has no <name>")
        if name not in class_index:
            raise ValueError(
                f"{path}: unknown class {name!r} in <object> number {number}; "
                f"known: {', '.join(VOC_CLASSES)}"
            )
        flag = (obj.findtext("difficult") or "0").strip() or "0"
        if flag not in ("0", "1"):
            raise ValueError(
                f"{path}: <difficult> of <object> number {number} is {flag!r}, expected 0 or 1"
            )
        index = class_index[name]
        present.add(index)
        if flag == "0":
            not_difficult.add(index)
    return tuple(sorted(present)), tuple(sorted(present - not_difficult))


@register_layout("voc2007", task="multilabel",
                 root_marker=("Annotations", "ImageSets/Main", "JPEGImages"))
def scan_voc2007(root: Path, staging: Path | None = None) -> LayoutScan:
    """PASCAL VOC 2007 multi-label scan; see the module docstring. ``staging`` is unused."""
    voc = _voc_dir(Path(root))
    main = voc / "ImageSets" / "Main"
    class_index = {name: i for i, name in enumerate(VOC_CLASSES)}
    images: list[ScannedImage] = []
    seen: dict[str, str] = {}  # image id -> "file:line" where it was first listed
    for list_name, split in SPLIT_FILES:
        list_path = main / list_name
        for lineno, image_id in _read_ids(list_path):
            where = f"{list_path}:{lineno}"
            if image_id in seen:
                raise ValueError(f"{where}: image id {image_id!r} already listed at {seen[image_id]}")
            seen[image_id] = where
            positives, difficult = _labels(voc / "Annotations" / f"{image_id}.xml", class_index)
            images.append(
                ScannedImage(f"JPEGImages/{image_id}.jpg", -1, split, positives, difficult)
            )
    return LayoutScan(voc, list(VOC_CLASSES), images, task="multilabel")
