"""prepare's image checks: missing, truncated and corrupt files under on_bad_image error / skip."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlib.data import DatasetMeta, build_manifest
from kdlib.data.layouts import LAYOUTS
from kdlib.data.prepare import index_from_scan, inspect_image


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_cub(root: Path, bad: dict[int, bytes | None]) -> Path:
    """A 2-class CUB fixture with 6 images per class; ``bad`` maps image ids to replacement
    bytes (None: the file is listed but missing)."""
    lines_images, lines_labels, lines_split = [], [], []
    image_id = 0
    for class_id, name in ((1, "001.Aa"), (2, "002.Bb")):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for k in range(6):
            image_id += 1
            rel = f"{name}/img_{image_id}.jpg"
            lines_images.append(f"{image_id} {rel}")
            lines_labels.append(f"{image_id} {class_id}")
            lines_split.append(f"{image_id} {1 if k < 4 else 0}")
            if image_id in bad and bad[image_id] is None:
                continue
            (root / "images" / rel).write_bytes(bad.get(image_id) or jpeg_bytes(image_id))
    (root / "images.txt").write_text("\n".join(lines_images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines_labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    (root / "classes.txt").write_text("1 001.Aa\n2 002.Bb\n")
    return root


def prepare_index(root: Path, policy: str):
    scan = LAYOUTS.get("cub200")(root)
    meta = DatasetMeta("cub", str(scan.root), scan.classes, 3, 24, [0.5] * 3, [0.5] * 3)
    return index_from_scan(scan, meta, val_fraction=0.25, test_fraction=0.2, seed=0, on_bad_image=policy)


TRUNCATED = jpeg_bytes(99)[:200]
GARBAGE = b"this is not an image at all" * 10


@pytest.mark.parametrize("bad_id, content, reason", [
    (2, None, "listed but missing"),
    (3, TRUNCATED, "cannot be decoded"),
    (8, GARBAGE, "cannot be decoded"),
])
def test_bad_image_stops_prepare_and_names_the_file(tmp_path, bad_id, content, reason):
    root = make_cub(tmp_path, {bad_id: content})
    with pytest.raises(ValueError, match=reason) as err:
        prepare_index(root, "error")
    assert f"img_{bad_id}.jpg" in str(err.value) and "on_bad_image" in str(err.value)


def test_skip_policy_leaves_bad_images_out_and_lists_them(tmp_path):
    root = make_cub(tmp_path, {2: None, 3: TRUNCATED, 8: GARBAGE})
    index = prepare_index(root, "skip")
    paths = {r.path for r in index.records}
    assert len(index.records) == 9
    assert not any(p.endswith(("img_2.jpg", "img_3.jpg", "img_8.jpg")) for p in paths)
    manifest = build_manifest(index)
    assert manifest["skipped_count"] == 3
    assert {s["path"].rsplit("/", 1)[-1] for s in manifest["skipped"]} == {"img_2.jpg", "img_3.jpg", "img_8.jpg"}
    assert all(r.md5 for r in index.records)
    # the official test split is kept and val is carved from train only
    assert {r.split for r in index.records} == {"train", "val", "test"}


def test_clean_data_set_has_no_skips(tmp_path):
    index = prepare_index(make_cub(tmp_path, {}), "error")
    assert len(index.records) == 12 and build_manifest(index)["skipped_count"] == 0


def test_inspect_image_reports_md5_of_the_bytes(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(1))
    import hashlib

    assert inspect_image(path) == (hashlib.md5(jpeg_bytes(1)).hexdigest(), None)


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="on_bad_image"):
        prepare_index(make_cub(tmp_path, {}), "ignore")
