"""The containers store and service: containerd's metadata/containers.go behaviour."""

from __future__ import annotations

from pathlib import Path

import betterproto
import pytest
import trio
from betterproto.lib.google.protobuf import Any as AnyMsg, FieldMask

from berth.core import errdefs
from berth.core.api.containerd import events as ev
from berth.core.api.containerd.services.containers.v1 import (
    Container as PbContainer,
    ContainerRuntime,
    CreateContainerRequest,
    DeleteContainerRequest,
    GetContainerRequest,
    ListContainersRequest,
    UpdateContainerRequest,
)
from berth.core.events import typeurl
from berth.core.events.exchange import Exchange
from berth.core.gc import mark
from berth.core.gc.collector import Collector
from berth.core.grpc.context import CallContext
from berth.core.metadata.containers import Container, ContainerStore, gc_roots
from berth.core.metadata.db import Database
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.services.containers import ContainersLocal, ContainersService

SPEC = b'{"ociVersion":"1.0.2-dev"}'


def spec() -> AnyMsg:
    return AnyMsg(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                  value=SPEC)


def container(cid: str = "c1", **kw) -> Container:
    kw.setdefault("runtime_name", "io.containerd.runc.v2")
    kw.setdefault("spec", spec())
    return Container(id=cid, **kw)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "meta.db")
    yield d
    d.close()


@pytest.fixture
def store(db: Database) -> ContainerStore:
    return ContainerStore(db)


def test_the_database_registers_each_namespace_check_once(db: Database) -> None:
    # Opening the database migrated every table and registered every check (images,
    # content, containers, snapshots); building stores registers nothing more.
    ContainerStore(db), ContainerStore(db)
    assert len(db.namespace_checks) == 4
    assert len(set(db.namespace_checks)) == 4


def test_create_get_roundtrip(store: ContainerStore) -> None:
    opts = AnyMsg(type_url="containerd.runc.v1.Options", value=b"")
    opts._serialized_on_wire = True
    created = store.create("default", container(
        "c1", labels={"a": "1", "empty": ""}, image="docker.io/library/busybox:latest",
        snapshotter="overlayfs", snapshot_key="c1-snap", runtime_options=opts,
        extensions={"ext": AnyMsg(type_url="x", value=b"\x01")},
    ))
    # An empty label value is no label at all, on create too.
    assert created.labels == {"a": "1"}
    assert created.created_at == created.updated_at
    got = store.get("default", "c1")
    assert got.labels == {"a": "1"}
    assert got.spec is not None and got.spec.value == SPEC
    assert got.spec.type_url.endswith("runtime-spec/1/Spec")
    # An options Any that was set but empty stays set (Go's non-nil pointer).
    assert got.runtime_options is not None and got.runtime_options.type_url == opts.type_url
    assert betterproto.serialized_on_wire(got.runtime_options)
    assert got.extensions["ext"].value == b"\x01"
    assert (got.image, got.snapshotter, got.snapshot_key) == (
        "docker.io/library/busybox:latest", "overlayfs", "c1-snap")
    assert got.created_at == created.created_at


def test_create_validation_messages(store: ContainerStore) -> None:
    with pytest.raises(errdefs.AlreadyExists, match='^container "c1": already exists$'):
        store.create("default", container("c1"))
        store.create("default", container("c1"))
    cases = [
        (container("bad id"), 'create container failed validation: container.ID: identifier '
                              '"bad id" must match'),
        (container("c2", runtime_name=""), "create container failed validation: "
                                           "container.Runtime.Name must be set: invalid argument"),
        (container("c2", spec=None), "create container failed validation: container.Spec "
                                     "must be set: invalid argument"),
        (container("c2", snapshot_key="k"), "container.Snapshotter must be set if "
                                            "container.SnapshotKey is set: invalid argument"),
        (container("c2", extensions={"": AnyMsg()}),
         "container.Extension keys must not be zero-length: invalid argument"),
        (container("c2", labels={"k": "v" * 4096}),
         r"containers.Labels: label key and value greater than maximum size \(4096 bytes\), "
         "key: k: invalid argument"),
    ]
    for c, message in cases:
        with pytest.raises(errdefs.InvalidArgument, match=message):
            store.create("default", c)
    assert [c.id for c in store.list("default")] == ["c1"]


def test_get_and_delete_not_found_wording(store: ContainerStore) -> None:
    with pytest.raises(errdefs.NotFound,
                       match='^container "x" in namespace "ns1": not found$'):
        store.get("ns1", "x")
    # Before the namespace ever held a container (bolt has no bucket yet)...
    with pytest.raises(errdefs.NotFound,
                       match='^cannot delete container "x" in namespace "ns1": not found$'):
        store.delete("ns1", "x")
    with pytest.raises(errdefs.NotFound,
                       match='^cannot update container "x" in namespace "ns1": not found$'):
        store.update("ns1", container("x"))
    store.create("ns1", container("c1"))
    store.delete("ns1", "c1")
    # ...and after: the bucket stays.
    with pytest.raises(errdefs.NotFound, match="^container x: not found$"):
        store.delete("ns1", "x")
    with pytest.raises(errdefs.NotFound, match='^container "x": not found$'):
        store.update("ns1", container("x"))


def test_list_order_filters_and_namespaces(store: ContainerStore) -> None:
    store.create("default", container("b", labels={"role": "web", "a.b": "x"}))
    store.create("default", container("a", image="img1"))
    store.create("default", container("c", runtime_name="io.containerd.berth.v1"))
    store.create("other", container("z"))
    assert [c.id for c in store.list("default")] == ["a", "b", "c"]
    assert [c.id for c in store.list("default", ["labels.role==web"])] == ["b"]
    assert [c.id for c in store.list("default", ['labels."a.b"==x'])] == ["b"]
    assert [c.id for c in store.list("default", ["image==img1"])] == ["a"]
    assert [c.id for c in store.list("default", ["runtime.name~=berth"])] == ["c"]
    # A list of filters matches when any does.
    assert [c.id for c in store.list("default", ["id==a", "id==c"])] == ["a", "c"]
    # Not filterable in containerd: always absent.
    assert store.list("default", ["snapshotter==overlayfs"]) == []
    assert [c.id for c in store.list("other")] == ["z"]
    with pytest.raises(errdefs.InvalidArgument, match="invalid argument: invalid argument$"):
        store.list("default", ["labels."])


def test_update_field_masks(store: ContainerStore) -> None:
    store.create("default", container("c1", labels={"a": "1", "b": "2"}, image="i1",
                                      snapshotter="s", snapshot_key="k1",
                                      extensions={"e1": AnyMsg(type_url="t1")}))
    before = store.get("default", "c1")
    req = container("c1", labels={"a": "9", "c": "3"}, image="i2", snapshotter="s",
                    snapshot_key="k2", extensions={"e2": AnyMsg(type_url="t2")},
                    spec=AnyMsg(type_url="s2", value=b"{}"))
    u = store.update("default", req, ["labels.a", "labels.b"])
    # labels.b is missing from the request: the label goes.
    assert u.labels == {"a": "9"}
    assert u.image == "i1" and u.snapshot_key == "k1"
    assert u.created_at == before.created_at and u.updated_at > before.updated_at
    u = store.update("default", req, ["image", "snapshotkey", "spec"])
    assert (u.image, u.snapshot_key, u.spec.type_url) == ("i2", "k2", "s2")
    # Extensions are only ever added to (bolt's CreateBucketIfNotExists)...
    u = store.update("default", req, ["extensions"])
    assert sorted(u.extensions) == ["e1", "e2"]
    # ...and a named key missing from the request is stored as an empty Any.
    u = store.update("default", req, ["extensions.e9"])
    assert u.extensions["e9"].type_url == ""
    with pytest.raises(errdefs.InvalidArgument,
                       match='^cannot update "runtime" field on "c1": invalid argument$'):
        store.update("default", req, ["runtime"])
    # An empty mask replaces the mutable fields; immutable ones must match.
    u = store.update("default", container("c1", snapshotter="s", labels={"z": "1"}))
    assert u.labels == {"z": "1"} and u.image == "" and u.snapshot_key == ""
    with pytest.raises(errdefs.InvalidArgument,
                       match="^container.Snapshotter field is immutable: invalid argument$"):
        store.update("default", container("c1", snapshotter="other"))
    with pytest.raises(errdefs.InvalidArgument,
                       match="^container.Runtime.Name field is immutable: invalid argument$"):
        store.update("default", container("c1", snapshotter="s", runtime_name="x.y.z"))
    with pytest.raises(errdefs.InvalidArgument, match="^update failed validation: container."
                                                      "Spec must be set"):
        store.update("default", container("c1", spec=None), ["spec"])
    with pytest.raises(errdefs.InvalidArgument, match="must specify a container id"):
        store.update("default", container(""), ["image"])
    assert store.get("default", "c1").labels == {"z": "1"}


def test_namespace_with_containers_cannot_be_deleted(db: Database,
                                                     store: ContainerStore) -> None:
    namespaces = NamespaceStore(db)
    store.create("ns1", container("c1"))
    assert "ns1" in [n.name for n in namespaces.list()]  # created implicitly
    with pytest.raises(errdefs.FailedPrecondition,
                       match='namespace "ns1" must be empty, but it still has containers'):
        namespaces.delete("ns1")
    store.delete("ns1", "c1")
    namespaces.delete("ns1")
    # The bucket went with the namespace: not-found wording is the bucketless one again.
    with pytest.raises(errdefs.NotFound, match="cannot delete container"):
        store.delete("ns1", "c1")


def test_gc_roots_are_snapshots_and_label_refs(db: Database, store: ContainerStore) -> None:
    store.create("ns1", container("c1", snapshotter="overlayfs", snapshot_key="c1", labels={
        "containerd.io/gc.ref.content.m": "sha256:" + "a" * 64,
        "containerd.io/gc.ref.snapshot.native": "base",
        "other": "x",
    }))
    store.create("ns2", container("c2"))
    with db.read() as c:
        roots = set(gc_roots(c))
    assert roots == {
        mark.snapshot("ns1", "overlayfs", "c1"),
        mark.content("ns1", "sha256:" + "a" * 64),
        mark.snapshot("ns1", "native", "base"),
    }
    # The hook the collector offers accepts it and puts the roots in its graph.
    collector = Collector(db)
    collector.add_root_source("containers", gc_roots)
    with db.read() as c:
        assert set(collector.graph(c, {}).extra_roots) == roots


def test_reads_are_kept_parsed_and_every_write_drops_them(store: ContainerStore) -> None:
    store.create("default", container("c1", labels={"a": "1"}))
    first = store.get("default", "c1")
    # What a caller gets is its own: changing it changes nothing the next reader sees.
    first.labels["a"] = "changed"
    first.spec = AnyMsg(type_url="x", value=b"{}")
    again = store.get("default", "c1")
    assert again.labels == {"a": "1"} and again.spec.value == SPEC
    built: list[str] = []

    def build(c: Container) -> str:
        built.append(c.labels.get("b", ""))
        return f"answer {c.labels.get('b', '')}"

    assert store.answer("default", "c1", "k", build) == "answer "
    assert store.answer("default", "c1", "k", build) == "answer "
    assert built == [""]  # made once while the row stays
    store.update("default", container("c1", labels={"b": "2"}), ["labels.b"])
    assert store.get("default", "c1").labels == {"a": "1", "b": "2"}
    assert store.answer("default", "c1", "k", build) == "answer 2"
    store.delete("default", "c1")
    with pytest.raises(errdefs.NotFound):
        store.get("default", "c1")
    with pytest.raises(errdefs.NotFound):
        store.answer("default", "c1", "k", build)
    # A new container under the same id is read afresh.
    store.create("default", container("c1", image="img2"))
    assert store.get("default", "c1").image == "img2"
    assert store.answer("default", "c1", "k", build) == "answer "


def test_stores_over_one_database_share_what_they_keep(db: Database) -> None:
    a, b = ContainerStore(db), ContainerStore(db)
    a.create("default", container("c1", image="one"))
    assert b.get("default", "c1").image == "one"
    a.update("default", container("c1", image="two"), ["image"])
    assert b.get("default", "c1").image == "two"
    a.delete("default", "c1")
    with pytest.raises(errdefs.NotFound):
        b.get("default", "c1")


def test_the_kept_reads_are_bounded(store: ContainerStore, monkeypatch) -> None:
    from berth.core.metadata import containers as mod

    monkeypatch.setattr(mod, "CACHE_SIZE", 3)
    for i in range(5):
        store.create("default", container(f"c{i}"))
        store.get("default", f"c{i}")
    assert len(store._cache) == 3
    assert [store.get("default", f"c{i}").id for i in range(5)] == [f"c{i}" for i in range(5)]


# -- the gRPC service, called directly ------------------------------------------------


def ctx(ns: str | None = "default") -> CallContext:
    return CallContext(metadata={"containerd-namespace": ns} if ns else {})


async def test_service_crud_and_events(db: Database) -> None:
    exchange = Exchange()
    svc = ContainersService(ContainersLocal(ContainerStore(db), exchange))
    sub = exchange.subscribe()
    deletions: list[bool] = []
    svc.local.mutated = deletions.append
    pb = PbContainer(id="c1", labels={"a": "1"}, image="img",
                     runtime=ContainerRuntime(name="io.containerd.runc.v2",
                                              options=AnyMsg(type_url="containerd.runc.v1.Options")),
                     spec=spec())
    created = svc.create(ctx(), CreateContainerRequest(container=pb)).container
    assert created.runtime.options.type_url == "containerd.runc.v1.Options"
    assert created.created_at == created.updated_at and created.created_at.year >= 2024
    got = svc.get(ctx(), GetContainerRequest(id="c1")).message.container
    assert bytes(got) == bytes(created)
    # Wire round trip: what ctr receives decodes to the same container.
    assert bytes(PbContainer().parse(bytes(got))) == bytes(got)
    updated = svc.update(ctx(), UpdateContainerRequest(
        container=PbContainer(id="c1", labels={"b": "2"}),
        update_mask=FieldMask(paths=["labels.b"]))).container
    assert updated.labels == {"a": "1", "b": "2"}
    assert [c.id for c in svc.list(ctx(), ListContainersRequest(filters=["labels.b==2"]))
            .containers] == ["c1"]
    sent = []

    async def send(msg) -> None:
        sent.append(msg.container.id)

    await svc.list_stream(ctx(), ListContainersRequest(), send)
    assert sent == ["c1"]
    svc.delete(ctx(), DeleteContainerRequest(id="c1"))
    assert deletions == [True]
    with pytest.raises(errdefs.NotFound, match="container c1: not found"):
        svc.delete(ctx(), DeleteContainerRequest(id="c1"))
    topics, payloads = [], []
    while True:
        try:
            e = sub._recv.receive_nowait()
        except trio.WouldBlock:
            break
        topics.append(e.envelope.topic)
        payloads.append(typeurl.unmarshal_any(e.envelope.event))
    assert topics == ["/containers/create", "/containers/update", "/containers/delete"]
    assert payloads[0] == ev.ContainerCreate(
        id="c1", image="img", runtime=ev.ContainerCreateRuntime(
            name="io.containerd.runc.v2",
            options=AnyMsg(type_url="containerd.runc.v1.Options")))
    assert payloads[1] == ev.ContainerUpdate(id="c1", image="img", labels={"a": "1", "b": "2"})
    assert payloads[2] == ev.ContainerDelete(id="c1")


async def test_service_errors(db: Database) -> None:
    svc = ContainersService(ContainersLocal(ContainerStore(db), Exchange()))
    with pytest.raises(errdefs.FailedPrecondition, match="namespace is required"):
        svc.get(ctx(None), GetContainerRequest(id="c1"))
    # The id check comes before the namespace check, as in containerd.
    with pytest.raises(errdefs.InvalidArgument, match="^Container.ID required$"):
        svc.update(ctx(None), UpdateContainerRequest(container=PbContainer()))
    with pytest.raises(errdefs.InvalidArgument, match="container.Spec must be set"):
        svc.create(ctx(), CreateContainerRequest(container=PbContainer(
            id="c1", runtime=ContainerRuntime(name="io.containerd.runc.v2"))))
    with pytest.raises(errdefs.InvalidArgument, match="container.Runtime.Name must be set"):
        svc.create(ctx(), CreateContainerRequest(container=PbContainer(id="c1", spec=spec())))


async def test_gc_wiring_registers_roots_and_reports_deletions(db: Database) -> None:
    from berth.core.gc.scheduler import GCScheduler
    from berth.core.plugin.graph import Plugin, PluginSet
    from berth.core.plugin.registration import GC, Registration
    from berth.core.services.containers import wire_gc

    plugins = PluginSet()
    assert wire_gc(plugins) is None  # no scheduler: nothing to wire
    scheduler = GCScheduler(Collector(db))
    plugins.add(Plugin(Registration(type=GC, id="scheduler", init=None), instance=scheduler))
    notify = wire_gc(plugins)
    assert notify is not None
    ContainerStore(db).create("ns1", container("c1", snapshotter="native", snapshot_key="k"))
    with db.read() as c:
        assert scheduler.collector.graph(c, {}).extra_roots == [
            mark.snapshot("ns1", "native", "k")]
    svc = ContainersService(ContainersLocal(ContainerStore(db), Exchange()))
    svc.local.mutated = notify
    svc.delete(ctx("ns1"), DeleteContainerRequest(id="c1"))
    assert scheduler._deletions == 1  # a deletion: a collection is due
