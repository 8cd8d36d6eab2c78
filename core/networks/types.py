"""What a network plugin is, and the values it takes and gives back.

A network plugin (type ``io.berth.network.v1``, ``berth.core.plugin.registration.NETWORK``)
offers one or more named networks. berth makes and pins the network namespace; the plugin
only fills it (interfaces, addresses, routes, port mappings) and empties it again.
Plugin authors implement :class:`NetworkPlugin`; the values are plain dataclasses so a
third-party package needs nothing from berth but this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class PortMapping:
    """A host port forwarded into the namespace (CNI's ``portMappings`` capability)."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def key(self) -> tuple[str, int, str]:
        return (self.host_ip or "0.0.0.0", self.host_port, self.protocol)

    def to_cni(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hostPort": self.host_port,
                               "containerPort": self.container_port,
                               "protocol": self.protocol}
        if self.host_ip:
            out["hostIP"] = self.host_ip
        return out


@dataclass
class SetupRequest:
    """One attachment: which namespace, as whom, and the capability arguments."""

    namespace: str          # berth namespace of the attachment
    id: str                 # CNI_CONTAINERID: the container id (or the caller's id)
    netns: str              # path of the (pinned) network namespace; "" for the host's
    ifname: str = "eth0"
    port_mappings: list[PortMapping] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    mac: str = ""
    bandwidth: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # The result this attachment's setup returned (CNI's prevResult for CHECK and DEL).
    previous: Result | None = None


@dataclass
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""  # the netns path for interfaces inside it; "" on the host


@dataclass
class IPConfig:
    address: str           # CIDR, e.g. 10.213.0.5/16
    gateway: str = ""
    interface: int | None = None  # index into Result.interfaces


@dataclass
class Route:
    dst: str
    gw: str = ""


@dataclass
class DNS:
    nameservers: list[str] = field(default_factory=list)
    domain: str = ""
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


@dataclass
class Result:
    """What a setup made (CNI's Result, in any spec version, as typed values)."""

    cni_version: str = ""
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: DNS = field(default_factory=DNS)
    # The plugin's own encoding of the result (CNI: the JSON), kept for CHECK and DEL.
    raw: dict[str, Any] = field(default_factory=dict)

    def addresses(self) -> list[str]:
        return [ip.address for ip in self.ips]


@dataclass
class NetworkInfo:
    """One network a plugin offers."""

    name: str
    plugin: str                 # the plugin id ("cni", "none"...)
    config: str = ""            # its configuration as text (a conflist for cni)
    needs_netns: bool = True    # False for the host's network
    port_mappings: bool = False  # whether it can forward host ports


@runtime_checkable
class NetworkPlugin(Protocol):
    """The interface of an ``io.berth.network.v1`` plugin instance.

    Every method may raise :mod:`berth.core.errdefs` errors; their message reaches the
    client. ``teardown`` must succeed for a namespace it half set up or never saw
    (berth calls it after crashes, maybe twice).
    """

    def networks(self) -> list[NetworkInfo]:
        """The networks this plugin offers now (a config dir may change)."""
        ...

    async def setup(self, network: str, req: SetupRequest) -> Result:
        """Set up ``network`` in ``req.netns``; on failure leave nothing behind."""
        ...

    async def check(self, network: str, req: SetupRequest) -> None:
        """Raise if what setup made is no longer there."""
        ...

    async def teardown(self, network: str, req: SetupRequest) -> None:
        """Undo setup; idempotent."""
        ...
