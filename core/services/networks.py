"""berth.services.networks.v1.Networks: networks and attachments, over the manager.

A berth extension next to containerd's services. Attaching a container (``netns``
empty) uses the namespace berth pins for it, made now if its task does not exist yet;
the task then runs in it. Attaching a caller's own namespace names its path.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs, identifiers
from berth.core.api.berth.services.networks.v1 import (
    Attachment as AttachmentMsg,
    AttachRequest,
    AttachResponse,
    CheckRequest,
    ConfigError,
    DetachRequest,
    Dns,
    Interface,
    IpConfig,
    ListAttachmentsRequest,
    ListAttachmentsResponse,
    ListNetworksRequest,
    ListNetworksResponse,
    Network,
    NetworksBase,
    Route,
)
from berth.core.grpc.context import CallContext
from berth.core.metadata.containers import ContainerStore, store_for
from berth.core.metadata.networks import Attachment
from berth.core.networks import labels as netlabels, manager as netmanager
from berth.core.networks.manager import Capabilities, NetworkManager, pm_msg
from berth.core.networks.plugin import ID as MANAGER_ID
from berth.core.networks.types import PortMapping
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import GRPC, INTERNAL, METADATA

PROTOCOLS = ("tcp", "udp", "sctp")


def to_proto(a: Attachment) -> AttachmentMsg:
    msg = AttachmentMsg(id=a.id, network=a.network, plugin=a.plugin, netns=a.netns,
                        ifname=a.ifname, container=a.container, state=a.state,
                        port_mappings=[pm_msg(p) for p in a.port_mappings])
    if a.created_at:
        msg.created_at = datetime.fromisoformat(a.created_at).astimezone(UTC)
    r = a.result
    if r is not None:
        msg.interfaces = [Interface(name=i.name, mac=i.mac, sandbox=i.sandbox)
                          for i in r.interfaces]
        msg.ips = [IpConfig(address=i.address, gateway=i.gateway,
                            interface=-1 if i.interface is None else i.interface)
                   for i in r.ips]
        msg.routes = [Route(dst=x.dst, gw=x.gw) for x in r.routes]
        msg.dns = Dns(nameservers=list(r.dns.nameservers), domain=r.dns.domain,
                      search=list(r.dns.search), options=list(r.dns.options))
    return msg


def _ports(req: AttachRequest) -> list[PortMapping]:
    out = []
    for p in req.port_mappings:
        proto = (p.protocol or "tcp").lower()
        if proto not in PROTOCOLS:
            raise errdefs.InvalidArgument(f"invalid protocol {p.protocol!r}", raw=True)
        host_ip = p.host_ip
        if host_ip:
            try:
                host_ip = str(ipaddress.ip_address(host_ip))
            except ValueError:
                raise errdefs.InvalidArgument(f"invalid host address {p.host_ip!r}",
                                              raw=True) from None
        out.append(PortMapping(host_port=p.host_port, container_port=p.container_port,
                               protocol=proto, host_ip=host_ip))
    return out


def _caps(req: AttachRequest) -> Capabilities:
    for ip in req.ips:
        try:
            ipaddress.ip_interface(ip)
        except ValueError:
            raise errdefs.InvalidArgument(f"invalid address {ip!r}", raw=True) from None
    bw = req.bandwidth
    bandwidth = {k: v for k, v in (
        ("ingressRate", bw.ingress_rate), ("ingressBurst", bw.ingress_burst),
        ("egressRate", bw.egress_rate), ("egressBurst", bw.egress_burst)) if v} \
        if bw is not None else {}
    return Capabilities(ips=list(req.ips), mac=netlabels.check_mac(req.mac),
                        bandwidth=bandwidth)


class NetworksService:
    base = NetworksBase

    def __init__(self, manager: NetworkManager, containers: ContainerStore) -> None:
        self.manager = manager
        self.containers = containers

    def list(self, ctx: CallContext, req: ListNetworksRequest) -> ListNetworksResponse:
        return ListNetworksResponse(
            networks=[Network(name=n.name, plugin=n.plugin, config=n.config,
                              port_mappings=n.port_mappings)
                      for n in self.manager.networks()],
            errors=[ConfigError(file=f, error=e)
                    for f, e in sorted(self.manager.config_errors().items())])

    async def attach(self, ctx: CallContext, req: AttachRequest) -> AttachResponse:
        ns = ctx.namespace_required()
        if not req.id or not req.network:
            raise errdefs.InvalidArgument("id and network are required", raw=True)
        try:
            identifiers.validate(req.id)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(f"invalid id {req.id!r}: {e}", raw=True) from None
        ports = _ports(req)
        if req.ifname and (len(req.ifname) > 15 or "/" in req.ifname
                           or not req.ifname.isprintable() or req.ifname.strip() != req.ifname):
            raise errdefs.InvalidArgument(f"invalid interface name {req.ifname!r}", raw=True)
        container = not req.netns
        if container:
            self.containers.get(ns, req.id)  # NotFound for an unknown container
            if self.manager.has_task(ns, req.id) and not self.manager.store_has(ns, req.id):
                raise errdefs.FailedPrecondition(
                    f"task of container {req.id} runs without a berth network namespace; "
                    "attach before its task is created", raw=True)
        elif req.network == netmanager.HOST:
            raise errdefs.InvalidArgument("a namespace cannot join the host network",
                                          raw=True)
        a = await self.manager.attach(ns, req.id, req.network, netns_path=req.netns,
                                      ports=ports, ifname=req.ifname, container=container,
                                      caps=_caps(req))
        return AttachResponse(attachment=to_proto(a))

    async def detach(self, ctx: CallContext, req: DetachRequest) -> Empty:
        ns = ctx.namespace_required()
        if not req.id:
            raise errdefs.InvalidArgument("id is required", raw=True)
        n = await self.manager.detach(ns, req.id, req.network)
        if n == 0 and not req.network:
            raise errdefs.NotFound(f"attachments of {req.id}", raw=True)
        return Empty()

    async def check(self, ctx: CallContext, req: CheckRequest) -> Empty:
        ns = ctx.namespace_required()
        if not req.id or not req.network:
            raise errdefs.InvalidArgument("id and network are required", raw=True)
        await self.manager.check(ns, req.id, req.network)
        return Empty()

    def list_attachments(self, ctx: CallContext, req: ListAttachmentsRequest
                         ) -> ListAttachmentsResponse:
        ns = ctx.namespace_required()
        return ListAttachmentsResponse(attachments=[
            to_proto(a) for a in self.manager.store.list(ns, req.id or None)])


async def _init(ctx: InitContext) -> NetworksService:
    return NetworksService(ctx.plugins.get(INTERNAL, MANAGER_ID),
                           store_for(ctx.plugins.get(METADATA).db))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="berth.networks", init=_init,
                         requires=(INTERNAL, METADATA))]
