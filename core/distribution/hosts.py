"""Registry hosts in containerd's ``hosts.toml`` directory format (sans-io parsing).

A config path holds one folder per registry host (``docker.io``, ``127.0.0.1:5000``,
or ``_default`` for any host without its own), each with a ``hosts.toml``: ``server``
(the upstream, default ``https://<host>``), and ``[host."<url>"]`` tables tried first,
in file order, each with ``capabilities`` (``pull``, ``resolve``, ``push``),
``skip_verify``, ``ca``, ``client``, ``header`` and ``override_path``. As containerd, a
URL path that does not end in ``/v2`` gets ``/v2`` appended unless ``override_path``.

The older CRI form, ``registry.mirrors."<host>".endpoint = [urls]``, maps onto the same
:class:`Endpoint` list (mirrors with pull and resolve, then the host itself).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from berth.core import errdefs
from berth.core.distribution.auth import Credentials
from berth.core.distribution.client import Registry, TLSOptions

CAP_PULL = "pull"
CAP_RESOLVE = "resolve"
CAP_PUSH = "push"
ALL_CAPS = (CAP_PULL, CAP_RESOLVE, CAP_PUSH)
DEFAULT_DIR = "_default"
_HOSTS_FILE = "hosts.toml"
# A hosts.toml is a few lines; a huge one is a mistake or an attack.
MAX_HOSTS_FILE = 1 << 20


@dataclass(frozen=True)
class Endpoint:
    """One place to reach a registry: ``base`` is the URL up to and including /v2."""

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: tuple[str, ...] = ALL_CAPS
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    header: tuple[tuple[str, str], ...] = ()

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}{self.path.rstrip('/')}/"

    @property
    def plain_http(self) -> bool:
        return self.scheme == "http"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def default_server(host: str) -> str:
    """containerd's default upstream of a registry name."""
    if host in ("docker.io", "index.docker.io"):
        return "https://registry-1.docker.io"
    return f"https://{host}"


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise errdefs.InvalidArgument(f"{what}: expected a string or a list of strings", raw=True)


def _client(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    # A certificate alone, a list of them, or [cert, key] pairs.
    if value is None:
        return ()
    if isinstance(value, str):
        return ((value, ""),)
    out = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                out.append((item, ""))
            elif (isinstance(item, list) and len(item) == 2
                  and all(isinstance(v, str) for v in item)):
                out.append((item[0], item[1]))
            else:
                raise errdefs.InvalidArgument(f"{what}: invalid client entry", raw=True)
        return tuple(out)
    raise errdefs.InvalidArgument(f"{what}: invalid client value", raw=True)


def _header(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise errdefs.InvalidArgument(f"{what}: header must be a table", raw=True)
    out = []
    for k, v in value.items():
        for item in _strings(v, f"{what}: header {k}"):
            out.append((str(k), item))
    return tuple(out)


def _endpoint(url: str, table: Mapping[str, Any], what: str) -> Endpoint:
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise errdefs.InvalidArgument(f"{what}: invalid host URL {url!r}", raw=True)
    path = parts.path.rstrip("/")
    if not table.get("override_path", False) and not path.endswith("/v2"):
        path += "/v2"
    caps = _strings(table.get("capabilities"), f"{what}: capabilities") or ALL_CAPS
    unknown = set(caps) - set(ALL_CAPS)
    if unknown:
        raise errdefs.InvalidArgument(
            f"{what}: unknown capabilities {sorted(unknown)}", raw=True)
    skip = table.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise errdefs.InvalidArgument(f"{what}: skip_verify must be a boolean", raw=True)
    return Endpoint(
        scheme=parts.scheme, host=parts.netloc, path=path or "/v2", capabilities=caps,
        skip_verify=skip, ca=_strings(table.get("ca"), f"{what}: ca"),
        client=_client(table.get("client"), what), header=_header(table.get("header"), what),
    )


def parse_hosts_toml(host: str, text: str, *, source: str = "hosts.toml") -> list[Endpoint]:
    """The endpoints of ``host`` a hosts.toml names, in the order to try them."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise errdefs.InvalidArgument(f"{source}: {e}", raw=True) from None
    out = []
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise errdefs.InvalidArgument(f"{source}: [host] must be a table of URLs", raw=True)
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise errdefs.InvalidArgument(f"{source}: host {url!r} must be a table", raw=True)
        out.append(_endpoint(url, table, f"{source}: host {url!r}"))
    server = doc.get("server", default_server(host))
    if not isinstance(server, str):
        raise errdefs.InvalidArgument(f"{source}: server must be a string", raw=True)
    out.append(_endpoint(server, doc, f"{source}: server"))
    return out


def _host_dirs(host: str) -> list[str]:
    # containerd also looks for "host_port" (':' is awkward in some file systems).
    names = [host]
    if ":" in host:
        names.append(host.replace(":", "_", 1))
    return names


@dataclass
class Hosts:
    """Where to reach each registry: a hosts.toml directory (or several, ``:``-joined,
    first match wins), legacy mirrors, and the default of ``https://<host>``."""

    config_path: str = ""
    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def endpoints(self, host: str) -> list[Endpoint]:
        if not host or "/" in host or host in (".", ".."):
            raise errdefs.InvalidArgument(f"invalid registry host {host!r}", raw=True)
        for base in (p for p in self.config_path.split(":") if p):
            for name in [*_host_dirs(host), DEFAULT_DIR]:
                path = Path(base) / name / _HOSTS_FILE
                try:
                    with open(path, "rb") as f:
                        data = f.read(MAX_HOSTS_FILE + 1)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise errdefs.FailedPrecondition(f"{path}: {e.strerror}", raw=True) from None
                if len(data) > MAX_HOSTS_FILE:
                    raise errdefs.InvalidArgument(f"{path}: larger than 1 MiB", raw=True)
                return parse_hosts_toml(host, data.decode("utf-8", "replace"),
                                        source=str(path))
        urls = list(self.mirrors.get(host, ())) or list(self.mirrors.get("*", ()))
        out = [_endpoint(u, {"capabilities": [CAP_PULL, CAP_RESOLVE]}, f"mirror of {host}")
               for u in urls]
        default = _endpoint(default_server(host), {}, host)
        if default not in out:
            out.append(default)
        return out


def registry_for(host: str, ep: Endpoint, credentials: Credentials | None = None) -> Registry:
    """A client for registry ``host`` reached at endpoint ``ep`` (its URL, TLS settings
    and first client certificate)."""
    tls = None
    if not ep.plain_http:
        cert, key = ep.client[0] if ep.client else ("", "")
        tls = TLSOptions(ca_file=ep.ca[0] if ep.ca else None, skip_verify=ep.skip_verify,
                         cert_file=cert or None, key_file=key or None)
    return Registry(host, plain_http=ep.plain_http, credentials=credentials, tls=tls,
                    base=ep.base)


def resolvers(endpoints: list[Endpoint], by_digest: bool) -> list[Endpoint]:
    """The endpoints that may resolve a reference (any that pulls, for a digest)."""
    return [ep for ep in endpoints
            if ep.can(CAP_RESOLVE) or (by_digest and ep.can(CAP_PULL))]
