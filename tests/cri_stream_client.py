"""A CRI streaming client for tests (trio), written from the protocol facts, not the server.

SPDY framing here is its own small implementation (frame headers, one zlib stream per
direction with the SPDY/3 dictionary); it shares only the dictionary bytes with the server,
and tests/unit/test_cri_streaming_spdy.py pins those to the draft's length and Adler-32.
WebSocket goes through wsproto's client side.
"""

from __future__ import annotations

import base64
import json
import ssl
import struct
import subprocess
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
import wsproto
import wsproto.events as wse

from berth.plugins.cri.streaming.spdy import DICTIONARY


class StreamClientError(Exception):
    pass


def key_pair(folder: Path, name: str, san: str = "IP:127.0.0.1",
             passphrase: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate and its key, made by openssl (PEM files in ``folder``)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    secret = ["-passout", f"pass:{passphrase}"] if passphrase else ["-nodes"]
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert),
                    *secret], check=True, capture_output=True)
    return cert, key


def trusting(cert: Path) -> ssl.SSLContext:
    """A client context that trusts that certificate and nothing else, names checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cert)
    return ctx


@dataclass
class HttpReply:
    status: int
    headers: dict[str, list[str]]
    body: bytes


async def _connect(url: str, tls: ssl.SSLContext | None = None
                   ) -> tuple[trio.abc.Stream, urllib.parse.SplitResult]:
    """``tls``: the client's context for https (the default trusts any certificate, as the
    kubelet does not verify the runtime's)."""
    u = urllib.parse.urlsplit(url)
    sock = await trio.open_tcp_stream(u.hostname, u.port)
    if u.scheme == "https":
        ctx = tls
        if ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        stream: trio.abc.Stream = trio.SSLStream(sock, ctx, server_hostname=u.hostname)
        await stream.do_handshake()
        return stream, u
    return sock, u


async def _read_head(stream: trio.abc.Stream) -> tuple[HttpReply, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(4096)
        if not data:
            break
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/1.1 "):
        raise StreamClientError(f"no HTTP reply: {buf[:100]!r}")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return HttpReply(status, headers, b""), rest


async def http_request(url: str, headers: list[tuple[str, str]], method: str = "POST",
                       tls: ssl.SSLContext | None = None
                       ) -> tuple[HttpReply, trio.abc.Stream, bytes]:
    stream, u = await _connect(url, tls)
    path = u.path + (f"?{u.query}" if u.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}"] + [f"{k}: {v}" for k, v in headers]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    reply, rest = await _read_head(stream)
    if reply.status != 101:
        n = int(reply.headers.get("content-length", ["0"])[0])
        body = rest
        while len(body) < n:
            data = await stream.receive_some(4096)
            if not data:
                break
            body += data
        reply.body = body
    return reply, stream, rest


# SPDY client ----------------------------------------------------------------------------------


@dataclass
class _CStream:
    data: bytearray = field(default_factory=bytearray)
    fin: bool = False
    reset: bool = False
    replied: trio.Event = field(default_factory=trio.Event)
    changed: trio.Event = field(default_factory=trio.Event)


class SpdyClient:
    def __init__(self, stream: trio.abc.Stream, rest: bytes) -> None:
        self.stream = stream
        self._inbuf = bytearray(rest)
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                         DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._next = 1
        self.streams: dict[int, _CStream] = {}
        self.goaway = False
        self.eof = trio.Event()
        self._lock = trio.Lock()

    def _block(self, headers: list[tuple[str, str]]) -> bytes:
        raw = struct.pack(">I", len(headers))
        for k, v in headers:
            kb, vb = k.lower().encode(), v.encode()
            raw += struct.pack(">I", len(kb)) + kb + struct.pack(">I", len(vb)) + vb
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send_all(data)

    async def open(self, headers: list[tuple[str, str]], wait: bool = True) -> int:
        sid = self._next
        self._next += 2
        self.streams[sid] = _CStream()
        async with self._lock:
            payload = struct.pack(">IIBB", sid, 0, 0, 0) + self._block(headers)
            await self.stream.send_all(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)
        if wait:
            await self.streams[sid].replied.wait()
        return sid

    async def write(self, sid: int, data: bytes, fin: bool = False) -> None:
        view = memoryview(data)
        while True:
            chunk, view = bytes(view[:32768]), view[32768:]
            last = not view
            flags = 1 if (fin and last) else 0
            await self._write(struct.pack(">II", sid, (flags << 24) | len(chunk)) + chunk)
            if last:
                return

    async def close(self, sid: int) -> None:
        await self.write(sid, b"", fin=True)

    async def reset(self, sid: int) -> None:
        await self._write(struct.pack(">HHIII", 0x8003, 3, 8, sid, 5))

    async def run(self) -> None:
        try:
            while True:
                while self._parse():
                    pass
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                self._inbuf += data
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.eof.set()
            for st in self.streams.values():
                st.fin = True
                st.replied.set()
                st.changed.set()

    def _parse(self) -> bool:
        if len(self._inbuf) < 8:
            return False
        w1, w2 = struct.unpack_from(">II", self._inbuf)
        n = w2 & 0xFFFFFF
        if len(self._inbuf) < 8 + n:
            return False
        payload = bytes(self._inbuf[8:8 + n])
        del self._inbuf[:8 + n]
        flags = w2 >> 24
        if w1 & 0x80000000:
            ftype = w1 & 0xFFFF
            if ftype == 2:  # SYN_REPLY
                sid = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
                self._inflate.decompress(payload[4:])
                st = self.streams.get(sid)
                if st:
                    st.replied.set()
                    if flags & 1:
                        st.fin = True
                        st.changed.set()
            elif ftype == 3:  # RST_STREAM
                sid = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
                st = self.streams.get(sid)
                if st:
                    st.reset = st.fin = True
                    st.replied.set()
                    st.changed.set()
            elif ftype == 7:
                self.goaway = True
            elif ftype in (1, 8):
                self._inflate.decompress(payload[4 if ftype == 8 else 10:])
        else:
            st = self.streams.get(w1)
            if st:
                st.data += payload
                if flags & 1:
                    st.fin = True
                st.changed.set()
        return True

    async def read_until(self, sid: int, pred) -> bytes:  # noqa: ANN001
        st = self.streams[sid]
        while not pred(bytes(st.data)) and not st.fin:
            st.changed = trio.Event()
            await st.changed.wait()
        return bytes(st.data)

    async def read_all(self, sid: int) -> bytes:
        return await self.read_until(sid, lambda _: False)


@asynccontextmanager
async def spdy_connect(url: str, protocols: list[str], tls: ssl.SSLContext | None = None
                       ) -> AsyncIterator[tuple[SpdyClient, str]]:
    headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
    headers += [("X-Stream-Protocol-Version", p) for p in protocols]
    reply, stream, rest = await http_request(url, headers, tls=tls)
    if reply.status != 101:
        await stream.aclose()
        raise StreamClientError(f"upgrade refused: {reply.status} {reply.body!r}")
    client = SpdyClient(stream, rest)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        try:
            yield client, reply.headers["x-stream-protocol-version"][0]
        finally:
            nursery.cancel_scope.cancel()
            # Shielded: a checkpoint here, in the scope just cancelled, would raise
            # Cancelled over whatever the body raised, and the nursery would swallow it.
            with trio.CancelScope(shield=True):
                await stream.aclose()


@dataclass
class CommandResult:
    stdout: bytes
    stderr: bytes
    status: dict | None
    error_text: bytes = b""

    @property
    def exit_code(self) -> int:
        if self.status is None:
            raise StreamClientError(f"no status: {self.error_text!r}")
        if self.status.get("status") == "Success":
            return 0
        for c in (self.status.get("details") or {}).get("causes", []):
            if c.get("reason") == "ExitCode":
                return int(c["message"])
        raise StreamClientError(f"command failed: {self.status}")


class RemoteCommand:
    """Interactive handle over SPDY or WebSocket: the same calls for both."""

    async def send_stdin(self, data: bytes) -> None:
        raise NotImplementedError

    async def close_stdin(self) -> None:
        raise NotImplementedError

    async def resize(self, width: int, height: int) -> None:
        raise NotImplementedError

    async def read_stdout_until(self, needle: bytes) -> bytes:
        raise NotImplementedError

    async def finish(self) -> CommandResult:
        raise NotImplementedError


class SpdyRemoteCommand(RemoteCommand):
    def __init__(self, c: SpdyClient, ids: dict[str, int]) -> None:
        self.c = c
        self.ids = ids

    async def send_stdin(self, data: bytes) -> None:
        await self.c.write(self.ids["stdin"], data)

    async def close_stdin(self) -> None:
        await self.c.close(self.ids["stdin"])

    async def resize(self, width: int, height: int) -> None:
        await self.c.write(self.ids["resize"],
                           json.dumps({"Width": width, "Height": height}).encode())

    async def read_stdout_until(self, needle: bytes) -> bytes:
        return await self.c.read_until(self.ids["stdout"], lambda d: needle in d)

    async def finish(self) -> CommandResult:
        out = await self.c.read_all(self.ids["stdout"]) if "stdout" in self.ids else b""
        err = await self.c.read_all(self.ids["stderr"]) if "stderr" in self.ids else b""
        raw = await self.c.read_all(self.ids["error"])
        status = json.loads(raw) if raw.startswith(b"{") else None
        return CommandResult(out, err, status, raw)


@asynccontextmanager
async def spdy_remotecommand(url: str, *, stdin: bool = False, stdout: bool = True,
                             stderr: bool = True, tty: bool = False,
                             protocols: list[str] | None = None,
                             tls: ssl.SSLContext | None = None
                             ) -> AsyncIterator[SpdyRemoteCommand]:
    async with spdy_connect(url, protocols or ["v4.channel.k8s.io"], tls) as (c, _proto):
        ids = {"error": await c.open([("streamType", "error")])}
        wanted = [n for n, on in (("stdin", stdin), ("stdout", stdout),
                                  ("stderr", stderr and not tty), ("resize", tty)) if on]
        for name in wanted:
            ids[name] = await c.open([("streamType", name)])
        yield SpdyRemoteCommand(c, ids)


async def spdy_exec(url: str, stdin: bytes | None = None, tls: ssl.SSLContext | None = None,
                    **kw: bool) -> CommandResult:
    async with spdy_remotecommand(url, stdin=stdin is not None, tls=tls, **kw) as rc:
        if stdin is not None:
            await rc.send_stdin(stdin)
            await rc.close_stdin()
        return await rc.finish()


async def spdy_port_forward(c: SpdyClient, port: int, request_id: int, payload: bytes
                            ) -> tuple[bytes, bytes]:
    """One forwarded connection: send payload, half-close, read all back and the errors."""
    hdr = [("port", str(port)), ("requestID", str(request_id))]
    err = await c.open([("streamType", "error")] + hdr)
    data = await c.open([("streamType", "data")] + hdr)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.write, data, payload, True)
        got = await c.read_all(data)
    errors = await c.read_all(err)
    return got, errors


# WebSocket client -----------------------------------------------------------------------------


class WsClient:
    def __init__(self, stream: trio.abc.Stream, ws: wsproto.WSConnection, proto: str,
                 nch: int) -> None:
        self.stream = stream
        self.ws = ws
        self.proto = proto
        self.bufs = [bytearray() for _ in range(max(nch, 1))]
        self.closed_ch: set[int] = set()
        self.changed = trio.Event()
        self.closed = trio.Event()
        self.close_code: int | None = None
        self._lock = trio.Lock()
        self._cur: bytearray = bytearray()
        self._text: str = ""
        self.messages: list[tuple[int, bytes]] = []

    async def send(self, ch: int, data: bytes) -> None:
        if "base64" in self.proto:
            ev: wse.Event = wse.TextMessage(chr(ord("0") + ch) + base64.b64encode(data).decode())
        else:
            ev = wse.BytesMessage(bytes([ch]) + data)
        async with self._lock:
            await self.stream.send_all(self.ws.send(ev))

    async def send_close_signal(self, ch: int) -> None:
        async with self._lock:
            await self.stream.send_all(self.ws.send(wse.BytesMessage(bytes([255, ch]))))

    async def run(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                self.ws.receive_data(data or None)
                for ev in self.ws.events():
                    if isinstance(ev, wse.BytesMessage):
                        self._cur += ev.data
                        if ev.message_finished:
                            self._deliver(self._cur[0], bytes(self._cur[1:]))
                            self._cur = bytearray()
                    elif isinstance(ev, wse.TextMessage):
                        self._text += ev.data
                        if ev.message_finished:
                            self._deliver(ord(self._text[0]) - 48,
                                          base64.b64decode(self._text[1:]))
                            self._text = ""
                    elif isinstance(ev, wse.CloseConnection):
                        self.close_code = ev.code
                        try:
                            async with self._lock:
                                await self.stream.send_all(self.ws.send(ev.response()))
                        except Exception:  # noqa: BLE001
                            pass
                        return
                    elif isinstance(ev, wse.Ping):
                        async with self._lock:
                            await self.stream.send_all(self.ws.send(ev.response()))
                if not data:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed.set()
            self.changed.set()

    def _deliver(self, ch: int, data: bytes) -> None:
        self.messages.append((ch, data))
        if ch == 255:
            self.closed_ch.add(data[0])
        elif ch < len(self.bufs):
            self.bufs[ch] += data
        self.changed.set()

    async def read_until(self, ch: int, pred) -> bytes:  # noqa: ANN001
        while not pred(bytes(self.bufs[ch])) and not self.closed.is_set() and (
                ch not in self.closed_ch):
            self.changed = trio.Event()
            await self.changed.wait()
        return bytes(self.bufs[ch])

    async def read_all(self, ch: int) -> bytes:
        return await self.read_until(ch, lambda _: False)


@asynccontextmanager
async def ws_connect(url: str, protocols: list[str], nch: int = 5,
                     tls: ssl.SSLContext | None = None) -> AsyncIterator[WsClient]:
    stream, u = await _connect(url, tls)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    target = u.path + (f"?{u.query}" if u.query else "")
    await stream.send_all(ws.send(wse.Request(host=u.netloc, target=target,
                                              subprotocols=protocols)))
    accepted: str | None = None
    while accepted is None:
        data = await stream.receive_some(65536)
        if not data:
            raise StreamClientError("connection closed during the websocket handshake")
        ws.receive_data(data)
        for ev in ws.events():
            if isinstance(ev, wse.AcceptConnection):
                accepted = ev.subprotocol or ""
                break
            if isinstance(ev, wse.RejectConnection):
                await stream.aclose()
                raise StreamClientError(f"websocket refused: {ev.status_code}")
    client = WsClient(stream, ws, accepted or "channel.k8s.io", nch)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
            # Shielded: a checkpoint here, in the scope just cancelled, would raise
            # Cancelled over whatever the body raised, and the nursery would swallow it.
            with trio.CancelScope(shield=True):
                await stream.aclose()


class WsRemoteCommand(RemoteCommand):
    def __init__(self, c: WsClient, stdout: bool, stderr: bool) -> None:
        self.c = c
        self.has_out = stdout
        self.has_err = stderr

    async def send_stdin(self, data: bytes) -> None:
        await self.c.send(0, data)

    async def close_stdin(self) -> None:
        await self.c.send_close_signal(0)

    async def resize(self, width: int, height: int) -> None:
        await self.c.send(4, json.dumps({"Width": width, "Height": height}).encode())

    async def read_stdout_until(self, needle: bytes) -> bytes:
        return await self.c.read_until(1, lambda d: needle in d)

    async def finish(self) -> CommandResult:
        await self.c.closed.wait()
        raw = bytes(self.c.bufs[3])
        status = json.loads(raw) if raw.startswith(b"{") else None
        return CommandResult(bytes(self.c.bufs[1]), bytes(self.c.bufs[2]), status, raw)


@asynccontextmanager
async def ws_remotecommand(url: str, protocol: str = "v5.channel.k8s.io", *,
                           stdout: bool = True, stderr: bool = True,
                           tls: ssl.SSLContext | None = None
                           ) -> AsyncIterator[WsRemoteCommand]:
    async with ws_connect(url, [protocol], tls=tls) as c:
        yield WsRemoteCommand(c, stdout, stderr)


async def ws_exec(url: str, protocol: str = "v5.channel.k8s.io", stdin: bytes | None = None,
                  tls: ssl.SSLContext | None = None) -> CommandResult:
    async with ws_remotecommand(url, protocol, tls=tls) as rc:
        if stdin is not None:
            await rc.send_stdin(stdin)
            await rc.close_stdin()
        return await rc.finish()
