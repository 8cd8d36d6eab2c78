"""Just enough protobuf for the shim's short-lived actions, without betterproto.

``start`` and ``delete`` run once per container on containerd's critical path, so they
avoid importing the generated API (betterproto pulls in grpclib): ``delete`` prints a
``containerd.task.v2.DeleteResponse`` and ``start`` reads the options Any from stdin.
tests/unit/test_shim_wire.py checks these bytes against the generated classes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from berth.core import protowire

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5


DecodeError = protowire.DecodeError
varint = protowire.encode_varint
_read_varint = protowire.read_varint


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field of a message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == WIRE_VARINT:
            value, pos = _read_varint(data, pos)
            yield number, kind, value
        elif kind == WIRE_LEN:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise DecodeError("truncated field")
            yield number, kind, data[pos:pos + length]
            pos += length
        elif kind == WIRE_FIXED64:
            pos += 8
        elif kind == WIRE_FIXED32:
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {kind}")
        if pos > len(data):
            raise DecodeError("truncated field")


def _field(number: int, kind: int) -> bytes:
    return varint(number << 3 | kind)


def uint_field(number: int, value: int) -> bytes:
    return _field(number, WIRE_VARINT) + varint(value) if value else b""


def bytes_field(number: int, value: bytes) -> bytes:
    return _field(number, WIRE_LEN) + varint(len(value)) + value if value else b""


def timestamp(seconds: int, nanos: int) -> bytes:
    """A google.protobuf.Timestamp message body."""
    return uint_field(1, seconds) + uint_field(2, nanos)


def delete_response(pid: int, exit_status: int, exited_at_ns: int | None = None) -> bytes:
    """containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3}."""
    if exited_at_ns is None:
        exited_at_ns = time.time_ns()
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    stamp = timestamp(seconds, nanos)
    return (uint_field(1, pid) + uint_field(2, exit_status)
            + _field(3, WIRE_LEN) + varint(len(stamp)) + stamp)


def decode_any(data: bytes) -> tuple[str, bytes]:
    """(type_url, value) of a google.protobuf.Any."""
    type_url, value = "", b""
    for number, kind, raw in fields(data):
        if kind != WIRE_LEN:
            continue
        if number == 1:
            type_url = bytes(raw).decode()
        elif number == 2:
            value = bytes(raw)
    return type_url, value


def string_fields(data: bytes) -> dict[int, str]:
    """Every length-delimited field as text, last one winning (for flat string messages)."""
    out: dict[int, str] = {}
    for number, kind, raw in fields(data):
        if kind == WIRE_LEN:
            out[number] = bytes(raw).decode(errors="replace")
    return out
