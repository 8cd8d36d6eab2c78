"""Diff: the diff-service plugin and ``containerd.services.diff.v1.Diff``.

As in containerd, ``io.containerd.service.v1.diff-service`` holds the differs in the
configured order (``default = ["walking"]``) and tries each until one does not answer
NotImplemented; ``io.containerd.grpc.v1.diff`` only translates messages.
"""

from __future__ import annotations

from typing import Any

from berth.core import errdefs
from berth.core.api.containerd.services.diff import v1 as api
from berth.core.api.containerd.types import Descriptor
from berth.core.differ import Applied, Differ
from berth.core.grpc.context import CallContext
from berth.core.mount import Mount
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import DIFFER, GRPC, SERVICE

SERVICE_ID = "diff-service"


def _mounts(ms: Any) -> list[Mount]:
    return [Mount.from_proto(m) for m in ms]


def _descriptor(a: Applied) -> Descriptor:
    return Descriptor(media_type=a.media_type, digest=a.digest, size=a.size)


class DiffLocal:
    """The differs, in order of preference."""

    def __init__(self, differs: list[Differ]) -> None:
        self.differs = differs

    async def apply(self, namespace: str, desc: Descriptor, mounts: list[Mount]) -> Applied:
        err: errdefs.BerthError = errdefs.NotImplemented_("no differ loaded")
        for d in self.differs:
            try:
                return await d.apply(namespace, desc.media_type, desc.digest, desc.size, mounts)
            except errdefs.NotImplemented_ as e:
                err = e
        raise err

    async def compare(self, namespace: str, lower: list[Mount], upper: list[Mount], *,
                      media_type: str, ref: str, labels: dict[str, str],
                      lease: str | None) -> Applied:
        err: errdefs.BerthError = errdefs.NotImplemented_("no differ loaded")
        for d in self.differs:
            try:
                return await d.compare(namespace, lower, upper, media_type=media_type, ref=ref,
                                       labels=labels, lease=lease)
            except errdefs.NotImplemented_ as e:
                err = e
        raise err


class DiffService:
    base = api.DiffBase

    def __init__(self, local: DiffLocal) -> None:
        self.local = local

    async def apply(self, ctx: CallContext, req: api.ApplyRequest) -> api.ApplyResponse:
        ns = ctx.namespace_required()
        if req.diff is None or not req.diff.digest:
            raise errdefs.InvalidArgument("diff descriptor required", raw=True)
        # Payloads configure stream processors (decryption...); berth has none, and a
        # media type that would need one is refused as NotImplemented by the differ.
        applied = await self.local.apply(ns, req.diff, _mounts(req.mounts))
        return api.ApplyResponse(applied=_descriptor(applied))

    async def diff(self, ctx: CallContext, req: api.DiffRequest) -> api.DiffResponse:
        ns = ctx.namespace_required()
        out = await self.local.compare(ns, _mounts(req.left), _mounts(req.right),
                                       media_type=req.media_type, ref=req.ref,
                                       labels=dict(req.labels), lease=ctx.lease)
        return api.DiffResponse(diff=_descriptor(out))


async def _init_service(ctx: InitContext) -> DiffLocal:
    loaded = ctx.plugins.by_type(DIFFER)
    order = list(ctx.config.get("default") or ["walking"])
    differs: list[Differ] = []
    for name in order:
        if name not in loaded:
            raise errdefs.NotFound(f"needed differ not loaded: {name}", raw=True)
        differ = loaded[name]
        if not isinstance(differ, Differ):
            raise errdefs.FailedPrecondition(f"plugin {DIFFER}.{name} is not a differ", raw=True)
        differs.append(differ)
    return DiffLocal(differs)


async def _init_grpc(ctx: InitContext) -> DiffService:
    try:
        local = ctx.plugins.get(SERVICE, SERVICE_ID)
    except errdefs.NotFound:
        raise errdefs.NotFound("diff service not found", raw=True) from None
    return DiffService(local)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        Registration(type=SERVICE, id=SERVICE_ID, init=_init_service, requires=(DIFFER,),
                     config={"default": ["walking"]}),
        Registration(type=GRPC, id="diff", init=_init_grpc, requires=(SERVICE,)),
    ]
