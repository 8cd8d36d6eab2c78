"""dockerd on berthd against dockerd on the real containerd, same machine, one run.

Run as root from the repository root::

    python -m benchmarks.bench_docker            # 30 runs, 5 restarts per signal
    python -m benchmarks.bench_docker --quick    # smoke: 3 runs, 1 restart per signal

Two stacks start side by side, each in its own folder: berthd + dockerd and the real
containerd + dockerd (Debian docker.io 20.10, started by hand as in
tests/interop/test_docker.py, each with its own bridge), and both load the same busybox
docker-archive. berthd and containerd log at the same level (``--log-level``, default info,
as a user runs them; the suite's daemons log at debug). Then:

1. ``docker run --rm busybox true``, one at a time, alternating between the stacks
   (which one goes first alternates too) so that drift on the machine hits both alike;
   the first rounds are warm-up. Median and p90 of the CLI's wall time, the ratio
   berth/containerd of the medians, and CPU per run of the daemon under test (berthd
   or containerd, with its shims' CPU not counted) and of dockerd.
2. The daemon under dockerd restarted (SIGTERM, then SIGKILL) with a container up: the
   time from starting the daemon's process again until ``docker exec CONTAINER true``
   through dockerd works again (polled every 20 ms), per stack, alternating.

Everything is loopback; both stacks are torn down at the end (containers, bridges,
iptables rules and chains, mounts), also when a step fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import dockerd as dockerds, images  # noqa: E402

GUARD = 60.0  # bounds each wait; nothing is measured by it
KINDS = ("berth", "containerd")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its children not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[max(0, -(-9 * len(xs) // 10) - 1)]


def ms(s: float) -> str:
    return f"{s * 1000:7.1f} ms"


class Stack:
    def __init__(self, kind: str, base: Path, level: str) -> None:
        self.kind = kind
        self.daemon, self.docker = dockerds.stack_on(kind, base, level=level)

    def daemon_pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def dockerd_pid(self) -> int:
        assert self.docker.proc is not None
        return self.docker.proc.pid


def run_once(s: Stack) -> float:
    t0 = time.perf_counter()
    r = s.docker.docker("run", "--rm", "busybox", "true", timeout=GUARD)
    dt = time.perf_counter() - t0
    if r.rc != 0:
        raise RuntimeError(f"{s.kind}: docker run failed: {r.err}")
    return dt


def restart_until_exec(s: Stack, sig: int, name: str) -> float:
    s.daemon.stop(sig)
    t0 = time.perf_counter()
    s.daemon.start()
    deadline = t0 + GUARD
    while True:
        r = s.docker.docker("exec", name, "true", timeout=GUARD)
        if r.rc == 0:
            return time.perf_counter() - t0
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{s.kind}: docker exec never worked again: {r.err}")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 runs, 1 warm-up, 1 restart")
    ap.add_argument("--log-level", default="info",
                    help="log level of berthd and containerd alike (a user's default: info)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.warmup, args.restarts = 3, 1, 1
    dockerds.require()
    base = Path(tempfile.mkdtemp(prefix="berth-bdk-", dir="/tmp"))
    stacks: dict[str, Stack] = {}
    left: list[str] = []
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs; "
          f"log level {args.log_level}; work dir {base}")
    try:
        for kind in KINDS:
            stacks[kind] = Stack(kind, base / kind, args.log_level)
        images.write_docker_tar(base / "busybox.tar")
        for s in stacks.values():
            s.docker.ok("load", "-i", str(base / "busybox.tar"))

        # 1. docker run --rm, interleaved
        times: dict[str, list[float]] = {k: [] for k in KINDS}
        cpu: dict[str, list[float]] = {k: [0.0, 0.0] for k in KINDS}
        for i in range(args.warmup + args.runs):
            order = KINDS if i % 2 == 0 else KINDS[::-1]
            for kind in order:
                s = stacks[kind]
                c0 = (cpu_seconds(s.daemon_pid()), cpu_seconds(s.dockerd_pid()))
                dt = run_once(s)
                if i >= args.warmup:
                    times[kind].append(dt)
                    cpu[kind][0] += cpu_seconds(s.daemon_pid()) - c0[0]
                    cpu[kind][1] += cpu_seconds(s.dockerd_pid()) - c0[1]
        print(f"\n== 1. docker run --rm busybox true ({args.runs} runs each after "
              f"{args.warmup} warm-up, interleaved)")
        print(f"{'':28} {'median':>10} {'p90':>10} {'daemon CPU/run':>15} "
              f"{'dockerd CPU/run':>16}")
        for kind in KINDS:
            label = "dockerd on berthd" if kind == "berth" else "dockerd on containerd"
            print(f"{label:28} {ms(statistics.median(times[kind])):>10} "
                  f"{ms(p90(times[kind])):>10} {ms(cpu[kind][0] / args.runs):>15} "
                  f"{ms(cpu[kind][1] / args.runs):>16}")
        ratio = statistics.median(times["berth"]) / statistics.median(times["containerd"])
        print(f"ratio berth/containerd (medians): {ratio:.2f}x")

        # 2. restart the daemon under dockerd, time until docker exec works again
        for s in stacks.values():
            s.docker.ok("run", "-d", "--name", "sleeper", "busybox", "sleep", "100000")
        print(f"\n== 2. daemon restarted under dockerd: until docker exec works again "
              f"({args.restarts} per signal, interleaved)")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            waits: dict[str, list[float]] = {k: [] for k in KINDS}
            for i in range(args.restarts):
                order = KINDS if i % 2 == 0 else KINDS[::-1]
                for kind in order:
                    waits[kind].append(restart_until_exec(stacks[kind], sig, "sleeper"))
            meds = {k: statistics.median(v) for k, v in waits.items()}
            print(f"{sig.name}: berthd median {ms(meds['berth'])} "
                  f"(max {ms(max(waits['berth']))}), containerd median "
                  f"{ms(meds['containerd'])} (max {ms(max(waits['containerd']))}); "
                  f"ratio {meds['berth'] / meds['containerd']:.2f}x")
    finally:
        for s in stacks.values():
            try:
                dockerds.teardown(s.daemon, s.docker)
            finally:
                left += dockerds.leftovers(s.docker)
                left += [f"process {p}" for p in subprocess.run(
                    ["pgrep", "-f", str(s.daemon.address)], capture_output=True,
                    text=True).stdout.split()]
        subprocess.run(["rm", "-rf", str(base)], check=False)
    print(f"\nload after: {os.getloadavg()[0]:.2f} (1 min)")
    if left:
        print(f"cleanup: LEFT BEHIND {left}")
        return 1
    print("cleanup: no containers, shims, bridges, iptables rules or mounts left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
