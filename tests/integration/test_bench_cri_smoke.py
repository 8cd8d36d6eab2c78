"""Smoke run of the CRI benchmark (``python -m benchmarks.bench_cri``, 2 pods serially
and 3 at once): every row and ratio has a number, and nothing is left running. No timing
is judged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.interop]

REPO = Path(__file__).resolve().parents[2]
ROWS = ("serial_start_ms", "serial_stop_ms", "serial_cpu_ms_per_pod", "parallel_start_s",
        "daemon_rss_kib_per_pod", "shims", "shim_pss_kib_per_pod", "parallel_stop_s",
        "parallel_cpu_ms_per_pod")


def test_bench_cri_smoke() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_cri", "--serial", "2",
                           "--parallel", "3"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                            # berth's warm shim zygote leaves soon after
                                            # its daemon, instead of 10 minutes after
                                            "BERTH_SHIM_ZYGOTE_IDLE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    for row in ROWS:
        assert re.search(rf"^{row}(\s+-?\d+\.\d+){{3}}$", done.stdout, re.M), (row, done.stdout)
    for side in ("berth/runc", "berth/berth"):
        assert re.search(rf"{side}: serial_start_ms=\d+\.\d+x", done.stdout), done.stdout
    deadline = time.monotonic() + 60  # bounds a failure; nothing is timed
    while True:
        left = subprocess.run(["pgrep", "-af", "berth-bench-cri-"], capture_output=True,
                              text=True).stdout.strip()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert left == "", f"processes of the benchmark are still running: {left}"
