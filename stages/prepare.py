"""prepare: data set → ImageFolder-style files + index.csv + dataset.json + manifest.

For the embedded default (layout ``mnist``) the verified idx files are written out as PNGs in
the ImageFolder layout first, so every data set goes through the same loading code.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from kdlib.data import LAYOUTS, DatasetMeta, build_manifest, write_index
from kdlib.data.mnist import export_imagefolder, load_mnist
from kdlib.data.prepare import index_from_scan
from stages.common import PREPARED_DIR, REPORTS_DIR, write_json
from stages.params import load_params


def main() -> None:
    params = load_params()
    name = params["dataset"]
    preset, data = params["datasets"][name], params["data"]
    staging = PREPARED_DIR.with_name(PREPARED_DIR.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    root, layout = Path(preset["root"]), preset["layout"]
    if layout == "mnist":
        export_imagefolder(load_mnist(root), staging / "images", data["train_per_class"],
                           data["val_per_class"], data["split_seed"])
        root, layout = staging / "images", "imagefolder"
    scan = LAYOUTS.get(layout)(root)
    final_root = PREPARED_DIR / "images" if root == staging / "images" else root
    meta = DatasetMeta(name, str(final_root), scan.classes, preset["channels"], preset["image_size"],
                       preset["mean"], preset["std"], extra={"layout": preset["layout"]})
    index = index_from_scan(scan, meta, preset.get("val_fraction", 0.1), preset.get("test_fraction", 0.2),
                            data["split_seed"])
    write_index(index, staging)
    # Swap in only a complete result: a failure above leaves no data/prepared for DVC to cache.
    shutil.rmtree(PREPARED_DIR, ignore_errors=True)
    staging.rename(PREPARED_DIR)
    manifest = build_manifest(index)
    write_json(REPORTS_DIR / "prepare" / "manifest.json", manifest)
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"prepared {name}: {len(scan.classes)} classes; {counts}")


if __name__ == "__main__":
    main()
