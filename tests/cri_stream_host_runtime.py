"""A StreamRuntime on the host, for the streaming server's own tests (no root, no berthd).

Exec runs real processes (``sh``) with pipes, or on a real pseudo-terminal with a tty;
attach copies a long-running host process's stdio; port-forward connects to 127.0.0.1.
The CRI plugin's runtime (containers, pod network namespaces) is tested through berthd in
tests/integration/test_cri_streaming.py.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import termios

import trio

from berth.plugins.cri.streaming.server import (
    AttachRequest,
    ExecRequest,
    ExecStreams,
)
from berth.plugins.cri.streaming.transport import Channel, ChannelClosed


async def _pump_in(src: Channel, dst: trio.abc.SendStream, close: bool = True) -> None:
    while True:
        data = await src.receive_some()
        if not data:
            break
        try:
            await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
    if close:
        await dst.aclose()


async def _pump_out(src: trio.abc.ReceiveStream, dst: Channel) -> None:
    while True:
        try:
            data = await src.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        if not data:
            return
        try:
            await dst.send_all(data)
        except ChannelClosed:
            return


class HostRuntime:
    def __init__(self) -> None:
        self.attach_process: trio.Process | None = None
        self.forwarded: list[tuple[str, int]] = []

    async def exec(self, req: ExecRequest, streams: ExecStreams) -> int:
        if req.tty:
            return await self._exec_tty(req, streams)
        proc = await trio.lowlevel.open_process(
            list(req.cmd), stdin=subprocess.PIPE if streams.stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        async with trio.open_nursery() as nursery:
            if streams.stdin is not None:
                nursery.start_soon(_pump_in, streams.stdin, proc.stdin)
            async with trio.open_nursery() as outputs:
                for src, dst in ((proc.stdout, streams.stdout), (proc.stderr, streams.stderr)):
                    if dst is not None:
                        outputs.start_soon(_pump_out, src, dst)
            try:
                code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()  # the client went away
            # The process is gone: a client that never closed stdin must not hold us.
            nursery.cancel_scope.cancel()
        return code

    async def _exec_tty(self, req: ExecRequest, streams: ExecStreams) -> int:
        master, slave = os.openpty()
        try:
            proc = await trio.lowlevel.open_process(list(req.cmd), stdin=slave, stdout=slave,
                                                    stderr=slave, start_new_session=True)
        finally:
            os.close(slave)
        pty = trio.lowlevel.FdStream(master)
        async with trio.open_nursery() as nursery:
            if streams.stdin is not None:
                nursery.start_soon(_pump_in, streams.stdin, pty, False)
            if streams.resize is not None:
                nursery.start_soon(self._resize, streams.resize, master)
            if streams.stdout is not None:
                nursery.start_soon(_pump_out, pty, streams.stdout)
            code = await proc.wait()
            nursery.cancel_scope.cancel()
        await pty.aclose()
        return code

    async def _resize(self, sizes: trio.MemoryReceiveChannel, fd: int) -> None:
        async for size in sizes:
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.height, size.width,
                                                             0, 0))

    async def attach(self, req: AttachRequest, streams: ExecStreams) -> None:
        proc = self.attach_process
        assert proc is not None
        async with trio.open_nursery() as nursery:
            if streams.stdin is not None:
                nursery.start_soon(_pump_in, streams.stdin, proc.stdin)
            if streams.stdout is not None:
                await _pump_out(proc.stdout, streams.stdout)
            await proc.wait()
            nursery.cancel_scope.cancel()

    async def port_forward(self, pod_sandbox_id: str, port: int, stream: Channel) -> None:
        self.forwarded.append((pod_sandbox_id, port))
        conn = await trio.open_tcp_stream("127.0.0.1", port)
        async with conn:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._to_conn, stream, conn)
                await _pump_out(conn, stream)
                nursery.cancel_scope.cancel()

    async def _to_conn(self, src: Channel, conn: trio.SocketStream) -> None:
        while True:
            data = await src.receive_some()
            if not data:
                break
            await conn.send_all(data)
        await conn.send_eof()
