"""The namespaced snapshot layer over a real backend, a real metadata db and an exchange."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from berth.core import errdefs
from berth.core.api.containerd.events import SnapshotCommit, SnapshotPrepare, SnapshotRemove
from berth.core.events import typeurl
from berth.core.events.exchange import Exchange
from berth.core.metadata.db import Database
from berth.core.metadata.leases import LeaseStore, Resource
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.snapshots import Info, Kind
from berth.plugins.snapshotters.native import NativeSnapshotter
from berth.plugins.snapshotters.overlayfs import OverlaySnapshotter


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "meta.db")
    yield d
    d.close()


@pytest.fixture
def exchange() -> Exchange:
    return Exchange()


@pytest.fixture
def backend(tmp_path: Path) -> OverlaySnapshotter:
    b = OverlaySnapshotter(tmp_path / "overlayfs", index_off=True, userxattr=False)
    yield b
    b.close()


@pytest.fixture
def sn(db: Database, backend: OverlaySnapshotter, exchange: Exchange) -> NamespacedSnapshotter:
    return NamespacedSnapshotter(db, "overlayfs", backend, publish=exchange.publish)


async def test_keys_are_per_namespace(sn: NamespacedSnapshotter,
                                      backend: OverlaySnapshotter) -> None:
    (a,) = await sn.prepare("ns1", "k", labels={"x": "1"})
    (b,) = await sn.prepare("ns2", "k", labels={"x": "2"})
    assert a.source != b.source
    assert (await sn.stat("ns1", "k")).labels == {"x": "1"}
    assert (await sn.stat("ns2", "k")).labels == {"x": "2"}
    # Backend keys are containerd's "<namespace>/<seq>/<key>"; its labels are only the
    # inherited ones.
    assert [(i.name, i.labels) for i in await backend.walk()] == [
        ("ns1/1/k", {}), ("ns2/1/k", {})]
    await sn.remove("ns1", "k")
    with pytest.raises(errdefs.NotFound, match="^snapshot k does not exist: not found$"):
        await sn.stat("ns1", "k")
    assert (await sn.stat("ns2", "k")).kind == Kind.ACTIVE
    assert [i.name for i in await backend.walk()] == ["ns2/1/k"]


async def test_chain_stat_walk_and_errors(sn: NamespacedSnapshotter) -> None:
    ns = "default"
    await sn.prepare(ns, "a", labels={"containerd.io/snapshot/keep": "y", "local": "z"})
    await sn.commit(ns, "a-c", "a", labels={"containerd.io/gc.root": "t"})
    info = await sn.stat(ns, "a-c")
    assert (info.name, info.parent, info.kind) == ("a-c", "", Kind.COMMITTED)
    assert info.labels == {"containerd.io/gc.root": "t"}  # commit labels replace
    await sn.prepare(ns, "b", "a-c")
    await sn.view(ns, "v", "a-c")
    with pytest.raises(errdefs.AlreadyExists, match=r'^snapshot "b": already exists$'):
        await sn.prepare(ns, "b")
    with pytest.raises(errdefs.NotFound, match="^parent snapshot a does not exist: not found$"):
        await sn.prepare(ns, "x", "a")
    with pytest.raises(errdefs.InvalidArgument, match=r'^failed to create snapshot: parent '
                       r'"default/3/b" is not committed snapshot: invalid argument$'):
        await sn.prepare(ns, "x", "b")
    with pytest.raises(errdefs.FailedPrecondition, match=r'^failed to commit snapshot: '
                       r'snapshot "default/4/v" is not active: failed precondition$'):
        await sn.commit(ns, "x", "v")
    with pytest.raises(errdefs.AlreadyExists, match=r'^snapshot "a-c": already exists$'):
        await sn.commit(ns, "a-c", "b")
    with pytest.raises(errdefs.NotFound, match="^snapshot nope does not exist: not found$"):
        await sn.commit(ns, "y", "nope")
    with pytest.raises(errdefs.FailedPrecondition,
                       match="^cannot remove snapshot with child: failed precondition$"):
        await sn.remove(ns, "a-c")
    with pytest.raises(errdefs.Unknown, match="^bucket name required$"):
        await sn.prepare(ns, "")
    with pytest.raises(errdefs.InvalidArgument, match=r"^info.Labels: label key and value "):
        await sn.prepare(ns, "big", labels={"k": "v" * 5000})

    names = [(i.name, i.parent, i.kind) for i in await sn.walk(ns)]
    assert names == [("a-c", "", Kind.COMMITTED), ("b", "a-c", Kind.ACTIVE),
                     ("v", "a-c", Kind.VIEW)]
    assert [i.name for i in await sn.walk(ns, ["kind==active"])] == ["b"]
    assert [i.name for i in await sn.walk(ns, ["parent==a-c,kind!=view"])] == ["b"]
    assert [i.name for i in await sn.walk(ns, ["labels.\"containerd.io/gc.root\""])] == ["a-c"]
    with pytest.raises(errdefs.InvalidArgument, match="parse error"):
        await sn.walk(ns, ["labels."])
    assert await sn.walk("empty") == []
    # Prepares that failed in the backend ("x" on "b", and "") consumed sequence numbers
    # (5 and 6) as containerd's do; the failed commit did not.
    (m,) = await sn.prepare(ns, "next", "a-c")
    assert m.type == "overlay"
    assert (await sn.backend.walk(["name~=next"]))[0].name == "default/7/next"


async def test_update_label_paths(sn: NamespacedSnapshotter) -> None:
    await sn.prepare("n", "a", labels={"a": "1", "b": "2",
                                       "containerd.io/snapshot/i": "3"})
    before = await sn.stat("n", "a")
    info = await sn.update("n", Info("a", labels={"b": "", "c": "4"}), ["labels.b", "labels.c"])
    assert info.labels == {"a": "1", "c": "4", "containerd.io/snapshot/i": "3"}
    assert info.created == before.created and info.updated > before.updated
    assert (await sn.stat("n", "a")).labels == info.labels
    info = await sn.update("n", Info("a", labels={"only": "this"}))
    assert info.labels == {"only": "this"}
    assert (await sn.backend.stat("n/1/a")).labels == {}  # inherited label went too
    with pytest.raises(errdefs.InvalidArgument, match=r'^cannot update "parent" field on '
                       r'snapshot "a": invalid argument$'):
        await sn.update("n", Info("a"), ["parent"])
    with pytest.raises(errdefs.InvalidArgument, match="^invalid argument$"):
        await sn.update("n", Info(""), ["labels"])
    with pytest.raises(errdefs.NotFound, match="^snapshot z does not exist: not found$"):
        await sn.update("n", Info("z"), ["labels"])


async def test_events_carry_keys(sn: NamespacedSnapshotter, exchange: Exchange) -> None:
    sub = exchange.subscribe()
    await sn.prepare("n", "a")
    await sn.commit("n", "a-c", "a")
    await sn.view("n", "v", "a-c")  # containerd publishes nothing for a view
    await sn.remove("n", "v")
    sub.close()
    got = [(e.envelope.namespace, e.envelope.topic, typeurl.unmarshal_any(e.envelope.event))
           async for e in sub]
    assert [(ns, t) for ns, t, _ in got] == [
        ("n", "/snapshot/prepare"), ("n", "/snapshot/commit"), ("n", "/snapshot/remove")]
    prep, commit, rm = (ev for _, _, ev in got)
    assert isinstance(prep, SnapshotPrepare) and (prep.key, prep.parent) == ("a", "")
    assert isinstance(commit, SnapshotCommit) and (commit.key, commit.name) == ("a", "a-c")
    assert isinstance(rm, SnapshotRemove) and rm.key == "v"


async def test_lease_holds_created_snapshots(sn: NamespacedSnapshotter, db: Database) -> None:
    leases = LeaseStore(db)
    leases.create("n", "l1", {})
    kind = "snapshots/overlayfs"
    with pytest.raises(errdefs.NotFound, match="^lease does not exist: not found$"):
        await sn.prepare("n", "a", lease="missing")
    assert await sn.walk("n") == []  # the backend snapshot was taken back
    assert await sn.backend.walk() == []
    await sn.prepare("n", "a", lease="l1")
    assert leases.list_resources("n", "l1") == [Resource("a", kind)]
    await sn.commit("n", "a-c", "a", lease="l1")
    assert leases.list_resources("n", "l1") == [Resource("a-c", kind)]
    await sn.view("n", "v", "a-c", lease="l1")
    await sn.remove("n", "v", lease="l1")
    assert leases.list_resources("n", "l1") == [Resource("a-c", kind)]


async def test_namespace_delete_names_the_snapshotters(db: Database, tmp_path: Path,
                                                      sn: NamespacedSnapshotter) -> None:
    native = NativeSnapshotter(tmp_path / "native")
    try:
        nsn = NamespacedSnapshotter(db, "native", native)
        store = NamespaceStore(db)
        await sn.prepare("n", "a")
        await nsn.prepare("n", "a")
        with pytest.raises(errdefs.FailedPrecondition, match=r'^namespace "n" must be empty, '
                           r'but it still has snapshots on "native" snapshotter, snapshots '
                           r'on "overlayfs" snapshotter: failed precondition$'):
            store.delete("n")
        await sn.remove("n", "a")
        await nsn.remove("n", "a")
        store.delete("n")
        # A new namespace of that name starts its sequence again, as bolt's buckets do.
        await sn.prepare("n", "b")
        assert [i.name for i in await sn.backend.walk()] == ["n/1/b"]
    finally:
        native.close()


async def test_gc_interface(sn: NamespacedSnapshotter) -> None:
    await sn.prepare("n1", "a")
    await sn.commit("n1", "a-c", "a", labels={"containerd.io/gc.root": "x"})
    await sn.prepare("n1", "b", "a-c")
    await sn.view("n2", "v")
    assert sorted(sn.gc_list()) == [
        ("n1", "a-c", "", {"containerd.io/gc.root": "x"}),
        ("n1", "b", "a-c", {}),
        ("n2", "v", "", {}),
    ]
    await sn.gc_remove("n1", "b")
    await sn.gc_remove("n1", "a-c")
    await sn.gc_remove("n1", "gone")  # already gone: nothing to do
    assert sn.gc_list() == [("n2", "v", "", {})]
    assert [i.name for i in await sn.backend.walk()] == ["n2/1/v"]


async def test_cleanup_collects_unrecorded_backend_snapshots(
        sn: NamespacedSnapshotter, backend: OverlaySnapshotter) -> None:
    await sn.prepare("n", "kept")
    # Backend snapshots a crash left without records: a chain and a loose one.
    await backend.prepare("n/9/lost")
    await backend.commit("n/10/lost-c", "n/9/lost")
    await backend.prepare("n/11/child", "n/10/lost-c")
    (backend.snapshots_dir / "new-dead").mkdir()
    await sn.cleanup()
    assert [i.name for i in await backend.walk()] == ["n/1/kept"]
    assert sorted(os.listdir(backend.snapshots_dir)) == ["1"]
    assert (await sn.stat("n", "kept")).kind == Kind.ACTIVE


async def test_cleanup_spares_snapshots_being_created(
        db: Database, tmp_path: Path) -> None:
    native = NativeSnapshotter(tmp_path / "slow")
    gate = trio.Event()
    entered = trio.Event()
    real = native.view

    async def slow_view(key: str, parent: str = "", labels: object = None) -> object:
        result = await real(key, parent, labels)
        entered.set()
        await gate.wait()  # created in the backend, not yet recorded
        return result

    native.view = slow_view  # type: ignore[method-assign]
    nsn = NamespacedSnapshotter(db, "native", native)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nsn.view, "n", "v")
            await entered.wait()
            # The view is created in the backend but not recorded: cleanup must skip it
            # (and must not wait for it). fail_after only turns a hang into a failure.
            with trio.fail_after(10):
                await nsn.cleanup()
            assert [i.name for i in await native.walk()] == ["n/1/v"]
            gate.set()
        assert [i.name for i in await nsn.walk("n")] == ["v"]
        await nsn.cleanup()
        assert [i.name for i in await native.walk()] == ["n/1/v"]
    finally:
        native.close()
