"""One task's connection to its shim: the containerd.task.v2.Task client calls.

Like containerd (runtime/v2/shim.go, process.go), every task has its own ttrpc
connection, even when several tasks share a shim process. The connection lives in a
task that also drains the shim's log fifo; when the connection ends without berth
having closed it, the shim is gone and the manager cleans up after it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import betterproto
import trio
from betterproto.lib.google.protobuf import Any as AnyMsg, Empty

from berth.core import errdefs, log
from berth.core.api.containerd.task.v2 import (
    CheckpointTaskRequest,
    CloseIoRequest,
    ConnectRequest,
    ConnectResponse,
    CreateTaskResponse,
    DeleteResponse,
    ExecProcessRequest,
    KillRequest,
    PauseRequest,
    PidsRequest,
    PidsResponse,
    ResizePtyRequest,
    ResumeRequest,
    StartResponse,
    StateResponse,
    StatsRequest,
    StatsResponse,
    UpdateTaskRequest,
    WaitResponse,
)
from berth.core.api.containerd.types import Mount
from berth.core.api.containerd.v1.types import ProcessInfo
from berth.core.oci.reaper import Exit
from berth.core.runtime import taskwire
from berth.core.runtime.binary import ShimBinary
from berth.core.runtime.bundle import Bundle
from berth.core.ttrpc import NAMESPACE_KEY, Client, open_client
from berth.core.ttrpc.client import CLOSED_MESSAGE, decode

TASK_SERVICE = "containerd.task.v2.Task"

# containerd's io.containerd.timeout.shim.* defaults, in seconds.
LOAD_TIMEOUT = 5.0
CLEANUP_TIMEOUT = 5.0
SHUTDOWN_TIMEOUT = 3.0

R = TypeVar("R", bound=betterproto.Message)


def is_closed(exc: BaseException) -> bool:
    """The ttrpc client's ErrClosed: the connection to the shim is gone."""
    return isinstance(exc, errdefs.Unavailable) and exc.message == CLOSED_MESSAGE


# The error classes containerd's errdefs.FromGRPC knows; any other code is "unknown".
_CLASSES: tuple[type[errdefs.BerthError], ...] = (
    errdefs.InvalidArgument, errdefs.AlreadyExists, errdefs.NotFound, errdefs.Unavailable,
    errdefs.FailedPrecondition, errdefs.NotImplemented_, errdefs.Cancelled,
    errdefs.DeadlineExceeded,
)


def from_grpc(exc: errdefs.BerthError) -> errdefs.BerthError:
    """A shim's error as containerd's errdefs.FromGRPC turns it: the class name ends the
    message exactly once ("...: unknown"); a closed connection is an unknown error."""
    cls = type(exc) if isinstance(exc, _CLASSES) and not is_closed(exc) else errdefs.Unknown
    message = exc.message
    if message == cls.suffix:
        return cls()
    return cls(message.removesuffix(f": {cls.suffix}"))


def closed_error() -> errdefs.BerthError:
    """ttrpc's ErrClosed where containerd passes it on unconverted (code Unknown)."""
    return errdefs.Unknown(CLOSED_MESSAGE, raw=True)


class ShimTask:
    """A task (and its exec'd processes) reached through one shim connection."""

    def __init__(self, bundle: Bundle, binary: ShimBinary | None, client: Client,
                 address: str = "") -> None:
        self.bundle = bundle
        self.binary = binary
        self.client = client
        # The shim's socket: tasks of one group share it (and the shim).
        self.address = address
        # Set when berth ends the connection on purpose: its end is then no death.
        self.closing = False
        # Set once the connection's owner is done, cleanup after a dead shim included.
        self.ended = trio.Event()
        self._md = {NAMESPACE_KEY: bundle.namespace}
        # The init's pid as Create answered it (0: not created by this connection).
        self.created_pid = 0

    @property
    def id(self) -> str:
        return self.bundle.id

    @property
    def namespace(self) -> str:
        return self.bundle.namespace

    async def _call(self, method: str, req: betterproto.Message, resp: type[R],
                    timeout: float | None = None, *, convert: bool = True) -> R:
        """Call the shim; errors come back as containerd reports them (``from_grpc``)
        unless ``convert`` is off, for the callers that look at ErrClosed first."""
        payload = await self._call_raw(method, bytes(req), timeout, convert=convert)
        return self._decode(method, payload, resp, convert=convert)

    async def _call_raw(self, method: str, payload: bytes, timeout: float | None = None,
                        *, convert: bool = True) -> bytes:
        """``_call`` with the request encoded (``taskwire``); the answer undecoded."""
        try:
            return await self.client.call_raw(TASK_SERVICE, method, payload,
                                              metadata=self._md, timeout=timeout)
        except errdefs.BerthError as e:
            if not convert:
                raise
            raise from_grpc(e) from None

    def _decode(self, method: str, payload: bytes, resp: type[R], *,
                convert: bool = True) -> R:
        """An answer the ``taskwire`` readers left to betterproto; a payload that is not
        ``resp`` fails as the shim's errors do (``convert``)."""
        try:
            return decode(resp, payload, TASK_SERVICE, method)
        except errdefs.BerthError as e:
            if not convert:
                raise
            raise from_grpc(e) from None

    # -- the task ------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> ConnectResponse:
        return await self._call("Connect", ConnectRequest(id=self.id), ConnectResponse,
                                timeout)

    async def pid(self) -> int:
        return (await self.connect()).task_pid

    async def create(self, *, rootfs: list[Mount], stdin: str, stdout: str, stderr: str,
                     terminal: bool, checkpoint: str = "",
                     options: AnyMsg | None = None) -> int:
        request = taskwire.create_request(
            self.id, str(self.bundle.path), rootfs, terminal=terminal, stdin=stdin,
            stdout=stdout, stderr=stderr, checkpoint=checkpoint, options=options)
        payload = await self._call_raw("Create", request)
        pid = taskwire.read_pid(payload)
        self.created_pid = self._decode("Create", payload, CreateTaskResponse).pid \
            if pid is None else pid
        return self.created_pid

    async def start(self, exec_id: str = "") -> int:
        payload = await self._call_raw("Start", taskwire.id_request(self.id, exec_id))
        pid = taskwire.read_pid(payload)
        return self._decode("Start", payload, StartResponse).pid if pid is None else pid

    async def state(self, exec_id: str = "", timeout: float | None = None
                    ) -> taskwire.TaskState:
        try:
            payload = await self._call_raw("State", taskwire.id_request(self.id, exec_id),
                                           timeout, convert=False)
        except errdefs.BerthError as e:
            if is_closed(e):
                raise errdefs.NotFound() from None
            raise from_grpc(e) from None
        state = taskwire.read_state(payload)
        if state is None:
            r = self._decode("State", payload, StateResponse)  # fails as from_grpc words it
            state = taskwire.TaskState(
                id=r.id, bundle=r.bundle, pid=r.pid, status=r.status, stdin=r.stdin,
                stdout=r.stdout, stderr=r.stderr, terminal=r.terminal,
                exit_status=r.exit_status, exited_at=r.exited_at, exec_id=r.exec_id)
        return state

    async def kill(self, signal: int, all: bool = False, exec_id: str = "") -> None:
        # An exec'd process ignores "all", as containerd's process.Kill does.
        await self._call("Kill", KillRequest(id=self.id, exec_id=exec_id, signal=signal,
                                             all=all and not exec_id), Empty)

    async def exec(self, exec_id: str, *, stdin: str, stdout: str, stderr: str,
                   terminal: bool, spec: AnyMsg | None) -> None:
        req = ExecProcessRequest(id=self.id, exec_id=exec_id, stdin=stdin, stdout=stdout,
                                 stderr=stderr, terminal=terminal)
        if spec is not None:
            req.spec = spec
        await self._call("Exec", req, Empty)

    async def pids(self) -> list[ProcessInfo]:
        return (await self._call("Pids", PidsRequest(id=self.id), PidsResponse)).processes

    async def resize_pty(self, width: int, height: int, exec_id: str = "") -> None:
        await self._call("ResizePty", ResizePtyRequest(id=self.id, exec_id=exec_id,
                                                       width=width, height=height), Empty)

    async def close_io(self, exec_id: str = "") -> None:
        await self._call("CloseIO", CloseIoRequest(id=self.id, exec_id=exec_id, stdin=True),
                         Empty)

    async def pause(self) -> None:
        await self._call("Pause", PauseRequest(id=self.id), Empty)

    async def resume(self) -> None:
        await self._call("Resume", ResumeRequest(id=self.id), Empty)

    async def update(self, resources: AnyMsg | None, annotations: dict[str, str]) -> None:
        req = UpdateTaskRequest(id=self.id, annotations=dict(annotations))
        if resources is not None:
            req.resources = resources
        await self._call("Update", req, Empty)

    async def checkpoint(self, path: str, options: AnyMsg | None) -> None:
        req = CheckpointTaskRequest(id=self.id, path=path)
        if options is not None:
            req.options = options
        await self._call("Checkpoint", req, Empty)

    async def stats(self) -> AnyMsg | None:
        resp = await self._call("Stats", StatsRequest(id=self.id), StatsResponse)
        return resp.stats if betterproto.serialized_on_wire(resp.stats) else None

    async def wait(self, exec_id: str = "") -> Exit:
        payload = await self._call_raw("Wait", taskwire.id_request(self.id, exec_id))
        exit_ = taskwire.read_wait(payload)
        if exit_ is None:
            resp = self._decode("Wait", payload, WaitResponse)
            exit_ = Exit(pid=0, status=resp.exit_status, exited_at=resp.exited_at)
        return exit_

    async def delete(self, exec_id: str = "", *, convert: bool = True) -> Exit:
        """Delete the task (or an exec'd process); ``convert`` as for ``_call``."""
        payload = await self._call_raw("Delete", taskwire.id_request(self.id, exec_id),
                                       convert=convert)
        exit_ = taskwire.read_delete(payload)
        if exit_ is None:
            resp = self._decode("Delete", payload, DeleteResponse, convert=convert)
            exit_ = Exit(pid=resp.pid, status=resp.exit_status, exited_at=resp.exited_at)
        return exit_

    async def shutdown(self) -> None:
        """Ask the shim to exit once it serves no task; its hanging up counts as done."""
        try:
            payload = await self._call_raw("Shutdown", taskwire.id_request(self.id),
                                           SHUTDOWN_TIMEOUT, convert=False)
        except errdefs.BerthError as e:
            if not is_closed(e):
                raise from_grpc(e) from None
            return
        if payload:
            self._decode("Shutdown", payload, Empty)  # an answer that is no Empty fails

    async def close(self) -> None:
        """End the connection on purpose and wait for its owner to finish."""
        self.closing = True
        await self.client.aclose()
        await self.ended.wait()


async def serve_connection(
    bundle: Bundle,
    binary: ShimBinary | None,
    address: str,
    log_fd: int,
    on_lost: Callable[[ShimTask], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[ShimTask] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own one task's shim connection and the shim's log fifo until either ends.

    Takes ownership of ``log_fd``. Cancellation (berthd shutting down) leaves the
    shim alone; a connection the shim ended calls ``on_lost`` first.
    """
    lg = log.get("shim", namespace=bundle.namespace, id=bundle.id)
    task: ShimTask | None = None
    try:
        async with open_client(address) as client, trio.open_nursery() as nursery:
            task = ShimTask(bundle, binary, client, address)
            nursery.start_soon(_drain_log, log_fd, lg)
            task_status.started(task)
            await client.wait_closed()
            nursery.cancel_scope.cancel()
        if not task.closing:
            lg.info("shim disconnected")
            try:
                await on_lost(task)
            except Exception:
                # This task lives in berthd's own nursery: a failed cleanup must not
                # take the daemon down with it.
                lg.exception("cleaning up after the shim failed")
    finally:
        os.close(log_fd)
        if task is not None:
            task.ended.set()


async def _drain_log(fd: int, lg: Any) -> None:
    """Copy the shim's log lines into berthd's log; a full fifo would block the shim."""
    pending = b""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        except OSError as e:
            lg.error("reading the shim log failed", error=str(e))
            return
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                lg.info("shim log", line=line.decode(errors="replace"))
        if len(pending) > 65536:
            lg.info("shim log", line=pending.decode(errors="replace"))
            pending = b""
