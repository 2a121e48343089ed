"""Progress of a long phase as plain log lines, for logs without a terminal.

A progress bar (tqdm) draws only on a terminal; under ``dvc queue``, in a SLURM ``.out`` file or a CI log a
nine-hour run would print nothing until it ends. :class:`PhaseLog` writes one line at most every ``every``
seconds while work goes on — done and total, percent, rate and the time left, as timm's and DeiT's
``MetricLogger`` print them — so a short phase prints nothing and a long one shows where it is. It logs
through :mod:`logging` (the stages send kdlib's INFO lines to stderr, rank 0 only).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable

log = logging.getLogger("kdlib.progress")


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def on_terminal() -> bool:
    """Whether stderr is a terminal (where a progress bar draws instead)."""
    return sys.stderr.isatty()


class PhaseLog:
    """``update(n)`` after each piece of ``total`` (``None``: unknown); a line when ``every`` seconds have passed
    since the last one. ``enabled=False`` (another process than rank 0, or a terminal with its bar) logs nothing."""

    def __init__(self, what: str, total: int | None, unit: str = "images", every: float = 30.0,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.unit, self.every, self.enabled, self.clock = what, total, unit, every, enabled, clock
        self.done = 0
        self.start = self.last = clock()

    def update(self, n: int = 1, note: Callable[[], str] | None = None) -> None:
        """``note``: called only when a line is written (e.g. the current loss: reading it waits for the GPU)."""
        self.done += n
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now, note() if note is not None else ""))

    def line(self, now: float, note: str = "") -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.what}: {self.done:,}" + (f"/{self.total:,} {self.unit} ({100.0 * self.done / self.total:.0f}%)"
                                                  if self.total else f" {self.unit}"),
                 f"{rate:,.1f} {self.unit}/s", f"elapsed {duration(elapsed)}"]
        if self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        return "  ".join(parts) + (f"  {note}" if note else "")
