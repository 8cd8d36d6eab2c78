"""Protocol-buffer varints, sans-io: the one reader and writer berth's hand codecs share.

The ttrpc codec (``berth.core.ttrpc.codec``) and the shim's short-lived actions
(``berth.core.shim.wire``) read and write a few protobuf fields by hand rather than
through the generated classes (speed, and an import budget); they meet the wire here.
``parse_flat`` reads flat betterproto messages (scalars only) for the request paths.
Only the standard library.
"""

from __future__ import annotations

import dataclasses
import typing

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


# -- flat messages ----------------------------------------------------------------------
#
# betterproto builds a message through attribute hooks: ``cls().parse(data)`` pays for
# them twice (once to make the empty message, once per field parsed). Most requests are
# a few scalars (an id, a digest, an offset), and for those one ``cls(**fields)`` after
# decoding the wire here costs about half. Which classes qualify, and how each field is
# read, comes from the generated class's own field facts (``betterproto`` metadata and
# type hints); anything this reader is not sure of is left to ``cls().parse``, which
# stays the reference (tests/unit/test_protowire_flat.py compares the two).

_VARINT, _LEN = 0, 2
# proto type -> wire type, for the scalar types read here.
_FLAT_TYPES = {"string": _LEN, "bytes": _LEN, "bool": _VARINT, "int32": _VARINT,
               "int64": _VARINT, "uint32": _VARINT, "uint64": _VARINT}
# The zero value of each scalar type: every field a message has is given to ``cls(**)``.
_ZEROS: dict[str, object] = {"string": "", "bytes": b"", "bool": False, "int32": 0,
                             "int64": 0, "uint32": 0, "uint64": 0}
_plans: dict[type, tuple[dict[int, tuple[str, str, int]], dict[str, object]] | None] = {}


def _plan(cls: type) -> dict[int, tuple[str, str, int]] | None:
    """{field number: (attribute, proto type, wire type)}, or None if ``cls`` has a
    field this reader leaves to betterproto (messages, maps, repeated, oneof, optional,
    wrappers, enums, floats, fixed and zigzag integers)."""
    plan: dict[int, tuple[str, str, int]] = {}
    try:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("betterproto")
            if meta is None:
                return None
            wire = _FLAT_TYPES.get(meta.proto_type)
            if (wire is None or meta.map_types or meta.group or meta.wraps or meta.optional
                    or hasattr(hints.get(f.name), "__origin__") or meta.number in plan):
                return None
            plan[meta.number] = (f.name, meta.proto_type, wire)
    except (TypeError, NameError):
        return None
    return plan


def parse_flat(cls: type, data: bytes) -> typing.Any:
    """``cls().parse(data)`` for a betterproto message class, cheaper for flat ones."""
    try:
        known = _plans[cls]
    except KeyError:
        plan = _plan(cls)
        known = _plans[cls] = None if plan is None else (
            plan, {name: _ZEROS[proto] for name, proto, _ in plan.values()})
    if known is None or not data:
        return cls().parse(data)
    plan, zeros = known
    # Absent fields are given their zero value too: betterproto would otherwise make
    # each on first read, through its attribute hooks, at several times the cost.
    fields = dict(zeros)
    pos, end = 0, len(data)
    try:
        while pos < end:
            key = data[pos]
            if key < 0x80:
                pos += 1
            else:
                key, pos = read_varint(data, pos, end)
            field = plan.get(key >> 3)
            if field is None or field[2] != key & 7:
                return cls().parse(data)  # unknown field or unexpected wire type
            name, proto, wire = field
            if wire == _LEN:
                size, pos = read_varint(data, pos, end)
                if pos + size > end:
                    return cls().parse(data)
                raw = data[pos:pos + size]
                pos += size
                fields[name] = raw.decode("utf-8") if proto == "string" else raw
                continue
            value, pos = read_varint(data, pos, end)
            if proto == "bool":
                if value > 1:
                    return cls().parse(data)
                fields[name] = value == 1
            elif proto == "uint64":
                if value > UINT64_MASK:
                    return cls().parse(data)
                fields[name] = value
            elif proto == "uint32":
                if value >> 32:
                    return cls().parse(data)
                fields[name] = value
            elif proto == "int64":
                if value > UINT64_MASK:
                    return cls().parse(data)
                fields[name] = value - (1 << 64) if value >> 63 else value
            else:  # int32: non-negative, or negative as ten-byte two's complement
                if value < 1 << 31:
                    fields[name] = value
                elif (1 << 64) - (1 << 31) <= value <= UINT64_MASK:
                    fields[name] = value - (1 << 64)
                else:
                    return cls().parse(data)
    except (DecodeError, UnicodeDecodeError):
        return cls().parse(data)  # betterproto decides what a malformed message is
    return cls(**fields)
