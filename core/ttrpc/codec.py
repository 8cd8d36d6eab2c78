"""ttrpc wire format, sans-io: frames, the Request/Response envelope and metadata.

A frame is a 10-byte big-endian header (payload length, stream id, message type,
flags) followed by the payload. Unary calls carry a protobuf ``Request`` in a
request frame and a ``Response`` in a response frame on the same (odd,
client-chosen) stream id.

The envelope messages have four tiny fixed schemas, so they are encoded and
decoded here by hand rather than through betterproto: it is several times
faster on a path every shim call and every forwarded event takes, and it is
strict where betterproto is lenient (a truncated field is an error here, not a
shortened string). ``tests/unit/test_ttrpc_codec.py`` checks the bytes against
the generated ``berth.core.api.ttrpc`` classes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from berth.core import errdefs, protowire

HEADER_LENGTH = 10
# ttrpc's messageLengthMax: a bigger frame is skipped and answered with
# ResourceExhausted instead of being buffered.
MAX_MESSAGE_LENGTH = 4 << 20

MESSAGE_TYPE_REQUEST = 0x1
MESSAGE_TYPE_RESPONSE = 0x2
# Only newer ttrpc (streaming) sends data frames; peers must tolerate types they
# do not know, so the decoder passes every type through.
MESSAGE_TYPE_DATA = 0x3

_HEADER = struct.Struct(">IIBB")
_UINT32_MAX = 0xFFFFFFFF
_UINT64_MASK = (1 << 64) - 1


class ProtocolError(Exception):
    """Bytes that are not valid ttrpc."""


class TruncatedFrame(ProtocolError):
    """The stream ended inside a frame."""


class MessageDecodeError(ProtocolError):
    """A Request, Response or metadata entry is not valid protobuf for its schema."""


class FrameTooLarge(errdefs.ResourceExhausted, ProtocolError):
    """A frame longer than the limit; its payload was (or will be) discarded.

    It is an ``errdefs.ResourceExhausted`` whose message is the one the Go
    implementation sends back, so a server answers it with ``to_status(exc)``.
    """

    def __init__(self, stream_id: int, length: int, limit: int = MAX_MESSAGE_LENGTH) -> None:
        super().__init__(
            f"message length {length} exceed maximum message size of {limit}", raw=True
        )
        self.stream_id = stream_id
        self.length = length
        self.limit = limit


class Frame(NamedTuple):
    stream_id: int
    type: int
    flags: int
    payload: bytes


class Header(NamedTuple):
    length: int
    stream_id: int
    type: int
    flags: int


def pack_header(length: int, stream_id: int, message_type: int, flags: int = 0) -> bytes:
    if not 0 <= length <= _UINT32_MAX:
        raise ValueError(f"ttrpc: frame length {length} out of range")
    if not 0 <= stream_id <= _UINT32_MAX:
        raise ValueError(f"ttrpc: stream id {stream_id} out of range")
    return _HEADER.pack(length, stream_id, message_type, flags)


def unpack_header(data: bytes | bytearray | memoryview) -> Header:
    if len(data) < HEADER_LENGTH:
        raise TruncatedFrame(f"ttrpc: header needs {HEADER_LENGTH} bytes, got {len(data)}")
    return Header._make(_HEADER.unpack_from(data))


def encode_frame(stream_id: int, message_type: int, payload: bytes, flags: int = 0) -> bytes:
    return pack_header(len(payload), stream_id, message_type, flags) + payload


class FrameDecoder:
    """Bytes in, frames out.

    ``feed()`` what the socket gave, then drain with ``next_frame()`` (or iterate)
    until it returns None. An oversized frame raises ``FrameTooLarge`` once, at
    its header; its payload is then dropped as it arrives, never buffered, and
    decoding carries on with the next frame. Memory is bounded by one frame of
    at most ``max_length`` plus what a single ``feed`` brings.
    """

    __slots__ = ("_buf", "_pos", "_skip", "_max")

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the undecoded bytes in _buf
        self._skip = 0  # bytes of an oversized payload still to drop
        self._max = max_length

    @property
    def buffered(self) -> int:
        """Undecoded bytes held (at most one partial frame once drained)."""
        return len(self._buf) - self._pos

    @property
    def in_frame(self) -> bool:
        """True when the bytes seen so far end inside a frame."""
        return self._skip > 0 or self.buffered > 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            if n == len(data):
                return
            data = memoryview(data)[n:]
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < HEADER_LENGTH:
            return None
        length, stream_id, message_type, flags = _HEADER.unpack_from(buf, pos)
        if length > self._max:
            held = min(available - HEADER_LENGTH, length)
            self._pos = pos + HEADER_LENGTH + held
            self._skip = length - held
            raise FrameTooLarge(stream_id, length, self._max)
        start = pos + HEADER_LENGTH
        end = start + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            payload = view[start:end].tobytes()
        self._pos = end
        return Frame(stream_id, message_type, flags, payload)

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        frame = self.next_frame()
        if frame is None:
            raise StopIteration
        return frame

    def eof(self) -> None:
        """The peer closed: complain if that cut a frame short."""
        if self._skip:
            raise TruncatedFrame(
                f"ttrpc: connection closed with {self._skip} bytes of an oversized frame unread"
            )
        if self.buffered:
            raise TruncatedFrame(
                f"ttrpc: connection closed inside a frame ({self.buffered} bytes buffered)"
            )


# -- protobuf primitives -------------------------------------------------------------

_varint = protowire.encode_varint


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    try:
        return protowire.read_varint(data, pos, end)
    except protowire.DecodeError as exc:
        raise MessageDecodeError(f"ttrpc: {exc}") from None


def _signed64(value: int) -> int:
    value &= _UINT64_MASK
    return value - (1 << 64) if value >> 63 else value


def _signed32(value: int) -> int:
    # int32 fields are sign-extended to 64 bits on the wire; keep the low 32.
    value &= _UINT32_MAX
    return value - (1 << 32) if value >> 31 else value


_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field; fixed-width ones are skipped."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _read_varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise MessageDecodeError("ttrpc: illegal field number 0")
        if wire == _WIRE_LEN:
            size, pos = _read_varint(data, pos, end)
            stop = pos + size
            if stop > end:
                raise MessageDecodeError(
                    f"ttrpc: field {number} needs {size} bytes, {end - pos} left"
                )
            yield number, wire, data[pos:stop]
            pos = stop
        elif wire == _WIRE_VARINT:
            value, pos = _read_varint(data, pos, end)
            yield number, wire, value
        elif wire == _WIRE_FIXED64 or wire == _WIRE_FIXED32:
            pos += 8 if wire == _WIRE_FIXED64 else 4
            if pos > end:
                raise MessageDecodeError(f"ttrpc: truncated fixed-width field {number}")
        else:
            raise MessageDecodeError(f"ttrpc: unsupported wire type {wire} for field {number}")


def _text(value: int | bytes, number: int) -> str:
    if not isinstance(value, bytes):
        raise MessageDecodeError(f"ttrpc: field {number} is a varint, expected a string")
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise MessageDecodeError(f"ttrpc: field {number} is not valid UTF-8") from exc


def _blob(value: int | bytes, number: int) -> bytes:
    if not isinstance(value, bytes):
        raise MessageDecodeError(f"ttrpc: field {number} is a varint, expected bytes")
    return value


def _number(value: int | bytes, number: int) -> int:
    if isinstance(value, bytes):
        raise MessageDecodeError(f"ttrpc: field {number} is length-delimited, expected a varint")
    return value


def _put_len(parts: list[bytes], tag: bytes, value: bytes) -> None:
    parts.append(tag)
    parts.append(_varint(len(value)))
    parts.append(value)


# -- metadata ---------------------------------------------------------------------------

Metadata = Mapping[str, "str | Sequence[str]"]


def metadata_pairs(metadata: Metadata | None) -> list[tuple[str, str]]:
    """Flatten metadata into (key, value) pairs; keys lower-cased as ttrpc.MD.Set does."""
    if not metadata:
        return []
    pairs = []
    for key, values in metadata.items():
        key = key.lower()
        if isinstance(values, str):
            pairs.append((key, values))
        else:
            pairs.extend((key, value) for value in values)
    return pairs


def metadata_dict(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Group received pairs by key (kept as sent), values in arrival order."""
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return grouped


def _encode_key_value(key: str, value: str) -> bytes:
    parts: list[bytes] = []
    if key:
        _put_len(parts, b"\x0a", key.encode())
    if value:
        _put_len(parts, b"\x12", value.encode())
    return b"".join(parts)


def _decode_key_value(data: bytes) -> tuple[str, str]:
    key = value = ""
    for number, _, raw in _fields(data):
        if number == 1:
            key = _text(raw, 1)
        elif number == 2:
            value = _text(raw, 2)
    return key, value


# -- Request / Response -----------------------------------------------------------------


class CallRequest(NamedTuple):
    """ttrpc.Request: what a client asks for, the payload still encoded."""

    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: Sequence[tuple[str, str]] = ()


class CallResponse(NamedTuple):
    """ttrpc.Response with its google.rpc.Status flattened in.

    ``details`` holds each status detail as an encoded google.protobuf.Any.
    """

    code: int = 0
    message: str = ""
    payload: bytes = b""
    details: Sequence[bytes] = ()


def encode_request(request: CallRequest) -> bytes:
    parts: list[bytes] = []
    if request.service:
        _put_len(parts, b"\x0a", request.service.encode())
    if request.method:
        _put_len(parts, b"\x12", request.method.encode())
    if request.payload:
        _put_len(parts, b"\x1a", request.payload)
    if request.timeout_nano:
        parts.append(b"\x20")
        parts.append(_varint(request.timeout_nano))
    for key, value in request.metadata:
        _put_len(parts, b"\x2a", _encode_key_value(key, value))
    return b"".join(parts)


def decode_request(data: bytes) -> CallRequest:
    service = method = ""
    payload = b""
    timeout_nano = 0
    metadata: list[tuple[str, str]] = []
    for number, _, value in _fields(data):
        if number == 1:
            service = _text(value, 1)
        elif number == 2:
            method = _text(value, 2)
        elif number == 3:
            payload = _blob(value, 3)
        elif number == 4:
            timeout_nano = _signed64(_number(value, 4))
        elif number == 5:
            metadata.append(_decode_key_value(_blob(value, 5)))
    return CallRequest(service, method, payload, timeout_nano, metadata)


def _encode_status(code: int, message: str, details: Sequence[bytes]) -> bytes:
    parts: list[bytes] = []
    if code:
        parts.append(b"\x08")
        parts.append(_varint(code))
    if message:
        # Human text, possibly built from undecodable file names: never fail on it.
        _put_len(parts, b"\x12", message.encode(errors="replace"))
    for detail in details:
        _put_len(parts, b"\x1a", detail)
    return b"".join(parts)


def encode_response(response: CallResponse) -> bytes:
    # The Go server always sets Status, even for OK, so the field is always present.
    status = _encode_status(int(response.code), response.message, response.details)
    parts: list[bytes] = []
    _put_len(parts, b"\x0a", status)
    if response.payload:
        _put_len(parts, b"\x12", response.payload)
    return b"".join(parts)


def decode_response(data: bytes) -> CallResponse:
    code = 0
    message = ""
    payload = b""
    details: list[bytes] = []
    for number, _, value in _fields(data):
        if number == 1:
            for snumber, _, svalue in _fields(_blob(value, 1)):
                if snumber == 1:
                    code = _signed32(_number(svalue, 1))
                elif snumber == 2:
                    message = _text(svalue, 2)
                elif snumber == 3:
                    details.append(_blob(svalue, 3))
        elif number == 2:
            payload = _blob(value, 2)
    return CallResponse(code, message, payload, details)


# -- whole frames -----------------------------------------------------------------------


def request_frame(
    stream_id: int, request: CallRequest, *, max_length: int = MAX_MESSAGE_LENGTH
) -> bytes:
    """A request frame; raises FrameTooLarge rather than send what the peer must refuse."""
    body = encode_request(request)
    if len(body) > max_length:
        raise FrameTooLarge(stream_id, len(body), max_length)
    return pack_header(len(body), stream_id, MESSAGE_TYPE_REQUEST) + body


def response_frame(
    stream_id: int, response: CallResponse, *, max_length: int = MAX_MESSAGE_LENGTH
) -> bytes:
    """A response frame; an oversized one becomes a ResourceExhausted status instead."""
    body = encode_response(response)
    if len(body) > max_length:
        too_large = FrameTooLarge(stream_id, len(body), max_length)
        body = encode_response(CallResponse(too_large.code, too_large.message))
    return pack_header(len(body), stream_id, MESSAGE_TYPE_RESPONSE) + body
