"""The runtime v2 task manager driving the real containerd-shim-runc-v2, in-process.

The manager runs here with its own sqlite store, an event exchange and a ttrpc
Events server at TTRPC_ADDRESS, like inside berthd, so the shim's own events reach
the exchange. Each test uses its own namespace; the ``leftovers`` fixture kills and
removes whatever a failing test leaves (shims, runc containers, cgroups, mounts, the
directories under /run/containerd the shim creates).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, mount as mounts
from berth.core.api.containerd import events as ev
from berth.core.api.containerd.types import Mount
from berth.core.api.containerd.v1.types import Status
from berth.core.events import typeurl
from berth.core.events.exchange import Exchange, Subscription
from berth.core.metadata.containers import Container, store_for
from berth.core.metadata.db import Database
from berth.core.runtime.manager import CreateOpts, TaskManager
from berth.core.services.events import EventsService
from berth.core.ttrpc import Server

pytestmark = [pytest.mark.root]

SHIM = "containerd-shim-runc-v2"
RUNTIME = "io.containerd.runc.v2"
RUN_CONTAINERD = Path("/run/containerd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Turns a hang into a failure; nothing is measured by it.
GUARD = 60


# -- processes and host state -------------------------------------------------------------


def argv_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Running and not a zombie (shims are reparented away, we cannot reap them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def shim_pids(namespace: str, task_id: str | None = None) -> set[int]:
    """Live runc shims started for ``namespace`` (and ``task_id``)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = argv_of(int(entry))
        if not argv or os.path.basename(argv[0]) != SHIM:
            continue
        if "-namespace" not in argv or argv[argv.index("-namespace") + 1] != namespace:
            continue
        if task_id is not None and argv[argv.index("-id") + 1] != task_id:
            continue
        if alive(int(entry)):
            out.add(int(entry))
    return out


def cgroup_dirs(namespace: str, task_id: str = "") -> list[Path]:
    """The cgroup directories runc made for ``/<namespace>/<task_id>`` (cgroups v1)."""
    return [d for d in CGROUP_ROOT.glob(f"*/{namespace}/{task_id}".rstrip("/")) if d.is_dir()]


def shim_sockets() -> set[str]:
    try:
        return set(os.listdir(RUN_CONTAINERD / "s"))
    except FileNotFoundError:
        return set()


def make_rootfs(path: Path) -> Path:
    """A busybox-static root filesystem with applet symlinks."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is needed for the container's rootfs"
    (path / "bin").mkdir(parents=True)
    shutil.copy2(busybox, path / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for name in applets:
        if name != "busybox":
            os.symlink("busybox", path / "bin" / name)
    for d in ("proc", "dev", "sys", "tmp"):
        (path / d).mkdir()
    return path


def spec(namespace: str, task_id: str, args: list[str], *, root: str = "rootfs",
         annotations: dict[str, str] | None = None) -> AnyMsg:
    doc = {
        "ociVersion": "1.0.2-dev",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin"], "cwd": "/", "noNewPrivileges": True},
        "root": {"path": root, "readonly": True},
        "hostname": task_id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "annotations": annotations or {},
        "linux": {
            "cgroupsPath": f"/{namespace}/{task_id}",
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        },
    }
    return AnyMsg(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                  value=json.dumps(doc).encode())


# -- cleanup ---------------------------------------------------------------------------------


@dataclass
class Leftovers:
    namespace: str
    base: Path
    created_run_dirs: list[Path] = field(default_factory=list)
    sockets_before: set[str] = field(default_factory=set)


def _new_dirs(path: Path) -> list[Path]:
    out = []
    for d in [path, *path.parents]:
        if d.exists():
            break
        out.append(d)
    return out


def cleanup(left: Leftovers) -> None:
    """Kill and remove everything a test in ``left.namespace`` may have left."""
    for pid in shim_pids(left.namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    runc_root = RUN_CONTAINERD / "runc" / left.namespace
    if runc_root.is_dir():
        for cid in os.listdir(runc_root):
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid],
                           capture_output=True, check=False)
        shutil.rmtree(runc_root, ignore_errors=True)
    for d in sorted(CGROUP_ROOT.glob(f"*/{left.namespace}/**/"), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    for d in CGROUP_ROOT.glob(f"*/{left.namespace}"):
        with contextlib.suppress(OSError):
            d.rmdir()
    for point in sorted(mounts.mountpoints(left.base), key=len, reverse=True):
        with contextlib.suppress(OSError):
            mounts.unmount(point, mounts.MNT_DETACH)
    shutil.rmtree(left.base, ignore_errors=True)
    for name in shim_sockets() - left.sockets_before:
        # Only sockets nobody serves: another test's live shim keeps its own.
        path = RUN_CONTAINERD / "s" / name
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)
        finally:
            s.close()
    for d in sorted(left.created_run_dirs, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    assert os.geteuid() == 0, "runtime tests need root"
    assert shutil.which(SHIM), f"{SHIM} not found on PATH"
    ns = f"berth-rt-{uuid.uuid4().hex[:10]}"
    base = Path(tempfile.mkdtemp(prefix="berth-rt-", dir="/tmp"))
    left = Leftovers(ns, base, sockets_before=shim_sockets())
    for p in (RUN_CONTAINERD / "s", RUN_CONTAINERD / "runc" / ns):
        left.created_run_dirs += [d for d in _new_dirs(p) if d not in left.created_run_dirs]
    try:
        yield left
    finally:
        cleanup(left)


# -- the manager ---------------------------------------------------------------------------


@dataclass
class Harness:
    base: Path
    namespace: str
    db: Database
    exchange: Exchange
    rootfs: Path

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def root(self) -> Path:
        return self.base / "root"

    def opts(self, task_id: str, args: list[str], *, stdout: str = "",
             annotations: dict[str, str] | None = None) -> CreateOpts:
        """The task's create options; its container is recorded first, as berthd's
        Containers service does (after a restart, a bundle of no container is retired)."""
        oci = spec(self.namespace, task_id, args, annotations=annotations)
        containers = store_for(self.db)
        with contextlib.suppress(errdefs.AlreadyExists):
            containers.create(self.namespace, Container(id=task_id, runtime_name=RUNTIME,
                                                        spec=oci))
        return CreateOpts(
            spec=oci,
            runtime=RUNTIME,
            # The shim mounts the rootfs on <bundle>/rootfs itself.
            rootfs=[Mount(type="bind", source=str(self.rootfs), options=["rbind", "ro"])],
            # The shim's file:// IO wants both streams (it crashes on a lone stdout).
            stdout=stdout, stderr=stdout,
        )


@pytest.fixture
def harness(leftovers: Leftovers) -> Iterator[Harness]:
    db = Database(leftovers.base / "meta.db")
    store_for(db)
    h = Harness(leftovers.base, leftovers.namespace, db, Exchange(),
                make_rootfs(leftovers.base / "busybox"))
    yield h
    db.close()


@asynccontextmanager
async def running(h: Harness, *, recover: bool = True) -> AsyncIterator[TaskManager]:
    """A manager as berthd runs it, with berthd's ttrpc Events service for the shims.

    Leaving the block cancels the manager's nursery, as stopping berthd does: shims
    and their containers keep running. ``recover=False``: the bundles left behind are
    only adopted, as before berthd serves; the test calls ``serving()`` itself.
    """
    async with trio.open_nursery() as nursery:
        server = Server()
        for name, methods in EventsService(h.exchange).ttrpc_services().items():
            server.register(name, methods)
        await nursery.start(server.serve_unix, str(h.base / "berth.sock.ttrpc"))
        manager = TaskManager(
            root=h.root, state=h.state, address=str(h.base / "berth.sock"),
            ttrpc_address=str(h.base / "berth.sock.ttrpc"), events=h.exchange,
            containers=store_for(h.db), nursery=nursery,
        )
        if recover:
            await manager.load_existing()
        else:
            manager.adopt_existing()
        yield manager
        nursery.cancel_scope.cancel()


async def next_event(sub: Subscription, topic: str) -> object:
    """The payload of the next event on ``topic``."""
    async for e in sub:
        if e.envelope.topic == topic:
            return typeurl.unmarshal_any(e.envelope.event)
    raise AssertionError("subscription ended")


def topics_of(sub: Subscription) -> list[str]:
    out = []
    while True:
        try:
            out.append(sub._recv.receive_nowait().envelope.topic)
        except trio.WouldBlock:
            return out


def assert_nothing_left(h: Harness, task_id: str) -> None:
    assert not (h.state / h.namespace / task_id).exists()
    assert not (h.root / h.namespace / task_id).exists()
    assert mounts.mountpoints(h.base / "state") == []
    assert shim_pids(h.namespace, task_id) == set()
    assert cgroup_dirs(h.namespace, task_id) == []
    assert not (RUN_CONTAINERD / "runc" / h.namespace / task_id).exists()


# -- tests ------------------------------------------------------------------------------------


async def test_task_life_and_shim_events(harness: Harness, leftovers: Leftovers) -> None:
    h = harness
    sub = h.exchange.subscribe()
    out = h.base / "out.txt"
    with trio.fail_after(GUARD):
        async with running(h) as manager:
            task = await manager.create(h.namespace, "t1", h.opts(
                "t1", ["sh", "-c", "echo hi; exit 3"], stdout=f"file://{out}"))
            bundle = h.state / h.namespace / "t1"
            assert (bundle / "config.json").read_bytes() == h.opts("t1", []).spec.value \
                .replace(b'"args": []', b'"args": ["sh", "-c", "echo hi; exit 3"]')
            assert os.readlink(bundle / "work") == str(h.root / h.namespace / "t1")
            assert (bundle / "address").read_text().startswith("unix:///run/containerd/s/")
            assert (bundle / "shim-binary-path").read_text() == shutil.which(SHIM)
            # The shim mounted the rootfs mount on the bundle's rootfs.
            assert mounts.mountpoints(bundle) == [str(bundle / "rootfs")]
            assert manager.get(h.namespace, "t1") is task
            assert manager.tasks(h.namespace) == [task]
            pid = await task.start()
            assert pid > 0
            exit_ = await task.wait()
            assert exit_.status == 3
            state = await task.state()
            assert (state.status, state.exit_status) == (Status.STOPPED, 3)
            with pytest.raises(errdefs.AlreadyExists):
                await manager.create(h.namespace, "t1", h.opts("t1", ["true"]))
            deleted = await manager.delete(h.namespace, "t1")
            assert (deleted.pid, deleted.status) == (pid, 3)
            assert manager.get(h.namespace, "t1") is None
            await next_event(sub, "/tasks/delete")
            assert out.read_text() == "hi\n"
            with pytest.raises(errdefs.NotFound):
                await manager.delete(h.namespace, "t1")
        # Every task event came from the shim, once, in containerd's order.
        assert topics_of(sub) == []
    assert_nothing_left(h, "t1")


async def test_failed_create_and_start_leave_nothing(harness: Harness) -> None:
    h = harness
    with trio.fail_after(GUARD):
        async with running(h) as manager:
            with pytest.raises(errdefs.BerthError,
                               match=r"^failed to create shim task: OCI runtime create failed"):
                await manager.create(h.namespace, "bad", h.opts("bad", ["/nope"]))
            assert manager.get(h.namespace, "bad") is None
            opts = h.opts("bad", ["true"])
            opts.runtime = "io.containerd.nope.v9"
            with pytest.raises(errdefs.Unknown, match=(
                    '^failed to start shim: failed to resolve runtime path: runtime '
                    '"io.containerd.nope.v9" binary not installed "containerd-shim-nope-v9": '
                    "file does not exist$")):
                await manager.create(h.namespace, "bad", opts)
            opts.runtime = "nodots"
            with pytest.raises(errdefs.Unknown, match="invalid runtime name nodots"):
                await manager.create(h.namespace, "bad", opts)
            with pytest.raises(errdefs.InvalidArgument, match="^failed to start shim: invalid "
                                                              "task id bad/id"):
                await manager.create(h.namespace, "bad/id", opts)
    assert_nothing_left(h, "bad")


async def test_killed_shim_reports_exit_and_leaves_nothing(harness: Harness,
                                                           leftovers: Leftovers) -> None:
    h = harness
    sub = h.exchange.subscribe()
    with trio.fail_after(GUARD):
        async with running(h) as manager:
            task = await manager.create(h.namespace, "k1", h.opts("k1", ["sleep", "1000"]))
            pid = await task.start()
            address = (h.state / h.namespace / "k1" / "address").read_text()
            assert cgroup_dirs(h.namespace, "k1")
            (shim,) = shim_pids(h.namespace, "k1")
            os.kill(shim, signal.SIGKILL)
            exit_ = await next_event(sub, "/tasks/exit")
            assert exit_ == ev.TaskExit(container_id="k1", id="k1", pid=pid, exit_status=137,
                                        exited_at=exit_.exited_at)
            deleted = await next_event(sub, "/tasks/delete")
            assert (deleted.container_id, deleted.pid, deleted.exit_status) == ("k1", pid, 137)
            await task.ended.wait()
            # The task is gone, as in containerd: its container can now be removed.
            assert manager.get(h.namespace, "k1") is None
            assert not alive(pid)
            assert topics_of(sub) == []
    assert_nothing_left(h, "k1")
    assert not Path(address.removeprefix("unix://")).exists()


async def test_reconnect_after_restart(harness: Harness) -> None:
    h = harness
    with trio.fail_after(GUARD):
        async with running(h) as manager:
            task = await manager.create(h.namespace, "r1", h.opts("r1", ["sleep", "1000"]))
            pid = await task.start()
        # "berthd" is gone; the shim and the container are not.
        assert shim_pids(h.namespace, "r1") and alive(pid)
        sub = h.exchange.subscribe()
        async with running(h) as manager:
            (task,) = manager.tasks(h.namespace)
            state = await task.state()
            assert (task.id, state.pid, state.status) == ("r1", pid, Status.RUNNING)
            await task.kill(signal.SIGKILL)
            exit_ = await next_event(sub, "/tasks/exit")
            assert (exit_.pid, exit_.exit_status) == (pid, 137)
            assert (await task.wait()).status == 137
            await manager.delete(h.namespace, "r1")
            await next_event(sub, "/tasks/delete")
    assert_nothing_left(h, "r1")


async def test_shim_dead_at_restart_is_cleaned_up_and_reported(harness: Harness) -> None:
    h = harness
    with trio.fail_after(GUARD):
        async with running(h) as manager:
            task = await manager.create(h.namespace, "d1", h.opts("d1", ["sleep", "1000"]))
            pid = await task.start()
        (shim,) = shim_pids(h.namespace, "d1")
        os.kill(shim, signal.SIGKILL)
        while alive(shim):
            await trio.sleep(0.02)
        # A leftover work directory without a bundle goes too.
        (h.root / h.namespace / "stale").mkdir(parents=True)
        sub = h.exchange.subscribe()
        async with running(h) as manager:
            assert manager.tasks(h.namespace) == []
            exit_ = await next_event(sub, "/tasks/exit")
            # The shim's delete action stopped the container: SIGKILL.
            assert (exit_.container_id, exit_.pid, exit_.exit_status) == ("d1", pid, 137)
            await next_event(sub, "/tasks/delete")
    assert not alive(pid)
    assert not (h.root / h.namespace / "stale").exists()
    assert_nothing_left(h, "d1")


async def test_grouped_tasks_share_a_shim(harness: Harness) -> None:
    """The runc shim serves every container of a sandbox (io.kubernetes.cri.sandbox-id)."""
    h = harness
    sandbox = {"io.kubernetes.cri.sandbox-id": "g1"}
    sub = h.exchange.subscribe()
    with trio.fail_after(GUARD):
        async with running(h) as manager:
            g1 = await manager.create(h.namespace, "g1", h.opts("g1", ["sleep", "1000"],
                                                                annotations=sandbox))
            g2 = await manager.create(h.namespace, "g2", h.opts("g2", ["sleep", "1000"],
                                                                annotations=sandbox))
            assert (await g1.connect()).shim_pid == (await g2.connect()).shim_pid
            assert ((h.state / h.namespace / "g1" / "address").read_text()
                    == (h.state / h.namespace / "g2" / "address").read_text())
            pids = {"g1": await g1.start(), "g2": await g2.start()}
            # Deleting one task leaves the shared shim serving the other.
            await g2.kill(signal.SIGKILL)
            e = await next_event(sub, "/tasks/exit")  # from the shim
            assert (e.container_id, e.pid, e.exit_status) == ("g2", pids["g2"], 137)
            await manager.delete(h.namespace, "g2")
            assert (await g1.state()).status == Status.RUNNING
            (shim,) = shim_pids(h.namespace)
            os.kill(shim, signal.SIGKILL)
            e = await next_event(sub, "/tasks/exit")  # from the manager
            assert (e.container_id, e.pid, e.exit_status) == ("g1", pids["g1"], 137)
            await g1.ended.wait()
            assert manager.tasks(h.namespace) == []
    for p in pids.values():
        assert not alive(p)
    assert_nothing_left(h, "g1")
    assert_nothing_left(h, "g2")


async def test_restart_recovery_runs_after_serving_and_on_demand(harness: Harness) -> None:
    """Bundles left by a previous berthd are only noted until berthd serves; a task whose
    shim died is cleaned up at once when a call needs it, the rest in the background."""
    h = harness
    with trio.fail_after(GUARD):
        async with running(h) as manager:
            pids = {}
            for tid in ("d1", "d2", "l1"):
                task = await manager.create(h.namespace, tid, h.opts(tid, ["sleep", "1000"]))
                pids[tid] = await task.start()
        for tid in ("d1", "d2"):
            (shim,) = shim_pids(h.namespace, tid)
            os.kill(shim, signal.SIGKILL)
            while alive(shim):
                await trio.sleep(0.02)
        sub = h.exchange.subscribe()
        async with running(h, recover=False) as manager:
            # Nothing dialled yet: every bundle waits, none is listed as a task.
            assert manager.tasks(h.namespace) == []
            assert [p.id for p in manager.recovering_in(h.namespace)] == ["d1", "d2", "l1"]
            assert topics_of(sub) == []
            # A call on d1 (Delete, Kill, Wait) does its cleanup now.
            exit_ = await manager.settle(h.namespace, "d1")
            assert exit_ is not None and (exit_.pid, exit_.status) == (pids["d1"], 137)
            e = await next_event(sub, "/tasks/exit")
            assert (e.container_id, e.pid, e.exit_status) == ("d1", pids["d1"], 137)
            await next_event(sub, "/tasks/delete")
            assert not (h.state / h.namespace / "d1").exists()
            assert [p.id for p in manager.recovering_in(h.namespace)] == ["d2", "l1"]
            # Once berthd serves, the rest is recovered in the background.
            manager.serving()
            await manager.recovered()
            assert manager.recovering_in(h.namespace) == []
            e = await next_event(sub, "/tasks/exit")
            assert (e.container_id, e.pid, e.exit_status) == ("d2", pids["d2"], 137)
            await next_event(sub, "/tasks/delete")
            (live,) = manager.tasks(h.namespace)
            assert (live.id, (await live.state()).status) == ("l1", Status.RUNNING)
            # A settled id is no recovering one any more.
            assert await manager.settle(h.namespace, "d1") is None
            await live.kill(signal.SIGKILL)
            await live.wait()
            await manager.delete(h.namespace, "l1")
    for tid in ("d1", "d2", "l1"):
        assert not alive(pids[tid])
        assert_nothing_left(h, tid)


async def test_restart_retires_shims_of_no_container(harness: Harness) -> None:
    """A shim and bundle whose container record is gone (a start cut short by a crash)
    are shut down and removed at start-up, and the id can be used again."""
    h = harness
    containers = store_for(h.db)
    with trio.fail_after(GUARD):
        async with running(h) as manager:
            o1 = await manager.create(h.namespace, "o1", h.opts("o1", ["sleep", "1000"]))
            pid = await o1.start()
            # o2 is created but never started, as when ctr run is cut short.
            await manager.create(h.namespace, "o2", h.opts("o2", ["sleep", "1000"]))
        shims = shim_pids(h.namespace)
        assert len(shims) == 2
        for tid in ("o1", "o2"):
            containers.delete(h.namespace, tid)
        async with running(h) as manager:
            assert manager.tasks(h.namespace) == []
            assert not any(alive(s) for s in shims)
            assert not alive(pid)
            for tid in ("o1", "o2"):
                assert_nothing_left(h, tid)
            again = await manager.create(h.namespace, "o1", h.opts("o1", ["true"]))
            await again.start()
            assert (await again.wait()).status == 0
            await manager.delete(h.namespace, "o1")
    assert_nothing_left(h, "o1")
