"""Containers: the containers-service plugin and ``containerd.services.containers.v1``
over it (containerd's local/gRPC split)."""

from __future__ import annotations

import builtins
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
from berth.core.grpc.bridge import Encoded
from berth.core.grpc.context import CallContext
from berth.core.metadata import containers as store
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GC, GRPC, METADATA, SERVICE

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


def _encoded_get(c: store.Container) -> Encoded:
    return Encoded(GetContainerResponse(container=to_proto(c)))


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


class ContainersLocal:
    """The containers service (``io.containerd.service.v1.containers-service``): the
    metadata store, the events each change publishes, and the GC told of deletions."""

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

    def get(self, ns: str, id: str) -> store.Container:
        return self.store.get(ns, id)

    def get_answer(self, ns: str, id: str) -> Encoded:
        """Containers.Get's answer, serialized once while the container stays as it is."""
        return self.store.answer(ns, id, GetContainerResponse, _encoded_get)

    def list(self, ns: str, filters: list[str]) -> list[store.Container]:
        return self.store.list(ns, filters)

    def create(self, ns: str, container: store.Container) -> store.Container:
        created = self.store.create(ns, container)
        runtime = ContainerCreateRuntime(name=created.runtime_name)
        if created.runtime_options is not None:
            runtime.options = created.runtime_options
        self._publish(ns, "/containers/create",
                      ContainerCreate(id=created.id, image=created.image, runtime=runtime))
        return created

    def update(self, ns: str, container: store.Container, paths: builtins.list[str]
               ) -> store.Container:
        updated = self.store.update(ns, container, paths)
        self._publish(ns, "/containers/update", ContainerUpdate(
            id=updated.id, image=updated.image, labels=dict(updated.labels),
            snapshot_key=updated.snapshot_key,
        ))
        return updated

    def delete(self, ns: str, id: str) -> None:
        self.store.delete(ns, id)
        self.mutated(True)
        self._publish(ns, "/containers/delete", ContainerDelete(id=id))


class ContainersService:
    """``containerd.services.containers.v1.Containers``: translation only."""

    base = ContainersBase

    def __init__(self, local: ContainersLocal) -> None:
        self.local = local

    def get(self, ctx: CallContext, req: GetContainerRequest) -> Encoded:
        ns = ctx.namespace_required()
        # Kept serialized while the row stays: dockerd asks eight times per `docker run`.
        return self.local.get_answer(ns, req.id)

    def list(self, ctx: CallContext, req: ListContainersRequest) -> ListContainersResponse:
        ns = ctx.namespace_required()
        return ListContainersResponse(
            containers=[to_proto(c) for c in self.local.list(ns, list(req.filters))]
        )

    async def list_stream(self, ctx: CallContext, req: ListContainersRequest,
                          send: Callable[[ListContainerMessage], Awaitable[None]]) -> None:
        ns = ctx.namespace_required()
        for c in self.local.list(ns, list(req.filters)):
            await send(ListContainerMessage(container=to_proto(c)))

    def create(self, ctx: CallContext, req: CreateContainerRequest) -> CreateContainerResponse:
        ns = ctx.namespace_required()
        created = self.local.create(ns, from_proto(req.container))
        return CreateContainerResponse(container=to_proto(created))

    def update(self, ctx: CallContext, req: UpdateContainerRequest) -> UpdateContainerResponse:
        if req.container is None or req.container.id == "":
            raise errdefs.InvalidArgument("Container.ID required", raw=True)
        ns = ctx.namespace_required()
        paths = list(req.update_mask.paths) if req.update_mask is not None else []
        updated = self.local.update(ns, from_proto(req.container), paths)
        return UpdateContainerResponse(container=to_proto(updated))

    def delete(self, ctx: CallContext, req: DeleteContainerRequest) -> Empty:
        self.local.delete(ctx.namespace_required(), req.id)
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


SERVICE_ID = "containers-service"


async def _init_service(ctx: InitContext) -> ContainersLocal:
    md = ctx.plugins.get(METADATA)
    local = ContainersLocal(md.containers, ctx.plugins.get(EVENT))
    notify = wire_gc(ctx.plugins)
    if notify is None:
        _log.info("no gc scheduler loaded before containers: containers are no gc roots")
    else:
        local.mutated = notify
    return local


async def _init(ctx: InitContext) -> ContainersService:
    # The service is registered just before this plugin (below), so initialised first.
    return ContainersService(ctx.plugins.get(SERVICE, SERVICE_ID))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        Registration(type=SERVICE, id=SERVICE_ID, init=_init_service, requires=(METADATA, EVENT)),
        Registration(type=GRPC, id="containers", init=_init, requires=(METADATA, EVENT)),
    ]
