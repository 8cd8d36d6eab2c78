"""containerd.services.namespaces.v1.Namespaces over the metadata store."""

from __future__ import annotations

import betterproto
from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs
from berth.core.api.containerd.events import NamespaceCreate, NamespaceDelete, NamespaceUpdate
from berth.core.api.containerd.services.namespaces.v1 import (
    CreateNamespaceRequest,
    CreateNamespaceResponse,
    DeleteNamespaceRequest,
    GetNamespaceRequest,
    GetNamespaceResponse,
    ListNamespacesRequest,
    ListNamespacesResponse,
    Namespace,
    NamespacesBase,
    UpdateNamespaceRequest,
    UpdateNamespaceResponse,
)
from berth.core.events.exchange import Exchange
from berth.core.grpc.context import CallContext
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GRPC, METADATA


class NamespacesService:
    base = NamespacesBase

    def __init__(self, store: NamespaceStore, events: Exchange) -> None:
        self.store = store
        self.events = events

    def _publish(self, ctx: CallContext, topic: str, event: betterproto.Message,
                 namespace: str | None = None) -> None:
        # containerd publishes create and update in the caller's namespace (ctr's
        # "default"), not the one being changed, and only delete in the deleted one.
        # A failure to publish reaches the client unconverted (Unknown), after the
        # change itself has been committed, exactly as containerd does.
        try:
            self.events.publish(namespace or ctx.namespace or "", topic, event)
        except errdefs.BerthError as e:
            raise errdefs.Unknown(e.message, raw=True) from None

    def get(self, ctx: CallContext, req: GetNamespaceRequest) -> GetNamespaceResponse:
        # containerd answers a missing namespace with empty labels, not NotFound.
        return GetNamespaceResponse(Namespace(name=req.name, labels=self.store.labels(req.name)))

    def list(self, ctx: CallContext, req: ListNamespacesRequest) -> ListNamespacesResponse:
        return ListNamespacesResponse(
            [Namespace(name=n.name, labels=n.labels) for n in self.store.list()]
        )

    def create(self, ctx: CallContext, req: CreateNamespaceRequest) -> CreateNamespaceResponse:
        ns = req.namespace or Namespace()
        self.store.create(ns.name, dict(ns.labels))
        self._publish(ctx, "/namespaces/create",
                      NamespaceCreate(name=ns.name, labels=dict(ns.labels)))
        return CreateNamespaceResponse(namespace=ns)

    def update(self, ctx: CallContext, req: UpdateNamespaceRequest) -> UpdateNamespaceResponse:
        ns = req.namespace or Namespace()
        paths = list(req.update_mask.paths) if req.update_mask else []
        if paths:
            changes: dict[str, str] = {}
            for path in paths:
                if not path.startswith("labels."):
                    raise errdefs.InvalidArgument(f'cannot update "{path}" field', raw=True)
                key = path.removeprefix("labels.")
                changes[key] = ns.labels.get(key, "")
            self.store.set_labels(ns.name, changes)
        else:
            self.store.set_labels(ns.name, dict(ns.labels), replace=True)
        self._publish(ctx, "/namespaces/update",
                      NamespaceUpdate(name=ns.name, labels=dict(ns.labels)))
        return UpdateNamespaceResponse()

    def delete(self, ctx: CallContext, req: DeleteNamespaceRequest) -> Empty:
        self.store.delete(req.name)
        self._publish(ctx, "/namespaces/delete", NamespaceDelete(name=req.name),
                      namespace=req.name)
        return Empty()


async def _init(ctx: InitContext) -> NamespacesService:
    return NamespacesService(ctx.plugins.get(METADATA).namespaces, ctx.plugins.get(EVENT))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="namespaces", init=_init, requires=(METADATA, EVENT))]
