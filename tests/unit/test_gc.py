"""Garbage collection: the marking rules on small graphs, then whole collections."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from berth.core import errdefs
from berth.core.content import ContentStore, digest as dg
from berth.core.gc import mark
from berth.core.gc.collector import Collector
from berth.core.gc.mark import Graph, Ingest, Kind, Lease, Node, Snapshot
from berth.core.gc.scheduler import Config, GCScheduler, parse_duration
from berth.core.metadata.content import NamespacedContent
from berth.core.metadata.db import Database
from berth.core.metadata.images import Descriptor, Image, ImageStore
from berth.core.metadata.leases import LeaseStore, Resource

NOW = 1_700_000_000 * 1_000_000_000
A, B, C, D = (dg.from_string(x) for x in "abcd")


def c(d: str, ns: str = "ns") -> Node:
    return mark.content(ns, d)


def sn(key: str, ns: str = "ns", snapshotter: str = "overlayfs") -> Node:
    return mark.snapshot(ns, snapshotter, key)


# --- marking on hand-made graphs ----------------------------------------------------------

def test_image_roots_content_and_label_refs_are_followed() -> None:
    g = Graph()
    g.content[("ns", A)] = {"containerd.io/gc.ref.content.config": B,
                            "containerd.io/gc.ref.content.l/0": C,
                            "containerd.io/gc.reference": D}  # not a ref label
    g.content[("ns", B)] = {}
    g.content[("ns", C)] = {}
    g.content[("ns", D)] = {}
    g.images = [("ns", A, {})]
    reachable = mark.mark(g, NOW)
    assert {c(A), c(B), c(C)} <= reachable
    assert c(D) not in reachable
    assert mark.plan(g, reachable).content == [c(D)]


def test_bare_content_ref_label_counts_and_namespaces_stay_apart() -> None:
    g = Graph()
    g.content[("ns", A)] = {"containerd.io/gc.ref.content": B}
    g.content[("ns", B)] = {}
    g.content[("other", B)] = {}
    g.images = [("ns", A, {})]
    p = mark.plan(g, mark.mark(g, NOW))
    assert p.content == [c(B, "other")]


def test_image_labels_reference_content_and_snapshots() -> None:
    g = Graph()
    g.content[("ns", A)] = {}
    g.content[("ns", B)] = {}
    g.add_snapshot(Snapshot("ns", "overlayfs", "top"))
    g.images = [("ns", A, {"containerd.io/gc.ref.content.x": B,
                           "containerd.io/gc.ref.snapshot.overlayfs/x": "top"})]
    assert mark.plan(g, mark.mark(g, NOW)).empty


def test_gc_root_label_keeps_content_and_what_it_references() -> None:
    g = Graph()
    g.content[("ns", A)] = {"containerd.io/gc.root": "x",
                            "containerd.io/gc.ref.content.m": B}
    g.content[("ns", B)] = {}
    g.content[("ns", C)] = {}
    assert mark.plan(g, mark.mark(g, NOW)).content == [c(C)]


def test_leases_keep_resources_until_they_expire() -> None:
    g = Graph()
    for d in (A, B, C):
        g.content[("ns", d)] = {}
    g.ingests[("ns", "pull")] = Ingest("ns", "pull")  # leased: no expiry of its own
    g.add_snapshot(Snapshot("ns", "native", "k"))
    future = "2999-01-01T00:00:00Z"
    past = "2000-01-01T00:00:00Z"
    g.leases = [
        Lease("ns", "live", {"containerd.io/gc.expire": future},
              [("content", A), ("ingests", "pull"), ("snapshots/native", "k")]),
        Lease("ns", "old", {"containerd.io/gc.expire": past}, [("content", B)]),
    ]
    reachable = mark.mark(g, NOW)
    assert {c(A), Node(Kind.INGEST, "ns", "pull"), sn("k", snapshotter="native"),
            Node(Kind.LEASE, "ns", "live")} <= reachable
    p = mark.plan(g, reachable)
    assert sorted(p.content) == sorted([c(B), c(C)])
    assert p.leases == [Node(Kind.LEASE, "ns", "old")]
    assert p.ingests == [] and p.snapshots == {}


def test_invalid_expiry_is_ignored_and_reported() -> None:
    g = Graph()
    g.content[("ns", A)] = {}
    g.leases = [Lease("ns", "l", {"containerd.io/gc.expire": "tomorrow"}, [("content", A)])]
    warned: list[tuple[str, str]] = []
    assert mark.plan(g, mark.mark(g, NOW, lambda *a: warned.append(a))).empty
    assert warned == [("l", "tomorrow")]


def test_flat_lease_does_not_follow_labels_but_follows_parents() -> None:
    g = Graph()
    g.content[("ns", A)] = {"containerd.io/gc.ref.content.x": B}
    g.content[("ns", B)] = {}
    g.add_snapshot(Snapshot("ns", "overlayfs", "base"))
    g.add_snapshot(Snapshot("ns", "overlayfs", "top", "base",
                            {"containerd.io/gc.ref.content.y": C}))
    g.content[("ns", C)] = {}
    g.leases = [Lease("ns", "f", {"containerd.io/gc.flat": ""},
                      [("content", A), ("snapshots/overlayfs", "top")])]
    p = mark.plan(g, mark.mark(g, NOW))
    assert sorted(p.content) == sorted([c(B), c(C)])
    assert p.snapshots == {}


def test_flat_and_normal_paths_to_the_same_content_both_count() -> None:
    g = Graph()
    g.content[("ns", A)] = {"containerd.io/gc.ref.content.x": B}
    g.content[("ns", B)] = {}
    g.leases = [Lease("ns", "f", {"containerd.io/gc.flat": ""}, [("content", A)])]
    g.images = [("ns", A, {})]
    assert mark.plan(g, mark.mark(g, NOW)).empty


def test_unleased_ingests_live_until_their_expiry_and_keep_expected_blob() -> None:
    g = Graph()
    g.content[("ns", A)] = {}
    g.ingests[("ns", "fresh")] = Ingest("ns", "fresh", expected=A, expire_ns=NOW + 1)
    g.ingests[("ns", "stale")] = Ingest("ns", "stale", expire_ns=NOW - 1)
    g.ingests[("ns", "orphan")] = Ingest("ns", "orphan")  # its lease is gone
    p = mark.plan(g, mark.mark(g, NOW))
    assert sorted(n.key for n in p.ingests) == ["orphan", "stale"]
    assert p.content == []


def test_snapshot_chain_label_refs_and_leaf_first_removal() -> None:
    g = Graph()
    g.content[("ns", A)] = {}
    g.add_snapshot(Snapshot("ns", "overlayfs", "l1"))
    g.add_snapshot(Snapshot("ns", "overlayfs", "l2", "l1"))
    g.add_snapshot(Snapshot("ns", "overlayfs", "l3", "l2",
                            {"containerd.io/gc.ref.content.layer": A}))
    g.add_snapshot(Snapshot("ns", "overlayfs", "x1"))
    g.add_snapshot(Snapshot("ns", "overlayfs", "x2", "x1"))
    g.add_snapshot(Snapshot("ns", "overlayfs", "x3", "x2"))
    g.add_snapshot(Snapshot("ns", "overlayfs", "x2b", "x1"))
    g.add_snapshot(Snapshot("ns", "native", "rooted", "", {"containerd.io/gc.root": "1"}))
    # A container keeps its snapshot (and so the whole chain and the layer blob).
    g.extra_roots = [sn("l3")]
    p = mark.plan(g, mark.mark(g, NOW))
    assert p.content == []
    order = [k for _, k in p.snapshots["overlayfs"]]
    assert sorted(order) == ["x1", "x2", "x2b", "x3"]
    assert order.index("x3") < order.index("x2") < order.index("x1")
    assert order.index("x2b") < order.index("x1")
    assert "native" not in p.snapshots


def test_label_refs_name_the_snapshotter_before_any_slash() -> None:
    refs = list(mark.label_refs("ns", {
        "containerd.io/gc.ref.snapshot.overlayfs": "a",
        "containerd.io/gc.ref.snapshot.native/extra": "b",
        "containerd.io/gc.ref.contentx": "no",
    }))
    assert refs == [sn("b", snapshotter="native"), sn("a")]


def test_dead_edges_are_harmless() -> None:
    g = Graph()
    g.images = [("ns", A, {})]  # target never committed
    g.add_snapshot(Snapshot("ns", "overlayfs", "child", "missing-parent"))
    g.extra_roots = [sn("child")]
    assert mark.plan(g, mark.mark(g, NOW)).empty


# --- whole collections over the metadata database -------------------------------------------

class FakeSnapshotter:
    """The interface the snapshot service offers the collector."""

    def __init__(self) -> None:
        self.snaps: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
        self.removed: list[tuple[str, str]] = []
        self.cleanups = 0

    def gc_list(self) -> list[tuple[str, str, str, dict[str, str]]]:
        return [(ns, key, parent, labels) for (ns, key), (parent, labels) in self.snaps.items()]

    async def gc_remove(self, namespace: str, key: str) -> None:
        children = [k for (ns, k), (p, _) in self.snaps.items() if ns == namespace and p == key]
        if children:
            raise errdefs.FailedPrecondition(f"cannot remove snapshot with child: {key}")
        await trio.lowlevel.checkpoint()
        del self.snaps[(namespace, key)]
        self.removed.append((namespace, key))

    async def cleanup(self) -> None:
        self.cleanups += 1


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "meta.db")
    yield d
    d.close()


@pytest.fixture
def backend(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "content")


async def commit(cs: NamespacedContent, ns: str, data: bytes, labels: dict[str, str] | None = None,
                 lease: str | None = None) -> str:
    w = await cs.writer(ns, f"ref-{dg.from_bytes(data)}", lease=lease)
    await w.write(data)
    return await w.commit(len(data), "", labels)


def image(name: str, digest: str, labels: dict[str, str] | None = None) -> Image:
    return Image(name, Descriptor("application/vnd.oci.image.manifest.v1+json", digest, 1),
                 labels or {})


async def test_collection_removes_unreferenced_records_blobs_and_snapshots(
        db: Database, backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    images = ImageStore(db)
    snaps = FakeSnapshotter()
    collector = Collector(db, snapshotters=lambda: {"overlayfs": snaps}, content=lambda: cs)

    layer = await commit(cs, "ns", b"layer")
    config = await commit(cs, "ns", b"config")
    manifest = await commit(cs, "ns", b"manifest", {
        "containerd.io/gc.ref.content.config": config,
        "containerd.io/gc.ref.content.l.0": layer,
        "containerd.io/gc.ref.snapshot.overlayfs": "chain-top",
    })
    stray = await commit(cs, "ns", b"stray")
    # The same blob in another namespace: the record goes, the bytes stay for "ns".
    await commit(cs, "other", b"layer")
    images.create("ns", image("app", manifest))
    snaps.snaps[("ns", "chain-base")] = ("", {})
    snaps.snaps[("ns", "chain-top")] = ("chain-base", {})
    snaps.snaps[("ns", "junk-base")] = ("", {})
    snaps.snaps[("ns", "junk-mid")] = ("junk-base", {})
    snaps.snaps[("ns", "junk-leaf")] = ("junk-mid", {})

    stats = await collector.collect()
    assert (stats.content, stats.blobs) == (2, 1)  # stray here, layer in "other"; one file
    assert sorted(d for ns, d, _ in cs.gc_list() if ns == "ns") == sorted([layer, config,
                                                                           manifest])
    assert [ns for ns, _, _ in cs.gc_list()].count("other") == 0
    assert not backend.blob_path(stray).exists()
    assert backend.blob_path(layer).exists()
    assert snaps.removed == [("ns", "junk-leaf"), ("ns", "junk-mid"), ("ns", "junk-base")]
    assert snaps.cleanups == 1 and stats.snapshots == {"overlayfs": 3}

    # Deleting the image frees everything it held, bytes included.
    images.delete("ns", "app")
    stats = await collector.collect()
    assert stats.content == 3 and cs.gc_list() == []
    assert sorted(p.name for p in (backend.blobs / "sha256").iterdir()) == []
    assert snaps.snaps == {}


async def test_lease_holds_content_until_deleted_and_expired_leases_are_removed(
        db: Database, backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    leases = LeaseStore(db)
    collector = Collector(db, content=lambda: cs)
    leases.create("ns", "hold", {})
    leases.create("ns", "gone", {"containerd.io/gc.expire": "2001-01-01T00:00:00Z"})
    kept = await commit(cs, "ns", b"kept", lease="hold")
    lost = await commit(cs, "ns", b"lost", lease="gone")
    assert leases.list_resources("ns", "hold") == [Resource(id=kept, type="content")]

    stats = await collector.collect()
    assert (stats.content, stats.leases) == (1, 1)
    assert [lease.id for lease in leases.list("ns")] == ["hold"]
    assert backend.blob_path(kept).exists() and not backend.blob_path(lost).exists()

    leases.delete("ns", "hold")
    await collector.collect()
    assert not backend.blob_path(kept).exists()


async def test_ingests_expire_unless_leased_and_backend_ingests_follow(
        db: Database, backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    leases = LeaseStore(db)
    collector = Collector(db, content=lambda: cs)
    leases.create("ns", "l", {})
    w = await cs.writer("ns", "leased", lease="l")
    await w.write(b"part")
    await w.close()
    w = await cs.writer("ns", "fresh")
    await w.write(b"part")
    await w.close()
    w = await cs.writer("ns", "stale")
    await w.write(b"part")
    await w.close()
    with db.write() as conn:
        conn.execute("UPDATE content_ingests SET expire_ns = ? WHERE ref = 'stale'",
                     (time.time_ns() - 1,))

    stats = await collector.collect()
    assert stats.ingests == 1 and stats.backend_ingests == 1
    assert sorted(s.ref for s in await cs.list_statuses("ns")) == ["fresh", "leased"]

    leases.delete("ns", "l")
    await collector.collect()
    assert [s.ref for s in await cs.list_statuses("ns")] == ["fresh"]
    assert len([s async for s in backend.list_statuses()]) == 1


async def test_registered_root_sources_keep_their_objects(db: Database,
                                                          backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    snaps = FakeSnapshotter()
    snaps.snaps[("ns", "rootfs")] = ("", {"containerd.io/gc.ref.content.cfg": ""})
    collector = Collector(db, snapshotters=lambda: {"overlayfs": snaps}, content=lambda: cs)
    spec = await commit(cs, "ns", b"spec")
    collector.add_root_source("containers", lambda conn: [
        mark.snapshot("ns", "overlayfs", "rootfs"),
        *mark.label_refs("ns", {"containerd.io/gc.ref.content.spec": spec}),
    ])
    stats = await collector.collect()
    assert stats.content == 0 and snaps.removed == []

    def broken(conn: object) -> list[Node]:
        raise RuntimeError("containers table unreadable")

    collector.add_root_source("containers", broken)
    with pytest.raises(RuntimeError):
        await collector.collect()
    assert [d for _, d, _ in cs.gc_list()] == [spec]  # nothing dropped without its roots


async def test_collection_without_snapshot_service_leaves_snapshots_alone(
        db: Database, backend: ContentStore) -> None:
    cs = NamespacedContent(db, backend)
    collector = Collector(db, content=lambda: cs)
    await commit(cs, "ns", b"x")
    stats = await collector.collect()
    assert stats.content == 1 and stats.snapshots == {}


# --- the scheduler ------------------------------------------------------------------------

class CountingCollector:
    def __init__(self) -> None:
        self.runs = 0
        self.dirty_content = False
        self.dirty_snapshotters: set[str] = set()

    async def collect(self) -> object:
        from berth.core.gc.collector import Stats

        self.runs += 1
        await trio.sleep(0.001)
        return Stats(meta_d=0.001)


def test_config_parses_go_durations_and_clamps() -> None:
    cfg = Config.from_plugin({"pause_threshold": 0.9, "schedule_delay": "1m30s",
                              "startup_delay": "250ms", "mutation_threshold": -3})
    assert cfg.pause_threshold == 0.5 and cfg.mutation_threshold == 0
    assert cfg.schedule_delay == 90 and cfg.startup_delay == 0.25
    assert parse_duration("1.5h") == 5400 and parse_duration("0") == 0
    with pytest.raises(errdefs.InvalidArgument):
        parse_duration("soon")


async def test_scheduler_runs_at_startup_then_only_when_needed(
        autojump_clock: trio.testing.MockClock) -> None:
    col = CountingCollector()
    s = GCScheduler(col, Config())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await trio.sleep(0.2)
        assert col.runs == 1  # the startup collection
        for _ in range(5):
            s.mutated(False)
        await trio.sleep(5)
        assert col.runs == 1  # mutations below the threshold: ticks are skipped
        s.mutated(True)
        await trio.sleep(1)
        assert col.runs == 2  # a deletion makes the next tick collect
        stats = await s.schedule_and_wait()
        assert col.runs == 3 and stats.meta_d == 0.001
        for _ in range(100):
            s.mutated(False)
        await trio.sleep(1)
        assert col.runs == 4  # the mutation threshold
        nursery.cancel_scope.cancel()


async def test_scheduler_pending_trigger_and_failure_reach_waiters(
        autojump_clock: trio.testing.MockClock) -> None:
    col = CountingCollector()
    s = GCScheduler(col, Config(startup_delay=0))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        pending = s.trigger()
        await trio.sleep(0.5)
        assert col.runs == 1
        await pending  # already done: returns at once

        async def fail() -> object:
            raise RuntimeError("disk on fire")

        col.collect = fail  # type: ignore[method-assign]
        with pytest.raises(errdefs.Unknown, match="^gc failed$"):
            await s.schedule_and_wait()
        nursery.cancel_scope.cancel()


class FakePlugins:
    """A plugin set still initialising: entries appear over time."""

    def __init__(self) -> None:
        self.ordered: list[SimpleNamespace] = []

    def add(self, *requires: str) -> None:
        self.ordered.append(SimpleNamespace(registration=SimpleNamespace(requires=requires)))

    def get(self, type_: str, id_: str | None = None) -> object:
        raise errdefs.NotFound(f"{type_}.{id_}")


async def test_first_collection_waits_until_plugins_are_initialised(
        autojump_clock: trio.testing.MockClock) -> None:
    col = CountingCollector()
    s = GCScheduler(col, Config())  # type: ignore[arg-type]
    plugins = FakePlugins()
    plugins.add("io.containerd.metadata.v1")
    s.wire(plugins)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await trio.sleep(5)
        assert col.runs == 0  # a containers store could still register its roots
        plugins.add("*")  # the plugins that need everything come last
        await trio.sleep(1)
        assert col.runs == 1
        nursery.cancel_scope.cancel()


def test_idle_ticks_are_computed_not_waited_for() -> None:
    from berth.core.gc.scheduler import _tick_after

    assert _tick_after(10.0, 0.05, 9.0) == 10.0  # still ahead: unchanged
    assert _tick_after(10.0, 0.5, 10.0) == 10.5
    assert _tick_after(10.0, 0.5, 11.2) == pytest.approx(11.5)  # the ticks skipped meanwhile
    assert _tick_after(10.0, 0.0, 12.0) == 12.0  # no spacing: due now


async def test_idle_scheduler_sleeps_until_something_is_due(
        autojump_clock: trio.testing.MockClock) -> None:
    col = CountingCollector()
    s = GCScheduler(col, Config())  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await trio.sleep(0.5)
        assert col.runs == 1
        before = s.wakeups
        await trio.sleep(600)  # ten minutes of nothing to do
        assert s.wakeups - before <= 1
        # Changes wake it only when they move a collection.
        before = s.wakeups
        for _ in range(50):
            s.mutated(False)  # below the mutation threshold: nothing is due
        await trio.testing.wait_all_tasks_blocked()
        assert s.wakeups == before
        s.mutated(True)  # the next tick now has work: one wake-up arms it
        for _ in range(20):
            s.mutated(True)  # already armed: no more wake-ups
        await trio.testing.wait_all_tasks_blocked()
        assert s.wakeups == before + 1
        await trio.sleep(1)
        assert col.runs == 2  # a deletion is still collected at the next tick
        assert s._deletions == 0
        nursery.cancel_scope.cancel()


async def test_a_failed_collection_is_tried_again_without_a_new_change(
        autojump_clock: trio.testing.MockClock) -> None:
    col = CountingCollector()
    s = GCScheduler(col, Config())  # type: ignore[arg-type]
    real = col.collect
    failures = [RuntimeError("disk on fire")]

    async def flaky() -> object:
        if failures:
            raise failures.pop()
        return await real()

    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await trio.sleep(0.5)
        assert col.runs == 1
        col.collect = flaky  # type: ignore[method-assign]
        s.mutated(True)
        await trio.sleep(5)
        assert not failures and col.runs == 2  # failed once, then collected
        nursery.cancel_scope.cancel()


async def test_changes_during_a_collection_count_for_the_next(
        autojump_clock: trio.testing.MockClock) -> None:
    col = CountingCollector()
    s = GCScheduler(col, Config(startup_delay=0))  # type: ignore[arg-type]
    real = col.collect

    async def slow() -> object:
        s.mutated(True)  # while the collector runs
        return await real()

    col.collect = slow  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await s.schedule_and_wait()
        assert col.runs == 1
        await trio.sleep(1)
        assert col.runs >= 2  # the deletion made during the first one was collected
        nursery.cancel_scope.cancel()
