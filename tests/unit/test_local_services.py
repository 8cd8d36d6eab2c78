"""The local halves of containerd's local/gRPC split, called without gRPC (issue 10.4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.core import errdefs
from berth.core.api.containerd.services.tasks.v1 import ExecProcessRequest, GetRequest
from berth.core.events.exchange import Exchange
from berth.core.metadata.db import Database
from berth.core.metadata.leases import Resource
from berth.core.metadata.plugin import Metadata
from berth.core.plugin.graph import PluginSet
from berth.core.services.leases import LeaseManager
from berth.core.services.namespaces import NamespacesLocal
from berth.core.services.tasks import TasksLocal


@pytest.fixture
def md(tmp_path: Path) -> Metadata:
    m = Metadata(Database(tmp_path / "meta.db"))
    yield m
    m.db.close()


class _Recorder(Exchange):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, str]] = []

    def publish(self, namespace: str, topic: str, event: object) -> None:  # type: ignore[override]
        self.published.append((namespace, topic))


def test_namespaces_local_publishes_where_containerd_does(md: Metadata) -> None:
    exchange = _Recorder()
    local = NamespacesLocal(md.namespaces, exchange)
    local.create("ns1", {"a": "1"}, caller="default")
    local.update("ns1", {"b": "2"}, ["labels.b"], caller="default")
    assert local.labels("ns1") == {"a": "1", "b": "2"}
    assert ("ns1", {"a": "1", "b": "2"}) in local.list()
    with pytest.raises(errdefs.InvalidArgument, match='cannot update "name" field'):
        local.update("ns1", {}, ["name"], caller="default")
    local.delete("ns1")
    assert exchange.published == [("default", "/namespaces/create"),
                                  ("default", "/namespaces/update"),
                                  ("ns1", "/namespaces/delete")]


async def test_lease_manager_without_a_gc_scheduler(md: Metadata) -> None:
    manager = LeaseManager(md.leases, PluginSet())
    md.namespaces.create("ns1", {})
    lease = manager.create("ns1", "", {"x": "y"})
    assert lease.id
    manager.add_resource("ns1", lease.id, Resource(id="sha256:" + "a" * 64, type="content"))
    assert [r.type for r in manager.list_resources("ns1", lease.id)] == ["content"]
    await manager.delete("ns1", lease.id, sync=True)  # no scheduler: nothing to wait for
    assert manager.list("ns1", []) == []


async def test_tasks_local_checks_the_namespace_where_containerd_does(md: Metadata) -> None:
    local = TasksLocal(runtime=None, containers=md.containers)  # type: ignore[arg-type]
    with pytest.raises(errdefs.FailedPrecondition, match="namespace is required"):
        await local.get(None, GetRequest(container_id="c1"))
    with pytest.raises(errdefs.InvalidArgument, match="namespace validation"):
        await local.get("bad ns", GetRequest(container_id="c1"))
    # The exec id is checked before the namespace, as in containerd's local service.
    with pytest.raises(errdefs.InvalidArgument, match="exec id cannot be empty"):
        await local.exec(None, ExecProcessRequest(container_id="c1"))
    with pytest.raises(errdefs.NotFound):
        await local.get("ns1", GetRequest(container_id="c1"))
