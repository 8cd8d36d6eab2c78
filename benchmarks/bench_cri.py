"""CRI pod start and stop: berthd's CRI plugin next to the real containerd's (Debian 1.6).

Both daemons get the same images from one local registry (Debian's docker-registry on
127.0.0.1, through a hosts.toml mirror for docker.io): busybox, and for containerd a
"pause" image (the busybox layer, entrypoint ``sleep``) as its ``sandbox_image``, since
containerd runs an infra container per pod where berth pins the namespaces. Pods are
hostNetwork (no CNI on either side), one container each (``sleep``).

Measured, through the same Python CRI client (grpclib, our runtime.v1 proto):

- start: RunPodSandbox, CreateContainer, StartContainer (until the container runs);
- stop: StopPodSandbox, RemovePodSandbox;

serially (``--serial`` pods, one at a time: median ms per pod) and ``--parallel`` pods at
once (wall time of the batch). CPU: each daemon's own (utime + stime from /proc) per pod;
shims are separate processes and counted apart (their CPU when they exit is not seen).
Memory with the parallel batch running: daemon RSS growth and the shims' summed PSS, per
pod. berth runs both its handlers: ``runc`` (runc's v2 shim, as containerd) and ``berth``
(berth's shim).

    sudo python -m benchmarks.bench_cri [--serial 10] [--parallel 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from grpclib.client import Channel

from berth.core.api.runtime import v1 as api
from tests import daemons
from tests.cri import cri_config, hosts_dir, wait_served
from tests.images import PAUSE, oci_image, pause_image, push_image, running_registry

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSYBOX = "docker.io/library/busybox:latest"


def containerd_with_cri(base: Path, certs: Path) -> daemons.Daemon:
    """The real containerd with its CRI plugin, isolated in ``base``."""
    base.mkdir(parents=True, exist_ok=True)
    d = daemons.Daemon("containerd", base, [])
    (base / "net.d").mkdir(exist_ok=True)
    cfg = base / "config.toml"
    cfg.write_text(
        "version = 2\n"
        f'root = "{d.root}"\n'
        f'state = "{d.state}"\n'
        "[grpc]\n"
        f'  address = "{d.address}"\n'
        "[ttrpc]\n"
        f'  address = "{d.ttrpc_address}"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        f'  sandbox_image = "{PAUSE}"\n'
        "  restrict_oom_score_adj = true\n"
        "  disable_tcp_service = true\n"
        '  stream_server_address = "127.0.0.1"\n'
        '[plugins."io.containerd.grpc.v1.cri".cni]\n'
        f'  conf_dir = "{base / "net.d"}"\n'
        '[plugins."io.containerd.grpc.v1.cri".registry]\n'
        f'  config_path = "{certs}"\n'
    )
    d.argv = [daemons.CONTAINERD, "--config", str(cfg)]
    return d


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def shim_pss_kib(marker: str) -> tuple[int, int]:
    """(number of shims, summed PSS) of shim processes whose command line has ``marker``."""
    n = total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "shim" not in cmd or marker not in cmd:
                continue
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    n += 1
        except OSError:
            continue
    return n, total


class Side:
    def __init__(self, name: str, daemon: daemons.Daemon, address: Path, handler: str,
                 marker: str) -> None:
        self.name, self.daemon, self.address = name, daemon, address
        self.handler, self.marker = handler, marker
        self.rt: api.RuntimeServiceStub
        self.im: api.ImageServiceStub
        self.count = 0

    async def open(self) -> Channel:
        wait_served(self.address)
        ch = Channel(path=str(self.address))
        self.rt = api.RuntimeServiceStub(ch, timeout=300)
        self.im = api.ImageServiceStub(ch, timeout=300)
        return ch

    async def start_pod(self, base: Path) -> str:
        self.count += 1
        name = f"p{self.count}"
        (base / "logs" / name).mkdir(parents=True, exist_ok=True)
        config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=f"u-{name}", namespace="bench"),
            log_directory=str(base / "logs" / name),
            linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
                namespace_options=api.NamespaceOption(network=api.NamespaceMode.NODE))))
        sid = (await self.rt.run_pod_sandbox(api.RunPodSandboxRequest(
            config=config, runtime_handler=self.handler))).pod_sandbox_id
        cid = (await self.rt.create_container(api.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=api.ContainerConfig(
                metadata=api.ContainerMetadata(name="c"), image=api.ImageSpec(image=BUSYBOX),
                command=["sleep", "100000"], log_path="c.log")))).container_id
        await self.rt.start_container(api.StartContainerRequest(container_id=cid))
        return sid

    async def stop_pod(self, sid: str) -> None:
        await self.rt.stop_pod_sandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid))
        await self.rt.remove_pod_sandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = await fn()
    return time.perf_counter() - t, out


async def measure(side: Side, base: Path, serial: int, parallel: int) -> dict[str, float]:
    pid = side.daemon.proc.pid  # type: ignore[union-attr]
    out: dict[str, float] = {}
    await side.stop_pod(await side.start_pod(base))  # the first pod pays one-off costs
    starts, stops = [], []
    cpu0 = cpu_seconds(pid)
    for _ in range(serial):
        dt, sid = await timed(lambda: side.start_pod(base))
        starts.append(dt)
        dt, _ = await timed(lambda s=sid: side.stop_pod(s))
        stops.append(dt)
    out["serial_start_ms"] = statistics.median(starts) * 1000
    out["serial_stop_ms"] = statistics.median(stops) * 1000
    out["serial_cpu_ms_per_pod"] = (cpu_seconds(pid) - cpu0) * 1000 / serial
    rss0 = rss_kib(pid)
    cpu0 = cpu_seconds(pid)
    dt, sids = await timed(lambda: asyncio.gather(
        *(side.start_pod(base) for _ in range(parallel))))
    out["parallel_start_s"] = dt
    out["daemon_rss_kib_per_pod"] = (rss_kib(pid) - rss0) / parallel
    shims, pss = shim_pss_kib(side.marker)
    out["shims"] = shims
    out["shim_pss_kib_per_pod"] = pss / parallel
    dt, _ = await timed(lambda: asyncio.gather(*(side.stop_pod(s) for s in sids)))
    out["parallel_stop_s"] = dt
    out["parallel_cpu_ms_per_pod"] = (cpu_seconds(pid) - cpu0) * 1000 / parallel
    return out


async def run_side(side: Side, base: Path, serial: int, parallel: int,
                   images: list[str]) -> dict[str, float]:
    ch = await side.open()
    try:
        for ref in images:
            await side.im.pull_image(api.PullImageRequest(image=api.ImageSpec(image=ref)))
        return await measure(side, base, serial, parallel)
    finally:
        ch.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serial", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=30)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="berth-bench-cri-", dir="/tmp"))
    results: dict[str, dict[str, float]] = {}
    try:
        with running_registry() as reg:
            push_image(reg, "library/busybox", "latest", oci_image())
            push_image(reg, "library/pause", "bench", pause_image())
            certs = hosts_dir(base, "docker.io", reg.host)
            ctrd = containerd_with_cri(base / "c", certs).start()
            try:
                side = Side("containerd/runc", ctrd, ctrd.address, "", str(ctrd.address))
                results[side.name] = asyncio.run(run_side(
                    side, base / "c", args.serial, args.parallel, [BUSYBOX, PAUSE]))
            finally:
                ctrd.stop()
            cfg = cri_config(base / "berth.toml", registry={"config_path": str(certs)})
            berth = daemons.berthd(base / "b", "--config", str(cfg),
                                   "--log-level", "warn").start()
            try:
                for handler in ("runc", "berth"):
                    side = Side(f"berth/{handler}", berth, berth.state / "cri.sock", handler,
                                str(berth.address))
                    results[side.name] = asyncio.run(run_side(
                        side, base / "b", args.serial, args.parallel, [BUSYBOX]))
            finally:
                berth.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ref = results["containerd/runc"]
    keys = list(ref)
    print(f"{'':26}" + "".join(f"{k:>18}" for k in results))
    for k in keys:
        row = f"{k:26}" + "".join(f"{r[k]:18.1f}" for r in results.values())
        print(row)
    print("\nratios to containerd (lower is better for berth):")
    for name, r in results.items():
        if name == "containerd/runc":
            continue
        print(f"  {name}: " + ", ".join(
            f"{k}={r[k] / ref[k]:.2f}x" for k in keys if ref[k] and k != "shims"))
    print(f"load: {os.getloadavg()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
