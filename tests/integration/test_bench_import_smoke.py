"""The import benchmark runs end to end in its quick form and reports both rates.

No timing is asserted: only that the script built its image, imported and unpacked it
into both daemons (it checks the snapshots itself and exits non-zero otherwise) and
printed a rate for each and their ratio.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.interop]

REPO = Path(__file__).resolve().parents[2]


def test_bench_import_quick_prints_both_rates_and_the_ratio() -> None:
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_import", "--quick"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rates = dict(re.findall(r"^(containerd|berth) import\+unpack: ([\d.]+) MB/s", p.stdout,
                            flags=re.MULTILINE))
    assert set(rates) == {"containerd", "berth"}, p.stdout
    assert all(float(v) > 0 for v in rates.values()), p.stdout
    ratio = re.search(r"^ratio berth/containerd: ([\d.]+)$", p.stdout, flags=re.MULTILINE)
    assert ratio is not None, p.stdout
    # The ratio is berth's rate over containerd's, up to the rounding of what is printed
    # (rates to 0.1 MB/s, the ratio to 0.01).
    b, c = float(rates["berth"]), float(rates["containerd"])
    slack = 0.005 + (b / c) * (0.05 / b + 0.05 / c) * 1.01
    assert abs(float(ratio.group(1)) - b / c) <= slack, p.stdout
