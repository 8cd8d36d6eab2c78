"""Events.Forward requests read by ``berth.core.events.forward`` against betterproto's parse
(the reference), on real shims' shapes, hand-made edge cases and fuzzed bytes; and the
bytes subscribers are sent for an event against betterproto's serialization."""

from __future__ import annotations

from datetime import UTC, datetime

import betterproto
import pytest
from betterproto.lib.google.protobuf import Any as AnyMsg
from hypothesis import given, settings, strategies as st

from berth.core import protowire
from berth.core.api.containerd.events import TaskExit
from berth.core.api.containerd.services.events import v1 as grpc_events
from berth.core.api.containerd.services.events.ttrpc import v1 as ttrpc_events
from berth.core.events import forward as forward_module
from berth.core.events.envelope import Event
from berth.core.events.exchange import Exchange
from berth.core.events.forward import read_event
from berth.core.grpc.bridge import Encoded, handlers_for
from berth.core.services.events import TTRPC_SERVICE, EventsService

ForwardRequest = ttrpc_events.ForwardRequest
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def reference(data: bytes) -> ttrpc_events.Envelope | type[BaseException]:
    try:
        return ForwardRequest().parse(data).envelope
    except Exception as exc:  # noqa: BLE001 - the reference's failure is the expectation
        return type(exc)


def ours(data: bytes) -> Event | type[BaseException]:
    try:
        return read_event(data)
    except Exception as exc:  # noqa: BLE001
        return type(exc)


def same(data: bytes) -> None:
    want, got = reference(data), ours(data)
    if isinstance(want, type):
        assert got is want
        return
    assert isinstance(got, Event)
    assert (got.namespace, got.topic) == (want.namespace, want.topic)
    assert got.timestamp == want.timestamp
    assert got.timestamp.tzinfo == want.timestamp.tzinfo
    assert got.has_event == betterproto.serialized_on_wire(want.event)
    assert (got.type_url, got.value) == (want.event.type_url, want.event.value)
    # What a subscriber of the containerd Envelope is sent: as betterproto writes it.
    as_grpc = grpc_events.Envelope().parse(bytes(want))
    assert got.envelope == as_grpc
    if got.timestamp > _EPOCH:  # the exchange refuses the others before anyone sees them
        assert got.wire == bytes(as_grpc) == bytes(got.envelope)


def forward(ts: datetime, ns: str = "moby", topic: str = "/tasks/exit",
            type_url: str = "containerd.events.TaskExit", value: bytes = b"") -> bytes:
    return bytes(ForwardRequest(envelope=ttrpc_events.Envelope(
        timestamp=ts, namespace=ns, topic=topic, event=AnyMsg(type_url=type_url, value=value),
    )))


def field(number: int, wire: int, body: bytes | int) -> bytes:
    key = protowire.encode_varint(number << 3 | wire)
    if wire == 0:
        assert isinstance(body, int)
        return key + protowire.encode_varint(body)
    assert isinstance(body, bytes)
    return key + protowire.encode_varint(len(body)) + body


def test_a_shims_task_exit_reads_like_betterproto():
    exit_ = TaskExit(container_id="c" * 64, id="c" * 64, pid=4242, exit_status=137,
                     exited_at=datetime(2026, 12, 5, 20, 50, 57, 583972, tzinfo=UTC))
    data = forward(datetime(2026, 12, 5, 20, 50, 57, 584307, tzinfo=UTC), value=bytes(exit_))
    same(data)
    forward_module._read(data)  # the fast reader itself took it, not the fallback
    ev = read_event(data)
    assert ev.namespace == "moby" and ev.topic == "/tasks/exit"
    assert TaskExit().parse(ev.value).pid == 4242


@pytest.mark.parametrize("data", [
    b"",                                                   # no envelope at all
    field(1, 2, b""),                                      # empty envelope
    field(1, 2, field(1, 2, b"") + field(4, 2, b"")),      # zero timestamp, empty Any
    field(1, 2, field(1, 2, field(1, 0, 5) + field(2, 0, 999_999_999)) + field(4, 2, b"")),
    field(1, 2, field(1, 2, field(1, 0, (1 << 64) - 1)) + field(4, 2, b"")),  # -1 seconds
    field(1, 2, field(1, 2, field(2, 0, 1_000_000_000)) + field(4, 2, b"")),  # nanos too big
    field(1, 2, field(1, 2, field(1, 0, 1 << 62)) + field(4, 2, b"")),        # overflows
    field(1, 2, field(2, 2, b"\xff") + field(1, 2, b"") + field(4, 2, b"")),  # bad UTF-8
    field(1, 2, field(1, 2, b"") + field(4, 2, b"") + field(9, 0, 1)),        # unknown field
    field(1, 2, field(1, 2, b"") + field(2, 2, b"a") + field(2, 2, b"b") + field(4, 2, b"")),
    field(1, 2, b"") + field(1, 2, field(3, 2, b"/x")),   # envelope twice: merged
    field(1, 0, 3),                                        # wrong wire type
    field(1, 2, field(1, 2, b"")[:-1] + b"\x05"),          # length past the end
    b"\x0a\x80",                                           # truncated varint
], ids=lambda d: d.hex() or "empty")
def test_edge_cases_read_like_betterproto(data):
    same(data)


@settings(max_examples=300, deadline=None)
@given(ts=st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1),
                       timezones=st.just(UTC)),
       ns=st.text(max_size=20), topic=st.text(max_size=30), type_url=st.text(max_size=40),
       value=st.binary(max_size=64))
def test_well_formed_requests_read_like_betterproto(ts, ns, topic, type_url, value):
    same(forward(ts, ns, topic, type_url, value))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=80))
def test_any_bytes_read_like_betterproto(data):
    same(data)


@settings(max_examples=200, deadline=None)
@given(base=st.binary(max_size=0) | st.just(forward(datetime(2026, 1, 1, tzinfo=UTC))),
       cut=st.integers(0, 80), junk=st.binary(max_size=6))
def test_mangled_requests_read_like_betterproto(base, cut, junk):
    same(base[:cut] + junk + base[cut:])


def test_berthd_reads_forward_requests_with_this_reader():
    service = EventsService(Exchange())
    request_type, _, decode = service.ttrpc_services()[TTRPC_SERVICE]["Forward"]
    assert request_type is ForwardRequest and decode is read_event


@settings(max_examples=300, deadline=None)
@given(ts=st.datetimes(min_value=datetime(1970, 1, 1, 0, 0, 1), max_value=datetime(9999, 1, 1),
                       timezones=st.just(UTC)),
       ns=st.text(max_size=20), topic=st.text(max_size=30),
       event=st.none() | st.tuples(st.text(max_size=40), st.binary(max_size=64)))
def test_subscribers_bytes_are_betterprotos(ts, ns, topic, event):
    env = grpc_events.Envelope(timestamp=ts, namespace=ns, topic=topic)
    if event is not None:
        env.event = AnyMsg(type_url=event[0], value=event[1])
    ev = Event.of(0, env)
    assert ev.wire == bytes(env) == bytes(ev.envelope)
    assert ev.envelope == env


def test_subscribers_get_the_framed_envelope_the_bridge_would_send():
    env = grpc_events.Envelope(timestamp=datetime(2026, 12, 5, 20, 50, 57, 584307, tzinfo=UTC),
                               namespace="moby", topic="/tasks/exit",
                               event=AnyMsg(type_url="containerd.events.TaskExit", value=b"x"))
    ev = Event.of(0, env)
    answer = Encoded.serialized(grpc_events.Envelope, ev.wire)
    assert answer.framed == Encoded(env).framed
    method = handlers_for(EventsService(Exchange()), grpc_events.EventsBase)[
        "/containerd.services.events.v1.Events/Subscribe"]
    assert method.encode(answer) == Encoded(env).framed
    with pytest.raises(TypeError, match="answered Any"):
        method.encode(Encoded.serialized(AnyMsg, ev.wire))
