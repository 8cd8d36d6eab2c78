"""Attach: the container's own stdio shared between its log and any attached clients.

The CRI plugin reads a container's stdout/stderr FIFOs into its log; an :class:`AttachHub`
taps those reads (the bytes as the container wrote them, before the log's line framing)
and hands a copy to each attached client. A client that falls too far behind is dropped
rather than allowed to stall the log. With ``stdin`` in its config the container gets a
stdin FIFO that berthd holds open for writing for the container's life (an attach ending
is no EOF for the container), and attached clients write into it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from berth.core import errdefs
from berth.plugins.cri.streaming.server import ExecStreams
from berth.plugins.cri.streaming.transport import Channel, ChannelClosed

# Messages (reads of up to 64 KiB) a client may lag behind before it is dropped.
BACKLOG = 64


class _Tap:
    """A FIFO reader whose reads are also published to the hub."""

    def __init__(self, src: trio.lowlevel.FdStream, hub: AttachHub, stream: str) -> None:
        self._src = src
        self._hub = hub
        self._stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._src.receive_some(max_bytes)
        self._hub.publish(self._stream, data)
        return data

    async def aclose(self) -> None:
        await self._src.aclose()

    async def __aenter__(self) -> _Tap:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AttachHub:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.stdin: trio.lowlevel.FdStream | None = None
        self._subs: dict[str, set[trio.MemorySendChannel[bytes]]] = {"stdout": set(),
                                                                     "stderr": set()}
        self._ended: set[str] = set()

    def open_stdin(self, path: Path) -> None:
        # Read-write, so berthd never blocks on the open and the container never sees EOF
        # when a client goes.
        self.stdin = trio.lowlevel.FdStream(
            os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))

    def tap(self, src: trio.lowlevel.FdStream, stream: str) -> Any:
        return _Tap(src, self, stream)

    def publish(self, stream: str, data: bytes) -> None:
        subs = self._subs.get(stream, set())
        if not data:
            self._ended.add(stream)
        for s in list(subs):
            try:
                s.send_nowait(data)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                subs.discard(s)
                s.close()

    async def close(self) -> None:
        if self.stdin is not None:
            await self.stdin.aclose()
            self.stdin = None

    async def attach(self, task: Any, streams: ExecStreams) -> None:
        outs = [(n, ch) for n, ch in (("stdout", streams.stdout), ("stderr", streams.stderr))
                if ch is not None and n not in self._ended]
        if streams.stdin is not None and self.stdin is None:
            raise errdefs.InvalidArgument("container was not created with stdin", raw=True)
        async with trio.open_nursery() as nursery:
            for name, ch in outs:
                send, recv = trio.open_memory_channel[bytes](BACKLOG)
                self._subs[name].add(send)
                nursery.start_soon(self._forward, recv, ch, nursery.cancel_scope)
            if streams.stdin is not None:
                nursery.start_soon(self._stdin, streams.stdin,
                                   nursery.cancel_scope if not outs else None)
            if streams.resize is not None:
                nursery.start_soon(self._resize, task, streams.resize)
            if not outs and streams.stdin is None:
                nursery.cancel_scope.cancel()

    async def _forward(self, recv: trio.MemoryReceiveChannel[bytes], ch: Channel,
                       done: trio.CancelScope) -> None:
        # Ends at the container's EOF, a dropped (slow) client, or a client gone.
        async with recv:
            async with trio.open_nursery() as inner:
                inner.start_soon(_cancel_on, ch.aborted, inner.cancel_scope)
                async for data in recv:
                    if not data:
                        break
                    try:
                        await ch.send_all(data)
                    except ChannelClosed:
                        break
                inner.cancel_scope.cancel()
        done.cancel()

    async def _stdin(self, src: Channel, done: trio.CancelScope | None) -> None:
        while True:
            data = await src.receive_some()
            if not data or self.stdin is None:
                break
            try:
                await self.stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                break
        if done is not None:
            done.cancel()

    async def _resize(self, task: Any, sizes: trio.MemoryReceiveChannel) -> None:
        async for size in sizes:
            try:
                await task.resize_pty(size.width, size.height)
            except errdefs.BerthError:
                pass


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
