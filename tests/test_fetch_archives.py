"""Every data set prepared from archives shaped as their publishers ship them, over real HTTP.

Each test writes a tiny copy of a data set (tests/layout_fixtures.py), packs it the way the real
download is packed (CUB_200_2011.tgz with its top-level folder and attributes.txt beside it;
Stanford Dogs' images.tar + lists.tar; VOC's trainval and test tars, both under VOCdevkit/VOC2007;
FoodX-251's annotation and image archives; Oxford Pets' images and annotations tarballs; Kaggle's
Intel scenes zip; COCO's three zips), serves the archives from a local ``http.server`` thread and
runs ``prepare_dataset`` on a preset holding only URLs and checksums: the layout's root must be
found inside the extracted tree without a hand-written path.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
from layout_fixtures import FACTS, build_dataset

from kdlib.data.fetch import MARKER_NAME
from kdlib.data.prepare import prepare_dataset
from kdlib.data.spec import DatasetSpec
from kdlib.schema import parse


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def www(tmp_path: Path):
    """(base URL, served folder, request log) of a local HTTP server."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    httpd.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd.hits  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def sums(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}


def pack_tar(archive: Path, members: dict[str, Path], mode: str = "w") -> Path:
    """A tar of ``{name in the archive: file or folder on disk}`` (folders recursively)."""
    with tarfile.open(archive, mode) as tar:
        for name, path in members.items():
            tar.add(path, arcname=name)
    return archive


def pack_zip(archive: Path, members: dict[str, Path]) -> Path:
    """A zip with explicit folder entries, as Kaggle's and COCO's zips have."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, path in members.items():
            if path.is_file():
                zf.write(path, name)
                continue
            zf.write(path, name + "/")
            for child in sorted(path.rglob("*")):
                zf.write(child, f"{name}/{child.relative_to(path).as_posix()}" + ("/" if child.is_dir() else ""))
    return archive


def preset(layout: str, **keys: Any) -> DatasetSpec:
    values = {"layout": layout, "image_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
              "augment": "none", "val_fraction": 0.25, **keys}
    return parse(DatasetSpec, values)  # validated as params.yaml's presets are


def entry(base: str, archive: Path, algorithm: str = "sha256", **extra: str) -> dict[str, str]:
    return {"url": f"{base}/{archive.name}", algorithm: sums(archive)[algorithm], **extra}


def prepare_and_check(spec: DatasetSpec, layout: str, name: str, tmp_path: Path, hits: list[str]) -> Path:
    """Prepare twice (the second run reuses the verified archives); check against the fixture's facts."""
    out, downloads = tmp_path / "data" / "prepared", tmp_path / "data" / "downloads"
    index = prepare_dataset(spec, name, out, split_seed=0, downloads_dir=downloads)
    facts = FACTS[layout]
    assert index.meta.classes == facts.classes
    assert len(index.split("test")) == facts.test
    assert len(index.split("train")) + len(index.split("val")) == facts.train
    first_hits = len(hits)
    again = prepare_dataset(spec, name, out, split_seed=0, downloads_dir=downloads)
    assert [r.md5 for r in again.records] == [r.md5 for r in index.records]
    assert len(hits) == first_hits  # nothing downloaded twice
    names = [p.name for p in (tmp_path / "data").rglob("*")]
    assert not [n for n in names if n.endswith((".partial", ".extracting", ".old"))], names
    return Path(index.meta.root)


def test_cub_tgz_with_top_folder_and_attributes_beside_it(www, tmp_path: Path) -> None:
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("cub200", src / "CUB_200_2011")
    (src / "attributes.txt").write_text("1 has_bill_shape::curved_(up_or_down)\n")
    archive = pack_tar(served / "CUB_200_2011.tgz", {"CUB_200_2011": src / "CUB_200_2011",
                                                    "attributes.txt": src / "attributes.txt"}, "w:gz")
    spec = preset("cub200", url=f"{base}/CUB_200_2011.tgz", md5=sums(archive)["md5"])
    root = prepare_and_check(spec, "cub200", "cub200", tmp_path, hits)
    assert root == tmp_path / "data" / "downloads" / "CUB_200_2011" / "CUB_200_2011"
    assert (root.parent / "attributes.txt").is_file() and (root.parent / MARKER_NAME).is_file()


def test_stanford_dogs_images_tar_and_lists_tar(www, tmp_path: Path) -> None:
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("stanford_dogs", src)
    shutil.copy(src / "splits" / "train_list.mat", src / "splits" / "file_list.mat")  # the union, unread
    images = pack_tar(served / "images.tar", {"Images": src / "Images"})
    # lists.tar holds the three .mat files at its top level; the layout reads them under splits/
    lists = pack_tar(served / "lists.tar", {n: src / "splits" / n for n in
                                            ("file_list.mat", "train_list.mat", "test_list.mat")})
    spec = preset("stanford_dogs", downloads=[entry(base, images, "md5"), entry(base, lists, into="splits")])
    root = prepare_and_check(spec, "stanford_dogs", "stanford_dogs", tmp_path, hits)
    assert root == tmp_path / "data" / "downloads" / "stanford_dogs"
    assert sorted(hits) == ["/images.tar", "/lists.tar"]


def test_voc2007_trainval_and_test_tars_merge_under_vocdevkit(www, tmp_path: Path) -> None:
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("voc2007", src)
    voc = src / "VOCdevkit" / "VOC2007"
    parts = {}
    for split in ("trainval", "test"):
        ids = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        members = {f"VOCdevkit/VOC2007/ImageSets/Main/{split}.txt": voc / "ImageSets" / "Main" / f"{split}.txt"}
        for image_id in ids:
            members[f"VOCdevkit/VOC2007/Annotations/{image_id}.xml"] = voc / "Annotations" / f"{image_id}.xml"
            members[f"VOCdevkit/VOC2007/JPEGImages/{image_id}.jpg"] = voc / "JPEGImages" / f"{image_id}.jpg"
        parts[split] = pack_tar(served / f"VOC{split}_06-Nov-2007.tar", members)
    spec = preset("voc2007", downloads=[entry(base, parts["trainval"]), entry(base, parts["test"], "md5")])
    root = prepare_and_check(spec, "voc2007", "voc2007", tmp_path, hits)
    assert root == tmp_path / "data" / "downloads" / "voc2007" / "VOCdevkit" / "VOC2007"


def test_foodx251_annotation_tar_and_image_archives(www, tmp_path: Path) -> None:
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("foodx251", src)
    annot = pack_tar(served / "annot.tar", {"annot": src / "annot"})
    train = pack_tar(served / "train_set.tar", {"train_set": src / "train_set"})
    val = pack_zip(served / "val_set.zip", {"val_set": src / "val_set"})
    spec = preset("foodx251", downloads=[entry(base, annot), entry(base, train), entry(base, val)])
    root = prepare_and_check(spec, "foodx251", "foodx251", tmp_path, hits)
    assert root == tmp_path / "data" / "downloads" / "foodx251"


def test_oxford_pets_images_and_annotations_tarballs(www, tmp_path: Path) -> None:
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("oxford_pets", src)
    (src / "annotations" / "list.txt").write_text("#Image CLASS-ID SPECIES BREED ID\n")
    (src / "annotations" / "trimaps").mkdir()
    (src / "annotations" / "trimaps" / "Abyssinian_1.png").write_bytes(b"\x89PNG not read")
    images = pack_tar(served / "images.tar.gz", {"images": src / "images"}, "w:gz")
    annotations = pack_tar(served / "annotations.tar.gz", {"annotations": src / "annotations"}, "w:gz")
    spec = preset("oxford_pets", downloads=[entry(base, images, "md5"), entry(base, annotations, "md5")])
    root = prepare_and_check(spec, "oxford_pets", "oxford_pets", tmp_path, hits)
    assert root == tmp_path / "data" / "downloads" / "oxford_pets"


def test_intel_scenes_kaggle_zip(www, tmp_path: Path) -> None:
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("intel_scenes", src)
    archive = pack_zip(served / "archive.zip", {name: src / name for name in ("seg_pred", "seg_test", "seg_train")})
    spec = preset("intel_scenes", url=f"{base}/archive.zip", sha256=sums(archive)["sha256"])
    root = prepare_and_check(spec, "intel_scenes", "intel_scenes", tmp_path, hits)
    assert root == tmp_path / "data" / "downloads" / "archive"


def test_coco2014_three_zips(www, tmp_path: Path) -> None:
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("coco2014", src)
    zips = [pack_zip(served / f"{name}.zip", {folder: src / folder}) for name, folder in
            (("train2014", "train2014"), ("val2014", "val2014"), ("annotations_trainval2014", "annotations"))]
    spec = preset("coco2014", downloads=[entry(base, z, "md5") for z in zips])
    root = prepare_and_check(spec, "coco2014", "coco2014", tmp_path, hits)
    assert root == tmp_path / "data" / "downloads" / "coco2014"


def test_imagefolder_tgz_with_one_top_folder(www, tmp_path: Path) -> None:
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("imagefolder", src / "fruit")
    archive = pack_tar(served / "fruit.tar.gz", {"fruit": src / "fruit"}, "w:gz")
    spec = preset("imagefolder", url=f"{base}/fruit.tar.gz", sha256=sums(archive)["sha256"])
    root = prepare_and_check(spec, "imagefolder", "fruit", tmp_path, hits)
    assert root == tmp_path / "data" / "downloads" / "fruit" / "fruit"  # no marker: the one folder inside


def test_archive_subdir_overrides_the_search(www, tmp_path: Path) -> None:
    """Two CUB copies in one archive: ambiguous without archive_subdir, read as named with it."""
    base, served, hits = www
    src = tmp_path / "src"
    build_dataset("cub200", src / "a" / "CUB_200_2011")
    build_dataset("cub200", src / "b" / "CUB_200_2011")
    archive = pack_tar(served / "two.tar", {"a": src / "a", "b": src / "b"})
    keys = {"url": f"{base}/two.tar", "sha256": sums(archive)["sha256"]}
    out, downloads = tmp_path / "data" / "prepared", tmp_path / "data" / "downloads"
    with pytest.raises(ValueError, match=r"several folders hold.*a/CUB_200_2011, b/CUB_200_2011.*archive_subdir"):
        prepare_dataset(preset("cub200", **keys), "two", out, 0, downloads)
    assert not out.exists()
    index = prepare_dataset(preset("cub200", archive_subdir="b/CUB_200_2011", **keys), "two", out, 0, downloads)
    assert Path(index.meta.root) == downloads / "two" / "b" / "CUB_200_2011"
    assert len(hits) == 1
