"""containerd.services.leases.v1.Leases over the metadata store."""

from __future__ import annotations

from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs
from berth.core.api.containerd.services.leases.v1 import (
    AddResourceRequest,
    CreateRequest,
    CreateResponse,
    DeleteRequest,
    DeleteResourceRequest,
    Lease,
    LeasesBase,
    ListRequest,
    ListResourcesRequest,
    ListResourcesResponse,
    ListResponse,
    Resource,
)
from berth.core.gc.scheduler import notifier
from berth.core.grpc.context import CallContext
from berth.core.metadata import leases
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.graph import PluginSet
from berth.core.plugin.registration import GC, GRPC, METADATA


def _to_api(lease: leases.Lease) -> Lease:
    return Lease(id=lease.id, created_at=lease.created_at, labels=lease.labels)


def _resource(r: Resource | None) -> leases.Resource:
    r = r or Resource()
    return leases.Resource(id=r.id, type=r.type)


class LeasesService:
    base = LeasesBase

    def __init__(self, store: leases.LeaseStore, plugins: PluginSet) -> None:
        self.store = store
        self._plugins = plugins
        # What a lease held may now be garbage: tell the GC scheduler, if one runs.
        self._mutated = notifier(plugins)

    def create(self, ctx: CallContext, req: CreateRequest) -> CreateResponse:
        ns = ctx.namespace_required()
        lease = self.store.create(ns, req.id or leases.random_id(), dict(req.labels))
        return CreateResponse(lease=_to_api(lease))

    async def delete(self, ctx: CallContext, req: DeleteRequest) -> Empty:
        ns = ctx.namespace_required()
        self.store.delete(ns, req.id)
        if req.sync:
            try:
                scheduler = self._plugins.get(GC, "scheduler")
            except errdefs.NotFound:
                return Empty()
            await scheduler.schedule_and_wait()
        else:
            self._mutated(True)
        return Empty()

    def list(self, ctx: CallContext, req: ListRequest) -> ListResponse:
        ns = ctx.namespace_required()
        return ListResponse(leases=[_to_api(x) for x in self.store.list(ns, list(req.filters))])

    def add_resource(self, ctx: CallContext, req: AddResourceRequest) -> Empty:
        self.store.add_resource(ctx.namespace_required(), req.id, _resource(req.resource))
        return Empty()

    def delete_resource(self, ctx: CallContext, req: DeleteResourceRequest) -> Empty:
        self.store.delete_resource(ctx.namespace_required(), req.id, _resource(req.resource))
        self._mutated(True)
        return Empty()

    def list_resources(self, ctx: CallContext, req: ListResourcesRequest
                       ) -> ListResourcesResponse:
        rs = self.store.list_resources(ctx.namespace_required(), req.id)
        return ListResourcesResponse(resources=[Resource(id=r.id, type=r.type) for r in rs])


async def _init(ctx: InitContext) -> LeasesService:
    return LeasesService(ctx.plugins.get(METADATA).leases, ctx.plugins)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="leases", init=_init, requires=(METADATA,))]
