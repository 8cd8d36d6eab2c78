"""`berth tasks start|ls|ps|exec|kill|pause|resume|metrics|rm|attach` (ctr's tasks).

Also the life of an attached process that ``berth run`` shares: create it with a FIFO
set, wait for it before starting it (so its exit cannot be missed), copy its stdio,
forward our signals to it (or, with a terminal, our window size), then drain its output
and return its exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from grpclib import GRPCError
from grpclib.const import Status as GStatus

from berth.core import errdefs
from berth.core.cli import app
from berth.core.cli.output import emit
from berth.core.client import cio, connection

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
        raise app.CommandError("container id must be provided")
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
            raise app.CommandError(f"invalid signal: {text}") from None
    if number <= 0:
        raise app.CommandError(f"invalid signal: {text}")
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
                print(f"berth: forward signal {signal.Signals(sig).name}: {e.message}",
                      file=sys.stderr)

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
            raise app.CommandError("unable to resolve rootfs mounts without snapshotter on "
                                   "container: invalid argument")
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
            raise app.CommandError(
                f"task must be stopped before deletion: {status_name(process.status)}: "
                "failed precondition")
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


# --- commands ---------------------------------------------------------------------------

async def start(args: argparse.Namespace, s: connection.Session) -> int:
    container = await get_container(s, args.container)
    spec = container_spec(container)
    tty = bool((spec.get("process") or {}).get("terminal"))
    fifos = cio.new_fifo_set(args.fifo_dir, container.id, terminal=tty)
    created = False

    async def create() -> None:
        nonlocal created
        pid = await create_task(s, container, fifos)
        created = True
        if args.pid_file:
            write_pid_file(args.pid_file, pid)

    try:
        code = await run_attached(s, container.id, fifos, create=create, detach=args.detach)
    except BaseException:
        if not created:
            fifos.close()
        elif not args.detach:
            with contextlib.suppress(Exception):
                await delete_task(s, container.id, fifos=fifos)
        raise
    if code is None:
        return 0
    await delete_task(s, container.id, fifos=fifos)
    return code


def write_pid_file(path: str, pid: int) -> None:
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, path)


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import ListTasksRequest

    resp = await tasks_stub(s).list(ListTasksRequest())
    if args.quiet:
        for t in resp.tasks:
            print(t.id)
        return 0
    from berth.core.api.containerd.v1.types import Status

    def name(st: Any) -> str:
        try:
            return Status(st).name
        except ValueError:
            return str(st)

    emit(["TASK", "PID", "STATUS"], [(t.id, t.pid, name(t.status)) for t in resp.tasks],
         fmt=args.format, records=[{"id": t.id, "pid": t.pid, "status": name(t.status)}
                                   for t in resp.tasks])
    return 0


def _process_info(info: Any) -> str:
    if info is None or not info.type_url:
        return "-"
    if info.type_url.rsplit("/", 1)[-1] == "containerd.runc.v1.ProcessDetails":
        from berth.core.api.containerd.runc.v1 import ProcessDetails

        return f"&ProcessDetails{{ExecID:{ProcessDetails().parse(info.value).exec_id},}}"
    return f"{info.type_url} ({len(info.value)} bytes)"


async def ps(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import ListPidsRequest

    await get_container(s, args.container)
    resp = await tasks_stub(s).list_pids(ListPidsRequest(container_id=args.container))
    emit(["PID", "INFO"], [(p.pid, _process_info(p.info)) for p in resp.processes],
         fmt=args.format)
    return 0


async def exec_(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import DeleteProcessRequest, ExecProcessRequest
    from berth.core.oci import default_spec

    if not args.exec_id:
        raise app.CommandError("exec id must not be empty: invalid argument")
    container = await get_container(s, args.container)
    spec = container_spec(container)
    if args.user:
        try:
            async with rootfs_users(s, container, spec) as users:
                default_spec.with_user(spec, args.user, users)
        except (errdefs.BerthError, OSError) as e:
            raise app.CommandError(str(e)) from None
    process = dict(spec.get("process") or {})
    process["terminal"] = args.tty
    process["args"] = list(args.args)
    process.pop("consoleSize", None)
    if args.tty:
        from berth.core.cli.run import terminal_size

        size = terminal_size()
        if size:
            process["consoleSize"] = {"height": size[1], "width": size[0]}
    if args.cwd:
        process["cwd"] = args.cwd
    fifos = cio.new_fifo_set(args.fifo_dir, args.exec_id, terminal=args.tty)
    created = False

    async def create() -> None:
        nonlocal created
        await tasks_stub(s).exec(ExecProcessRequest(
            container_id=container.id, exec_id=args.exec_id, stdin=fifos.stdin,
            stdout=fifos.stdout, stderr=fifos.stderr, terminal=fifos.terminal,
            spec=default_spec.process_any(process)))
        created = True

    try:
        code = await run_attached(s, container.id, fifos, exec_id=args.exec_id,
                                  create=create, detach=args.detach)
    finally:
        if not args.detach:
            if created:
                with contextlib.suppress(GRPCError):
                    await tasks_stub(s).delete_process(DeleteProcessRequest(
                        container_id=container.id, exec_id=args.exec_id))
            fifos.close()
        elif not created:
            fifos.close()
    return code or 0


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
            raise app.CommandError("rootfs absolute path is required")
        yield UserDB.from_root(root)
        return
    resp = await SnapshotsStub(s.channel, metadata=s.metadata).mounts(MountsRequest(
        snapshotter=container.snapshotter, key=container.snapshot_key))
    mounts = [mounting.Mount.from_proto(m) for m in resp.mounts]
    with mounting.mounted(mounts, read_only=True) as root:
        yield UserDB.from_root(root)


async def kill(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import KillRequest

    if args.all and args.exec_id:
        raise app.CommandError("specify an exec-id or all; not both")
    container = await get_container(s, args.container)
    text = args.signal or container.labels.get(STOP_SIGNAL_LABEL) or "SIGTERM"
    sig = parse_signal(text)
    await tasks_stub(s).kill(KillRequest(container_id=container.id, exec_id=args.exec_id,
                                         signal=sig, all=args.all))
    return 0


async def pause(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import PauseTaskRequest

    await get_container(s, args.container)
    await tasks_stub(s).pause(PauseTaskRequest(container_id=args.container))
    return 0


async def resume(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import ResumeTaskRequest

    await get_container(s, args.container)
    await tasks_stub(s).resume(ResumeTaskRequest(container_id=args.container))
    return 0


async def rm(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import DeleteProcessRequest, GetRequest

    if args.exec_id:
        cid = args.containers[0]
        await get_container(s, cid)
        t = tasks_stub(s)
        process = (await t.get(GetRequest(container_id=cid, exec_id=args.exec_id))).process
        if args.force:
            await kill_and_wait(s, cid, args.exec_id)
        resp = await t.delete_process(DeleteProcessRequest(container_id=cid,
                                                           exec_id=args.exec_id))
        cio.loaded_fifo_set(process.stdin, process.stdout, process.stderr).close()
        return int(resp.exit_status)
    failed = False
    for cid in args.containers:
        try:
            await get_container(s, cid)
            resp = await delete_task(s, cid, force=args.force)
        except (GRPCError, app.CommandError) as e:
            failed = True
            msg = f"{e.status.name}: {e.message}" if isinstance(e, GRPCError) else str(e)
            print(f"berth: unable to delete {cid}: {msg}", file=sys.stderr)
            continue
        if resp.exit_status:
            print(f"berth: task {cid} exit with non-zero exit code {resp.exit_status}",
                  file=sys.stderr)
    return 1 if failed else 0


async def attach(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import GetRequest

    container = await get_container(s, args.container)
    spec = container_spec(container)
    tty = bool((spec.get("process") or {}).get("terminal"))
    process = (await tasks_stub(s).get(GetRequest(container_id=container.id))).process
    fifos = cio.loaded_fifo_set(process.stdin, process.stdout, process.stderr, tty)
    code = await run_attached(s, container.id, fifos, create=None, start=False)
    await delete_task(s, container.id, fifos=fifos)
    return code or 0


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


def go_time(t: datetime) -> str:
    """time.Time's String() in UTC, to microseconds (a zero fraction left out)."""
    t = t.astimezone(UTC)
    frac = f".{t.microsecond:06d}" if t.microsecond else ""
    return f"{t.year:04d}-{t:%m-%d %H:%M:%S}{frac} +0000 UTC"


async def metrics(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.tasks.v1 import MetricsRequest

    container = await get_container(s, args.container)
    resp = await tasks_stub(s).metrics(MetricsRequest(filters=[f"id=={container.id}"]))
    if not resp.metrics:
        raise app.CommandError(f"no metrics received for {container.id}")
    metric = resp.metrics[0]
    data = metric.data
    type_url, value = (data.type_url, bytes(data.value)) if data else ("", b"")
    rows = metrics_rows(type_url, value)
    if args.format == "json":
        doc: dict[str, Any] = {"id": metric.id, "timestamp": metric.timestamp.isoformat(),
                               "type_url": type_url, "size": len(value)}
        if rows is not None:
            doc["metrics"] = dict(rows)
        print(json.dumps(doc, indent=2))
        return 0
    emit(["ID", "TIMESTAMP"], [(metric.id, go_time(metric.timestamp))], fmt="plain")
    print()
    if rows is None:
        emit(["TYPE", "SIZE"], [(type_url, len(value))], fmt="plain")
    else:
        emit(["METRIC", "VALUE"], rows, fmt="plain")
    return 0


# --- arguments --------------------------------------------------------------------------

def fifo_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fifo-dir", default=None,
                   help=f"directory for the IO FIFOs (default {cio.DEFAULT_FIFO_DIR})")


def register(sub: Any) -> None:
    p = sub.add_parser("tasks", aliases=["task", "t"], help="manage tasks")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True

    c = app.add(g, "attach", attach, help="attach to the IO of a running container")
    c.add_argument("container")

    c = app.add(g, "delete", rm, help="delete one or more tasks",
                aliases=["del", "remove", "rm"])
    c.add_argument("--force", "-f", action="store_true", help="force delete task process")
    c.add_argument("--exec-id", default="", help="process ID to delete")
    c.add_argument("containers", nargs="+", metavar="CONTAINER")

    c = app.add(g, "exec", exec_, help="execute additional processes in a container")
    c.add_argument("--cwd", default="", help="working directory of the new process")
    c.add_argument("--tty", "-t", action="store_true", help="allocate a TTY")
    c.add_argument("--detach", "-d", action="store_true",
                   help="detach from the process after it has started")
    c.add_argument("--exec-id", required=True, help="exec specific id for the process")
    c.add_argument("--user", default="", help="user id or name")
    fifo_dir_flag(c)
    c.add_argument("container")
    c.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD")

    c = app.add(g, "list", ls, help="list tasks", aliases=["ls"])
    c.add_argument("--quiet", "-q", action="store_true", help="print only the task id")

    c = app.add(g, "kill", kill, help="signal a container (default: SIGTERM)")
    c.add_argument("--signal", "-s", default="", help="signal to send to the container")
    c.add_argument("--exec-id", default="", help="process ID to kill")
    c.add_argument("--all", "-a", action="store_true",
                   help="send signal to all processes inside the container")
    c.add_argument("container")

    c = app.add(g, "metrics", metrics, help="get a single data point of metrics for a task",
                aliases=["metric"])
    c.add_argument("container")

    c = app.add(g, "pause", pause, help="pause an existing container")
    c.add_argument("container")

    c = app.add(g, "ps", ps, help="list processes for container")
    c.add_argument("container")

    c = app.add(g, "resume", resume, help="resume a paused container")
    c.add_argument("container")

    c = app.add(g, "start", start, help="start a container that has been created")
    c.add_argument("--detach", "-d", action="store_true",
                   help="detach from the task after it has started execution")
    c.add_argument("--pid-file", default="", help="file path to write the task's pid")
    fifo_dir_flag(c)
    c.add_argument("container")
