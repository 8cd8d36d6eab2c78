"""Tasks as a client drives them: the stubs, a container's spec, and the life of an
attached process that ``berth run``, ``berth tasks start|exec|attach`` share: create it with
a FIFO set, wait for it before starting it (so its exit cannot be missed), copy its stdio,
forward our signals to it (or, with a terminal, our window size), then drain its output
and return its exit status.

asyncio (grpclib). Errors are :mod:`berth.core.errdefs` errors or grpclib's GRPCError.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from grpclib import GRPCError
from grpclib.const import Status as GStatus

from berth.core import errdefs
from berth.core.client import cio, connection

log = structlog.get_logger("berth.client.tasks")

#: After a process exits, how long its output may still be draining before we delete it
#: (the shim closes the FIFOs then). Output held open by a background child is cut here.
DRAIN_GRACE = 2.0
STOP_SIGNAL_LABEL = "io.containerd.image.config.stop-signal"

# ctr forwards every signal it can catch; these are the ones worth catching here.
FORWARDED_SIGNALS = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGALRM, signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN,
    signal.SIGTTOU,
)


def tasks_stub(s: connection.Session) -> Any:
    from berth.core.api.containerd.services.tasks.v1 import TasksStub

    return TasksStub(s.channel, metadata=s.metadata)


def containers_stub(s: connection.Session) -> Any:
    from berth.core.api.containerd.services.containers.v1 import ContainersStub

    return ContainersStub(s.channel, metadata=s.metadata)


async def get_container(s: connection.Session, container_id: str) -> Any:
    from berth.core.api.containerd.services.containers.v1 import GetContainerRequest

    if not container_id:
        raise errdefs.InvalidArgument("container id must be provided", raw=True)
    return (await containers_stub(s).get(GetContainerRequest(id=container_id))).container


def container_spec(container: Any) -> dict[str, Any]:
    from berth.core.oci import default_spec

    return default_spec.from_any(container.spec)


def parse_signal(text: str) -> int:
    """``9``, ``KILL``, ``SIGKILL``, ``sigkill`` (moby's ParseSignal)."""
    try:
        number = int(text)
    except ValueError:
        name = text.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            raise errdefs.InvalidArgument(f"invalid signal: {text}", raw=True) from None
    if number <= 0:
        raise errdefs.InvalidArgument(f"invalid signal: {text}", raw=True)
    return number


def is_not_found(e: GRPCError) -> bool:
    return e.status == GStatus.NOT_FOUND


# --- signals --------------------------------------------------------------------------

class SignalForwarder:
    """Our signals, caught from construction on, sent to the process by :meth:`run`
    (ForwardAllSignals); caught before the start so that none is lost."""

    def __init__(self, kill: Callable[[int], Awaitable[None]]) -> None:
        self._kill = kill
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        for sig in FORWARDED_SIGNALS:
            self._loop.add_signal_handler(sig, self._queue.put_nowait, int(sig))

    async def run(self) -> None:
        """Forward until cancelled or the process is gone."""
        while True:
            sig = await self._queue.get()
            try:
                await self._kill(sig)
            except GRPCError as e:
                if is_not_found(e):
                    return
                # As ctr: a signal that cannot be forwarded is reported, not fatal.
                log.error("forward signal", signal=signal.Signals(sig).name, error=e.message)

    def close(self) -> None:
        for sig in FORWARDED_SIGNALS:
            self._loop.remove_signal_handler(sig)


# --- an attached process ----------------------------------------------------------------

async def run_attached(s: connection.Session, container_id: str, fifos: cio.FIFOSet, *,
                       exec_id: str = "", create: Callable[[], Awaitable[None]] | None,
                       detach: bool = False, start: bool = True) -> int | None:
    """Create (``create``), start and follow one process of a container.

    ``create`` makes the task or exec'd process with ``fifos`` (None when it exists
    already: attach). Returns its exit status, or None when detached (after Start).
    The caller deletes the process and removes the FIFOs.
    """
    from berth.core.api.containerd.services.tasks.v1 import (
        CloseIoRequest,
        KillRequest,
        ResizePtyRequest,
        StartRequest,
        WaitRequest,
    )

    t = tasks_stub(s)
    term = cio.terminal_fd() if fifos.terminal and not detach else None

    async def close_stdin() -> None:
        await t.close_io(CloseIoRequest(container_id=container_id, exec_id=exec_id,
                                        stdin=True))

    async def resize(width: int, height: int) -> None:
        await t.resize_pty(ResizePtyRequest(container_id=container_id, exec_id=exec_id,
                                            width=width, height=height))

    async def kill(sig: int) -> None:
        await t.kill(KillRequest(container_id=container_id, exec_id=exec_id, signal=sig))

    with cio.raw_terminal(term):
        async with cio.Copier(fifos, stdin=None if detach else 0) as io:
            if create is not None:
                await create()
            if detach:
                if start:
                    await t.start(StartRequest(container_id=container_id, exec_id=exec_id))
                return None
            waiter = asyncio.ensure_future(
                t.wait(WaitRequest(container_id=container_id, exec_id=exec_id)))
            forwarder = None if fifos.terminal else SignalForwarder(kill)
            helpers: list[asyncio.Future[None]] = []
            try:
                if forwarder is not None:
                    helpers.append(asyncio.ensure_future(forwarder.run()))
                if start:
                    await t.start(StartRequest(container_id=container_id, exec_id=exec_id))
                io.attach_stdin(close_stdin)
                if fifos.terminal:
                    helpers.append(asyncio.ensure_future(cio.forward_resizes(term, resize)))
                status = await waiter
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(io.wait(), DRAIN_GRACE)
            finally:
                if forwarder is not None:
                    forwarder.close()
                for f in (*helpers, waiter):
                    if not f.done():
                        f.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await f
    return int(status.exit_status)


async def create_task(s: connection.Session, container: Any, fifos: cio.FIFOSet) -> int:
    """Tasks.Create for a container, its snapshot's mounts as the rootfs."""
    from berth.core.api.containerd.services.snapshots.v1 import MountsRequest, SnapshotsStub
    from berth.core.api.containerd.services.tasks.v1 import CreateTaskRequest

    rootfs = []
    if container.snapshot_key:
        if not container.snapshotter:
            raise errdefs.InvalidArgument(
                "unable to resolve rootfs mounts without snapshotter on container")
        resp = await SnapshotsStub(s.channel, metadata=s.metadata).mounts(MountsRequest(
            snapshotter=container.snapshotter, key=container.snapshot_key))
        rootfs = list(resp.mounts)
    resp = await tasks_stub(s).create(CreateTaskRequest(
        container_id=container.id, rootfs=rootfs, stdin=fifos.stdin, stdout=fifos.stdout,
        stderr=fifos.stderr, terminal=fifos.terminal))
    return int(resp.pid)


async def delete_task(s: connection.Session, container_id: str, *, force: bool = False,
                      fifos: cio.FIFOSet | None = None) -> Any:
    """Delete a stopped task (with ``force``, kill it first), then its FIFOs."""
    from berth.core.api.containerd.services.tasks.v1 import DeleteTaskRequest, GetRequest
    from berth.core.api.containerd.v1.types import Status

    t = tasks_stub(s)
    process = (await t.get(GetRequest(container_id=container_id))).process
    # A created task with no pid yet may go too (containerd #7357).
    stopped = process.status in (Status.STOPPED, Status.UNKNOWN) or (
        process.status == Status.CREATED and process.pid == 0)
    if not stopped:
        if not force:
            raise errdefs.FailedPrecondition(
                f"task must be stopped before deletion: {status_name(process.status)}")
        await kill_and_wait(s, container_id, "")
    if fifos is None:
        fifos = cio.loaded_fifo_set(process.stdin, process.stdout, process.stderr,
                                    process.terminal)
    resp = await t.delete(DeleteTaskRequest(container_id=container_id))
    fifos.close()
    return resp


async def kill_and_wait(s: connection.Session, container_id: str, exec_id: str) -> None:
    """WithProcessKill: SIGKILL (the whole container for the task) and wait for the exit."""
    from berth.core.api.containerd.services.tasks.v1 import KillRequest, WaitRequest

    t = tasks_stub(s)
    waiter = asyncio.ensure_future(t.wait(WaitRequest(container_id=container_id,
                                                      exec_id=exec_id)))
    try:
        try:
            await t.kill(KillRequest(container_id=container_id, exec_id=exec_id,
                                     signal=int(signal.SIGKILL), all=not exec_id))
        except GRPCError as e:
            if not is_not_found(e) and e.status != GStatus.FAILED_PRECONDITION:
                raise
        await waiter
    finally:
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiter


def status_name(status: Any) -> str:
    from berth.core.api.containerd.v1.types import Status

    try:
        return Status(status).name.lower()
    except ValueError:
        return str(status)


@contextlib.asynccontextmanager
async def rootfs_users(s: connection.Session, container: Any, spec: dict[str, Any]) -> Any:
    """The users of a container's root filesystem: its rootfs path, or its snapshot
    mounted read-only for the lookup (mount.WithTempMount)."""
    from berth.core import mount as mounting
    from berth.core.api.containerd.services.snapshots.v1 import MountsRequest, SnapshotsStub
    from berth.core.oci.default_spec import UserDB

    if not container.snapshot_key:
        root = (spec.get("root") or {}).get("path") or ""
        if not root.startswith("/"):
            raise errdefs.InvalidArgument("rootfs absolute path is required", raw=True)
        yield UserDB.from_root(root)
        return
    resp = await SnapshotsStub(s.channel, metadata=s.metadata).mounts(MountsRequest(
        snapshotter=container.snapshotter, key=container.snapshot_key))
    mounts = [mounting.Mount.from_proto(m) for m in resp.mounts]
    with mounting.mounted(mounts, read_only=True) as root:
        yield UserDB.from_root(root)



# --- metrics ----------------------------------------------------------------------------

CGROUPS_V1_METRICS = "io.containerd.cgroups.v1.Metrics"
CGROUPS_V2_METRICS = "io.containerd.cgroups.v2.Metrics"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _message(data: bytes) -> dict[int, Any]:
    """Field number → value (last wins; repeated varints collected as lists)."""
    from berth.core.shim.wire import WIRE_LEN, fields

    out: dict[int, Any] = {}
    for number, kind, value in fields(data):
        out[number] = bytes(value) if kind == WIRE_LEN else value  # type: ignore[arg-type]
    return out


def _packed(data: Any) -> list[int]:
    if isinstance(data, int):
        return [data]
    out, pos = [], 0
    while pos < len(data or b""):
        v, pos = _varint(data, pos)
        out.append(v)
    return out


def metrics_rows(type_url: str, value: bytes) -> list[tuple[str, Any]] | None:
    """ctr's metric table for cgroups v1/v2 Metrics, decoded by field number (the
    cgroups protos are not among core/api's generated types); None if unknown."""
    name = type_url.rsplit("/", 1)[-1]
    m = _message(value)
    rows: list[tuple[str, Any]] = []
    if name == CGROUPS_V1_METRICS:
        if 4 in m:
            memory = _message(m[4])
            usage = _message(memory.get(33, b""))
            rows += [("memory.usage_in_bytes", usage.get(2, 0)),
                     ("memory.limit_in_bytes", usage.get(1, 0)),
                     ("memory.stat.cache", memory.get(18, 0))]
        if 3 in m:
            cpu_usage = _message(_message(m[3]).get(1, b""))
            per_cpu = " ".join(str(v) for v in _packed(cpu_usage.get(4, b"")))
            rows += [("cpuacct.usage", cpu_usage.get(1, 0)),
                     ("cpuacct.usage_percpu", f"[{per_cpu}]")]
        if 2 in m:
            pids = _message(m[2])
            rows += [("pids.current", pids.get(1, 0)), ("pids.limit", pids.get(2, 0))]
        return rows
    if name == CGROUPS_V2_METRICS:
        if 1 in m:
            pids = _message(m[1])
            rows += [("pids.current", pids.get(1, 0)), ("pids.limit", pids.get(2, 0))]
        if 2 in m:
            cpu = _message(m[2])
            rows += [(f"cpu.{k}", cpu.get(n, 0)) for n, k in (
                (1, "usage_usec"), (2, "user_usec"), (3, "system_usec"), (4, "nr_periods"),
                (5, "nr_throttled"), (6, "throttled_usec"))]
        if 4 in m:
            memory = _message(m[4])
            rows += [(f"memory.{k}", memory.get(n, 0)) for n, k in (
                (32, "usage"), (33, "usage_limit"), (34, "swap_usage"), (35, "swap_limit"))]
        return rows
    return None
