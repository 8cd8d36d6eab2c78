"""The CRI plugin (``io.containerd.grpc.v1.cri``): RuntimeService and ImageService on
berthd's main socket and on the plugin's own (``<state>/cri.sock`` by default, so
``/run/berth/cri.sock``), built from the other plugins' local stores only."""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from berth.core import errdefs, log
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import (
    EVENT,
    GC,
    GRPC,
    INTERNAL,
    METADATA,
    NETWORK,
    RUNTIME_V2,
    SERVICE,
    SkipPlugin,
)
from berth.plugins.cri import config as cri_config

# The services' modules (the CRI API, pods, streaming: ~150 ms of imports) load when the
# plugin starts, not when berthd reads its registrations: a berthd with the CRI plugin
# disabled never needs them.
if TYPE_CHECKING:
    from berth.core.transfer.pull import Stores
    from berth.plugins.cri.images import ImageService
    from berth.plugins.cri.pods import PodService
    from berth.plugins.cri.streaming.server import StreamServer

_log = log.get("cri")
CNI_NETWORK_ID = "cri"
NETWORK_MANAGER = "berth.networks"


class CRIPlugin:
    """The plugin instance: both services, served wherever berthd serves gRPC."""

    def __init__(self, config: cri_config.CRIConfig, runtime: Any, images: ImageService
                 ) -> None:
        self.config = config
        self.runtime = runtime
        self.images = images
        self.max_recv = 16 << 20
        self.nursery: trio.Nursery | None = None

    def grpc_services(self) -> list[Any]:
        return [self.runtime, self.images]

    def serving(self) -> None:
        """berthd serves (its sockets are up, shims can reach it): recover, then open
        the CRI socket. Called once by the daemon."""
        assert self.nursery is not None  # set by the plugin's init, before serving
        self.nursery.start_soon(self._after_start)

    async def _after_start(self) -> None:
        from berth.core.grpc import bridge, server as grpc_server
        from berth.plugins.cri.images import NAMESPACE

        # The tasks a previous berthd left are recovered in the background first:
        # whether a container still runs is known only after that.
        await self.runtime.tasks.recovered()
        await self.runtime.recover()
        routes: dict[str, Any] = {}
        for svc in self.grpc_services():
            routes.update(bridge.handlers_for(svc, svc.base, max_recv=self.max_recv))
        assert self.nursery is not None
        try:
            await self.nursery.start(functools.partial(grpc_server.serve, routes,
                                                       self.config.address))
        except OSError as e:
            _log.error("CRI socket not served", namespace=NAMESPACE,
                       address=str(self.config.address), error=str(e))
            return
        _log.info("CRI serving", namespace=NAMESPACE, address=str(self.config.address))


def _snapshot_root(ctx: InitContext, name: str) -> Path | None:
    for p in ctx.plugins.ordered:
        r = p.registration
        if r.type == "io.containerd.snapshotter.v1" and r.id == name and p.ok:
            root = p.exports.get("root")
            return Path(root) if root else None
    return None


async def _init(ctx: InitContext) -> CRIPlugin:
    from berth.core.gc.scheduler import notifier
    from berth.core.transfer.pull import Stores
    from berth.plugins.cri.images import NAMESPACE, ImageService
    from berth.plugins.cri.streaming.server import load_key_pair

    daemon = ctx.daemon_config
    cfg = cri_config.parse(ctx.config, state=daemon.state)
    if cfg.unsupported:
        _log.warning("CRI settings berth does not support are ignored",
                     namespace=NAMESPACE, keys=cfg.unsupported, not_default=cfg.changed)
    for rt in cfg.runtimes.values():
        problem = rt.cgroup_driver_problem()
        if problem:
            _log.warning("pods of this runtime handler will be refused", namespace=NAMESPACE,
                         handler=rt.name, error=problem)
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
    # A streaming key pair that does not load fails the plugin here, before anything runs.
    stream_tls = (load_key_pair(cfg.stream_tls_cert_file, cfg.stream_tls_key_file)
                  if cfg.enable_tls_streaming and cfg.stream_tls_cert_file else None)
    images = ImageService(stores, cfg, _snapshot_root(ctx, cfg.snapshotter))
    runtime = await _runtime_service(ctx, cfg, stores, images)
    plugin = CRIPlugin(cfg, runtime, images)
    runtime.stream_server = await _stream_server(ctx, cfg, runtime, stream_tls)
    plugin.max_recv = int(daemon.data["grpc"]["max_recv_message_size"])
    plugin.nursery = ctx.nursery
    return plugin


async def _stream_server(ctx: InitContext, cfg: cri_config.CRIConfig, pods: PodService,
                         tls: ssl.SSLContext | None) -> StreamServer:
    """The exec/attach/port-forward server, listening before the CRI socket opens."""
    from berth.plugins.cri.streaming.server import StreamServer, StreamServerConfig
    from berth.plugins.cri.streaming.service import CRIStreamRuntime

    server = StreamServer(CRIStreamRuntime(pods), StreamServerConfig(
        address=cfg.stream_server_address, port=int(cfg.stream_server_port or 0),
        tls=cfg.enable_tls_streaming, tls_cert_file=cfg.stream_tls_cert_file,
        tls_key_file=cfg.stream_tls_key_file, state_dir=str(Path(ctx.state) / "streaming")),
        ssl_context=tls)
    await ctx.nursery.start(server.serve)
    return server


def _pod_networks(ctx: InitContext) -> tuple[Any, Any]:
    """The network manager, and the network plugin whose first network pods get: the
    CRI section's own CNI dirs (plugin io.berth.network.v1.cri), else berth's cni."""
    from berth.plugins.cri.images import NAMESPACE

    try:
        manager = ctx.plugins.get(INTERNAL, NETWORK_MANAGER)
    except errdefs.NotFound as e:
        _log.warning("no network manager: only hostNetwork pods can run",
                     namespace=NAMESPACE, error=str(e))
        return None, None
    plugins = ctx.plugins.by_type(NETWORK)
    return manager, plugins.get(CNI_NETWORK_ID) or plugins.get("cni")


async def _runtime_service(ctx: InitContext, cfg: cri_config.CRIConfig, stores: Stores,
                           images: ImageService) -> PodService:
    from berth.plugins.cri.pods import PodService

    md = ctx.plugins.get(METADATA)
    manager, cni = _pod_networks(ctx)
    pods = PodService(cfg, stores=stores, images=images, containers=md.containers,
                      tasks=ctx.plugins.get(RUNTIME_V2, "task"), state=ctx.state,
                      nursery=ctx.nursery, networks=manager, cni=cni)
    pods.load()
    return pods


async def _init_cni(ctx: InitContext) -> Any:
    """Pods' CNI networks from the CRI section's ``cni.conf_dir`` and ``cni.bin_dir``, as
    containerd reads them; skipped when berth's own cni plugin reads that dir already."""
    from berth.plugins.networks.cni.plugin import DEFAULTS as CNI_DEFAULTS, CNINetworks

    section = ctx.daemon_config.plugins.get(cri_config.URI, {})
    cfg = cri_config.parse(section, state=ctx.daemon_config.state)
    berth_cni = ctx.daemon_config.plugins.get(f"{NETWORK}.cni", {})
    if Path(berth_cni.get("conf_dir", CNI_DEFAULTS["conf_dir"])) == Path(cfg.cni_conf_dir):
        raise SkipPlugin("the cni network plugin reads the CRI's cni.conf_dir already")
    plugin = CNINetworks({**CNI_DEFAULTS, "conf_dir": cfg.cni_conf_dir,
                          "bin_dirs": [cfg.cni_bin_dir, *CNI_DEFAULTS["bin_dirs"]]})
    ctx.exports["conf_dir"] = cfg.cni_conf_dir
    return plugin


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        Registration(type=NETWORK, id=CNI_NETWORK_ID, init=_init_cni),
        Registration(type=GRPC, id="cri", init=_init,
                     requires=(EVENT, METADATA, SERVICE, RUNTIME_V2, GC, INTERNAL),
                     config=cri_config.DEFAULTS),
    ]
