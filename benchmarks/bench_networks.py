"""Setup + teardown of a container's network: berth's ``cni`` plugin against the floor.

The floor is the same CNI binaries (Debian's containernetworking-plugins) run directly
with the same conflist, as libcni would: loopback ADD on ``lo``, then each plugin's ADD
in order with the previous result, then DEL in reverse. Both sides first make and pin a
namespace and remove it after, with the same code, so the ratio is the overhead of berth
over the binaries themselves. Three ways are measured:

- ``floor``: the binaries, each run with ``subprocess.run`` (threads for parallel runs);
- ``plugin``: berth's ``CNINetworks.setup``/``teardown`` in this process, on trio;
- ``berthd``: a real berthd's Networks API (Attach/Detach of the pinned namespace):
  gRPC, the attachment records in sqlite, the events, and the plugin.

Each is run serially (``--serial`` operations, one at a time) and with ``--parallel``
operations at once (``--rounds`` batches). Reported: wall time per operation, the
ratio to the floor, and CPU time per operation (this process's, berthd's own and that
of the CNI binaries it ran).

    sudo python -m benchmarks.bench_networks [--serial 30] [--parallel 20] [--rounds 3]

Uses a bridge and a /24 of its own (10.215.x.0/24, checked free); the bridge and the
shared CNI chains the plugins made for it are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402
from pyroute2 import IPRoute  # noqa: E402

from berth.core import log as logsetup  # noqa: E402
from berth.core.networks import netns  # noqa: E402
from berth.core.networks.types import SetupRequest  # noqa: E402
from berth.plugins.networks.cni import plugin as cni  # noqa: E402
from tests import daemons  # noqa: E402
from tests.integration.test_networks import (  # noqa: E402
    remove_shared_chains,
    shared_chains,
)

CNI_BIN = "/usr/lib/cni"
NAME = "benchnet"


def free_subnet() -> str:
    with IPRoute() as ipr:
        taken = [ipaddress.ip_network(f"{a.get('address')}/{a['prefixlen']}", strict=False)
                 for a in ipr.get_addr(family=socket.AF_INET)]
        taken += [ipaddress.ip_network(f"{r.get('dst')}/{r['dst_len']}", strict=False)
                  for r in ipr.get_routes(family=socket.AF_INET) if r.get("dst")]
    for _ in range(200):
        net = ipaddress.ip_network(f"10.215.{random.randrange(256)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return str(net)
    raise SystemExit("no free /24 in 10.215.0.0/16")


def cpu_self_children() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU seconds of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return ((int(fields[11]) + int(fields[12])) / tick,
            (int(fields[13]) + int(fields[14])) / tick)


# -- the floor: the binaries, as libcni runs them ---------------------------------------

def _exec(kind: str, command: str, cid: str, ns: str, ifname: str, conf: dict[str, Any]
          ) -> Any:
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": ns,
           "CNI_IFNAME": ifname, "CNI_ARGS": "IgnoreUnknown=1", "CNI_PATH": CNI_BIN}
    p = subprocess.run([f"{CNI_BIN}/{kind}"], input=json.dumps(conf).encode(), env=env,
                       capture_output=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} {command}: {p.stdout!r} {p.stderr!r}")
    return json.loads(p.stdout) if p.stdout.strip() else None


def floor_op(conflist: dict[str, Any], state: Path) -> None:
    cid = uuid.uuid4().hex[:12]
    path = state / f"floor-{cid}"
    netns.create(path, loopback_up=False)
    try:
        ns = str(path)
        _exec("loopback", "ADD", cid, ns, "lo", cni.LOOPBACK)
        prev = None
        for p in conflist["plugins"]:
            conf = {**p, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
            if prev is not None:
                conf["prevResult"] = prev
            prev = _exec(p["type"], "ADD", cid, ns, "eth0", conf)
        for p in reversed(conflist["plugins"]):
            conf = {**p, "name": conflist["name"], "cniVersion": conflist["cniVersion"],
                    "prevResult": prev}
            _exec(p["type"], "DEL", cid, ns, "eth0", conf)
        _exec("loopback", "DEL", cid, ns, "lo", cni.LOOPBACK)
    finally:
        netns.remove(path)


# -- berth's plugin, in this process ----------------------------------------------------

async def plugin_op(plugin: cni.CNINetworks, state: Path) -> None:
    cid = uuid.uuid4().hex[:12]
    path = state / f"plugin-{cid}"
    await trio.to_thread.run_sync(lambda: netns.create(path, loopback_up=False))
    try:
        req = SetupRequest(namespace="bench", id=cid, netns=str(path))
        req.previous = await plugin.setup(NAME, req)
        await plugin.teardown(NAME, req)
    finally:
        await trio.to_thread.run_sync(netns.remove, path)


# -- berthd's API -----------------------------------------------------------------------

async def api_op(stub: Any, state: Path) -> None:
    from berth.core.api.berth.services.networks.v1 import AttachRequest, DetachRequest

    cid = uuid.uuid4().hex[:12]
    path = state / f"api-{cid}"
    await asyncio.to_thread(netns.create, path, loopback_up=False)
    try:
        await stub.attach(AttachRequest(id=cid, network=NAME, netns=str(path)))
        await stub.detach(DetachRequest(id=cid, network=NAME))
    finally:
        await asyncio.to_thread(netns.remove, path)


# -- measuring --------------------------------------------------------------------------

def measure(run: Callable[[int, int], None], serial: int, parallel: int, rounds: int,
            cpu: Callable[[], float]) -> dict[str, float]:
    """Wall and CPU seconds per operation, serial and ``parallel`` at once."""
    out: dict[str, float] = {}
    run(1, 1)  # warm: caches, the bridge, the shared iptables chains
    c0, t0 = cpu(), time.perf_counter()
    run(serial, 1)
    out["serial"], out["serial_cpu"] = ((time.perf_counter() - t0) / serial,
                                        (cpu() - c0) / serial)
    n = parallel * rounds
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(rounds):
        run(parallel, parallel)
    out["parallel"], out["parallel_cpu"] = ((time.perf_counter() - t0) / n, (cpu() - c0) / n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serial", type=int, default=30)
    ap.add_argument("--parallel", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    logsetup.setup("warn")
    base = Path(tempfile.mkdtemp(prefix="berth-bench-net-", dir="/tmp"))
    bridge = f"bb{uuid.uuid4().hex[:8]}"
    conflist = cni.default_conflist(NAME, bridge, free_subnet(), str(base / "ipam"))
    conf_dir = base / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-bench.conflist").write_text(json.dumps(conflist))
    state = base / "netns"
    state.mkdir()
    results: dict[str, dict[str, float]] = {}
    d: daemons.Daemon | None = None
    found = shared_chains()
    try:
        # The floor.
        def floor(n: int, width: int) -> None:
            with ThreadPoolExecutor(width) as pool:
                for f in [pool.submit(floor_op, conflist, state) for _ in range(n)]:
                    f.result()
        results["floor"] = measure(floor, args.serial, args.parallel, args.rounds,
                                   lambda: sum(cpu_self_children()))

        # berth's plugin, in process.
        plugin = cni.CNINetworks({**cni.DEFAULTS, "conf_dir": str(conf_dir)})

        def in_process(n: int, width: int) -> None:
            async def go() -> None:
                limit = trio.CapacityLimiter(width)

                async def one() -> None:
                    async with limit:
                        await plugin_op(plugin, state)
                async with trio.open_nursery() as nursery:
                    for _ in range(n):
                        nursery.start_soon(one)
            trio.run(go)
        results["plugin"] = measure(in_process, args.serial, args.parallel, args.rounds,
                                    lambda: sum(cpu_self_children()))

        # Through berthd.
        (base / "config.toml").write_text(
            f'[plugins."io.berth.network.v1.cni"]\nconf_dir = "{conf_dir}"\n')
        d = daemons.berthd(base / "d", "--config", str(base / "config.toml"),
                           "--log-level", "warn")
        d.start()  # the last --log-level wins
        assert d.proc is not None
        pid = d.proc.pid

        def via_api(n: int, width: int) -> None:
            from grpclib.client import Channel

            from berth.core.api.berth.services.networks.v1 import NetworksStub

            async def go() -> None:
                ch = Channel(path=str(d.address))
                stub = NetworksStub(ch, metadata={"containerd-namespace": "bench"})
                sem = asyncio.Semaphore(width)

                async def one() -> None:
                    async with sem:
                        await api_op(stub, state)
                try:
                    await asyncio.gather(*(one() for _ in range(n)))
                finally:
                    ch.close()
            asyncio.run(go())
        results["berthd"] = measure(via_api, args.serial, args.parallel, args.rounds,
                                    lambda: sum(proc_cpu(pid)) + sum(cpu_self_children()))
        c0 = proc_cpu(pid)
        via_api(args.serial, 1)
        c1 = proc_cpu(pid)
        own = [(c1[0] - c0[0]) / args.serial, (c1[1] - c0[1]) / args.serial]
    finally:
        if d is not None:
            d.stop()
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=bridge)
            if idx:
                ipr.link("del", index=idx[0])
        now = shared_chains()
        remove_shared_chains({t: now[t] - found[t] for t in now})
        shutil.rmtree(base, ignore_errors=True)

    f = results["floor"]
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'':8} {'serial ms/op':>13} {'ratio':>6} {'cpu ms/op':>10} "
          f"{'x' + str(args.parallel) + ' ms/op':>13} {'ratio':>6} {'cpu ms/op':>10}")
    for k, r in results.items():
        print(f"{k:8} {r['serial'] * 1e3:13.1f} {r['serial'] / f['serial']:6.2f} "
              f"{r['serial_cpu'] * 1e3:10.1f} {r['parallel'] * 1e3:13.1f} "
              f"{r['parallel'] / f['parallel']:6.2f} {r['parallel_cpu'] * 1e3:10.1f}")
    print(f"berthd's own CPU per serial op: {own[0] * 1e3:.1f} ms "
          f"(CNI binaries it ran: {own[1] * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
