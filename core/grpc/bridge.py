"""The one place where grpclib (asyncio) meets berth's services (trio).

grpclib runs on an asyncio loop that trio-asyncio hosts inside trio. Services are
plain classes whose methods take a CallContext and the request:

- unary:          ``async def m(ctx, req) -> resp`` (or a plain ``def`` for work that
                  never awaits: it then runs inline, without a trio task per call);
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
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable
from typing import Any

import betterproto
import grpclib.const
import grpclib.server
import structlog
import trio_asyncio
from grpclib import GRPCError
from grpclib.const import Cardinality, Status

from core import errdefs
from core.grpc.context import CallContext

log = structlog.get_logger("grpc")

DEFAULT_MAX_RECV = 16 << 20


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
        h2 = self.stream._stream  # noqa: SLF001 - the bridge owns this detail
        meta = await h2.recv_data(5)
        if not meta:
            return None
        if len(meta) < 5:
            raise GRPCError(Status.INTERNAL, "grpc: received truncated message header")
        compressed, length = struct.unpack(">?I", meta)
        if compressed:
            raise GRPCError(Status.UNIMPLEMENTED, "grpc: compressed messages are not supported")
        if length > self.max_recv:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"grpc: received message larger than max ({length} vs. {self.max_recv})",
            )
        data = await h2.recv_data(length) if length else b""
        if len(data) != length:
            raise GRPCError(
                Status.INTERNAL,
                f"grpc: received truncated message ({len(data)} of {length} bytes)",
            )
        try:
            msg = self.recv_type().parse(data)
        except Exception as e:  # betterproto raises several types on garbage
            raise GRPCError(Status.INTERNAL, f"grpc: error unmarshalling request: {e}") from None
        return msg


def _grpc_error(exc: BaseException) -> GRPCError:
    code, message = errdefs.to_status(exc)
    return GRPCError(Status(int(code)), message)


def _context(stream: grpclib.server.Stream) -> CallContext:
    md = stream.metadata or {}
    deadline = stream.deadline.time_remaining() if stream.deadline else None
    return CallContext(metadata=md, deadline=deadline)


def _wrap(impl: Callable[..., Any], cardinality: Cardinality, recv_type: type,
          max_recv: int, path: str) -> Callable[[grpclib.server.Stream], Any]:
    is_async = inspect.iscoroutinefunction(impl)
    trio_impl = trio_asyncio.trio_as_aio(impl) if is_async else None

    async def run(*args: Any) -> Any:
        try:
            if trio_impl is not None:
                return await trio_impl(*args)
            return impl(*args)
        except GRPCError:
            raise
        except errdefs.BerthError as e:
            raise _grpc_error(e) from None
        except Exception as e:
            log.exception("unhandled error in service", method=path)
            raise _grpc_error(e) from None

    if cardinality is Cardinality.UNARY_UNARY:
        async def unary(stream: grpclib.server.Stream) -> None:
            call = _Call(stream, max_recv, recv_type)
            req = await call.recv()
            resp = await run(_context(stream), req)
            await stream.send_message(resp)
        return unary

    if cardinality is Cardinality.UNARY_STREAM:
        async def server_stream(stream: grpclib.server.Stream) -> None:
            call = _Call(stream, max_recv, recv_type)
            req = await call.recv()
            send = trio_asyncio.aio_as_trio(stream.send_message)
            await run(_context(stream), req, send)
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
            _wrap(impl, h.cardinality, h.request_type, max_recv, path),
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
