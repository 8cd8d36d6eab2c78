"""containerd.services.containers.v1.Containers over the containers metadata store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import betterproto
from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs, log
from berth.core.api.containerd.events import (
    ContainerCreate,
    ContainerCreateRuntime,
    ContainerDelete,
    ContainerUpdate,
)
from berth.core.api.containerd.services.containers.v1 import (
    Container,
    ContainerRuntime,
    ContainersBase,
    CreateContainerRequest,
    CreateContainerResponse,
    DeleteContainerRequest,
    GetContainerRequest,
    GetContainerResponse,
    ListContainerMessage,
    ListContainersRequest,
    ListContainersResponse,
    UpdateContainerRequest,
    UpdateContainerResponse,
)
from berth.core.events.exchange import Exchange
from berth.core.grpc.context import CallContext
from berth.core.metadata import containers as store
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GC, GRPC, METADATA

_log = log.get("containers")


def to_proto(c: store.Container) -> Container:
    runtime = ContainerRuntime(name=c.runtime_name)
    if c.runtime_options is not None:
        runtime.options = c.runtime_options
    out = Container(
        id=c.id,
        labels=dict(c.labels),
        image=c.image,
        runtime=runtime,
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        created_at=c.created_at,
        updated_at=c.updated_at,
        extensions=dict(c.extensions),
    )
    if c.spec is not None:
        out.spec = c.spec
    return out


def from_proto(pb: Container | None) -> store.Container:
    pb = pb or Container()
    runtime = pb.runtime
    return store.Container(
        id=pb.id,
        runtime_name=runtime.name if runtime is not None else "",
        runtime_options=(runtime.options
                         if runtime is not None and store.present(runtime.options) else None),
        spec=pb.spec if store.present(pb.spec) else None,
        labels=dict(pb.labels),
        image=pb.image,
        snapshotter=pb.snapshotter,
        snapshot_key=pb.snapshot_key,
        extensions=dict(pb.extensions),
    )


class ContainersService:
    base = ContainersBase

    def __init__(self, containers: store.ContainerStore, events: Exchange) -> None:
        self.store = containers
        self.events = events
        # Told about deletions (a container's snapshot may now be garbage).
        self.mutated: Callable[[bool], None] = lambda deletion: None

    def _publish(self, ns: str, topic: str, event: betterproto.Message) -> None:
        # containerd returns a failed publish unconverted (Unknown), after the commit.
        try:
            self.events.publish(ns, topic, event)
        except errdefs.BerthError as e:
            raise errdefs.Unknown(e.message, raw=True) from None

    def get(self, ctx: CallContext, req: GetContainerRequest) -> GetContainerResponse:
        ns = ctx.namespace_required()
        return GetContainerResponse(container=to_proto(self.store.get(ns, req.id)))

    def list(self, ctx: CallContext, req: ListContainersRequest) -> ListContainersResponse:
        ns = ctx.namespace_required()
        return ListContainersResponse(
            containers=[to_proto(c) for c in self.store.list(ns, list(req.filters))]
        )

    async def list_stream(self, ctx: CallContext, req: ListContainersRequest,
                          send: Callable[[ListContainerMessage], Awaitable[None]]) -> None:
        ns = ctx.namespace_required()
        for c in self.store.list(ns, list(req.filters)):
            await send(ListContainerMessage(container=to_proto(c)))

    def create(self, ctx: CallContext, req: CreateContainerRequest) -> CreateContainerResponse:
        ns = ctx.namespace_required()
        created = self.store.create(ns, from_proto(req.container))
        resp = CreateContainerResponse(container=to_proto(created))
        runtime = ContainerCreateRuntime(name=created.runtime_name)
        if created.runtime_options is not None:
            runtime.options = created.runtime_options
        self._publish(ns, "/containers/create",
                      ContainerCreate(id=created.id, image=created.image, runtime=runtime))
        return resp

    def update(self, ctx: CallContext, req: UpdateContainerRequest) -> UpdateContainerResponse:
        if req.container is None or req.container.id == "":
            raise errdefs.InvalidArgument("Container.ID required", raw=True)
        ns = ctx.namespace_required()
        paths = list(req.update_mask.paths) if req.update_mask is not None else []
        updated = self.store.update(ns, from_proto(req.container), paths)
        self._publish(ns, "/containers/update", ContainerUpdate(
            id=updated.id, image=updated.image, labels=dict(updated.labels),
            snapshot_key=updated.snapshot_key,
        ))
        return UpdateContainerResponse(container=to_proto(updated))

    def delete(self, ctx: CallContext, req: DeleteContainerRequest) -> Empty:
        ns = ctx.namespace_required()
        self.store.delete(ns, req.id)
        self.mutated(True)
        self._publish(ns, "/containers/delete", ContainerDelete(id=req.id))
        return Empty()


def wire_gc(plugins: Any) -> Callable[[bool], None] | None:
    """Make containers GC roots and report their deletion, when a GC scheduler is loaded.

    The collector only learns roots from sources registered before it collects, so
    the scheduler must initialise before this plugin (earlier in the plugin list).
    """
    try:
        from berth.core.gc.scheduler import notifier
        scheduler = plugins.get(GC, "scheduler")
    except (ImportError, errdefs.NotFound):
        return None
    scheduler.collector.add_root_source("containers", store.gc_roots)
    return notifier(plugins)


async def _init(ctx: InitContext) -> ContainersService:
    md = ctx.plugins.get(METADATA)
    svc = ContainersService(md.containers, ctx.plugins.get(EVENT))
    notify = wire_gc(ctx.plugins)
    if notify is None:
        _log.info("no gc scheduler loaded before containers: containers are no gc roots")
    else:
        svc.mutated = notify
    return svc


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="containers", init=_init, requires=(METADATA, EVENT))]
