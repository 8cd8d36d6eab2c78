"""One gRPC-over-HTTP/2 connection, served by trio on nghttp2's sans-io session.

nghttp2 (``nghttp2.ServerSession``) turns bytes into events and answers into bytes;
this module decides what each event means for a gRPC call and runs the calls (see
``bridge`` for the service side):

- a unary call with a plain ``def`` method is answered right where its request ends,
  inside ``feed``: no task at all; an ``async def`` one runs as a trio task;
- streaming calls run as trio tasks that send as flow control allows;
- everything a read produced (SETTINGS and PING acks, window updates, answers) goes
  out in one ``send``: from the reading task, or, when the read started call tasks,
  from the last of them to end its first step (most answer in it), so that the answers
  go with it; answers made later leave through one writer task.

Bounds (issue 8.5: nothing a client sends may pin memory or a connection):

- nghttp2 judges the frames: a frame longer than the advertised SETTINGS_MAX_FRAME_SIZE
  is refused from its 9-byte header, so is a first frame that is not SETTINGS; PINGs are
  acked there (a client that floods them without reading is cut off), and a connection
  that has not sent preface and SETTINGS within ``HANDSHAKE_TIMEOUT`` is closed here;
- request bytes held per stream are bounded by the maximum message size (the prefix is
  judged before anything is kept), and per connection by ``buffer_limit``;
- the reader stops reading while the writer cannot write (a client that sends but never
  reads stops being read from);
- protocol errors close the connection with GOAWAY (nghttp2 queues it; the writer sends it).

Answers look like grpc-go's where ctr 1.6 (grpc-go 1.33) can tell: every error is a
trailers-only response *with* content-type, unknown paths included.
"""

from __future__ import annotations

import base64
import os
import types
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any, Protocol

import structlog
import trio
from grpclib.const import Cardinality

from berth.core.errdefs import Code
from berth.core.grpc import bridge, nghttp2
from berth.core.grpc.bridge import GRPCStatus, Method, StreamGone
from berth.core.grpc.context import CallContext
from berth.core.grpc.nghttp2 import ErrorCode, HeaderBlock, ServerSession, SessionError

log = structlog.get_logger("grpc")

HANDSHAKE_TIMEOUT = 1.0
RECEIVE_SIZE = 1 << 16
# How long a closing connection may take to send its last bytes (GOAWAY, trailers).
CLOSE_GRACE = 5.0
# The connection-level receive window: a streaming call whose service reads slowly holds
# its stream's window, not everyone's (the bytes held stay under ``buffer_limit``).
CONNECTION_WINDOW = 4 << 20
# Distinct unknown paths remembered for the once-only warning; past it, no more warnings.
UNKNOWN_PATHS_REMEMBERED = 1024

CONTENT_TYPE = b"application/grpc+proto"
_OK_HEADERS = HeaderBlock([(b":status", b"200"), (b"content-type", CONTENT_TYPE)])
_OK_TRAILERS = HeaderBlock([(b"grpc-status", b"0")])
_OK_TRAILERS_ONLY = HeaderBlock([*_OK_HEADERS, *_OK_TRAILERS])
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3,
                  ord("u"): 1e-6, ord("n"): 1e-9}
# Headers that are the transport's, not the call's metadata (as grpc-go and grpclib).
_NOT_METADATA = frozenset({b"te", b"content-type", b"user-agent"})
class Router:
    """The route table of one server, shared by its connections."""

    def __init__(self, routes: Mapping[str, Method], *,
                 max_recv: int = bridge.DEFAULT_MAX_RECV) -> None:
        self.routes = {p.encode(): m for p, m in routes.items()}
        self.services = {p.rsplit("/", 1)[0].lstrip("/") for p in routes}
        self.max_recv = max(max_recv, *(m.max_recv for m in routes.values())) \
            if routes else max_recv
        self._unknown: set[str] = set()

    def unknown(self, raw_path: bytes) -> GRPCStatus:
        """grpc-go's answer to a path nobody serves, logged once per distinct path."""
        path = raw_path.decode("utf-8", "surrogateescape")
        service, slash, method = path.removeprefix("/").rpartition("/")
        if not path.startswith("/") or not slash:
            message = f"malformed method name: {path!r}"
        elif service in self.services:
            message = f"unknown method {method} for service {service}"
        else:
            message = f"unknown service {service}"
        seen = self._unknown
        if path not in seen and len(seen) <= UNKNOWN_PATHS_REMEMBERED:
            seen.add(path)
            if len(seen) > UNKNOWN_PATHS_REMEMBERED:
                log.warning("too many distinct unknown gRPC paths; no longer logging them")
            else:
                # Undecodable bytes shown escaped: a log line must be printable anywhere.
                log.warning("unknown gRPC path",
                            path=raw_path.decode("utf-8", "backslashreplace"),
                            error=message.encode("utf-8", "surrogateescape")
                            .decode("utf-8", "backslashreplace"))
        return GRPCStatus(Code.UNIMPLEMENTED, message)


class _Stream:
    """One call on the connection."""

    __slots__ = ("sid", "method", "headers", "deadline", "buf", "length", "ended",
                 "scope", "reader", "window", "started", "held", "gone")

    def __init__(self, sid: int, method: Method, headers: list[tuple[bytes, bytes]],
                 deadline: float | None) -> None:
        self.sid = sid
        self.method = method
        self.headers = headers
        self.deadline = deadline  # trio clock, or None
        self.buf = bytearray()
        self.length = -1  # announced length of the message being received
        self.ended = False  # the client ended its side
        self.scope: trio.CancelScope | None = None
        self.reader: trio.Event | None = None  # a streaming recv() waiting for data
        self.window: trio.Event | None = None  # a sender waiting for flow control
        self.started = False  # response headers sent
        self.held = 0  # flow-controlled bytes received but not yet handed back
        self.gone = False

    def wake(self) -> None:
        for ev in (self.reader, self.window):
            if ev is not None:
                ev.set()
        self.reader = self.window = None


def _decode_timeout(value: bytes) -> float:
    unit = _TIMEOUT_UNITS.get(value[-1]) if value else None
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        raise GRPCStatus(Code.INTERNAL, "transport: malformed grpc-timeout: "
                         + value.decode("latin-1"))
    return int(digits) * unit


def _metadata(headers: list[tuple[bytes, bytes]]) -> dict[str, str | bytes]:
    md: dict[str, str | bytes] = {}
    for name, value in headers:
        if name[:1] == b":" or name.startswith(b"grpc-") or name in _NOT_METADATA:
            continue
        key = name.decode("latin-1")
        if key in md:
            continue  # the first value wins, as with grpc-go's md.Get
        if key.endswith("-bin"):
            try:
                md[key] = base64.b64decode(value + b"=" * (-len(value) % 4))
            except ValueError:
                continue
        else:
            # grpc-go passes any bytes through; a service sees them as text, undecodable
            # bytes kept as surrogates (its error messages carry them back unchanged).
            md[key] = value.decode("utf-8", "surrogateescape")
    return md


def encode_message(message: str) -> bytes:
    """grpc-message's percent-encoding (bytes outside printable ASCII, and '%')."""
    raw = message.encode("utf-8", "surrogateescape")
    if all(0x20 <= b <= 0x7E and b != 0x25 for b in raw):
        return raw
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
                    for b in raw)


class MessageStream:
    """A client- or bidi-streaming call as its service sees it."""

    def __init__(self, conn: Connection, st: _Stream) -> None:
        self._conn = conn
        self._st = st

    async def recv(self) -> Any:
        """The next request message, or None once the client has ended its side."""
        return await self._conn.recv_message(self._st)

    async def send(self, msg: Any) -> None:
        await self._conn.send_message(self._st, msg)


class _ByteIO(Protocol):
    """What a connection needs of its transport (a trio Stream has it)."""

    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...

    async def send_all(self, data: bytes) -> None: ...


class _SocketIO:
    """A trio SocketStream's descriptor read and written directly, waiting on trio only
    when the kernel says "not now". A trio socket call checkpoints around every
    successful syscall (a trip through the run loop for each send); here a read is one
    checkpoint and one recv (plus a wait when nothing has come), and a send that fits the
    socket buffer is one write and no yield. The SocketStream still owns (and closes)
    the socket."""

    __slots__ = ("_fd",)

    def __init__(self, stream: trio.SocketStream) -> None:
        self._fd = stream.socket.fileno()

    async def receive_some(self, max_bytes: int) -> bytes:
        fd = self._fd
        # The connection's checkpoint. It also gives a caller that answers at once (a
        # grpc-go client making its next call) the moment to do so: reading then, before
        # any wait, spares the epoll re-arm and the sleep and wake-up of this thread
        # (without it one call at a time ran ~10% fewer calls/s for the same CPU).
        await trio.lowlevel.checkpoint()
        while True:
            try:
                return os.read(fd, max_bytes)
            except BlockingIOError:
                pass
            except OSError as e:
                raise trio.BrokenResourceError(str(e)) from e
            await trio.lowlevel.wait_readable(fd)

    def send_now(self, data: bytes) -> int:
        """As much of ``data`` as the socket takes without waiting (bytes sent)."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e

    async def send_all(self, data: bytes) -> None:
        fd = self._fd
        view: bytes | memoryview = data
        try:
            while True:
                try:
                    sent = os.write(fd, view)
                except BlockingIOError:
                    sent = 0
                if sent == len(view):
                    return
                view = memoryview(view)[sent:]
                await trio.lowlevel.wait_writable(fd)
        except OSError as e:
            raise trio.BrokenResourceError(str(e)) from e


@types.coroutine
def _first_step(coro: Coroutine[Any, Any, None], over: Callable[[], None]
                ) -> Generator[Any, Any, None]:
    """``await coro``, calling ``over()`` once where its first step ends: right before
    it first yields to trio, or when it returns or raises without having yielded.
    (What ``yield from`` does, written out to see the first yield.)"""
    try:
        request = coro.send(None)
    except StopIteration:
        over()
        return
    except BaseException:
        over()
        raise
    over()
    while True:
        try:
            reply = yield request
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # thrown in: hand it on
            try:
                request = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                request = coro.send(reply)
            except StopIteration:
                return


class Connection:
    """The gRPC side of one HTTP/2 connection. ``serve`` runs it on a trio stream;
    ``feed`` and ``data_to_send`` also drive it without one (benchmarks, tests)."""

    def __init__(self, router: Router, *, buffer_limit: int | None = None) -> None:
        self.router = router
        self.http2 = ServerSession(connection_window=CONNECTION_WINDOW)
        self.ready = False  # the client's preface and first SETTINGS are in
        self.streams: dict[int, _Stream] = {}
        self.buffered = 0  # request bytes held for all streams
        self.buffer_limit = buffer_limit or max(4 * router.max_recv, 64 << 20)
        self.closed = False  # no more input will be read
        self.calls: trio.Nursery | None = None
        self._wake = trio.Event()
        self._unstarted = 0  # call tasks started whose first step has not ended yet
        # The reader left what its read made for the last of them to send.
        self._gathering = False
        self._send_now: Callable[[bytes], int] | None = None  # a send that never waits
        self._unsent = b""  # what a send_now left, to go before anything else
        self._writing = False
        self._drained = trio.lowlevel.ParkingLot()
        self._finishing = False
        self._dispatch: dict[int, Callable[[int, Any], None]] = {
            nghttp2.REQUEST: self._on_request,
            nghttp2.DATA: self._on_data,
            nghttp2.END: self._on_end,
            nghttp2.RESET: self._on_reset,
            nghttp2.CLOSED: self._on_reset,
            nghttp2.WINDOW: self._on_window,
            nghttp2.SETTINGS: self._on_settings,
            nghttp2.GOAWAY: self._on_goaway,
        }

    # -- running on a socket ------------------------------------------------------------

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve until the client leaves, breaks the protocol or the caller cancels
        (the caller closes ``stream``)."""
        io: _ByteIO = _SocketIO(stream) if isinstance(stream, trio.SocketStream) else stream
        if isinstance(io, _SocketIO):
            self._send_now = io.send_now
        try:
            await self._serve(io)
        finally:
            self.http2.close()

    async def _serve(self, io: _ByteIO) -> None:
        async with trio.open_nursery() as conn:
            conn.start_soon(self._write_loop, io)
            try:
                async with trio.open_nursery() as calls:
                    self.calls = calls
                    try:
                        await self._read_loop(io)
                    finally:
                        # A connection that stops reading cancels its calls, as grpc-go.
                        self._shutdown()
                        calls.cancel_scope.cancel()
            finally:
                self._finishing = True
                self._wake.set()
                conn.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE

    async def _read_loop(self, stream: _ByteIO) -> None:
        handshake = trio.current_time() + HANDSHAKE_TIMEOUT
        while True:
            if self.ready:
                data = await self._read(stream)
            else:
                # Only the wait for bytes is timed: a deadline that fell inside the
                # processing or the send below would lose an answer already made.
                data = None
                with trio.move_on_at(handshake):
                    data = await self._read(stream)
                if data is None:
                    log.info("closing gRPC connection: no HTTP/2 handshake in time")
                    self._close(ErrorCode.SETTINGS_TIMEOUT)
                    return
            if not data or not self.feed(data):
                return
            if self._unstarted:
                # Call tasks were just started and usually answer in their first step:
                # the last of them to end it sends what this read made nghttp2 say with
                # their answers (``_first_step_over``), one send and no extra trip
                # through trio's run loop for this task.
                self._gathering = True
            elif not await self._flush(stream):
                # Sent from here: the writer task is only for answers made later.
                return
            if self._writing:
                await self._drained.park()  # stop reading a client that is not reading

    @staticmethod
    async def _read(stream: _ByteIO) -> bytes | bytearray:
        try:
            return await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def _write_loop(self, stream: _ByteIO) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not await self._flush(stream) or self._finishing:
                return

    def _first_step_over(self) -> None:
        """A call task's first step ends (it yields to trio for the first time, or is
        done): the last of a read's new calls sends what there is, without waiting."""
        self._unstarted -= 1
        if self._unstarted or not self._gathering:
            return
        self._gathering = False
        if self._writing or self._send_now is None:
            self._wake.set()  # the sender in progress (or the writer task) takes it
            return
        try:
            data = self.data_to_send()
            if data:
                sent = self._send_now(data)
                if sent < len(data):
                    self._unsent = data[sent:]
                    self._wake.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._shutdown()

    def _kick(self) -> None:
        """The session has bytes for the peer: have them sent (by the writer task, unless a read's
        new calls are still in their first step: the last of them sends)."""
        if not self._gathering:
            self._wake.set()

    async def _flush(self, stream: _ByteIO) -> bool:
        """Send what the session has for the peer; False once the peer is gone. One sender at a
        time: whoever is sending also takes what others add meanwhile."""
        if self._writing:
            return True
        self._writing = True
        try:
            while data := self.data_to_send():
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._shutdown()
            return False
        finally:
            self._writing = False
            if self._drained:  # len(): tasks parked on it
                self._drained.unpark_all()
        return True

    def data_to_send(self) -> bytes:
        """The bytes for the peer: the rest of a send cut short, then the session's."""
        http2 = self.http2
        data = http2.data_to_send()
        if http2.late_events:
            for _, sid, _ in http2.late_events:  # only CLOSED: nghttp2 ended a stream
                self._on_reset(sid, None)
            http2.late_events.clear()
        if self._unsent:
            data, self._unsent = self._unsent + data, b""
        return data

    # -- input --------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray) -> bool:
        """Take bytes from the client; False once the connection should close."""
        if self.closed:
            return False
        try:
            events = self.http2.receive(data)
        except SessionError as e:
            # nghttp2 has queued its GOAWAY already.
            log.info("closing gRPC connection: protocol error", error=str(e) or repr(e))
            self.closed = True
            self._wake.set()
            return False
        dispatch = self._dispatch
        for kind, sid, value in events:
            dispatch[kind](sid, value)
        return not self.closed

    def _close(self, code: ErrorCode) -> None:
        self.closed = True
        try:
            self.http2.close_connection(code)
        except SessionError:
            pass
        self._wake.set()

    def _shutdown(self) -> None:
        self.closed = True
        streams, self.streams = self.streams, {}
        for st in streams.values():
            self._forget(st)

    def _forget(self, st: _Stream) -> None:
        st.gone = True
        self.buffered -= len(st.buf)
        st.buf = bytearray()
        if st.scope is not None:
            st.scope.cancel()
        st.wake()

    def _on_request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        path = method = content_type = timeout = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
        if method != b"POST":
            self._send_http_error(sid, b"405", "Method not allowed")
            return
        if content_type is None or not content_type.startswith(b"application/grpc"):
            self._send_http_error(sid, b"415", "Unsupported content type")
            return
        m = self.router.routes.get(path) if path is not None else None
        if m is None:
            e = self.router.unknown(path or b"")
            self._send_error(sid, e.code, e.message, ended=False)
            return
        deadline = None
        if timeout is not None:
            try:
                deadline = trio.current_time() + _decode_timeout(timeout)
            except GRPCStatus as e:
                self._send_error(sid, e.code, e.message, ended=False)
                return
        st = _Stream(sid, m, headers, deadline)
        self.streams[sid] = st
        if m.cardinality in (Cardinality.STREAM_UNARY, Cardinality.STREAM_STREAM):
            self._start(st, self._run_streaming, st)

    def _on_data(self, sid: int, data: bytes) -> None:
        n = len(data)  # nghttp2 hands padding back itself
        st = self.streams.get(sid)
        if st is None:
            if n:
                self.http2.consume(sid, n)  # answered already: dropped
            return
        m = st.method
        buf = st.buf
        unary_request = m.cardinality in (Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM)
        if unary_request:
            if n:
                # Held here, bounded by the message size checked below: hand it back now.
                self.http2.consume(sid, n)
            if st.length >= 0 and len(buf) >= 5 + st.length:
                return  # one message per unary request; grpc-go ignores the rest too
        else:
            st.held += n
        before = len(buf)
        buf += data
        if st.length < 0 and len(buf) >= 5:
            st.length = int.from_bytes(buf[1:5], "big")
            try:
                bridge.check_prefix(buf[0], st.length, m.max_recv)
            except GRPCStatus as e:
                self._fail(st, e)
                return
        if unary_request and st.length >= 0 and len(buf) > 5 + st.length:
            del buf[5 + st.length:]
        self.buffered += len(buf) - before
        if self.buffered > self.buffer_limit:
            log.warning("closing gRPC connection: too many request bytes held",
                        held=self.buffered, limit=self.buffer_limit)
            self._shutdown()
            self._close(ErrorCode.ENHANCE_YOUR_CALM)
            return
        if not unary_request and st.reader is not None:
            if st.length >= 0 and len(buf) >= 5 + st.length:
                st.reader.set()  # a whole message for the waiting recv()
            else:
                # recv() waits for the rest of this message: let the client send it,
                # without waking the reader for every frame.
                st.held -= n
                if n:
                    self.http2.consume(sid, n)

    def _on_end(self, sid: int, _: object) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        st.ended = True
        card = st.method.cardinality
        if card is Cardinality.UNARY_UNARY or card is Cardinality.UNARY_STREAM:
            self._unary_request_complete(st)
        elif st.reader is not None:
            st.reader.set()

    def _on_reset(self, sid: int, _: object) -> None:
        # The client's RST_STREAM, or nghttp2 closed the stream for an error of the client.
        st = self.streams.pop(sid, None)
        if st is not None:
            self._forget(st)  # the call ends without an answer

    def _on_window(self, sid: int, _: object) -> None:
        if sid:
            st = self.streams.get(sid)
            if st is not None and st.window is not None:
                st.window.set()
                st.window = None
        else:
            self._wake_senders()

    def _on_settings(self, sid: int, _: object) -> None:
        self.ready = True  # the first is the client's half of the handshake
        self._wake_senders()  # a new initial window size changes every stream's window

    def _on_goaway(self, sid: int, _: object) -> None:
        self.closed = True

    def _wake_senders(self) -> None:
        for st in self.streams.values():
            if st.window is not None:
                st.window.set()
                st.window = None

    # -- calls --------------------------------------------------------------------------

    def _start(self, st: _Stream, fn: Callable[..., Coroutine[Any, Any, None]],
               *args: Any) -> None:
        if self.calls is None:
            raise RuntimeError("async methods need a connection served by serve()")
        st.scope = (trio.CancelScope() if st.deadline is None
                    else trio.CancelScope(deadline=st.deadline))
        self.calls.start_soon(self._call, fn(*args), name=st.method.path)
        self._unstarted += 1

    async def _call(self, body: Coroutine[Any, Any, None]) -> None:
        await _first_step(body, self._first_step_over)

    def _context(self, st: _Stream) -> CallContext:
        remaining = None
        if st.deadline is not None:
            remaining = st.deadline - trio.current_time()
        return CallContext(metadata=_metadata(st.headers), deadline=remaining)

    def _unary_request_complete(self, st: _Stream) -> None:
        m = st.method
        try:
            buf = st.buf
            if not buf:
                raise bridge.no_request()
            if st.length < 0:
                raise bridge.truncated_header()
            if len(buf) != 5 + st.length:
                raise GRPCStatus(Code.INTERNAL, f"grpc: received truncated message "
                                 f"({len(buf) - 5} of {st.length} bytes)")
            req = bridge.parse(m.recv_type, bytes(buf[5:]))
            self.buffered -= len(buf)
            st.buf = bytearray()
            ctx = self._context(st)
            if ctx.deadline is not None and ctx.deadline <= 0:
                raise bridge.deadline_exceeded()  # the caller gave up: do nothing for it
            if m.is_async:
                run = (self._run_unary if m.cardinality is Cardinality.UNARY_UNARY
                       else self._run_server_stream)
                self._start(st, run, st, ctx, req)
                return
            try:
                data = m.encode(m.impl(ctx, req))
            except Exception as e:
                raise bridge.service_error(e, m.path) from None
            if st.deadline is not None and st.deadline <= trio.current_time():
                raise bridge.deadline_exceeded()  # as grpc-go, which checks before writing
        except GRPCStatus as e:
            self._fail(st, e)
            return
        self._reply(st, data)

    async def _run_unary(self, st: _Stream, ctx: CallContext, req: Any) -> None:
        m = st.method
        data = error = None
        scope = st.scope
        assert scope is not None
        with scope:
            try:
                data = m.encode(await m.impl(ctx, req))
            except Exception as e:
                error = bridge.service_error(e, m.path)
        st.scope = None  # nothing left to cancel (a cancel() costs more than a check)
        if st.gone:
            return  # reset by the client, or its connection is gone
        if scope.cancelled_caught:
            error = bridge.deadline_exceeded()
        if error is not None:
            self._fail(st, error)
        else:
            assert data is not None
            self._reply(st, data)
        self._kick()

    async def _run_server_stream(self, st: _Stream, ctx: CallContext, req: Any) -> None:
        m = st.method

        async def send(msg: Any) -> None:
            await self.send_message(st, msg)

        await self._run_to_trailers(st, m.impl, ctx, req, send)

    async def _run_streaming(self, st: _Stream) -> None:
        await self._run_to_trailers(st, st.method.impl, self._context(st),
                                    MessageStream(self, st))

    async def _run_to_trailers(self, st: _Stream, impl: Callable[..., Any],
                               *args: Any) -> None:
        m = st.method
        error = resp = None
        scope = st.scope
        assert scope is not None
        with scope:
            try:
                resp = await impl(*args)
                if m.cardinality is Cardinality.STREAM_UNARY:
                    if resp is None:
                        raise TypeError(f"{m.path} answered nothing")
                    await self.send_message(st, resp)
            except StreamGone:
                return
            except Exception as e:
                error = bridge.service_error(e, m.path)
        st.scope = None
        if st.gone:
            return
        if scope.cancelled_caught:
            error = bridge.deadline_exceeded()
        if error is not None:
            self._fail(st, error)
        else:
            self._end(st)
        self._kick()

    async def recv_message(self, st: _Stream) -> Any:
        m = st.method
        while True:
            if st.gone:
                raise StreamGone()
            buf = st.buf
            if st.length >= 0 and len(buf) >= 5 + st.length:
                end = 5 + st.length
                data = bytes(buf[5:end])
                del buf[:end]
                self.buffered -= end
                st.length = -1
                if len(buf) >= 5:
                    st.length = int.from_bytes(buf[1:5], "big")
                    bridge.check_prefix(buf[0], st.length, m.max_recv)
                self._hand_back(st)
                return bridge.parse(m.recv_type, data)
            if st.ended:
                if buf:
                    raise bridge.truncated_header() if st.length < 0 else GRPCStatus(
                        Code.INTERNAL, "grpc: received truncated message")
                return None
            # Waiting for the rest of a message: let the client send it.
            self._hand_back(st)
            st.reader = trio.Event()
            await st.reader.wait()

    def _hand_back(self, st: _Stream) -> None:
        if st.held and not st.gone:
            n, st.held = st.held, 0
            try:
                self.http2.consume(st.sid, n)
            except SessionError:
                return
            self._kick()

    async def send_message(self, st: _Stream, msg: Any) -> None:
        data = st.method.encode(msg)
        if st.gone:
            raise StreamGone()
        if not st.started:
            try:
                self.http2.send_headers(st.sid, _OK_HEADERS)
            except SessionError:
                raise StreamGone() from None
            st.started = True
        await self._send_data(st, data)

    async def _send_data(self, st: _Stream, data: bytes) -> None:
        """One framed message, in pieces as flow control allows."""
        http2 = self.http2
        view = memoryview(data)
        while view:
            while self._writing and not st.gone:
                await self._drained.park()
            if st.gone:
                raise StreamGone()
            try:
                window = http2.send_window(st.sid)
            except SessionError:
                raise StreamGone() from None
            if window <= 0:
                st.window = trio.Event()  # set by a WINDOW_UPDATE or new SETTINGS
                await st.window.wait()
                continue
            n = min(window, len(view))  # nghttp2 cuts it into frames
            try:
                http2.send_data(st.sid, data if n == len(data) else view[:n].tobytes())
            except SessionError:
                raise StreamGone() from None
            view = view[n:]
            self._kick()

    # -- output -------------------------------------------------------------------------

    def _send(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except SessionError:
            raise StreamGone() from None

    def _reply(self, st: _Stream, data: bytes) -> None:
        http2 = self.http2
        sid = st.sid
        try:
            if len(data) <= http2.send_window(sid):
                http2.reply(sid, _OK_HEADERS, data, _OK_TRAILERS)
                self._done(st)
                return
        except SessionError:
            self._done(st)
            return  # the client reset the stream or the connection is going away
        if self.calls is None:
            raise RuntimeError("a large answer needs a connection served by serve()")
        st.scope = trio.CancelScope()
        self.calls.start_soon(self._reply_later, st, data)

    async def _reply_later(self, st: _Stream, data: bytes) -> None:
        assert st.scope is not None
        with st.scope:
            try:
                self._send(lambda: self.http2.send_headers(st.sid, _OK_HEADERS))
                st.started = True
                await self._send_data(st, data)
                self._end(st)
            except StreamGone:
                self._done(st)
        self._kick()

    def _end(self, st: _Stream) -> None:
        """OK trailers (trailers-only if nothing was sent)."""
        headers = _OK_TRAILERS if st.started else _OK_TRAILERS_ONLY
        try:
            self.http2.send_headers(st.sid, headers, end_stream=True)
            if not st.ended:
                self.http2.reset_stream(st.sid, ErrorCode.NO_ERROR)
        except SessionError:
            pass
        self._done(st)

    def _fail(self, st: _Stream, e: GRPCStatus) -> None:
        if st.started:
            trailers = [(b"grpc-status", str(e.code).encode())]
            if e.message:
                trailers.append((b"grpc-message", encode_message(e.message)))
            try:
                self.http2.send_headers(st.sid, trailers, end_stream=True)
                if not st.ended:
                    self.http2.reset_stream(st.sid, ErrorCode.NO_ERROR)
            except SessionError:
                pass
        else:
            self._send_error(st.sid, e.code, e.message, ended=st.ended)
        self._done(st)

    def _done(self, st: _Stream) -> None:
        if self.streams.get(st.sid) is st:
            del self.streams[st.sid]
            self.buffered -= len(st.buf)
            st.buf = bytearray()
        st.gone = True
        if st.scope is not None:
            st.scope.cancel()  # a call still running has nobody to answer any more
        st.wake()

    def _send_error(self, sid: int, code: int, message: str | None, *, ended: bool) -> None:
        # Trailers-only, with content-type: grpc-go 1.33 insists on it.
        trailers = [*_OK_HEADERS, (b"grpc-status", str(code).encode())]
        if message:
            trailers.append((b"grpc-message", encode_message(message)))
        try:
            self.http2.send_headers(sid, trailers, end_stream=True)
            if not ended:
                # The client may still be sending: tell it to stop, as grpc-go does.
                self.http2.reset_stream(sid, ErrorCode.NO_ERROR)
        except SessionError:
            pass

    def _send_http_error(self, sid: int, status: bytes, message: str) -> None:
        try:
            self.http2.send_headers(sid, [
                (b":status", status), (b"grpc-status", str(int(Code.UNKNOWN)).encode()),
                (b"grpc-message", message.encode()),
            ], end_stream=True)
            self.http2.reset_stream(sid, ErrorCode.NO_ERROR)
        except SessionError:
            pass
