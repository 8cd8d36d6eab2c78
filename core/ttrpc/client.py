"""ttrpc client on trio: unary calls multiplexed over one connection.

``open_client`` owns a nursery holding the connection's reader and writer tasks.
Calls may come from any task; each waits for the response carrying its stream
id. When the connection ends, for whatever reason, every waiting and every later
call raises ``errdefs.Unavailable("ttrpc: closed")``, the error Go's client
reports as ErrClosed.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import betterproto
import trio

from berth.core import errdefs, log, protowire
from berth.core.ttrpc import codec
from berth.core.ttrpc._writer import FrameWriter

CLOSED_MESSAGE = "ttrpc: closed"

_RECEIVE_SIZE = 64 * 1024
_STREAM_ID_MASK = 0xFFFFFFFF

ResponseT = TypeVar("ResponseT", bound=betterproto.Message)


def _closed() -> errdefs.Unavailable:
    return errdefs.Unavailable(CLOSED_MESSAGE, raw=True)


class _Call:
    __slots__ = ("done", "response", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: codec.CallResponse | None = None
        self.error: BaseException | None = None


class Client:
    """A connection to a ttrpc server. Get one from ``open_client``."""

    def __init__(
        self, stream: trio.abc.Stream, *, max_message_length: int = codec.MAX_MESSAGE_LENGTH
    ) -> None:
        self._stream = stream
        self._writer = FrameWriter(stream, direct=True)
        self._max = max_message_length
        self._pending: dict[int, _Call] = {}
        self._next_id = 1  # client streams are odd, as the server insists
        self._closed = trio.Event()
        # Covers the reader and writer tasks only, never the caller's code.
        self._io_scope = trio.CancelScope()
        self._log = log.get("ttrpc.client")

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return once the connection is gone (the peer hung up or we closed it)."""
        await self._closed.wait()

    async def call(
        self,
        service: str,
        method: str,
        request: betterproto.Message,
        response_type: type[ResponseT],
        *,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
        timeout: float | None = None,
    ) -> ResponseT:
        """Call ``service/method``; a non-OK status raises the matching errdefs error.

        The server learns the deadline (``timeout`` and any enclosing trio deadline,
        whichever is sooner) as ``timeout_nano``. Running out of ``timeout`` raises
        ``errdefs.DeadlineExceeded``; an enclosing cancel scope cancels as usual.
        """
        payload = await self.call_raw(service, method, bytes(request), metadata=metadata,
                                      timeout=timeout)
        return decode(response_type, payload, service, method)

    async def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """``call`` with the request already encoded; the answer's payload, undecoded."""
        if self._closed.is_set():
            raise _closed()
        now = trio.current_time()
        own_deadline = math.inf if timeout is None else now + timeout
        deadline = min(own_deadline, trio.current_effective_deadline())
        timeout_nano = 0
        if deadline != math.inf:
            # 0 would mean "no deadline" on the wire, so an expired one is sent as 1ns
            # (an already cancelled scope's deadline is -inf: Cancelled comes at the send).
            timeout_nano = max(1, int(max(0.0, deadline - now) * 1e9))

        stream_id = self._allocate_stream_id()
        frame = codec.request_frame(
            stream_id,
            codec.CallRequest(service, method, payload, timeout_nano,
                              codec.metadata_pairs(metadata)),
            max_length=self._max,
        )
        call = _Call()
        self._pending[stream_id] = call
        try:
            if timeout is None:
                # No scope of our own to run out (the caller's still cancel as usual).
                await self._send_and_wait(frame, call)
            else:
                with trio.move_on_at(own_deadline) as scope:
                    await self._send_and_wait(frame, call)
                if scope.cancelled_caught:
                    raise errdefs.DeadlineExceeded()
        finally:
            self._pending.pop(stream_id, None)

        if call.error is not None:
            raise call.error
        response = call.response
        assert response is not None
        if response.code != errdefs.Code.OK:
            raise errdefs.from_status(response.code, response.message)
        return response.payload

    async def _send_and_wait(self, frame: bytes, call: _Call) -> None:
        try:
            await self._writer.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _closed() from None
        await call.done.wait()

    def _allocate_stream_id(self) -> int:
        stream_id = self._next_id
        # uint32 arithmetic like Go's, skipping ids still waiting after a wrap.
        while stream_id in self._pending:
            stream_id = (stream_id + 2) & _STREAM_ID_MASK
        self._next_id = (stream_id + 2) & _STREAM_ID_MASK
        return stream_id

    async def aclose(self) -> None:
        """Close the connection; waiting calls raise Unavailable("ttrpc: closed")."""
        self._shut()
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    def _shut(self) -> None:
        self._closed.set()
        self._io_scope.cancel()
        self._writer.close()
        pending, self._pending = self._pending, {}
        for call in pending.values():
            call.error = _closed()
            call.done.set()

    async def _run_io(self) -> None:
        with self._io_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._write_loop)

    async def _write_loop(self) -> None:
        try:
            await self._writer.run()
        finally:
            self._shut()

    async def _read_loop(self) -> None:
        decoder = codec.FrameDecoder(self._max)
        try:
            while True:
                try:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                decoder.feed(data)
                self._deliver(decoder)
        finally:
            self._shut()

    def _deliver(self, decoder: codec.FrameDecoder) -> None:
        pending = self._pending
        while True:
            try:
                frame = decoder.next_frame()
            except codec.FrameTooLarge as exc:
                call = pending.pop(exc.stream_id, None)
                if call is not None:
                    call.error = exc
                    call.done.set()
                continue
            if frame is None:
                return
            call = pending.pop(frame.stream_id, None)
            if call is None:
                # Normal after a caller gave up waiting; Go logs it too.
                self._log.debug("ttrpc: received message for unknown channel",
                                stream_id=frame.stream_id)
                continue
            if frame.type != codec.MESSAGE_TYPE_RESPONSE:
                call.error = errdefs.Unknown(
                    f"ttrpc: unknown message type {frame.type} received", raw=True
                )
            else:
                try:
                    call.response = codec.decode_response(frame.payload)
                except codec.MessageDecodeError as exc:
                    call.error = errdefs.Internal(f"ttrpc: bad response: {exc}", raw=True)
            call.done.set()


def decode(response_type: type[ResponseT], payload: bytes, service: str, method: str
           ) -> ResponseT:
    """An answer's payload as ``response_type``; ``errdefs.Internal`` if it is not one."""
    try:
        return protowire.parse_flat(response_type, payload)
    except Exception as exc:
        raise errdefs.Internal(
            f"ttrpc: cannot decode {service}/{method} response as "
            f"{response_type.__name__}: {exc}",
            raw=True,
        ) from exc


def _socket_path(address: str) -> str:
    return address.removeprefix("unix://")


@asynccontextmanager
async def open_client(
    address: str, *, max_message_length: int = codec.MAX_MESSAGE_LENGTH
) -> AsyncIterator[Client]:
    """Connect to a unix socket (a path, or ``unix://`` + path as shims print it)."""
    path = _socket_path(address)
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise errdefs.Unavailable(
            f"ttrpc: dial {address}: {exc.strerror or exc}", raw=True
        ) from exc
    async with open_stream_client(stream, max_message_length=max_message_length) as client:
        yield client


@asynccontextmanager
async def open_stream_client(
    stream: trio.abc.Stream, *, max_message_length: int = codec.MAX_MESSAGE_LENGTH
) -> AsyncIterator[Client]:
    """A client over an already connected stream, which it takes ownership of."""
    client = Client(stream, max_message_length=max_message_length)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._run_io)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
