"""prepare: data set → ImageFolder-style files + index.csv + dataset.json + manifest.

Layouts with packed images (the embedded MNIST default, CIFAR) write them as image files into
the staging directory, so every data set goes through the same loading code.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdlib.data import LAYOUTS, DatasetIndex, DatasetMeta, build_manifest, write_index
from kdlib.data.fetch import fetch
from kdlib.data.prepare import index_from_scan
from stages.common import PREPARED_DIR, REPORTS_DIR, write_json
from stages.params import load_params

DOWNLOADS_DIR = "data/downloads"


def prepare(params: dict[str, Any], out_dir: Path) -> DatasetIndex:
    """Build the prepared data set in ``out_dir``; a failure leaves no ``out_dir`` behind."""
    name = params["dataset"]
    preset, data = params["datasets"][name], params["data"]
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        root, layout, options = Path(preset.get("root", "")), preset["layout"], dict(preset.get("options", {}))
        if preset.get("url"):  # download (checksum-verified, idempotent) and extract first
            fetched = fetch(preset["url"], Path(preset.get("download_dir", DOWNLOADS_DIR)),
                            sha256=preset.get("sha256"), md5=preset.get("md5"))
            root = fetched / preset.get("archive_subdir", "")
        if layout == "mnist":  # the embedded default's subset sizes are the `data` section's
            options.update(train_per_class=data["train_per_class"], val_per_class=data["val_per_class"],
                           test_per_class=data["test_per_class"], seed=data["split_seed"])
        staging.mkdir(parents=True, exist_ok=True)
        scan = LAYOUTS.get(layout)(root, staging=staging, **options)
        # packed layouts write their images under staging, which becomes out_dir below
        final_root = (out_dir / scan.root.relative_to(staging)) if scan.root.is_relative_to(staging) else scan.root
        meta = DatasetMeta(name, str(final_root), scan.classes, preset["channels"], preset["image_size"],
                           preset["mean"], preset["std"], task=scan.task, extra={"layout": preset["layout"]},
                           stored_size=scan.stored_size)
        index = index_from_scan(scan, meta, preset.get("val_fraction", 0.1), preset.get("test_fraction", 0.2),
                                data["split_seed"], preset.get("on_bad_image", "error"))
        write_index(index, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return index


def main() -> None:
    params = load_params()
    index = prepare(params, PREPARED_DIR)
    manifest = build_manifest(index)
    write_json(REPORTS_DIR / "prepare" / "manifest.json", manifest)
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"prepared {params['dataset']}: {index.meta.num_classes} classes; {counts}")


if __name__ == "__main__":
    main()
