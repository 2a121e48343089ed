"""Bad bytes in the pixel cache (kdlib.data.pixel_cache): pixels that changed after the build,
with the header, the size and the index intact, so that only the per-image crc32 can tell.

Found when the cache is opened (``open_or_build``): a warning naming the file and the first bad
image, and a rebuild. Found on a read after the open (the main process, or a DataLoader worker):
``PixelCacheError`` naming the file and the image, and the file unlinked so the next run rebuilds it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kdlib.data import Record
from kdlib.data.decode import decode_at_short_side
from kdlib.data.pixel_cache import (HEADER_BYTES, INDEX_COLUMNS, PixelCache, PixelCacheError, cache_key,
                                    open_or_build)
from tests.test_jpeg_path import photo_crops

SIZE = 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Record]]:
    root = tmp_path_factory.mktemp("photos")
    return root, photo_crops(root)


def span(cache: PixelCache, i: int) -> tuple[int, int]:
    """(file offset, length) of image ``i``'s pixels, from the index (offset, c, h, w, crc)."""
    offset, c, h, w = (int(v) for v in cache.index[i, :4])
    return HEADER_BYTES + offset, c * h * w


def invert_pixels(path: Path, start: int, length: int) -> None:
    """Invert ``length`` bytes at ``start`` in place: the size and every other byte unchanged."""
    with open(path, "r+b") as handle:
        handle.seek(start)
        data = handle.read(length)
        handle.seek(start)
        handle.write(bytes(255 - b for b in data))


def crc_position(cache: PixelCache, i: int) -> int:
    """File offset of image ``i``'s crc32: the index's last int64 column."""
    return int(cache.header["index_offset"]) + (i * INDEX_COLUMNS + INDEX_COLUMNS - 1) * 8


def expected_images(root: Path, records: list[Record]) -> list[torch.Tensor]:
    return [decode_at_short_side(root / r.path, 3, SIZE) for r in records]


def test_inverted_pixels_are_found_at_open_and_the_cache_is_rebuilt_with_a_warning(photos, tmp_path: Path):
    root, records = photos
    cache = open_or_build(tmp_path, root, records, SIZE, 3)
    good = cache.path.read_bytes()
    start, length = span(cache, 3)
    invert_pixels(cache.path, start + length // 3, 200)  # 200 bytes inside image 3 only
    bad = cache.path.read_bytes()
    assert len(bad) == len(good) and bad[:HEADER_BYTES] == good[:HEADER_BYTES] and bad != good
    assert bad[start + length:] == good[start + length:]  # index (and every later image) intact
    with pytest.raises(PixelCacheError, match=re.escape(cache.path.name) + r".*image 3 \(p3\.jpg\)"):
        PixelCache.open(cache.path, cache_key(root, records, SIZE, 3), len(records), SIZE, 3,
                        names=[r.path for r in records])
    with pytest.warns(UserWarning, match=re.escape(str(cache.path)) + r": image 3 \(p3\.jpg\) has crc32 .*rebuilding"):
        rebuilt = open_or_build(tmp_path, root, records, SIZE, 3)
    assert rebuilt.path == cache.path and rebuilt.path.read_bytes() == good
    for i, image in enumerate(expected_images(root, records)):
        assert torch.equal(rebuilt.image(i), image), records[i].path


def test_corruption_after_the_open_fails_the_read_naming_file_and_image_and_removes_the_file(photos, tmp_path: Path):
    root, records = photos
    cache = open_or_build(tmp_path, root, records, SIZE, 3)  # checked, and mapped in this process
    reference = expected_images(root, records)
    start, length = span(cache, 2)
    invert_pixels(cache.path, start, 1)  # one byte: the mapping shares the page cache, so it sees it
    with pytest.raises(PixelCacheError) as err:
        cache.image(2)
    message = str(err.value)
    assert str(cache.path) in message and "image 2 " in message and "rerun the stage" in message, message
    assert "removed it" in message and not cache.path.exists()
    # the mapping outlives the unlink (Linux): the other images are still served, and right
    assert torch.equal(cache.image(0), reference[0]) and torch.equal(cache.image(5), reference[5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing file is simply built: nothing to warn about
        rebuilt = open_or_build(tmp_path, root, records, SIZE, 3)
    assert all(torch.equal(rebuilt.image(i), reference[i]) for i in range(len(records)))


class _Images(Dataset):
    def __init__(self, cache: PixelCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache.image(i)


def test_corruption_seen_in_a_dataloader_worker_is_an_error_in_the_main_process(photos, tmp_path: Path):
    root, records = photos
    cache = open_or_build(tmp_path, root, records, SIZE, 3)
    start, length = span(cache, 4)
    invert_pixels(cache.path, start + length - 1, 1)  # the last byte of image 4
    loader = DataLoader(_Images(cache), batch_size=None, num_workers=1,
                        multiprocessing_context="fork")  # the worker maps the file itself
    with pytest.raises(PixelCacheError, match=re.escape(str(cache.path)) + r": image 4 has crc32"):
        list(loader)
    assert not cache.path.exists()


def test_a_refusing_reader_leaves_a_file_rebuilt_under_the_same_name_alone(photos, tmp_path: Path):
    root, records = photos
    cache = open_or_build(tmp_path, root, records, SIZE, 3)
    in_worker = pickle.loads(pickle.dumps(cache))  # unmapped, as a DataLoader worker gets it
    in_worker.image(0)  # maps the file
    old = tmp_path / "old-inode"
    os.link(cache.path, old)
    fresh = tmp_path / "fresh"
    fresh.write_bytes(cache.path.read_bytes())
    os.replace(fresh, cache.path)  # what a rebuild does: another inode under the name
    invert_pixels(old, span(cache, 1)[0], 8)  # the old file, the one still mapped
    with pytest.raises(PixelCacheError, match=r"image 1 .*already replaced.*rerun the stage"):
        in_worker.image(1)
    assert cache.path.exists() and torch.equal(PixelCache.open(
        cache.path, cache.header["key"], len(records), SIZE, 3).image(1), expected_images(root, records)[1])


def test_the_read_checks_the_stored_crc_column(photos, tmp_path: Path):
    """Pixels right, crc column wrong: refused on read and at open (without the check nothing
    would notice: every pixel is correct). Pixels changed and the column changed to match:
    served as stored, so the column, and nothing else, is what the pixels are held to."""
    root, records = photos
    cache = open_or_build(tmp_path, root, records, SIZE, 3)
    key, reference = cache.header["key"], expected_images(root, records)
    with open(cache.path, "r+b") as handle:  # image 5's crc32 zeroed: found when the cache is opened
        handle.seek(crc_position(cache, 5))
        handle.write(bytes(8))
    with pytest.warns(UserWarning, match=r"image 5 \(p5\.jpg\) has crc32 [0-9a-f]{8}, expected 00000000"):
        cache = open_or_build(tmp_path, root, records, SIZE, 3)
    assert cache.index[5, 4] == zlib.crc32(reference[5].numpy().tobytes())
    stored = int(cache.index[0, 4])
    with open(cache.path, "r+b") as handle:  # image 0's crc32, one bit off
        handle.seek(crc_position(cache, 0))
        handle.write(np.array([stored ^ 1], dtype="<i8").tobytes())
    unchecked = pickle.loads(pickle.dumps(PixelCache.open(cache.path, key, len(records), SIZE, 3, verify=False)))
    assert unchecked.index[0, 4] == stored ^ 1
    with pytest.raises(PixelCacheError, match=f"image 0 has crc32 {stored:08x}, expected {stored ^ 1:08x}"):
        unchecked.image(0)
    assert not cache.path.exists()

    cache = open_or_build(tmp_path, root, records, SIZE, 3)
    start, length = span(cache, 0)
    invert_pixels(cache.path, start, length)
    with open(cache.path, "rb") as handle:
        handle.seek(start)
        inverted_crc = zlib.crc32(handle.read(length))
    with open(cache.path, "r+b") as handle:
        handle.seek(crc_position(cache, 0))
        handle.write(np.array([inverted_crc], dtype="<i8").tobytes())
    forged = PixelCache.open(cache.path, key, len(records), SIZE, 3)
    assert torch.equal(forged.image(0), 255 - reference[0]) and torch.equal(forged.image(1), reference[1])


def test_a_build_is_deterministic_and_its_crcs_are_those_of_the_decoded_pixels(photos, tmp_path: Path):
    root, records = photos
    one = open_or_build(tmp_path / "a", root, records, SIZE, 3)
    two = open_or_build(tmp_path / "b", root, records, SIZE, 3, num_workers=2)  # decoded in 2 processes
    assert one.path.name == two.path.name and one.path.read_bytes() == two.path.read_bytes()
    crcs = [zlib.crc32(image.numpy().tobytes()) for image in expected_images(root, records)]
    assert one.index[:, 4].tolist() == crcs  # independently: the crc32 of each decoded CHW image
    header = json.loads(one.path.read_bytes()[8:HEADER_BYTES].decode())
    assert header["format"] == 2 and os.path.getsize(one.path) == header["index_offset"] + 40 * len(records)


def test_a_format_1_file_is_never_read_as_format_2(photos, tmp_path: Path):
    """A file of the format before checksums (4 index columns), renamed to the new name: its
    magic refuses it, and ``open_or_build`` rebuilds it with a warning."""
    root, records = photos
    cache = open_or_build(tmp_path, root, records, SIZE, 3)
    data = bytearray(cache.path.read_bytes())
    data[:8] = b"KDPIXC01"
    cache.path.write_bytes(bytes(data))
    with pytest.raises(PixelCacheError, match="no KDPIXC02 header"):
        PixelCache.open(cache.path, cache.header["key"], len(records), SIZE, 3)
    with pytest.warns(UserWarning, match=re.escape(cache.path.name) + ".*KDPIXC02.*rebuilding"):
        rebuilt = open_or_build(tmp_path, root, records, SIZE, 3)
    assert rebuilt.path.read_bytes()[:8] == b"KDPIXC02"
