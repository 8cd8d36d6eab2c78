"""Images: the images-service plugin and ``containerd.services.images.v1.Images``.

As in containerd, the service plugin does the work (store, events ``/images/create``,
``/images/update``, ``/images/delete``, a synchronous garbage collection for a delete
with ``sync``) and the gRPC plugin only forwards to it.
"""

from __future__ import annotations

import betterproto
from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs, log
from berth.core.api.containerd.services.images import v1 as api
from berth.core.api.containerd.types import Descriptor as ApiDescriptor
from berth.core.events.exchange import Exchange
from berth.core.gc.scheduler import GCScheduler
from berth.core.grpc.bridge import AnswerCaches, Encoded
from berth.core.grpc.context import CallContext
from berth.core.metadata.images import Descriptor, Image, ImageStore
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GC, GRPC, METADATA, SERVICE

_log = log.get("images")

# Get answers kept serialized per (namespace, name), made again whenever the image read
# now differs from the one they were made from (ctr gets its image every run). Past
# this many the cache starts over (a bound, not LRU).
GET_ANSWERS = 256


def _from_api(img: api.Image | None) -> Image:
    img = img or api.Image()
    t = img.target or ApiDescriptor()
    return Image(name=img.name, labels=dict(img.labels),
                 target=Descriptor(t.media_type, t.digest, t.size,
                                   annotations=dict(t.annotations)))


def _to_api(img: Image) -> api.Image:
    t = img.target
    out = api.Image(
        name=img.name, labels=dict(img.labels),
        target=ApiDescriptor(media_type=t.media_type, digest=t.digest, size=t.size,
                             annotations=dict(t.annotations)),
    )
    # Unset, a timestamp stays off the wire (as None did).
    if img.created_at is not None:
        out.created_at = img.created_at
    if img.updated_at is not None:
        out.updated_at = img.updated_at
    return out


class ImagesLocal:
    """The images-service plugin: store, events and garbage collection together."""

    def __init__(self, store: ImageStore, events: Exchange, gc: GCScheduler) -> None:
        self.store = store
        self.events = events
        self.gc = gc
        self._gets = AnswerCaches(GET_ANSWERS)

    def _publish(self, ns: str, topic: str, event: betterproto.Message) -> None:
        try:
            self.events.publish(ns, topic, event)
        except errdefs.BerthError as e:
            raise errdefs.Unknown(e.message, raw=True) from None

    def get(self, ctx: CallContext, req: api.GetImageRequest) -> Encoded:
        ns = ctx.namespace_required()
        name = req.name
        image = self.store.get(ns, name)
        return self._gets.get((ns, name), image,
                              lambda i: api.GetImageResponse(image=_to_api(i)))

    def list(self, ctx: CallContext, req: api.ListImagesRequest) -> api.ListImagesResponse:
        ns = ctx.namespace_required()
        return api.ListImagesResponse(
            images=[_to_api(i) for i in self.store.list(ns, list(req.filters))])

    def create(self, ctx: CallContext, req: api.CreateImageRequest) -> api.CreateImageResponse:
        image = _from_api(req.image)
        if not image.name:
            raise errdefs.InvalidArgument("Image.Name required", raw=True)
        ns = ctx.namespace_required()
        _log.debug("create image", namespace=ns, name=image.name, target=image.target.digest)
        created = _to_api(self.store.create(ns, image))
        self._publish(ns, "/images/create",
                      api.ImageCreate(name=created.name, labels=dict(created.labels)))
        return api.CreateImageResponse(image=created)

    def update(self, ctx: CallContext, req: api.UpdateImageRequest) -> api.UpdateImageResponse:
        image = _from_api(req.image)
        if not image.name:
            raise errdefs.InvalidArgument("Image.Name required", raw=True)
        ns = ctx.namespace_required()
        paths = list(req.update_mask.paths) if req.update_mask else []
        updated = _to_api(self.store.update(ns, image, paths))
        self._publish(ns, "/images/update",
                      api.ImageUpdate(name=updated.name, labels=dict(updated.labels)))
        return api.UpdateImageResponse(image=updated)

    async def delete(self, ctx: CallContext, req: api.DeleteImageRequest) -> Empty:
        ns = ctx.namespace_required()
        _log.debug("delete image", namespace=ns, name=req.name)
        self.store.delete(ns, req.name)
        self._publish(ns, "/images/delete", api.ImageDelete(name=req.name))
        if req.sync:
            await self.gc.schedule_and_wait()
        return Empty()


class ImagesService:
    """``containerd.services.images.v1.Images``: forwards to the images-service."""

    base = api.ImagesBase

    def __init__(self, local: ImagesLocal) -> None:
        self.local = local

    def get(self, ctx: CallContext, req: api.GetImageRequest) -> Encoded:
        return self.local.get(ctx, req)

    def list(self, ctx: CallContext, req: api.ListImagesRequest) -> api.ListImagesResponse:
        return self.local.list(ctx, req)

    def create(self, ctx: CallContext, req: api.CreateImageRequest) -> api.CreateImageResponse:
        return self.local.create(ctx, req)

    def update(self, ctx: CallContext, req: api.UpdateImageRequest) -> api.UpdateImageResponse:
        return self.local.update(ctx, req)

    async def delete(self, ctx: CallContext, req: api.DeleteImageRequest) -> Empty:
        return await self.local.delete(ctx, req)


async def _init_service(ctx: InitContext) -> ImagesLocal:
    md = ctx.plugins.get(METADATA)
    gc = ctx.plugins.get(GC)
    store = ImageStore(md.db, mutated=lambda deletion: gc.mutated(deletion))
    return ImagesLocal(store, ctx.plugins.get(EVENT), gc)


async def _init_grpc(ctx: InitContext) -> ImagesService:
    try:
        local = ctx.plugins.get(SERVICE, "images-service")
    except errdefs.NotFound:
        raise errdefs.NotFound("images service not found", raw=True) from None
    return ImagesService(local)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        Registration(type=SERVICE, id="images-service", init=_init_service,
                     requires=(METADATA, GC, EVENT)),
        Registration(type=GRPC, id="images", init=_init_grpc, requires=(SERVICE,)),
    ]
