"""The CRI plugin (``io.containerd.grpc.v1.cri``): RuntimeService and ImageService on
berthd's main socket and on the plugin's own (``<state>/cri.sock`` by default, so
``/run/berth/cri.sock``), built from the other plugins' local stores only."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from berth.core import log
from berth.core.gc.scheduler import notifier
from berth.core.metadata.containers import store_for
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GC, GRPC, METADATA, RUNTIME_V2, SERVICE
from berth.core.transfer.pull import Stores
from berth.plugins.cri import config as cri_config
from berth.plugins.cri.images import NAMESPACE, ImageService
from berth.plugins.cri.pods import PodService

_log = log.get("cri")


class CRIPlugin:
    """The plugin instance: both services, served wherever berthd serves gRPC."""

    def __init__(self, config: cri_config.CRIConfig, runtime: Any, images: ImageService
                 ) -> None:
        self.config = config
        self.runtime = runtime
        self.images = images

    def grpc_services(self) -> list[Any]:
        return [self.runtime, self.images]


def _snapshot_root(ctx: InitContext, name: str) -> Path | None:
    for p in ctx.plugins.ordered:
        r = p.registration
        if r.type == "io.containerd.snapshotter.v1" and r.id == name and p.ok:
            root = p.exports.get("root")
            return Path(root) if root else None
    return None


async def _init(ctx: InitContext) -> CRIPlugin:
    from berth.core.grpc import bridge, server as grpc_server

    daemon = ctx.daemon_config
    cfg = cri_config.parse(ctx.config, state=daemon.state)
    if cfg.unsupported:
        _log.warning("CRI settings berth does not support are ignored",
                     namespace=NAMESPACE, keys=cfg.unsupported, not_default=cfg.changed)
    md = ctx.plugins.get(METADATA)
    stores = Stores(
        content=ctx.plugins.get(SERVICE, "content-service"),
        images=ctx.plugins.get(SERVICE, "images-service").store,
        snapshotters=ctx.plugins.get(SERVICE, "snapshots-service").snapshotters,
        differ=ctx.plugins.get(SERVICE, "diff-service"),
        leases=md.leases,
        events=ctx.plugins.get(EVENT),
        mutated=notifier(ctx.plugins),
    )
    images = ImageService(stores, cfg, _snapshot_root(ctx, cfg.snapshotter))
    runtime = _runtime_service(ctx, cfg, stores, images)
    plugin = CRIPlugin(cfg, runtime, images)
    max_recv = int(daemon.data["grpc"]["max_recv_message_size"])
    routes: dict[str, Any] = {}
    for svc in plugin.grpc_services():
        routes.update(bridge.handlers_for(svc, svc.base, max_recv=max_recv))
    await ctx.nursery.start(functools.partial(grpc_server.serve, routes, cfg.address))
    _log.info("CRI serving", namespace=NAMESPACE, address=str(cfg.address))
    return plugin


def _runtime_service(ctx: InitContext, cfg: cri_config.CRIConfig, stores: Stores,
                     images: ImageService) -> PodService:
    md = ctx.plugins.get(METADATA)
    pods = PodService(cfg, stores=stores, images=images, containers=store_for(md.db),
                      tasks=ctx.plugins.get(RUNTIME_V2, "task"), state=ctx.state,
                      nursery=ctx.nursery)
    pods.load()
    return pods


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(
        type=GRPC, id="cri", init=_init,
        requires=(EVENT, METADATA, SERVICE, RUNTIME_V2, GC),
        config=cri_config.DEFAULTS,
    )]
