"""Each benchmark's --quick run: it finishes, prints its table and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

EXPECTED_KEYS = {
    "kd_gain": {"seeds", "gain_mean", "gain_std", "teacher_top1", "target_met"},
    "throughput": {"stages", "target_met"},
    "pipeline": {"stage_seconds", "total_seconds", "noop_repro_seconds", "teacher_top1", "target_met"},
    "loader": {"images_per_second", "decode_share", "cache_speedup_2_workers"},
    "kd_cache": {"epoch_s_baseline", "epoch_s_online", "epoch_s_cached", "top1_cached", "top1_online",
                 "cached_minus_online_top1"},
    "methods": {"methods", "teacher_top1", "seeds"},
}
EXTRA_ARGS = {
    "kd_gain": ["--seeds", "0", "1"],
    "kd_cache": ["--seeds", "0"],
    "methods": ["--seeds", "0", "--groups", "cnn", "--methods", "kd", "lshl2"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_quick_benchmark_writes_its_result(name: str, tmp_path: Path) -> None:
    args = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--out", str(tmp_path),
            *EXTRA_ARGS.get(name, [])]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert EXPECTED_KEYS[name] <= set(result), set(result)
    assert result["quick"] is True and result["machine"]["cores"]
    assert "----" in proc.stdout  # the printed table
