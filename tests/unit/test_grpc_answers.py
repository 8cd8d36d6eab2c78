"""Answers kept serialized (bridge.Encoded, AnswerCache): sent as the message would be,
and rebuilt as soon as what they were made from changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.core.api.containerd.services.namespaces.v1 import (
    ListNamespacesRequest,
    ListNamespacesResponse,
    NamespacesBase,
)
from berth.core.api.containerd.services.version.v1 import VersionBase, VersionResponse
from berth.core.grpc import bridge
from berth.core.grpc.context import CallContext
from berth.core.metadata.db import Database
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.services.namespaces import NamespacesLocal, NamespacesService
from berth.core.services.version import VersionService


def test_encoded_frames_exactly_as_the_message() -> None:
    msg = VersionResponse(version="1.2.3", revision="r")
    method = bridge.handlers_for(VersionService(), VersionBase)[
        "/containerd.services.version.v1.Version/Version"]
    assert method.encode(bridge.Encoded(msg)) == method.encode(msg)
    assert method.encode(bridge.Encoded(msg))[5:] == bytes(msg)


def test_encoded_answer_of_the_wrong_type_is_refused() -> None:
    method = bridge.handlers_for(VersionService(), VersionBase)[
        "/containerd.services.version.v1.Version/Version"]
    with pytest.raises(TypeError, match="answered ListNamespacesResponse"):
        method.encode(bridge.Encoded(ListNamespacesResponse()))


def test_answer_cache_builds_again_only_when_the_value_changes() -> None:
    built: list[object] = []

    def build(value: dict[str, str]) -> VersionResponse:
        built.append(value)
        return VersionResponse(version=value["v"])

    cache = bridge.AnswerCache()
    first = cache.get({"v": "1"}, build)
    assert cache.get({"v": "1"}, build) is first  # equal, not the same object
    second = cache.get({"v": "2"}, build)
    assert second is not first and bytes(second.message) == bytes(VersionResponse("2"))
    assert len(built) == 2


def test_namespace_list_follows_the_store(tmp_path: Path) -> None:
    store = NamespaceStore(Database(tmp_path / "meta.db"))
    store.create("a", {"k": "1"})
    svc = NamespacesService(NamespacesLocal(store, events=None))  # type: ignore[arg-type]
    method = bridge.handlers_for(svc, NamespacesBase)[
        "/containerd.services.namespaces.v1.Namespaces/List"]

    def listed() -> list[tuple[str, dict[str, str]]]:
        data = method.encode(svc.list(CallContext(), ListNamespacesRequest()))
        return [(n.name, dict(n.labels))
                for n in ListNamespacesResponse().parse(data[5:]).namespaces]

    assert listed() == [("a", {"k": "1"})]
    assert listed() == [("a", {"k": "1"})]
    store.set_labels("a", {"k": "2"})
    assert listed() == [("a", {"k": "2"})]
    store.create("b", {})
    assert listed() == [("a", {"k": "2"}), ("b", {})]


def test_namespace_get_follows_the_store(tmp_path: Path) -> None:
    from berth.core.api.containerd.services.namespaces.v1 import (
        GetNamespaceRequest,
        GetNamespaceResponse,
    )

    store = NamespaceStore(Database(tmp_path / "meta.db"))
    store.create("a", {"k": "1"})
    store.create("b", {})
    svc = NamespacesService(NamespacesLocal(store, events=None))  # type: ignore[arg-type]
    method = bridge.handlers_for(svc, NamespacesBase)[
        "/containerd.services.namespaces.v1.Namespaces/Get"]

    def got(name: str) -> tuple[str, dict[str, str]]:
        data = method.encode(svc.get(CallContext(), GetNamespaceRequest(name=name)))
        ns = GetNamespaceResponse().parse(data[5:]).namespace
        return ns.name, dict(ns.labels)

    assert got("a") == ("a", {"k": "1"})
    assert got("b") == ("b", {})
    assert got("a") == ("a", {"k": "1"})
    store.set_labels("a", {"k": "2"})
    assert got("a") == ("a", {"k": "2"})
    # containerd answers a missing namespace with its name and no labels.
    assert got("missing") == ("missing", {})
