"""The unary benchmark in --quick mode: both daemons answer, a ratio comes out, nothing stays.

No timing is asserted: the point is that the benchmark itself keeps working (daemons
start, every h2load call is checked as a successful gRPC answer, the table is printed,
and the daemons and their folder are gone afterwards).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.interop]

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(
    r"^(?P<method>Version|Namespaces\.List)\s+(?P<callers>\d+)\s+(?P<containerd>\d+)\s+"
    r"(?P<berth>\d+)\s+(?P<ratio>\d+\.\d+)\s", re.MULTILINE)


def test_bench_unary_quick() -> None:
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_unary", "--quick"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr

    rows = {(m["method"], int(m["callers"])): m for m in ROW.finditer(p.stdout)}
    assert set(rows) == {(method, callers) for method in ("Version", "Namespaces.List")
                         for callers in (1, 16)}, p.stdout
    for row in rows.values():
        containerd, berth = int(row["containerd"]), int(row["berth"])
        assert containerd > 0 and berth > 0, p.stdout
        assert float(row["ratio"]) == pytest.approx(berth / containerd, abs=0.005), p.stdout

    # Each daemon's checked answer length, so h2load's byte count proved every call good.
    sizes = re.search(r"^answer sizes .*$", p.stdout, re.MULTILINE)
    assert sizes is not None, p.stdout
    for daemon in ("containerd", "berth"):
        for method in ("Version", "Namespaces.List"):
            assert re.search(rf"{daemon} {re.escape(method)}=\d+", sizes.group(0)), p.stdout

    workdir = re.search(r"^workdir: (\S+)", p.stdout, re.MULTILINE)
    assert workdir is not None, p.stdout
    assert not Path(workdir.group(1)).exists()
    leftover = subprocess.run(["pgrep", "-f", workdir.group(1)], capture_output=True, text=True)
    assert leftover.stdout == "", f"daemons still running: {leftover.stdout}"
