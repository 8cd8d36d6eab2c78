"""/etc/resolv.conf, /etc/hosts and /etc/hostname of a container on a network.

Written by berth under the state dir and bind-mounted into the container, as Docker and
the CRI plugins do. resolv.conf comes from the network's DNS answer when it gave one,
else from the host's, without loopback nameservers (they mean nothing inside another
network namespace).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from berth.core.networks.types import DNS

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
FILES = ("resolv.conf", "hosts", "hostname")


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def resolv_conf(dns: DNS, host_text: str) -> str:
    if dns.nameservers:
        lines = [f"nameserver {n}" for n in dns.nameservers]
        search = list(dns.search) or ([dns.domain] if dns.domain else [])
        if search:
            lines.append("search " + " ".join(search))
        if dns.options:
            lines.append("options " + " ".join(dns.options))
        return "\n".join(lines) + "\n"
    out = []
    for line in host_text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and _loopback(fields[1]):
            continue
        out.append(line)
    return "\n".join(out) + "\n" if out else ""


def hosts(hostname: str, addresses: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{a.split('/', 1)[0]}\t{hostname}" for a in addresses]
    return "\n".join(lines) + "\n"


def write(folder: Path, hostname: str, addresses: list[str], dns: DNS) -> dict[str, Path]:
    """Write the three files; the container path each is to be mounted on -> its file."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        host_text = HOST_RESOLV_CONF.read_text(errors="replace")
    except OSError:
        host_text = ""
    texts = {"resolv.conf": resolv_conf(dns, host_text), "hosts": hosts(hostname, addresses),
             "hostname": hostname + "\n"}
    out: dict[str, Path] = {}
    for name, text in texts.items():
        # A state-dir file: written and renamed without fsync (a power loss empties it).
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.rename(tmp, folder / name)
        out[f"/etc/{name}"] = folder / name
    return out
