"""Smoke run of the dockerd benchmark (``python -m benchmarks.bench_docker --quick``).

It drives two real dockerds, one on berthd and one on containerd, so this checks that
every row and ratio came out with a number and that nothing was left behind. No timing
is judged.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.interop]

REPO = Path(__file__).resolve().parents[2]
MS = r"\d+\.\d+ ms"
RATIO = r"\d+\.\d+x"


def test_quick_run_prints_every_row_and_cleans_up() -> None:
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_docker", "--quick"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    out = p.stdout
    assert p.returncode == 0, (out[-4000:], p.stderr[-4000:])
    for label in ("dockerd on berthd ", "dockerd on containerd "):
        row = next(x for x in out.splitlines() if x.startswith(label))
        assert len(re.findall(MS, row)) == 4, row
    assert re.search(rf"ratio berth/containerd \(medians\): {RATIO}", out), out
    for sig in ("SIGTERM", "SIGKILL"):
        assert re.search(rf"{sig}: berthd median +{MS} .* ratio {RATIO}", out), out
    assert "cleanup: no containers, shims, bridges, iptables rules or mounts left" in out
    work = re.search(r"work dir (\S+)", out).group(1)
    assert not Path(work).exists()
