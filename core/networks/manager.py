"""Attaching network namespaces and containers to networks, and undoing it for sure.

The manager finds networks among the ``io.berth.network.v1`` plugins, makes and pins a
container's namespace, records every attachment *before* its plugin runs (state
``attaching``) and drops the record only after the teardown succeeded. So whatever
berthd dies in the middle of, a record is left to act on:

- at start, attachments still ``attaching``, and container attachments whose container
  has no live task, are torn down (their task will attach again when created);
- a task deleted, a shim found dead (``/tasks/delete``) or a container deleted
  (``/containers/delete``) detaches the container;
- the garbage collector tears down container attachments whose container is gone.

Port mappings are checked before anything is made: 1-65535, not held by another
attachment, and free on the host (a bind to the host address succeeds), as Docker's
port allocator checks.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, identifiers, log
from berth.core.api.berth.services.networks.v1 import (
    NetworkAttach,
    NetworkDetach,
    PortMapping as PortMappingMsg,
)
from berth.core.events import typeurl
from berth.core.metadata.networks import ATTACHING, Attachment, AttachmentStore
from berth.core.networks import etcfiles, labels as netlabels, netns
from berth.core.networks.types import NetworkInfo, NetworkPlugin, PortMapping, Result

typeurl.register("berth.services.networks.v1.NetworkAttach", NetworkAttach)
typeurl.register("berth.services.networks.v1.NetworkDetach", NetworkDetach)

HOST = "host"
NONE = "none"
# The longest a teardown at start or from an event may take before it is retried later.
TEARDOWN_TIMEOUT = 120.0

_log = log.get("networks")


@dataclass
class Capabilities:
    """CNI capability arguments besides port mappings, for every network of a request."""

    ips: list[str] = field(default_factory=list)
    mac: str = ""
    bandwidth: dict[str, int] = field(default_factory=dict)


@dataclass
class Prepared:
    """What a container's task needs from its networks."""

    netns: str = ""            # "" with the host's network
    host: bool = False
    files: dict[str, Path] = field(default_factory=dict)  # /etc/x -> file to bind
    hostname: str = ""
    attachments: list[Attachment] = field(default_factory=list)


def pm_msg(p: PortMapping) -> PortMappingMsg:
    return PortMappingMsg(host_ip=p.host_ip, host_port=p.host_port,
                          container_port=p.container_port, protocol=p.protocol)


def _port_free(p: PortMapping) -> str:
    """"" when the host port can be bound, else why not."""
    addr = p.host_ip or "0.0.0.0"
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    kind = socket.SOCK_DGRAM if p.protocol == "udp" else socket.SOCK_STREAM
    if p.protocol == "sctp":
        return ""  # no portable probe; the plugin reports clashes
    s = socket.socket(family, kind)
    try:
        s.bind((addr, p.host_port))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            return f"{addr} is not an address of this host"
        return e.strerror or str(e)
    finally:
        s.close()
    return ""


class NetworkManager:
    def __init__(self, *, plugins: Callable[[], dict[str, NetworkPlugin]], store:
                 AttachmentStore, state: Path, publish: Callable[[str, str, Any], None],
                 has_task: Callable[[str, str], bool] = lambda ns, id: False,
                 container_exists: Callable[[str, str], bool] = lambda ns, id: True) -> None:
        self._plugins = plugins
        self.store = store
        self.state = state
        self.netns_dir = state / "netns"
        self.etc_dir = state / "etc"
        self._publish = publish
        self.has_task = has_task
        self.container_exists = container_exists
        self._locks: dict[tuple[str, str], trio.Lock] = defaultdict(trio.Lock)
        self.creating: set[tuple[str, str]] = set()
        self._send, self._recv = trio.open_memory_channel[tuple[str, str]](math.inf)

    # -- lookups ---------------------------------------------------------------------

    def plugins(self) -> dict[str, NetworkPlugin]:
        return self._plugins()

    def networks(self) -> list[NetworkInfo]:
        out: list[NetworkInfo] = []
        seen: set[str] = set()
        for pid, plugin in self.plugins().items():
            try:
                infos = plugin.networks()
            except Exception as e:
                _log.warning("network plugin failed to list its networks", plugin=pid,
                             error=str(e))
                continue
            for info in infos:
                if info.name not in seen:
                    seen.add(info.name)
                    out.append(info)
        return out

    def config_errors(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for plugin in self.plugins().values():
            fn = getattr(plugin, "config_errors", None)
            if fn is not None:
                out.update(fn())
        return out

    def find(self, name: str) -> tuple[NetworkInfo, NetworkPlugin]:
        for plugin in self.plugins().values():
            try:
                infos = plugin.networks()
            except Exception:
                continue
            for info in infos:
                if info.name == name:
                    return info, plugin
        why = "; ".join(self.config_errors().values())
        raise errdefs.NotFound(f"network {name!r} not found" + (
            f" (config files skipped: {why})" if why else ""), raw=True)

    def _plugin_of(self, a: Attachment) -> NetworkPlugin:
        p = self.plugins().get(a.plugin)
        if p is None:
            raise errdefs.FailedPrecondition(
                f"network plugin {a.plugin!r} of attachment {a.id}/{a.network} is not "
                "loaded", raw=True)
        return p

    def netns_path(self, namespace: str, id: str) -> Path:
        # Identifiers never hold "@": the name is unambiguous in one flat folder.
        return self.netns_dir / f"{namespace}@{id}"

    def store_has(self, namespace: str, id: str) -> bool:
        return bool(self.store.list(namespace, id))

    def lock(self, namespace: str, id: str) -> trio.Lock:
        return self._locks[(namespace, id)]

    # -- checks ----------------------------------------------------------------------

    def _check_ports(self, ports: list[PortMapping]) -> None:
        keys = [p.key() for p in ports]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            ip, port, proto = sorted(dup)[0]
            raise errdefs.InvalidArgument(f"host port {ip}:{port}/{proto} mapped twice",
                                          raw=True)
        held = {}
        for a in self.store.list():
            for p in a.port_mappings:
                held[p.key()] = a
        for p in ports:
            if not 1 <= p.host_port <= 65535 or not 1 <= p.container_port <= 65535:
                raise errdefs.InvalidArgument(
                    f"port mapping {netlabels.format_port(p)}: ports must be in 1-65535",
                    raw=True)
            wild = ("0.0.0.0", p.host_port, p.protocol)
            other = held.get(p.key()) or (held.get(wild) if p.host_ip else None)
            if other is None and p.host_ip in ("", "0.0.0.0"):
                other = next((a for k, a in held.items() if k[1:] == p.key()[1:]), None)
            if other is not None:
                raise errdefs.AlreadyExists(
                    f"host port {netlabels.format_port(p)} is already allocated (to "
                    f"{other.id} on network {other.network})", raw=True)
            why = _port_free(p)
            if why:
                raise errdefs.AlreadyExists(
                    f"host port {netlabels.format_port(p)} is already in use: {why}",
                    raw=True)

    # -- attach and detach -----------------------------------------------------------

    async def attach(self, namespace: str, id: str, network: str, *, netns_path: str = "",
                     ports: list[PortMapping] | None = None, ifname: str = "",
                     container: bool = False, caps: Capabilities | None = None
                     ) -> Attachment:
        """Attach one namespace: ``netns_path``, or (empty) the id's berth-pinned one."""
        identifiers.validate(id)
        async with self.lock(namespace, id):
            made = await self._attach_locked(namespace, id, [network], ports or [],
                                             netns_path=netns_path, ifname=ifname,
                                             container=container, caps=caps)
        return made[0]

    async def _attach_locked(self, namespace: str, id: str, networks: list[str],
                             ports: list[PortMapping], *, netns_path: str = "",
                             ifname: str = "", container: bool,
                             caps: Capabilities | None = None) -> list[Attachment]:
        caps = caps or Capabilities()
        infos = [self.find(n) for n in networks]
        if ports and not any(info.port_mappings for info, _ in infos):
            raise errdefs.InvalidArgument(
                f"port mappings need a network that forwards ports; {', '.join(networks)} "
                "does not", raw=True)
        existing = self.store.list(namespace, id)
        for n in networks:
            if any(a.network == n for a in existing):
                raise errdefs.AlreadyExists(f"{id} is already attached to network {n!r}",
                                            raw=True)
        self._check_ports(ports)
        owned = False
        if not netns_path:
            pinned = [a for a in existing if a.owned_netns]
            if pinned:
                netns_path = pinned[0].netns
            elif any(info.needs_netns for info, _ in infos):
                netns_path, owned = str(self.netns_path(namespace, id)), True
        elif not netns.is_netns(netns_path):  # two stat calls: inline
            raise errdefs.InvalidArgument(f"{netns_path} is not a network namespace",
                                          raw=True)
        elif netns.is_own(netns_path):
            # Plugins would rename and address links of the host itself.
            raise errdefs.InvalidArgument(
                f"{netns_path} is berthd's own network namespace", raw=True)
        used = {a.ifname for a in existing}
        records: list[Attachment] = []
        ports_left = list(ports)
        for info, plugin in infos:
            name = ifname or next(f"eth{i}" for i in range(len(used) + 1)
                                  if f"eth{i}" not in used)
            used.add(name)
            mine = ports_left if info.port_mappings else []
            if mine:
                ports_left = []
            plugin_id = next(k for k, v in self.plugins().items() if v is plugin)
            records.append(Attachment(
                namespace=namespace, id=id, network=info.name, plugin=plugin_id,
                netns=netns_path if info.needs_netns else "", ifname=name,
                container=container, owned_netns=owned and info.needs_netns,
                port_mappings=list(mine), ips=list(caps.ips), mac=caps.mac,
                bandwidth=dict(caps.bandwidth)))
        # The records first, in one transaction: a crash from here on leaves them for
        # the teardown.
        self.store.add(*records)
        done: list[Attachment] = []
        try:
            if owned and not os.path.exists(netns_path):
                await trio.to_thread.run_sync(
                    lambda: netns.create(Path(netns_path), loopback_up=False))
            for r, (_, plugin) in zip(records, infos, strict=True):
                result = await plugin.setup(r.network, r.request())
                self.store.set_attached(r, result)
                done.append(r)
        except BaseException as e:
            with trio.CancelScope(shield=True):
                for r in records:
                    try:
                        await self._teardown_one(r)
                    except Exception as te:
                        # A config that cannot set up often cannot tear down either
                        # (its DEL fails the same way): what it made lives in the
                        # namespace, which goes below, so the record goes too.
                        _log.error("cleanup after failed attach", namespace=namespace,
                                   id=id, network=r.network, error=str(te), cause=str(e))
                        self.store.remove(r)
                await self._release_netns(namespace, id)
            if isinstance(e, errdefs.BerthError):
                raise
            if isinstance(e, OSError):
                raise errdefs.Unknown(f"attach {id} to {networks}: {e}", raw=True) from None
            raise
        for r in done:
            self._publish(namespace, "/networks/attach", NetworkAttach(
                id=id, network=r.network, netns=r.netns,
                addresses=r.result.addresses() if r.result else [],
                port_mappings=[pm_msg(p) for p in r.port_mappings]))
        return done

    async def _teardown_one(self, a: Attachment) -> None:
        """The plugin's teardown, then the record; raises (keeping it) on failure."""
        try:
            plugin = self._plugin_of(a)
            await plugin.teardown(a.network, a.request())
        except errdefs.NotFound:
            # The network is gone from the plugin's config: nothing left to undo there.
            _log.warning("network of attachment gone; dropping the record",
                         namespace=a.namespace, id=a.id, network=a.network)
        self.store.remove(a)

    async def _release_netns(self, namespace: str, id: str) -> None:
        path = self.netns_path(namespace, id)
        folder = self.etc_dir / namespace / id
        # Namespaces the caller named were never pinned here: no thread hops for them.
        if not (os.path.lexists(path) or os.path.lexists(folder)):
            return
        if self.store.using_netns(str(path)) == 0:
            await trio.to_thread.run_sync(netns.remove, path)
            await trio.to_thread.run_sync(
                lambda: shutil.rmtree(folder, ignore_errors=True))

    async def check(self, namespace: str, id: str, network: str) -> None:
        """The plugin's check of one attachment (CNI CHECK with the setup's result)."""
        async with self.lock(namespace, id):
            a = next((a for a in self.store.list(namespace, id) if a.network == network),
                     None)
            if a is None:
                raise errdefs.NotFound(f"attachment of {id} to network {network!r}",
                                       raw=True)
            if a.state == ATTACHING:
                raise errdefs.FailedPrecondition(
                    f"attachment of {id} to network {network!r} is not set up", raw=True)
            await self._plugin_of(a).check(a.network, a.request())

    async def detach(self, namespace: str, id: str, network: str = "") -> int:
        """Tear down the id's attachments (to ``network`` only, if named); how many."""
        async with self.lock(namespace, id):
            return await self._detach_locked(namespace, id, network)

    async def _detach_locked(self, namespace: str, id: str, network: str = "") -> int:
        todo = [a for a in self.store.list(namespace, id) if not network or
                a.network == network]
        if network and not todo:
            raise errdefs.NotFound(f"attachment of {id} to network {network!r}", raw=True)
        first: BaseException | None = None
        n = 0
        for a in reversed(todo):
            try:
                await self._teardown_one(a)
            except errdefs.BerthError as e:
                _log.error("network teardown failed", namespace=namespace, id=id,
                           network=a.network, error=str(e))
                first = first or e
                continue
            n += 1
            self._publish(namespace, "/networks/detach", NetworkDetach(id=id,
                                                                      network=a.network))
        await self._release_netns(namespace, id)
        if first is not None:
            raise first
        return n

    # -- containers ------------------------------------------------------------------

    async def prepare_container(self, namespace: str, id: str, labels: dict[str, str],
                                hostname: str | Callable[[], str] = "") -> Prepared | None:
        """Attach a container as its labels ask; None when they ask for nothing.

        ``hostname`` may be a function, called only for a container that gets addresses
        (finding it parses the container's whole spec)."""
        names = netlabels.networks_of(labels)
        ports = netlabels.ports_of(labels)
        if not names:
            if ports:
                raise errdefs.InvalidArgument(
                    f"label {netlabels.PORTS_LABEL} needs {netlabels.NETWORK_LABEL}",
                    raw=True)
            if not self.store_has(namespace, id):
                return None  # neither labels nor an attachment made through the API
        if HOST in names:
            if len(names) > 1 or ports:
                raise errdefs.InvalidArgument(
                    "the host network takes no other network and no port mappings",
                    raw=True)
            self.find(HOST)
            return Prepared(host=True)
        if NONE in names and len(names) > 1:
            raise errdefs.InvalidArgument("network none takes no other network", raw=True)
        async with self.lock(namespace, id):
            existing = self.store.list(namespace, id)
            wanted = [n for n in names if not any(a.network == n for a in existing)]
            caps = Capabilities(ips=netlabels.ips_of(labels), mac=netlabels.mac_of(labels))
            made = await self._attach_locked(namespace, id, wanted, ports, container=True,
                                             caps=caps) if wanted else []
            attachments = existing + made
            path = next((a.netns for a in attachments if a.netns), "")
            prepared = Prepared(netns=path, attachments=attachments)
            addresses = [ip for a in attachments if a.result for ip in a.result.addresses()]
            if addresses:
                prepared.hostname = (hostname() if callable(hostname) else hostname) \
                    or id[:63]
                dns = next((a.result.dns for a in attachments
                            if a.result and a.result.dns.nameservers), Result().dns)
                try:
                    prepared.files = await trio.to_thread.run_sync(
                        etcfiles.write, self.etc_dir / namespace / id, prepared.hostname,
                        addresses, dns)
                except OSError as e:
                    with trio.CancelScope(shield=True):
                        await self._detach_locked(namespace, id)
                    raise errdefs.Unknown(f"write /etc files of {id}: {e}", raw=True) \
                        from None
        return prepared

    async def release_container(self, namespace: str, id: str) -> None:
        if self.store.list(namespace, id):
            await self.detach(namespace, id)

    def task_gone(self, namespace: str, id: str) -> None:
        """A container's task ended without berth deleting it (a dead shim): detach later."""
        self._send.send_nowait((namespace, id))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Tear down what a previous berthd left, then detach containers reported gone."""
        task_status.started()
        await self.recover()
        async for ns, id in self._recv:
            if (ns, id) in self.creating or self.has_task(ns, id):
                continue
            with trio.move_on_after(TEARDOWN_TIMEOUT):
                try:
                    await self.release_container(ns, id)
                except errdefs.BerthError as e:
                    _log.error("detach after task end", namespace=ns, id=id, error=str(e))

    async def recover(self) -> int:
        """Tear down half-made attachments and those of containers without a task."""
        n = 0
        for a in self.store.list():
            if a.state != ATTACHING and not (a.container and not self.has_task(a.namespace,
                                                                             a.id)):
                continue
            with trio.move_on_after(TEARDOWN_TIMEOUT):
                async with self.lock(a.namespace, a.id):
                    if (a.namespace, a.id) in self.creating:
                        continue
                    try:
                        await self._teardown_one(a)
                        n += 1
                    except errdefs.BerthError as e:
                        _log.error("teardown at start failed", namespace=a.namespace,
                                   id=a.id, network=a.network, error=str(e))
                    await self._release_netns(a.namespace, a.id)
        if n:
            _log.info("tore down attachments left by a previous berthd", count=n)
        return n

    async def collect_stale(self) -> int:
        """The garbage collector's part: container attachments whose container is gone."""
        n = 0
        for a in self.store.stale():
            async with self.lock(a.namespace, a.id):
                if self.container_exists(a.namespace, a.id):
                    continue
                try:
                    n += await self._detach_locked(a.namespace, a.id)
                except errdefs.BerthError as e:
                    _log.warning("stale attachment teardown failed", namespace=a.namespace,
                                 id=a.id, error=str(e))
        return n


# -- the OCI spec ------------------------------------------------------------------------

def apply_to_spec(spec: AnyMsg, prepared: Prepared) -> AnyMsg:
    """The container's spec with the pinned namespace and the /etc files bound in."""
    doc = json.loads(bytes(spec.value))
    linux = doc.setdefault("linux", {})
    spaces = [n for n in (linux.get("namespaces") or []) if n.get("type") != "network"]
    if not prepared.host:
        spaces.append({"type": "network", "path": prepared.netns})
    linux["namespaces"] = spaces
    # Docker's way: a container of its own network answers to its name (in its own UTS
    # namespace), matching the /etc/hosts and /etc/hostname written for it.
    if prepared.hostname and not doc.get("hostname") and any(
            n.get("type") == "uts" and not n.get("path") for n in spaces):
        doc["hostname"] = prepared.hostname
    mounts = doc.setdefault("mounts", [])
    taken = {m.get("destination") for m in mounts}
    for dest, src in prepared.files.items():
        if dest not in taken:
            mounts.append({"destination": dest, "type": "bind", "source": str(src),
                           "options": ["rbind", "rprivate", "rw"]})
    return AnyMsg(type_url=spec.type_url, value=json.dumps(doc).encode())



def spec_hostname(spec: AnyMsg | None) -> str:
    if spec is None:
        return ""
    try:
        doc = json.loads(bytes(spec.value))
    except ValueError:
        return ""
    name = doc.get("hostname") if isinstance(doc, dict) else ""
    return name if isinstance(name, str) else ""
