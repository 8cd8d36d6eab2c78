"""containerd.services.snapshots.v1.Snapshots, and the snapshots service plugin under it.

Two plugins, as in containerd:

- ``io.containerd.service.v1.snapshots-service`` wraps every loaded snapshotter backend
  in a :class:`~core.metadata.snapshots.NamespacedSnapshotter` (its ``snapshotters``
  dict, by backend id) that publishes ``/snapshot/*`` events; the garbage collector
  uses the same objects (``gc_list``, ``gc_remove``, ``cleanup``);
- ``io.containerd.grpc.v1.snapshots`` translates the API onto them. The ``snapshotter``
  field of a request picks the snapshotter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs, log
from berth.core.api.containerd.services.snapshots.v1 import (
    CleanupRequest,
    CommitSnapshotRequest,
    Info,
    Kind,
    ListSnapshotsRequest,
    ListSnapshotsResponse,
    MountsRequest,
    MountsResponse,
    PrepareSnapshotRequest,
    PrepareSnapshotResponse,
    RemoveSnapshotRequest,
    SnapshotsBase,
    StatSnapshotRequest,
    StatSnapshotResponse,
    UpdateSnapshotRequest,
    UpdateSnapshotResponse,
    UsageRequest,
    UsageResponse,
    ViewSnapshotRequest,
    ViewSnapshotResponse,
)
from berth.core.grpc.bridge import AnswerCaches, Encoded
from berth.core.grpc.context import CallContext
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GRPC, METADATA, SERVICE, SNAPSHOTTER
from berth.core.snapshots import Info as SnapshotInfo, Kind as SnapshotKind

SERVICE_ID = "snapshots-service"
LIST_BATCH = 100
# Stat and Mounts answers kept serialized per (snapshotter, namespace, key), each made
# again whenever what the store answers now differs from what it was made from: ctr
# stats the image's snapshot every run and asks a container's mounts twice. Past this
# many the caches start over (a bound, not LRU).
ANSWERS = 256

_log = log.get("snapshots")


class SnapshotsServicePlugin:
    """The namespaced snapshotters, by name."""

    def __init__(self, snapshotters: dict[str, NamespacedSnapshotter]) -> None:
        self.snapshotters = snapshotters

    def get(self, name: str) -> NamespacedSnapshotter:
        if not name:
            raise errdefs.InvalidArgument("snapshotter argument missing")
        sn = self.snapshotters.get(name)
        if sn is None:
            raise errdefs.InvalidArgument(f"snapshotter not loaded: {name}")
        return sn


def to_api(info: SnapshotInfo) -> Info:
    # Kind(member): betterproto's enum members look like plain ints to mypy
    # (betterproto#616); the constructor gives back the same member, typed.
    kind = Kind({SnapshotKind.ACTIVE: Kind.ACTIVE, SnapshotKind.VIEW: Kind.VIEW}.get(
        info.kind, Kind.COMMITTED))
    return Info(name=info.name, parent=info.parent, kind=kind, created_at=info.created,
                updated_at=info.updated, labels=dict(info.labels))


def from_api(info: Info | None) -> SnapshotInfo:
    info = info or Info()
    kind = {Kind.ACTIVE: SnapshotKind.ACTIVE, Kind.VIEW: SnapshotKind.VIEW}.get(
        info.kind, SnapshotKind.COMMITTED)
    created = info.created_at if isinstance(info.created_at, datetime) else None
    updated = info.updated_at if isinstance(info.updated_at, datetime) else None
    out = SnapshotInfo(name=info.name, parent=info.parent, kind=kind, labels=dict(info.labels))
    if created is not None:
        out.created = created
    if updated is not None:
        out.updated = updated
    return out


class SnapshotsService:
    base = SnapshotsBase

    def __init__(self, service: SnapshotsServicePlugin) -> None:
        self.service = service
        self._stats = AnswerCaches(ANSWERS)
        self._mounts = AnswerCaches(ANSWERS)

    def _sn(self, name: str) -> NamespacedSnapshotter:
        return self.service.get(name)

    async def prepare(self, ctx: CallContext, req: PrepareSnapshotRequest
                      ) -> PrepareSnapshotResponse:
        sn = self._sn(req.snapshotter)
        mounts = await sn.prepare(ctx.namespace_required(), req.key, req.parent,
                                  dict(req.labels), lease=ctx.lease)
        return PrepareSnapshotResponse(mounts=[m.to_proto() for m in mounts])

    async def view(self, ctx: CallContext, req: ViewSnapshotRequest) -> ViewSnapshotResponse:
        sn = self._sn(req.snapshotter)
        mounts = await sn.view(ctx.namespace_required(), req.key, req.parent,
                               dict(req.labels), lease=ctx.lease)
        return ViewSnapshotResponse(mounts=[m.to_proto() for m in mounts])

    async def mounts(self, ctx: CallContext, req: MountsRequest) -> Encoded:
        name, key = req.snapshotter, req.key
        sn = self._sn(name)
        ns = ctx.namespace_required()
        mounts = await sn.mounts(ns, key)
        return self._mounts.get((name, ns, key), mounts,
                                lambda ms: MountsResponse(mounts=[m.to_proto() for m in ms]))

    async def commit(self, ctx: CallContext, req: CommitSnapshotRequest) -> Empty:
        sn = self._sn(req.snapshotter)
        await sn.commit(ctx.namespace_required(), req.name, req.key, dict(req.labels),
                        lease=ctx.lease)
        return Empty()

    async def remove(self, ctx: CallContext, req: RemoveSnapshotRequest) -> Empty:
        sn = self._sn(req.snapshotter)
        await sn.remove(ctx.namespace_required(), req.key, lease=ctx.lease)
        return Empty()

    async def stat(self, ctx: CallContext, req: StatSnapshotRequest) -> Encoded:
        name, key = req.snapshotter, req.key
        sn = self._sn(name)
        ns = ctx.namespace_required()
        info = await sn.stat(ns, key)
        return self._stats.get((name, ns, key), info,
                               lambda i: StatSnapshotResponse(info=to_api(i)))

    async def update(self, ctx: CallContext, req: UpdateSnapshotRequest
                     ) -> UpdateSnapshotResponse:
        sn = self._sn(req.snapshotter)
        paths = list(req.update_mask.paths) if req.update_mask else []
        info = await sn.update(ctx.namespace_required(), from_api(req.info), paths)
        return UpdateSnapshotResponse(info=to_api(info))

    async def list(self, ctx: CallContext, req: ListSnapshotsRequest,
                   send: Callable[[ListSnapshotsResponse], Awaitable[None]]) -> None:
        sn = self._sn(req.snapshotter)
        try:
            infos = await sn.walk(ctx.namespace_required(), list(req.filters))
        except errdefs.BerthError as e:
            # containerd returns Walk's error without converting it: it reaches the
            # client as Unknown, whatever its kind.
            raise errdefs.Unknown(e.message, raw=True) from None
        for i in range(0, len(infos), LIST_BATCH):
            await send(ListSnapshotsResponse(info=[to_api(x) for x in
                                                   infos[i:i + LIST_BATCH]]))

    async def usage(self, ctx: CallContext, req: UsageRequest) -> UsageResponse:
        sn = self._sn(req.snapshotter)
        u = await sn.usage(ctx.namespace_required(), req.key)
        return UsageResponse(size=u.size, inodes=u.inodes)

    async def cleanup(self, ctx: CallContext, req: CleanupRequest) -> Empty:
        # containerd 1.6 answers Unimplemented here (its metadata layer hides the
        # backend's Cleanup); berth does the work: unreferenced backend snapshots and
        # leftover directories go.
        await self._sn(req.snapshotter).cleanup()
        return Empty()


async def _init_service(ctx: InitContext) -> SnapshotsServicePlugin:
    from berth.core.gc.scheduler import notifier

    md = ctx.plugins.get(METADATA)
    exchange = ctx.plugins.get(EVENT)
    backends = ctx.plugins.by_type(SNAPSHOTTER)
    snapshotters = {
        name: NamespacedSnapshotter(md.db, name, backend, publish=exchange.publish,
                                    mutated=notifier(ctx.plugins, snapshotter=name))
        for name, backend in backends.items()
    }
    # Recover from a crash before serving: backend snapshots that never got (or lost)
    # their record, and directories of interrupted calls. Nothing is in flight yet.
    for name, sn in snapshotters.items():
        try:
            await sn.cleanup()
        except Exception as e:
            _log.warning("snapshotter cleanup failed", snapshotter=name, error=str(e))
    return SnapshotsServicePlugin(snapshotters)


async def _init_grpc(ctx: InitContext) -> SnapshotsService:
    return SnapshotsService(ctx.plugins.get(SERVICE, SERVICE_ID))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        Registration(type=SERVICE, id=SERVICE_ID, init=_init_service,
                     requires=(EVENT, METADATA, SNAPSHOTTER)),
        Registration(type=GRPC, id="snapshots", init=_init_grpc, requires=(SERVICE,)),
    ]
