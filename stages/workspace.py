"""Where every stage reads and writes: one source for the pipeline's paths (``dvc.yaml`` names the same)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdlib.data.index import DatasetIndex, read_index

if TYPE_CHECKING:
    from stages.params import Run


@dataclass(frozen=True)
class Workspace:
    """Paths relative to ``root``: the repository for ``dvc repro``; a scratch directory when
    tests and benchmarks call the stage functions."""

    root: Path = Path(".")

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def downloads(self) -> Path:
        return self.root / "data" / "downloads"

    @property
    def index_files(self) -> list[Path]:
        """What the prepared data's identity is: every image's path, label, split and md5."""
        return [self.prepared / "index.csv", self.prepared / "dataset.json"]

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def checkpoint(self, role: str, which: str = "best") -> Path:
        return self.models / role / f"{which}.pt"

    @property
    def teacher_checkpoint(self) -> Path:
        return self.checkpoint("teacher")

    @property
    def teacher_cache(self) -> Path:
        return self.models / "teacher_cache"

    @property
    def align(self) -> Path:
        return self.models / "align"

    @property
    def align_checkpoint(self) -> Path:
        return self.align / "last.pt"

    @property
    def pixel_cache(self) -> Path:
        """Decoded training-size pixels (kdlib.data.pixel_cache): rebuilt from the data when gone,
        so neither git nor DVC tracks them."""
        return self.root / "data" / ".pixel-cache"

    def pixel_cache_for(self, run: "Run") -> tuple[Path, int]:
        """``DatasetSpec.load``'s ``cache_dir`` and ``cache_workers`` for ``run``."""
        return self.pixel_cache, run.params.data.num_workers

    def index(self) -> DatasetIndex:
        return read_index(self.prepared)
