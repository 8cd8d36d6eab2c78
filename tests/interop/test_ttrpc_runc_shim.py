"""Our ttrpc client and server against the real containerd-shim-runc-v2 (Go ttrpc).

Shim v2 start protocol (containerd runtime/v2/binary.go and shim/shim.go): run
``<shim> -namespace N -address A -publish-binary B -id ID start`` in the bundle
directory with TTRPC_ADDRESS set. The ``start`` process needs ``config.json`` in
the bundle (it reads annotations from it), reads options from stdin until EOF,
forks the long-lived shim with the listening socket as fd 3, prints the socket
address and exits. The long-lived shim logs to the ``log`` fifo in the bundle,
which must already exist with a reader, as containerd's openShimLog arranges,
and publishes events with a ttrpc client to TTRPC_ADDRESS.

The runc shim puts its socket under /run/containerd/s (a hash of A, N and ID)
and runc's state under /run/containerd/runc/N whatever we pass; those are the
only paths outside our temporary directories, and the tests remove them and any
directory they had to create.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import pytest
import trio

from berth.core import errdefs
from berth.core.api.containerd import events
from berth.core.api.containerd.services.events.ttrpc.v1 import ForwardRequest
from berth.core.api.containerd.task.v2 import (
    ConnectRequest,
    ConnectResponse,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    ShutdownRequest,
    StartRequest,
    StartResponse,
    WaitRequest,
    WaitResponse,
)
from berth.core.ttrpc import NAMESPACE_KEY, Context, Method, Server, open_client

pytestmark = [pytest.mark.interop, pytest.mark.root]

SHIM_NAME = "containerd-shim-runc-v2"
TASK = "containerd.task.v2.Task"
EVENTS = "containerd.services.events.ttrpc.v1.Events"
# Turns a hang into a failure; nothing is measured by it.
DEADLOCK_GUARD = 60
RUN_CONTAINERD = Path("/run/containerd")


# -- processes --------------------------------------------------------------------------


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def alive(pid: int) -> bool:
    """Running and not a zombie (the shim is reparented away, we cannot reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def shim_pids(shim_id: str) -> set[int]:
    """Live processes running the runc shim for ``shim_id``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = _argv(int(entry))
        if not argv or os.path.basename(argv[0]) != SHIM_NAME or "-id" not in argv:
            continue
        if argv[argv.index("-id") + 1 : argv.index("-id") + 2] == [shim_id] and alive(int(entry)):
            found.add(int(entry))
    return found


async def wait_gone(pid: int) -> None:
    while alive(pid):
        await trio.sleep(0.05)


# -- the shim ---------------------------------------------------------------------------


@pytest.fixture
def run_dirs_cleanup() -> Iterator[list[Path]]:
    """Directories under /run/containerd the test may cause to exist; those that did
    not exist before are removed afterwards (deepest first, only when empty)."""
    candidates: list[Path] = []
    yield candidates
    for path in sorted(candidates, key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:
            pass


def note_new_dirs(candidates: list[Path], path: Path) -> None:
    for directory in [path, *path.parents]:
        if directory.exists():
            break
        candidates.append(directory)


async def _drain(fd: int, sink: list[bytes]) -> None:
    """Keep the shim's log fifo empty (a full pipe would block the shim)."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if data:
            sink.append(data)


class RunningShim:
    def __init__(self, address: str, bundle: Path, namespace: str, shim_id: str) -> None:
        self.address = address
        self.socket = Path(address.removeprefix("unix://"))
        self.bundle = bundle
        self.namespace = namespace
        self.id = shim_id
        self.metadata = {NAMESPACE_KEY: namespace}
        self.log: list[bytes] = []

    def log_text(self) -> str:
        return b"".join(self.log).decode(errors="replace")


@asynccontextmanager
async def started_shim(
    root: Path, namespace: str, shim_id: str, config: dict
) -> AsyncIterator[RunningShim]:
    """``<shim> ... start`` in a fresh bundle; on exit, no shim or socket is left."""
    shim = shutil.which(SHIM_NAME)
    assert shim, f"{SHIM_NAME} not found on PATH: this interop test needs it installed"
    assert os.geteuid() == 0, "the runc shim must run as root"
    # The bundle directory is named after the id: the shim's delete action looks for
    # the bundle at <dirname(cwd)>/<id>. It may already hold a rootfs.
    bundle = root / shim_id
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps(config))
    os.mkfifo(bundle / "log", 0o700)
    log_fd = os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK)
    env = dict(os.environ, TTRPC_ADDRESS=str(root / "containerd.sock.ttrpc"))
    common = [shim, "-namespace", namespace, "-address", str(root / "containerd.sock"),
              "-publish-binary", shutil.which("containerd") or "containerd", "-id", shim_id]
    running: RunningShim | None = None
    try:
        async with trio.open_nursery() as nursery:
            log: list[bytes] = []
            nursery.start_soon(_drain, log_fd, log)
            started = await trio.run_process(
                [*common, "start"], cwd=bundle, env=env, stdin=b"", capture_stdout=True,
                capture_stderr=True, check=False,
            )
            assert started.returncode == 0, started.stderr.decode()
            address = started.stdout.decode().strip()
            assert address.startswith("unix:///run/containerd/s/"), address
            assert (bundle / "address").read_text() == address
            running = RunningShim(address, bundle, namespace, shim_id)
            running.log = log
            yield running
            nursery.cancel_scope.cancel()
    finally:
        # What containerd does for a shim that died with work left: kill it, then let
        # the shim binary's `delete` action remove the runc container (and so its
        # cgroups and state) if a failed test left one behind.
        for pid in shim_pids(shim_id):
            os.kill(pid, signal.SIGKILL)
        if (RUN_CONTAINERD / "runc" / namespace / shim_id).exists():
            with trio.CancelScope(shield=True):
                await trio.run_process(
                    [*common, "-bundle", str(bundle), "delete"], cwd=bundle, env=env,
                    stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
                )
        os.close(log_fd)
        if running is not None:
            running.socket.unlink(missing_ok=True)


async def shut_down(client, shim: RunningShim, shim_pid: int) -> None:
    """Shutdown as containerd does it: ttrpc's ErrClosed counts as success, because
    the shim may exit before its answer leaves."""
    try:
        await client.call(TASK, "Shutdown", ShutdownRequest(id=shim.id), pb.Empty,
                          metadata=shim.metadata, timeout=10)
    except errdefs.Unavailable as exc:
        assert str(exc) == "ttrpc: closed"
    await client.wait_closed()
    await wait_gone(shim_pid)
    assert not shim.socket.exists(), "the shim removes its own socket on the way out"


def names(suffix: str) -> tuple[str, str]:
    return f"berth-ttrpc-{suffix}", f"ttrpc-{suffix}"


# -- tests ------------------------------------------------------------------------------


async def test_connect_and_shutdown_real_runc_shim(run_dirs_cleanup):
    namespace, shim_id = names(uuid.uuid4().hex[:12])
    note_new_dirs(run_dirs_cleanup, RUN_CONTAINERD / "s")
    shim_pid = 0
    with tempfile.TemporaryDirectory(prefix="berth-shim-", dir="/tmp") as tmp:
        with trio.fail_after(DEADLOCK_GUARD):
            async with started_shim(Path(tmp), namespace, shim_id,
                                    {"ociVersion": "1.0.2"}) as shim:
                async with open_client(shim.address) as client:
                    reply = await client.call(TASK, "Connect", ConnectRequest(id=shim_id),
                                              ConnectResponse, metadata=shim.metadata,
                                              timeout=10)
                    shim_pid = reply.shim_pid
                    assert alive(shim_pid)
                    assert shim_pids(shim_id) == {shim_pid}
                    assert reply.task_pid == 0  # nothing created yet

                    # Errors come back as the Go server's status.
                    with pytest.raises(errdefs.NotImplemented_, match="^method Nope$"):
                        await client.call(TASK, "Nope", ConnectRequest(), ConnectResponse,
                                          metadata=shim.metadata)
                    with pytest.raises(errdefs.NotFound, match="container not created"):
                        await client.call(TASK, "Wait", WaitRequest(id=shim_id), WaitResponse,
                                          metadata=shim.metadata)

                    await shut_down(client, shim, shim_pid)
                log = shim.log_text()
    assert shim_pid > 0
    assert not alive(shim_pid)
    assert shim_pids(shim_id) == set()
    assert "level=error" not in log, log


def busybox_bundle_config(bundle: Path) -> dict:
    """An OCI config (runc's default spec) running busybox from bundle/rootfs."""
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is needed for the container's rootfs"
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for directory in ("proc", "dev", "sys", "tmp"):
        (rootfs / directory).mkdir()
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/busybox", "sh", "-c", "exit 7"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "ttrpc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
        },
    }


async def test_runc_shim_go_client_forwards_events_to_our_server(run_dirs_cleanup):
    """The shim's Go ttrpc client publishes task events to our server at TTRPC_ADDRESS."""
    namespace, shim_id = names(uuid.uuid4().hex[:12])
    note_new_dirs(run_dirs_cleanup, RUN_CONTAINERD / "s")
    note_new_dirs(run_dirs_cleanup, RUN_CONTAINERD / "runc" / namespace)

    forwarded: list[tuple[Context, ForwardRequest]] = []
    delete_seen = trio.Event()

    async def forward(ctx: Context, req: ForwardRequest) -> pb.Empty:
        forwarded.append((ctx, req))
        if req.envelope.topic == "/tasks/delete":
            delete_seen.set()
        return pb.Empty()

    server = Server()
    server.register(EVENTS, {"Forward": Method(ForwardRequest, forward)})

    with tempfile.TemporaryDirectory(prefix="berth-shim-", dir="/tmp") as tmp:
        root = Path(tmp)
        bundle = root / shim_id
        with trio.fail_after(DEADLOCK_GUARD):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_unix, str(root / "containerd.sock.ttrpc"))
                config = busybox_bundle_config(bundle)
                async with started_shim(root, namespace, shim_id, config) as shim:
                    async with open_client(shim.address) as client:
                        md = shim.metadata
                        created = await client.call(
                            TASK, "Create",
                            CreateTaskRequest(id=shim_id, bundle=str(bundle)),
                            CreateTaskResponse, metadata=md, timeout=30,
                        )
                        assert created.pid > 0
                        started = await client.call(TASK, "Start", StartRequest(id=shim_id),
                                                    StartResponse, metadata=md, timeout=30)
                        assert started.pid == created.pid
                        waited = await client.call(TASK, "Wait", WaitRequest(id=shim_id),
                                                   WaitResponse, metadata=md, timeout=30)
                        assert waited.exit_status == 7
                        deleted = await client.call(TASK, "Delete", DeleteRequest(id=shim_id),
                                                    DeleteResponse, metadata=md, timeout=30)
                        assert (deleted.pid, deleted.exit_status) == (created.pid, 7)
                        await delete_seen.wait()
                        shim_pid = (await client.call(TASK, "Connect",
                                                      ConnectRequest(id=shim_id),
                                                      ConnectResponse, metadata=md)).shim_pid
                        await shut_down(client, shim, shim_pid)
                    log = shim.log_text()
                nursery.cancel_scope.cancel()

    topics = [req.envelope.topic for _, req in forwarded]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], log
    for ctx, req in forwarded:
        # The namespace travels both as ttrpc metadata and in the envelope.
        assert ctx.namespace == namespace
        assert req.envelope.namespace == namespace
        assert (ctx.service, ctx.method) == (EVENTS, "Forward")
    exit_any = forwarded[2][1].envelope.event
    assert exit_any.type_url == "containerd.events.TaskExit"
    task_exit = events.TaskExit().parse(exit_any.value)
    assert (task_exit.container_id, task_exit.id) == (shim_id, shim_id)
    assert (task_exit.pid, task_exit.exit_status) == (created.pid, 7)
    assert shim_pids(shim_id) == set()
    assert not (RUN_CONTAINERD / "runc" / namespace / shim_id).exists()
