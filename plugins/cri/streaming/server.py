"""The CRI streaming server: one-time URLs for exec, attach and port-forward (trio).

The CRI's Exec, Attach and PortForward calls hand back ``<base>/exec/<token>`` (and
``/attach/``, ``/portforward/``); the client connects there and upgrades the HTTP connection
to SPDY/3.1 or WebSocket. A token is random, used once, expires after ``token_ttl`` seconds
(containerd and the kubelet: one minute) and is bound to the CRI request it was issued for:
the container, command and streams all come from that request, never from the URL, so a
token of one container's exec gives nothing of another's.

Every connection is owned by the server's nursery. Limits: a request head must arrive whole
within ``header_timeout`` and fit ``MAX_HEAD``; at most ``max_pending`` connections may sit
before their head (the oldest is dropped when more come, so idle sockets cannot pile up to
the fd limit); at most ``max_connections`` may be open at all (more are closed at once); an
upgraded connection with no traffic either way for ``idle_timeout`` seconds is closed.
Anything a client sends that breaks the protocol closes that connection only.
"""

from __future__ import annotations

import collections
import os
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Protocol

import h11
import structlog
import trio
import wsproto
import wsproto.events as wse

from berth.core import errdefs
from berth.plugins.cri.streaming import protocol, spdy
from berth.plugins.cri.streaming.protocol import StreamOptions, TerminalSize
from berth.plugins.cri.streaming.transport import (
    Channel,
    ChannelClosed,
    SpdySession,
    WebSocketSession,
)

_log = structlog.get_logger("berth.cri.streaming")

MAX_HEAD = 16 * 1024
TOKEN_TTL = 60.0
MAX_TOKENS = 1000
STREAM_CREATION_TIMEOUT = 30.0
# After the status is written, how long the client gets to hang up before we do.
CLOSE_GRACE = 5.0


# What the server asks of the runtime ------------------------------------------------------


@dataclass(frozen=True)
class AttachRequest:
    """A CRI Attach as the token remembers it; the streams wanted are fixed here."""

    container_id: str
    _: KW_ONLY
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class ExecRequest(AttachRequest):
    cmd: tuple[str, ...]


@dataclass(frozen=True)
class PortForwardRequest:
    pod_sandbox_id: str
    ports: tuple[int, ...] = ()


@dataclass
class ExecStreams:
    """The client's side of an exec or attach; a stream is None when not asked for."""

    tty: bool
    stdin: Channel | None = None
    stdout: Channel | None = None
    stderr: Channel | None = None
    resize: trio.MemoryReceiveChannel[TerminalSize] | None = None


class StreamRuntime(Protocol):
    """What the CRI plugin offers the streaming server."""

    async def exec(self, req: ExecRequest, streams: ExecStreams) -> int:
        """Run the command, copy its stdio, return its exit code."""

    async def attach(self, req: AttachRequest, streams: ExecStreams) -> None:
        """Copy the container's stdio until the client or the container is done."""

    async def port_forward(self, pod_sandbox_id: str, port: int, stream: Channel) -> None:
        """Connect to ``port`` on localhost in the pod's network namespace and copy both ways."""


# Configuration and tokens -------------------------------------------------------------------


@dataclass
class StreamServerConfig:
    address: str = "127.0.0.1"
    port: int = 0
    tls: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Where a self-signed certificate goes when TLS is on without one.
    state_dir: str = ""
    token_ttl: float = TOKEN_TTL
    max_tokens: int = MAX_TOKENS
    stream_creation_timeout: float = STREAM_CREATION_TIMEOUT
    idle_timeout: float = 4 * 3600.0
    header_timeout: float = 10.0
    max_pending: int = 64
    max_connections: int = 512
    max_header_bytes: int = spdy.DEFAULT_MAX_HEADER_BYTES


@dataclass
class _Cached:
    kind: str
    request: Any
    expires: float


class TokenCache:
    """One-time tokens bound to a request, expiring after ``ttl`` seconds."""

    def __init__(self, ttl: float = TOKEN_TTL, max_tokens: int = MAX_TOKENS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_tokens = max_tokens
        self._clock = clock
        self._items: collections.OrderedDict[str, _Cached] = collections.OrderedDict()

    def _prune(self) -> None:
        now = self._clock()
        while self._items:
            token, item = next(iter(self._items.items()))
            if item.expires > now:
                break
            del self._items[token]

    def insert(self, kind: str, request: Any) -> str:
        self._prune()
        if len(self._items) >= self.max_tokens:
            raise errdefs.ResourceExhausted(
                f"maximum number of in-flight streaming requests ({self.max_tokens}) reached",
                raw=True)
        token = secrets.token_urlsafe(16)
        self._items[token] = _Cached(kind, request, self._clock() + self.ttl)
        return token

    def consume(self, kind: str, token: str) -> Any | None:
        """The request for a live token of this kind; the token is gone either way."""
        item = self._items.pop(token, None)
        if item is None or item.kind != kind or item.expires <= self._clock():
            return None
        return item.request

    def __len__(self) -> int:
        return len(self._items)


def load_key_pair(cert: str, key: str) -> ssl.SSLContext:
    """The server context for a given certificate (PEM, a chain allowed) and its
    unencrypted private key; what is wrong with them is said by name."""
    def fail(why: str) -> errdefs.InvalidArgument:
        return errdefs.InvalidArgument(
            f"failed to load x509 key pair for stream server (tls_cert_file {cert!r}, "
            f"tls_key_file {key!r}): {why}", raw=True)

    if not cert or not key:
        raise fail("both files must be set")

    def encrypted() -> bytes:
        # Without this, OpenSSL would prompt on berthd's terminal for a passphrase.
        raise fail("the private key is encrypted; berthd needs it without a passphrase")

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # The certificate alone first, so that a bad one is not blamed on the key.
        ssl.create_default_context(ssl.Purpose.SERVER_AUTH).load_verify_locations(cert)
    except OSError as exc:
        raise fail(f"no PEM certificate in tls_cert_file: {exc.strerror or exc}") from None
    try:
        ctx.load_cert_chain(cert, key, password=encrypted)
    except OSError as exc:
        raise fail("tls_key_file is not the PEM private key of that certificate: "
                   f"{exc.strerror or exc}") from None
    return ctx


# HTTP -------------------------------------------------------------------------------------------


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, body: str,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(body)
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = headers


def _response(status: int, reason: str, body: str = "",
              headers: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    data = body.encode()
    lines += [f"{k}: {v}" for k, v in headers]
    if status != 101:
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}",
                  "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


@dataclass
class _Head:
    method: str
    target: str
    headers: list[tuple[str, str]]
    raw: bytes
    rest: bytes

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def value(self, name: str) -> str:
        vals = self.values(name)
        return vals[0] if vals else ""

    def has_token(self, name: str, token: str) -> bool:
        return any(token.lower() == t.strip().lower()
                   for v in self.values(name) for t in v.split(","))


async def _read_head(stream: trio.abc.Stream) -> _Head:
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEAD:
            raise _HttpError(431, "Request Header Fields Too Large", "request head too large")
        data = await stream.receive_some(4096)
        if not data:
            raise EOFError
        buf += data
    raw, rest = bytes(buf[:end + 4]), bytes(buf[end + 4:])
    if len(raw) > MAX_HEAD:
        raise _HttpError(431, "Request Header Fields Too Large", "request head too large")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    try:
        ev = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise _HttpError(400, "Bad Request", f"bad request: {exc}") from None
    if not isinstance(ev, h11.Request):
        raise _HttpError(400, "Bad Request", "bad request")
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in ev.headers]
    return _Head(ev.method.decode("ascii", "replace"), ev.target.decode("latin-1"), headers,
                 raw, rest)


# The server -----------------------------------------------------------------------------------


class StreamServer:
    def __init__(self, runtime: StreamRuntime, config: StreamServerConfig | None = None, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.runtime = runtime
        self.config = config or StreamServerConfig()
        self.tokens = TokenCache(self.config.token_ttl, self.config.max_tokens)
        self.port = 0
        self.host = self.config.address
        self.scheme = "https" if self.config.tls else "http"
        self._ssl: ssl.SSLContext | None = ssl_context if self.config.tls else None
        self._pending: collections.OrderedDict[int, trio.CancelScope] = collections.OrderedDict()
        self._open = 0
        self._conn_ids = 0
        self.active = 0  # upgraded connections being served (for tests and metrics)

    # -- URLs --

    @property
    def base_url(self) -> str:
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def get_exec(self, req: ExecRequest) -> str:
        if not (req.stdin or req.stdout or req.stderr):
            raise errdefs.InvalidArgument("one of stdin, stdout, or stderr must be set",
                                          raw=True)
        if req.tty and req.stderr:
            raise errdefs.InvalidArgument("tty and stderr cannot both be true", raw=True)
        if not req.cmd:
            raise errdefs.InvalidArgument("cmd must not be empty", raw=True)
        return f"{self.base_url}/exec/{self.tokens.insert('exec', req)}"

    def get_attach(self, req: AttachRequest) -> str:
        if not (req.stdin or req.stdout or req.stderr):
            raise errdefs.InvalidArgument("one of stdin, stdout, and stderr must be set",
                                          raw=True)
        return f"{self.base_url}/attach/{self.tokens.insert('attach', req)}"

    def get_port_forward(self, req: PortForwardRequest) -> str:
        if not req.pod_sandbox_id:
            raise errdefs.InvalidArgument("missing required pod_sandbox_id", raw=True)
        return f"{self.base_url}/portforward/{self.tokens.insert('portforward', req)}"

    # -- serving --

    async def _tls_context(self) -> ssl.SSLContext:
        cert, key = self.config.tls_cert_file, self.config.tls_key_file
        if cert or key:
            return load_key_pair(cert, key)
        folder = Path(self.config.state_dir or "/run/berth/cri-streaming")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert, key = str(folder / "stream.crt"), str(folder / "stream.key")
        if not (os.path.exists(cert) and os.path.exists(key)):
            san = f"IP:{self.config.address}" if self.config.address.replace(
                ".", "").isdigit() or ":" in self.config.address else (
                f"DNS:{self.config.address}")
            await trio.run_process(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650", "-subj",
                 "/CN=berth-cri-streaming", "-addext", f"subjectAltName={san}",
                 "-keyout", key, "-out", cert], capture_stdout=True, capture_stderr=True)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        return ctx

    async def prepare_tls(self) -> None:
        """Load (or make) the certificate when TLS is on: a key pair that does not load is
        an error here, before anything listens, never a fallback to another certificate."""
        if self.config.tls and self._ssl is None:
            self._ssl = await self._tls_context()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        await self.prepare_tls()
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.address)
        self.port = listeners[0].socket.getsockname()[1]
        _log.info("cri streaming server listening", url=self.base_url)
        async with trio.open_nursery() as nursery:
            task_status.started()
            try:
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
            finally:
                for lst in listeners:
                    with trio.CancelScope(shield=True):
                        await lst.aclose()

    async def _handle(self, sock: trio.SocketStream) -> None:
        stream: trio.abc.Stream = sock
        if self._open >= self.config.max_connections:
            await sock.aclose()
            return
        self._open += 1
        self._conn_ids += 1
        cid = self._conn_ids
        try:
            if self._ssl is not None:
                stream = trio.SSLStream(sock, self._ssl, server_side=True)
            head = await self._head_phase(cid, stream)
            if head is None:
                return
            await self._route(stream, head)
        except Exception as exc:  # noqa: BLE001 - one connection's failure is never the server's
            _log.warning("cri streaming connection failed", error=repr(exc))
        finally:
            self._open -= 1
            self._pending.pop(cid, None)
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await _quietly(stream.aclose())

    async def _head_phase(self, cid: int, stream: trio.abc.Stream) -> _Head | None:
        # The oldest connection still without a head makes room for a new one.
        while len(self._pending) >= self.config.max_pending:
            _, scope = self._pending.popitem(last=False)
            scope.cancel()
        scope = trio.CancelScope(deadline=trio.current_time() + self.config.header_timeout)
        self._pending[cid] = scope
        try:
            with scope:
                try:
                    return await _read_head(stream)
                except _HttpError as exc:
                    await _send_quietly(stream, _response(exc.status, exc.reason, exc.body,
                                                          exc.headers))
                    return None
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                        OSError, ssl.SSLError):
                    return None
            return None
        finally:
            self._pending.pop(cid, None)

    async def _route(self, stream: trio.abc.Stream, head: _Head) -> None:
        url = urllib.parse.urlsplit(head.target)
        parts = url.path.strip("/").split("/")
        if head.method not in ("GET", "POST") or len(parts) != 2 or parts[0] not in (
                "exec", "attach", "portforward"):
            await _send_quietly(stream, _response(404, "Not Found", "404 page not found\n"))
            return
        kind, token = parts
        req = self.tokens.consume(kind, token)
        if req is None:
            await _send_quietly(stream, _response(404, "Not Found", "404 page not found\n"))
            return
        query = urllib.parse.parse_qs(url.query)
        try:
            if head.has_token("upgrade", "websocket"):
                await self._websocket(stream, head, kind, req, query)
            elif any(v.strip().lower() == protocol.SPDY_UPGRADE.lower()
                     for v in head.values("upgrade")) and head.has_token("connection",
                                                                         "upgrade"):
                await self._spdy(stream, head, kind, req)
            else:
                raise _HttpError(400, "Bad Request",
                                 "unable to upgrade: missing upgrade headers in request")
        except _HttpError as exc:
            await _send_quietly(stream, _response(exc.status, exc.reason, exc.body, exc.headers))

    # -- SPDY --

    async def _spdy(self, stream: trio.abc.Stream, head: _Head, kind: str, req: Any) -> None:
        server_protos = (protocol.PORTFORWARD_PROTOCOLS if kind == "portforward"
                         else protocol.REMOTECOMMAND_PROTOCOLS)
        offered = head.values(protocol.HEADER_PROTOCOL_VERSION)
        if not offered:
            raise _HttpError(400, "Bad Request", "unable to upgrade: "
                             f"{protocol.HEADER_PROTOCOL_VERSION} is required")
        chosen = protocol.negotiate(offered, server_protos)
        if chosen is None:
            raise _HttpError(
                403, "Forbidden",
                f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                f"server accepts {list(server_protos)}",
                [(protocol.HEADER_ACCEPTED_VERSIONS, ", ".join(server_protos))])
        await stream.send_all(_response(101, "Switching Protocols", headers=[
            ("Connection", "Upgrade"), ("Upgrade", protocol.SPDY_UPGRADE),
            (protocol.HEADER_PROTOCOL_VERSION, chosen)]))
        session = SpdySession(stream, head.rest, max_header_bytes=self.config.max_header_bytes)
        if kind == "portforward":
            await self._serve_session(session, self._spdy_port_forward(session, req))
        else:
            await self._serve_session(session,
                                      self._spdy_remotecommand(session, kind, req, chosen))

    async def _serve_session(self, session: SpdySession | WebSocketSession,
                             body: Awaitable[None]) -> None:
        """Run one upgraded connection: its reader, an idle watch, and what it is for."""
        self.active += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run_reader)
                nursery.start_soon(self._idle_watch, session, nursery.cancel_scope)
                await body
                nursery.cancel_scope.cancel()
        finally:
            self.active -= 1

    async def _idle_watch(self, session: SpdySession | WebSocketSession,
                          scope: trio.CancelScope) -> None:
        timeout = self.config.idle_timeout
        while not session.closed.is_set():
            idle_until = session.last_activity + timeout
            if trio.current_time() >= idle_until:
                _log.info("cri streaming connection idle, closing", idle_timeout=timeout)
                scope.cancel()
                return
            with trio.move_on_at(idle_until):
                await session.closed.wait()

    async def _spdy_remotecommand(self, session: SpdySession, kind: str, req: Any,
                                  proto: str) -> None:
        opts = StreamOptions(req.stdin, req.stdout, req.stderr, req.tty)
        expected = opts.expected_spdy_streams(proto)
        got: dict[str, Channel] = {}
        with trio.move_on_after(self.config.stream_creation_timeout) as timeout:
            async for ch in session.new_streams:
                await session.reply(ch, ch.sid)
                stype = ch.headers.get(protocol.STREAM_TYPE, "")
                if stype in (protocol.STREAM_ERROR, protocol.STREAM_STDIN,
                             protocol.STREAM_STDOUT, protocol.STREAM_STDERR,
                             protocol.STREAM_RESIZE) and stype not in got:
                    got[stype] = ch
                else:
                    _log.info("unexpected stream type", stream_type=stype)
                    await session.reset(ch.sid, spdy.PROTOCOL_ERROR)
                if len(got) >= expected:
                    break
        if timeout.cancelled_caught or len(got) < expected:
            _log.info("timed out waiting for client to create streams", kind=kind)
            return
        error = got.get(protocol.STREAM_ERROR)
        streams = ExecStreams(tty=opts.tty, stdin=got.get(protocol.STREAM_STDIN),
                              stdout=got.get(protocol.STREAM_STDOUT),
                              stderr=got.get(protocol.STREAM_STDERR))
        if proto == protocol.STREAM_PROTOCOL_V1 and streams.stdin is not None:
            # channel.k8s.io clients half-close nothing: v1 servers closed stdin at once.
            streams.stdin.feed_eof()
        resize = got.get(protocol.STREAM_RESIZE)
        await self._remotecommand(kind, req, streams, resize, error, proto, session.closed)
        with trio.move_on_after(CLOSE_GRACE):
            await session.closed.wait()
        if not session.closed.is_set():
            await session.goaway()

    async def _remotecommand(self, kind: str, req: Any, streams: ExecStreams,
                             resize: Channel | None, error: Channel | None, proto: str,
                             gone: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            if resize is not None and streams.tty:
                send, streams.resize = trio.open_memory_channel[TerminalSize](16)
                nursery.start_soon(_pump_resize, resize, send)
            # A client that hangs up ends its command (containerd kills the exec too): nobody
            # is left to read its output or status.
            with trio.CancelScope() as command:
                nursery.start_soon(_cancel_when, gone, command)
                status = await self._run_command(kind, req, streams)
            if command.cancelled_caught:
                _log.info("client gone, command ended", kind=kind,
                          id=getattr(req, "container_id", ""))
                nursery.cancel_scope.cancel()
                return
            for ch in (streams.stdout, streams.stderr):
                if ch is not None:
                    await _quietly(ch.send_eof())
            if error is not None:
                payload = protocol.encode_status(status, proto)
                if payload:
                    await _quietly(error.send_all(payload))
                await _quietly(error.send_eof())
            nursery.cancel_scope.cancel()

    async def _run_command(self, kind: str, req: Any, streams: ExecStreams) -> dict:
        try:
            if kind == "exec":
                code = await self.runtime.exec(req, streams)
                if code:
                    return protocol.exit_status(req.cmd, code)
            else:
                await self.runtime.attach(req, streams)
            return protocol.success_status()
        except errdefs.BerthError as exc:
            return protocol.internal_error_status(str(exc))
        except ChannelClosed as exc:
            return protocol.internal_error_status(str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged here
            _log.warning("cri streaming command failed", kind=kind, error=repr(exc),
                         id=getattr(req, "container_id", ""))
            return protocol.internal_error_status(f"error executing command in container: {exc}")

    async def _spdy_port_forward(self, session: SpdySession, req: PortForwardRequest) -> None:
        pairs: dict[str, dict[str, Channel]] = {}
        async with trio.open_nursery() as nursery:
            async for ch in session.new_streams:
                sid = ch.sid
                try:
                    port = protocol.parse_port(ch.headers.get(protocol.PORT_HEADER, ""))
                    stype = ch.headers.get(protocol.STREAM_TYPE, "")
                    if stype not in (protocol.STREAM_ERROR, protocol.STREAM_DATA):
                        raise protocol.StreamProtocolError(f"invalid stream type {stype!r}")
                except protocol.StreamProtocolError as exc:
                    _log.info("port-forward stream refused", error=str(exc))
                    await session.reset(sid, spdy.PROTOCOL_ERROR)
                    continue
                await session.reply(ch, sid)
                rid = ch.headers.get(protocol.REQUEST_ID_HEADER) or str(
                    sid if stype == protocol.STREAM_ERROR else sid - 2)
                pair = pairs.setdefault(rid, {})
                if stype in pair:
                    await _quietly(pair.get(protocol.STREAM_ERROR, ch).send_all(
                        f"error processing stream for request {rid}: {stype} stream already "
                        "assigned".encode()))
                    await session.reset(sid, spdy.PROTOCOL_ERROR)
                    continue
                pair[stype] = ch
                if len(pair) == 1:
                    nursery.start_soon(self._pair_timeout, pairs, rid)
                if len(pair) == 2:
                    del pairs[rid]
                    nursery.start_soon(self._forward, req.pod_sandbox_id, port,
                                       pair[protocol.STREAM_DATA], pair[protocol.STREAM_ERROR])
            nursery.cancel_scope.cancel()

    async def _pair_timeout(self, pairs: dict[str, dict[str, Channel]], rid: str) -> None:
        await trio.sleep(self.config.stream_creation_timeout)
        pair = pairs.pop(rid, None)
        if pair is not None:
            err = pair.get(protocol.STREAM_ERROR)
            if err is not None:
                await _quietly(err.send_all(
                    f"timed out waiting for streams of request {rid}".encode()))
                await _quietly(err.send_eof())

    async def _forward(self, sandbox: str, port: int, data: Channel, error: Channel) -> None:
        try:
            await self.runtime.port_forward(sandbox, port, data)
        except (errdefs.BerthError, OSError, ChannelClosed) as exc:
            await _quietly(error.send_all(
                f"error forwarding port {port} to pod {sandbox}: {exc}".encode()))
        except Exception as exc:  # noqa: BLE001 - one forward's failure ends only it
            _log.warning("port-forward failed", id=sandbox, port=port, error=repr(exc))
            await _quietly(error.send_all(
                f"error forwarding port {port} to pod {sandbox}: {exc}".encode()))
        finally:
            await _quietly(data.send_eof())
            await _quietly(error.send_eof())

    # -- WebSocket --

    async def _websocket(self, stream: trio.abc.Stream, head: _Head, kind: str, req: Any,
                         query: dict[str, list[str]]) -> None:
        ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        ws.receive_data(head.raw + head.rest)
        request = next((e for e in ws.events() if isinstance(e, wse.Request)), None)
        if request is None:
            raise _HttpError(400, "Bad Request", "unable to upgrade: not a websocket request")
        server_protos = (protocol.WS_PORTFORWARD_PROTOCOLS if kind == "portforward"
                         else protocol.WS_REMOTECOMMAND_PROTOCOLS)
        if request.subprotocols:
            chosen = protocol.negotiate(request.subprotocols, server_protos)
            if chosen is None:
                await stream.send_all(ws.send(wse.RejectConnection(status_code=400)))
                return
        else:
            chosen = None  # no subprotocol: the binary channel framing of channel.k8s.io
        framing = chosen or protocol.WS_V1
        if kind == "portforward":
            ports = list(req.ports)
            if not ports:
                try:
                    ports = [protocol.parse_port(p) for v in query.get("port", [])
                             for p in v.split(",")]
                except protocol.StreamProtocolError as exc:
                    await stream.send_all(ws.send(wse.RejectConnection(status_code=400)))
                    _log.info("port-forward refused", error=str(exc))
                    return
            if not ports:
                await stream.send_all(ws.send(wse.RejectConnection(status_code=400)))
                return
            if chosen == "portforward.k8s.io":
                framing = protocol.WS_V4
            nch, readable = 2 * len(ports), {2 * i for i in range(len(ports))}
        else:
            opts = StreamOptions(req.stdin, req.stdout, req.stderr, req.tty)
            nch = 5
            readable = {protocol.CH_RESIZE} | ({protocol.CH_STDIN} if opts.stdin else set())
        await stream.send_all(ws.send(wse.AcceptConnection(subprotocol=chosen)))
        session = WebSocketSession(stream, ws, framing, nch, readable)

        async def body() -> None:
            if kind == "portforward":
                await self._ws_port_forward(session, req, ports)
            else:
                await self._ws_remotecommand(session, kind, req, opts)
            await session.close()
            with trio.move_on_after(CLOSE_GRACE):
                await session.closed.wait()

        await self._serve_session(session, body())

    async def _ws_remotecommand(self, session: WebSocketSession, kind: str, req: Any,
                                opts: StreamOptions) -> None:
        ch = session.channels
        # The kubelet's "connection is up" signal: an empty message on the lowest channel the
        # server writes.
        first = (protocol.CH_STDOUT if opts.stdout else protocol.CH_STDERR if opts.stderr
                 else protocol.CH_ERROR)
        await _quietly(session.send_raw(first, b""))
        streams = ExecStreams(tty=opts.tty,
                              stdin=ch[protocol.CH_STDIN] if opts.stdin else None,
                              stdout=ch[protocol.CH_STDOUT] if opts.stdout else None,
                              stderr=ch[protocol.CH_STDERR] if opts.stderr else None)
        if session.protocol in (protocol.WS_V1, protocol.WS_V1_BASE64) and streams.stdin:
            pass  # these clients cannot half-close stdin: it ends with the connection
        await self._remotecommand(kind, req, streams, ch[protocol.CH_RESIZE],
                                  ch[protocol.CH_ERROR], session.protocol, session.closed)

    async def _ws_port_forward(self, session: WebSocketSession, req: PortForwardRequest,
                               ports: list[int]) -> None:
        for i, port in enumerate(ports):
            await session.send_raw(2 * i, protocol.ws_port_prefix(port))
            await session.send_raw(2 * i + 1, protocol.ws_port_prefix(port))
        async with trio.open_nursery() as nursery:
            for i, port in enumerate(ports):
                nursery.start_soon(self._forward, req.pod_sandbox_id, port,
                                   session.channels[2 * i], session.channels[2 * i + 1])


async def _pump_resize(src: Channel, dst: trio.MemorySendChannel[TerminalSize]) -> None:
    decoder = protocol.ResizeDecoder()
    async with dst:
        while True:
            data = await src.receive_some()
            if not data:
                return
            try:
                sizes = decoder.feed(data)
            except protocol.StreamProtocolError as exc:
                _log.info("resize stream ignored from here on", error=str(exc))
                return
            for size in sizes:
                await dst.send(size)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except (ChannelClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    with trio.move_on_after(5):
        await _quietly(stream.send_all(data))


__all__ = [
    "AttachRequest", "ExecRequest", "ExecStreams", "PortForwardRequest", "StreamRuntime",
    "StreamServer", "StreamServerConfig", "TokenCache", "load_key_pair",
]
