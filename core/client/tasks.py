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
        return str(Status(status)).lower()
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


def metrics_rows(type_url: str, value: bytes) -> list[tuple[str, Any]] | None:
    """ctr's metric table for cgroups v1/v2 Metrics; None for another type."""
    import betterproto

    name = type_url.rsplit("/", 1)[-1]
    rows: list[tuple[str, Any]] = []
    if name == CGROUPS_V1_METRICS:
        from berth.core.api.io.containerd.cgroups import v1 as cgroups_v1

        m1 = cgroups_v1.Metrics().parse(value)
        if betterproto.serialized_on_wire(m1.memory):
            rows += [("memory.usage_in_bytes", m1.memory.usage.usage),
                     ("memory.limit_in_bytes", m1.memory.usage.limit),
                     ("memory.stat.cache", m1.memory.total_cache)]
        if betterproto.serialized_on_wire(m1.cpu):
            per_cpu = " ".join(str(v) for v in m1.cpu.usage.per_cpu)
            rows += [("cpuacct.usage", m1.cpu.usage.total),
                     ("cpuacct.usage_percpu", f"[{per_cpu}]")]
        if betterproto.serialized_on_wire(m1.pids):
            rows += [("pids.current", m1.pids.current), ("pids.limit", m1.pids.limit)]
        return rows
    if name == CGROUPS_V2_METRICS:
        from berth.core.api.io.containerd.cgroups import v2 as cgroups_v2

        m2 = cgroups_v2.Metrics().parse(value)
        if betterproto.serialized_on_wire(m2.pids):
            rows += [("pids.current", m2.pids.current), ("pids.limit", m2.pids.limit)]
        if betterproto.serialized_on_wire(m2.cpu):
            rows += [(f"cpu.{k}", getattr(m2.cpu, k)) for k in (
                "usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled",
                "throttled_usec")]
        if betterproto.serialized_on_wire(m2.memory):
            rows += [(f"memory.{k}", getattr(m2.memory, k)) for k in (
                "usage", "usage_limit", "swap_usage", "swap_limit")]
        return rows
    return None
