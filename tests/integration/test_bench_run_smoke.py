"""Smoke run of the container-start benchmark (``python -m benchmarks.bench_run --quick``).

It drives berthd and the real containerd for real (three runs per variant, three
containers in parallel), so this checks that every row and ratio of the report came
out with numbers in it and that the run left nothing behind. No timing is judged.
"""

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
MS = rf"{NUMBER} ms"
RATIO = rf"{NUMBER}x"
VARIANTS = {
    "bi": "berthd + berth shim (in-process)",
    "br": "berthd + berth shim (runc)",
    "bv": "berthd + containerd-shim-runc-v2",
    "cr": "containerd + runc",
}
PHASES = ["/snapshot/prepare", "/containers/create", "serving", "/tasks/create",
          "/tasks/start", "/tasks/exit", "/tasks/delete", "/containers/delete", "ctr exit"]


def line(out: str, start: str) -> str:
    """The one report line that begins with ``start``."""
    found = [x for x in out.splitlines() if x.startswith(start)]
    assert len(found) == 1, (start, found, out)
    return found[0]


def sections(out: str) -> dict[str, str]:
    """The report's parts by number ("1" ... "4"; "0" before the first)."""
    parts: dict[str, list[str]] = {"0": []}
    current = "0"
    for x in out.splitlines():
        m = re.match(r"== (\d)\. ", x)
        if m:
            current = m.group(1)
            parts[current] = []
        parts[current].append(x)
    return {k: "\n".join(v) for k, v in parts.items()}


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(NUMBER, text)]


def test_quick_run_prints_every_row_and_ratio_and_cleans_up() -> None:
    assert os.geteuid() == 0, "the benchmark runs containers: run as root"
    p = subprocess.run([sys.executable, "-m", "benchmarks.bench_run", "--quick",
                        "--parallel-rounds", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    out = p.stdout
    assert p.returncode == 0, (p.returncode, out[-6000:], p.stderr[-6000:])
    assert p.stderr == "", p.stderr[-6000:]
    part = sections(out)
    assert sorted(part) == ["0", "1", "2", "3", "4"], out

    line(part["0"], "containerd: containerd")
    # berthd runs on this interpreter: the report names it
    assert os.path.realpath(sys.executable) in line(part["0"], "python 3.")
    assert "3 measured ctr run --rm per variant after 1 warm-up round(s) (not counted)" in out

    # 1. one at a time: median, p90, min and daemon CPU per variant, ratios to containerd
    one = part["1"]
    assert one.startswith("== 1. ctr run --rm IMG ID /bin/true") and "warm-up round(s) excl" in one
    for key, label in VARIANTS.items():
        row = line(one, label + " ")
        assert re.search(rf"({MS}\s+){{4}}", row), row
        tail = re.escape("1.00x (reference)") if key == "cr" else rf"{RATIO}$"
        assert re.search(tail, row), row
    header = line(one, "phase, ending at")
    assert header.split()[-4:] == list(VARIANTS)
    for topic in PHASES:
        cells = line(one, topic + ": ").split()[-4:]
        berth_only = topic == "serving"
        for key, cell in zip(VARIANTS, cells, strict=True):
            if berth_only and key in ("bv", "cr"):
                assert cell == "-", (topic, cells)
            else:
                assert re.fullmatch(NUMBER, cell), (topic, cells)
    for key in ("bi", "br"):
        assert re.search(MS, line(one, f"ctr start -> shim serving, {VARIANTS[key]}:"))
    cpu = line(one, "daemon cpu per run, berthd / containerd:")
    assert re.findall(rf"{RATIO} \((\w+)\)", cpu) == ["bi", "br", "bv"], cpu

    # 2. three at once, both daemons, and their ratio
    for label in ("berthd + berth shim (in-process), default",
                  "berthd + one berth shim for all (group)", "containerd + runc "):
        row = line(part["2"], label)
        assert len(re.findall(rf"{NUMBER}s", row)) == 4 and re.search(MS, row), row
    assert re.search(rf"all RUNNING: {RATIO} \(one shared shim: {RATIO}\)",
                     line(part["2"], "ratio berth/containerd, all RUNNING: "))
    # two rounds per daemon: each round's time, each round's ratio and their median
    rounds = line(part["2"], "all RUNNING over 2 rounds")
    assert len(re.findall(rf"{NUMBER}s", rounds)) == 4, rounds
    assert re.search(rf"median of 2 rounds: {RATIO} \({NUMBER}, {NUMBER}\); daemon cpu "
                     rf"{RATIO}$", line(part["2"], "ratio berth/containerd, all RUNNING, median")
                     ), part["2"]

    # 3. memory: daemons idle and per container; shims, zygote; ratios
    for daemon in ("berthd ", "containerd "):
        row = line(part["3"], daemon)
        assert len(re.findall(rf"{NUMBER} MB", row)) == 3 and row.endswith(" KB"), row
    for shim in ("berth shim (in-process runtime)", "berth zygote (one per daemon)",
                 "containerd-shim-runc-v2 ", "one berth shim serving all 3 "):
        row = line(part["3"], shim)
        assert len(re.findall(rf"{NUMBER} MB", row)) == 4, row
        assert all(n > 0 for n in numbers(row)), row
    assert len(re.findall(RATIO, line(part["3"], "ratio berth shim / runc-v2 shim"))) == 3
    assert re.search(rf": {RATIO}$", line(part["3"], "shim PSS per container"))
    assert re.search(rf"{NUMBER} MB: {RATIO} of containerd's$",
                     line(part["3"], "one shared shim, PSS per container"))

    # 4. Python start-up on the shim's path
    for label in ("python -I -S -c pass", "python -c pass", "containerd-shim-berth-v1 -v",
                  "python -c '<the start action's imports>'", "python: import + warm",
                  "-X importtime of the start action"):
        assert re.search(MS, line(part["4"], label)), label
    for label in ("shim start action alone, warm zygote:", "shim start action alone, no zygote:"):
        assert len(re.findall(MS, line(part["4"], label))) == 2, label

    # nothing left: the work folder, its processes, the namespace's cgroups
    assert "cleanup: no containers, shims, zygote, mounts or cgroups left" in out
    work = re.search(r"work dir (\S+)", out).group(1)
    namespace = re.search(r"namespace (\S+);", out).group(1)
    assert not os.path.exists(work)
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{namespace}"))
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert work.encode() not in cmdline, (pid, cmdline)
    with open("/proc/self/mountinfo") as f:
        assert work not in f.read()
