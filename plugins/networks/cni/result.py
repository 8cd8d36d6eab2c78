"""CNI results of every spec version, as berth's typed values (sans-io).

0.1.0 and 0.2.0 results carry ``ip4``/``ip6`` objects; 0.3.0 and later an ``interfaces``
list and ``ips`` that point into it (``version`` in 0.3.x/0.4.0, gone in 1.0.0).
"""

from __future__ import annotations

from typing import Any

from berth.core import errdefs
from berth.core.networks.types import DNS, Interface, IPConfig, Result, Route


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise errdefs.InvalidArgument(f"CNI result: {key} is not a string", raw=True)
    return v


def _list(d: dict[str, Any], key: str) -> list[Any]:
    v = d.get(key) or []
    if not isinstance(v, list):
        raise errdefs.InvalidArgument(f"CNI result: {key} is not a list", raw=True)
    return v


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise errdefs.InvalidArgument(f"CNI result: {what} is not an object", raw=True)
    return v


def _routes(items: list[Any]) -> list[Route]:
    return [Route(dst=_str(r, "dst"), gw=_str(r, "gw"))
            for r in (_obj(x, "route") for x in items)]


def _dns(v: Any) -> DNS:
    d = _obj(v or {}, "dns")
    return DNS(nameservers=[str(x) for x in _list(d, "nameservers")],
               domain=_str(d, "domain"), search=[str(x) for x in _list(d, "search")],
               options=[str(x) for x in _list(d, "options")])


def parse(doc: Any) -> Result:
    """The typed form of a plugin's result; InvalidArgument when it is malformed."""
    d = _obj(doc, "result")
    version = _str(d, "cniVersion")
    out = Result(cni_version=version, raw=d, dns=_dns(d.get("dns")))
    if version in ("0.1.0", "0.2.0") or "ip4" in d or "ip6" in d:
        for key in ("ip4", "ip6"):
            if d.get(key) is None:
                continue
            ip = _obj(d[key], key)
            out.ips.append(IPConfig(address=_str(ip, "ip"), gateway=_str(ip, "gateway")))
            out.routes.extend(_routes(_list(ip, "routes")))
        return out
    for x in _list(d, "interfaces"):
        i = _obj(x, "interface")
        out.interfaces.append(Interface(name=_str(i, "name"), mac=_str(i, "mac"),
                                        sandbox=_str(i, "sandbox")))
    for x in _list(d, "ips"):
        ip = _obj(x, "ip")
        idx = ip.get("interface")
        if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool)
                                or not 0 <= idx < len(out.interfaces)):
            raise errdefs.InvalidArgument(f"CNI result: ip interface index {idx!r} is "
                                          "out of range", raw=True)
        out.ips.append(IPConfig(address=_str(ip, "address"), gateway=_str(ip, "gateway"),
                                interface=idx))
    out.routes = _routes(_list(d, "routes"))
    return out
