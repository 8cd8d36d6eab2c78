"""``protowire.parse_flat`` against betterproto's own ``cls().parse``, the reference: for
every generated request/answer class it serves, on well-formed encodings and on any bytes,
both must give the same message (same field values and types, same bytes when encoded
again) or fail alike."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import betterproto
import pytest
from hypothesis import given, settings, strategies as st

import berth.core.api
from berth.core import protowire
from berth.core.api.containerd.services.content.v1 import InfoRequest, ReadContentRequest
from berth.core.api.containerd.services.leases.v1 import DeleteRequest
from berth.core.api.containerd.services.tasks.v1 import (
    CreateTaskRequest,
    GetRequest,
    KillRequest,
)


def _all_message_classes() -> list[type]:
    found: dict[str, type] = {}
    for mod in pkgutil.walk_packages(berth.core.api.__path__, "berth.core.api."):
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, betterproto.Message)
                    and obj.__module__ == module.__name__):
                found[f"{module.__name__}.{name}"] = obj
    return [found[k] for k in sorted(found)]


ALL = _all_message_classes()
FLAT = [cls for cls in ALL if protowire._plan(cls) is not None]


def _outcome(fn, cls: type, data: bytes):
    try:
        return "ok", fn(cls, data)
    except Exception as e:  # noqa: BLE001 - the kind of failure is what is compared
        return "error", type(e)


def _reference(cls: type, data: bytes):
    return cls().parse(data)


def assert_same(cls: type, data: bytes) -> None:
    want = _outcome(_reference, cls, data)
    got = _outcome(protowire.parse_flat, cls, data)
    assert got[0] == want[0], (cls, data, got, want)
    if want[0] == "error":
        assert got[1] is want[1]
        return
    a, b = got[1], want[1]
    assert type(a) is cls
    plan = protowire._plan(cls) or {}
    for name, _, _ in plan.values():
        va, vb = getattr(a, name), getattr(b, name)
        assert va == vb and type(va) is type(vb), (cls, name, va, vb)
    assert a == b
    assert bytes(a) == bytes(b)
    assert a._serialized_on_wire == b._serialized_on_wire


def test_plans_follow_the_generated_field_facts():
    assert len(FLAT) > 50  # most requests are flat: the fast path is worth having
    assert protowire._plan(InfoRequest) == {1: ("digest", "string", 2)}
    assert protowire._plan(ReadContentRequest) == {
        1: ("digest", "string", 2), 2: ("offset", "int64", 0), 3: ("size", "int64", 0)}
    assert protowire._plan(DeleteRequest) == {1: ("id", "string", 2), 2: ("sync", "bool", 0)}
    assert protowire._plan(KillRequest) is not None
    # Nested messages, repeated fields and maps are betterproto's.
    assert protowire._plan(CreateTaskRequest) is None


@pytest.mark.parametrize("msg", [
    InfoRequest(digest="sha256:" + "ab" * 32),
    ReadContentRequest(digest="sha256:" + "cd" * 32, offset=7, size=1 << 40),
    ReadContentRequest(digest="x", offset=-1, size=0),
    GetRequest(container_id="c1", exec_id="e1"),
    KillRequest(container_id="c", exec_id="", signal=9, all=True),
    DeleteRequest(id="lease", sync=True),
])
def test_well_formed_messages_read_alike(msg):
    assert_same(type(msg), bytes(msg))
    assert protowire.parse_flat(type(msg), bytes(msg)) == msg


def _varint(value: int) -> bytes:
    return protowire.encode_varint(value)


@st.composite
def _fields(draw, cls: type) -> bytes:
    """Encodings built from the class's fields, with wrong wire types, out-of-range
    integers, bad UTF-8, unknown fields and truncation mixed in."""
    plan = protowire._plan(cls) or {}
    numbers = sorted(plan) + [0, 1, 2, 15, 16, 99, 536870911]
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.sampled_from(numbers))
        wire = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
        if number in plan and draw(st.booleans()):
            wire = plan[number][2]
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.one_of(
                st.integers(0, 3), st.integers(0, (1 << 64) - 1),
                st.sampled_from([(1 << 31) - 1, 1 << 31, 1 << 32, (1 << 64) - (1 << 31),
                                 (1 << 63), (1 << 64) - 1, 1 << 64, 1 << 69]))))
        elif wire == 2:
            body = draw(st.one_of(st.text(max_size=20).map(str.encode),
                                  st.binary(max_size=20)))
            size = len(body) + draw(st.sampled_from([0, 0, 0, 1, -1]))
            out += _varint(max(size, 0)) + body
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
    if out and draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    return out


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_structured_encodings_read_alike(data):
    cls = data.draw(st.sampled_from(FLAT))
    assert_same(cls, data.draw(_fields(cls)))


@settings(max_examples=300, deadline=None)
@given(cls=st.sampled_from(FLAT), raw=st.binary(max_size=64))
def test_any_bytes_read_alike(cls, raw):
    assert_same(cls, raw)


@settings(max_examples=100, deadline=None)
@given(cls=st.sampled_from(ALL), raw=st.binary(max_size=32))
def test_other_classes_are_left_to_betterproto(cls, raw):
    if protowire._plan(cls) is None:
        assert_same(cls, raw)
