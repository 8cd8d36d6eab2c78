"""HTTP/2 for berthd's gRPC server: libnghttp2's server session, through ctypes.

nghttp2 is sans-io like h2 (bytes in, callbacks and bytes out, no I/O of its own) and
does in C what h2 does in Python: one unary call costs ~18 µs here against h2's ~90
(``benchmarks/README.md``), and berthd makes ~40 of them per ``ctr run``. Only the
library's public C API is used (``nghttp2.h``, soname 14, Debian's ``libnghttp2-14``).

``ServerSession`` offers what ``connection.Connection`` needs and nothing more:

- ``receive(data)`` feeds bytes and returns events, tuples ``(kind, stream_id, value)``
  collected while nghttp2 parsed (nothing is called back into the connection from
  inside the library);
- answers are queued with ``send_headers``/``send_data``/``reply``/``reset_stream``
  and leave, in the order given per stream, through ``data_to_send``;
- flow control: received bytes are handed back with ``consume`` (no automatic window
  updates, so a slow reader holds its window), and ``send_window`` is what a stream
  may still queue: the peer's windows less what is queued and not yet framed.

Data leaves through one data provider per stream that pulls from the stream's queue;
trailers (and a reset that must follow them) wait in the queue behind the data, since
nghttp2 sends HEADERS and RST_STREAM ahead of pending DATA otherwise.
"""

from __future__ import annotations

import ctypes
import enum
import weakref
from collections.abc import Sequence

Headers = Sequence[tuple[bytes, bytes]]

SONAME = "libnghttp2.so.14"
MIN_VERSION = (1, 52, 0)


class ErrorCode(enum.IntEnum):
    """HTTP/2 error codes (RFC 9113 7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class SessionError(Exception):
    """nghttp2 refused a call (the stream or the connection is gone or broken)."""


# Event kinds returned by ``receive``.
REQUEST = 1  # value: the request's header list
DATA = 2  # value: (bytes, flow-controlled length)
END = 3  # the client ended its side
RESET = 4  # value: the error code of the client's RST_STREAM
WINDOW = 5  # a WINDOW_UPDATE (stream 0: the connection's)
SETTINGS = 6  # the client changed its SETTINGS
GOAWAY = 7  # value: the error code
CLOSED = 8  # nghttp2 closed a stream (value: the error code), the client's doing or its own

# nghttp2.h facts.
_FRAME_DATA, _FRAME_HEADERS, _FRAME_RST, _FRAME_SETTINGS = 0x0, 0x1, 0x3, 0x4
_FRAME_GOAWAY, _FRAME_WINDOW = 0x7, 0x8
_FLAG_END_STREAM, _FLAG_ACK = 0x1, 0x1
_DATA_FLAG_EOF, _DATA_FLAG_NO_END_STREAM = 0x1, 0x2
_ERR_DEFERRED = -508
_ERR_TEMPORAL_CALLBACK_FAILURE = -521
_ERR_CALLBACK_FAILURE = -902
_SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
_SETTINGS_MAX_FRAME_SIZE = 0x5
_SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# What berthd announces (the values h2 announced before: clients see no change).
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST_SIZE = 65536
MAX_FRAME_SIZE = 16384  # nghttp2's (and RFC 9113's) initial SETTINGS_MAX_FRAME_SIZE


class _FrameHd(ctypes.Structure):
    _fields_ = [("length", ctypes.c_size_t), ("stream_id", ctypes.c_int32),
                ("type", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("reserved", ctypes.c_uint8)]


class _RstOrGoaway(ctypes.Structure):
    # nghttp2_rst_stream is {hd; uint32 error_code}; nghttp2_goaway {hd; int32 last; uint32}.
    _fields_ = [("hd", _FrameHd), ("a", ctypes.c_uint32), ("b", ctypes.c_uint32)]


class _Nv(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p),
                ("namelen", ctypes.c_size_t), ("valuelen", ctypes.c_size_t),
                ("flags", ctypes.c_uint8)]


class _SettingsEntry(ctypes.Structure):
    _fields_ = [("settings_id", ctypes.c_int32), ("value", ctypes.c_uint32)]


class _Info(ctypes.Structure):
    _fields_ = [("age", ctypes.c_int), ("version_num", ctypes.c_int),
                ("version_str", ctypes.c_char_p), ("proto_str", ctypes.c_char_p)]


_vp = ctypes.c_void_p
_FRAME_CB = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.POINTER(_FrameHd), _vp)
# Names and values arrive as bytes made in C: nghttp2 NUL-terminates both, and its HTTP
# checks refuse a NUL inside one (the length is compared anyway).
_HEADER_CB = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, ctypes.c_char_p, ctypes.c_size_t,
                              ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint8, _vp)
_DATA_CB = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.c_uint8, ctypes.c_int32, _vp,
                            ctypes.c_size_t, _vp)
_CLOSE_CB = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.c_int32, ctypes.c_uint32, _vp)
_READ_CB = ctypes.CFUNCTYPE(ctypes.c_ssize_t, _vp, ctypes.c_int32, _vp, ctypes.c_size_t,
                            ctypes.POINTER(ctypes.c_uint32), _vp, _vp)


class _DataProvider(ctypes.Structure):
    _fields_ = [("source", ctypes.c_void_p), ("read_callback", _READ_CB)]


def _load() -> ctypes.CDLL:
    try:
        # PyDLL: the GIL stays held across a call (they are short), so the callbacks
        # nghttp2 makes inside one do not each take it back (~1 µs each, ~13 per call).
        lib = ctypes.PyDLL(SONAME)
    except OSError as e:
        raise ImportError(f"berthd's gRPC server needs {SONAME} (Debian: apt-get install "
                          f"libnghttp2-14): {e}") from None
    sigs: dict[str, tuple[object, list[object]]] = {
        "nghttp2_version": (ctypes.POINTER(_Info), [ctypes.c_int]),
        "nghttp2_session_callbacks_new": (ctypes.c_int, [ctypes.POINTER(_vp)]),
        "nghttp2_session_callbacks_del": (None, [_vp]),
        "nghttp2_session_callbacks_set_on_begin_headers_callback": (None, [_vp, _FRAME_CB]),
        "nghttp2_session_callbacks_set_on_header_callback": (None, [_vp, _HEADER_CB]),
        "nghttp2_session_callbacks_set_on_frame_recv_callback": (None, [_vp, _FRAME_CB]),
        "nghttp2_session_callbacks_set_on_data_chunk_recv_callback": (None, [_vp, _DATA_CB]),
        "nghttp2_session_callbacks_set_on_stream_close_callback": (None, [_vp, _CLOSE_CB]),
        "nghttp2_option_new": (ctypes.c_int, [ctypes.POINTER(_vp)]),
        "nghttp2_option_del": (None, [_vp]),
        "nghttp2_option_set_no_auto_window_update": (None, [_vp, ctypes.c_int]),
        "nghttp2_session_server_new2": (ctypes.c_int, [ctypes.POINTER(_vp), _vp, _vp, _vp]),
        "nghttp2_session_del": (None, [_vp]),
        "nghttp2_session_mem_recv": (ctypes.c_ssize_t, [_vp, ctypes.c_char_p,
                                                        ctypes.c_size_t]),
        "nghttp2_session_mem_send": (ctypes.c_ssize_t, [_vp, ctypes.POINTER(_vp)]),
        "nghttp2_session_want_read": (ctypes.c_int, [_vp]),
        "nghttp2_session_want_write": (ctypes.c_int, [_vp]),
        "nghttp2_submit_settings": (ctypes.c_int, [_vp, ctypes.c_uint8,
                                                   ctypes.POINTER(_SettingsEntry),
                                                   ctypes.c_size_t]),
        "nghttp2_session_set_local_window_size": (ctypes.c_int, [_vp, ctypes.c_uint8,
                                                                 ctypes.c_int32,
                                                                 ctypes.c_int32]),
        "nghttp2_submit_headers": (ctypes.c_int32, [_vp, ctypes.c_uint8, ctypes.c_int32,
                                                    _vp, ctypes.POINTER(_Nv),
                                                    ctypes.c_size_t, _vp]),
        "nghttp2_submit_response": (ctypes.c_int, [_vp, ctypes.c_int32, ctypes.POINTER(_Nv),
                                                   ctypes.c_size_t,
                                                   ctypes.POINTER(_DataProvider)]),
        "nghttp2_submit_data": (ctypes.c_int, [_vp, ctypes.c_uint8, ctypes.c_int32,
                                               ctypes.POINTER(_DataProvider)]),
        "nghttp2_submit_trailer": (ctypes.c_int, [_vp, ctypes.c_int32, ctypes.POINTER(_Nv),
                                                  ctypes.c_size_t]),
        "nghttp2_submit_rst_stream": (ctypes.c_int, [_vp, ctypes.c_uint8, ctypes.c_int32,
                                                     ctypes.c_uint32]),
        "nghttp2_session_terminate_session": (ctypes.c_int, [_vp, ctypes.c_uint32]),
        "nghttp2_session_resume_data": (ctypes.c_int, [_vp, ctypes.c_int32]),
        "nghttp2_session_consume": (ctypes.c_int, [_vp, ctypes.c_int32, ctypes.c_size_t]),
        "nghttp2_session_get_stream_remote_window_size": (ctypes.c_int32,
                                                          [_vp, ctypes.c_int32]),
        "nghttp2_session_get_remote_window_size": (ctypes.c_int32, [_vp]),
        "nghttp2_strerror": (ctypes.c_char_p, [ctypes.c_int]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


_lib = _load()


def version() -> tuple[int, int, int]:
    """The loaded libnghttp2's version."""
    num = _lib.nghttp2_version(0).contents.version_num
    return (num >> 16) & 0xFF, (num >> 8) & 0xFF, num & 0xFF


if version() < MIN_VERSION:
    raise ImportError(f"libnghttp2 {'.'.join(map(str, version()))} is older than "
                      f"{'.'.join(map(str, MIN_VERSION))}")


class HeaderBlock(tuple[tuple[bytes, bytes], ...]):
    """A header list sent over and over (a gRPC OK, say): its nghttp2 array is built
    once. nghttp2 copies what an array points to, so one array serves every send."""

    nva: ctypes.Array[_Nv]

    def __new__(cls, headers: Headers) -> HeaderBlock:
        block = super().__new__(cls, headers)
        block.nva = _build_nva(block)
        return block


def _nva(headers: Headers) -> ctypes.Array[_Nv]:
    return headers.nva if isinstance(headers, HeaderBlock) else _build_nva(headers)


def _build_nva(headers: Headers) -> ctypes.Array[_Nv]:
    # nghttp2 copies names and values (no NO_COPY flag): the array may go right after.
    arr = (_Nv * len(headers))()
    for i, (name, value) in enumerate(headers):
        nv = arr[i]
        nv.name = name
        nv.value = value
        nv.namelen = len(name)
        nv.valuelen = len(value)
    return arr


class _Out:
    """One stream's answer bytes not yet framed, and what must follow them."""

    __slots__ = ("buf", "active", "trailers", "reset")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.active = False  # a data provider is submitted and not at EOF
        self.trailers: ctypes.Array[_Nv] | None = None
        self.reset: int | None = None  # RST_STREAM code to send after the trailers


class ServerSession:
    """An nghttp2 server session (see the module's docstring)."""

    def __init__(self, *, connection_window: int) -> None:
        self._events: list[tuple[int, int, object]] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._requested: set[int] = set()  # streams whose request headers came
        self._out: dict[int, _Out] = {}
        self._queued = 0  # bytes in every _Out.buf
        self._error: BaseException | None = None
        # RST_STREAMs that must follow frames submitted but not yet framed: nghttp2 drops
        # a stream's queued HEADERS once an RST_STREAM for it is submitted.
        self._resets: list[tuple[int, int]] = []
        self._pending = b""  # framed by receive(), not yet taken by data_to_send()
        self.late_events: list[tuple[int, int, object]] = []
        self._callbacks = (
            _FRAME_CB(self._on_begin_headers), _HEADER_CB(self._on_header),
            _FRAME_CB(self._on_frame), _DATA_CB(self._on_data_chunk),
            _CLOSE_CB(self._on_close), _READ_CB(self._on_read),
        )
        self._provider = _DataProvider()
        self._provider.read_callback = self._callbacks[5]
        cbs, opt, session = _vp(), _vp(), _vp()
        if _lib.nghttp2_session_callbacks_new(ctypes.byref(cbs)):
            raise MemoryError("nghttp2_session_callbacks_new")
        try:
            _lib.nghttp2_session_callbacks_set_on_begin_headers_callback(cbs,
                                                                         self._callbacks[0])
            _lib.nghttp2_session_callbacks_set_on_header_callback(cbs, self._callbacks[1])
            _lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, self._callbacks[2])
            _lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
                cbs, self._callbacks[3])
            _lib.nghttp2_session_callbacks_set_on_stream_close_callback(cbs,
                                                                        self._callbacks[4])
            if _lib.nghttp2_option_new(ctypes.byref(opt)):
                raise MemoryError("nghttp2_option_new")
            try:
                _lib.nghttp2_option_set_no_auto_window_update(opt, 1)
                if _lib.nghttp2_session_server_new2(ctypes.byref(session), cbs, None, opt):
                    raise MemoryError("nghttp2_session_server_new2")
            finally:
                _lib.nghttp2_option_del(opt)
        finally:
            _lib.nghttp2_session_callbacks_del(cbs)
        self._session: int | None = session.value
        # The session is freed by close(), or with this object; the callbacks it calls
        # live as long as it does.
        self._finalizer = weakref.finalize(self, _lib.nghttp2_session_del, session.value)
        self._send_ptr = _vp()
        settings = (_SettingsEntry * 3)(
            _SettingsEntry(_SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
            _SettingsEntry(_SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
            _SettingsEntry(_SETTINGS_MAX_FRAME_SIZE, MAX_FRAME_SIZE))
        self._check(_lib.nghttp2_submit_settings(self._session, 0, settings, 3))
        self._check(_lib.nghttp2_session_set_local_window_size(
            self._session, 0, 0, connection_window))

    def close(self) -> None:
        """Free the session; every later call raises SessionError."""
        self._session = None
        self._finalizer()

    @staticmethod
    def _check(rv: int) -> int:
        if rv < 0:
            raise SessionError(_lib.nghttp2_strerror(rv).decode())
        return rv

    def _live(self) -> int:
        if self._session is None:
            raise SessionError("session closed")
        return self._session

    # -- input --------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray) -> list[tuple[int, int, object]]:
        """Feed the client's bytes; the events they made. SessionError when the
        connection is broken (a GOAWAY is queued for ``data_to_send`` then)."""
        session = self._live()
        events: list[tuple[int, int, object]] = []
        self._events = events
        if isinstance(data, bytearray):
            data = bytes(data)
        rv = _lib.nghttp2_session_mem_recv(session, data, len(data))
        error, self._error = self._error, None
        if rv < 0:
            if error is not None:
                raise error
            # Fatal to the session (bad preface, flooding): nghttp2 queues no GOAWAY.
            _lib.nghttp2_session_terminate_session(session, ErrorCode.PROTOCOL_ERROR)
            raise SessionError(_lib.nghttp2_strerror(rv).decode())
        if _lib.nghttp2_session_want_write(session):
            # Framed now: a connection error shows only once its GOAWAY is framed
            # (want_read turns 0 then).
            self._pending += self._frame()
            if not _lib.nghttp2_session_want_read(session) and not any(
                    e[0] == GOAWAY for e in events):
                raise SessionError("protocol error")  # its GOAWAY is in _pending
        return events

    # Every callback catches what it raises: an exception must not reach C (ctypes would
    # print it and return 0, as if nothing happened); it ends the session instead.

    def _on_begin_headers(self, session: int, frame: object, user_data: int) -> int:
        try:
            self._headers = []
            self._header_bytes = 0
        except BaseException as e:
            self._error = e
            return _ERR_CALLBACK_FAILURE
        return 0

    def _on_header(self, session: int, frame: int, name: bytes | None, namelen: int,
                   value: bytes | None, valuelen: int, flags: int, user_data: int) -> int:
        try:
            self._header_bytes += namelen + valuelen + 32  # RFC 9113 6.5.2's measure
            if (self._header_bytes > MAX_HEADER_LIST_SIZE or len(name or b"") != namelen
                    or len(value or b"") != valuelen):
                return _ERR_TEMPORAL_CALLBACK_FAILURE  # this stream is reset; the rest live
            self._headers.append((name or b"", value or b""))
        except BaseException as e:
            self._error = e
            return _ERR_CALLBACK_FAILURE
        return 0

    def _on_frame(self, session: int, frame: ctypes._Pointer[_FrameHd],
                  user_data: int) -> int:
        try:
            hd = frame.contents
            kind, sid, flags = hd.type, hd.stream_id, hd.flags
            if kind == _FRAME_DATA:
                if flags & _FLAG_END_STREAM:
                    self._events.append((END, sid, None))
            elif kind == _FRAME_HEADERS:
                if sid not in self._requested:
                    self._requested.add(sid)
                    self._events.append((REQUEST, sid, self._headers))
                self._headers = []
                if flags & _FLAG_END_STREAM:
                    self._events.append((END, sid, None))
            elif kind == _FRAME_WINDOW:
                self._events.append((WINDOW, sid, None))
            elif kind == _FRAME_RST:
                code = ctypes.cast(frame, ctypes.POINTER(_RstOrGoaway)).contents.a
                self._events.append((RESET, sid, code))
            elif kind == _FRAME_SETTINGS:
                if not flags & _FLAG_ACK:
                    self._events.append((SETTINGS, 0, None))
            elif kind == _FRAME_GOAWAY:
                code = ctypes.cast(frame, ctypes.POINTER(_RstOrGoaway)).contents.b
                self._events.append((GOAWAY, 0, code))
        except BaseException as e:
            self._error = e
            return _ERR_CALLBACK_FAILURE
        return 0

    def _on_data_chunk(self, session: int, flags: int, sid: int, data: int, length: int,
                       user_data: int) -> int:
        try:
            self._events.append((DATA, sid, ctypes.string_at(data, length)))
        except BaseException as e:
            self._error = e
            return _ERR_CALLBACK_FAILURE
        return 0

    def _on_close(self, session: int, sid: int, code: int, user_data: int) -> int:
        try:
            self._requested.discard(sid)
            out = self._out.pop(sid, None)
            if out is not None:
                self._queued -= len(out.buf)
            self._events.append((CLOSED, sid, code))
        except BaseException as e:
            self._error = e
            return _ERR_CALLBACK_FAILURE
        return 0

    def consume(self, sid: int, n: int) -> None:
        """Hand ``n`` received bytes of stream ``sid`` back to the client's windows."""
        self._check(_lib.nghttp2_session_consume(self._live(), sid, n))

    # -- output -------------------------------------------------------------------------

    def send_window(self, sid: int) -> int:
        """Bytes stream ``sid`` may still queue: the peer's stream and connection windows
        less what is queued and not yet framed (SessionError once the stream is gone)."""
        session = self._live()
        stream = _lib.nghttp2_session_get_stream_remote_window_size(session, sid)
        if stream < 0:
            raise SessionError(f"stream {sid} is closed")
        out = self._out.get(sid)
        conn = _lib.nghttp2_session_get_remote_window_size(session) - self._queued
        return min(stream - (len(out.buf) if out is not None else 0), conn)

    def send_headers(self, sid: int, headers: Headers, *, end_stream: bool = False) -> None:
        """Response headers, or (``end_stream``) trailers after any data queued."""
        session = self._live()
        nva = _nva(headers)
        out = self._out.get(sid)
        if end_stream and out is not None and (out.active or out.buf):
            out.trailers = nva
            if out.active and not out.buf:
                _lib.nghttp2_session_resume_data(session, sid)  # see send_data
            return
        self._check(_lib.nghttp2_submit_headers(
            session, _FLAG_END_STREAM if end_stream else 0, sid, None, nva, len(headers),
            None))

    def send_data(self, sid: int, data: bytes) -> None:
        """Queue ``data`` on stream ``sid`` (framed as the peer's windows allow)."""
        session = self._live()
        out = self._out.get(sid)
        if out is None:
            out = self._out[sid] = _Out()
        out.buf += data
        self._queued += len(data)
        if out.active:
            # Fails (harmlessly) unless the provider is deferred: nghttp2 calls it anyway.
            _lib.nghttp2_session_resume_data(session, sid)
        else:
            out.active = True
            self._check(_lib.nghttp2_submit_data(session, 0, sid,
                                                 ctypes.byref(self._provider)))

    def reply(self, sid: int, headers: Headers, data: bytes, trailers: Headers) -> None:
        """A whole answer that fits ``send_window``: headers, data, trailers."""
        session = self._live()
        out = self._out[sid] = _Out()
        out.buf += data
        out.active = True
        out.trailers = _nva(trailers)
        self._queued += len(data)
        self._check(_lib.nghttp2_submit_response(session, sid, _nva(headers), len(headers),
                                                 ctypes.byref(self._provider)))

    def reset_stream(self, sid: int, code: int) -> None:
        """RST_STREAM, after whatever this stream has queued."""
        self._live()
        out = self._out.get(sid)
        if out is not None and (out.active or out.buf or out.trailers is not None):
            out.reset = code
        else:
            self._resets.append((sid, code))

    def _on_read(self, session: int, sid: int, buf: int, length: int,
                 data_flags: ctypes._Pointer[ctypes.c_uint32], source: int,
                 user_data: int) -> int:
        try:
            out = self._out.get(sid)
            if out is None:
                data_flags[0] |= _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
                return 0
            n = min(length, len(out.buf))
            if n:
                ctypes.memmove(buf, bytes(out.buf[:n]), n)
                del out.buf[:n]
                self._queued -= n
            if out.buf:
                return n
            if out.trailers is None:
                return n if n else _ERR_DEFERRED
            data_flags[0] |= _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
            out.active = False
            trailers, out.trailers = out.trailers, None
            if _lib.nghttp2_submit_trailer(session, sid, trailers, len(trailers)) == 0 \
                    and out.reset is not None:
                self._resets.append((sid, out.reset))
            return n
        except BaseException as e:
            self._error = e
            return _ERR_CALLBACK_FAILURE

    def close_connection(self, code: int) -> None:
        """GOAWAY with ``code``; nothing more is read."""
        self._check(_lib.nghttp2_session_terminate_session(self._live(), code))

    def data_to_send(self) -> bytes:
        """Everything queued, framed. Events nghttp2 makes meanwhile (a stream it
        closes) are kept in ``late_events`` for the caller."""
        if self._session is None:
            return b""
        out = self._frame()
        if self._pending:
            out, self._pending = self._pending + out, b""
        return out

    def _frame(self) -> bytes:
        session = self._session
        events, self._events = self._events, self.late_events
        ptr = self._send_ptr
        chunks = []
        try:
            while True:
                n = _lib.nghttp2_session_mem_send(session, ctypes.byref(ptr))
                if n > 0:
                    chunks.append(ctypes.string_at(ptr.value or 0, n))
                    continue
                if n < 0 or not self._resets:
                    break
                resets, self._resets = self._resets, []
                for sid, code in resets:  # after what they follow was framed
                    _lib.nghttp2_submit_rst_stream(session, 0, sid, code)
        finally:
            self._events = events
        error, self._error = self._error, None
        if error is not None:
            raise error
        if n < 0:
            raise SessionError(_lib.nghttp2_strerror(n).decode())
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
