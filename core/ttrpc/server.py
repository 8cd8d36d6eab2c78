"""ttrpc server on trio: unary methods, one task per connection and per request.

Behaviour follows the Go server (github.com/containerd/ttrpc server.go and
services.go) wherever a client could tell the difference: the status codes and
messages for unknown services and methods, even stream ids, oversized frames
and undecodable payloads, the Status field always being set, request deadlines
from ``timeout_nano`` and the same-user check on the peer's SO_PEERCRED.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import betterproto
import trio

from berth.core import errdefs, log, protowire
from berth.core.errdefs import Code
from berth.core.headers import TTRPC_NAMESPACE
from berth.core.ttrpc import codec
from berth.core.ttrpc._writer import FrameWriter

NAMESPACE_KEY = TTRPC_NAMESPACE

_RECEIVE_SIZE = 64 * 1024
# How long a connection being closed may take to flush its last frames.
_CLOSE_GRACE = 5.0
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_UCRED = struct.Struct("3i")


class PeerCredentials(NamedTuple):
    pid: int
    uid: int
    gid: int


@dataclass
class Context:
    """What a handler knows about the call besides its request message."""

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    # trio clock time by which the client stops waiting; math.inf when it set none.
    deadline: float = math.inf
    peer: PeerCredentials | None = None
    # Run once the call's answer is written to the connection (or could not be).
    replied: list[Callable[[], None]] = field(default_factory=list)

    def on_replied(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` after the answer to this call has left (e.g. Shutdown's own answer
        must reach the client before the server stops)."""
        self.replied.append(fn)

    def get(self, key: str) -> str | None:
        """First value of a metadata key (looked up lower-cased, like ttrpc.MD.Get)."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None

    @property
    def namespace(self) -> str | None:
        return self.get(NAMESPACE_KEY)


Handler = Callable[[Context, Any], Awaitable[betterproto.Message]]


class Method(NamedTuple):
    request_type: type[betterproto.Message]
    handler: Handler
    # Reads the payload for a method whose request has a reader of its own (a nested
    # message on a hot path, e.g. Events.Forward): what the handler takes, the same
    # fields betterproto's parse gives for the same bytes. Without one, the request is
    # read by ``protowire.parse_flat``.
    decode: Callable[[bytes], Any] | None = None


def peer_credentials(stream: trio.abc.Stream) -> PeerCredentials | None:
    """SO_PEERCRED of a unix socket stream; None for anything else."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials._make(_UCRED.unpack(raw))


def _socket_path(address: str) -> str:
    return address.removeprefix("unix://")


class Server:
    def __init__(
        self,
        *,
        require_same_user: bool = True,
        max_message_length: int = codec.MAX_MESSAGE_LENGTH,
    ) -> None:
        # Go's shim and containerd both refuse peers whose uid/gid differ from theirs.
        self._require_same_user = require_same_user
        self._max = max_message_length
        self._services: dict[str, dict[str, Method]] = {}
        self._log = log.get("ttrpc.server")

    def register(self, service_name: str, methods: Mapping[str, Method | tuple]) -> None:
        if service_name in self._services:
            raise ValueError(f"duplicate service {service_name} registered")
        self._services[service_name] = {
            name: Method(*method) for name, method in methods.items()
        }

    async def serve_unix(
        self, path: str, *, owner: tuple[int, int] | None = None,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on a unix socket until cancelled, then remove it.

        The socket is 0600, or with ``owner`` (uid, gid; berthd's configured ``[ttrpc]``
        owner, as containerd's) 0660 and owned by them.
        """
        path = _socket_path(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await _bind_unix(sock, path)
            # Before listen() nobody can connect, so the umask-wide mode is never usable.
            if owner is None:
                os.chmod(path, 0o600)
            else:
                os.chmod(path, 0o660)
                if os.geteuid() == 0:
                    os.chown(path, *owner)
            inode = os.stat(path).st_ino
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        try:
            await self._serve(listener, task_status, path)
        finally:
            sock.close()
            # Leave the path alone if someone else has bound it since.
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass

    async def serve_listener(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections until cancelled; the listener stays the caller's."""
        await self._serve(listener, task_status, None)

    async def _serve(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        task_status: trio.TaskStatus[Any],
        started: Any,
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(started)
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                        raise
                    self._log.error("ttrpc: failed accept; backing off", error=str(exc))
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._serve_connection, stream)

    # -- one connection ---------------------------------------------------------------

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        try:
            await self._run_connection(stream)
        except Exception:
            # A bug or an unexpected socket error ends this connection only: the
            # listener and every other client keep going.
            self._log.exception("ttrpc: connection failed")

    async def _run_connection(self, stream: trio.abc.Stream) -> None:
        async with stream:
            peer = peer_credentials(stream)
            conn_log = self._log.bind(peer_pid=peer.pid if peer else None)
            if self._require_same_user and (
                peer is None or peer.uid != os.geteuid() or peer.gid != os.getegid()
            ):
                conn_log.error(
                    "ttrpc: refusing connection after handshake",
                    error="ttrpc: invalid credentials: operation not permitted",
                    peer_uid=peer.uid if peer else None,
                    peer_gid=peer.gid if peer else None,
                )
                return
            writer = FrameWriter(stream, direct=True)
            async with trio.open_nursery() as conn_nursery:
                conn_nursery.start_soon(writer.run)
                try:
                    async with trio.open_nursery() as handlers:
                        try:
                            await self._receive_loop(stream, writer, handlers, peer, conn_log)
                        finally:
                            # Like Go, a connection that stops reading cancels its calls.
                            handlers.cancel_scope.cancel()
                finally:
                    writer.close()
                    conn_nursery.cancel_scope.deadline = trio.current_time() + _CLOSE_GRACE

    async def _receive_loop(
        self,
        stream: trio.abc.Stream,
        writer: FrameWriter,
        handlers: trio.Nursery,
        peer: PeerCredentials | None,
        conn_log: Any,
    ) -> None:
        decoder = codec.FrameDecoder(self._max)
        while True:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                try:
                    decoder.eof()
                except codec.TruncatedFrame as exc:
                    conn_log.warning("ttrpc: connection closed mid-frame", error=str(exc))
                return
            decoder.feed(data)
            while True:
                try:
                    frame = decoder.next_frame()
                except codec.FrameTooLarge as exc:
                    conn_log.warning("ttrpc: oversized request", stream_id=exc.stream_id,
                                     length=exc.length)
                    await self._reply_status(writer, exc.stream_id, exc.code, exc.message)
                    continue
                if frame is None:
                    break
                if frame.type != codec.MESSAGE_TYPE_REQUEST:
                    continue  # ignored for forward compatibility, as Go does
                try:
                    request = codec.decode_request(frame.payload)
                except codec.MessageDecodeError as exc:
                    # Go answers and carries on; past a frame that is not a Request
                    # we no longer trust the framing, so answer and hang up.
                    conn_log.warning("ttrpc: closing connection on undecodable request",
                                     stream_id=frame.stream_id, error=str(exc))
                    await self._reply_status(writer, frame.stream_id, Code.INVALID_ARGUMENT,
                                             f"unmarshal request error: {exc}")
                    return
                if frame.stream_id % 2 != 1:
                    await self._reply_status(
                        writer, frame.stream_id, Code.INVALID_ARGUMENT,
                        "StreamID must be odd for client initiated streams",
                    )
                    continue
                handlers.start_soon(self._handle, writer, frame.stream_id, request, peer,
                                    conn_log)

    async def _reply_status(
        self, writer: FrameWriter, stream_id: int, code: int, message: str
    ) -> None:
        frame = codec.response_frame(stream_id, codec.CallResponse(code, message),
                                     max_length=self._max)
        try:
            await writer.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _handle(
        self,
        writer: FrameWriter,
        stream_id: int,
        request: codec.CallRequest,
        peer: PeerCredentials | None,
        conn_log: Any,
    ) -> None:
        replied: list[Callable[[], None]] = []
        response = await self._dispatch(request, peer, conn_log, replied)
        frame = codec.response_frame(stream_id, response, max_length=self._max)
        try:
            await writer.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection went away; nobody is waiting for this answer
        for fn in replied:
            fn()

    async def _dispatch(
        self, request: codec.CallRequest, peer: PeerCredentials | None, conn_log: Any,
        replied: list[Callable[[], None]] | None = None,
    ) -> codec.CallResponse:
        methods = self._services.get(request.service)
        if methods is None:
            return codec.CallResponse(Code.UNIMPLEMENTED, f"service {request.service}")
        method = methods.get(request.method)
        if method is None:
            return codec.CallResponse(Code.UNIMPLEMENTED, f"method {request.method}")

        try:
            decode = method.decode
            message = (decode(request.payload) if decode is not None
                       else protowire.parse_flat(method.request_type, request.payload))
        except Exception as exc:
            return codec.CallResponse(
                Code.INTERNAL, f"ttrpc: error unmarshalling payload: {exc}"
            )

        deadline = math.inf
        if request.timeout_nano:
            deadline = trio.current_time() + request.timeout_nano / 1e9
        ctx = Context(
            service=request.service,
            method=request.method,
            metadata=codec.metadata_dict(request.metadata),
            deadline=deadline,
            peer=peer,
            replied=replied if replied is not None else [],
        )
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                result = await method.handler(ctx, message)
            if scope.cancelled_caught:
                error = errdefs.DeadlineExceeded()
                return codec.CallResponse(error.code, error.message)
        except Exception as exc:
            # A handler's own nursery wraps a lone failure in an ExceptionGroup; the status
            # should still describe the failure itself.
            failure = errdefs.unwrap_group(exc)
            code, text = errdefs.to_status(failure)
            if isinstance(failure, errdefs.BerthError):
                conn_log.debug("ttrpc: call failed", service=request.service,
                               method=request.method, namespace=ctx.namespace, error=text)
            else:
                conn_log.error("ttrpc: handler raised", service=request.service,
                               method=request.method, namespace=ctx.namespace,
                               exc_info=failure)
            return codec.CallResponse(code, text)

        if result is None:
            return codec.CallResponse(Code.UNKNOWN, "ttrpc: marshal called with nil")
        if not isinstance(result, betterproto.Message):
            return codec.CallResponse(
                Code.INTERNAL,
                f"ttrpc: error unsupported response type: {type(result).__name__}",
            )
        try:
            payload = bytes(result)
        except Exception as exc:
            return codec.CallResponse(Code.INTERNAL, f"ttrpc: error marshaling payload: {exc}")
        return codec.CallResponse(Code.OK, "", payload)


async def _bind_unix(sock: trio.socket.SocketType, path: str) -> None:
    """Bind ``path``, replacing a stale socket file but never a live one."""
    try:
        await sock.bind(path)
        return
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise errdefs.AlreadyExists(f"ttrpc: {path} exists and is not a socket", raw=True)
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left over from a previous run
        else:
            raise errdefs.AlreadyExists(f"ttrpc: {path}: a server is already listening",
                                        raw=True)
        finally:
            probe.close()
    await sock.bind(path)
