"""Events.Forward requests from shims, read straight from the wire into an ``Event``.

Every event a shim sends berthd (four or five per container run) arrives as a ttrpc
``ForwardRequest``: an ``Envelope`` holding a ``Timestamp`` and an ``Any``. Decoding that
through betterproto's nested parse cost ~60 µs warm and ~200 µs in berthd's run (each
nested message passes betterproto's attribute hooks twice), and even building the three
messages from fields read by hand costs ~50 µs; reading the five fields here into the
exchange's plain ``Event`` costs a few. Anything this reader does not expect (a field
out of place or repeated, an unknown field, a negative or out-of-range timestamp, bad
UTF-8, a missing envelope, timestamp or event) goes to betterproto, which stays the
reference: tests/unit/test_events_forward.py compares the two.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from berth.core import protowire
from berth.core.api.containerd.services.events.ttrpc import v1 as ttrpc_events
from berth.core.events.envelope import Event

_VARINT, _LEN = 0, 2
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NANOS = 1_000_000_000
_INT63 = 1 << 63

# {field number: wire type} of each message read here.
_FORWARD = {1: _LEN}                              # ForwardRequest.envelope
_ENVELOPE = {1: _LEN, 2: _LEN, 3: _LEN, 4: _LEN}  # timestamp, namespace, topic, event
_TIMESTAMP = {1: _VARINT, 2: _VARINT}             # seconds, nanos
_ANY = {1: _LEN, 2: _LEN}                         # type_url, value


class _Unusual(Exception):
    """Bytes this reader leaves to betterproto."""


def _fields(data: bytes, pos: int, end: int, shape: dict[int, int]
            ) -> dict[int, int | tuple[int, int]]:
    """{field number: varint value or (start, end) of its bytes}, each field at most once."""
    out: dict[int, int | tuple[int, int]] = {}
    read = protowire.read_varint
    while pos < end:
        key, pos = read(data, pos, end)
        number = key >> 3
        if shape.get(number) != key & 7 or number in out:
            raise _Unusual
        if key & 7 == _VARINT:
            out[number], pos = read(data, pos, end)
        else:
            size, pos = read(data, pos, end)
            if pos + size > end:
                raise _Unusual
            out[number] = (pos, pos + size)
            pos += size
    return out


def _span(found: dict[int, int | tuple[int, int]], number: int) -> tuple[int, int]:
    span = found.get(number)
    if not isinstance(span, tuple):
        raise _Unusual  # a message field that is absent: betterproto's default applies
    return span


def _text(data: bytes, found: dict[int, int | tuple[int, int]], number: int) -> str:
    span = found.get(number)
    if span is None:
        return ""
    assert isinstance(span, tuple)
    return data[span[0]:span[1]].decode()


def _read(data: bytes) -> Event:
    start, end = _span(_fields(data, 0, len(data), _FORWARD), 1)
    env = _fields(data, start, end, _ENVELOPE)
    ts = _fields(data, *_span(env, 1), _TIMESTAMP)
    seconds, nanos = ts.get(1, 0), ts.get(2, 0)
    assert isinstance(seconds, int) and isinstance(nanos, int)
    if seconds >= _INT63 or nanos >= _NANOS:
        raise _Unusual  # negative (two's complement) or out of range
    event = _fields(data, *_span(env, 4), _ANY)
    value = event.get(2)
    return Event(
        0, _text(data, env, 2), _text(data, env, 3),
        # betterproto's own conversion: whole microseconds, no float rounding.
        _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000),
        _text(data, event, 1),
        data[value[0]:value[1]] if isinstance(value, tuple) else b"",
    )


def read_event(data: bytes) -> Event:
    """The event in the ``ForwardRequest`` in ``data``, as betterproto would decode it."""
    try:
        return _read(data)
    except (_Unusual, protowire.DecodeError, UnicodeDecodeError, OverflowError):
        return Event.of(0, ttrpc_events.ForwardRequest().parse(data).envelope)
