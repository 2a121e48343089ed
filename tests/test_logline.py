"""Progress as log lines where no bar draws (kdlib.logline): a short phase prints nothing, a long one a line
at most every `every` seconds with count, percent, rate and time left; the training loop's epoch lines."""
from __future__ import annotations

import logging

import pytest

from kdlib.logline import PhaseLog, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_logs_every_interval_with_rate_and_time_left(caplog) -> None:
    clock = Clock()
    phase = PhaseLog("evaluate", 1000, every=30.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="kdlib.progress"):
        for _ in range(10):  # 100 images a step, 10 s a step
            clock.now += 10.0
            phase.update(100, lambda: "loss 0.5")
    lines = [r.getMessage() for r in caplog.records]
    # at 30 s, 60 s and 90 s: 300, 600 and 900 of 1000 images at 10 images/s
    assert lines == [
        "evaluate: 300/1,000 images (30%)  10.0 images/s  elapsed 0:00:30  ETA 0:01:10  loss 0.5",
        "evaluate: 600/1,000 images (60%)  10.0 images/s  elapsed 0:01:00  ETA 0:00:40  loss 0.5",
        "evaluate: 900/1,000 images (90%)  10.0 images/s  elapsed 0:01:30  ETA 0:00:10  loss 0.5",
    ]


def test_a_short_or_disabled_phase_prints_nothing_and_computes_no_note(caplog) -> None:
    clock = Clock()
    never = lambda: pytest.fail("a note is read only when a line is written")  # noqa: E731
    with caplog.at_level(logging.INFO, logger="kdlib.progress"):
        short = PhaseLog("teacher cache", 50, clock=clock)
        for _ in range(50):
            clock.now += 0.1
            short.update(1, never)
        off = PhaseLog("evaluate", None, enabled=False, clock=clock)
        clock.now += 1000.0
        off.update(5, never)
    assert caplog.records == [] and off.done == 5
    unknown = PhaseLog("scan", None, clock=clock)
    clock.now += 4.0
    unknown.update(8)
    assert unknown.line(clock.now) == "scan: 8 images  2.0 images/s  elapsed 0:00:04"
    assert duration(3725.4) == "1:02:05"
