"""The real ctr against berthd with berth's own shim (``io.containerd.berth.v1``).

berthd resolves the runtime to ``containerd-shim-berth-v1`` beside its interpreter (the
virtualenv's console script); the shim runs containers with its in-process runtime
unless the runtime options name an OCI CLI binary (runc, crun). Containers use the
deterministic busybox image of ``tests/images.py``, imported with ``ctr images import``,
so ctr builds its own default spec from the image (PATH included).

The ``berth`` fixture owns one berthd in a temporary folder and one namespace. On the
way out it removes what the test left through ctr, stops berthd and the shims' zygote,
kills whatever still runs under the test's folder or in the namespace's cgroups,
unmounts, removes ctr's fifo folders of the test's containers, and then asserts that
nothing had to be left behind by berth itself: no shim sockets, no cgroups, no
processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from berth.core.shim import zygote
from tests import daemons
from tests.images import NAME, write_oci_tar

pytestmark = [pytest.mark.interop, pytest.mark.root]

RUNTIME = "io.containerd.berth.v1"
SHIM = "containerd-shim-berth-v1"
CGROUP_ROOT = Path("/sys/fs/cgroup")
FIFO_DIR = Path("/run/containerd/fifo")
TASK_DIR = "io.containerd.runtime.v2.task"
# Turns a hang into a failure; nothing is measured by it.
GUARD = 60.0


def wait_for(what: str, check: Callable[[], object]) -> object:
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


# -- host state -------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def pids_mentioning(text: str) -> set[int]:
    """Live processes whose command line contains ``text``: berth's shims carry their
    daemon's address (those forked by the zygote carry the zygote's first command line,
    which has the same address)."""
    return {int(p) for p in os.listdir("/proc")
            if p.isdigit() and int(p) != os.getpid() and text in cmdline(int(p))
            and alive(int(p))}


def pids_in_cgroups(namespace: str) -> set[int]:
    """Live processes in any cgroup under ``/<namespace>/`` (ctr's cgroupsPath)."""
    out = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            text = Path(f"/proc/{p}/cgroup").read_text()
        except OSError:
            continue
        if any(line.split(":", 2)[2].startswith(f"/{namespace}/")
               for line in text.splitlines() if line.count(":") >= 2) and alive(int(p)):
            out.add(int(p))
    return out


def cgroup_dirs(namespace: str, cid: str = "") -> list[Path]:
    return [d for d in CGROUP_ROOT.glob(f"*/{namespace}/{cid}".rstrip("/")) if d.is_dir()]


def remove_cgroups(namespace: str) -> None:
    for top in CGROUP_ROOT.glob(f"*/{namespace}"):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True) + [top]:
            with contextlib.suppress(OSError):
                d.rmdir()


def mounts_under(prefix: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4]
        if point == str(prefix) or point.startswith(f"{prefix}/"):
            points.append(point)
    return points


def cgroup_layout() -> str:
    """What is mounted under /sys/fs/cgroup: "v1", "v2", or "hybrid" (v1 controllers
    beside a cgroup2 mount, systemd's hybrid mode, which crun 1.8 refuses)."""
    kinds = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        point, fstype = left.split(" ")[4], right.split(" ")[0]
        if point == str(CGROUP_ROOT) or point.startswith(f"{CGROUP_ROOT}/"):
            if fstype in ("cgroup", "cgroup2"):
                kinds.add(fstype)
    assert kinds, "no cgroup file system under /sys/fs/cgroup"
    if kinds == {"cgroup", "cgroup2"}:
        return "hybrid"
    return "v2" if kinds == {"cgroup2"} else "v1"


# -- ctr bound to berthd and a namespace ------------------------------------------------------


@dataclass
class Berth:
    daemon: daemons.Daemon
    base: Path
    namespace: str
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    made: list[str] = field(default_factory=list)

    def id(self, name: str) -> str:
        """A container or exec id unique to this test (ctr names its fifos after it)."""
        self.made.append(f"{name}-{self.suffix}")
        return self.made[-1]

    def ctr(self, *args: str, timeout: float = GUARD) -> daemons.Result:
        return daemons.ctr(self.daemon.address, *args, namespace=self.namespace,
                           timeout=timeout)

    def ok(self, *args: str) -> str:
        r = self.ctr(*args)
        assert r.rc == 0, (args, r, self.daemon.logs()[-3000:])
        return r.out

    def run(self, cid: str, *command: str, extra: tuple[str, ...] = (),
            detach: bool = False) -> daemons.Result:
        return self.ctr("run", "--runtime", RUNTIME, *extra, "-d" if detach else "--rm",
                        NAME, cid, *command)

    def tasks(self) -> dict[str, tuple[int, str]]:
        """``ctr tasks ls`` as {id: (pid, status)}."""
        lines = self.ok("tasks", "ls").splitlines()
        assert lines[0].split() == ["TASK", "PID", "STATUS"], lines
        return {f[0]: (int(f[1]), f[2]) for f in (line.split() for line in lines[1:])}

    def spec(self, cid: str) -> dict:
        return json.loads(self.ok("containers", "info", cid))["Spec"]

    def runtime_config(self, binary: str) -> Path:
        path = self.base / f"{binary}.toml"
        path.write_text(f'binary_name = "{binary}"\n')
        return path

    @property
    def socket_dir(self) -> Path:
        """Where berth's shims (and their zygote) listen: ``s/`` beside berthd's socket."""
        return self.daemon.address.parent / "s"

    def shim_sockets(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.socket_dir) if not n.startswith("zygote-")}
        except FileNotFoundError:
            return set()

    def wait_no_shim_sockets(self) -> None:
        """Shims remove their socket on the way out, just after answering Shutdown."""
        wait_for("the shims' sockets to be removed", lambda: not self.shim_sockets())

    def bundle(self, cid: str) -> Path:
        return self.daemon.state / TASK_DIR / self.namespace / cid

    def shim_of(self, task_pid: int) -> int:
        """The shim process a task's init was started by (and is reaped by)."""
        shim = parent_of(task_pid)
        assert SHIM in cmdline(shim), (shim, cmdline(shim))
        return shim

    def events(self) -> Events:
        return Events(self)


class Events:
    """``ctr events`` on berthd, subscribed before it is returned, read by namespace."""

    def __init__(self, berth: Berth) -> None:
        self.berth = berth
        self.follower = daemons.ctr_events(berth.daemon.address)
        try:
            daemons.wait_subscribed(self.follower, berth.daemon.address)
        except BaseException:
            self.follower.stop()
            raise
        self.got: list[tuple[str, dict]] = []

    def _parse(self, line: str) -> tuple[str, dict] | None:
        # "<date> <time> +0000 UTC <namespace> <topic> <json>"
        parts = line.split(" ", 6)
        if len(parts) == 7 and parts[4] == self.berth.namespace:
            return parts[5], json.loads(parts[6])
        return None

    def wait(self, topic: str, cid: str, exec_id: str | None = None) -> dict:
        """The first ``topic`` event of ``cid`` (and of ``exec_id`` for exits)."""
        def match(t: str, p: dict) -> bool:
            if t != topic or cid not in (p.get("container_id"), p.get("id")):
                return False
            return exec_id is None or p.get("id", p.get("exec_id")) == exec_id

        for t, p in self.got:
            if match(t, p):
                return p

        def seen(line: str) -> bool:
            parsed = self._parse(line)
            if parsed is None:
                return False
            self.got.append(parsed)
            return match(*parsed)

        self.follower.wait_for(seen, timeout=GUARD)
        return self.got[-1][1]

    def of(self, cid: str) -> list[tuple[str, dict]]:
        return [(t, p) for t, p in self.got
                if cid in (p.get("container_id"), p.get("id"))]

    def stop(self) -> None:
        self.follower.stop()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def assert_task_left_nothing(berth: Berth, cid: str, pid: int, shim: int | None = None
                             ) -> None:
    """After a task's delete: its processes, shim, mounts, cgroups, bundle are gone.

    A shim exits after it answered Shutdown (as containerd's runc shim does), so its end
    and its socket's removal are waited for.
    """
    assert not alive(pid), pid
    if shim is not None:
        wait_for(f"shim {shim} to exit", lambda: not alive(shim))
    assert cgroup_dirs(berth.namespace, cid) == []
    assert pids_in_cgroups(berth.namespace) == set()
    assert mounts_under(berth.bundle(cid)) == []
    assert not berth.bundle(cid).exists()
    for runtime in ("berth", "runc", "crun"):
        # The OCI runtimes' state folders beside the shim sockets.
        state = berth.daemon.address.parent / runtime / berth.namespace / cid
        assert not state.exists(), state


@pytest.fixture
def berth() -> Iterator[Berth]:
    assert os.geteuid() == 0, "these tests need root"
    assert os.path.exists(os.path.join(os.path.dirname(sys.executable), SHIM)), \
        "the shim's console script is missing: pip install -e . in the virtualenv"
    base = Path(tempfile.mkdtemp(prefix="berth-br-", dir="/tmp"))
    base.chmod(0o755)
    namespace = f"berth-br-{uuid.uuid4().hex[:8]}"
    daemon = daemons.berthd(base / "d")
    b = Berth(daemon, base, namespace)
    leaked: dict[str, object] = {}
    try:
        daemon.start()
        write_oci_tar(base / "busybox.tar")
        b.ok("images", "import", str(base / "busybox.tar"))
        yield b
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            for task in b.ctr("tasks", "ls", "-q").out.split():
                b.ctr("tasks", "kill", "-a", "-s", "KILL", task)
                b.ctr("tasks", "rm", "-f", task)
            for container in b.ctr("containers", "ls", "-q").out.split():
                b.ctr("containers", "rm", container)
            with contextlib.suppress(AssertionError):
                b.wait_no_shim_sockets()
        leaked["shim sockets"] = b.shim_sockets()
        daemon.stop()
        zygote.stop(zygote.zygote_path(str(daemon.address)))
        leaked["processes"] = {p: cmdline(p) for p in
                               pids_mentioning(str(base)) | pids_in_cgroups(namespace)}
        for pid in leaked["processes"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            wait_for("leftover processes to die", lambda: not (
                pids_mentioning(str(base)) | pids_in_cgroups(namespace)))
        leaked["mounts"] = mounts_under(base)
        for point in sorted(leaked["mounts"], key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        # The namespace's own folder stays, as runc leaves it under containerd.
        leaked["cgroups"] = [d for top in cgroup_dirs(namespace) for d in top.iterdir()
                             if d.is_dir()]
        remove_cgroups(namespace)
        with contextlib.suppress(FileNotFoundError):
            for d in FIFO_DIR.iterdir():
                names = [p.name for p in d.iterdir()] if d.is_dir() else []
                if names and all(any(n.startswith(f"{cid}-") for cid in b.made)
                                 for n in names):
                    shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    # Everything above was removed anyway; what had to be is a leak by berth (or the
    # consequence of the test's own failure, reported first).
    assert leaked == {"shim sockets": set(), "processes": {}, "mounts": [], "cgroups": []}, \
        leaked


# -- 1. ctr run --rm: output and exit codes, three OCI runtimes --------------------------------


def test_run_rm_in_process_runtime_prints_and_passes_exit_codes(berth: Berth) -> None:
    r = berth.run(berth.id("t1"), "echo", "hi")
    assert (r.rc, r.out, r.err) == (0, "hi\n", ""), (r, berth.daemon.logs()[-3000:])
    r = berth.run(berth.id("t2"), "sh", "-c", "exit 3")
    assert (r.rc, r.out, r.err) == (3, "", "")
    r = berth.run(berth.id("t3"), "sh", "-c", "echo to-stderr >&2; exit 1")
    assert (r.rc, r.out, r.err) == (1, "", "to-stderr\n")
    # A command the image lacks fails Create, worded as containerd words runc's failure.
    missing = berth.id("t4")
    r = berth.run(missing, "no-such-command")
    assert r.rc == 1 and r.err.startswith(
        "ctr: failed to create shim task: OCI runtime create failed: ") and \
        'exec: "no-such-command": executable file not found in $PATH: unknown' in r.err, r
    assert not berth.bundle(missing).exists() and cgroup_dirs(berth.namespace, missing) == []
    assert berth.tasks() == {}
    assert berth.ok("containers", "ls", "-q") == ""
    berth.wait_no_shim_sockets()
    # berthd copies its shims' logs into its own: the in-process runtime created the
    # three tasks (the fourth failed before it was created).
    logs = berth.daemon.logs()
    assert logs.count("oci_runtime=berth") == 3 and "oci_runtime=runc" not in logs


def test_run_rm_with_runc_selected_by_runtime_options(berth: Berth) -> None:
    # ctr 1.6 accepts --runc-binary only with --runtime io.containerd.runc.v2 (it refuses
    # it for any other runtime before talking to berthd), so runc reaches berth's shim as
    # runtimeoptions.v1.Options{config_path} from --runtime-config-path, which the shim
    # reads as a TOML file with binary_name, as CRI configures non-runc runtimes.
    refused = berth.run(berth.id("rb"), "echo", "hi", extra=("--runc-binary", "runc"))
    assert refused.rc != 0
    assert 'only supported for "io.containerd.runc.v2" runtime' in refused.err
    config = str(berth.runtime_config("runc"))
    r = berth.run(berth.id("r1"), "echo", "hi", extra=("--runtime-config-path", config))
    assert (r.rc, r.out, r.err) == (0, "hi\n", ""), (r, berth.daemon.logs()[-3000:])
    r = berth.run(berth.id("r2"), "sh", "-c", "exit 3",
                  extra=("--runtime-config-path", config))
    assert (r.rc, r.out) == (3, "")
    logs = berth.daemon.logs()
    assert logs.count("oci_runtime=runc") == 2 and "oci_runtime=berth" not in logs
    assert berth.tasks() == {}
    assert berth.ok("containers", "ls", "-q") == ""


def test_run_rm_with_crun_selected_by_runtime_options(berth: Berth) -> None:
    """crun 1.8 refuses systemd's hybrid cgroup layout (v1 controllers plus a cgroup2 mount
    at /sys/fs/cgroup/unified): there the refusal must reach ctr as containerd shows an
    OCI runtime's create error; on a pure v1 or v2 layout crun runs the container."""
    assert shutil.which("crun"), "crun is needed (tests/setup-host.sh)"
    config = str(berth.runtime_config("crun"))
    cid = berth.id("c1")
    r = berth.run(cid, "echo", "hi", extra=("--runtime-config-path", config))
    if cgroup_layout() == "hybrid":
        assert r.rc == 1 and r.out == "", r
        assert r.err.startswith("ctr: failed to create shim task: OCI runtime create failed: "
                                "cgroups in hybrid mode not supported"), r.err
    else:
        assert (r.rc, r.out, r.err) == (0, "hi\n", ""), r
        r = berth.run(berth.id("c2"), "sh", "-c", "exit 3",
                      extra=("--runtime-config-path", config))
        assert (r.rc, r.out) == (3, "")
    # Either way ctr --rm removed the container, and the failed create left nothing.
    assert berth.tasks() == {}
    assert berth.ok("containers", "ls", "-q") == ""
    assert cgroup_dirs(berth.namespace, cid) == []
    assert not berth.bundle(cid).exists()


def zygote_pid(berth: Berth) -> int:
    """The pid of the zygote serving berthd's shims (0: none listens)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(zygote.zygote_path(str(berth.daemon.address)))
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return 0
    finally:
        s.close()
    return struct.unpack("3i", raw)[0]


def start_paths(berth: Berth, cid: str) -> list[str]:
    """How berthd got each shim for ``cid``: from the zygote or by running ``start``."""
    kinds = {"shim started through its zygote": "zygote",
             "running the shim's start action": "start"}
    out = []
    for line in berth.daemon.logs().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("id") == cid \
                    and entry.get("event") in kinds:
                out.append(kinds[entry["event"]])
    return out


def test_berthd_asks_the_zygote_and_runs_start_without_one(berth: Berth) -> None:
    """berthd forks its shims through the zygote once one runs (no ``start`` process per
    container); without a zygote it runs the binary's ``start``, which forks a new one."""
    first = berth.id("z1")
    r = berth.run(first, "echo", "first")
    assert (r.rc, r.out) == (0, "first\n"), r
    assert start_paths(berth, first) == ["start"]
    warm = zygote_pid(berth)
    assert warm > 0

    second = berth.id("z2")
    r = berth.run(second, "sleep", "1000", detach=True)
    assert r.rc == 0, r
    assert start_paths(berth, second) == ["zygote"]
    pid, status = berth.tasks()[second]
    assert status == "RUNNING"
    shim = berth.shim_of(pid)
    assert parent_of(shim) == warm
    # The shim got berthd's environment and the container's bundle as its folder.
    environ = Path(f"/proc/{shim}/environ").read_bytes().split(b"\0")
    assert f"TTRPC_ADDRESS={berth.daemon.ttrpc_address}".encode() in environ
    assert os.readlink(f"/proc/{shim}/cwd") == str(berth.bundle(second))
    berth.ok("tasks", "kill", "-s", "SIGKILL", second)
    wait_for("the task to stop", lambda: berth.tasks()[second][1] == "STOPPED")
    berth.ok("tasks", "rm", second)
    berth.ok("containers", "rm", second)

    assert zygote.stop(zygote.zygote_path(str(berth.daemon.address))) == warm
    third = berth.id("z3")
    r = berth.run(third, "sh", "-c", "echo third; exit 5")
    assert (r.rc, r.out) == (5, "third\n"), r
    assert start_paths(berth, third) == ["start"], [
        line for line in berth.daemon.logs().splitlines() if third in line or "zygote" in line]
    assert zygote_pid(berth) not in (0, warm)


def test_zygote_outlives_idle_spells_while_its_daemon_serves() -> None:
    """The zygote's idle timeout (here 1 s) ends it only once its daemon is gone."""
    base = Path(tempfile.mkdtemp(prefix="berth-zi-", dir="/tmp"))
    daemon = daemons.berthd(base / "d")
    daemon.env["BERTH_SHIM_ZYGOTE_IDLE"] = "1"
    b = Berth(daemon, base, f"berth-zi-{uuid.uuid4().hex[:8]}")
    try:
        daemon.start()
        write_oci_tar(base / "busybox.tar")
        b.ok("images", "import", str(base / "busybox.tar"))
        r = b.run(b.id("z1"), "true")
        assert r.rc == 0, r
        pid = zygote_pid(b)
        assert pid > 0
        time.sleep(3)  # three idle timeouts, berthd serving
        assert zygote_pid(b) == pid and alive(pid)
        r = b.run(b.id("z2"), "true")
        assert r.rc == 0, r
        assert start_paths(b, b.made[-1]) == ["zygote"]
        daemon.stop()
        wait_for("the zygote to leave after its daemon", lambda: not alive(pid))
        assert not os.path.exists(zygote.zygote_path(str(daemon.address)))
    finally:
        daemon.stop()
        zygote.stop(zygote.zygote_path(str(daemon.address)))
        remove_cgroups(b.namespace)
        for point in sorted(mounts_under(base), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(base, ignore_errors=True)


# -- 2. a detached task: exec and the task and container commands -----------------------------


def test_detached_task_commands(berth: Berth) -> None:
    cid = berth.id("d1")
    r = berth.run(cid, "sleep", "1000", detach=True)
    assert (r.rc, r.out, r.err) == (0, "", ""), r
    pid, status = berth.tasks()[cid]
    assert status == "RUNNING" and alive(pid)
    shim = berth.shim_of(pid)

    e1, e2 = berth.id("e1"), berth.id("e2")
    r = berth.ctr("tasks", "exec", "--exec-id", e1, cid, "sh", "-c",
                  "echo out-$((2+3)); echo err >&2; ps -o pid,comm; exit 4")
    assert r.rc == 4 and r.err == "err\n", r
    lines = r.out.splitlines()
    assert lines[0] == "out-5"
    # The exec joined the task's pid namespace: init is pid 1 there.
    rows = [line.split() for line in lines[2:]]
    assert rows[0] == ["1", "sleep"] and [c for _, c in rows[1:]] == ["sh", "ps"], rows

    ps = berth.ok("tasks", "ps", cid).splitlines()
    assert ps[0].split() == ["PID", "INFO"] and ps[1].split() == [str(pid), "-"], ps
    berth.ok("tasks", "exec", "-d", "--exec-id", e2, cid, "sleep", "1000")
    ps = berth.ok("tasks", "ps", cid).splitlines()
    assert len(ps) == 3 and f"ExecID:{e2}," in ps[2], ps

    berth.ok("tasks", "pause", cid)
    assert berth.tasks()[cid] == (pid, "PAUSED")
    freezer = CGROUP_ROOT / "freezer" / berth.namespace / cid / "freezer.state"
    if freezer.exists():
        assert freezer.read_text().strip() == "FROZEN"
    berth.ok("tasks", "resume", cid)
    assert berth.tasks()[cid] == (pid, "RUNNING")

    metrics = berth.ok("tasks", "metrics", cid)
    assert metrics.splitlines()[0].split() == ["ID", "TIMESTAMP"], metrics
    values = dict(line.split(None, 1) for line in metrics.splitlines()[3:] if line.strip())
    assert values["pids.current"].strip() == "2", metrics  # init and exec e2
    assert int(values["memory.usage_in_bytes"]) > 0, metrics
    assert int(values["cpuacct.usage"]) > 0, metrics
    # One counter per possible CPU, as the cgroup (v1) keeps them; ctr prints the list.
    per_cpu = values["cpuacct.usage_percpu"].strip().strip("[]").split()
    if (CGROUP_ROOT / "cpuacct").is_dir():
        host = (CGROUP_ROOT / "cpuacct" / "cpuacct.usage_percpu").read_text().split()
        assert len(per_cpu) == len(host) and sum(map(int, per_cpu)) > 0, metrics
    else:  # cgroup v2 keeps no per-CPU usage
        assert per_cpu == [], metrics

    containers = berth.ok("containers", "ls").splitlines()
    assert containers[0].split() == ["CONTAINER", "IMAGE", "RUNTIME"]
    assert containers[1].split() == [cid, NAME, RUNTIME], containers
    info = json.loads(berth.ok("containers", "info", cid))
    assert (info["ID"], info["Image"], info["Runtime"]["Name"]) == (cid, NAME, RUNTIME)
    assert info["Spec"]["process"]["args"] == ["sleep", "1000"]
    assert info["Spec"]["linux"]["cgroupsPath"] == f"/{berth.namespace}/{cid}"
    assert cgroup_dirs(berth.namespace, cid)

    # A running task and its container are not removable; containerd's words.
    r = berth.ctr("containers", "rm", cid)
    assert r.rc == 1 and "cannot delete a non stopped container" in r.err, r
    r = berth.ctr("tasks", "rm", cid)
    assert r.rc == 1 and "task must be stopped before deletion: running" in r.err, r

    with berth.events() as events:
        berth.ok("tasks", "kill", "--exec-id", e2, cid)
        killed = events.wait("/tasks/exit", cid, exec_id=e2)
        assert killed["exit_status"] == 143  # SIGTERM, not ignored outside pid 1
        berth.ok("tasks", "kill", "-s", "KILL", cid)
        exited = events.wait("/tasks/exit", cid, exec_id=cid)
    assert (exited["pid"], exited["exit_status"]) == (pid, 137)
    assert berth.tasks() == {cid: (pid, "STOPPED")}
    berth.ok("tasks", "rm", cid)
    assert berth.tasks() == {}
    berth.ok("containers", "rm", cid)
    r = berth.ctr("containers", "info", cid)
    assert r.rc == 1 and f"container \"{cid}\" in namespace \"{berth.namespace}\": not found" \
        in r.err, r
    assert berth.ok("containers", "ls", "-q") == ""
    assert_task_left_nothing(berth, cid, pid, shim)
    berth.wait_no_shim_sockets()


class Terminal:
    """A program on a fresh pseudo-terminal, read until expected text shows up."""

    def __init__(self, argv: list[str], rows: int, cols: int) -> None:
        self.master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("4H", rows, cols, 0, 0))
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                         start_new_session=True)
        finally:
            os.close(slave)
        self.buf = b""

    def expect(self, pattern: bytes) -> bytes:
        """Output up to and including the first match of ``pattern`` (a regex)."""
        deadline = time.monotonic() + GUARD
        while (m := re.search(pattern, self.buf)) is None:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no {pattern!r} in {self.buf!r}")
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every slave fd is closed
                data = b""
            if not data:
                raise AssertionError(f"EOF before {pattern!r} in {self.buf!r}")
            self.buf += data
        out, self.buf = self.buf[:m.end()], self.buf[m.end():]
        return out

    def send(self, text: bytes) -> None:
        os.write(self.master, text)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait()
        os.close(self.master)
        return rc


def test_run_with_a_tty(berth: Berth) -> None:
    cid = berth.id("tty")
    term = Terminal([daemons.CTR, "--address", str(berth.daemon.address), "--namespace",
                     berth.namespace, "run", "-t", "--rm", "--runtime", RUNTIME, NAME, cid,
                     "sh"], rows=33, cols=101)
    try:
        term.expect(rb"/ # ")
        term.send(b"echo $((6*7))\r")
        # The terminal echoes the line as typed; the shell's answer is on its own line.
        assert b"echo $((6*7))" in term.expect(rb"\n42\r")
        term.expect(rb"/ # ")
        term.send(b"tty; stty size; [ -t 0 ] && echo stdin-$((2*3))\r")
        got = term.expect(rb"\nstdin-6\r")
        # ctr passed its own terminal's size on: Create's console, then ResizePty.
        assert re.search(rb"\n/dev/pts/\d+\r+\n33 101\r+\nstdin-6\r$", got), got
        term.expect(rb"/ # ")
        term.send(b"exit 5\r")
        assert term.proc.wait(GUARD) == 5
    finally:
        term.close()
    assert berth.tasks() == {}
    assert berth.ok("containers", "ls", "-q") == ""


# -- 3. the events of one ctr run --rm --------------------------------------------------------


def test_events_of_run_rm_in_order(berth: Berth) -> None:
    cid = berth.id("ev")
    with berth.events() as events:
        r = berth.run(cid, "echo", "hi")
        assert (r.rc, r.out) == (0, "hi\n"), r
        events.wait("/containers/delete", cid)
    seen = events.of(cid)
    assert [t for t, _ in seen] == ["/containers/create", "/tasks/create", "/tasks/start",
                                    "/tasks/exit", "/tasks/delete", "/containers/delete"], seen
    payloads = dict(seen)
    assert payloads["/containers/create"] == {"id": cid, "image": NAME,
                                              "runtime": {"name": RUNTIME}}
    created = payloads["/tasks/create"]
    assert created["bundle"] == str(berth.bundle(cid))
    assert [m["type"] for m in created["rootfs"]] == ["overlay"]
    pid = created["pid"]
    assert pid > 0 and payloads["/tasks/start"] == {"container_id": cid, "pid": pid}
    exit_ = payloads["/tasks/exit"]
    # exit_status 0 is omitted from the JSON, as containerd prints it.
    assert (exit_["id"], exit_["pid"], exit_.get("exit_status", 0)) == (cid, pid, 0)
    deleted = payloads["/tasks/delete"]
    assert (deleted["pid"], deleted.get("exit_status", 0)) == (pid, 0)
    assert deleted["exited_at"] == exit_["exited_at"]
    assert not alive(pid)
    berth.wait_no_shim_sockets()
