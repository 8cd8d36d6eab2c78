"""Where berth's services meet the gRPC server: method tables and call adapters.

Services are plain classes whose methods take a CallContext and the request:

- unary:          ``async def m(ctx, req) -> resp`` (a trio task of its own), or a plain
                  ``def`` for work that never awaits (it runs inline, no task at all);
- server stream:  ``async def m(ctx, req, send)`` where ``await send(msg)`` is trio code;
- client or bidi: ``async def m(ctx, stream)`` with ``await stream.recv()`` (None at
                  the end) and ``await stream.send(msg)``.

The method table (paths, cardinalities, message types) comes from the generated
``*Base`` class, so a service only names the methods it implements. The HTTP/2 side
that calls these lives in ``berth.core.grpc.connection`` (trio on h2's state machine).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import betterproto
import structlog
from grpclib.const import Cardinality

from berth.core import errdefs, protowire
from berth.core.errdefs import Code

log = structlog.get_logger("grpc")

DEFAULT_MAX_RECV = 16 << 20


class GRPCStatus(Exception):
    """A call's end with a status other than OK (raised inside the server path)."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(code, message)
        self.code = int(code)
        self.message = message


class StreamGone(Exception):
    """The call's stream was reset by the client, or its connection is closing: nobody
    is left to answer (a service's ``send`` or ``recv`` raises it)."""


def truncated_header() -> GRPCStatus:
    return GRPCStatus(Code.INTERNAL, "grpc: received truncated message header")


def check_prefix(compressed: int, length: int, max_recv: int) -> None:
    """The 5-byte message prefix, judged before any of the message is kept."""
    if compressed:
        raise GRPCStatus(Code.UNIMPLEMENTED, "grpc: compressed messages are not supported")
    if length > max_recv:
        raise GRPCStatus(
            Code.RESOURCE_EXHAUSTED,
            f"grpc: received message larger than max ({length} vs. {max_recv})",
        )


# Requests of a type without fields (google.protobuf.Empty: Version, Introspection.Server)
# carry nothing a service could read or change: one instance per type serves them all.
_FIELDLESS: dict[type, Any] = {}


def parse(recv_type: type, data: bytes) -> Any:
    if not data:  # the common empty request: parse would only set this flag
        msg = _FIELDLESS.get(recv_type)
        if msg is None:
            msg = recv_type()
            msg._serialized_on_wire = True
            if not dataclasses.fields(recv_type):
                _FIELDLESS[recv_type] = msg
        return msg
    try:
        return protowire.parse_flat(recv_type, data)
    except Exception as e:  # betterproto raises several types on garbage
        raise GRPCStatus(Code.INTERNAL, f"grpc: error unmarshalling request: {e}") from None


def deadline_exceeded() -> GRPCStatus:
    return GRPCStatus(Code.DEADLINE_EXCEEDED, "context deadline exceeded")  # grpc-go's words


def no_request() -> GRPCStatus:
    # grpc-go's answer to a unary call whose client sent no message.
    return GRPCStatus(Code.UNKNOWN, "EOF")


def service_error(exc: BaseException, path: str) -> GRPCStatus:
    """The status a service's exception becomes (logged if it is not a typed error)."""
    if isinstance(exc, GRPCStatus):
        return exc
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # a service's own nursery wrapped a lone failure
    if isinstance(exc, StreamGone):
        return GRPCStatus(Code.CANCELLED, "stream gone")  # never sent: nobody listens
    if not isinstance(exc, errdefs.BerthError):
        log.error("unhandled error in service", method=path, exc_info=exc)
    code, message = errdefs.to_status(exc)
    return GRPCStatus(int(code), message)


class Encoded:
    """An answer serialized once, for a service to return as often as it stays right.

    betterproto builds and serializes a message through attribute hooks that cost about
    a microsecond per field touched; an answer that rarely changes (the version, the
    namespace list) is better kept as its bytes than rebuilt for every call."""

    __slots__ = ("message", "framed", "type")

    def __init__(self, message: betterproto.Message) -> None:
        self.message: betterproto.Message | None = message
        self.type: type[betterproto.Message] = type(message)
        data = bytes(message)
        self.framed = b"\x00" + len(data).to_bytes(4, "big") + data

    @classmethod
    def serialized(cls, message_type: type[betterproto.Message], data: bytes) -> Encoded:
        """An answer of ``message_type`` that its maker serialized itself (``data``), with
        no message object behind it (e.g. an event, encoded once for every subscriber)."""
        answer = cls.__new__(cls)
        answer.message = None
        answer.type = message_type
        answer.framed = b"\x00" + len(data).to_bytes(4, "big") + data
        return answer


class AnswerCache:
    """The last answer made from some source value, kept while the value stays equal:
    ``get(value, build)`` calls ``build(value)`` only when ``value`` changed."""

    __slots__ = ("_value", "_answer")

    def __init__(self) -> None:
        self._value: Any = None
        self._answer: Encoded | None = None

    def get(self, value: Any, build: Callable[[Any], betterproto.Message]) -> Encoded:
        answer = self._answer
        if answer is None or value != self._value:
            answer = Encoded(build(value))
            self._value, self._answer = value, answer
        return answer


class AnswerCaches:
    """An ``AnswerCache`` per key (a namespace and a name, say), at most ``limit`` of
    them: past it, all are dropped and made again as asked (each costs one build)."""

    __slots__ = ("_caches", "_limit")

    def __init__(self, limit: int = 256) -> None:
        self._caches: dict[Any, AnswerCache] = {}
        self._limit = limit

    def get(self, key: Any, value: Any,
            build: Callable[[Any], betterproto.Message]) -> Encoded:
        cache = self._caches.get(key)
        if cache is None:
            if len(self._caches) >= self._limit:
                self._caches.clear()
            cache = self._caches[key] = AnswerCache()
        return cache.get(value, build)


@dataclass(frozen=True, slots=True)
class Method:
    """One served method: what the connection needs to call it."""

    path: str
    impl: Callable[..., Any]
    cardinality: Cardinality
    recv_type: type
    reply_type: type[betterproto.Message]
    max_recv: int
    is_async: bool

    def encode(self, resp: Any) -> bytes:
        """The framed answer; a service answering the wrong type is a bug of ours."""
        if type(resp) is Encoded:
            if not issubclass(resp.type, self.reply_type):
                raise TypeError(f"{self.path} answered {resp.type.__name__}, "
                                f"not {self.reply_type.__name__}")
            return resp.framed
        if not isinstance(resp, self.reply_type):
            raise TypeError(f"{self.path} answered {type(resp).__name__}, "
                            f"not {self.reply_type.__name__}")
        msg = bytes(resp)
        return b"\x00" + len(msg).to_bytes(4, "big") + msg


def handlers_for(service: Any, base: type, *, max_recv: int = DEFAULT_MAX_RECV
                 ) -> dict[str, Method]:
    """The route table for ``service``, whose methods follow the generated ``base``."""
    table = base().__mapping__()  # only the paths and types are used
    out: dict[str, Method] = {}
    for path, h in table.items():
        name = h.func.__name__.removeprefix("__rpc_")
        impl = getattr(service, name, None)
        if impl is None or getattr(impl, "__func__", None) is getattr(base, name, None):
            continue  # not implemented: the server answers Unimplemented
        is_async = inspect.iscoroutinefunction(impl)
        if h.cardinality is not Cardinality.UNARY_UNARY and not is_async:
            # A plain def cannot await send/recv: a plugin bug, kept out of the table
            # (the call answers Unimplemented) rather than ending the daemon.
            log.error("streaming gRPC method is not async; not served", method=path)
            continue
        out[path] = Method(path, impl, h.cardinality, h.request_type, h.reply_type,
                           max_recv, is_async)
    return out
