"""Networks for real: berthd runs the real CNI plugins (bridge, host-local, portmap,
firewall, loopback from Debian's containernetworking-plugins) on a bridge and subnet of
this module's own, and containers (berth's CLI and the real ctr) get networking from
their labels.

Traffic goes only to 127.0.0.1 and to addresses inside namespaces berth made for the
tests. Every wait is bounded. What berth must leave behind after a container is gone is
counted on the host: addresses in the IPAM store, veths on the bridge, iptables rules,
pinned namespace files and their mounts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from pyroute2 import IPRoute

from berth.core.api.berth.services.networks.v1 import (
    AttachRequest,
    CheckRequest,
    DetachRequest,
    ListAttachmentsRequest,
    ListNetworksRequest,
    NetworksStub,
    PortMapping,
)
from berth.core.networks import netns
from tests import daemons
from tests.integration.test_berth_run import busybox_rootfs

pytestmark = pytest.mark.root

CNI_BIN = Path("/usr/lib/cni")
NETWORKS_STATE = "io.containerd.internal.v1.berth.networks"
# Bounds waits that should end by themselves; nothing is measured by them.
HANG_GUARD = 30.0
# CNI's chains shared by every container (made once, never removed by the plugins).
SHARED_CHAINS = ("CNI-FORWARD", "CNI-ADMIN", "CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK",
                 "CNI-HOSTPORT-MASQ")


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _host_networks() -> list[ipaddress.IPv4Network]:
    with IPRoute() as ipr:
        out = []
        for a in ipr.get_addr(family=socket.AF_INET):
            out.append(ipaddress.ip_network(f"{a.get('address')}/{a['prefixlen']}",
                                            strict=False))
        for r in ipr.get_routes(family=socket.AF_INET):
            dst = r.get("dst")
            if dst:
                out.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
        return out


def free_subnet() -> str:
    """A /24 in 10.214/16 that no address or route of the host overlaps."""
    taken = _host_networks()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.214.{random.randrange(256)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return str(net)
    raise RuntimeError("no free /24 in 10.214.0.0/16")


def iptables_save() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True,
                          timeout=HANG_GUARD).stdout


@dataclass
class Net:
    """A berthd whose default network is a bridge and subnet of this test run's own."""

    daemon: daemons.Daemon
    base: Path
    bridge: str
    subnet: str
    rootfs: Path

    @property
    def conf_dir(self) -> Path:
        return self.base / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.base / "ipam"

    @property
    def netns_dir(self) -> Path:
        return self.daemon.state / NETWORKS_STATE / "netns"

    @property
    def prefix(self) -> str:
        return self.subnet.rsplit(".", 1)[0] + "."

    def berth(self, *args: str, timeout: float = 60) -> daemons.Result:
        return daemons.berth(self.daemon.address, *args, timeout=timeout)

    def ok(self, *args: str) -> daemons.Result:
        r = self.berth(*args)
        assert r.rc == 0, f"berth {' '.join(args)}: {r.err}\n{self.daemon.logs()[-3000:]}"
        return r

    def run_d(self, cid: str, *cmd: str, net: str = "bridge", ports: tuple[str, ...] = ()
              ) -> None:
        flags = [a for p in ports for a in ("-p", p)]
        self.ok("run", "-d", "--net", net, *flags, "--fifo-dir", str(self.base / "fifo"),
                "--rootfs", str(self.rootfs), cid, *cmd)

    def exec(self, cid: str, *cmd: str, input: str | None = None) -> daemons.Result:
        argv = [sys.executable, "-m", "berth.core.cli", "--address",
                str(self.daemon.address), "tasks", "exec", "--exec-id", uid("x"),
                "--fifo-dir", str(self.base / "fifo"), cid, *cmd]
        p = subprocess.run(argv, capture_output=True, text=True, input=input,
                           timeout=HANG_GUARD)
        return daemons.Result(p.returncode, p.stdout, p.stderr)

    def remove(self, *cids: str) -> None:
        for cid in cids:
            self.berth("tasks", "rm", "-f", cid)
            self.berth("containers", "rm", cid)

    def api(self, method: str, req: Any, ns: str = "default") -> Any:
        async def call() -> Any:
            ch = Channel(path=str(self.daemon.address))
            try:
                stub = NetworksStub(ch, metadata={"containerd-namespace": ns})
                return await getattr(stub, method)(req)
            finally:
                ch.close()
        return asyncio.run(call())

    def address_of(self, cid: str) -> str:
        atts = self.api("list_attachments", ListAttachmentsRequest(id=cid)).attachments
        assert atts and atts[0].ips, f"{cid} has no address: {atts}"
        return atts[0].ips[0].address.split("/", 1)[0]

    # -- what the host holds -------------------------------------------------------

    def leftovers(self) -> dict[str, Any]:
        ipam = self.ipam_dir / "bridge"
        ips = sorted(p.name for p in ipam.iterdir()
                     if p.name not in ("lock",) and not p.name.startswith("last_reserved")) \
            if ipam.exists() else []
        with IPRoute() as ipr:
            br = ipr.link_lookup(ifname=self.bridge)
            veths = [str(link.get("ifname")) for link in ipr.get_links()
                     if br and link.get("master") == br[0]]
        saved = iptables_save()
        rules = [line for line in saved.splitlines() if self.prefix in line]
        chains = sorted(line.split()[0] for line in saved.splitlines()
                        if line.startswith(":CNI-") and line[1:].split()[0] not in SHARED_CHAINS)
        pinned = sorted(os.listdir(self.netns_dir)) if self.netns_dir.exists() else []
        mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if str(self.netns_dir) in line]
        return {"ips": ips, "veths": veths, "rules": rules, "chains": chains,
                "netns": pinned, "mounts": mounts}

    def settled(self, want: dict[str, Any]) -> dict[str, Any]:
        """The leftovers once they equal ``want``, or after a bounded wait: the kernel
        frees an unpinned namespace (and the veth end in it) asynchronously."""
        deadline = time.monotonic() + 10
        while (left := self.leftovers()) != want and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def assert_clean(self, chains_before: list[str]) -> None:
        want = {"ips": [], "veths": [], "rules": [], "chains": chains_before, "netns": [],
                "mounts": []}
        assert self.settled(want) == want


def write_config(base: Path, bridge: str, subnet: str) -> Path:
    cfg = base / "config.toml"
    cfg.write_text(
        '[plugins."io.berth.network.v1.cni"]\n'
        f'conf_dir = "{base / "net.d"}"\n'
        f'default_bridge = "{bridge}"\n'
        f'default_subnet = "{subnet}"\n'
        f'ipam_data_dir = "{base / "ipam"}"\n')
    return cfg


def start_daemon(base: Path, env: dict[str, str] | None = None) -> daemons.Daemon:
    d = daemons.berthd(base, "--config", str(base / "config.toml"))
    d.env.update(env or {})
    return d.start()


def shared_chains() -> dict[str, set[str]]:
    """CNI's shared chains present now, by table."""
    out: dict[str, set[str]] = {}
    for table in ("filter", "nat"):
        lines = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True,
                               text=True, check=True, timeout=HANG_GUARD).stdout.splitlines()
        out[table] = {line.split()[1] for line in lines
                      if line.startswith("-N ") and line.split()[1] in SHARED_CHAINS}
    return out


def remove_shared_chains(made: dict[str, set[str]]) -> None:
    """Remove the shared chains the CNI plugins made for this module (jumps, then chains),
    so the host's iptables are as the tests found them."""
    for table, chains in made.items():
        if not chains:
            continue
        ipt = ["iptables", "-w", "-t", table]
        lines = subprocess.run([*ipt, "-S"], capture_output=True, text=True, check=True,
                               timeout=HANG_GUARD).stdout.splitlines()
        for line in lines:
            parts = shlex.split(line)  # comments are quoted
            if parts and parts[0] == "-A" and "-j" in parts and \
                    parts[parts.index("-j") + 1] in chains:
                subprocess.run([*ipt, "-D", *parts[1:]], check=False, timeout=HANG_GUARD)
        for chain in chains:
            subprocess.run([*ipt, "-F", chain], check=False, timeout=HANG_GUARD)
        for chain in chains:
            subprocess.run([*ipt, "-X", chain], check=False, timeout=HANG_GUARD)


def remove_bridge(name: str) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    for b in ("bridge", "host-local", "portmap", "firewall", "loopback"):
        assert (CNI_BIN / b).is_file(), f"{CNI_BIN / b} missing: install " \
            "containernetworking-plugins (tests/setup-host.sh)"
    base = Path(tempfile.mkdtemp(prefix="berth-net-", dir="/tmp"))
    bridge = f"bt{uuid.uuid4().hex[:8]}"
    subnet = free_subnet()
    write_config(base, bridge, subnet)
    rootfs = busybox_rootfs(base / "rootfs")
    (rootfs / "www").mkdir()
    (rootfs / "www" / "index.html").write_text("hello from berth\n")
    found = shared_chains()
    d = start_daemon(base)
    n = Net(d, base, bridge, subnet, rootfs)
    try:
        yield n
    finally:
        for cid in n.berth("tasks", "ls", "-q").out.split():
            n.berth("tasks", "rm", "-f", cid)
        for cid in n.berth("containers", "ls", "-q").out.split():
            n.berth("containers", "rm", cid)
        n.daemon.stop()
        remove_bridge(bridge)
        now = shared_chains()
        remove_shared_chains({t: now[t] - found[t] for t in now})
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def chains(net: Net) -> list[str]:
    """The non-shared CNI chains before the test (other runs may hold some)."""
    return net.leftovers()["chains"]


def http_get(port: int) -> str:
    deadline = time.monotonic() + HANG_GUARD
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html",
                                        timeout=5) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the default network ---------------------------------------------------------------

def test_default_network_is_written_and_listed(net: Net) -> None:
    conf = json.loads((net.conf_dir / "10-berth-bridge.conflist").read_text())
    assert conf["name"] == "bridge"
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "portmap", "firewall"]
    assert conf["plugins"][0]["bridge"] == net.bridge and conf["plugins"][0]["ipMasq"]
    listed = {n.name: n for n in net.api("list", ListNetworksRequest()).networks}
    assert {k: v.plugin for k, v in listed.items()} == \
        {"none": "none", "host": "host", "bridge": "cni"}
    assert listed["bridge"].port_mappings and json.loads(listed["bridge"].config) == conf
    plugins = daemons.ctr_ok(net.daemon.address, "plugins", "ls").out
    for pid in ("none", "host", "cni"):
        assert any(line.split()[:2] == ["io.berth.network.v1", pid] and "ok" in line
                   for line in plugins.splitlines()), plugins


def test_two_containers_reach_each_other(net: Net, chains: list[str]) -> None:
    a, b = uid("a"), uid("b")
    net.run_d(a, "sleep", "1000")
    net.run_d(b, "sh", "-c", "echo from-b | nc -l -p 7000 > /tmp/got; sleep 1000")
    try:
        ip_a, ip_b = net.address_of(a), net.address_of(b)
        assert ip_a != ip_b and ip_a.startswith(net.prefix) and ip_b.startswith(net.prefix)
        for src, dst in ((a, ip_b), (b, ip_a)):
            r = net.exec(src, "ping", "-c1", "-W", "5", dst)
            assert r.rc == 0 and "1 packets received" in r.out, r
        # One connection, a payload each way.
        r = net.exec(a, "sh", "-c", f"echo from-a | nc -w 3 {ip_b} 7000")
        assert r.out == "from-b\n", r
        assert net.exec(b, "cat", "/tmp/got").out == "from-a\n"
        # berth wrote /etc/hosts, /etc/hostname and /etc/resolv.conf.
        assert f"{ip_a}\t{a}" in net.exec(a, "cat", "/etc/hosts").out
        assert net.exec(a, "hostname").out.strip() == a
        assert "127.0.0.53" not in net.exec(a, "cat", "/etc/resolv.conf").out
        # CHECK runs every plugin of the list with the setup's result...
        net.api("check", CheckRequest(id=a, network="bridge"))
        # ...and tells when the interface changed (a new MAC: the bridge plugin's DEL
        # still finds the link and its addresses, so it can clean up after).
        path = net.netns_dir / f"default@{b}"

        def new_mac() -> None:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="eth0")[0],
                         address="02:42:0a:0b:0c:0d")
        netns.run_in(path, new_mac)
        e = _grpc_error(net, "check", CheckRequest(id=b, network="bridge"))
        assert 'plugin type="bridge" failed (check)' in e.message, e.message
    finally:
        net.remove(a, b)
    net.assert_clean(chains)
    events = net.ok("events", "--since", "0", "--no-follow").out
    assert "/networks/attach" in events and "/networks/detach" in events


def test_net_none_has_only_loopback(net: Net) -> None:
    c = uid("none")
    r = net.ok("run", "--rm", "--net", "none", "--fifo-dir", str(net.base / "fifo"),
               "--rootfs", str(net.rootfs), c, "ip", "-o", "link")
    names = [line.split(":")[1].strip() for line in r.out.splitlines()]
    assert names == ["lo"], r.out
    assert "UP" in r.out.split("\n")[0]
    assert net.leftovers()["netns"] == []


def test_net_host_sees_the_host_interfaces(net: Net) -> None:
    c = uid("host")
    r = net.ok("run", "--rm", "--net", "host", "--fifo-dir", str(net.base / "fifo"),
               "--rootfs", str(net.rootfs), c, "ip", "-o", "link")
    names = {line.split(":")[1].strip().split("@")[0] for line in r.out.splitlines()}
    assert net.bridge in names and "lo" in names, r.out
    with IPRoute() as ipr:
        host = {str(link.get("ifname")) for link in ipr.get_links()}
    assert net.bridge in host and len(names & host) > 1


# -- port mappings -----------------------------------------------------------------------

def test_http_port_mapping_berth_cli_and_ctr(net: Net, chains: list[str]) -> None:
    web, web2 = uid("web"), uid("web2")
    p1, p2 = daemons_free_port(), daemons_free_port()
    net.run_d(web, "httpd", "-f", "-p", "80", "-h", "/www", ports=(f"127.0.0.1:{p1}:80",))
    try:
        assert http_get(p1) == "hello from berth\n"
        atts = net.api("list_attachments", ListAttachmentsRequest(id=web)).attachments
        assert [(m.host_ip, m.host_port, m.container_port, m.protocol)
                for m in atts[0].port_mappings] == [("127.0.0.1", p1, 80, "tcp")]
        # The real ctr (runc shim) asks by labels only.
        r = daemons.ctr(net.daemon.address, "run", "-d", "--label",
                        "io.berth.network=bridge", "--label",
                        f"io.berth.ports=127.0.0.1:{p2}:80", "--rootfs", str(net.rootfs),
                        web2, "/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www")
        assert r.rc == 0, r.err
        assert http_get(p2) == "hello from berth\n"
    finally:
        net.remove(web)
        daemons.ctr(net.daemon.address, "tasks", "kill", "-s", "KILL", web2)
        deadline = time.monotonic() + HANG_GUARD
        while daemons.ctr(net.daemon.address, "tasks", "rm", web2).rc != 0:
            if web2 not in daemons.ctr(net.daemon.address, "tasks", "ls", "-q").out.split():
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        daemons.ctr(net.daemon.address, "containers", "rm", web2)
    net.assert_clean(chains)


def daemons_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_capability_args_static_ip_and_mac(net: Net, chains: list[str]) -> None:
    conf = json.loads((net.conf_dir / "10-berth-bridge.conflist").read_text())
    conf["name"] = "static"
    conf["plugins"][0]["capabilities"] = {"ips": True, "mac": True}
    conf["plugins"][0]["ipam"]["dataDir"] = str(net.ipam_dir)
    (net.conf_dir / "20-static.conflist").write_text(json.dumps(conf))
    c = uid("static")
    ip = net.prefix + "77"
    try:
        r = net.ok("run", "--rm", "--net", "static", "--label", f"io.berth.ips={ip}/24",
                   "--label", "io.berth.mac=02:42:0a:d6:00:4d", "--fifo-dir",
                   str(net.base / "fifo"), "--rootfs", str(net.rootfs), c, "sh", "-c",
                   "ip -o addr show eth0; ip -o link show eth0")
        assert f"inet {ip}/24" in r.out, r.out
        assert "link/ether 02:42:0a:d6:00:4d" in r.out, r.out
        bad = net.berth("run", "--rm", "--net", "static", "--label", "io.berth.mac=nope",
                        "--fifo-dir", str(net.base / "fifo"), "--rootfs", str(net.rootfs),
                        uid("badmac"), "true")
        assert bad.rc != 0 and "invalid MAC address" in bad.err, bad
    finally:
        (net.conf_dir / "20-static.conflist").unlink()
        for cid in net.berth("containers", "ls", "-q").out.split():
            if cid.startswith(("static", "badmac")):
                net.remove(cid)
    net.assert_clean(chains)
    assert not list((net.ipam_dir / "static").glob(net.prefix + "*"))


# -- what killed processes leave -------------------------------------------------------

def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_shim_and_task_killed_leave_nothing(net: Net, chains: list[str]) -> None:
    c = uid("k9")
    net.run_d(c, "sleep", "1000", ports=(f"127.0.0.1:{daemons_free_port()}:80",))
    try:
        line = next(x for x in net.ok("tasks", "ls").out.splitlines() if x.split()[0] == c)
        pid = int(line.split()[1])
        shim = _ppid(pid)
        assert "containerd-shim" in Path(f"/proc/{shim}/cmdline").read_text()
        assert net.leftovers()["ips"]
        os.kill(shim, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + HANG_GUARD
        # berthd sees the shim gone, reports the task deleted and detaches it.
        while net.leftovers()["ips"] or c in net.ok("tasks", "ls", "-q").out.split():
            assert time.monotonic() < deadline, (net.leftovers(), net.daemon.logs()[-3000:])
            time.sleep(0.1)
        net.assert_clean(chains)
    finally:
        net.remove(c)
    net.assert_clean(chains)


def test_berthd_killed_between_attach_and_task_start(net: Net, chains: list[str]) -> None:
    # Attached (through the API, as the task create does first), never started.
    c = uid("k9d")
    net.ok("containers", "create", "--rootfs", str(net.rootfs), c, "sleep", "1000")
    att = net.api("attach", AttachRequest(id=c, network="bridge", port_mappings=[
        PortMapping(host_ip="127.0.0.1", host_port=daemons_free_port(), container_port=80)]))
    assert att.attachment.state == "attached" and att.attachment.ips
    assert net.leftovers()["netns"] == [f"default@{c}"]
    # And a running container, which must keep its network across the restart.
    live = uid("live")
    net.run_d(live, "sleep", "1000")
    ip_live = net.address_of(live)
    net.daemon.kill()
    net.daemon.start()
    try:
        # The new berthd tears down what has no task, in the background of its start.
        deadline = time.monotonic() + HANG_GUARD
        while (left := net.leftovers())["netns"] != [f"default@{live}"]:
            assert time.monotonic() < deadline, left
            time.sleep(0.1)
        left = net.settled({**left, "ips": [ip_live]})
        assert left["ips"] == [ip_live], left
        assert net.api("list_attachments", ListAttachmentsRequest(id=c)).attachments == []
        assert net.exec(live, "ip", "-o", "-4", "addr", "show", "eth0").out.count(ip_live)
    finally:
        net.remove(c, live)
    net.assert_clean(chains)


def test_deleting_a_container_tears_down_its_attachments(net: Net, chains: list[str]
                                                         ) -> None:
    c = uid("del")
    net.ok("containers", "create", "--rootfs", str(net.rootfs), c, "true")
    net.api("attach", AttachRequest(id=c, network="bridge"))
    assert net.leftovers()["netns"] == [f"default@{c}"]
    net.ok("containers", "rm", c)
    net.assert_clean(chains)
    assert net.api("list_attachments", ListAttachmentsRequest(id=c)).attachments == []


# -- many containers --------------------------------------------------------------------

def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _container_cycles(net: Net, count: int, batch: int) -> None:
    """Containers with a network and a `true` task, created and deleted through the API
    (no CLI process per container: the loop measures berth, not Python start-up)."""
    from berth.core.api.containerd.services.containers.v1 import (
        Container,
        ContainerRuntime,
        ContainersStub,
        CreateContainerRequest,
        DeleteContainerRequest,
    )
    from berth.core.api.containerd.services.tasks.v1 import (
        CreateTaskRequest,
        DeleteTaskRequest,
        StartRequest,
        TasksStub,
        WaitRequest,
    )
    from berth.core.oci import default_spec

    ch = Channel(path=str(net.daemon.address))
    md = {"containerd-namespace": "default"}
    containers, tasks = ContainersStub(ch, metadata=md), TasksStub(ch, metadata=md)
    users = default_spec.UserDB.from_root(str(net.rootfs))

    async def one(cid: str) -> None:
        spec = default_spec.build("default", cid, default_spec.Options(
            args=["true"], rootfs=str(net.rootfs)), users)
        await containers.create(CreateContainerRequest(container=Container(
            id=cid, runtime=ContainerRuntime(name="io.containerd.berth.v1"),
            spec=default_spec.to_any(spec), labels={
                "io.berth.network": "bridge",
                "io.berth.ports": f"127.0.0.1:{daemons_free_port()}:80"})))
        await tasks.create(CreateTaskRequest(container_id=cid))
        await tasks.start(StartRequest(container_id=cid))
        assert (await tasks.wait(WaitRequest(container_id=cid))).exit_status == 0
        await tasks.delete(DeleteTaskRequest(container_id=cid))
        await containers.delete(DeleteContainerRequest(id=cid))

    try:
        for i in range(0, count, batch):
            await asyncio.gather(*(one(f"many-{i + j}-{uuid.uuid4().hex[:6]}")
                                   for j in range(batch)))
    finally:
        ch.close()


def test_hundred_containers_leak_nothing(net: Net, chains: list[str]) -> None:
    assert net.daemon.proc is not None
    pid = net.daemon.proc.pid
    # A few first, so that lazily opened files and CNI's shared chains exist before counting.
    asyncio.run(_container_cycles(net, 5, 5))
    before, fds_before = net.leftovers(), _fd_count(pid)
    with IPRoute() as ipr:
        links_before = len(ipr.get_links())
    asyncio.run(_container_cycles(net, 100, 5))
    assert net.settled(before) == before
    net.assert_clean(chains)
    with IPRoute() as ipr:
        links_after = len(ipr.get_links())
    # Other programs on the machine may add or drop a link meanwhile; 100 leaked veths
    # would show far above that.
    assert links_after - links_before < 10
    # sqlite's and the loggers' files are opened once; a leak per container shows as 100.
    assert _fd_count(pid) - fds_before < 10


# -- bad input -------------------------------------------------------------------------

def _grpc_error(net: Net, method: str, req: Any) -> GRPCError:
    with pytest.raises(GRPCError) as e:
        net.api(method, req)
    return e.value


def test_bad_input_is_a_clear_error_and_leaves_nothing(net: Net, chains: list[str]) -> None:
    from grpclib.const import Status

    before = net.leftovers()
    c = uid("bad")
    net.ok("containers", "create", "--rootfs", str(net.rootfs), c, "true")
    try:
        e = _grpc_error(net, "attach", AttachRequest(id=c, network="no-such-net"))
        assert e.status == Status.NOT_FOUND and "no-such-net" in e.message
        # A conflist that does not parse.
        (net.conf_dir / "50-broken.conflist").write_text("{nope")
        e = _grpc_error(net, "attach", AttachRequest(id=c, network="broken"))
        assert e.status == Status.NOT_FOUND and "invalid JSON" in e.message, e.message
        errors = net.api("list", ListNetworksRequest()).errors
        assert [x.file for x in errors] == [str(net.conf_dir / "50-broken.conflist")]
        # A plugin that is missing, and one that fails: their words reach the client.
        (net.conf_dir / "51-missing.conflist").write_text(json.dumps(
            {"cniVersion": "1.0.0", "name": "missing",
             "plugins": [{"type": "no-such-cni-plugin"}]}))
        e = _grpc_error(net, "attach", AttachRequest(id=c, network="missing"))
        assert e.status == Status.FAILED_PRECONDITION
        assert 'failed to find plugin "no-such-cni-plugin"' in e.message
        (net.conf_dir / "52-failing.conflist").write_text(json.dumps(
            {"cniVersion": "1.0.0", "name": "failing", "plugins": [
                {"type": "bridge", "bridge": net.bridge, "ipam": {
                    "type": "host-local", "ranges": [[{"subnet": "not-a-subnet"}]],
                    "dataDir": str(net.ipam_dir)}}]}))
        e = _grpc_error(net, "attach", AttachRequest(id=c, network="failing"))
        assert e.status == Status.UNKNOWN
        assert 'plugin type="bridge" failed (add)' in e.message, e.message
        assert "not-a-subnet" in e.message, e.message
        # The same through a task: berth run prints the plugin's words.
        r = net.berth("run", "--rm", "--net", "failing", "--fifo-dir", str(net.base / "fifo"),
                      "--rootfs", str(net.rootfs), uid("badrun"), "true")
        assert r.rc != 0 and "not-a-subnet" in r.err, r
        # Ports: taken on the host, outside 1-65535.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            taken = s.getsockname()[1]
            e = _grpc_error(net, "attach", AttachRequest(id=c, network="bridge", port_mappings=[
                PortMapping(host_ip="127.0.0.1", host_port=taken, container_port=80)]))
            assert e.status == Status.ALREADY_EXISTS and "already in use" in e.message
        for bad in (0, 65536):
            e = _grpc_error(net, "attach", AttachRequest(id=c, network="bridge", port_mappings=[
                PortMapping(host_ip="127.0.0.1", host_port=bad, container_port=80)]))
            assert e.status == Status.INVALID_ARGUMENT and "1-65535" in e.message
        r = daemons.ctr(net.daemon.address, "run", "--label", "io.berth.network=bridge",
                        "--label", "io.berth.ports=127.0.0.1:70000:80", "--rootfs",
                        str(net.rootfs), uid("badctr"), "/bin/busybox", "true")
        assert r.rc != 0 and "outside 1-65535" in r.err, r.err
        e = _grpc_error(net, "attach", AttachRequest(id=c, network="bridge", port_mappings=[
            PortMapping(host_ip="not-an-ip", host_port=8080, container_port=80)]))
        assert e.status == Status.INVALID_ARGUMENT and "not-an-ip" in e.message
        for path in ("/proc/self/ns/net", "/proc/1/ns/net", "/etc/hostname", "relative"):
            e = _grpc_error(net, "attach", AttachRequest(id="raw", network="bridge",
                                                         netns=path))
            assert e.status == Status.INVALID_ARGUMENT, (path, e.message)
        e = _grpc_error(net, "attach", AttachRequest(id="no/such", network="bridge"))
        assert e.status == Status.INVALID_ARGUMENT
        e = _grpc_error(net, "attach", AttachRequest(id="ghost", network="bridge"))
        assert e.status == Status.NOT_FOUND
        e = _grpc_error(net, "detach", DetachRequest(id=c, network="bridge"))
        assert e.status == Status.NOT_FOUND
        assert net.api("list_attachments", ListAttachmentsRequest()).attachments == []
        assert net.settled(before) == before
    finally:
        for f in ("50-broken", "51-missing", "52-failing"):
            (net.conf_dir / f"{f}.conflist").unlink(missing_ok=True)
        for cid in net.berth("containers", "ls", "-q").out.split():
            if cid.startswith(("bad", "badrun", "badctr")):
                net.remove(cid)
    net.assert_clean(chains)


# -- a third-party plugin --------------------------------------------------------------

def test_third_party_network_plugin_from_a_wheel(net: Net, tmp_path: Path) -> None:
    src = Path(__file__).resolve().parent.parent / "netplugin"
    work = tmp_path / "src"
    shutil.copytree(src, work)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(work)], check=True,
                   timeout=300)
    (wheel,) = wheels.glob("berth_testnet-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    base = Path(tempfile.mkdtemp(prefix="berth-net3-", dir="/tmp"))
    write_config(base, net.bridge, net.subnet)
    d = start_daemon(base, {"PYTHONPATH": str(site)})
    try:
        plugins = daemons.ctr_ok(d.address, "plugins", "ls").out
        assert any(line.split()[:2] == ["io.berth.network.v1", "testnet"] and "ok" in line
                   for line in plugins.splitlines()), plugins
        r = daemons.berth(d.address, "run", "--rm", "--net", "testnet", "--fifo-dir",
                          str(base / "fifo"), "--rootfs", str(net.rootfs), uid("tp"),
                          "ip", "-o", "-4", "addr")
        assert r.rc == 0, r.err + d.logs()[-2000:]
        assert "tn0" in r.out and "192.0.2.10/24" in r.out, r.out
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
