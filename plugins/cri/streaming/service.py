"""CRI Exec, Attach and PortForward: URLs on the streaming server, and what they run.

:class:`StreamingOps` is the RuntimeService's half for the three calls (it hands out
one-time URLs); :class:`CRIStreamRuntime` is what the streaming server runs behind a URL:

* exec: a process in the container's task (berth's runtime v2 exec), its stdio through
  FIFOs in the container's folder, a terminal when asked (resize events become
  ``ResizePty``), the exit code reported on the error stream;
* attach: the container's own stdio (see :class:`AttachHub`);
* port-forward: a TCP socket made inside the pod's network namespace (a thread enters it
  only to create the socket), connected to the port on localhost there; no socat.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from berth.core import errdefs
from berth.core.api.runtime import v1 as cri
from berth.core.grpc.context import CallContext
from berth.core.networks import netns
from berth.core.oci import default_spec as oci
from berth.plugins.cri import logs, records as rec
from berth.plugins.cri.images import NAMESPACE
from berth.plugins.cri.streaming.server import (
    AttachRequest,
    ExecRequest,
    ExecStreams,
    PortForwardRequest,
    StreamServer,
)
from berth.plugins.cri.streaming.transport import Channel, ChannelClosed

if TYPE_CHECKING:
    from berth.plugins.cri import records as rec

_log = structlog.get_logger("berth.cri.streaming")

# After an exec's process exits, how long its output may take to drain (the shim closes the
# FIFOs' writing ends once it has copied everything).
DRAIN_GRACE = 5.0
COPY_SIZE = 128 * 1024


class StreamingOps:
    """Exec, Attach and PortForward of the RuntimeService (mixed into PodService)."""

    stream_server: StreamServer | None = None

    if TYPE_CHECKING:  # what PodService gives these methods
        def _sandbox(self, sid: str) -> rec.Sandbox: ...
        def _container(self, cid: str) -> rec.CRIContainer: ...

    def _streaming(self) -> StreamServer:
        if self.stream_server is None:
            raise errdefs.Unavailable("the CRI streaming server is not running", raw=True)
        return self.stream_server

    def _running(self, cid: str) -> rec.CRIContainer:
        ctr = self._container(cid)
        if ctr.state != cri.ContainerState.CONTAINER_RUNNING:
            raise errdefs.FailedPrecondition(f"container {ctr.id} is not running", raw=True)
        return ctr

    async def exec(self, ctx: CallContext, req: cri.ExecRequest) -> cri.ExecResponse:
        ctr = self._running(req.container_id)
        url = self._streaming().get_exec(ExecRequest(
            ctr.id, tuple(req.cmd), tty=req.tty, stdin=req.stdin, stdout=req.stdout,
            stderr=req.stderr))
        return cri.ExecResponse(url=url)

    async def attach(self, ctx: CallContext, req: cri.AttachRequest) -> cri.AttachResponse:
        ctr = self._running(req.container_id)
        url = self._streaming().get_attach(AttachRequest(
            ctr.id, tty=req.tty, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr))
        return cri.AttachResponse(url=url)

    async def port_forward(self, ctx: CallContext, req: cri.PortForwardRequest
                           ) -> cri.PortForwardResponse:
        sb = self._sandbox(req.pod_sandbox_id)
        if sb.state != cri.PodSandboxState.SANDBOX_READY:
            raise errdefs.FailedPrecondition(f"sandbox {sb.id} is not ready", raw=True)
        for p in req.port:
            if not 0 < p <= 0xFFFF:
                raise errdefs.InvalidArgument(f"invalid port {p}", raw=True)
        url = self._streaming().get_port_forward(PortForwardRequest(sb.id, tuple(req.port)))
        return cri.PortForwardResponse(url=url)


async def _copy_out(src: trio.abc.ReceiveStream, dst: Channel) -> None:
    """FIFO or socket to the client, until EOF; a client gone ends only this copy."""
    while True:
        try:
            data = await src.receive_some(COPY_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        if not data:
            return
        try:
            await dst.send_all(data)
        except ChannelClosed:
            return


async def _copy_in(src: Channel, dst: trio.abc.SendStream) -> None:
    """The client to a FIFO or socket until the client half-closes."""
    while True:
        data = await src.receive_some(COPY_SIZE)
        if not data:
            return
        try:
            await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return


class CRIStreamRuntime:
    """The streaming server's runtime: the CRI plugin's containers and pods."""

    def __init__(self, pods: Any) -> None:
        self.pods = pods

    def _task(self, cid: str) -> tuple[Any, Any]:
        ctr = self.pods._container(cid)
        if ctr.state != cri.ContainerState.CONTAINER_RUNNING:
            raise errdefs.FailedPrecondition(f"container {ctr.id} is not running", raw=True)
        task = self.pods.tasks.get(NAMESPACE, ctr.id)
        if task is None:
            raise errdefs.NotFound(f"task of container {ctr.id} not found", raw=True)
        return ctr, task

    async def exec(self, req: ExecRequest, streams: ExecStreams) -> int:
        ctr, task = self._task(req.container_id)
        record = self.pods.store.get(NAMESPACE, ctr.id)
        process = dict(oci.from_any(record.spec).get("process") or {})
        process["args"] = list(req.cmd)
        process["terminal"] = streams.tty
        exec_id = secrets.token_hex(8)
        folder = Path(ctr.folder) / f"exec-{exec_id}"
        names = {"stdin": streams.stdin is not None, "stdout": streams.stdout is not None,
                 "stderr": streams.stderr is not None and not streams.tty}
        paths = {n: folder / n for n, on in names.items() if on}
        for p in paths.values():
            logs.make_fifo(p)
        readers: dict[str, trio.lowlevel.FdStream] = {}
        keepers: list[int] = []
        stdin: trio.lowlevel.FdStream | None = None
        log = _log.bind(namespace=NAMESPACE, id=ctr.id, exec_id=exec_id)
        try:
            for n in ("stdout", "stderr"):
                if n in paths:
                    r, k = logs.open_fifo(paths[n])
                    readers[n] = r
                    keepers.append(k)
            if "stdin" in paths:
                # Read-write: the open never waits for the shim, and closing it is the EOF.
                stdin = trio.lowlevel.FdStream(os.open(
                    paths["stdin"], os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
            started = False
            try:
                # Shielded from the client hanging up: cancelled half way, Start's process
                # may already run inside the container while nobody here knows it yet, and
                # a Kill sent then meets "process not created" and leaves it running. Once
                # Start has answered, the cancel lands just below and the kill finds it.
                with trio.CancelScope(shield=True) as setup:
                    setup.deadline = trio.current_time() + rec.EXEC_START_TIMEOUT
                    await task.exec(exec_id, stdin=str(paths.get("stdin", "")),
                                    stdout=str(paths.get("stdout", "")),
                                    stderr=str(paths.get("stderr", "")),
                                    terminal=streams.tty, spec=oci.process_any(process))
                    with self.pods.tasks.primer.starting():
                        await task.start(exec_id)
                    started = True
                if not started:
                    raise errdefs.DeadlineExceeded(
                        f"exec in container {ctr.id} did not start within "
                        f"{rec.EXEC_START_TIMEOUT:.0f}s", raw=True)
            finally:
                for k in keepers:
                    os.close(k)
                keepers = []
                if not started:
                    with trio.CancelScope(shield=True):
                        # A Start that failed or timed out may still have left a process.
                        await _kill_exec(task, exec_id)
                        await _quiet_delete(task, exec_id)
            log.info("streaming exec started", tty=streams.tty)
            exited = False
            try:
                code = await self._run_exec(task, exec_id, streams, readers, stdin)
                exited = True
                return code
            finally:
                with trio.CancelScope(shield=True):
                    if not exited:
                        await _kill_exec(task, exec_id)
                    await _quiet_delete(task, exec_id)
        finally:
            for k in keepers:
                os.close(k)
            for r in readers.values():
                await r.aclose()
            if stdin is not None:
                await stdin.aclose()
            shutil.rmtree(folder, ignore_errors=True)

    async def _run_exec(self, task: Any, exec_id: str, streams: ExecStreams,
                        readers: dict[str, trio.lowlevel.FdStream],
                        stdin: trio.lowlevel.FdStream | None) -> int:
        async with trio.open_nursery() as nursery:
            if stdin is not None and streams.stdin is not None:
                nursery.start_soon(self._stdin, task, exec_id, streams.stdin, stdin)
            if streams.resize is not None:
                nursery.start_soon(self._resize, task, exec_id, streams.resize)
            async with trio.open_nursery() as outputs:
                for n, ch in (("stdout", streams.stdout), ("stderr", streams.stderr)):
                    if n in readers and ch is not None:
                        outputs.start_soon(_copy_out, readers[n], ch)
                status = (await task.wait(exec_id)).status
                # Output written just before the exit is still in the FIFOs: let it drain,
                # bounded (a grandchild holding the FIFO open must not hold the client).
                outputs.cancel_scope.deadline = trio.current_time() + DRAIN_GRACE
            nursery.cancel_scope.cancel()
        return status

    async def _stdin(self, task: Any, exec_id: str, src: Channel,
                     dst: trio.lowlevel.FdStream) -> None:
        await _copy_in(src, dst)
        await dst.aclose()
        # A shim may hold the FIFO open for writing itself: CloseIO is what says EOF.
        try:
            await task.close_io(exec_id)
        except errdefs.BerthError as e:
            _log.info("close stdin failed", exec_id=exec_id, error=str(e))

    async def _resize(self, task: Any, exec_id: str, sizes: trio.MemoryReceiveChannel
                      ) -> None:
        async for size in sizes:
            try:
                await task.resize_pty(size.width, size.height, exec_id=exec_id)
            except errdefs.BerthError as e:
                _log.info("resize failed", exec_id=exec_id, error=str(e))

    async def attach(self, req: AttachRequest, streams: ExecStreams) -> None:
        ctr, task = self._task(req.container_id)
        hub = getattr(ctr, "attach_hub", None)
        if hub is None:
            raise errdefs.FailedPrecondition(
                f"container {ctr.id} has no attachable stdio", raw=True)
        await hub.attach(task, streams)

    async def port_forward(self, pod_sandbox_id: str, port: int, stream: Channel) -> None:
        sb = self.pods._sandbox(pod_sandbox_id)
        if sb.state != cri.PodSandboxState.SANDBOX_READY:
            raise errdefs.FailedPrecondition(f"sandbox {sb.id} is not ready", raw=True)
        path = sb.netns or (f"/proc/{sb.infra_pid}/ns/net" if sb.infra_pid else "")
        conn = await _connect_in(path if not sb.host_network else "", port)
        async with conn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._upstream, stream, conn)
                await _copy_out(conn, stream)
                nursery.cancel_scope.cancel()

    async def _upstream(self, src: Channel, conn: trio.SocketStream) -> None:
        await _copy_in(src, conn)
        try:
            await conn.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _connect_in(path: str, port: int) -> trio.SocketStream:
    """Connect to localhost:port inside the network namespace at ``path`` (host when '')."""
    last: OSError | None = None
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        def make(family: int = family) -> socket.socket:
            return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        raw = await trio.to_thread.run_sync(netns.run_in, path, make) if path else make()
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            await sock.connect((addr, port))
        except OSError as e:
            sock.close()
            last = e
            if e.errno in (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH):
                continue
            raise
        return trio.SocketStream(sock)
    assert last is not None
    raise last


async def _kill_exec(task: Any, exec_id: str) -> None:
    """SIGKILL an exec whose client went away, and wait (bounded) for it to be gone."""
    try:
        await task.kill(signal.SIGKILL, exec_id=exec_id)
        with trio.move_on_after(DRAIN_GRACE):
            await task.wait(exec_id)
    except errdefs.BerthError as e:
        _log.debug("exec kill", exec_id=exec_id, error=str(e))


async def _quiet_delete(task: Any, exec_id: str) -> None:
    try:
        await task.delete(exec_id)
    except errdefs.BerthError as e:
        _log.debug("exec delete", exec_id=exec_id, error=str(e))
