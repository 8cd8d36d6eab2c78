"""Smoke run of the restart benchmark (``python -m benchmarks.bench_restart``, 2 dead
shims per daemon): every row and ratio comes out with numbers, nothing is left. No
timing is judged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.interop]

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"\d+\.\d+"


def test_restart_benchmark_reports_both_daemons_and_cleans_up() -> None:
    assert os.geteuid() == 0, "the benchmark runs containers: run as root"
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_restart", "--containers", "2",
                        "--boots", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    out = p.stdout
    assert p.returncode == 0, (p.returncode, out[-4000:], p.stderr[-4000:])
    boot = out.split("== boot with nothing to recover", 1)[1].split("== restart", 1)[0]
    for daemon in ("containerd", "berthd"):
        (row,) = [x for x in boot.splitlines() if x.startswith(daemon + " ")]
        assert len(re.findall(rf"{NUMBER}s", row)) == 2, row
    assert re.search(rf"ratio berthd/containerd boot: first answer {NUMBER}x, cpu {NUMBER}x",
                     boot), boot
    table = out.split("== restart with 2 dead shims", 1)[1]
    for daemon in ("containerd", "berthd"):
        (row,) = [x for x in table.splitlines() if x.startswith(daemon + " ")]
        assert len(re.findall(rf"{NUMBER}s", row)) == 4 and re.search(rf"{NUMBER} ms", row), row
    ratios = next(x for x in out.splitlines() if x.startswith("ratio berthd/containerd: "))
    assert len(re.findall(rf"{NUMBER}x", ratios)) == 4, ratios
    assert re.search(rf"load average after the runs {NUMBER}", out)
    assert "cleanup: no containers, shims, mounts or cgroups left" in out
    work = re.search(r"work dir (\S+);", out).group(1)
    assert not os.path.exists(work)
