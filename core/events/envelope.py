"""Events as the exchange carries them, and building and validating envelopes as
containerd's exchange does.

An ``Event`` keeps an envelope's fields as plain values. betterproto builds a message
through attribute hooks (an ``Envelope`` with its ``Any`` costs ~40 µs, an empty one
~15 µs), and an event passes through berthd several times per container run; the
exchange's own work (the durable log, filters, listeners, the bytes each subscriber
is sent) needs only the fields, so the ``Envelope`` message is built only for whoever
asks for it, once per event.
"""

from __future__ import annotations

from datetime import UTC, datetime

import betterproto
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, identifiers, protowire
from berth.core.api.containerd.services.events.ttrpc import v1 as ttrpc_events
from berth.core.api.containerd.services.events.v1 import Envelope
from berth.core.events import typeurl

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_varint = protowire.encode_varint


class Event:
    """One event: its sequence number (0 until the exchange numbers it) and envelope.

    ``has_event`` tells an envelope whose ``Any`` was absent (gRPC Forward without one)
    from one with an empty ``Any``: their bytes differ, so subscribers see either as sent.
    """

    __slots__ = ("seq", "namespace", "topic", "timestamp", "type_url", "value", "has_event",
                 "_envelope", "_wire")

    def __init__(self, seq: int, namespace: str, topic: str, timestamp: datetime,
                 type_url: str = "", value: bytes = b"", has_event: bool = True) -> None:
        self.seq = seq
        self.namespace = namespace
        self.topic = topic
        self.timestamp = timestamp
        self.type_url = type_url
        self.value = value
        self.has_event = has_event
        self._envelope: Envelope | None = None
        self._wire: bytes | None = None

    @classmethod
    def of(cls, seq: int, env: Envelope | ttrpc_events.Envelope) -> Event:
        # "is None", not truthiness: a message's bool() compares every field with its
        # default. An unset Any reads as a default one that betterproto leaves unwritten.
        event = env.event
        if event is None:
            return cls(seq, env.namespace, env.topic, env.timestamp, has_event=False)
        return cls(seq, env.namespace, env.topic, env.timestamp, event.type_url, event.value,
                   betterproto.serialized_on_wire(event))

    @property
    def envelope(self) -> Envelope:
        """The event as containerd's ``Envelope`` message (built on first use)."""
        if self._envelope is None:
            env = Envelope(timestamp=self.timestamp, namespace=self.namespace, topic=self.topic)
            if self.has_event:
                env.event = AnyMsg(type_url=self.type_url, value=self.value)
            self._envelope = env
        return self._envelope

    @property
    def wire(self) -> bytes:
        """The ``Envelope`` message's bytes, as betterproto serializes it (made once)."""
        if self._wire is None:
            self._wire = _encode(self)
        return self._wire

    def __repr__(self) -> str:
        return (f"Event(seq={self.seq}, namespace={self.namespace!r}, topic={self.topic!r}, "
                f"type_url={self.type_url!r})")


def _field(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def _encode(ev: Event) -> bytes:
    # Envelope: timestamp = 1 (Timestamp: seconds = 1, nanos = 2), namespace = 2,
    # topic = 3, event = 4 (Any: type_url = 1, value = 2). proto3 leaves out empty
    # scalars; a set message field is written even when empty.
    offset = ev.timestamp - _EPOCH
    micros = (offset.days * 86400 + offset.seconds) * 1_000_000 + offset.microseconds
    seconds, micros = divmod(micros, 1_000_000)
    ts = b""
    if seconds:
        ts += b"\x08" + _varint(seconds)
    if micros:
        ts += b"\x10" + _varint(micros * 1000)
    out = _field(1, ts)
    if ev.namespace:
        out += _field(2, ev.namespace.encode())
    if ev.topic:
        out += _field(3, ev.topic.encode())
    if ev.has_event:
        body = _field(1, ev.type_url.encode()) if ev.type_url else b""
        if ev.value:
            body += _field(2, ev.value)
        out += _field(4, body)
    return out


def validate_topic(topic: str) -> None:
    def bad(why: str) -> errdefs.InvalidArgument:
        return errdefs.InvalidArgument(f'envelope topic "{topic}": {why}', raw=True)

    if topic == "":
        raise bad("must not be empty: invalid argument")
    if topic[0] != "/":
        raise bad("must start with '/': invalid argument")
    if len(topic) == 1:
        raise bad("must have at least one component: invalid argument")
    for component in topic[1:].split("/"):
        try:
            identifiers.validate(component)
        except errdefs.InvalidArgument as e:
            raise bad(f'failed validation on component "{component}": {e}') from None


def validate(ev: Event) -> None:
    """A forwarded event's envelope checks, as containerd's exchange Forward makes them."""
    try:
        identifiers.validate(ev.namespace)
    except errdefs.InvalidArgument as e:
        raise errdefs.InvalidArgument(
            f"event envelope has invalid namespace: {e}", raw=True
        ) from None
    validate_topic(ev.topic)
    ts = ev.timestamp
    if ts is None or ts.timestamp() <= 0:
        raise errdefs.InvalidArgument("timestamp must be set on forwarded event")


def validate_envelope(env: Envelope) -> None:
    validate(Event.of(0, env))


def make_event(namespace: str, topic: str, event: betterproto.Message) -> Event:
    """A new event of berthd's own, stamped now (not yet numbered)."""
    validate_topic(topic)
    return Event(0, namespace, topic, datetime.now(UTC), typeurl.name_of(event), bytes(event))


def make(namespace: str, topic: str, event: betterproto.Message) -> Envelope:
    return make_event(namespace, topic, event).envelope


def adaptor(ev: Event):  # noqa: ANN201 - a filters adaptor callable
    """Fields a filter can test: topic, namespace and event.<field> of the payload."""
    decoded: list[dict | None] = []

    def field(path: tuple[str, ...] | list[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "topic":
            return ev.topic, len(ev.topic) > 0
        if head == "namespace":
            return ev.namespace, len(ev.namespace) > 0
        if head == "event" and len(path) > 1:
            if not decoded:
                decoded.append(typeurl.fields_dict(ev.type_url, ev.value)
                               if ev.has_event else None)
            value: object = decoded[0]
            for key in path[1:]:
                if not isinstance(value, dict) or key not in value:
                    return "", False
                value = value[key]
            if isinstance(value, (dict, list)):
                return "", False
            return str(value), True
        return "", False

    return field
