"""Smoke run of the streaming benchmark (``python -m benchmarks.bench_streaming``, 3 execs
and 5 MB through berthd's and containerd's CRI streaming servers): every row has a number,
so our client drove both servers. No timing is judged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.interop]

REPO = Path(__file__).resolve().parents[2]
ROWS = ("exec_cpu_ms", "exec_median_ms", "exec_p90_ms", "pf_mb_per_s", "pf_cpu_ms_per_mb")


def test_bench_streaming_smoke() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_streaming", "--execs", "3",
                           "--mb", "5"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                            "BERTH_SHIM_ZYGOTE_IDLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ROWS:
        assert re.search(rf"^{row}\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", done.stdout, re.M), (
            row, done.stdout)
