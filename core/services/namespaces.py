"""Namespaces: the namespaces-service plugin and ``containerd.services.namespaces.v1``
over it (containerd's local/gRPC split)."""

from __future__ import annotations

import builtins

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
from berth.core.grpc.bridge import AnswerCache, AnswerCaches, Encoded
from berth.core.grpc.context import CallContext
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GRPC, METADATA, SERVICE

# Namespaces whose Get answer is kept; past this many the cache starts over.
GET_ANSWERS = 256


class NamespacesLocal:
    """The namespaces service (``io.containerd.service.v1.namespaces-service``): the
    metadata store, and the events each change publishes."""

    def __init__(self, store: NamespaceStore, events: Exchange) -> None:
        self.store = store
        self.events = events

    def _publish(self, namespace: str, topic: str, event: betterproto.Message) -> None:
        # A failure to publish reaches the client unconverted (Unknown), after the
        # change itself has been committed, exactly as containerd does.
        try:
            self.events.publish(namespace, topic, event)
        except errdefs.BerthError as e:
            raise errdefs.Unknown(e.message, raw=True) from None

    def labels(self, name: str) -> dict[str, str]:
        # containerd answers a missing namespace with empty labels, not NotFound.
        return self.store.labels(name)

    def list(self) -> list[tuple[str, dict[str, str]]]:
        return [(n.name, n.labels) for n in self.store.list()]

    def create(self, name: str, labels: dict[str, str], *, caller: str) -> None:
        # containerd publishes create and update in the caller's namespace (ctr's
        # "default"), not the one being changed, and only delete in the deleted one.
        self.store.create(name, labels)
        self._publish(caller, "/namespaces/create", NamespaceCreate(name=name, labels=labels))

    def update(self, name: str, labels: dict[str, str], paths: builtins.list[str], *,
               caller: str) -> None:
        """Set the labels ``paths`` name (``labels.<key>``), or replace them all."""
        if paths:
            changes: dict[str, str] = {}
            for path in paths:
                if not path.startswith("labels."):
                    raise errdefs.InvalidArgument(f'cannot update "{path}" field', raw=True)
                key = path.removeprefix("labels.")
                changes[key] = labels.get(key, "")
            self.store.set_labels(name, changes)
        else:
            self.store.set_labels(name, dict(labels), replace=True)
        self._publish(caller, "/namespaces/update", NamespaceUpdate(name=name, labels=labels))

    def delete(self, name: str) -> None:
        self.store.delete(name)
        self._publish(name, "/namespaces/delete", NamespaceDelete(name=name))


class NamespacesService:
    """``containerd.services.namespaces.v1.Namespaces``: translation only."""

    base = NamespacesBase

    def __init__(self, local: NamespacesLocal) -> None:
        self.local = local
        # The store is read on every call (it is the truth); the answer is rebuilt and
        # serialized only when what it read differs from last time.
        self._list = AnswerCache()
        # The same per namespace for Get (ctr asks twice per run, dockerd at start-up).
        self._gets = AnswerCaches(GET_ANSWERS)

    def get(self, ctx: CallContext, req: GetNamespaceRequest) -> Encoded:
        labels = self.local.labels(req.name)
        return self._gets.get(req.name, labels, lambda got: GetNamespaceResponse(
            Namespace(name=req.name, labels=got)))

    def list(self, ctx: CallContext, req: ListNamespacesRequest) -> Encoded:
        return self._list.get(self.local.list(), lambda namespaces: ListNamespacesResponse(
            [Namespace(name=name, labels=labels) for name, labels in namespaces]))

    def create(self, ctx: CallContext, req: CreateNamespaceRequest) -> CreateNamespaceResponse:
        ns = req.namespace or Namespace()
        self.local.create(ns.name, dict(ns.labels), caller=ctx.namespace or "")
        return CreateNamespaceResponse(namespace=ns)

    def update(self, ctx: CallContext, req: UpdateNamespaceRequest) -> UpdateNamespaceResponse:
        ns = req.namespace or Namespace()
        paths = list(req.update_mask.paths) if req.update_mask else []
        self.local.update(ns.name, dict(ns.labels), paths, caller=ctx.namespace or "")
        return UpdateNamespaceResponse()

    def delete(self, ctx: CallContext, req: DeleteNamespaceRequest) -> Empty:
        self.local.delete(req.name)
        return Empty()


SERVICE_ID = "namespaces-service"


async def _init_service(ctx: InitContext) -> NamespacesLocal:
    return NamespacesLocal(ctx.plugins.get(METADATA).namespaces, ctx.plugins.get(EVENT))


async def _init(ctx: InitContext) -> NamespacesService:
    # Registered just before this plugin (below), so initialised before it. Requiring
    # the whole service type would pull every other service ahead of the GC scheduler.
    return NamespacesService(ctx.plugins.get(SERVICE, SERVICE_ID))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        Registration(type=SERVICE, id=SERVICE_ID, init=_init_service, requires=(METADATA, EVENT)),
        Registration(type=GRPC, id="namespaces", init=_init, requires=(METADATA, EVENT)),
    ]
