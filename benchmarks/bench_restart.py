"""A restart with dead shims: how soon berthd and the real containerd serve again.

Run as root from the repository root::

    python -m benchmarks.bench_restart                   # 100 dead shims per daemon
    python -m benchmarks.bench_restart --containers 3    # smoke run
    python -m benchmarks.bench_restart --boot-only       # the daemons' plain boots only

berthd and the real containerd start side by side, each on a fresh root in one
temporary folder, and import the same busybox image (``tests.images``). On each,
N containers run ``sleep 1000`` with the real ``containerd-shim-runc-v2`` (ctr's
default runtime, started 8 at a time). Then, one daemon after the other:

1. the daemon is SIGKILLed and every shim of its containers too (the containers go on
   running, orphaned, as when a node's shims die with their daemon down);
2. the daemon is started again; measured from the moment its process is started:
   - **first answer**: ``ctr version`` answered (ctr runs as soon as the socket
     accepts a connection);
   - **all cleaned**: ``ctr tasks ls`` lists no task and no bundle is left in the
     daemon's state folder (containerd cleans up before it serves; berthd after);
   - the daemon's CPU time until then, its reaped children (the shims' ``delete``
     actions, runc) included;
3. for reference, a second restart with nothing to clean up (first answer only).

Before that, the daemons' own boot: each is started ``--boots`` times (alternating) on
a fresh root with nothing to recover, and the median is reported of the time from its
start until ``ctr version`` answered, and of the CPU time it had used by then (user +
system, all threads: the steadier number on a busy machine). ``--boot-only`` stops there;
``--drop-caches`` empties the page cache before each start (a boot from disk).

Ratios are berthd / containerd. The machine's load average is printed with the
results (the machine may be shared). Everything is removed at the end, also when a
step fails: containers, processes, mounts, cgroups.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import daemons, images  # noqa: E402

TASK_DIR = "io.containerd.runtime.v2.task"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Bounds on waits: a hang becomes an error, nothing is measured by them.
GUARD = 300.0
PARALLEL_STARTS = 8


class BenchError(Exception):
    pass


@dataclass
class Restart:
    first_answer: float
    all_cleaned: float
    cpu: float
    idle_first_answer: float = 0.0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), its children not counted."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of the children it reaped."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def wait_until(what: str, check: Callable[[], object], timeout: float = GUARD,
               pause: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"gave up waiting for {what}")
        time.sleep(pause)


def accepts(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Session:
    def __init__(self, base: Path, namespace: str) -> None:
        self.base = base
        self.namespace = namespace
        self.berth = daemons.berthd(base / "berth", "--log-level", "info")
        self.containerd = daemons.containerd(base / "containerd")
        self.ids: dict[str, list[str]] = {"berth": [], "containerd": []}

    def daemon(self, name: str) -> daemons.Daemon:
        return self.berth if name == "berth" else self.containerd

    def ctr(self, name: str, *args: str) -> daemons.Result:
        return daemons.ctr(self.daemon(name).address, *args, namespace=self.namespace,
                           timeout=GUARD)

    def ok(self, name: str, *args: str) -> str:
        r = self.ctr(name, *args)
        if r.rc != 0:
            raise BenchError(f"{name}: ctr {' '.join(args)}: {r.err.strip()}")
        return r.out

    def bundles(self, name: str) -> list[str]:
        d = self.daemon(name)
        # containerd's state holds the runtime's folder; berthd's state is its own.
        for state in (d.state / TASK_DIR / self.namespace, d.state / self.namespace):
            with contextlib.suppress(FileNotFoundError):
                return [e.name for e in os.scandir(state) if not e.name.startswith(".")]
        return []


def start_containers(s: Session, name: str, n: int) -> dict[str, int]:
    """N ``sleep 1000`` containers with the runc v2 shim; their init pids."""
    ids = [f"r{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    s.ids[name] += ids

    def run(cid: str) -> None:
        s.ok(name, "run", "-d", images.NAME, cid, "sleep", "1000")

    with ThreadPoolExecutor(PARALLEL_STARTS) as pool:
        list(pool.map(run, ids))
    listed = {}
    for line in s.ok(name, "tasks", "ls").splitlines()[1:]:
        cid, pid, status = line.split()
        listed[cid] = (int(pid), status)
    if sorted(listed) != sorted(ids) or {st for _, st in listed.values()} != {"RUNNING"}:
        raise BenchError(f"{name}: not all {n} containers run: {listed}")
    return {cid: pid for cid, (pid, _) in listed.items()}


def kill_with_shims(s: Session, name: str, pids: dict[str, int]) -> None:
    shims = {ppid_of(pid) for pid in pids.values()}
    for shim in shims:
        if "containerd-shim-runc-v2" not in cmdline(shim):
            raise BenchError(f"{name}: {shim} is no runc shim: {cmdline(shim)}")
    s.daemon(name).kill()
    for shim in shims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(shim, signal.SIGKILL)
    wait_until("the shims to die", lambda: not any(alive(p) for p in shims))


def start_timed(d: daemons.Daemon) -> tuple[float, int]:
    """Start the daemon: the seconds until ``ctr version`` answered, its pid."""
    d.address.parent.mkdir(parents=True, exist_ok=True)
    log = open(d.log_path, "ab")  # noqa: SIM115 - the child owns it from here
    began = time.monotonic()
    try:
        d.proc = subprocess.Popen(d.argv, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **d.env}, start_new_session=True)
    finally:
        log.close()
    wait_until(f"{d.name} to serve",
               lambda: d.proc.poll() is None and d.address.exists() and accepts(d.address),
               pause=0.002)
    r = daemons.ctr(d.address, "version", timeout=GUARD)
    answered = time.monotonic() - began
    if r.rc != 0:
        raise BenchError(f"{d.name}: ctr version: {r.err.strip()}")
    return answered, d.proc.pid


def restart(s: Session, name: str) -> tuple[float, int]:
    """Start the daemon again: the seconds until ``ctr version`` answered, its pid."""
    return start_timed(s.daemon(name))


@dataclass
class Boot:
    first_answer: float
    cpu: float


def drop_page_cache() -> None:
    """Start the next daemon from disk: its binary, libraries and (berthd) modules."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def boots(base: Path, n: int, cold: bool = False) -> dict[str, Boot]:
    """Median time to first answer and boot CPU of each daemon on fresh roots."""
    walls: dict[str, list[float]] = {"containerd": [], "berth": []}
    cpus: dict[str, list[float]] = {"containerd": [], "berth": []}
    for i in range(n):
        for name in ("containerd", "berth"):
            folder = base / f"boot-{name}-{i}"
            d = (daemons.berthd(folder, "--log-level", "info") if name == "berth"
                 else daemons.containerd(folder))
            if cold:
                drop_page_cache()
            try:
                wall, pid = start_timed(d)
                cpus[name].append(own_cpu_seconds(pid))
                walls[name].append(wall)
            finally:
                d.stop()
                shutil.rmtree(folder, ignore_errors=True)
    return {name: Boot(statistics.median(walls[name]), statistics.median(cpus[name]))
            for name in walls}


def measure(s: Session, name: str, n: int) -> Restart:
    pids = start_containers(s, name, n)
    kill_with_shims(s, name, pids)
    began = time.monotonic()
    first, pid = restart(s, name)

    def cleaned() -> bool:
        return s.ok(name, "tasks", "ls", "-q").strip() == "" and not s.bundles(name)

    wait_until(f"{name} to clean up after {n} dead shims", cleaned, pause=0.02)
    result = Restart(first, time.monotonic() - began, cpu_seconds(pid))
    stray = [p for p in pids.values() if alive(p)]
    if stray:
        raise BenchError(f"{name}: containers still running after the cleanup: {stray}")
    for cid in pids:
        s.ok(name, "containers", "rm", cid)
    s.ids[name] = []
    s.daemon(name).stop()
    result.idle_first_answer, _ = restart(s, name)
    return result


def cleanup(s: Session) -> list[str]:
    problems = []
    for name in ("berth", "containerd"):
        d = s.daemon(name)
        if d.proc is not None and d.proc.poll() is None:
            for cid in s.ids[name]:
                s.ctr(name, "tasks", "kill", "-s", "KILL", cid)
                s.ctr(name, "tasks", "rm", "-f", cid)
                s.ctr(name, "containers", "rm", cid)
        d.stop()
    for p in (int(x) for x in os.listdir("/proc") if x.isdigit()):
        if str(s.base) in cmdline(p) and p != os.getpid():
            problems.append(f"process {p} left: {cmdline(p)[:120]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if str(s.base) in line.split()[4]]
    for point in sorted(points, key=len, reverse=True):
        problems.append(f"mount left: {point}")
        subprocess.run(["umount", "-l", point], check=False)
    for top in CGROUP_ROOT.glob(f"*/{s.namespace}"):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True) + [top]:
            with contextlib.suppress(OSError):
                d.rmdir()
    shutil.rmtree(s.base, ignore_errors=True)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--containers", type=int, default=100,
                   help="dead shims per daemon (default 100)")
    p.add_argument("--boots", type=int, default=10,
                   help="starts per daemon with nothing to recover (default 10)")
    p.add_argument("--boot-only", action="store_true",
                   help="measure the boots only, no containers")
    p.add_argument("--drop-caches", action="store_true",
                   help="boots from a cold page cache (drops the machine's page cache "
                        "before each start)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_restart: run as root (containers, containerd)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="berth-bench-restart-", dir="/tmp"))
    base.chmod(0o755)
    s = Session(base, f"bench-restart-{uuid.uuid4().hex[:8]}")
    n = args.containers
    print(f"cpus: {os.cpu_count()}; kernel {platform.release()}; python "
          f"{platform.python_version()}; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(subprocess.run([daemons.CONTAINERD, "--version"], capture_output=True,
                         text=True).stdout.strip())
    # Without cached bytecode (PYTHONDONTWRITEBYTECODE, a fresh checkout) every berthd
    # start compiles berth's modules first: ~0.1-0.2 s of CPU that an installed wheel has not.
    daemon_py = Path(__file__).resolve().parent.parent / "core" / "daemon.py"
    cached = Path(importlib.util.cache_from_source(str(daemon_py))).exists()
    print(f"berth bytecode cached: {'yes' if cached else 'no'}")
    print(f"work dir {base}; namespace {s.namespace}; {n} dead runc-v2 shims per daemon")
    results: dict[str, Restart] = {}
    problems: list[str] = []
    try:
        booted = boots(base, args.boots, cold=args.drop_caches)
        cb, bb = booted["containerd"], booted["berth"]
        print(f"\n== boot with nothing to recover (fresh root, median of {args.boots} "
              f"starts each{', cold page cache' if args.drop_caches else ''}) ==")
        print(f"{'daemon':<12} {'first answer':>13} {'boot cpu':>9}")
        for label, r in (("containerd", cb), ("berthd", bb)):
            print(f"{label:<12} {r.first_answer:12.3f}s {r.cpu:8.2f}s")
        print(f"ratio berthd/containerd boot: first answer "
              f"{bb.first_answer / cb.first_answer:.2f}x, cpu "
              f"{bb.cpu / max(cb.cpu, 1 / CLK_TCK):.2f}x")
        print(f"load average after the boots {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if not args.boot_only:
            images.write_oci_tar(base / "busybox.tar")
            for name in ("containerd", "berth"):
                s.daemon(name).start()
                s.ok(name, "images", "import", str(base / "busybox.tar"))
            for name in ("containerd", "berth"):
                results[name] = measure(s, name, n)
        load = os.getloadavg()
    finally:
        problems = cleanup(s)
    if args.boot_only:
        return report_cleanup(problems)
    c, b = results["containerd"], results["berth"]
    print(f"\n== restart with {n} dead shims (seconds from the daemon's start) ==")
    print(f"{'daemon':<12} {'first answer':>13} {'all cleaned':>12} {'daemon cpu':>11} "
          f"{'cpu/dead shim':>14} {'first answer, nothing to clean':>31}")
    for label, r in (("containerd", c), ("berthd", b)):
        print(f"{label:<12} {r.first_answer:12.3f}s {r.all_cleaned:11.3f}s {r.cpu:10.2f}s "
              f"{r.cpu / n * 1000:11.1f} ms {r.idle_first_answer:30.3f}s")
    print(f"ratio berthd/containerd: first answer {b.first_answer / c.first_answer:.2f}x, "
          f"all cleaned {b.all_cleaned / c.all_cleaned:.2f}x, "
          f"cpu {b.cpu / c.cpu:.2f}x, "
          f"first answer with nothing to clean {b.idle_first_answer / c.idle_first_answer:.2f}x")
    print(f"load average after the runs {' '.join(f'{x:.2f}' for x in load)}")
    return report_cleanup(problems)


def report_cleanup(problems: list[str]) -> int:
    if problems:
        print("cleanup: " + "; ".join(problems))
        return 1
    print("cleanup: no containers, shims, mounts or cgroups left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
