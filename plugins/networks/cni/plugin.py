"""Plugin ``io.berth.network.v1.cni``: one network per conflist in a config dir.

Setup runs, as containerd's CRI does with libcni: the ``loopback`` plugin on ``lo``, then
every plugin of the list in order (ADD), each result handed to the next as
``prevResult``; a failure deletes what the list made (DEL in reverse order) before the
error reaches the caller. Teardown is DEL in reverse with the setup's result; check is
CHECK in order (spec 0.4.0 and later). Before a list's first use its config version is
checked against each binary's ``VERSION`` answer (cached per binary).

When the config dir holds no network config at start, a default network ``bridge`` is
written there: bridge ``berth0`` with IP masquerade, host-local addresses from
10.213.0.0/16 (away from containerd's 10.88 and Docker's 172.17), portmap and firewall.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import trio

from berth.core import errdefs, log
from berth.core.networks.netns import is_netns
from berth.core.networks.types import NetworkInfo, Result, SetupRequest
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import NETWORK
from berth.plugins.networks.cni import conflist, invoke, result as cni_result

DEFAULTS: dict[str, Any] = {
    "conf_dir": "/etc/berth/cni/net.d",
    "bin_dirs": ["/usr/lib/cni", "/opt/cni/bin"],
    "exec_timeout": 60.0,
    # containerd's CRI brings lo up with the loopback plugin as a network of its own.
    "loopback": True,
    "write_default": True,
    "default_network": "bridge",
    "default_bridge": "berth0",
    "default_subnet": "10.213.0.0/16",
    # host-local's store; "" keeps its own default, /var/lib/cni/networks/<network>.
    "ipam_data_dir": "",
}

DEFAULT_FILE = "10-berth-bridge.conflist"
LOOPBACK = {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}
# Versions whose DEL and CHECK take the setup's result as prevResult.
PREV_RESULT_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
CAPABILITIES = ("portMappings", "ips", "mac", "bandwidth")

_log = log.get("cni")


def default_conflist(name: str, bridge: str, subnet: str, data_dir: str = "") -> dict[str, Any]:
    ipam: dict[str, Any] = {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                            "routes": [{"dst": "0.0.0.0/0"}]}
    if data_dir:
        ipam["dataDir"] = data_dir
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True,
             "hairpinMode": True, "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "firewall"},
        ],
    }


def write_default(conf_dir: Path, cfg: dict[str, Any]) -> Path | None:
    """Write the default network unless the dir already holds a network config."""
    conf_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    if any(n.endswith(conflist.EXTENSIONS) for n in os.listdir(conf_dir)):
        return None
    doc = default_conflist(cfg["default_network"], cfg["default_bridge"],
                           cfg["default_subnet"], cfg["ipam_data_dir"])
    path = conf_dir / DEFAULT_FILE
    tmp = conf_dir / f".{DEFAULT_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return path


def stdin_for(plugin: dict[str, Any], conf: conflist.ConfList, prev: Any,
              req: SetupRequest) -> bytes:
    """libcni's buildOneConfig: the plugin's config, the list's name and version, the
    previous result, and the runtimeConfig of the capabilities it declares."""
    doc = dict(plugin)
    doc["name"] = conf.name
    doc["cniVersion"] = conf.cni_version
    if prev is not None:
        doc["prevResult"] = prev
    caps = plugin.get("capabilities") or {}
    values: dict[str, Any] = {
        "portMappings": [p.to_cni() for p in req.port_mappings],
        "ips": list(req.ips), "mac": req.mac, "bandwidth": dict(req.bandwidth),
    }
    rc = {k: values[k] for k in CAPABILITIES if caps.get(k) and values[k]}
    if rc:
        doc["runtimeConfig"] = rc
    return json.dumps(doc).encode()


class CNINetworks:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.conf_dir = Path(cfg["conf_dir"])
        self.bin_dirs = [str(d) for d in cfg["bin_dirs"]]
        self.path = ":".join(self.bin_dirs)
        self.timeout = float(cfg["exec_timeout"])
        self.loopback = bool(cfg["loopback"])
        self._dir_key: tuple[Any, ...] | None = None
        self._dir = conflist.ConfDir()
        self._versions: dict[tuple[str, int], list[str]] = {}

    # -- configs ---------------------------------------------------------------------

    def _confs(self) -> conflist.ConfDir:
        """The config dir, reread when a file in it changed."""
        try:
            entries = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                             for e in os.scandir(self.conf_dir)
                             if e.name.endswith(conflist.EXTENSIONS))
        except FileNotFoundError:
            entries = []
        key = tuple(entries)
        if key != self._dir_key:
            self._dir = conflist.load_dir(self.conf_dir)
            self._dir_key = key
            for f, why in self._dir.errors.items():
                _log.warning("network config skipped", file=f, error=why)
        return self._dir

    def networks(self) -> list[NetworkInfo]:
        return [NetworkInfo(name=c.name, plugin="cni", config=c.text,
                            port_mappings="portMappings" in c.capabilities())
                for c in self._confs().networks.values()]

    def config_errors(self) -> dict[str, str]:
        return dict(self._confs().errors)

    def _conf(self, network: str) -> conflist.ConfList:
        conf = self._confs().networks.get(network)
        if conf is None:
            raise errdefs.NotFound(f"network {network!r}")
        return conf

    def binary(self, kind: str) -> str:
        for d in self.bin_dirs:
            p = os.path.join(d, kind)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        raise errdefs.FailedPrecondition(
            f'failed to find plugin "{kind}" in path [{self.path}]', raw=True)

    async def _negotiate(self, conf: conflist.ConfList) -> None:
        """Every binary of the list must speak the list's cniVersion."""
        for p in conf.plugins:
            kind = p["type"]
            binary = self.binary(kind)
            key = (binary, os.stat(binary).st_mtime_ns)
            supported = self._versions.get(key)
            if supported is None:
                out = await invoke.run(binary, kind, invoke.Invocation("VERSION", path=self.path),
                                       json.dumps({"cniVersion": conf.cni_version}).encode(),
                                       self.timeout)
                vs = out.get("supportedVersions") if isinstance(out, dict) else None
                if not isinstance(vs, list):
                    raise errdefs.Unknown(f'plugin type="{kind}": no supportedVersions in '
                                          "its VERSION answer", raw=True)
                supported = [str(v) for v in vs]
                self._versions[key] = supported
            if conf.cni_version not in supported:
                raise errdefs.FailedPrecondition(
                    f'plugin type="{kind}" does not support config version '
                    f'"{conf.cni_version}" of network {conf.name!r} (supports '
                    f"{', '.join(supported)})", raw=True)

    def _inv(self, command: str, req: SetupRequest, ifname: str | None = None
             ) -> invoke.Invocation:
        # A namespace that is gone, or a placeholder never pinned (berthd killed between
        # making the file and pinning the namespace: no ADD ran in it), is no namespace:
        # DEL then only releases what plugins hold outside one (IPAM), as CNI allows.
        netns = req.netns if command == "ADD" or is_netns(req.netns) else ""
        return invoke.Invocation(command, container_id=req.id, netns=netns,
                                 ifname=ifname or req.ifname, path=self.path)

    async def _loopback(self, command: str, req: SetupRequest) -> None:
        if self.loopback and req.netns:
            await invoke.run(self.binary("loopback"), "loopback",
                             self._inv(command, req, "lo"), json.dumps(LOOPBACK).encode(),
                             self.timeout)

    # -- the NetworkPlugin interface --------------------------------------------------

    async def setup(self, network: str, req: SetupRequest) -> Result:
        conf = self._conf(network)
        await self._negotiate(conf)
        try:
            await self._loopback("ADD", req)
            prev: Any = None
            for p in conf.plugins:
                prev = await invoke.run(self.binary(p["type"]), p["type"],
                                        self._inv("ADD", req), stdin_for(p, conf, prev, req),
                                        self.timeout)
            if prev is None:
                raise errdefs.Unknown(f"network {network!r}: the last plugin returned no "
                                      "result", raw=True)
            return cni_result.parse(prev)
        except BaseException as e:
            with trio.CancelScope(shield=True):
                try:
                    await self._delete(conf, req, None)
                except errdefs.BerthError as de:
                    _log.warning("cleanup after failed setup", network=network,
                                 id=req.id, error=str(de), cause=str(e))
            raise

    async def _delete(self, conf: conflist.ConfList, req: SetupRequest, prev: Any) -> None:
        first: errdefs.BerthError | None = None
        if conf.cni_version not in PREV_RESULT_VERSIONS:
            prev = None
        for p in reversed(conf.plugins):
            try:
                await invoke.run(self.binary(p["type"]), p["type"], self._inv("DEL", req),
                                 stdin_for(p, conf, prev, req), self.timeout)
            except errdefs.BerthError as e:
                first = first or e
        try:
            await self._loopback("DEL", req)
        except errdefs.BerthError as e:
            first = first or e
        if first is not None:
            raise first

    async def teardown(self, network: str, req: SetupRequest) -> None:
        conf = self._conf(network)
        await self._delete(conf, req, req.previous.raw if req.previous else None)

    async def check(self, network: str, req: SetupRequest) -> None:
        conf = self._conf(network)
        if conf.cni_version not in PREV_RESULT_VERSIONS:
            raise errdefs.NotImplemented_(
                f"configuration version {conf.cni_version!r} does not support CHECK",
                raw=True)
        if conf.disable_check:
            return
        await self._negotiate(conf)
        prev = req.previous.raw if req.previous else None
        for p in conf.plugins:
            await invoke.run(self.binary(p["type"]), p["type"], self._inv("CHECK", req),
                             stdin_for(p, conf, prev, req), self.timeout)


async def _init(ctx: InitContext) -> CNINetworks:
    cfg = dict(DEFAULTS)
    cfg.update(ctx.config)
    if cfg["write_default"]:
        try:
            written = await trio.to_thread.run_sync(write_default, Path(cfg["conf_dir"]), cfg)
        except OSError as e:
            # A read-only /etc costs the default network, not the plugin.
            _log.warning("cannot write the default network", conf_dir=cfg["conf_dir"],
                         error=str(e))
        else:
            if written is not None:
                _log.info("wrote the default network", path=str(written))
    plugin = CNINetworks(cfg)
    ctx.exports["conf_dir"] = str(plugin.conf_dir)
    ctx.exports["bin_dirs"] = plugin.path
    return plugin


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=NETWORK, id="cni", init=_init, config=dict(DEFAULTS))]
