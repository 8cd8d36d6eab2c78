"""The Snapshots gRPC service as plain calls, on plugins initialised by the real graph."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import trio
from betterproto.lib.google.protobuf import FieldMask

from berth.core import errdefs
from berth.core.api.containerd.services.snapshots.v1 import (
    CleanupRequest,
    CommitSnapshotRequest,
    Info,
    Kind,
    ListSnapshotsRequest,
    MountsRequest,
    PrepareSnapshotRequest,
    RemoveSnapshotRequest,
    StatSnapshotRequest,
    UpdateSnapshotRequest,
    UsageRequest,
    ViewSnapshotRequest,
)
from berth.core.grpc.context import CallContext
from berth.core.plugin.graph import collect, host_platform, init_all, plugin_manager
from berth.core.plugin.registration import GRPC, METADATA, SERVICE, SNAPSHOTTER
from berth.core.services.snapshots import LIST_BATCH, SnapshotsService
from berth.plugins.snapshotters.overlayfs import OverlaySnapshotter

MODULES = [
    "berth.core.metadata.plugin",
    "berth.core.events.plugin",
    "berth.plugins.snapshotters.overlayfs",
    "berth.plugins.snapshotters.native",
    "berth.core.services.snapshots",
]


@contextlib.asynccontextmanager
async def initialised(tmp_path: Path):  # noqa: ANN201
    async with trio.open_nursery() as nursery:
        ps = await init_all(
            collect(plugin_manager(MODULES, entry_points=False)), root=tmp_path / "root",
            state=tmp_path / "state", plugin_config={}, daemon_config=None, nursery=nursery,
        )
        try:
            yield ps
        finally:
            for p in ps.by_type(SNAPSHOTTER).values():
                p.close()
            ps.get(METADATA).db.close()
            nursery.cancel_scope.cancel()


@pytest.fixture
async def plugins(tmp_path: Path):  # noqa: ANN201
    async with initialised(tmp_path) as ps:
        yield ps


@pytest.fixture
def svc(plugins) -> SnapshotsService:  # noqa: ANN001
    return plugins.get(GRPC, "snapshots")


def ctx(ns: str | None = "default", lease: str | None = None) -> CallContext:
    md = {}
    if ns:
        md["containerd-namespace"] = ns
    if lease:
        md["containerd-lease"] = lease
    return CallContext(metadata=md)


async def test_plugins_register_like_containerds(plugins, tmp_path: Path) -> None:  # noqa: ANN001
    by_uri = {p.registration.uri: p for p in plugins.ordered}
    ovl = by_uri["io.containerd.snapshotter.v1.overlayfs"]
    nat = by_uri["io.containerd.snapshotter.v1.native"]
    assert ovl.ok and nat.ok
    assert ovl.platforms == [host_platform()] == nat.platforms
    assert ovl.exports == {"root": str(tmp_path / "root" / ovl.registration.uri)}
    service = plugins.get(SERVICE, "snapshots-service")
    assert sorted(service.snapshotters) == ["native", "overlayfs"]
    assert by_uri["io.containerd.grpc.v1.snapshots"].ok


async def test_unknown_or_missing_snapshotter(svc: SnapshotsService) -> None:
    with pytest.raises(errdefs.InvalidArgument,
                       match="^snapshotter not loaded: nope: invalid argument$"):
        await svc.stat(ctx(), StatSnapshotRequest(snapshotter="nope", key="k"))
    with pytest.raises(errdefs.InvalidArgument,
                       match="^snapshotter argument missing: invalid argument$"):
        await svc.prepare(ctx(), PrepareSnapshotRequest(key="k"))
    with pytest.raises(errdefs.FailedPrecondition, match="^namespace is required"):
        await svc.prepare(ctx(None), PrepareSnapshotRequest(snapshotter="native", key="k"))


async def test_round_trip(svc: SnapshotsService, plugins) -> None:  # noqa: ANN001
    s = "overlayfs"
    r = await svc.prepare(ctx(), PrepareSnapshotRequest(snapshotter=s, key="a",
                                                        labels={"l": "1"}))
    (m,) = r.mounts
    assert (m.type, m.options) == ("bind", ["rw", "rbind"])
    await svc.commit(ctx(), CommitSnapshotRequest(snapshotter=s, name="a-c", key="a"))
    (m,) = (await svc.view(ctx(), ViewSnapshotRequest(snapshotter=s, key="v",
                                                       parent="a-c"))).mounts
    assert (m.type, m.options) == ("bind", ["ro", "rbind"])
    assert (await svc.mounts(ctx(), MountsRequest(snapshotter=s, key="v"))).message.mounts \
        == [m]
    info = (await svc.stat(ctx(), StatSnapshotRequest(snapshotter=s, key="v"))).message.info
    assert (info.name, info.parent, info.kind) == ("v", "a-c", Kind.VIEW)
    assert info.created_at.tzinfo is not None

    upd = await svc.update(ctx(), UpdateSnapshotRequest(
        snapshotter=s, info=Info(name="a-c", labels={"x": "y"}),
        update_mask=FieldMask(paths=["labels.x"])))
    assert upd.info.labels == {"x": "y"} and upd.info.kind == Kind.COMMITTED
    with pytest.raises(errdefs.InvalidArgument, match='cannot update "name" field'):
        await svc.update(ctx(), UpdateSnapshotRequest(
            snapshotter=s, info=Info(name="a-c"), update_mask=FieldMask(paths=["name"])))

    u = await svc.usage(ctx(), UsageRequest(snapshotter=s, key="a-c"))
    assert u.inodes == 1 and u.size > 0

    with pytest.raises(errdefs.FailedPrecondition, match="cannot remove snapshot with child"):
        await svc.remove(ctx(), RemoveSnapshotRequest(snapshotter=s, key="a-c"))
    await svc.remove(ctx(), RemoveSnapshotRequest(snapshotter=s, key="v"))
    await svc.remove(ctx(), RemoveSnapshotRequest(snapshotter=s, key="a-c"))
    await svc.cleanup(ctx(), CleanupRequest(snapshotter=s))
    assert await plugins.get(SNAPSHOTTER, s).walk() == []


async def test_kept_stat_and_mounts_answers_follow_the_store(
        svc: SnapshotsService) -> None:
    # Answers are kept serialized, but made from what the store says at each call:
    # an update, a remove and a new snapshot under the same key are all seen.
    s = "overlayfs"
    await svc.prepare(ctx(), PrepareSnapshotRequest(snapshotter=s, key="base"))
    await svc.commit(ctx(), CommitSnapshotRequest(snapshotter=s, name="img", key="base"))

    async def stat(key: str) -> Info:
        return (await svc.stat(ctx(), StatSnapshotRequest(snapshotter=s, key=key))).message.info

    async def mounts(key: str) -> list:
        return (await svc.mounts(ctx(), MountsRequest(snapshotter=s, key=key))).message.mounts

    first = await stat("img")
    again = await svc.stat(ctx(), StatSnapshotRequest(snapshotter=s, key="img"))
    assert again.message.info == first and first.labels == {}
    await svc.update(ctx(), UpdateSnapshotRequest(
        snapshotter=s, info=Info(name="img", labels={"x": "y"}),
        update_mask=FieldMask(paths=["labels.x"])))
    assert (await stat("img")).labels == {"x": "y"}

    (m,) = (await svc.prepare(ctx(), PrepareSnapshotRequest(
        snapshotter=s, key="run", parent="img"))).mounts
    assert await mounts("run") == [m] == await mounts("run")
    await svc.remove(ctx(), RemoveSnapshotRequest(snapshotter=s, key="run"))
    with pytest.raises(errdefs.NotFound):
        await mounts("run")
    with pytest.raises(errdefs.NotFound):
        await stat("run")
    # The same key again, now a view: another directory, other mounts, another kind.
    (v,) = (await svc.view(ctx(), ViewSnapshotRequest(snapshotter=s, key="run",
                                                      parent="img"))).mounts
    assert await mounts("run") == [v] != [m]
    assert (await stat("run")).kind == Kind.VIEW


async def test_list_streams_in_batches_and_filters(svc: SnapshotsService) -> None:
    for i in range(LIST_BATCH + 5):
        await svc.view(ctx(), ViewSnapshotRequest(snapshotter="native", key=f"k{i:03}",
                                                  labels={"even": str(i % 2 == 0)}))
    sent = []

    async def send(msg) -> None:  # noqa: ANN001
        sent.append(msg)

    await svc.list(ctx(), ListSnapshotsRequest(snapshotter="native"), send)
    assert [len(m.info) for m in sent] == [LIST_BATCH, 5]
    assert [i.name for m in sent for i in m.info] == [f"k{i:03}" for i in range(LIST_BATCH + 5)]
    sent.clear()
    await svc.list(ctx(), ListSnapshotsRequest(snapshotter="native",
                                               filters=["labels.even==True,name~=k00"]), send)
    assert [i.name for m in sent for i in m.info] == ["k000", "k002", "k004", "k006", "k008"]
    sent.clear()
    await svc.list(ctx("other"), ListSnapshotsRequest(snapshotter="native"), send)
    assert sent == []
    # containerd does not convert Walk's error: clients see Unknown.
    with pytest.raises(errdefs.Unknown, match=r"^filters: parse error: .*: invalid argument$"):
        await svc.list(ctx(), ListSnapshotsRequest(snapshotter="native", filters=["a=="]),
                       send)


async def test_lease_header_is_honoured(svc: SnapshotsService, plugins) -> None:  # noqa: ANN001
    leases = plugins.get(METADATA).leases
    leases.create("default", "l", {})
    await svc.prepare(ctx(lease="l"), PrepareSnapshotRequest(snapshotter="native", key="k"))
    assert [(r.type, r.id) for r in leases.list_resources("default", "l")] == [
        ("snapshots/native", "k")]
    with pytest.raises(errdefs.NotFound, match="^lease does not exist: not found$"):
        await svc.prepare(ctx(lease="nope"),
                          PrepareSnapshotRequest(snapshotter="native", key="k2"))


async def test_start_up_removes_what_a_crash_left(tmp_path: Path) -> None:
    async with initialised(tmp_path) as ps:
        svc = ps.get(GRPC, "snapshots")
        await svc.prepare(ctx(), PrepareSnapshotRequest(snapshotter="overlayfs", key="kept"))
    # What a crash can leave: a backend snapshot whose record was never written, and
    # directories of interrupted calls.
    root = tmp_path / "root" / "io.containerd.snapshotter.v1.overlayfs"
    backend = OverlaySnapshotter(root)
    await backend.prepare("default/7/lost")
    backend.close()
    (root / "snapshots" / "new-123").mkdir()
    (root / "snapshots" / "rm-9").mkdir()
    async with initialised(tmp_path) as ps:
        assert [i.name for i in await ps.get(SNAPSHOTTER, "overlayfs").walk()] == [
            "default/1/kept"]
        assert os.listdir(root / "snapshots") == ["1"]
        svc = ps.get(GRPC, "snapshots")
        info = (await svc.stat(ctx(), StatSnapshotRequest(snapshotter="overlayfs",
                                                          key="kept"))).message.info
        assert info.kind == Kind.ACTIVE
