"""Upgraded connections (SPDY/3.1 and WebSocket) as byte channels, on trio.

A :class:`Channel` is what an exec, attach or port-forward handler sees of one stream: it
receives what the client sent (``receive_some``, ``b""`` at the client's half-close) and
sends back (``send_all``, ``send_eof``). Each connection has one reader task that turns the
codec's events into channel input; a channel's input buffer is bounded, and when it is full
the reader stops reading the socket, so a slow consumer pushes back on the client through
TCP (the only back-pressure Go's spdystream peers honour).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable

import structlog
import trio
import wsproto
import wsproto.events as wse
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from berth.plugins.cri.streaming import protocol, spdy

_log = structlog.get_logger("berth.cri.streaming")

CHANNEL_BUFFER = 256 * 1024
READ_SIZE = 64 * 1024
# A data frame bigger than this is split before it goes out: big enough that a 100 MB
# port-forward is not dominated by per-frame work, small enough that streams interleave.
SEND_CHUNK = 128 * 1024


class ChannelClosed(Exception):
    """The channel (or its whole connection) is closed for sending."""


class Channel:
    """One bidirectional stream of an upgraded connection."""

    sid: int  # its SPDY stream id (set by SpdySession; WebSocket channels have none)

    def __init__(self, name: str, send: Callable[[bytes | bytearray], Awaitable[None]],
                 eof: Callable[[], Awaitable[None]], limit: int = CHANNEL_BUFFER) -> None:
        self.name = name
        self._send = send
        self._eof = eof
        self._limit = limit
        self._buf = bytearray()
        self._readable = trio.Event()
        self._room = trio.Event()
        self._room.set()
        self.remote_closed = False
        self.local_closed = False
        self.aborted = trio.Event()
        self.headers: dict[str, str] = {}

    # -- fed by the connection's reader --

    async def feed(self, data: bytes) -> None:
        if self.remote_closed or not data:
            return
        while len(self._buf) >= self._limit:
            self._room = trio.Event()
            await self._room.wait()
            if self.remote_closed:
                return
        self._buf += data
        self._readable.set()

    def feed_eof(self) -> None:
        self.remote_closed = True
        self._readable.set()
        self._room.set()

    def abort(self) -> None:
        """The peer reset the stream or the connection died: nothing more either way."""
        self.feed_eof()
        self.local_closed = True
        self.aborted.set()

    # -- used by handlers --

    async def receive_some(self, max_bytes: int = READ_SIZE) -> bytes:
        while not self._buf:
            if self.remote_closed:
                return b""
            self._readable = trio.Event()
            await self._readable.wait()
        out = bytes(self._buf[:max_bytes])
        del self._buf[:max_bytes]
        if len(self._buf) < self._limit:
            self._room.set()
        return out

    async def send_all(self, data: bytes | bytearray) -> None:
        if self.local_closed:
            raise ChannelClosed(f"{self.name} is closed")
        if data:
            await self._send(data)

    async def send_eof(self) -> None:
        if not self.local_closed:
            self.local_closed = True
            await self._eof()


# SPDY -----------------------------------------------------------------------------------------


class SpdySession:
    """The server side of one SPDY/3.1 connection after the HTTP upgrade."""

    def __init__(self, stream: trio.abc.Stream, initial: bytes = b"",
                 max_streams: int = 64, max_header_bytes: int = spdy.DEFAULT_MAX_HEADER_BYTES
                 ) -> None:
        self.stream = stream
        self.conn = spdy.Connection(client=False, max_streams=max_streams,
                                    max_header_bytes=max_header_bytes)
        self._initial = initial
        self._lock = trio.Lock()
        self._window = trio.Event()
        self.channels: dict[int, Channel] = {}
        new_send, self.new_streams = trio.open_memory_channel[Channel](math.inf)
        self._new_send = new_send
        self.closed = trio.Event()
        self.error: Exception | None = None
        self.last_activity = trio.current_time()

    async def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.last_activity = trio.current_time()
            await self.stream.send_all(out)

    async def _send_data(self, sid: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            if self.closed.is_set():
                raise ChannelClosed("connection closed")
            async with self._lock:
                if not self.conn.stream_open(sid):
                    raise ChannelClosed(f"stream {sid} is closed")
                n = min(len(view), SEND_CHUNK, self.conn.send_window(sid))
                if n > 0:
                    self.conn.send_data(sid, bytes(view[:n]))
                    await self._flush()
                    view = view[n:]
                    continue
                self._window = trio.Event()
            await self._window.wait()

    async def _send_eof(self, sid: int) -> None:
        async with self._lock:
            if self.conn.stream_open(sid):
                try:
                    self.conn.end_stream(sid)
                except spdy.ProtocolError:
                    return
                await self._flush()

    async def reply(self, ch: Channel, sid: int) -> None:
        async with self._lock:
            if self.conn.stream_open(sid):
                self.conn.reply(sid)
                await self._flush()

    async def reset(self, sid: int, status: int = spdy.REFUSED_STREAM) -> None:
        async with self._lock:
            self.conn.reset_stream(sid, status)
            await self._flush()
        ch = self.channels.pop(sid, None)
        if ch is not None:
            ch.abort()

    async def goaway(self) -> None:
        async with self._lock:
            self.conn.goaway()
            await self._flush()

    async def run_reader(self) -> None:
        """Read until EOF or a protocol error; every channel ends when this does."""
        try:
            if self._initial:
                await self._handle(self._initial)
                self._initial = b""
            while True:
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    break
                await self._handle(data)
        except spdy.ProtocolError as exc:
            self.error = exc
            _log.info("spdy connection closed on a protocol error", error=str(exc))
            with trio.move_on_after(1):
                try:
                    async with self._lock:
                        await self._flush()  # the GOAWAY the codec queued
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.error = exc
        finally:
            self.closed.set()
            self._window.set()
            for ch in self.channels.values():
                ch.abort()
            self._new_send.close()

    async def _handle(self, data: bytes | bytearray) -> None:
        self.last_activity = trio.current_time()
        events = self.conn.receive_data(data)
        out = self.conn.data_to_send()  # ping echoes, resets
        if out:
            async with self._lock:
                await self.stream.send_all(out)
        ch: Channel | None
        for ev in events:
            if isinstance(ev, spdy.StreamOpened):
                ch = Channel(f"stream {ev.stream_id}",
                             functools.partial(self._send_data, ev.stream_id),
                             functools.partial(self._send_eof, ev.stream_id))
                ch.headers = {k: v for k, v in ev.headers}
                ch.sid = ev.stream_id
                if ev.fin:
                    ch.feed_eof()
                self.channels[ev.stream_id] = ch
                self._new_send.send_nowait(ch)
            elif isinstance(ev, spdy.DataReceived):
                ch = self.channels.get(ev.stream_id)
                if ch is None:
                    continue
                await ch.feed(ev.data)
                if ev.data:
                    async with self._lock:
                        self.conn.acknowledge_received_data(ev.stream_id, len(ev.data))
                        await self._flush()
                if ev.fin:
                    ch.feed_eof()
            elif isinstance(ev, spdy.StreamReset):
                ch = self.channels.pop(ev.stream_id, None)
                if ch is not None:
                    ch.abort()
            elif isinstance(ev, spdy.WindowUpdated):
                self._window.set()
            elif isinstance(ev, spdy.GoAwayReceived):
                # The client will open nothing more; streams already open go on.
                pass
            elif isinstance(ev, spdy.HeadersReceived) and ev.fin:
                ch = self.channels.get(ev.stream_id)
                if ch is not None:
                    ch.feed_eof()


# WebSocket ----------------------------------------------------------------------------------


class WebSocketSession:
    """The server side of one k8s channel WebSocket after wsproto accepted the handshake."""

    def __init__(self, stream: trio.abc.Stream, ws: wsproto.WSConnection, subprotocol: str,
                 channels: int, readable: set[int], max_message: int = 4 << 20) -> None:
        self.stream = stream
        self.ws = ws
        self.protocol = subprotocol
        self.max_message = max_message
        self._lock = trio.Lock()
        self.closed = trio.Event()
        self.error: Exception | None = None
        self.channels: list[Channel] = []
        for i in range(channels):
            ch = Channel(f"channel {i}", functools.partial(self._send, i),
                         functools.partial(self._eof, i))
            if i not in readable:
                ch.feed_eof()  # the client has nothing to say on a write-only channel
            self.channels.append(ch)
        self._readable = readable
        self._msg_channel: int | None = None
        self._msg_text: list[str] | None = None
        self._msg_size = 0
        self._close_payload = b""
        self.last_activity = trio.current_time()

    async def _send_message(self, payload: bytes | str) -> None:
        if self.closed.is_set():
            raise ChannelClosed("connection closed")
        event: wse.Event
        if isinstance(payload, str):
            event = wse.TextMessage(data=payload)
        else:
            event = wse.BytesMessage(data=payload)
        self.last_activity = trio.current_time()
        async with self._lock:
            try:
                await self.stream.send_all(self.ws.send(event))
            except LocalProtocolError as exc:
                raise ChannelClosed(str(exc)) from None

    async def _send(self, channel: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            await self._send_message(protocol.ws_encode(self.protocol, channel,
                                                        bytes(view[:SEND_CHUNK])))
            view = view[SEND_CHUNK:]

    async def send_raw(self, channel: int, data: bytes) -> None:
        """A message even when empty (the 'connection is up' signal, port prefixes)."""
        await self._send_message(protocol.ws_encode(self.protocol, channel, data))

    async def _eof(self, channel: int) -> None:
        # Only v5 can say a channel ended; older protocols end with the connection.
        if self.protocol == protocol.WS_V5 and not self.closed.is_set():
            await self._send_message(bytes([protocol.WS_CLOSE_CHANNEL, channel]))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed.is_set():
            return
        async with self._lock:
            try:
                await self.stream.send_all(
                    self.ws.send(wse.CloseConnection(code=code, reason=reason)))
            except (LocalProtocolError, trio.BrokenResourceError,
                    trio.ClosedResourceError):
                pass

    async def run_reader(self, initial: bytes = b"") -> None:
        try:
            data: bytes | bytearray = initial
            # wsproto may hold frames that came with the handshake.
            if not await self._events():
                return
            while True:
                if data:
                    # bytes() of a bytes object is that object: a copy only for a
                    # bytearray (which wsproto's bytes annotation does not take).
                    self.ws.receive_data(bytes(data))
                    if not await self._events():
                        break
                data = await self.stream.receive_some(READ_SIZE)
                self.last_activity = trio.current_time()
                if not data:
                    self.ws.receive_data(None)
                    await self._events()
                    break
        except (protocol.StreamProtocolError, RemoteProtocolError) as exc:
            self.error = exc
            _log.info("websocket closed on a protocol error", error=str(exc))
            with trio.move_on_after(1):
                await self.close(1002, "protocol error")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.error = exc
        finally:
            self.closed.set()
            for ch in self.channels:
                ch.abort()

    async def _events(self) -> bool:
        for ev in self.ws.events():
            if isinstance(ev, wse.Message):
                await self._message(ev)
            elif isinstance(ev, wse.Ping):
                async with self._lock:
                    await self.stream.send_all(self.ws.send(ev.response()))
            elif isinstance(ev, wse.CloseConnection):
                async with self._lock:
                    try:
                        await self.stream.send_all(self.ws.send(ev.response()))
                    except LocalProtocolError:
                        pass
                return False
        return True

    async def _message(self, ev: wse.Message) -> None:
        self._msg_size += len(ev.data)
        if isinstance(ev, wse.TextMessage):
            if not protocol.ws_is_base64(self.protocol):
                raise protocol.StreamProtocolError("text message on a binary channel protocol")
            if self._msg_size > self.max_message:
                raise protocol.StreamProtocolError("websocket message too large")
            self._msg_text = (self._msg_text or []) + [ev.data]
            if ev.message_finished:
                text = "".join(self._msg_text)
                self._msg_text = None
                self._msg_size = 0
                ch, payload = protocol.ws_decode(self.protocol, text)
                await self._deliver(ch, payload)
            return
        if protocol.ws_is_base64(self.protocol):
            raise protocol.StreamProtocolError("binary message on a base64 channel protocol")
        data = bytes(ev.data)
        # Binary messages are passed on piece by piece: the channel byte starts a message.
        if self._msg_channel is None:
            if not data:
                if ev.message_finished:
                    raise protocol.StreamProtocolError("empty channel message")
                return
            self._msg_channel, data = data[0], data[1:]
            if self._msg_channel == protocol.WS_CLOSE_CHANNEL:
                self._close_payload = b""
        ch = self._msg_channel
        if ev.message_finished:
            self._msg_channel = None
            self._msg_size = 0
        if ch == protocol.WS_CLOSE_CHANNEL:
            self._close_payload += data
            if len(self._close_payload) > 8:
                raise protocol.StreamProtocolError("close signal too long")
            if ev.message_finished:
                await self._deliver(ch, self._close_payload)
            return
        await self._deliver(ch, data)

    async def _deliver(self, ch: int, payload: bytes) -> None:
        if ch == protocol.WS_CLOSE_CHANNEL and self.protocol == protocol.WS_V5:
            if len(payload) != 1:
                raise protocol.StreamProtocolError("close signal must name one channel")
            if payload[0] < len(self.channels):
                self.channels[payload[0]].feed_eof()
            return
        if ch >= len(self.channels) or ch not in self._readable:
            # What the kubelet does with data on a channel it does not read: drop it.
            return
        await self.channels[ch].feed(payload)
