"""Image-loading throughput for a JPEG folder at 224 px.

Compares, on the same files: decoding in a plain loop; decode + the `imagenet` train transform in
a plain loop; the pipeline's DataLoader with 2 workers; and the pre-decoded uint8 cache
(`preload: true`: decode once, keep in memory) with 0 and 2 workers. Reports images/s and the
cache's speedup over decoding every epoch.

    python bench/loader.py [--quick] [--images N]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import bench_parser, print_table, write_result

from kdlib.data import IndexedImageDataset, Record, build_transforms, load_image
from kdlib.runtime import Runtime, make_loader


def make_jpegs(root: Path, count: int) -> list[Record]:
    """CUB-like JPEGs (500×375, smooth content + noise, quality 90)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    records = []
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin(x / (40 + 7 * c) + phase[c]) + np.cos(y / (30 + 5 * c)) for c in range(3)], -1)
        pixels = ((base + 2) * 60 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:05d}.jpg", quality=90)
        records.append(Record(f"{i:05d}.jpg", i % 10, "train"))
    return records


def rate(count: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def drain(loader) -> None:
    for _ in loader:
        pass


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--images", type=int, default=None)
    args = parser.parse_args()
    count = args.images or (48 if args.quick else 512)
    transform = build_transforms("imagenet", 224, None, True).sample
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = make_jpegs(root, count)
        paths = [root / r.path for r in records]
        rates = {
            "decode loop": rate(count, lambda: [load_image(p, 3) for p in paths]),
            "decode + transform loop": rate(count, lambda: [transform(load_image(p, 3)) for p in paths]),
        }
        dataset = IndexedImageDataset(root, records, 3, transform)
        loader = make_loader(dataset, 64, True, 0, Runtime(), num_workers=2)
        drain(loader)  # start the persistent workers before timing
        rates["DataLoader, 2 workers"] = rate(count, lambda: drain(loader))
        start = time.perf_counter()
        cached = IndexedImageDataset(root, records, 3, transform, preload=True)
        cache_build_s = time.perf_counter() - start
        for workers in (0, 2):
            cached_loader = make_loader(cached, 64, True, 0, Runtime(), num_workers=workers)
            drain(cached_loader)
            rates[f"pre-decoded cache, {workers} workers"] = rate(count, lambda: drain(cached_loader))
        cache_mb = sum(t.numel() for t in cached._cache or []) / 2**20
    base = rates["DataLoader, 2 workers"]
    for name, value in rates.items():
        rows.append([name, value, f"{value / base:.2f}x"])
    print(f"\n{count} JPEGs 500x375 -> 224 px (imagenet train transform); torch threads {torch.get_num_threads()}")
    print_table(["path", "images/s", "vs DataLoader"], rows)
    decode_share = rates["decode + transform loop"] and (1 / rates["decode loop"]) / (1 / rates["decode + transform loop"])
    print(f"decoding is {100 * decode_share:.0f}% of decode+transform time; cache: {cache_mb:.0f} MiB, "
          f"built in {cache_build_s:.1f} s (one decode pass)")
    write_result("loader", {"quick": args.quick, "images": count, "images_per_second": rates,
                            "decode_share": decode_share, "cache_mib": cache_mb,
                            "cache_build_seconds": cache_build_s,
                            "cache_speedup_2_workers": rates["pre-decoded cache, 2 workers"] / base}, args.out)


if __name__ == "__main__":
    main()
