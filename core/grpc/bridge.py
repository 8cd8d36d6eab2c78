"""The one place where grpclib (asyncio) meets berth's services (trio).

grpclib runs on an asyncio loop that trio-asyncio hosts inside trio. Services are
plain classes whose methods take a CallContext and the request:

- unary:          ``async def m(ctx, req) -> resp`` (a trio task of its own), or a plain
                  ``def`` for work that never awaits (it runs inline, no task at all);
- server stream:  ``async def m(ctx, req, send)`` where ``await send(msg)`` is trio code;
- client or bidi: ``async def m(ctx, stream)`` with ``await stream.recv()`` (None at
                  the end) and ``await stream.send(msg)``.

The method table (paths, cardinalities, message types) comes from the generated
``*Base`` class, so a service only names the methods it implements.

Two things grpclib does not do the way grpc-go clients need, fixed here:
- grpclib answers an unknown method with a trailers-only response that has no
  content-type; grpc-go 1.33 (ctr 1.6) then reports "missing content-type field"
  instead of Unimplemented. Unknown paths are routed to a real handler instead.
- grpclib reads whatever message length a client announces; berth enforces a maximum
  (ResourceExhausted, worded like grpc-go) before buffering anything.

Speed (numbers and profiles in benchmarks/README.md): ``Server`` speaks grpclib's
HTTP/2 protocol with its own unary path. grpclib's request handler (an asyncio task,
a ``Stream``, metadata dispatch, deadline wrappers, then trio_as_aio) costs more than
most services do, so ``Protocol`` answers unary calls itself once the request stream
has ended: a plain ``def`` right there in ``data_received``, an ``async def`` as a trio
task in the server's ``calls`` nursery, both with the h2 calls grpclib would make.
Server-streaming methods (Content.Read: ten per ``ctr run``; Events.Subscribe) run
the same way, as a trio task that writes its messages through h2 as flow control
allows. Writes are gathered, so everything one read produces leaves in one ``send``
instead of one per HTTP/2 frame, and the acks h2 owes for a read that started a task
wait a moment for that task's answer. Client and bidi streams, unknown paths and
malformed requests take grpclib's ordinary path.

Third-party hot spots patched here, once, for the whole process: betterproto's
attribute hooks (``berth.core.grpc.messages``), hyperframe's frame ``repr`` and hpack's
debug logging (both computed for log lines nobody reads), and hpack's Huffman decoder
(memoised).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import struct
from collections.abc import Callable
from typing import Any

import betterproto
import grpclib.const
import grpclib.exceptions
import grpclib.protocol
import grpclib.server
import h2.config
import h2.exceptions
import hpack.hpack
import hpack.huffman_table
import hyperframe.frame
import structlog
import trio
import trio_asyncio
from grpclib import GRPCError
from grpclib.const import Cardinality, Status
from grpclib.metadata import Deadline, decode_metadata, encode_grpc_message
from h2.events import DataReceived, StreamEnded

from berth.core import errdefs
from berth.core.grpc import messages
from berth.core.grpc.context import CallContext

# h2 formats every received frame with repr() for a trace log that is a no-op, and
# hyperframe's reprs hex-encode payloads (DataFrame: 3-7% of berthd's CPU during an
# image import; HEADERS, flags and the rest: ~1.5% on ctr run's path). The frame type
# and stream are all anyone would read there.
hyperframe.frame.Frame.__repr__ = (  # type: ignore[method-assign]
    lambda self: f"{type(self).__name__}(stream_id={self.stream_id})"
)

# Building and reading betterproto messages without raising exceptions per field.
messages.install()


def _remembering_huffman(decode: Callable[[bytes], bytes], size: int = 512
                         ) -> Callable[[bytes], bytes]:
    """hpack's Huffman decoder, remembering its answers.

    Each ``ctr`` opens a new connection, so its HPACK table starts empty and the same
    paths, user agent and namespace arrive Huffman-coded again every time; decoding
    them bit by bit in Python was ~2% of berthd's CPU per ``ctr run``. Bounded: the
    memory is dropped whole when full.
    """
    seen: dict[bytes, bytes] = {}

    def decode_huffman(data: bytes) -> bytes:
        out = seen.get(data)
        if out is None:
            out = decode(data)  # raises on malformed input: nothing is remembered
            if len(seen) >= size:
                seen.clear()
            seen[bytes(data)] = out
        return out

    return decode_huffman


hpack.hpack.decode_huffman = _remembering_huffman(  # type: ignore[assignment]
    hpack.huffman_table.decode_huffman)


class _Unlogged:
    """hpack's module logger, silenced: it logs every integer and header it codes at
    debug level (~30 calls per gRPC call, each asking logging whether debug is on), and
    those lines would print header values such as credentials anyway."""

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass


hpack.hpack.log = _Unlogged()  # type: ignore[assignment]

log = structlog.get_logger("grpc")

DEFAULT_MAX_RECV = 16 << 20

# What grpclib answers with, so both paths look the same on the wire.
CONTENT_TYPE = "application/grpc+proto"
_ACCEPTED_CONTENT_TYPES = frozenset({"application/grpc", "application/grpc+proto"})
_OK_HEADERS = [(":status", "200"), ("content-type", CONTENT_TYPE)]
_OK_TRAILERS = [("grpc-status", "0")]


# -- request decoding, shared by both paths ---------------------------------------------

def _truncated_header() -> GRPCError:
    return GRPCError(Status.INTERNAL, "grpc: received truncated message header")


def _check_prefix(compressed: int, length: int, max_recv: int) -> None:
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, "grpc: compressed messages are not supported")
    if length > max_recv:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"grpc: received message larger than max ({length} vs. {max_recv})",
        )


def _parse(recv_type: type, data: bytes, length: int) -> Any:
    if len(data) != length:
        raise GRPCError(
            Status.INTERNAL,
            f"grpc: received truncated message ({len(data)} of {length} bytes)",
        )
    if not data:  # the common empty request: parse would only set this flag
        msg = recv_type()
        msg._serialized_on_wire = True
        return msg
    try:
        return recv_type().parse(data)
    except Exception as e:  # betterproto raises several types on garbage
        raise GRPCError(Status.INTERNAL, f"grpc: error unmarshalling request: {e}") from None


def _deadline_exceeded() -> GRPCError:
    return GRPCError(Status.DEADLINE_EXCEEDED, "context deadline exceeded")  # grpc-go's words


def _no_request() -> GRPCError:
    # grpc-go's answer to a unary call whose client sent no message.
    return GRPCError(Status.UNKNOWN, "EOF")


class MessageStream:
    """A trio-side view of a client- or bidi-streaming call."""

    def __init__(self, bridge: _Call) -> None:
        self._call = bridge

    async def recv(self) -> Any:
        return await trio_asyncio.aio_as_trio(self._call.recv)()

    async def send(self, msg: betterproto.Message) -> None:
        await trio_asyncio.aio_as_trio(self._call.stream.send_message)(msg)


class _Call:
    def __init__(self, stream: grpclib.server.Stream, max_recv: int, recv_type: type) -> None:
        self.stream = stream
        self.max_recv = max_recv
        self.recv_type = recv_type

    async def recv(self) -> Any:
        # grpclib's own recv_message would buffer any announced length and then
        # assert on truncation; read the 5-byte prefix ourselves instead.
        h2s = self.stream._stream  # noqa: SLF001 - the bridge owns this detail
        meta = await h2s.recv_data(5)
        if not meta:
            return None
        if len(meta) < 5:
            raise _truncated_header()
        compressed, length = struct.unpack(">?I", meta)
        _check_prefix(compressed, length, self.max_recv)
        data = await h2s.recv_data(length) if length else b""
        return _parse(self.recv_type, data, length)


def _grpc_error(exc: BaseException) -> GRPCError:
    code, message = errdefs.to_status(exc)
    return GRPCError(Status(int(code)), message)


def _service_error(exc: Exception, path: str) -> GRPCError:
    """The status a service's exception becomes (logged if it is not a typed error)."""
    if isinstance(exc, GRPCError):
        return exc
    if not isinstance(exc, errdefs.BerthError):
        log.exception("unhandled error in service", method=path)
    return _grpc_error(exc)


def _call_sync(impl: Callable[..., Any], path: str, *args: Any) -> Any:
    try:
        return impl(*args)
    except Exception as e:
        raise _service_error(e, path) from None


def _context(stream: grpclib.server.Stream) -> CallContext:
    md = stream.metadata or {}
    deadline = stream.deadline.time_remaining() if stream.deadline else None
    return CallContext(metadata=md, deadline=deadline)


class _Inline:
    """What the protocol needs to answer a unary method without grpclib's handler."""

    __slots__ = ("impl", "path", "recv_type", "reply_type", "max_recv", "is_async",
                 "streaming")

    def __init__(self, impl: Callable[..., Any], path: str, recv_type: type,
                 reply_type: type, max_recv: int, *, streaming: bool = False) -> None:
        self.impl = impl
        self.path = path
        self.recv_type = recv_type
        self.reply_type = reply_type
        self.max_recv = max_recv
        self.is_async = inspect.iscoroutinefunction(impl)
        self.streaming = streaming  # server streaming: impl(ctx, req, send)

    def encode(self, resp: Any) -> bytes:
        """The framed answer (grpclib's codec refuses a wrong type the same way)."""
        if not isinstance(resp, self.reply_type):
            raise TypeError(f"{self.path} answered {type(resp).__name__}, "
                            f"not {self.reply_type.__name__}")
        msg = bytes(resp)
        return b"\x00" + len(msg).to_bytes(4, "big") + msg


def _wrap(impl: Callable[..., Any], cardinality: Cardinality, recv_type: type,
          reply_type: type, max_recv: int, path: str) -> Callable[[grpclib.server.Stream], Any]:
    is_async = inspect.iscoroutinefunction(impl)
    # One wrapper per method, made once: trio_as_aio is not free per call.
    trio_impl = trio_asyncio.trio_as_aio(impl) if is_async else None

    async def run(*args: Any) -> Any:
        if trio_impl is None:
            return _call_sync(impl, path, *args)
        try:
            return await trio_impl(*args)
        except Exception as e:
            raise _service_error(e, path) from None

    if cardinality is Cardinality.UNARY_UNARY:
        async def unary(stream: grpclib.server.Stream) -> None:
            req = await _Call(stream, max_recv, recv_type).recv()
            if req is None:
                raise _no_request()
            resp = await run(_context(stream), req)
            await stream.send_message(resp)
        unary.inline = _Inline(impl, path, recv_type, reply_type, max_recv)  # type: ignore
        return unary

    if cardinality is Cardinality.UNARY_STREAM:
        async def server_stream(stream: grpclib.server.Stream) -> None:
            req = await _Call(stream, max_recv, recv_type).recv()
            if req is None:
                raise _no_request()
            send = trio_asyncio.aio_as_trio(stream.send_message)
            await run(_context(stream), req, send)
        server_stream.inline = _Inline(  # type: ignore[attr-defined]
            impl, path, recv_type, reply_type, max_recv, streaming=True)
        return server_stream

    async def streaming(stream: grpclib.server.Stream) -> None:
        call = _Call(stream, max_recv, recv_type)
        resp = await run(_context(stream), MessageStream(call))
        if cardinality is Cardinality.STREAM_UNARY and resp is not None:
            await stream.send_message(resp)
    return streaming


def handlers_for(service: Any, base: type, *, max_recv: int = DEFAULT_MAX_RECV
                 ) -> dict[str, grpclib.const.Handler]:
    """The grpclib mapping for ``service``, whose methods follow the generated ``base``."""
    table = base().__mapping__()  # only the paths and types are used
    out: dict[str, grpclib.const.Handler] = {}
    for path, h in table.items():
        name = h.func.__name__.removeprefix("__rpc_")
        impl = getattr(service, name, None)
        if impl is None or getattr(impl, "__func__", None) is getattr(base, name, None):
            continue  # not implemented: the catch-all answers Unimplemented
        out[path] = grpclib.const.Handler(
            _wrap(impl, h.cardinality, h.request_type, h.reply_type, max_recv, path),
            h.cardinality, h.request_type, h.reply_type,
        )
    return out


class _Unimplemented:
    """Answers every unknown path through a normal stream, so headers are complete."""

    def __init__(self, known: dict[str, grpclib.const.Handler]) -> None:
        self.services = {p.rsplit("/", 1)[0].lstrip("/") for p in known}

    def handler(self, path: str) -> grpclib.const.Handler:
        service, _, method = path.lstrip("/").rpartition("/")
        if service in self.services:
            message = f"unknown method {method} for service {service}"
        else:
            message = f"unknown service {service}"

        async def unimplemented(stream: grpclib.server.Stream) -> None:
            raise GRPCError(Status.UNIMPLEMENTED, message)

        # Raw bytes in and out: we never read the request.
        return grpclib.const.Handler(unimplemented, Cardinality.STREAM_STREAM, _Raw, _Raw)


class _Raw:
    """A message type that keeps bytes as they are."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def parse(self, data: bytes) -> _Raw:
        self.data = data
        return self

    def __bytes__(self) -> bytes:
        return self.data


class Mapping(dict):
    """grpclib's route table with a fallback for paths nobody serves."""

    def __init__(self, handlers: dict[str, grpclib.const.Handler]) -> None:
        super().__init__(handlers)
        self._fallback = _Unimplemented(handlers)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        h = super().get(key)
        if h is None:
            return self._fallback.handler(key)
        return h


def _raw_serialize(self: _Raw) -> bytes:
    return self.data


_Raw.SerializeToString = _raw_serialize  # type: ignore[attr-defined]
_Raw.FromString = classmethod(lambda cls, data: cls(data))  # type: ignore[attr-defined]


# -- the HTTP/2 protocol ----------------------------------------------------------------

class _GatheringTransport:
    """An asyncio transport whose writes leave together.

    grpclib writes each HTTP/2 frame as it makes it (headers, data, trailers, window
    updates): one syscall each. Here they wait for the end of ``data_received`` or,
    for writes made by tasks, for the next loop turn.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_event_loop()
        self._buf: list[bytes] = []
        self.holding = False  # set while data_received runs: it flushes at the end

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._buf and not self.holding:
            self._loop.call_soon(self.flush)
        self._buf.append(data)

    def flush_soon(self) -> None:
        """Flush after two loop turns: a task started meanwhile that answers in its first
        step (trio orders a batch at random) has then sent these bytes with its own."""
        if self._buf:
            self._loop.call_soon(self._loop.call_soon, self.flush)

    def flush(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf) if len(self._buf) > 1 else self._buf[0]
        self._buf.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _StreamGone(Exception):
    """A streaming answer's stream was reset or its connection closed."""


_GONE = GRPCError(Status.CANCELLED)  # marker: nobody is left to answer
# How long a finished streaming answer waits for a paused transport to take its trailers.
_TRAILERS_WAIT = 30.0


class _Pending:
    """An inline call whose request stream has not ended yet."""

    __slots__ = ("spec", "headers", "deadline", "buf", "length")

    def __init__(self, spec: _Inline, headers: list[tuple[str, str]],
                 deadline: Deadline | None) -> None:
        self.spec = spec
        self.headers = headers
        self.deadline = deadline
        self.buf = bytearray()
        self.length = -1  # announced message length, once the prefix is in


class _Processor(grpclib.protocol.EventsProcessor):
    """grpclib's event processor, answering unary methods without grpclib's handler.

    A plain-``def`` method runs right here, in ``data_received``. An ``async def`` one
    runs as a trio task in ``calls`` (when the server has one) and writes its answer
    itself: no asyncio task and no trio_as_aio hop per call. Either way the answer is
    made with the same h2 calls grpclib would make.
    """

    def __init__(self, handler: grpclib.server.Handler,
                 connection: grpclib.protocol.Connection, out: _GatheringTransport,
                 calls: trio.Nursery | None) -> None:
        super().__init__(handler, connection)
        self._routes: dict[str, grpclib.const.Handler] = handler.mapping
        self._h2 = connection._connection  # noqa: SLF001 - the bridge owns this detail
        self._out = out
        self._calls = calls
        self._loop = asyncio.get_event_loop()
        self._pending: dict[int, _Pending] = {}
        self._running: dict[int, trio.CancelScope] = {}
        self._windows: dict[int, trio.Event] = {}  # streaming answers waiting for a window
        self.started = False  # a task was started for a call (see Protocol.data_received)

    # Headers arrive first; a request that qualifies waits here for its data.
    def process_request_received(self, event: Any) -> None:
        headers = event.headers
        h = dict(headers)
        handler = dict.get(self._routes, h.get(":path"))  # no Unimplemented fallback
        spec = getattr(handler.func, "inline", None) if handler is not None else None
        if (
            spec is None
            or (spec.is_async and self._calls is None)
            or (spec.streaming and not spec.is_async)
            or h.get(":method") != "POST"
            or h.get("te") != "trailers"
            or h.get("content-type") not in _ACCEPTED_CONTENT_TYPES
        ):
            super().process_request_received(event)  # grpclib checks and answers
            return
        deadline = None
        if "grpc-timeout" in h:
            try:
                deadline = Deadline.from_headers(headers)
            except ValueError:
                super().process_request_received(event)
                return
        self._pending[event.stream_id] = _Pending(spec, headers, deadline)

    def process_data_received(self, event: DataReceived) -> None:
        sid = event.stream_id
        p = self._pending.get(sid)
        if p is None:
            super().process_data_received(event)
            return
        if event.flow_controlled_length:
            # Buffered here, bounded by max_recv below: hand the window back now.
            self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
        buf = p.buf
        if p.length >= 0 and len(buf) >= 5 + p.length:
            return  # a unary call reads one message; grpc-go ignores the rest too
        buf += event.data
        if p.length < 0 and len(buf) >= 5:
            p.length = int.from_bytes(buf[1:5], "big")
            try:
                _check_prefix(buf[0], p.length, p.spec.max_recv)
            except GRPCError as e:
                del self._pending[sid]
                self._reply_error(sid, e.status, e.message)
                return
        if p.length >= 0 and len(buf) > 5 + p.length:
            del buf[5 + p.length:]

    def process_stream_ended(self, event: StreamEnded) -> None:
        p = self._pending.pop(event.stream_id, None)
        if p is None:
            super().process_stream_ended(event)
            return
        self._answer(event.stream_id, p)

    def process_stream_reset(self, event: Any) -> None:
        sid = event.stream_id
        if self._pending.pop(sid, None) is not None:
            return
        scope = self._running.pop(sid, None)
        if scope is not None:
            scope.cancel()  # the call ends without an answer, as in grpclib
            return
        super().process_stream_reset(event)

    def close(self, reason: str = "Connection closed") -> None:
        self._pending.clear()
        running, self._running = self._running, {}
        for scope in running.values():
            scope.cancel()
        super().close(reason)

    def _answer(self, sid: int, p: _Pending) -> None:
        spec = p.spec
        try:
            buf = p.buf
            if not buf:
                raise _no_request()
            if p.length < 0:
                raise _truncated_header()
            req = _parse(spec.recv_type, bytes(buf[5:]), p.length)
            remaining = p.deadline.time_remaining() if p.deadline is not None else None
            if remaining is not None and remaining <= 0:
                raise _deadline_exceeded()  # the caller gave up: do nothing for it
            ctx = CallContext(metadata=decode_metadata(p.headers), deadline=remaining)
            if spec.is_async:
                assert self._calls is not None
                scope = trio.CancelScope()
                if remaining is not None:
                    scope.deadline = trio.current_time() + remaining
                self._running[sid] = scope
                self.started = True
                answer = self._answer_stream if spec.streaming else self._answer_async
                self._calls.start_soon(answer, sid, spec, scope, ctx, req, name=spec.path)
                return
            data = spec.encode(_call_sync(spec.impl, spec.path, ctx, req))
            if p.deadline is not None and p.deadline.time_remaining() <= 0:
                raise _deadline_exceeded()  # as grpc-go, which checks before writing
        except GRPCError as e:
            self._reply_error(sid, e.status, e.message)
            return
        except Exception:
            log.exception("failed to answer", method=spec.path)
            self._reply_error(sid, Status.UNKNOWN, "Internal Server Error")
            return
        self._reply(sid, data)

    async def _answer_async(self, sid: int, spec: _Inline, scope: trio.CancelScope,
                            ctx: CallContext, req: Any) -> None:
        data = error = None
        with scope:
            try:
                resp = await spec.impl(ctx, req)
            except Exception as e:
                error = _service_error(e, spec.path)
            else:
                try:
                    data = spec.encode(resp)
                except Exception:
                    log.exception("failed to answer", method=spec.path)
                    error = GRPCError(Status.UNKNOWN, "Internal Server Error")
        if self._running.pop(sid, None) is None:
            return  # reset by the client, or its connection is gone
        if scope.cancelled_caught:
            error = _deadline_exceeded()
        out, held = self._out, self._out.holding
        out.holding = True  # one send, now, rather than on the next loop turn
        try:
            if error is not None:
                self._reply_error(sid, error.status, error.message)
            else:
                assert data is not None
                self._reply(sid, data)
            self.connection.flush()  # h2's bytes to the transport
        finally:
            out.holding = held
        if not held:
            out.flush()

    async def _answer_stream(self, sid: int, spec: _Inline, scope: trio.CancelScope,
                             ctx: CallContext, req: Any) -> None:
        """A server-streaming call, answered as grpclib's ``Stream`` would: headers
        before the first message, each message sent as the window allows, then
        trailers (trailers-only if nothing was sent)."""
        started = False

        async def send(msg: Any) -> None:
            nonlocal started
            data = spec.encode(msg)
            if not started:
                await self._writable()
                self._h2.send_headers(sid, _OK_HEADERS)
                started = True
            await self._send_data(sid, data)

        error = None
        with scope:
            try:
                await spec.impl(ctx, req, send)
            except (h2.exceptions.ProtocolError, _StreamGone):
                error = _GONE  # the client reset the stream or the connection is going
            except Exception as e:
                error = _service_error(e, spec.path)
        self._windows.pop(sid, None)
        if self._running.pop(sid, None) is None or error is _GONE:
            return  # reset by the client, or its connection is gone
        if scope.cancelled_caught:
            error = _deadline_exceeded()
        if not self.connection.write_ready.is_set():
            with trio.move_on_after(_TRAILERS_WAIT) as waited:
                await self._writable()
            if waited.cancelled_caught:
                return
        try:
            if not started:
                if error is None:
                    self._h2.send_headers(sid, [*_OK_HEADERS, *_OK_TRAILERS],
                                          end_stream=True)
                else:
                    self._reply_error(sid, error.status, error.message)
            elif error is None:
                self._h2.send_headers(sid, _OK_TRAILERS, end_stream=True)
            else:
                trailers = [("grpc-status", str(error.status.value))]
                if error.message is not None:
                    trailers.append(("grpc-message", encode_grpc_message(error.message)))
                self._h2.send_headers(sid, trailers, end_stream=True)
                stream = self._h2.streams.get(sid)
                if stream is not None and not stream.closed:
                    self._h2.reset_stream(sid)  # as grpclib after an error status
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    async def _writable(self) -> None:
        """Until the transport takes writes again (grpclib's ``write_ready``)."""
        ready = self.connection.write_ready
        if not ready.is_set():
            await trio_asyncio.aio_as_trio(ready.wait)()

    async def _send_data(self, sid: int, data: bytes) -> None:
        """One framed message on a stream, in pieces as flow control allows."""
        conn = self._h2
        view = memoryview(data)
        while view:
            await self._writable()
            if sid not in self._running:
                raise _StreamGone()
            window = conn.local_flow_control_window(sid)
            if window <= 0:
                # Woken by a WINDOW_UPDATE for the stream or the connection, or by
                # new settings (process_window_updated and friends, below).
                wake = self._windows[sid] = trio.Event()
                await wake.wait()
                continue
            n = min(window, conn.max_outbound_frame_size, len(view))
            conn.send_data(sid, view[:n].tobytes())
            view = view[n:]
            # To the gathering transport: it sends on the next loop turn, together with
            # whatever else this call writes before then (often its trailers).
            self.connection.flush()

    def _flush(self) -> None:
        """h2's bytes out now (a task's write does not wait for the next loop turn)."""
        out, held = self._out, self._out.holding
        out.holding = True
        try:
            self.connection.flush()
        finally:
            out.holding = held
        if not held:
            out.flush()

    def _wake_senders(self, sid: int | None = None) -> None:
        if sid is None:
            waiting, self._windows = self._windows, {}
            for wake in waiting.values():
                wake.set()
        else:
            wake = self._windows.pop(sid, None)
            if wake is not None:
                wake.set()

    def process_window_updated(self, event: Any) -> None:
        self._wake_senders(event.stream_id or None)
        super().process_window_updated(event)

    def process_remote_settings_changed(self, event: Any) -> None:
        self._wake_senders()  # a new initial window size changes every stream's window
        super().process_remote_settings_changed(event)

    def _reply(self, sid: int, data: bytes) -> None:
        conn = self._h2
        try:
            if (
                self.connection.write_ready.is_set()
                and len(data) <= conn.max_outbound_frame_size
                and len(data) <= conn.local_flow_control_window(sid)
            ):
                conn.send_headers(sid, _OK_HEADERS)
                conn.send_data(sid, data)
                conn.send_headers(sid, _OK_TRAILERS, end_stream=True)
                return
        except h2.exceptions.ProtocolError:
            return  # the client reset the stream or the connection is going away
        self._reply_later(sid, data, None)

    def _reply_error(self, sid: int, status: Status, message: str | None) -> None:
        # Trailers-only, with content-type: grpc-go 1.33 insists on it.
        trailers = [*_OK_HEADERS, ("grpc-status", str(status.value))]
        if message is not None:
            trailers.append(("grpc-message", encode_grpc_message(message)))
        if not self.connection.write_ready.is_set():
            self._reply_later(sid, None, trailers)
            return
        conn = self._h2
        try:
            conn.send_headers(sid, trailers, end_stream=True)
            stream = conn.streams.get(sid)
            if stream is not None and not stream.closed:
                conn.reset_stream(sid)  # as grpclib: the client may stop sending
        except h2.exceptions.ProtocolError:
            pass

    def _reply_later(self, sid: int, data: bytes | None,
                     trailers: list[tuple[str, str]] | None) -> None:
        """Answer through a grpclib stream: it waits for flow control windows."""
        if self.connection.is_closing():
            return
        stream = self.connection.create_stream(stream_id=sid)
        release = self.register(stream)
        task = self._loop.create_task(_send(stream, release, data, trailers))
        tasks = getattr(self.handler, "_tasks", None)
        if tasks is not None:
            tasks[stream] = task  # so a reset or the server's close cancels it


async def _send(stream: grpclib.protocol.Stream, release: Callable[[], None],
                data: bytes | None, trailers: list[tuple[str, str]] | None) -> None:
    try:
        if trailers is None:
            assert data is not None
            await stream.send_headers(_OK_HEADERS)
            await stream.send_data(data)
            await stream.send_headers(_OK_TRAILERS, end_stream=True)
        else:
            await stream.send_headers(trailers, end_stream=True)
            if stream.closable:
                stream.reset_nowait()
    except (h2.exceptions.ProtocolError, grpclib.exceptions.StreamTerminatedError):
        pass
    finally:
        release()


class Protocol(grpclib.protocol.H2Protocol):
    """grpclib's HTTP/2 protocol with its own unary answers and gathered writes."""

    def __init__(self, handler: grpclib.server.Handler, config: Any, h2_config: Any,
                 calls: trio.Nursery | None = None) -> None:
        super().__init__(handler, config, h2_config)
        self._calls = calls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._out = _GatheringTransport(transport)  # type: ignore[arg-type]
        super().connection_made(self._out)  # type: ignore[arg-type]
        self.processor = _Processor(
            self.handler, self.connection, self._out, self._calls,  # type: ignore[arg-type]
        )

    def data_received(self, data: bytes) -> None:
        out = self._out
        out.holding = True
        processor = self.processor
        processor.started = False
        try:
            super().data_received(data)
        except Exception:
            # A boundary per connection: nothing one client sends (a header value that
            # is not valid text, a frame h2 chokes on, a bug of ours it triggers) may
            # escape into the daemon's nursery. That connection ends; the rest go on.
            log.warning("closing gRPC connection after an error in its input",
                        exc_info=True)
            self._abandon()
        finally:
            out.holding = False
            if processor.started:
                # A call now runs as a task and sends its answer soon: what h2 wrote
                # meanwhile (PING and SETTINGS acks, window updates) can go with it, or
                # on the next loop turn if the task is not done by then.
                out.flush_soon()
            else:
                out.flush()


    def _abandon(self) -> None:
        with contextlib.suppress(Exception):
            self.processor.close("Protocol error")
        with contextlib.suppress(Exception):
            self._out.close()


class Server(grpclib.server.Server):
    """grpclib's server, speaking through ``Protocol`` and routing unknown paths.

    ``calls`` is the nursery where ``async def`` unary methods run; without one they
    take grpclib's path (an asyncio task, then trio_as_aio).
    """

    def __init__(self, routes: dict[str, grpclib.const.Handler], *,
                 calls: trio.Nursery | None = None) -> None:
        super().__init__([_Routes(routes)])
        self._mapping = Mapping(self._mapping)
        self._calls = calls

    def _protocol_factory(self) -> grpclib.protocol.H2Protocol:
        plain = super()._protocol_factory()
        # grpclib decodes header values as ASCII: a namespace such as "é" (UTF-8 from
        # grpc-go, as containerd reads it) would end the connection instead of getting
        # containerd's InvalidArgument from the service.
        h2_config = h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_inbound_headers=False,
            validate_outbound_headers=False, normalize_inbound_headers=False,
            normalize_outbound_headers=False)
        return Protocol(plain.handler, plain.config, h2_config, self._calls)


class _Routes:
    """Feeds grpclib.Server a prepared route table."""

    def __init__(self, routes: dict[str, grpclib.const.Handler]) -> None:
        self.routes = routes

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self.routes
