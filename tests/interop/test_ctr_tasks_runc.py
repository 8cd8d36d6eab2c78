"""The real ctr against berthd with the real containerd-shim-runc-v2, side by side with
the real containerd where the two can be compared.

Each test uses its own namespace and container ids; the ``leftovers`` fixture (from the
runtime integration tests) kills and removes whatever a failing test leaves behind:
shims, runc containers, cgroups, shim sockets, directories under /run/containerd. ctr
itself puts the fifos of detached tasks under /run/containerd/fifo; the ones of this
test's containers are removed too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import daemons
from tests.integration.test_runtime_manager import (
    Leftovers,
    alive,
    cgroup_dirs,
    leftovers as leftovers,  # noqa: F401
    make_rootfs,
    shim_pids,
    shim_sockets,
)

pytestmark = [pytest.mark.interop, pytest.mark.root]

RUNTIME = "io.containerd.runc.v2"
FIFO_DIR = Path("/run/containerd/fifo")
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


class Ctr:
    """ctr bound to one daemon and one namespace."""

    def __init__(self, daemon: daemons.Daemon, namespace: str) -> None:
        self.daemon = daemon
        self.namespace = namespace

    def __call__(self, *args: str) -> daemons.Result:
        return daemons.ctr(self.daemon.address, *args, namespace=self.namespace)

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.rc == 0, (args, r, self.daemon.logs()[-3000:])
        return r.out

    def run(self, rootfs: Path, cid: str, *cmd: str, detach: bool = False) -> daemons.Result:
        flags = ["-d"] if detach else ["--rm"]
        return self("run", "--rootfs", "--runtime", RUNTIME, "--env", "PATH=/bin", *flags,
                    str(rootfs), cid, *cmd)

    def tasks(self) -> dict[str, tuple[str, str]]:
        """``ctr tasks ls`` as {id: (pid, status)}."""
        lines = self.ok("tasks", "ls").splitlines()
        assert lines[0].split() == ["TASK", "PID", "STATUS"]
        return {f[0]: (f[1], f[2]) for f in (line.split() for line in lines[1:])}

    def events(self) -> Events:
        return Events(self)


class Events:
    """``ctr events`` in the background, as (topic, payload) for this namespace."""

    def __init__(self, ctr: Ctr) -> None:
        self.ctr = ctr
        self.path = Path(ctr.daemon.base) / f"events-{uuid.uuid4().hex[:6]}.txt"
        self._out = open(self.path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [daemons.CTR, "--address", str(ctr.daemon.address), "events"],
            stdout=self._out, stderr=subprocess.STDOUT,
        )
        # ctr subscribes asynchronously: publish a marker until it shows up.
        n = 0

        def marker_seen() -> bool:
            nonlocal n
            n += 1
            daemons.ctr(ctr.daemon.address, "namespaces", "create", f"mark-{self.path.stem}-{n}")
            return "/namespaces/create" in self.path.read_text(errors="replace")

        wait_for("ctr events to subscribe", marker_seen)
        for i in range(1, n + 1):
            daemons.ctr(ctr.daemon.address, "namespaces", "rm", f"mark-{self.path.stem}-{i}")

    def list(self) -> list[tuple[str, dict]]:
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            m = re.match(r"^\S+ \S+ \S+ \S+ (\S+) (/\S+) (\{.*\})$", line)
            if m and m.group(1) == self.ctr.namespace:
                out.append((m.group(2), json.loads(m.group(3))))
        return out

    def wait(self, topic: str, cid: str) -> dict:
        def find() -> dict | None:
            for t, payload in self.list():
                if t == topic and cid in (payload.get("container_id"), payload.get("id")):
                    return payload
            return None
        return wait_for(f"{topic} of {cid}", find)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._out.close()


@pytest.fixture
def rootfs(leftovers: Leftovers) -> Path:
    return make_rootfs(leftovers.base / "busybox")


@pytest.fixture
def ids(leftovers: Leftovers) -> Iterator[Callable[[str], str]]:
    """Unique container ids; ctr's fifo directories for them are removed afterwards."""
    suffix = uuid.uuid4().hex[:6]
    made: list[str] = []

    def make(name: str) -> str:
        made.append(f"{name}-{suffix}")
        return made[-1]

    yield make
    try:
        fifo_dirs = list(FIFO_DIR.iterdir())
    except FileNotFoundError:
        return
    for d in fifo_dirs:
        names = [p.name for p in d.iterdir()] if d.is_dir() else []
        if names and all(any(n.startswith(f"{cid}-") for cid in made) for n in names):
            shutil.rmtree(d, ignore_errors=True)


def assert_nothing_left(namespace: str, cid: str, daemon: daemons.Daemon) -> None:
    assert shim_pids(namespace, cid) == set()
    assert cgroup_dirs(namespace, cid) == []
    assert not Path(f"/run/containerd/runc/{namespace}/{cid}").exists()
    bundles = daemon.state / "io.containerd.runtime.v2.task" / namespace
    assert not (bundles / cid).exists()
    with open("/proc/self/mountinfo") as f:
        assert str(daemon.base) not in f.read()


def ids_normalized(text: str, *cids: str) -> str:
    for cid in cids:
        text = text.replace(cid, cid.rsplit("-", 1)[0])
    return text


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["berthd", "containerd"])
def test_run_rm_output_exit_code_and_event_order(which: str, request: pytest.FixtureRequest,
                                                  leftovers: Leftovers, rootfs: Path,
                                                  ids: Callable[[str], str]) -> None:
    daemon = request.getfixturevalue(which)
    ctr = Ctr(daemon, leftovers.namespace)
    events = ctr.events()
    t1, t2 = ids("t1"), ids("t2")
    try:
        r = ctr.run(rootfs, t1, "echo", "hi")
        assert (r.rc, r.out, r.err) == (0, "hi\n", "")
        r = ctr.run(rootfs, t2, "sh", "-c", "exit 3")
        assert (r.rc, r.out) == (3, "")
        events.wait("/containers/delete", t2)
    finally:
        events.stop()
    got = [(t, p.get("id") or p.get("container_id")) for t, p in events.list()]
    assert got == [(t, cid) for cid in (t1, t2) for t in (
        "/containers/create", "/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete",
        "/containers/delete")]
    payloads = [p for _, p in events.list()]
    assert payloads[0]["runtime"] == {"name": RUNTIME,
                                      "options": {"type_url": "containerd.runc.v1.Options"}}
    bundle = str(daemon.state / "io.containerd.runtime.v2.task" / leftovers.namespace / t1)
    assert payloads[1]["bundle"] == bundle
    exit_t2 = payloads[9]
    assert exit_t2["exit_status"] == 3 and exit_t2["pid"] == payloads[7]["pid"]
    for cid in (t1, t2):
        assert_nothing_left(leftovers.namespace, cid, daemon)
    assert ctr.ok("containers", "ls").splitlines()[1:] == []


def _detached_session(ctr: Ctr, rootfs: Path, cid: str) -> list[tuple[str, int, str]]:
    """ctr's task commands on one detached task; a transcript to compare daemons by."""
    ns = ctr.namespace
    log: list[tuple[str, int, str]] = []

    def step(name: str, *args: str) -> daemons.Result:
        r = ctr(*args)
        text = ids_normalized(r.out + r.err, cid).replace(ns, "NS")
        text = re.sub(r"time=\"[^\"]*\"", "time=T", text)
        log.append((name, r.rc, text))
        return r

    r = ctr.run(rootfs, cid, "sleep", "1000", detach=True)
    assert r.rc == 0, (r, ctr.daemon.logs()[-3000:])
    pid, status = ctr.tasks()[cid]
    assert status == "RUNNING" and alive(int(pid))
    ps = ctr.ok("tasks", "ps", cid).splitlines()
    assert ps[0].split() == ["PID", "INFO"] and ps[1].split()[0] == pid
    ctr.ok("tasks", "pause", cid)
    assert ctr.tasks()[cid] == (pid, "PAUSED")
    ctr.ok("tasks", "resume", cid)
    assert ctr.tasks()[cid] == (pid, "RUNNING")
    metrics = ctr.ok("tasks", "metrics", cid)
    assert re.search(r"^pids\.current\s+1\s*$", metrics, re.M), metrics
    assert re.search(r"^memory\.usage_in_bytes\s+\d+", metrics, re.M), metrics
    r = ctr("tasks", "exec", "--exec-id", "e1", cid, "sh", "-c", "echo x; exit 4")
    assert (r.rc, r.out) == (4, "x\n"), r
    info = json.loads(ctr.ok("containers", "info", cid))
    assert info["ID"] == cid and info["Runtime"]["Name"] == RUNTIME
    assert info["Spec"]["linux"]["cgroupsPath"] == f"/{ns}/{cid}"
    assert cgroup_dirs(ns, cid)
    lines = ctr.ok("containers", "ls").splitlines()
    assert lines[1].split() == [cid, "-", RUNTIME]
    step("rm running task", "tasks", "rm", cid)
    step("rm container of running task", "containers", "rm", cid)
    step("start running task", "tasks", "start", cid)
    step("exec bad id", "tasks", "exec", "--exec-id", "bad id!", cid, "true")
    step("kill unknown exec", "tasks", "kill", "--exec-id", "nope", cid)
    step("metrics of unknown", "tasks", "metrics", "nope")
    step("pause unknown", "tasks", "pause", "nope")
    step("kill", "tasks", "kill", "-s", "KILL", cid)
    wait_for("the task to stop", lambda: ctr.tasks()[cid][1] == "STOPPED")
    step("rm stopped task", "tasks", "rm", cid)
    step("rm task again", "tasks", "rm", cid)
    step("rm container", "containers", "rm", cid)
    step("rm container again", "containers", "rm", cid)
    step("info of removed", "containers", "info", cid)
    assert ctr.tasks() == {}
    assert_nothing_left(ns, cid, ctr.daemon)
    return log


def test_task_commands_match_containerd(berthd: daemons.Daemon, containerd: daemons.Daemon,
                                        leftovers: Leftovers, rootfs: Path,
                                        ids: Callable[[str], str]) -> None:
    cid = ids("d1")
    berth = _detached_session(Ctr(berthd, leftovers.namespace), rootfs, cid)
    real = _detached_session(Ctr(containerd, leftovers.namespace), rootfs, cid)
    assert [s[:2] for s in berth] == [s[:2] for s in real]
    for (name, _, ours), (_, _, theirs) in zip(berth, real, strict=True):
        assert ours == theirs, name
    assert dict((n, rc) for n, rc, _ in berth)["rm running task"] == 1


def test_task_survives_berthd_restart(berthd: daemons.Daemon, leftovers: Leftovers,
                                      rootfs: Path, ids: Callable[[str], str]) -> None:
    ctr = Ctr(berthd, leftovers.namespace)
    cid = ids("r1")
    r = ctr.run(rootfs, cid, "sleep", "1000", detach=True)
    assert r.rc == 0, r
    pid, _ = ctr.tasks()[cid]
    berthd.kill()
    assert alive(int(pid)) and shim_pids(leftovers.namespace, cid)
    berthd.start()
    assert ctr.tasks() == {cid: (pid, "RUNNING")}
    events = ctr.events()
    try:
        ctr.ok("tasks", "kill", "-s", "KILL", cid)
        exit_ = events.wait("/tasks/exit", cid)
        assert (exit_["pid"], exit_["exit_status"]) == (int(pid), 137)
    finally:
        events.stop()
    assert ctr.tasks() == {cid: (pid, "STOPPED")}
    ctr.ok("tasks", "rm", cid)
    ctr.ok("containers", "rm", cid)
    assert_nothing_left(leftovers.namespace, cid, berthd)


def test_task_of_shim_killed_while_berthd_down(berthd: daemons.Daemon, leftovers: Leftovers,
                                               rootfs: Path, ids: Callable[[str], str]) -> None:
    ctr = Ctr(berthd, leftovers.namespace)
    cid = ids("x1")
    assert ctr.run(rootfs, cid, "sleep", "1000", detach=True).rc == 0
    pid, _ = ctr.tasks()[cid]
    berthd.kill()
    for shim in shim_pids(leftovers.namespace, cid):
        os.kill(shim, signal.SIGKILL)
    wait_for("the shim to die", lambda: not shim_pids(leftovers.namespace, cid))
    berthd.start()
    # berthd serves before it cleans up after the dead shim (in the background):
    # meanwhile the task shows as UNKNOWN, then it is gone.
    assert ctr.tasks() in ({cid: (pid, "UNKNOWN")}, {})
    wait_for("the dead shim's cleanup", lambda: ctr.tasks() == {})
    # Reported while nobody was subscribed: berth's durable event log has it.
    logged = daemons.berth(berthd.address, "events", "--since", "0", "--no-follow",
                           f'namespace=={leftovers.namespace},topic~="^/tasks/(exit|delete)"')
    assert logged.rc == 0, logged
    lines = logged.out.splitlines()
    assert [line.split()[4] for line in lines] == ["/tasks/exit", "/tasks/delete"], lines
    exit_ = json.loads(lines[0].split(" ", 5)[5])
    assert (exit_["container_id"], exit_["pid"], exit_["exit_status"]) == (cid, int(pid), 137)
    assert not alive(int(pid))
    ctr.ok("containers", "rm", cid)
    assert_nothing_left(leftovers.namespace, cid, berthd)


@pytest.mark.parametrize("which", ["berthd", "containerd"])
def test_killed_shim_reports_exit_and_leaks_nothing(which: str, request: pytest.FixtureRequest,
                                                    leftovers: Leftovers, rootfs: Path,
                                                    ids: Callable[[str], str]) -> None:
    daemon = request.getfixturevalue(which)
    ctr = Ctr(daemon, leftovers.namespace)
    cid = ids("k1")
    sockets = shim_sockets()
    assert ctr.run(rootfs, cid, "sleep", "1000", detach=True).rc == 0
    pid, _ = ctr.tasks()[cid]
    (shim,) = shim_pids(leftovers.namespace, cid)
    new_sockets = shim_sockets() - sockets
    assert len(new_sockets) == 1
    events = ctr.events()
    try:
        os.kill(shim, signal.SIGKILL)
        exit_ = events.wait("/tasks/exit", cid)
        deleted = events.wait("/tasks/delete", cid)
    finally:
        events.stop()
    assert (exit_["pid"], exit_["exit_status"]) == (int(pid), 137)
    assert (deleted["pid"], deleted["exit_status"]) == (int(pid), 137)
    wait_for("the task to be forgotten", lambda: ctr.tasks() == {})
    r = ctr("tasks", "rm", cid)
    assert r.rc == 1 and f"no running task found: task {cid} not found: not found" in r.err
    ctr.ok("containers", "rm", cid)
    assert not alive(int(pid))
    assert_nothing_left(leftovers.namespace, cid, daemon)
    if which == "berthd":
        # containerd 1.6 leaves the dead shim's socket behind; berth removes it.
        assert not (shim_sockets() & new_sockets)


# -- the Tasks API directly: what ctr checks on its own side, the server must answer too --


def _grpc_session(daemon: daemons.Daemon, namespace: str, rootfs: Path, cid: str
                  ) -> list[tuple[str, object]]:
    """Tasks and Containers calls with containerd's status codes and messages."""
    import asyncio

    import betterproto.lib.google.protobuf as pb
    from grpclib import GRPCError
    from grpclib.client import Channel

    from berth.core.api.containerd.services.containers import v1 as containers
    from berth.core.api.containerd.services.tasks import v1 as tasks

    spec = {
        "ociVersion": "1.0.2-dev",
        "process": {"user": {"uid": 0, "gid": 0}, "args": ["sleep", "1000"],
                    "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": str(rootfs)},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"cgroupsPath": f"/{namespace}/{cid}",
                  "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }
    out: list[tuple[str, object]] = []
    pids: dict[int, str] = {}

    def pid(n: int) -> str:
        return pids.setdefault(n, f"pid{len(pids)}") if n else "0"

    async def session() -> None:
        channel = Channel(path=str(daemon.address))
        md = {"containerd-namespace": namespace}
        t = tasks.TasksStub(channel, metadata=md)
        c = containers.ContainersStub(channel, metadata=md)

        async def call(name: str, coro) -> object:
            try:
                resp = await coro
            except GRPCError as e:
                out.append((name, (e.status.name, ids_normalized(e.message, cid))))
                return None
            return resp

        try:
            await c.create(containers.CreateContainerRequest(container=containers.Container(
                id=cid, runtime=containers.ContainerRuntime(name=RUNTIME),
                spec=pb.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                            value=json.dumps(spec).encode()))))
            await call("get without task", t.get(tasks.GetRequest(container_id=cid)))
            await call("delete without task", t.delete(tasks.DeleteTaskRequest(container_id=cid)))
            await call("kill without task", t.kill(tasks.KillRequest(container_id=cid, signal=9)))
            await call("create of unknown", t.create(tasks.CreateTaskRequest(container_id="nope")))
            created = await t.create(tasks.CreateTaskRequest(container_id=cid))
            out.append(("created", (created.container_id == cid, pid(created.pid))))
            await call("create again", t.create(tasks.CreateTaskRequest(container_id=cid)))
            got = await t.get(tasks.GetRequest(container_id=cid))
            out.append(("get created", (got.process.id == cid, got.process.container_id,
                                        pid(got.process.pid), got.process.status.name)))
            started = await t.start(tasks.StartRequest(container_id=cid))
            out.append(("started", pid(started.pid)))
            await call("exec without id", t.exec(tasks.ExecProcessRequest(container_id=cid)))
            await call("get unknown exec", t.get(tasks.GetRequest(container_id=cid,
                                                                  exec_id="nope")))
            await call("delete unknown exec", t.delete_process(
                tasks.DeleteProcessRequest(container_id=cid, exec_id="nope")))
            await call("delete running", t.delete(tasks.DeleteTaskRequest(container_id=cid)))
            await call("list without namespace", t.list(tasks.ListTasksRequest(), metadata={}))
            await call("metrics bad filter", t.metrics(tasks.MetricsRequest(filters=["id=="])))
            listed = await t.list(tasks.ListTasksRequest())
            out.append(("list", [(p.id == cid, pid(p.pid), p.status.name) for p in listed.tasks]))
            pids_resp = await t.list_pids(tasks.ListPidsRequest(container_id=cid))
            out.append(("pids", [pid(p.pid) for p in pids_resp.processes]))
            m = await t.metrics(tasks.MetricsRequest(filters=[f"id=={cid}"]))
            out.append(("metrics", [(x.id == cid, x.data.type_url) for x in m.metrics]))
            await call("resize without terminal", t.resize_pty(
                tasks.ResizePtyRequest(container_id=cid, width=80, height=24)))
            await t.kill(tasks.KillRequest(container_id=cid, signal=9))
            waited = await t.wait(tasks.WaitRequest(container_id=cid))
            out.append(("wait", waited.exit_status))
            deleted = await t.delete(tasks.DeleteTaskRequest(container_id=cid))
            out.append(("deleted", (deleted.id, pid(deleted.pid), deleted.exit_status)))
            await call("delete deleted", t.delete(tasks.DeleteTaskRequest(container_id=cid)))
            await c.delete(containers.DeleteContainerRequest(id=cid))
            await call("delete container again",
                       c.delete(containers.DeleteContainerRequest(id=cid)))
        finally:
            channel.close()

    asyncio.run(asyncio.wait_for(session(), GUARD))
    return out


def test_tasks_api_matches_containerd(berthd: daemons.Daemon, containerd: daemons.Daemon,
                                      leftovers: Leftovers, rootfs: Path,
                                      ids: Callable[[str], str]) -> None:
    cid = ids("g1")
    berth = _grpc_session(berthd, leftovers.namespace, rootfs, cid)
    real = _grpc_session(containerd, leftovers.namespace, rootfs, cid)
    assert berth == real
    steps = dict(berth)
    assert steps["get without task"] == ("NOT_FOUND", "task g1 not found")
    assert steps["wait"] == 137
    assert_nothing_left(leftovers.namespace, cid, berthd)


def test_restore_from_checkpoint_is_not_implemented(berthd: daemons.Daemon,
                                                    leftovers: Leftovers, rootfs: Path,
                                                    ids: Callable[[str], str]) -> None:
    import asyncio

    from grpclib import GRPCError
    from grpclib.client import Channel
    from grpclib.const import Status

    from berth.core.api.containerd.services.tasks import v1 as tasks
    from berth.core.api.containerd.types import Descriptor

    ctr = Ctr(berthd, leftovers.namespace)
    cid = ids("cp")
    ctr.ok("containers", "create", "--rootfs", str(rootfs), cid, "true")

    async def create() -> GRPCError:
        channel = Channel(path=str(berthd.address))
        try:
            t = tasks.TasksStub(channel, metadata={"containerd-namespace": ctr.namespace})
            with pytest.raises(GRPCError) as err:
                await t.create(tasks.CreateTaskRequest(container_id=cid, checkpoint=Descriptor(
                    media_type="application/vnd.containerd.container.criu.checkpoint.criu.tar",
                    digest="sha256:" + "0" * 64, size=1)))
            return err.value
        finally:
            channel.close()

    err = asyncio.run(asyncio.wait_for(create(), GUARD))
    assert (err.status, err.message) == (
        Status.UNIMPLEMENTED, "restoring a task from a checkpoint: not implemented")
    assert ctr.tasks() == {}
    ctr.ok("containers", "rm", cid)
    assert_nothing_left(leftovers.namespace, cid, berthd)


def test_image_rootfs_is_mounted_by_the_shim_and_unmounted_after_its_death(
        berthd: daemons.Daemon, leftovers: Leftovers, ids: Callable[[str], str]) -> None:
    """An image's snapshot reaches the shim as Tasks.Create rootfs mounts."""
    from tests.images import NAME, write_oci_tar

    ctr = Ctr(berthd, leftovers.namespace)
    tar = leftovers.base / "busybox-oci.tar"
    write_oci_tar(tar)
    ctr.ok("images", "import", str(tar))
    r = ctr("run", "--rm", NAME, ids("i1"), "echo", "from-image")
    assert (r.rc, r.out) == (0, "from-image\n"), (r, berthd.logs()[-3000:])
    cid = ids("i2")
    ctr.ok("run", "-d", NAME, cid, "sleep", "1000")
    rootfs = (berthd.state / "io.containerd.runtime.v2.task" / leftovers.namespace / cid
              / "rootfs")
    with open("/proc/self/mountinfo") as f:
        overlay = [line for line in f if f" {rootfs} " in line]
    assert len(overlay) == 1 and " - overlay " in overlay[0], overlay
    pid, _ = ctr.tasks()[cid]
    (shim,) = shim_pids(leftovers.namespace, cid)
    events = ctr.events()
    try:
        os.kill(shim, signal.SIGKILL)
        # A dead shim's task vanishes from the list at once (its state is "not found");
        # the delete event comes once the cleanup is done.
        assert events.wait("/tasks/delete", cid)["exit_status"] == 137
    finally:
        events.stop()
    assert ctr.tasks() == {}
    assert not alive(int(pid))
    assert_nothing_left(leftovers.namespace, cid, berthd)
    ctr.ok("containers", "rm", cid)
    assert ctr.ok("snapshots", "ls").count("Active") == 0
