"""Leases: the lease manager plugin and ``containerd.services.leases.v1.Leases`` over it
(containerd's local/gRPC split)."""

from __future__ import annotations

import builtins

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
from berth.core.plugin.registration import GC, GRPC, LEASE, METADATA


def _to_api(lease: leases.Lease) -> Lease:
    return Lease(id=lease.id, created_at=lease.created_at, labels=lease.labels)


def _resource(r: Resource | None) -> leases.Resource:
    r = r or Resource()
    return leases.Resource(id=r.id, type=r.type)


class LeaseManager:
    """The lease manager (``io.containerd.lease.v1.manager``): the metadata store, and the
    GC scheduler told when a deletion may have left garbage."""

    def __init__(self, store: leases.LeaseStore, plugins: PluginSet) -> None:
        self.store = store
        self._plugins = plugins
        # What a lease held may now be garbage: tell the GC scheduler, if one runs.
        self._mutated = notifier(plugins)

    def create(self, namespace: str, id: str, labels: dict[str, str]) -> leases.Lease:
        return self.store.create(namespace, id or leases.random_id(), labels)

    async def delete(self, namespace: str, id: str, *, sync: bool = False) -> None:
        """Delete a lease; with ``sync``, return after a garbage collection has run."""
        self.store.delete(namespace, id)
        if not sync:
            self._mutated(True)
            return
        try:
            scheduler = self._plugins.get(GC, "scheduler")
        except errdefs.NotFound:
            return
        await scheduler.schedule_and_wait()

    def list(self, namespace: str, filters: list[str]) -> list[leases.Lease]:
        return self.store.list(namespace, filters)

    def add_resource(self, namespace: str, id: str, resource: leases.Resource) -> None:
        self.store.add_resource(namespace, id, resource)

    def delete_resource(self, namespace: str, id: str, resource: leases.Resource) -> None:
        self.store.delete_resource(namespace, id, resource)
        self._mutated(True)

    def list_resources(self, namespace: str, id: str) -> builtins.list[leases.Resource]:
        return self.store.list_resources(namespace, id)


class LeasesService:
    """``containerd.services.leases.v1.Leases``: translation only."""

    base = LeasesBase

    def __init__(self, manager: LeaseManager) -> None:
        self.manager = manager

    def create(self, ctx: CallContext, req: CreateRequest) -> CreateResponse:
        lease = self.manager.create(ctx.namespace_required(), req.id, dict(req.labels))
        return CreateResponse(lease=_to_api(lease))

    async def delete(self, ctx: CallContext, req: DeleteRequest) -> Empty:
        await self.manager.delete(ctx.namespace_required(), req.id, sync=req.sync)
        return Empty()

    def list(self, ctx: CallContext, req: ListRequest) -> ListResponse:
        found = self.manager.list(ctx.namespace_required(), list(req.filters))
        return ListResponse(leases=[_to_api(x) for x in found])

    def add_resource(self, ctx: CallContext, req: AddResourceRequest) -> Empty:
        self.manager.add_resource(ctx.namespace_required(), req.id, _resource(req.resource))
        return Empty()

    def delete_resource(self, ctx: CallContext, req: DeleteResourceRequest) -> Empty:
        self.manager.delete_resource(ctx.namespace_required(), req.id,
                                     _resource(req.resource))
        return Empty()

    def list_resources(self, ctx: CallContext, req: ListResourcesRequest
                       ) -> ListResourcesResponse:
        rs = self.manager.list_resources(ctx.namespace_required(), req.id)
        return ListResourcesResponse(resources=[Resource(id=r.id, type=r.type) for r in rs])


async def _init_manager(ctx: InitContext) -> LeaseManager:
    return LeaseManager(ctx.plugins.get(METADATA).leases, ctx.plugins)


async def _init(ctx: InitContext) -> LeasesService:
    return LeasesService(ctx.plugins.get(LEASE, "manager"))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        Registration(type=LEASE, id="manager", init=_init_manager, requires=(METADATA,)),
        Registration(type=GRPC, id="leases", init=_init, requires=(LEASE,)),
    ]
