"""Protocol-buffer varints, sans-io: the one reader and writer berth's hand codecs share.

The ttrpc codec (``berth.core.ttrpc.codec``) and the shim's short-lived actions
(``berth.core.shim.wire``) read and write a few protobuf fields by hand rather than
through the generated classes (speed, and an import budget); they meet the wire here.
Only the standard library.
"""

from __future__ import annotations

UINT64_MASK = (1 << 64) - 1
_SMALL = [bytes((i,)) for i in range(0x80)]


class DecodeError(ValueError):
    """Bytes that are not a well-formed varint."""


def encode_varint(value: int) -> bytes:
    """``value`` as a base-128 varint; negative int32/int64 as ten-byte two's complement."""
    if 0 <= value < 0x80:
        return _SMALL[value]
    value &= UINT64_MASK
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, pos: int, end: int | None = None) -> tuple[int, int]:
    """(value, position after it) of the varint at ``data[pos:end]``."""
    if end is None:
        end = len(data)
    if pos >= end:
        raise DecodeError("truncated varint")
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    result = byte & 0x7F
    shift = 7
    pos += 1
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint overflows 64 bits")
