"""SPDY/3.1 framing, sans-io: bytes in, events out (as h11 and h2 do).

Every kubelet still upgrades ``kubectl exec``/``attach``/``port-forward`` connections to
SPDY/3.1, and no maintained Python library speaks it, so this is berth's own codec. Facts
from the SPDY/3.1 draft:

* A control frame starts with the control bit set, a 15-bit version (3), a 16-bit type,
  8 bits of flags and a 24-bit length; a data frame starts with a clear bit, a 31-bit
  stream id, flags and a 24-bit length. All big-endian.
* SYN_STREAM, SYN_REPLY and HEADERS carry a header block compressed with zlib against the
  SPDY/3 dictionary; each direction of a session is ONE zlib stream, flushed (sync flush)
  after every block, so a block can only be inflated in order.
* An inflated block is a 32-bit pair count, then per pair a 32-bit length and name and a
  32-bit length and value (several values joined by NUL). Names are lowercase.
* Flow control: per-stream windows (64 KiB unless SETTINGS_INITIAL_WINDOW_SIZE says
  otherwise) and, new in 3.1, a session window (64 KiB) moved by WINDOW_UPDATE on stream 0.

The Go implementation every kubelet and kubectl use (moby/spdystream) neither sends
WINDOW_UPDATE nor honours ours: it relies on TCP for back-pressure. So the send windows are
only enforced once the peer has shown it does flow control (its first WINDOW_UPDATE), and a
peer that overruns our receive window is not punished; the owner bounds its buffers by
reading the socket only as fast as its streams drain.

Bounded input: a control frame may not be longer than ``max_control_length`` (it is held
whole), data frames are passed on in pieces as they arrive (never held whole), and a header
block may not inflate past ``max_header_bytes`` (a zip bomb fails with
:class:`HeaderBlockTooLarge` after inflating at most that much).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9
CREDENTIAL = 10

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR = 0x01

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
UNSUPPORTED_VERSION = 4
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9
FRAME_TOO_LARGE = 11

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

# SETTINGS ids.
SETTINGS_MAX_CONCURRENT_STREAMS = 4
SETTINGS_INITIAL_WINDOW_SIZE = 7

DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 0x7FFFFFFF
MAX_FRAME_LENGTH = 0xFFFFFF  # 24-bit length field
DEFAULT_MAX_CONTROL_LENGTH = 64 * 1024
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
_HEADER_LENGTH = 8
_STREAM_MASK = 0x7FFFFFFF

_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language"
    " accept-ranges age allow authorization cache-control connection content-base"
    " content-encoding content-language content-length content-location content-md5"
    " content-range content-type date etag expect expires from host if-match"
    " if-modified-since if-none-match if-range if-unmodified-since last-modified location"
    " max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after"
    " server te trailer transfer-encoding upgrade user-agent vary via warning"
    " www-authenticate method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive",
             "origin"]
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504"
    "505203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon,"
    " Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
# The SPDY/3 zlib dictionary (draft 3, section 2.6.10.1): length-prefixed common header
# words, then a run of status codes, reasons, dates and media types. 1423 bytes; its
# Adler-32 (0xe3c6a7c2) is the DICTID in every SPDY/3 header block's zlib header.
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()

Headers = list[tuple[str, str]]


class ProtocolError(Exception):
    """Bytes that are not valid SPDY/3.1; the session cannot go on."""


class FrameTooLarge(ProtocolError):
    """A control frame longer than the limit."""


class HeaderBlockTooLarge(ProtocolError):
    """A header block that inflates past the limit (a zip bomb, or just too big)."""


class HeaderBlockError(ProtocolError):
    """A header block that does not inflate or does not parse."""


# Events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOpened:
    """SYN_STREAM from the peer."""

    stream_id: int
    headers: Headers
    fin: bool = False
    unidirectional: bool = False
    associated_to: int = 0
    priority: int = 0


@dataclass(frozen=True)
class StreamReplied:
    """SYN_REPLY to a stream we opened."""

    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class HeadersReceived:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True)
class DataReceived:
    """A piece of a data frame; ``fin`` is set on the last piece of a FIN frame.

    ``flow_controlled_length`` counts toward the receive windows: hand it back with
    :meth:`Connection.acknowledge_received_data` once the bytes are consumed.
    """

    stream_id: int
    data: bytes
    fin: bool = False

    @property
    def flow_controlled_length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class StreamReset:
    stream_id: int
    status: int


@dataclass(frozen=True)
class SettingsReceived:
    settings: dict[int, int]
    clear: bool = False


@dataclass(frozen=True)
class PingReceived:
    """A ping the peer started; the connection has queued the echo already."""

    ping_id: int


@dataclass(frozen=True)
class PingAcknowledged:
    ping_id: int


@dataclass(frozen=True)
class GoAwayReceived:
    last_stream_id: int
    status: int


@dataclass(frozen=True)
class WindowUpdated:
    """The peer opened a send window (stream 0: the session's)."""

    stream_id: int
    delta: int


Event = (StreamOpened | StreamReplied | HeadersReceived | DataReceived | StreamReset
         | SettingsReceived | PingReceived | PingAcknowledged | GoAwayReceived | WindowUpdated)


# Header blocks ----------------------------------------------------------------------------


def encode_header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """The uncompressed block; names are lowercased (the draft requires it)."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.lower(), []).append(value)
    out = [struct.pack(">I", len(merged))]
    for name, values in merged.items():
        n = name.encode()
        v = "\0".join(values).encode()
        out += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
    return b"".join(out)


def decode_header_block(block: bytes) -> Headers:
    """Parse an inflated block; a value with NULs is several values of one name."""
    end = len(block)
    if end < 4:
        raise HeaderBlockError("header block shorter than its pair count")
    (count,) = struct.unpack_from(">I", block, 0)
    # Each pair takes at least 8 bytes: a count that cannot fit is a lie, not a loop bound.
    if count * 8 > end - 4:
        raise HeaderBlockError(f"header block claims {count} pairs in {end} bytes")
    pos = 4
    out: Headers = []
    seen: set[str] = set()
    for _ in range(count):
        name, pos = _string(block, pos, end)
        value, pos = _string(block, pos, end)
        if not name:
            raise HeaderBlockError("empty header name")
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            raise HeaderBlockError("header name is not ASCII") from None
        if text != text.lower():
            raise HeaderBlockError(f"header name {text!r} is not lowercase")
        if text in seen:
            raise HeaderBlockError(f"duplicate header name {text!r}")
        seen.add(text)
        for part in value.split(b"\0"):
            out.append((text, part.decode("utf-8", "replace")))
    if pos != end:
        raise HeaderBlockError("trailing bytes after the header block")
    return out


def _string(block: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 4 > end:
        raise HeaderBlockError("header block truncated")
    (n,) = struct.unpack_from(">I", block, pos)
    pos += 4
    if n > end - pos:
        raise HeaderBlockError("header string runs past the block")
    return bytes(block[pos:pos + n]), pos + n


class HeaderCompressor:
    """One direction's zlib stream: every block is sync-flushed so the peer can inflate it."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                   zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def compress(self, headers: Iterable[tuple[str, str]]) -> bytes:
        raw = encode_header_block(headers)
        return self._z.compress(raw) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The peer's zlib stream, inflated at most ``limit`` bytes per block."""

    def __init__(self, limit: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        self._z = zlib.decompressobj(15, DICTIONARY)
        self.limit = limit

    def decompress(self, data: bytes) -> Headers:
        try:
            # One byte more than the limit tells "exactly at the limit" from "over it"
            # without ever inflating more than that.
            out = self._z.decompress(data, self.limit + 1)
        except zlib.error as exc:
            raise HeaderBlockError(f"header block does not inflate: {exc}") from None
        if len(out) > self.limit or self._z.unconsumed_tail:
            raise HeaderBlockTooLarge(
                f"header block inflates past {self.limit} bytes")
        if self._z.eof:
            # A block that ends the zlib stream leaves nothing to inflate the next one.
            raise HeaderBlockError("header block ends the zlib stream")
        return decode_header_block(out)


# Encoding ---------------------------------------------------------------------------------


def control_frame(frame_type: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_LENGTH:
        raise ValueError("control frame payload too long")
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    if len(data) > MAX_FRAME_LENGTH:
        raise ValueError("data frame payload too long")
    flags = FLAG_FIN if fin else 0
    return struct.pack(">II", stream_id & _STREAM_MASK, (flags << 24) | len(data)) + data


# The connection ---------------------------------------------------------------------------


@dataclass
class _Stream:
    send_window: int
    recv_window: int
    local_closed: bool = False
    remote_closed: bool = False
    replied: bool = False
    unacked: int = 0


@dataclass
class _Pending:
    """The frame being read: its 8-byte header parsed, ``remaining`` payload bytes to go."""

    control: bool
    type_or_stream: int
    flags: int
    remaining: int
    payload: bytearray = field(default_factory=bytearray)


class Connection:
    """One SPDY/3.1 session's state, either side.

    Feed received bytes to :meth:`receive_data`, which returns events; send with the
    ``open_stream``/``reply``/``send_data``/... methods and write out
    :meth:`data_to_send`. A :class:`ProtocolError` from :meth:`receive_data` ends the
    session: a GOAWAY with the protocol error status is queued before it is raised.
    """

    def __init__(self, client: bool, *, max_control_length: int = DEFAULT_MAX_CONTROL_LENGTH,
                 max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                 max_streams: int = 1000) -> None:
        self.client = client
        self.max_control_length = max_control_length
        self.max_streams = max_streams
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor(max_header_bytes)
        self._out = bytearray()
        self._in = bytearray()
        self._pending: _Pending | None = None
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 1 if client else 2
        self._next_ping_id = 1 if client else 2
        self._last_peer_stream = 0
        self._initial_send_window = DEFAULT_WINDOW
        self._initial_recv_window = DEFAULT_WINDOW
        self.session_send_window = DEFAULT_WINDOW
        self._session_unacked = 0
        # Whether the peer does flow control at all (see the module docstring).
        self.peer_flow_control = False
        self.goaway_received = False
        self.goaway_sent = False
        self.closed = False

    # -- output --

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def open_stream(self, headers: Sequence[tuple[str, str]], fin: bool = False,
                    priority: int = 0) -> int:
        if self.goaway_received or self.goaway_sent:
            raise ProtocolError("session is going away")
        sid = self._next_stream_id
        if sid > _STREAM_MASK:
            raise ProtocolError("stream ids exhausted")
        self._next_stream_id += 2
        block = self._compressor.compress(headers)
        payload = struct.pack(">IIBB", sid, 0, (priority & 7) << 5, 0) + block
        self._out += control_frame(SYN_STREAM, FLAG_FIN if fin else 0, payload)
        self._streams[sid] = _Stream(self._initial_send_window, self._initial_recv_window,
                                     local_closed=fin)
        return sid

    def reply(self, stream_id: int, headers: Sequence[tuple[str, str]] = (),
              fin: bool = False) -> None:
        st = self._stream(stream_id)
        if st.replied:
            raise ProtocolError(f"stream {stream_id} already replied to")
        st.replied = True
        block = self._compressor.compress(headers)
        self._out += control_frame(SYN_REPLY, FLAG_FIN if fin else 0,
                                   struct.pack(">I", stream_id) + block)
        if fin:
            self._close_local(stream_id)

    def send_headers(self, stream_id: int, headers: Sequence[tuple[str, str]],
                     fin: bool = False) -> None:
        self._stream(stream_id)
        block = self._compressor.compress(headers)
        self._out += control_frame(HEADERS, FLAG_FIN if fin else 0,
                                   struct.pack(">I", stream_id) + block)
        if fin:
            self._close_local(stream_id)

    def send_window(self, stream_id: int) -> int:
        """How many bytes may go out on the stream now (unbounded for non-flow-controllers)."""
        st = self._stream(stream_id)
        if not self.peer_flow_control:
            return MAX_WINDOW
        return max(0, min(st.send_window, self.session_send_window))

    def send_data(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        st = self._stream(stream_id)
        if st.local_closed:
            raise ProtocolError(f"stream {stream_id} is closed for sending")
        if self.peer_flow_control and len(data) > self.send_window(stream_id):
            raise ProtocolError(f"{len(data)} bytes exceed stream {stream_id}'s send window")
        st.send_window -= len(data)
        self.session_send_window -= len(data)
        view = memoryview(data)
        # A frame carries at most 24 bits of length; big writes are split.
        while len(view) > MAX_FRAME_LENGTH:
            self._out += data_frame(stream_id, bytes(view[:MAX_FRAME_LENGTH]))
            view = view[MAX_FRAME_LENGTH:]
        self._out += data_frame(stream_id, bytes(view), fin)
        if fin:
            self._close_local(stream_id)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: an empty data frame with FIN."""
        self.send_data(stream_id, b"", fin=True)

    def reset_stream(self, stream_id: int, status: int = CANCEL) -> None:
        self._out += control_frame(RST_STREAM, 0, struct.pack(">II", stream_id & _STREAM_MASK,
                                                             status))
        self._streams.pop(stream_id, None)

    def ping(self) -> int:
        pid = self._next_ping_id
        self._next_ping_id = (self._next_ping_id + 2) & 0xFFFFFFFF
        self._out += control_frame(PING, 0, struct.pack(">I", pid))
        return pid

    def goaway(self, status: int = GOAWAY_OK) -> None:
        if not self.goaway_sent:
            self.goaway_sent = True
            self._out += control_frame(GOAWAY, 0, struct.pack(">II", self._last_peer_stream,
                                                              status))

    def update_settings(self, settings: dict[int, int]) -> None:
        entries = b"".join(struct.pack(">II", k & 0xFFFFFF, v) for k, v in settings.items())
        self._out += control_frame(SETTINGS, 0, struct.pack(">I", len(settings)) + entries)
        if SETTINGS_INITIAL_WINDOW_SIZE in settings:
            self._initial_recv_window = settings[SETTINGS_INITIAL_WINDOW_SIZE]

    def acknowledge_received_data(self, stream_id: int, length: int) -> None:
        """Open the receive windows again for ``length`` consumed bytes.

        Updates are batched until half a window is consumed, as most implementations do.
        """
        if length <= 0:
            return
        self._session_unacked += length
        if self._session_unacked >= DEFAULT_WINDOW // 2:
            self._out += control_frame(WINDOW_UPDATE, 0,
                                       struct.pack(">II", 0, self._session_unacked))
            self._session_unacked = 0
        st = self._streams.get(stream_id)
        if st is None or st.remote_closed:
            return
        st.unacked += length
        if st.unacked >= self._initial_recv_window // 2:
            self._out += control_frame(WINDOW_UPDATE, 0, struct.pack(">II", stream_id,
                                                                     st.unacked))
            st.recv_window += st.unacked
            st.unacked = 0

    # -- input --

    def receive_data(self, data: bytes | bytearray) -> list[Event]:
        if self.closed:
            raise ProtocolError("session is closed")
        self._in += data
        events: list[Event] = []
        try:
            while self._step(events):
                pass
        except ProtocolError:
            self.closed = True
            self.goaway(GOAWAY_PROTOCOL_ERROR)
            raise
        return events

    def _step(self, events: list[Event]) -> bool:
        p = self._pending
        if p is None:
            if len(self._in) < _HEADER_LENGTH:
                return False
            first, second = struct.unpack_from(">II", self._in, 0)
            del self._in[:_HEADER_LENGTH]
            flags, length = second >> 24, second & 0xFFFFFF
            if first & 0x80000000:
                version = (first >> 16) & 0x7FFF
                if version != VERSION:
                    raise ProtocolError(f"unsupported SPDY version {version}")
                if length > self.max_control_length:
                    raise FrameTooLarge(
                        f"control frame of {length} bytes exceeds {self.max_control_length}")
                p = _Pending(True, first & 0xFFFF, flags, length)
            else:
                p = _Pending(False, first & _STREAM_MASK, flags, length)
                self._begin_data(p.type_or_stream, length)
            self._pending = p
        if p.control:
            take = min(p.remaining, len(self._in))
            p.payload += self._in[:take]
            del self._in[:take]
            p.remaining -= take
            if p.remaining:
                return False
            self._pending = None
            self._control(p.type_or_stream, p.flags, bytes(p.payload), events)
            return True
        # Data is handed on as it comes: a 16 MB frame is never held whole.
        take = min(p.remaining, len(self._in))
        if take == 0 and p.remaining:
            return False
        chunk = bytes(self._in[:take])
        del self._in[:take]
        p.remaining -= take
        done = p.remaining == 0
        if done:
            self._pending = None
        fin = done and bool(p.flags & FLAG_FIN)
        st = self._streams.get(p.type_or_stream)
        if st is not None and (chunk or fin):
            st.recv_window -= len(chunk)
            events.append(DataReceived(p.type_or_stream, chunk, fin))
            if fin:
                self._close_remote(p.type_or_stream)
        return True

    def _begin_data(self, stream_id: int, length: int) -> None:
        if stream_id == 0:
            raise ProtocolError("data frame on stream 0")
        st = self._streams.get(stream_id)
        if st is not None and st.remote_closed:
            # Data after the peer's FIN: drop the stream, keep the session (the draft's
            # STREAM_ALREADY_CLOSED).
            self.reset_stream(stream_id, STREAM_ALREADY_CLOSED)
        elif st is None and not self._is_ours(stream_id) and stream_id > self._last_peer_stream:
            raise ProtocolError(f"data frame for stream {stream_id} never opened")

    def _is_ours(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.client

    def _control(self, ftype: int, flags: int, payload: bytes, events: list[Event]) -> None:
        n = len(payload)
        if ftype == SYN_STREAM:
            if n < 10:
                raise ProtocolError("SYN_STREAM too short")
            sid, assoc, pri = struct.unpack_from(">IIB", payload, 0)
            sid &= _STREAM_MASK
            # Always inflate: the zlib stream must stay in step even for a refused stream.
            headers = self._decompressor.decompress(payload[10:])
            if sid == 0 or self._is_ours(sid):
                raise ProtocolError(f"SYN_STREAM with invalid stream id {sid}")
            if sid <= self._last_peer_stream:
                raise ProtocolError(f"SYN_STREAM id {sid} not above {self._last_peer_stream}")
            self._last_peer_stream = sid
            if self.goaway_sent:
                self.reset_stream(sid, REFUSED_STREAM)
                return
            if len(self._streams) >= self.max_streams:
                self.reset_stream(sid, REFUSED_STREAM)
                return
            fin = bool(flags & FLAG_FIN)
            uni = bool(flags & FLAG_UNIDIRECTIONAL)
            self._streams[sid] = _Stream(self._initial_send_window, self._initial_recv_window,
                                         local_closed=uni, remote_closed=fin)
            events.append(StreamOpened(sid, headers, fin, uni, assoc & _STREAM_MASK, pri >> 5))
            if fin and uni:
                self._streams.pop(sid, None)
        elif ftype in (SYN_REPLY, HEADERS):
            if n < 4:
                raise ProtocolError("SYN_REPLY/HEADERS too short")
            sid = struct.unpack_from(">I", payload, 0)[0] & _STREAM_MASK
            headers = self._decompressor.decompress(payload[4:])
            st = self._streams.get(sid)
            if st is None:
                return  # late frame for a stream already gone: ignore
            fin = bool(flags & FLAG_FIN)
            if ftype == SYN_REPLY:
                events.append(StreamReplied(sid, headers, fin))
            else:
                events.append(HeadersReceived(sid, headers, fin))
            if fin:
                self._close_remote(sid)
        elif ftype == RST_STREAM:
            if n != 8:
                raise ProtocolError("RST_STREAM must be 8 bytes")
            sid, status = struct.unpack(">II", payload)
            sid &= _STREAM_MASK
            if self._streams.pop(sid, None) is not None:
                events.append(StreamReset(sid, status))
        elif ftype == SETTINGS:
            if n < 4:
                raise ProtocolError("SETTINGS too short")
            (count,) = struct.unpack_from(">I", payload, 0)
            if n != 4 + 8 * count:
                raise ProtocolError("SETTINGS length does not match its entry count")
            settings: dict[int, int] = {}
            for i in range(count):
                idf, value = struct.unpack_from(">II", payload, 4 + 8 * i)
                settings[idf & 0xFFFFFF] = value
            window = settings.get(SETTINGS_INITIAL_WINDOW_SIZE)
            if window is not None:
                if window > MAX_WINDOW:
                    raise ProtocolError("initial window size above 2^31-1")
                delta = window - self._initial_send_window
                self._initial_send_window = window
                for st in self._streams.values():
                    st.send_window += delta
            events.append(SettingsReceived(settings, bool(flags & FLAG_SETTINGS_CLEAR)))
        elif ftype == PING:
            if n != 4:
                raise ProtocolError("PING must be 4 bytes")
            (pid,) = struct.unpack(">I", payload)
            if (pid % 2 == 1) == self.client:
                events.append(PingAcknowledged(pid))
            else:
                self._out += control_frame(PING, 0, payload)
                events.append(PingReceived(pid))
        elif ftype == GOAWAY:
            if n != 8:
                raise ProtocolError("GOAWAY must be 8 bytes")
            last, status = struct.unpack(">II", payload)
            self.goaway_received = True
            events.append(GoAwayReceived(last & _STREAM_MASK, status))
        elif ftype == WINDOW_UPDATE:
            if n != 8:
                raise ProtocolError("WINDOW_UPDATE must be 8 bytes")
            sid, delta = struct.unpack(">II", payload)
            sid &= _STREAM_MASK
            delta &= _STREAM_MASK
            if delta == 0:
                raise ProtocolError("WINDOW_UPDATE with a zero delta")
            self.peer_flow_control = True
            if sid == 0:
                self.session_send_window += delta
                if self.session_send_window > MAX_WINDOW:
                    raise ProtocolError("session window above 2^31-1")
            else:
                st = self._streams.get(sid)
                if st is None:
                    return
                st.send_window += delta
                if st.send_window > MAX_WINDOW:
                    self.reset_stream(sid, FLOW_CONTROL_ERROR)
                    events.append(StreamReset(sid, FLOW_CONTROL_ERROR))
                    return
            events.append(WindowUpdated(sid, delta))
        # Unknown control types (CREDENTIAL, NOOP of older drafts, anything newer) are
        # ignored, as the draft asks.

    # -- stream bookkeeping --

    def _stream(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None:
            raise ProtocolError(f"no open stream {stream_id}")
        return st

    def stream_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _close_local(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is None:
            return
        st.local_closed = True
        if st.remote_closed:
            del self._streams[stream_id]

    def _close_remote(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is None:
            return
        st.remote_closed = True
        if st.local_closed:
            del self._streams[stream_id]
