"""Quantized / reduced-precision evaluation: one file per precision or backend, registered in
:data:`PRECISIONS` (every module of this package is imported here, so adding a precision is
adding one file), plus measurement (:mod:`kdlib.quantize.measure`) and figures
(:mod:`kdlib.quantize.figures`)."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from kdlib.quantize.base import PRECISIONS, Prepared, QuantContext, Skipped, tensor_dtypes
from kdlib.schema import is_int, is_str_list, setting

# figures plots (matplotlib, about a second of every stage's start-up on a busy 2-core machine) and
# registers nothing: the report stage imports it itself
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "figures":
        importlib.import_module(f"{__name__}.{_module.name}")


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How models are evaluated and timed: the evaluation batch size, the precisions measured,
    intra-op threads, untimed warm-up calls, batch-1 calls timed (median and p95), the batch and
    number of batches of the throughput measurement, and the calibration images of static int8."""

    batch_size: int = setting(is_int(1))
    precisions: list[str] = setting(is_str_list)
    threads: int = setting(is_int(1))
    warmup_runs: int = setting(is_int(0))
    timed_runs: int = setting(is_int(1))
    throughput_batch: int = setting(is_int(2))
    throughput_runs: int = setting(is_int(1))
    calibration_images: int = setting(is_int(1))

    def problems(self) -> list[tuple[str | None, str]]:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            return [("precisions", f"{', '.join(map(repr, unknown))} not a known precision; expected some of: "
                                   f"{', '.join(PRECISIONS.names())}")]
        return []


__all__ = ["PRECISIONS", "EvalSettings", "Prepared", "QuantContext", "Skipped", "tensor_dtypes"]
