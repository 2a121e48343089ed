"""The JPEG path at 224–448 px on real photographs at CUB's 500×375: decoding, the pixel cache,
and whether the cache loader keeps a ResNet-18 student fed.

The pictures: N distinct 500×375 JPEGs (quality 90) cut from a real photograph that matplotlib
ships (``sample_data/grace_hopper.jpg``, 512×600) at different positions and scales, every other
one flipped. Rows, each in images/s and images/s per core used:

* full decode (``load_image``) and reduced DCT-scale decode (``decode_image(min_short_side=...)``)
  for the short side a 224-px crop's 256-px cache needs, for 448 px, and for 150 px (where a
  500×375 JPEG does allow a 1/2 scale); the draft scale each gets;
* building the pixel cache at short side 256 (one process, and 2 decoding workers); opening the
  built cache as every stage run does (``open_or_build``: the key, the index and the crc32 of
  every image's pixels); reading its images (``PixelCache.image``: a copy and its crc32 check,
  no transform);
* training samples through the DataLoader (0 and 2 workers) with the ``imagenet`` and ``deit``
  transforms at 224 px: from the 256-px pixel cache, from today's full-size in-memory preload,
  and decoding every epoch;
* the batched nvJPEG decoder (``decode_jpeg_views``) when CUDA is present;

then a ResNet-18 student (timm, pretrained=False, 224 px, batch 32, SGD, 2 threads) trained from
the cache loader (2 workers): the time each step waits for its batch over the step time.

    python bench/loader.py [--quick] [--images N] [--steps N]
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import matplotlib
import torch
from PIL import Image

from common import bench_parser, print_table, write_result

from kdlib.data import IndexedImageDataset, Record, build_transforms, load_image
from kdlib.data.decode import bytes_of, decode_image, decode_jpeg_views, draft_scale
from kdlib.data.pixel_cache import open_or_build
from kdlib.data.transforms import BatchNormalizer
from kdlib.data.views import AugmentedViews, make_view_seeds
from kdlib.runtime import Runtime, make_loader

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
WIDTH, HEIGHT = 500, 375
CACHE_SIDE, CROP = 256, 224


def make_photos(root: Path, count: int) -> list[Record]:
    """``count`` distinct 500×375 JPEGs (quality 90) cropped from the photograph: 4:3 windows of
    width 400–512 px at positions spread over it, resized to 500×375, every other one flipped."""
    source = Image.open(PHOTO).convert("RGB")
    src_w, src_h = source.size
    records = []
    for i in range(count):
        crop_w = 400 + (i * 37) % 113  # 400..512
        crop_h = crop_w * 3 // 4
        left = (i * 53) % (src_w - crop_w + 1)
        top = (i * 97) % (src_h - crop_h + 1)
        picture = source.crop((left, top, left + crop_w, top + crop_h)).resize((WIDTH, HEIGHT),
                                                                            Image.Resampling.BICUBIC)
        if i % 2:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        picture.save(root / f"{i:05d}.jpg", quality=90)
        records.append(Record(f"{i:05d}.jpg", i % 10, "train"))
    return records


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs: on a shared machine the others measure its neighbours."""
    return min(seconds(fn) for _ in range(repeats))


def decode_each(paths: list[Path], need: int | None) -> None:
    """Decode every file, keeping none: as a loader does (holding all of them would time the
    allocation of hundreds of MiB, which differs between full-size and reduced results)."""
    for path in paths:
        decode_image(path, 3, need)


def drain(loader) -> None:
    for _ in loader:
        pass


def loader_rate(views: AugmentedViews, workers: int, count: int, repeats: int) -> float:
    loader = make_loader(views, 64, True, 0, Runtime(), num_workers=workers)
    drain(loader)  # start the persistent workers (and warm the page cache) before timing
    return count / best_seconds(lambda: drain(loader), repeats)


def gpu_rate(paths: list[Path], repeats: int) -> float | None:
    """images/s of nvJPEG batch decode + seeded crop/flip to 224 px, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    datas = [bytes_of(p) for p in paths]
    seeds = make_view_seeds(0, len(paths), 1)[:, 0].tolist()
    batches = [(datas[i:i + 64], seeds[i:i + 64]) for i in range(0, len(datas), 64)]
    decode_jpeg_views(*batches[0], CROP, device="cuda")  # nvJPEG handle, kernels
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        for data, seed in batches:
            decode_jpeg_views(data, seed, CROP, device="cuda")
    torch.cuda.synchronize()
    return repeats * len(paths) / (time.perf_counter() - start)


def student_steps(views: AugmentedViews, steps: int, batch_size: int, workers: int) -> dict[str, float]:
    """Mean step time and mean wait for the batch, training a timm ResNet-18 from ``views``."""
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    normalize = BatchNormalizer([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    loader = make_loader(views, batch_size, True, 0, Runtime(), num_workers=workers)
    waits, step_times = [], []
    batches = iter(loader)
    for step in range(steps + 1):  # the first step warms up (allocations, worker start)
        start = time.perf_counter()
        try:
            images, targets, _, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, targets, _, _ = next(batches)
        fed = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(normalize(images)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done = time.perf_counter()
        if step:
            waits.append(fed - start)
            step_times.append(done - fed)
    wait, step_s = sum(waits) / len(waits), sum(step_times) / len(step_times)
    return {"wait_s": wait, "step_s": step_s, "wait_over_step": wait / step_s}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed ResNet-18 steps")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (the fastest counts)")
    args = parser.parse_args()
    count = args.images or (16 if args.quick else 512)
    steps = args.steps or (1 if args.quick else 6)
    batch_size = 4 if args.quick else 32
    repeats = args.repeats or (1 if args.quick else 3)
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)  # the per-core rows: one process, one thread
    rows: list[list[object]] = []
    rates: dict[str, float] = {}
    per_core: dict[str, float] = {}

    def row(name: str, processes: int, value: float | None, note: str = "") -> None:
        if value is not None:  # a row that could not run (no CUDA) is in the table, not the numbers
            rates[name], per_core[name] = value, value / processes
        rows.append([name, processes, "no CUDA device" if value is None else value,
                     "-" if value is None else value / processes, note])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        records = make_photos(root, count)
        paths = [root / r.path for r in records]
        [decode_image(p, 3) for p in paths]  # page cache and libjpeg warm: time decoding, not the disk
        needs = ((CACHE_SIDE, "256-px cache (224 crop)"), (448, "448 px"), (150, "150 px"))
        timings: dict[int | None, list[float]] = {need: [] for need in (None, *(n for n, _ in needs))}
        for _ in range(repeats):  # interleaved, so that a busy moment hits every variant alike
            for need in timings:
                timings[need].append(seconds(lambda: decode_each(paths, need)))
        full_s = min(timings[None])
        row("full decode", 1, count / full_s, f"{WIDTH}x{HEIGHT}")
        reduced = {}
        for need, label in needs:
            scale, reduced_s = draft_scale(WIDTH, HEIGHT, need), min(timings[need])
            reduced[need] = {"scale": scale, "speedup": full_s / reduced_s}
            row(f"reduced decode, {label}", 1, count / reduced_s, f"scale 1/{scale}, {full_s / reduced_s:.2f}x full")
        train = build_transforms("imagenet", CROP, None, True).sample
        decoded = [load_image(p, 3) for p in paths]
        transform_s = best_seconds(lambda: [train(im) for im in decoded], repeats)
        decode_share = full_s / (full_s + transform_s)

        cache_dirs = [Path(tmp) / f"cache{k}" for k in range(2 * repeats)]  # a fresh folder: a build each time
        build_s = min(seconds(lambda: open_or_build(d, root, records, CACHE_SIDE, 3)) for d in cache_dirs[::2])
        row("build pixel cache (256 px)", 1, count / build_s, "reduced decode + resize + write")
        build2_s = min(seconds(lambda: open_or_build(d, root, records, CACHE_SIDE, 3, num_workers=2))
                       for d in cache_dirs[1::2])
        row("build pixel cache, 2 workers", 2, count / build2_s, "")
        verify_s = best_seconds(lambda: open_or_build(cache_dirs[0], root, records, CACHE_SIDE, 3), repeats)
        row("verify pixel cache (256 px)", 1, count / verify_s, "open_or_build: key, index, crc32 of every image")
        opened = open_or_build(cache_dirs[0], root, records, CACHE_SIDE, 3)
        read_s = best_seconds(lambda: [opened.image(i) for i in range(count)], repeats)
        row("read pixel cache (256 px)", 1, count / read_s, "PixelCache.image: copy + crc32, no transform")

        seeds = make_view_seeds(0, count, 1)
        for preset in ("imagenet", "deit"):
            transform = build_transforms(preset, CROP, None, True).sample
            sources = {
                "pixel cache 256": IndexedImageDataset(root, records, 3, transform, preload=True,
                                                       preload_size=CACHE_SIDE, cache_dir=cache_dirs[0]),
                "full-size preload": IndexedImageDataset(root, records, 3, transform, preload=True),
                "decode every epoch": IndexedImageDataset(root, records, 3, transform),
            }
            for source, data in sources.items():
                for workers in (0, 2):
                    if source == "decode every epoch" and workers == 0 and preset == "deit":
                        continue  # the decode rows above already give it
                    views = AugmentedViews(data, seeds)
                    row(f"{preset}, {source}, {workers} workers", max(workers, 1),
                        loader_rate(views, workers, count, repeats), "")
        cache = sources["pixel cache 256"].pixel_cache
        assert cache is not None
        cache_mib_per_image = cache.nbytes / count / 2**20
        full_mib_per_image = sum(im.numel() for im in decoded) / count / 2**20

        row("GPU nvJPEG batch decode + crop/flip", 1, gpu_rate(paths, 1 if args.quick else 5),
            "decode_jpeg(list, device=cuda)")

        torch.set_num_threads(2)
        imagenet = build_transforms("imagenet", CROP, None, True).sample
        student_data = IndexedImageDataset(root, records, 3, imagenet, preload=True, preload_size=CACHE_SIDE,
                                           cache_dir=cache_dirs[0])
        student = student_steps(AugmentedViews(student_data, seeds), steps, batch_size, workers=2)

    load = os.getloadavg()
    print(f"\n{count} JPEGs {WIDTH}x{HEIGHT} (quality 90, crops of matplotlib's grace_hopper.jpg); "
          f"{cores} cores (load average {load[0]:.1f} at the end); decode rows: 1 process, 1 thread; "
          f"loader rows: 224-px crops; each the fastest of {repeats} runs")
    print_table(["path", "processes", "images/s", "images/s per core", "note"], rows)
    print("reduced/full decode: " + ", ".join(f"{n} px: scale 1/{r['scale']}, {r['speedup']:.2f}x"
                                              for n, r in reduced.items()))
    print(f"decoding is {100 * decode_share:.0f}% of full decode + imagenet transform time")
    print(f"verifying the 256-px cache at open: {cache.nbytes / verify_s / 2**30:.2f} GiB/s of pixels, "
          f"{verify_s / build_s:.1%} of its build time; CUB's 11,788 images: "
          f"{11788 * verify_s / count:.1f} s")
    print(f"memory per image: {cache_mib_per_image:.3f} MiB in the 256-px cache (page cache, shared), "
          f"{full_mib_per_image:.3f} MiB at full size (per process); CUB's 11,788 images: "
          f"{11788 * cache_mib_per_image / 1024:.2f} GiB vs {11788 * full_mib_per_image / 1024:.2f} GiB")
    print(f"ResNet-18 (timm, 224 px, batch {batch_size}, SGD, 2 threads) from the cache loader with 2 workers: "
          f"step {student['step_s']:.3f} s, data wait {student['wait_s'] * 1e3:.1f} ms = "
          f"{100 * student['wait_over_step']:.1f}% of the step (target <= 10%)")
    baseline = rates["imagenet, decode every epoch, 2 workers"]
    write_result("loader", {
        "quick": args.quick, "images": count, "cores": cores, "repeats": repeats, "load_average": load, "image_size": [WIDTH, HEIGHT],
        "images_per_second": rates, "images_per_second_per_core": per_core,
        "reduced_decode": {str(n): r for n, r in reduced.items()},
        "decode_share": decode_share,
        "verify_gib_per_s": cache.nbytes / verify_s / 2**30,
        "cache_speedup_2_workers": rates["imagenet, pixel cache 256, 2 workers"] / baseline,
        "cache_mib_per_image": cache_mib_per_image, "full_size_mib_per_image": full_mib_per_image,
        "cache_mib": cache.nbytes / 2**20,
        "gpu": rates.get("GPU nvJPEG batch decode + crop/flip") is not None,
        "student": {"model": "resnet18", "input": CROP, "batch_size": batch_size, "steps": steps, **student,
                    "target_met": student["wait_over_step"] <= 0.10},
    }, args.out)


if __name__ == "__main__":
    main()
