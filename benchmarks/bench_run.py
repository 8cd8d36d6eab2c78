"""Container start speed and memory of berthd and the real containerd, in one run.

Run as root from the repository root::

    python -m benchmarks.bench_run            # 20 runs per variant, 30 in parallel
    python -m benchmarks.bench_run --quick    # smoke: 3 runs per variant, 3 in parallel

berthd and the real containerd start side by side, each on a fresh root in one
temporary folder, both with their CRI plugin off (``--berth-cri`` keeps berthd's on),
and import the same busybox image (``tests.images``: built byte for byte the same on
every run). Then:

1. ``ctr run --rm IMG ID /bin/true``, one at a time, round-robin over four variants so
   that drift on the machine hits them alike: berthd + berth's shim with its in-process
   runtime, berthd + berth's shim driving runc (``--runtime-config-path`` naming
   ``binary_name = "runc"``), berthd + the real ``containerd-shim-runc-v2``, and the
   real containerd + runc (ctr's default runtime). The first rounds are warm-up and not
   counted (the zygote's first fork, cold page caches). Median and p90 of the wall time
   of the ``ctr`` process; the ratio of each berth variant to containerd + runc.
   ``ctr events`` runs against both daemons meanwhile, so each run's time splits into
   phases by the events' timestamps; for berth's shim the shim's "serving" log line
   adds the moment the shim took its socket.
2. N containers at once (``ctr run -d ... sleep 1000`` x N, all launched together):
   wall time until ``ctr tasks ls`` shows all of them RUNNING, berthd's default path
   (berth's shim, in-process runtime: what ``berth run`` uses) against containerd +
   runc. Then every task is killed and every container removed. More rounds
   (``--parallel-rounds``, default 3), alternating which daemon goes first, give the
   median ratio: one round is one sample of about a second and a half.
3. Memory, while the N containers run: each daemon's RSS idle (after start and image
   import) and its growth per running container; per shim RSS, PSS, USS
   (Private_Clean + Private_Dirty) and anonymous memory from /proc/PID/smaps_rollup,
   for berth's shims, for the zygote they are forked from (reported on its own line),
   and for containerd-shim-runc-v2.
4. Python start-up on the path: interpreter start, ``-X importtime`` of the shim's
   ``start`` action, that action timed alone against the warm zygote and without one,
   the time from ``start`` to the shim serving, and the import of the serving shim
   (what the zygote preloads, paid only by a cold start).

berthd runs on the interpreter that runs this script (printed first): run it from a
venv on the Python a deployment uses (Debian 12: ``/usr/bin/python3``, see README.md).

Everything is loopback and bounded; containers, shims, the zygote, mounts, cgroups and
ctr's FIFOs are removed at the end, also when a step fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from berth.core.shim import zygote  # noqa: E402
from tests import daemons, images  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SHIM = str(Path(sys.executable).with_name("containerd-shim-berth-v1"))
BERTH_RUNTIME = "io.containerd.berth.v1"
RUNC_V2 = "io.containerd.runc.v2"
GROUP_ANNOTATION = "io.containerd.berth.v1.group"
RUN_CONTAINERD = Path("/run/containerd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Bounds on waits: a hang becomes an error, nothing is measured by them.
GUARD = 120.0

# Reference numbers measured on this machine before, with containerd 1.6.20 + runc 1.1.5.
REFERENCE = {
    "ctr run --rm median": "0.17-0.22 s",
    "20 parallel ctr run -d": "1.46 s",
    "containerd idle RSS": "45 MB",
    "containerd-shim-runc-v2": "RSS 13.2 MB, anon 2.4 MB, PSS 2.9 MB",
}


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Variant:
    key: str      # short, also the container id prefix
    label: str
    daemon: str   # "berth" or "containerd"
    args: tuple[str, ...]
    berth_shim: bool = False


def variants(runc_config: Path) -> list[Variant]:
    return [
        Variant("bi", "berthd + berth shim (in-process)", "berth",
                ("--runtime", BERTH_RUNTIME), berth_shim=True),
        Variant("br", "berthd + berth shim (runc)", "berth",
                ("--runtime", BERTH_RUNTIME, "--runtime-config-path", str(runc_config)),
                berth_shim=True),
        Variant("bv", "berthd + containerd-shim-runc-v2", "berth", ("--runtime", RUNC_V2)),
        Variant("cr", "containerd + runc", "containerd", ()),
    ]


# -- small helpers -------------------------------------------------------------------------


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def p90(xs: Iterable[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    # Nearest rank: the smallest value with at least 90% of the samples at or below it.
    return xs[max(0, -(-9 * len(xs) // 10) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def mb(kib: float) -> str:
    return f"{kib / 1024:6.1f} MB"


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def ppid_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def pids_mentioning(text: str) -> set[int]:
    me = os.getpid()
    return {p for p in pids() if p != me and text in cmdline(p) and alive(p)}


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Anonymous, Private_* ... of a process in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    out["USS"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def wait_until(what: str, check: Callable[[], object], timeout: float = GUARD,
               interval: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"gave up waiting for {what}")
        time.sleep(interval)


def parse_go_time(text: str) -> float:
    """``2024-01-01 00:00:00.123456789 +0000 UTC`` (Go's Time.String) as epoch seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.(\d+))? ([+-]\d{4})", text)
    if not m:
        raise ValueError(text)
    base = dt.datetime.strptime(m.group(1) + " " + m.group(3), "%Y-%m-%d %H:%M:%S %z")
    return base.timestamp() + float("0." + (m.group(2) or "0"))


def parse_iso(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- the session: daemons, namespace, cleanup ------------------------------------------------


@dataclass
class Session:
    base: Path
    level: str
    cri: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    berth: daemons.Daemon | None = None
    containerd: daemons.Daemon | None = None
    sockets_before: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return f"bench-run-{self.token}"

    def cid(self, prefix: str, i: int) -> str:
        return f"{prefix}{i}-{self.token}"

    def daemon(self, name: str) -> daemons.Daemon:
        d = self.berth if name == "berth" else self.containerd
        assert d is not None
        return d

    def ctr(self, name: str, *args: str, timeout: float = GUARD) -> daemons.Result:
        return daemons.ctr(self.daemon(name).address, *args, namespace=self.namespace,
                           timeout=timeout)

    def ctr_ok(self, name: str, *args: str, timeout: float = GUARD) -> str:
        r = self.ctr(name, *args, timeout=timeout)
        if r.rc != 0:
            raise BenchError(f"{name}: ctr {' '.join(args)}: rc={r.rc}: {r.err.strip()}\n"
                             f"{self.daemon(name).logs()[-3000:]}")
        return r.out

    def start(self) -> None:
        self.sockets_before = runc_shim_sockets()
        extra: tuple[str, ...] = ()
        if not self.cri:
            # containerd runs with its CRI plugin disabled (tests/daemons.py); berthd alike,
            # so neither pays for a plugin the other skips.
            folder = self.base / "berth"
            folder.mkdir(parents=True, exist_ok=True)
            cfg = folder / "config.toml"
            cfg.write_text('disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                           '[plugins."io.berth.network.v1.cni"]\n'
                           f'conf_dir = "{folder / "cni" / "net.d"}"\n')
            extra = ("--config", str(cfg))
        self.berth = daemons.berthd(self.base / "berth", "--log-level", self.level,
                                    *extra).start()
        d = daemons.containerd(self.base / "containerd")
        cfg = d.base / "config.toml"
        # The same log level as berthd, so neither pays for output the other skips.
        cfg.write_text(re.sub(r'(?m)^(\s*level\s*=\s*)"\w+"', rf'\1"{self.level}"',
                              cfg.read_text()))
        self.containerd = d.start()

    def tasks(self, name: str) -> dict[str, tuple[int, str]]:
        """``ctr tasks ls`` as {id: (pid, status)}."""
        lines = self.ctr_ok(name, "tasks", "ls").splitlines()
        return {f[0]: (int(f[1]), f[2]) for f in (line.split() for line in lines[1:]) if f}

    def remove_all(self, name: str) -> None:
        """Kill and remove every task and container of the namespace (best effort)."""
        d = self.daemon(name)
        if d.proc is None or d.proc.poll() is not None:
            return
        tasks = self.ctr(name, "tasks", "ls", "-q")
        ids = tasks.out.split() if tasks.rc == 0 else []
        if ids:
            self.ctr(name, "tasks", "rm", "-f", *ids)
        containers = self.ctr(name, "containers", "ls", "-q")
        ids = containers.out.split() if containers.rc == 0 else []
        if ids:
            self.ctr(name, "containers", "rm", *ids)

    def close(self) -> list[str]:
        """Stop everything and remove what runs or lies around; what was still left."""
        for name in ("berth", "containerd"):
            d = self.berth if name == "berth" else self.containerd
            if d is None:
                continue
            try:
                self.remove_all(name)
            except (BenchError, subprocess.TimeoutExpired, OSError):
                pass
            d.stop()
        if self.berth is not None:
            zygote.stop(zygote.zygote_path(str(self.berth.address)))
        # Containers first (their cgroups name them), then shims and the zygote (their
        # command lines name the daemons' sockets under our folder).
        for _ in range(3):
            victims = cgroup_pids(self.namespace) | pids_mentioning(str(self.base))
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                wait_until("killed processes to go", lambda v=victims: not any(
                    alive(p) for p in v), timeout=10)
            except BenchError:
                pass
        runc_root = RUN_CONTAINERD / "runc" / self.namespace
        if runc_root.is_dir():
            for cid in os.listdir(runc_root):
                subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid],
                               capture_output=True, check=False, timeout=30)
            shutil.rmtree(runc_root, ignore_errors=True)
        for point in sorted(mounts_under(self.base), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        remove_cgroup_tree(self.namespace)
        remove_fifo_dirs(self.token)
        remove_dead_sockets(runc_shim_sockets() - self.sockets_before)
        left: list[str] = []
        procs = cgroup_pids(self.namespace) | pids_mentioning(str(self.base))
        if procs:
            left.append(f"processes {sorted(procs)}")
        if mounts_under(self.base):
            left.append(f"mounts {mounts_under(self.base)}")
        if cgroup_dirs(self.namespace):
            left.append(f"cgroups {cgroup_dirs(self.namespace)}")
        shutil.rmtree(self.base, ignore_errors=True)
        return left


def cgroup_dirs(namespace: str) -> list[Path]:
    return [d for d in CGROUP_ROOT.glob(f"*/{namespace}") if d.is_dir()]


def cgroup_pids(namespace: str) -> set[int]:
    found: set[int] = set()
    for top in cgroup_dirs(namespace):
        for procs in top.rglob("cgroup.procs"):
            try:
                found |= {int(x) for x in procs.read_text().split()}
            except (OSError, ValueError):
                pass
    return {p for p in found if alive(p)}


def remove_cgroup_tree(namespace: str) -> None:
    for _ in range(50):
        for top in cgroup_dirs(namespace):
            for d in sorted((p for p in top.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True) + [top]:
                try:
                    d.rmdir()
                except OSError:
                    pass
        if not cgroup_dirs(namespace):
            return
        time.sleep(0.1)


def mounts_under(prefix: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4]
            if point.startswith(str(prefix)):
                out.append(point)
    return out


def remove_fifo_dirs(token: str) -> None:
    """ctr's FIFO folders (under /run/containerd/fifo) of this run's containers."""
    fifo = RUN_CONTAINERD / "fifo"
    try:
        dirs = list(fifo.iterdir())
    except FileNotFoundError:
        return
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        if names and all(f"-{token}-" in n for n in names):
            shutil.rmtree(d, ignore_errors=True)


def runc_shim_sockets() -> set[str]:
    try:
        return {str(RUN_CONTAINERD / "s" / n) for n in os.listdir(RUN_CONTAINERD / "s")}
    except FileNotFoundError:
        return set()


def remove_dead_sockets(paths: Iterable[str]) -> None:
    """Sockets of killed runc shims (containerd 1.6 leaves them): only unserved ones."""
    for path in paths:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        except OSError:
            pass
        finally:
            probe.close()


# -- 1. one container at a time ----------------------------------------------------------------


@dataclass
class RunRecord:
    variant: str
    cid: str
    t0: float   # epoch seconds when ctr was started
    t1: float   # epoch seconds when it exited
    wall: float
    measured: bool
    daemon_cpu: float  # CPU seconds the daemon spent meanwhile


def run_rm(s: Session, v: Variant, cid: str, measured: bool) -> RunRecord:
    argv = [daemons.CTR, "--address", str(s.daemon(v.daemon).address), "--namespace",
            s.namespace, "run", "--rm", *v.args, images.NAME, cid, "/bin/true"]
    daemon = s.daemon(v.daemon)
    assert daemon.proc is not None
    cpu0 = cpu_seconds(daemon.proc.pid)
    t0 = time.time()
    start = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=GUARD)
    wall = time.perf_counter() - start
    t1 = time.time()
    cpu = cpu_seconds(daemon.proc.pid) - cpu0
    if p.returncode != 0:
        raise BenchError(f"{v.label}: ctr run --rm {cid} failed (rc={p.returncode}): "
                         f"{p.stderr.strip()}\n{daemon.logs()[-3000:]}")
    return RunRecord(v.key, cid, t0, t1, wall, measured, cpu)


EVENT_LINE = re.compile(r"^(\S+ \S+ [+-]\d{4} \S+) (\S+) (/\S+) (\{.*\})$")
# Event topics in the order one ``ctr run --rm`` publishes them; the phase shown is
# the time from the previous mark to this one.
PHASES = [
    ("/snapshot/prepare", "ctr start-up, lease, snapshot prepared"),
    ("/containers/create", "container record created"),
    ("serving", "task create sent .. shim serving (berth shim only)"),
    ("/tasks/create", "shim started .. task created"),
    ("/tasks/start", "task started"),
    ("/tasks/exit", "process ran and exited"),
    ("/tasks/delete", "task deleted (shim torn down)"),
    ("/containers/delete", "container and snapshot removed"),
    ("ctr exit", "ctr exits"),
]


def event_marks(lines: Iterable[str], namespace: str) -> dict[str, dict[str, float]]:
    """{container id: {topic: epoch seconds}} from ``ctr events`` lines."""
    out: dict[str, dict[str, float]] = {}
    for line in lines:
        m = EVENT_LINE.match(line)
        if not m or m.group(2) != namespace:
            continue
        try:
            payload = json.loads(m.group(4))
        except ValueError:
            continue
        cid = payload.get("container_id") or payload.get("id") or payload.get("key")
        if not cid:
            continue
        out.setdefault(cid, {}).setdefault(m.group(3), parse_go_time(m.group(1)))
    return out


def serving_marks(log: str, namespace: str) -> dict[str, float]:
    """{container id: time} of berth shims' "serving" lines in berthd's log."""
    out: dict[str, float] = {}
    pattern = re.compile(r"time=(\S+) level=info msg=serving namespace=" + re.escape(namespace)
                         + r" id=(\S+)")
    for line in log.splitlines():
        m = pattern.search(line)
        if m:
            out.setdefault(m.group(2), parse_iso(m.group(1)))
    return out


def phase_table(records: list[RunRecord], marks: dict[str, dict[str, float]]
                ) -> dict[str, list[float]]:
    """Per phase, the durations over the runs in which every mark was seen."""
    out: dict[str, list[float]] = {}
    for r in records:
        got = {**marks.get(r.cid, {}), "ctr exit": r.t1}
        prev = r.t0
        for topic, _ in PHASES:
            if topic not in got:
                continue
            out.setdefault(topic, []).append(got[topic] - prev)
            prev = got[topic]
    return out


def sequential(s: Session, vs: list[Variant], runs: int, warmup: int
               ) -> tuple[list[RunRecord], dict[str, dict[str, float]]]:
    """The round-robin ``ctr run --rm`` runs, and the event (and "serving") marks of
    each container as {id: {topic: epoch seconds}}."""
    followers = {name: daemons.ctr_events(s.daemon(name).address)
                 for name in ("berth", "containerd")}
    records: list[RunRecord] = []
    try:
        for name, f in followers.items():
            daemons.wait_subscribed(f, s.daemon(name).address)
        for i in range(warmup + runs):
            for v in vs:
                records.append(run_rm(s, v, s.cid(v.key, i), measured=i >= warmup))
        # The last /containers/delete is published before ctr exits; give the
        # followers a moment to print it.
        time.sleep(0.5)
    finally:
        lines: list[str] = []
        for f in followers.values():
            f.stop()
            while not f.lines.empty():
                line = f.lines.get()
                if line is not None:
                    lines.append(line)
    marks = event_marks(lines, s.namespace)
    for cid, t in serving_marks(s.daemon("berth").logs(), s.namespace).items():
        marks.setdefault(cid, {})["serving"] = t
    return records, marks


# -- 2. many at once ---------------------------------------------------------------------------


@dataclass
class Parallel:
    daemon: str
    label: str
    n: int
    all_returned: float
    all_running: float
    ids: list[str]
    daemon_cpu: float


def parallel(s: Session, name: str, label: str, args: tuple[str, ...], n: int,
             prefix: str) -> Parallel:
    ids = [s.cid(prefix, i) for i in range(n)]
    daemon = s.daemon(name)
    assert daemon.proc is not None
    base = [daemons.CTR, "--address", str(daemon.address), "--namespace", s.namespace,
            "run", "-d", *args, images.NAME]
    cpu0 = cpu_seconds(daemon.proc.pid)
    start = time.perf_counter()
    procs = [subprocess.Popen([*base, cid, "sleep", "1000"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cid in ids]
    failed = []
    for cid, p in zip(ids, procs, strict=True):
        out, err = p.communicate(timeout=GUARD)
        if p.returncode != 0:
            failed.append(f"{cid}: rc={p.returncode} {err.decode(errors='replace').strip()}")
    returned = time.perf_counter() - start
    if failed:
        raise BenchError(f"{label}: ctr run -d failed: {failed[:3]}\n"
                         f"{s.daemon(name).logs()[-3000:]}")

    def all_running() -> bool:
        tasks = s.tasks(name)
        return all(tasks.get(cid, (0, ""))[1] == "RUNNING" for cid in ids)

    wait_until(f"{n} {label} tasks to be RUNNING", all_running)
    running = time.perf_counter() - start
    return Parallel(name, label, n, returned, running, ids,
                    cpu_seconds(daemon.proc.pid) - cpu0)


def remove_parallel(s: Session, p: Parallel) -> float:
    start = time.perf_counter()
    s.ctr_ok(p.daemon, "tasks", "rm", "-f", *p.ids)
    s.ctr_ok(p.daemon, "containers", "rm", *p.ids)
    left = s.ctr_ok(p.daemon, "containers", "ls", "-q").split()
    if set(left) & set(p.ids):
        raise BenchError(f"{p.label}: containers left after removal: {left}")
    return time.perf_counter() - start


# -- 3. memory ---------------------------------------------------------------------------------


@dataclass
class ShimMemory:
    label: str
    rows: list[dict[str, int]]
    cpu: list[float]  # per shim, with its reaped children, since it started
    zygote: dict[str, int] | None = None

    def med(self, key: str) -> float:
        return median(r[key] for r in self.rows)

    def total_pss(self) -> int:
        return sum(r["Pss"] for r in self.rows) + (self.zygote or {}).get("Pss", 0)


def shims_of(s: Session, name: str, ids: list[str]) -> list[int]:
    """The shim of each task: the parent (a subreaper) of the task's process."""
    tasks = s.tasks(name)
    shims = []
    for cid in ids:
        pid = tasks[cid][0]
        shim = ppid_of(pid)
        if "containerd-shim" not in cmdline(shim):
            raise BenchError(f"{cid}: parent {shim} of task {pid} is no shim: {cmdline(shim)}")
        shims.append(shim)
    return shims


def rss_kib(pid: int) -> int:
    return smaps_rollup(pid)["Rss"]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of a process (all its threads), and with ``children`` that
    of the children it has reaped (a shim's runc, or its container set-up processes)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


# -- 4. Python start-up ------------------------------------------------------------------------


def timed(argv: list[str], repeat: int, env: dict[str, str] | None = None
          ) -> tuple[float, float]:
    """Median and minimum wall time of running ``argv`` (which must succeed)."""
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, cwd="/", env=env, timeout=GUARD)
        walls.append(time.perf_counter() - start)
        if p.returncode != 0:
            raise BenchError(f"{argv}: rc={p.returncode}: {p.stderr.decode()[-2000:]}")
    return median(walls), min(walls)


def importtime(code: str, repeat: int) -> tuple[float, list[tuple[str, int, int]]]:
    """``-X importtime`` of ``code``: the median total and that run's top-level imports
    as (module, cumulative us, self us), biggest first."""
    runs = []
    for _ in range(repeat):
        p = subprocess.run([PYTHON, "-X", "importtime", "-c", code], capture_output=True,
                           text=True, cwd="/", timeout=GUARD)
        if p.returncode != 0:
            raise BenchError(f"importtime {code!r}: {p.stderr[-2000:]}")
        top = []
        for line in p.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if m and m.group(3) == " ":
                top.append((m.group(4), int(m.group(2)), int(m.group(1))))
        runs.append((sum(c for _, c, _ in top) / 1e6, sorted(top, key=lambda t: -t[1])))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


@dataclass
class StartProbe:
    action: float    # wall time of the ``start`` process
    serving: float   # from launching ``start`` to the shim's "serving" log line


def probe_start(s: Session, i: int, use_zygote: bool) -> StartProbe:
    """Run the shim's ``start`` action alone (as berthd would) in a scratch bundle, time
    it and the moment its shim serves, then stop that shim."""
    berth = s.daemon("berth")
    cid = f"probe{'z' if use_zygote else 'c'}{i}-{s.token}"
    bundle = s.base / "probes" / cid
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    env = {**os.environ, "TTRPC_ADDRESS": str(berth.ttrpc_address),
           "BERTH_SHIM_ZYGOTE": "1" if use_zygote else "0"}
    argv = [SHIM, "-namespace", s.namespace, "-address", str(berth.address),
            "-publish-binary", str(Path(PYTHON).with_name("berthd")), "-id", cid, "start"]
    t0 = time.time()
    start = time.perf_counter()
    p = subprocess.run(argv, cwd=bundle, env=env, input=b"", capture_output=True,
                       timeout=GUARD)
    action = time.perf_counter() - start
    if p.returncode != 0:
        raise BenchError(f"shim start probe: rc={p.returncode}: {p.stderr.decode()}")
    log = bundle / "log"

    def served() -> float | None:
        try:
            m = re.search(r"time=(\S+) level=info msg=serving", log.read_text())
        except FileNotFoundError:
            return None
        return parse_iso(m.group(1)) if m else None

    t_serving = wait_until("the probe shim to serve", served)
    assert isinstance(t_serving, float)
    shims = [pid for pid in pids() if _cwd(pid) == str(bundle) and alive(pid)]
    for pid in shims:
        os.kill(pid, signal.SIGTERM)
    wait_until("the probe shim to exit", lambda: not any(alive(p) for p in shims), timeout=30)
    return StartProbe(action, t_serving - t0)


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


# -- report ------------------------------------------------------------------------------------


def environment() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ver = subprocess.run([daemons.CONTAINERD, "--version"], capture_output=True,
                         text=True).stdout.strip()
    runc = subprocess.run(["runc", "--version"], capture_output=True, text=True
                          ).stdout.splitlines()[:1]
    load = os.getloadavg()[0]
    return (f"cpus: {os.cpu_count()} x {model}; kernel {platform.release()}; "
            f"load average {load:.2f}\n{interpreter()}\n"
            f"containerd: {ver}\nrunc: {' '.join(runc)}")


def interpreter() -> str:
    """The Python berthd and its shims run on (this one): a daemon's CPU per call depends
    on how the interpreter was built as much as on berth's code. Debian's python3 (what
    the README's install command uses on Debian 12) is one executable built with PGO and
    LTO; a self-built CPython (pyenv's default) calls into a shared libpython made
    without them, on which berthd spent 10-20% more CPU per call and per run here."""
    with open("/proc/self/maps") as f:
        shared = any("libpython" in line for line in f)
    return (f"python {platform.python_version()}: {os.path.realpath(sys.executable)}, "
            f"{'calls a shared libpython' if shared else 'libpython linked in'}")


def report_sequential(s: Session, vs: list[Variant], runs: int, warmup: int) -> None:
    records, marks = sequential(s, vs, runs, warmup)
    measured = {v.key: [r for r in records if r.variant == v.key and r.measured] for v in vs}
    walls = {k: [r.wall for r in rs] for k, rs in measured.items()}
    ref = median(walls["cr"])
    print(f"\n== 1. ctr run --rm IMG ID /bin/true: one at a time, {runs} runs per variant, "
          f"round-robin; {warmup} warm-up round(s) excluded ==")
    print(f"{'variant':<36} {'median':>10} {'p90':>10} {'min':>10} {'daemon cpu':>10}"
          f"   ratio to containerd+runc (median)")
    for v in vs:
        w = walls[v.key]
        cpu = statistics.fmean(r.daemon_cpu for r in measured[v.key])
        ratio = "1.00x (reference)" if v.key == "cr" else f"{median(w) / ref:.2f}x"
        print(f"{v.label:<36} {ms(median(w))} {ms(p90(w))} {ms(min(w))} {ms(cpu)}   {ratio}")
    print("(daemon cpu: mean CPU time berthd or containerd spent per run; reference "
          f"before: containerd + runc median {REFERENCE['ctr run --rm median']})")
    ref_cpu = statistics.fmean(r.daemon_cpu for r in measured["cr"])
    print("daemon cpu per run, berthd / containerd: " + ", ".join(
        f"{statistics.fmean(r.daemon_cpu for r in measured[v.key]) / ref_cpu:.2f}x ({v.key})"
        for v in vs if v.key != "cr"))

    phases = {v.key: phase_table(measured[v.key], marks) for v in vs}
    print("\nwhere the time goes: median ms per phase, from the timestamps of the events "
          "(ctr events) and of the berth shim's 'serving' log line")
    print(f"{'phase, ending at':<58}" + "".join(f"{v.key:>8}" for v in vs))
    for topic, text in PHASES:
        if not any(topic in phases[v.key] for v in vs):
            continue
        cells = "".join(f"{median(phases[v.key][topic]) * 1000:8.1f}"
                        if topic in phases[v.key] else f"{'-':>8}" for v in vs)
        print(f"{topic + ': ' + text:<58}" + cells)
    print("columns: " + "; ".join(f"{v.key} = {v.label}" for v in vs))
    for v in vs:
        to_serving = [marks[r.cid]["serving"] - r.t0 for r in measured[v.key]
                      if "serving" in marks.get(r.cid, {})]
        if v.berth_shim and to_serving:
            print(f"ctr start -> shim serving, {v.label}: median {ms(median(to_serving))}")


def report_parallel_and_memory(s: Session, n: int, idle: dict[str, int], rounds: int
                               ) -> None:
    before = {name: rss_kib(s.daemon(name).proc.pid) for name in ("berth", "containerd")}
    print(f"\n== 2. {n} x ctr run -d IMG ID sleep 1000, all launched at once ==")
    par_b = parallel(s, "berth", "berthd + berth shim (in-process), default", (
        "--runtime", BERTH_RUNTIME), n, "pb")
    during = {"berth": rss_kib(s.daemon("berth").proc.pid)}
    shims_b = shims_of(s, "berth", par_b.ids)
    mem_b = ShimMemory("berth shim (in-process runtime)", [smaps_rollup(p) for p in shims_b],
                       [cpu_seconds(p, children=True) for p in shims_b])
    parents = {ppid_of(pid) for pid in shims_b}
    if len(parents) == 1 and "containerd-shim-berth" in cmdline(next(iter(parents))):
        mem_b.zygote = smaps_rollup(next(iter(parents)))
    rm_b = remove_parallel(s, par_b)
    # The same through one shared shim: berth's group annotation (as a CRI pod's
    # containers share the runc shim), to show the memory cost of a container alone.
    par_g = parallel(s, "berth", "berthd + one berth shim for all (group)", (
        "--runtime", BERTH_RUNTIME, "--annotation", f"{GROUP_ANNOTATION}={s.namespace}"),
        n, "pg")
    shims_g = sorted(set(shims_of(s, "berth", par_g.ids)))
    if len(shims_g) != 1:
        raise BenchError(f"grouped containers run in {len(shims_g)} shims, not one")
    mem_g = ShimMemory(f"one berth shim serving all {n}", [smaps_rollup(shims_g[0])],
                       [cpu_seconds(shims_g[0], children=True) / n])
    rm_g = remove_parallel(s, par_g)
    par_c = parallel(s, "containerd", "containerd + runc", (), n, "pc")
    during["containerd"] = rss_kib(s.daemon("containerd").proc.pid)
    shims_c = shims_of(s, "containerd", par_c.ids)
    mem_c = ShimMemory("containerd-shim-runc-v2", [smaps_rollup(p) for p in shims_c],
                       [cpu_seconds(p, children=True) for p in shims_c])
    rm_c = remove_parallel(s, par_c)
    print(f"{'daemon + path':<44} {'all ctr done':>12} {'all RUNNING':>12} {'removal':>9} "
          f"{'daemon cpu':>11} {'shim cpu':>9}")
    for par, rm, mem in ((par_b, rm_b, mem_b), (par_g, rm_g, mem_g), (par_c, rm_c, mem_c)):
        print(f"{par.label:<44} {par.all_returned:11.2f}s {par.all_running:11.2f}s "
              f"{rm:8.2f}s {par.daemon_cpu:10.2f}s {ms(statistics.fmean(mem.cpu))}")
    print(f"ratio berth/containerd, all RUNNING: {par_b.all_running / par_c.all_running:.2f}x"
          f" (one shared shim: {par_g.all_running / par_c.all_running:.2f}x)"
          f"  (reference before: 20 in parallel on containerd + runc "
          f"{REFERENCE['20 parallel ctr run -d']})")
    if rounds > 1:
        # One round of 30 is one sample of ~1.5 s on a shared machine: more rounds,
        # alternating which daemon goes first, and the median of their ratios.
        pairs = [(par_b, par_c)]
        for r in range(1, rounds):
            order = ("containerd", "berth") if r % 2 else ("berth", "containerd")
            got = {}
            for name in order:
                args = ("--runtime", BERTH_RUNTIME) if name == "berth" else ()
                got[name] = parallel(s, name, name, args, n, f"p{name[0]}r{r}-")
                remove_parallel(s, got[name])
            pairs.append((got["berth"], got["containerd"]))
        ratios = [b.all_running / c.all_running for b, c in pairs]
        # Over all rounds: CPU is counted in clock ticks, too coarse for a small round.
        cpu_c = sum(c.daemon_cpu for _, c in pairs)
        cpu = f"{sum(b.daemon_cpu for b, _ in pairs) / cpu_c:.2f}x" if cpu_c else "n/a"
        print(f"all RUNNING over {rounds} rounds (alternating which daemon goes first): "
              f"berth {' '.join(f'{b.all_running:.2f}s' for b, _ in pairs)}; containerd "
              f"{' '.join(f'{c.all_running:.2f}s' for _, c in pairs)}")
        print(f"ratio berth/containerd, all RUNNING, median of {rounds} rounds: "
              f"{median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)}); "
              f"daemon cpu {cpu}")
    print("(all RUNNING: from launching the ctr processes until ctr tasks ls shows every "
          "task RUNNING; removal: ctr tasks rm -f and ctr containers rm of all of them; "
          "daemon cpu: the daemon's CPU time until all RUNNING; shim cpu: mean per shim, "
          "with the processes it reaped (runc, container set-up), until then)")

    print(f"\n== 3. memory, with {n} containers running ==")
    print(f"{'daemon':<12} {'idle RSS':>10} {'after 1.':>10} {'N running':>10} "
          f"{'per container':>14}")
    for name, label in (("berth", "berthd"), ("containerd", "containerd")):
        per = (during[name] - before[name]) / n
        print(f"{label:<12} {mb(idle[name])} {mb(before[name])} {mb(during[name])}    "
              f"{per:7.0f} KB")
    print("(idle: after start and image import; per container: RSS growth from before "
          f"step 2 to {n} running, divided by {n}; reference before: containerd idle RSS "
          f"{REFERENCE['containerd idle RSS']})")
    keys = ("Rss", "Pss", "USS", "Anonymous")
    print(f"{'per shim, median of ' + str(n):<36} {'RSS':>9} {'PSS':>9} {'USS':>9} "
          f"{'anon':>9}")
    rows = [(mem_b.label, {k: mem_b.med(k) for k in keys})]
    if mem_b.zygote is not None:
        rows.append(("berth zygote (one per daemon)", mem_b.zygote))
    rows.append((mem_c.label, {k: mem_c.med(k) for k in keys}))
    for label, r in rows:
        print(f"{label:<36} {mb(r['Rss'])} {mb(r['Pss'])} {mb(r['USS'])} {mb(r['Anonymous'])}")
    print(f"ratio berth shim / runc-v2 shim: RSS {mem_b.med('Rss') / mem_c.med('Rss'):.2f}x, "
          f"PSS {mem_b.med('Pss') / mem_c.med('Pss'):.2f}x, "
          f"USS {mem_b.med('USS') / mem_c.med('USS'):.2f}x")
    pss_b, pss_c = mem_b.total_pss() / n, mem_c.total_pss() / n
    print(f"shim PSS per container, the zygote's share included: berth {mb(pss_b)}, "
          f"containerd-shim-runc-v2 {mb(pss_c)}: {pss_b / pss_c:.2f}x")
    shared = mem_g.rows[0]
    print(f"{mem_g.label:<36} {mb(shared['Rss'])} {mb(shared['Pss'])} {mb(shared['USS'])} "
          f"{mb(shared['Anonymous'])}")
    print(f"one shared shim, PSS per container ({n} with {GROUP_ANNOTATION}): "
          f"{mb(shared['Pss'] / n)}: {shared['Pss'] / n / pss_c:.2f}x of containerd's")
    print("(USS = Private_Clean + Private_Dirty; a berth shim shares the zygote's pages "
          "until it writes them; reference before: containerd-shim-runc-v2 "
          f"{REFERENCE['containerd-shim-runc-v2']})")


def report_startup(s: Session, repeat: int) -> None:
    print(f"\n== 4. Python start-up on berth's shim path ({repeat} runs each) ==")
    start_imports = "import re, berth.core.shim, berth.core.shim.flags, berth.core.shim.start"
    rows = [
        ("python -I -S -c pass (bare interpreter)", timed([PYTHON, "-I", "-S", "-c", "pass"],
                                                         repeat)),
        ("python -c pass (+ site: .pth files, editable finder)",
         timed([PYTHON, "-c", "pass"], repeat)),
        ("containerd-shim-berth-v1 -v (the console script)", timed([SHIM, "-v"], repeat)),
        ("python -c '<the start action's imports>'", timed([PYTHON, "-c", start_imports],
                                                          repeat)),
        ("python: import + warm a serving shim (zygote preload)",
         timed([PYTHON, "-c", "from berth.core.shim import zygote; zygote.preload()"],
               max(3, repeat // 2))),
    ]
    for label, (med, least) in rows:
        print(f"{label:<56} {ms(med)}  (min {ms(least).strip()})")
    total, top = importtime(start_imports, repeat)
    print(f"-X importtime of the start action: {ms(total)} in imports; top level:")
    for mod, cum, own in top[:6]:
        print(f"    {cum / 1000:7.1f} ms  {mod}  (self {own / 1000:.1f} ms)")
    probes = max(3, repeat // 2)
    warm = [probe_start(s, i, use_zygote=True) for i in range(probes)]
    cold = [probe_start(s, i, use_zygote=False) for i in range(probes)]
    for label, ps in (("warm zygote", warm), ("no zygote", cold)):
        print(f"shim start action alone, {label + ':':<13} process "
              f"{ms(median(p.action for p in ps))}, start -> shim serving "
              f"{ms(median(p.serving for p in ps))}  (median of {len(ps)})")
    print("(the start action runs once per container: an interpreter, site, the imports "
          "above, binding the socket, one request to the zygote, which forks the shim)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 runs per variant, 3 containers in parallel")
    p.add_argument("--runs", type=int, default=None, help="measured ctr run --rm per variant")
    p.add_argument("--warmup", type=int, default=None,
                   help="rounds run first and not counted (default 2, quick 1)")
    p.add_argument("--parallel", type=int, default=None, help="containers started at once")
    p.add_argument("--parallel-rounds", type=int, default=None,
                   help="rounds of the parallel start per daemon (default 3, quick 1)")
    p.add_argument("--log-level", default="info", help="log level of both daemons")
    p.add_argument("--berth-cri", action="store_true",
                   help="keep berthd's CRI plugin on (containerd's stays off, as in the tests)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_run: must run as root (containers, mounts, cgroups)", file=sys.stderr)
        return 2
    runs = max(1, args.runs or (3 if args.quick else 20))
    warmup = max(0, args.warmup if args.warmup is not None else (1 if args.quick else 2))
    n_par = max(1, args.parallel or (3 if args.quick else 30))
    repeat = 3 if args.quick else 10
    rounds = max(1, args.parallel_rounds or (1 if args.quick else 3))

    base = Path(tempfile.mkdtemp(prefix="berth-brun-", dir="/tmp"))
    base.chmod(0o755)
    s = Session(base, args.log_level, cri=args.berth_cri)
    code = 0
    try:
        print(environment(), flush=True)
        print(f"{'quick' if args.quick else 'full'} run: {runs} measured ctr run --rm per "
              f"variant after {warmup} warm-up round(s) (not counted); {n_par} in parallel; "
              f"log level {args.log_level}; CRI plugin "
              f"{'on in berthd, off in containerd' if args.berth_cri else 'off in both'}; "
              f"namespace {s.namespace}; work dir {base}",
              flush=True)
        s.start()
        tar = base / "busybox-oci.tar"
        images.write_oci_tar(tar)
        for name in ("berth", "containerd"):
            s.ctr_ok(name, "images", "import", str(tar))
        idle = {name: rss_kib(s.daemon(name).proc.pid) for name in ("berth", "containerd")}
        runc_config = base / "runc.toml"
        runc_config.write_text('binary_name = "runc"\n')
        report_sequential(s, variants(runc_config), runs, warmup)
        report_parallel_and_memory(s, n_par, idle, rounds)
        report_startup(s, repeat)
    except (BenchError, AssertionError, TimeoutError, EOFError,
            subprocess.TimeoutExpired) as e:
        print(f"bench_run: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        left = s.close()
        if left:
            print(f"bench_run: left behind after cleanup: {'; '.join(left)}", file=sys.stderr)
            code = code or 1
        else:
            print("\ncleanup: no containers, shims, zygote, mounts or cgroups left")
    return code


if __name__ == "__main__":
    sys.exit(main())
