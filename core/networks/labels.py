"""The container labels that ask for networks, and the port syntax of ``berth run -p``.

``io.berth.network=bridge[,other]`` names the networks (``none`` and ``host`` included);
``io.berth.ports=[IP:]HOSTPORT:PORT[/tcp|udp][,...]`` the host ports forwarded in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from berth.core import errdefs
from berth.core.networks.types import PortMapping

NETWORK_LABEL = "io.berth.network"
PORTS_LABEL = "io.berth.ports"
IPS_LABEL = "io.berth.ips"    # static addresses (CNI's "ips" capability), comma-separated
MAC_LABEL = "io.berth.mac"    # CNI's "mac" capability
PROTOCOLS = ("tcp", "udp", "sctp")


def _port(text: str, what: str, spec: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise errdefs.InvalidArgument(f"invalid {what} {text!r} in port mapping {spec!r}",
                                      raw=True)
    n = int(text)
    if not 1 <= n <= 65535:
        raise errdefs.InvalidArgument(
            f"{what} {n} in port mapping {spec!r} is outside 1-65535", raw=True)
    return n


def parse_port(spec: str) -> PortMapping:
    """``[IP:]HOSTPORT:PORT[/PROTO]``; an IPv6 address goes in brackets."""
    text = spec.strip()
    body, _, proto = text.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in PROTOCOLS:
        raise errdefs.InvalidArgument(f"invalid protocol {proto!r} in port mapping {spec!r}",
                                      raw=True)
    host_ip = ""
    if body.startswith("["):
        addr, sep, rest = body[1:].partition("]:")
        if not sep:
            raise errdefs.InvalidArgument(f"invalid port mapping {spec!r}", raw=True)
        host_ip, body = addr, rest
    parts = body.split(":")
    if len(parts) == 3 and not host_ip:
        host_ip, parts = parts[0], parts[1:]
    if len(parts) != 2:
        raise errdefs.InvalidArgument(
            f"invalid port mapping {spec!r}: want [IP:]HOSTPORT:PORT[/tcp|udp]", raw=True)
    if host_ip:
        try:
            host_ip = str(ipaddress.ip_address(host_ip))
        except ValueError:
            raise errdefs.InvalidArgument(
                f"invalid host address {host_ip!r} in port mapping {spec!r}", raw=True
            ) from None
    return PortMapping(host_port=_port(parts[0], "host port", spec),
                       container_port=_port(parts[1], "container port", spec),
                       protocol=proto, host_ip=host_ip)


def format_port(p: PortMapping) -> str:
    ip = f"[{p.host_ip}]:" if ":" in p.host_ip else (f"{p.host_ip}:" if p.host_ip else "")
    return f"{ip}{p.host_port}:{p.container_port}/{p.protocol}"


def parse_ports(text: str) -> list[PortMapping]:
    return [parse_port(s) for s in text.split(",") if s.strip()]


def networks_of(labels: Mapping[str, str]) -> list[str]:
    """The networks a container's labels name, in order, without repeats."""
    out: list[str] = []
    for name in labels.get(NETWORK_LABEL, "").split(","):
        name = name.strip()
        if name and name not in out:
            out.append(name)
    return out


def ports_of(labels: Mapping[str, str]) -> list[PortMapping]:
    return parse_ports(labels.get(PORTS_LABEL, ""))


def ips_of(labels: Mapping[str, str]) -> list[str]:
    out = []
    for text in labels.get(IPS_LABEL, "").split(","):
        text = text.strip()
        if not text:
            continue
        try:
            ipaddress.ip_interface(text)
        except ValueError:
            raise errdefs.InvalidArgument(f"invalid address {text!r} in {IPS_LABEL}",
                                          raw=True) from None
        out.append(text)
    return out


def check_mac(mac: str) -> str:
    parts = mac.split(":")
    if mac and (len(parts) != 6 or not all(len(p) == 2 and all(
            c in "0123456789abcdefABCDEF" for c in p) for p in parts)):
        raise errdefs.InvalidArgument(f"invalid MAC address {mac!r}", raw=True)
    return mac.lower()


def mac_of(labels: Mapping[str, str]) -> str:
    return check_mac(labels.get(MAC_LABEL, "").strip())
