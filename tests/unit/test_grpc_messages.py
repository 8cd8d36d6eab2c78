"""berth.core.grpc.messages: betterproto messages behave the same with the cheaper methods."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import betterproto
import pytest
from betterproto.lib.google.protobuf import Any as AnyMsg, Empty, ListValue, Struct, Value

from berth.core.api.containerd.services.containers.v1 import (
    Container,
    ContainerRuntime,
    GetContainerResponse,
    UpdateContainerRequest,
)
from berth.core.grpc import messages

T = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


@dataclass(eq=False, repr=False)
class Holder(betterproto.Message):
    empty: Empty = betterproto.message_field(1)


@pytest.fixture
def both() -> Iterator[Callable[[Callable[[], Any]], tuple[Any, Any]]]:
    """Runs a scenario with betterproto's own methods and then with ours."""

    def run(scenario: Callable[[], Any]) -> tuple[Any, Any]:
        messages.uninstall()
        try:
            theirs = scenario()
        finally:
            messages.install()
        return theirs, scenario()

    yield run
    messages.install()


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("value", fn())
    except AttributeError as e:
        return ("AttributeError", str(e), e.name)


def test_installed_by_the_bridge() -> None:
    import berth.core.grpc.bridge  # noqa: F401

    assert betterproto.Message.__getattribute__ is messages._getattribute
    assert betterproto.Message.__setattr__ is messages._setattr


def test_construction_defaults_and_wire_bytes(both: Any) -> None:
    def scenario() -> Any:
        c = Container(id="c1", labels={"a": "b"}, runtime=ContainerRuntime(name="r"),
                      spec=AnyMsg(type_url="t", value=b"{}"), created_at=T)
        blank = Container()
        return (bytes(c), c.to_dict(), betterproto.serialized_on_wire(c),
                betterproto.serialized_on_wire(blank), blank.labels, blank.runtime.name,
                betterproto.serialized_on_wire(blank.runtime), bytes(blank),
                c.image, c.updated_at, c == Container().parse(bytes(c)))

    theirs, ours = both(scenario)
    assert ours == theirs
    assert ours[2] is True and ours[3] is False and ours[6] is False


def test_parsed_presence_of_empty_submessages(both: Any) -> None:
    wire = bytes(UpdateContainerRequest(container=Container(id="x"), update_mask=None))

    def scenario() -> Any:
        c = Container(id="e")
        c.spec = AnyMsg()
        c.spec._serialized_on_wire = True
        parsed = Container().parse(bytes(c))
        req = UpdateContainerRequest().parse(wire)
        return (bytes(c), betterproto.serialized_on_wire(parsed.spec),
                betterproto.serialized_on_wire(parsed.runtime),
                betterproto.serialized_on_wire(req.update_mask), req.container.id)

    theirs, ours = both(scenario)
    assert ours == theirs
    assert ours[1] is True and ours[2] is False


def test_setting_an_empty_message_marks_it_present(both: Any) -> None:
    def scenario() -> Any:
        resp = GetContainerResponse()
        later = Holder()
        later.empty = Empty()
        holder = Value()
        holder.struct_value = Struct()
        return (bytes(Holder(empty=Empty())), bytes(later), bytes(Holder()),
                betterproto.serialized_on_wire(resp.container), bytes(holder))

    theirs, ours = both(scenario)
    assert ours == theirs
    assert ours[:3] == (b"\x0a\x00", b"\x0a\x00", b"")


def test_oneof_selection_and_errors(both: Any) -> None:
    def scenario() -> Any:
        v = Value(number_value=1.5)
        first = (betterproto.which_one_of(v, "kind"), outcome(lambda: v.string_value),
                 outcome(lambda: v.number_value))
        v.string_value = "s"
        second = (betterproto.which_one_of(v, "kind"), outcome(lambda: v.number_value),
                  outcome(lambda: v.string_value), bytes(v))
        w = Value()
        unset = (betterproto.which_one_of(w, "kind"), outcome(lambda: w.bool_value))
        lv = ListValue(values=[Value(bool_value=True), Value(null_value=0)])
        parsed = Value().parse(bytes(Value(list_value=lv)))
        return first, second, unset, betterproto.which_one_of(parsed, "kind")[0], \
            bytes(parsed)

    theirs, ours = both(scenario)
    assert ours == theirs
    assert ours[0][1][0] == "AttributeError"  # a not-selected member still raises
    assert ours[1][1][0] == "AttributeError"


def test_missing_attributes_still_raise(both: Any) -> None:
    def scenario() -> Any:
        c = Container(id="x")
        return outcome(lambda: c.no_such_field), hasattr(c, "_group_current")

    theirs, ours = both(scenario)
    assert ours == theirs
    assert ours[0][0] == "AttributeError"
