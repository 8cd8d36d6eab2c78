"""CRI streaming: berthd's streaming server next to the real containerd's (Debian 1.6 CRI).

Both daemons run one hostNetwork pod with a busybox ``sleep`` container (containerd with
its pause sandbox image, as in bench_cri). Driven by the same client
(tests/cri_stream_client.py, SPDY/3.1 with ``v4.channel.k8s.io`` / ``portforward.k8s.io``):

- exec round trip: CRI ``Exec`` (a URL) + upgrade + ``true`` run to its exit status, one at a
  time (median and p90 ms, the daemon's CPU per exec);
- port-forward throughput: one forwarded connection reads ``--mb`` MB from a TCP server on
  the host's 127.0.0.1 (the pod shares the host network, so both daemons connect to the same
  server) (MB/s, the daemon's CPU per MB).

    sudo python -m benchmarks.bench_streaming [--execs 30] [--mb 100]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from benchmarks.bench_cri import BUSYBOX, containerd_with_cri, cpu_seconds
from berth.core.api.runtime import v1 as api
from tests import daemons
from tests.cri import CRIClient, cri_config, hosts_dir
from tests.cri_stream_client import spdy_connect, spdy_exec
from tests.images import PAUSE, oci_image, pause_image, push_image, running_registry


def start_pod(c: CRIClient, base: Path) -> str:
    (base / "logs").mkdir(parents=True, exist_ok=True)
    config = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="s", uid="u-s", namespace="bench"),
        log_directory=str(base / "logs"),
        linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
            namespace_options=api.NamespaceOption(network=api.NamespaceMode.NODE))))
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(config=config)).pod_sandbox_id
    cid = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=api.ContainerConfig(
            metadata=api.ContainerMetadata(name="c"), image=api.ImageSpec(image=BUSYBOX),
            command=["sleep", "100000"], log_path="c.log"))).container_id
    c.runtime("start_container", api.StartContainerRequest(container_id=cid))
    return sid, cid  # type: ignore[return-value]


async def _source(total: int, stream: trio.SocketStream) -> None:
    chunk = b"\0" * (1 << 20)
    async with stream:
        sent = 0
        while sent < total:
            await stream.send_all(chunk[:min(len(chunk), total - sent)])
            sent += min(len(chunk), total - sent)


def measure(c: CRIClient, pid: int, sid: str, cid: str, execs: int, mb: int
            ) -> dict[str, float]:
    out: dict[str, float] = {}

    async def run() -> None:
        def url() -> str:
            return c.runtime("exec", api.ExecRequest(container_id=cid, cmd=["true"],
                                                     stdout=True, stderr=True)).url
        assert (await spdy_exec(url())).exit_code == 0  # warm-up
        times = []
        cpu0 = cpu_seconds(pid)
        for _ in range(execs):
            t = time.perf_counter()
            res = await spdy_exec(url())
            times.append(time.perf_counter() - t)
            assert res.exit_code == 0
        out["exec_cpu_ms"] = (cpu_seconds(pid) - cpu0) * 1000 / execs
        out["exec_median_ms"] = statistics.median(times) * 1000
        out["exec_p90_ms"] = sorted(times)[int(0.9 * (len(times) - 1))] * 1000
        total = mb << 20
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(
                trio.serve_tcp, functools.partial(_source, total), 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            pf = c.runtime("port_forward", api.PortForwardRequest(pod_sandbox_id=sid)).url
            async with spdy_connect(pf, ["portforward.k8s.io"]) as (client, _):
                hdr = [("port", str(port)), ("requestID", "0")]
                await client.open([("streamType", "error")] + hdr)
                data = await client.open([("streamType", "data")] + hdr)
                cpu0 = cpu_seconds(pid)
                t = time.perf_counter()
                st = client.streams[data]
                got = 0
                while got < total and not st.fin:
                    st.changed = trio.Event()
                    await st.changed.wait()
                    got += len(st.data)
                    st.data.clear()  # the client keeps no 100 MB around
                dt = time.perf_counter() - t
            assert got == total, (got, total)
            out["pf_mb_per_s"] = mb / dt
            out["pf_cpu_ms_per_mb"] = (cpu_seconds(pid) - cpu0) * 1000 / mb
            nursery.cancel_scope.cancel()
    trio.run(run)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execs", type=int, default=30)
    ap.add_argument("--mb", type=int, default=100)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="berth-bench-stream-", dir="/tmp"))
    results: dict[str, dict[str, float]] = {}
    try:
        with running_registry() as reg:
            push_image(reg, "library/busybox", "latest", oci_image())
            push_image(reg, "library/pause", "bench", pause_image())
            certs = hosts_dir(base, "docker.io", reg.host)
            ctrd = containerd_with_cri(base / "c", certs).start()
            try:
                with CRIClient(ctrd.address) as c:
                    for ref in (BUSYBOX, PAUSE):
                        c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image=ref)))
                    sid, cid = start_pod(c, base / "c")
                    results["containerd"] = measure(c, ctrd.proc.pid, sid, cid,  # type: ignore[union-attr]
                                                    args.execs, args.mb)
                    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
                    c.runtime("remove_pod_sandbox",
                              api.RemovePodSandboxRequest(pod_sandbox_id=sid))
            finally:
                ctrd.stop()
            cfg = cri_config(base / "berth.toml", registry={"config_path": str(certs)})
            berth = daemons.berthd(base / "b", "--config", str(cfg),
                                   "--log-level", "warn").start()
            try:
                with CRIClient(berth.state / "cri.sock") as c:
                    c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image=BUSYBOX)))
                    sid, cid = start_pod(c, base / "b")
                    results["berth"] = measure(c, berth.proc.pid, sid, cid,  # type: ignore[union-attr]
                                               args.execs, args.mb)
                    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
                    c.runtime("remove_pod_sandbox",
                              api.RemovePodSandboxRequest(pod_sandbox_id=sid))
            finally:
                berth.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ref, ours = results["containerd"], results["berth"]
    print(f"{'':20}{'containerd':>14}{'berth':>14}{'berth/containerd':>18}")
    for k in ref:
        print(f"{k:20}{ref[k]:14.2f}{ours[k]:14.2f}{ours[k] / ref[k] if ref[k] else 0:17.2f}x")
    print(f"load: {os.getloadavg()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
