"""A CRI pod's shared PID namespace without a pause container (NamespaceOption.pid =
POD): berth's holder process is PID 1, every container of the pod sees the others'
processes, with each runtime handler the CRI maps (berth's shim in-process, berth's shim
with runc, runc's v2 shim); pid = CONTAINER keeps them apart; the holder goes with
StopPodSandbox, survives a kill -9 of berthd, and its death makes the pod not ready."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from berth.core.api.runtime import v1 as api
from berth.plugins.cri import pidns
from tests import daemons
from tests.cri import CRIClient, cri_config, hosts_dir
from tests.integration.test_cri_images import base  # noqa: F401 - a fixture
from tests.integration.test_cri_pods import _exec, _wait, container_config, pod_config

if TYPE_CHECKING:
    from tests.images import Image, RegistryServer

pytest_plugins = ("tests.images",)
pytestmark = pytest.mark.root

RUNTIMES = {
    "runc": {"runtime_type": "io.containerd.runc.v2"},
    "berth": {"runtime_type": "io.containerd.berth.v1"},
    "berth-runc": {"runtime_type": "io.containerd.berth.v1",
                   "options": {"BinaryName": "runc"}},
}


@pytest.fixture
def cri(base: Path, registry: RegistryServer,  # noqa: F811 - a fixture
        busybox_oci: tuple[Path, Image]) -> Iterator[tuple[daemons.Daemon, CRIClient]]:
    from tests.images import push_image

    push_image(registry, "library/busybox", "latest", busybox_oci[1])
    (base / "net.d").mkdir()
    config = cri_config(base / "berth.toml", registry={"config_path": str(
        hosts_dir(base, "docker.io", registry.host))},
        cni={"conf_dir": str(base / "net.d"), "bin_dir": "/usr/lib/cni"},
        containerd={"runtimes": RUNTIMES})
    d = daemons.berthd(base / "d", "--config", str(config)).start()
    try:
        with CRIClient(d.state / "cri.sock") as c:
            c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
            yield d, c
    finally:
        remove_pods(d)
        d.stop()


def remove_pods(d: daemons.Daemon) -> None:
    """What a failed test left (pods, their holders and shims outlive berthd), removed
    while berthd still runs."""
    if d.proc is None or d.proc.poll() is not None:
        return
    with CRIClient(d.state / "cri.sock") as c:
        for p in c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items:
            c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=p.id))
            c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=p.id))


def _pod(c: CRIClient, folder: Path, name: str, mode: api.NamespaceMode, handler: str,
         ) -> tuple[str, api.PodSandboxConfig, list[str]]:
    """A pod with two sleeping containers (``sleep 1001``, ``sleep 1002``) whose PID
    namespace mode is ``mode``, as the kubelet sets it on the pod and its containers."""
    config = pod_config(folder / "logs", name)
    config.linux.security_context.namespace_options.pid = mode
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
        config=config, runtime_handler=handler)).pod_sandbox_id
    ids = [_container(c, sid, config, f"{name}{n}", f"exec sleep {1000 + n}", mode)
           for n in (1, 2)]
    return sid, config, ids


def _container(c: CRIClient, sid: str, config: api.PodSandboxConfig, name: str, script: str,
               mode: api.NamespaceMode) -> str:
    cfg = container_config(name, script)
    cfg.linux = api.LinuxContainerConfig(security_context=api.LinuxContainerSecurityContext(
        namespace_options=api.NamespaceOption(network=api.NamespaceMode.NODE, pid=mode)))
    cid = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=cfg)).container_id
    c.runtime("start_container", api.StartContainerRequest(container_id=cid))
    return str(cid)


def _ps(c: CRIClient, cid: str) -> str:
    r = _exec(c, cid, "ps", "-o", "pid,args")
    assert r.exit_code == 0, r.stderr
    return str(r.stdout.decode())


def _holders(d: daemons.Daemon) -> dict[int, str]:
    return pidns.find(d.state)


def _pid_holder(c: CRIClient, sid: str) -> int:
    import json

    info = c.runtime("pod_sandbox_status", api.PodSandboxStatusRequest(
        pod_sandbox_id=sid, verbose=True)).info["info"]
    return int(json.loads(info)["pidHolder"])


def _berthd_zombies(d: daemons.Daemon) -> list[str]:
    assert d.proc is not None
    out = os.popen(f"ps -o pid=,stat=,args= --ppid {d.proc.pid}").read().splitlines()
    return [x for x in out if x.split()[1].startswith("Z")]


@pytest.mark.parametrize("handler", ["berth", "berth-runc", "runc"])
def test_pod_shares_one_pid_namespace(cri: tuple[daemons.Daemon, CRIClient],
                                      base: Path, handler: str) -> None:  # noqa: F811
    d, c = cri
    shared, _, (a, b) = _pod(c, base, "shared", api.NamespaceMode.POD, handler)
    apart, _, (x, y) = _pod(c, base, "apart", api.NamespaceMode.CONTAINER, handler)

    # pid = POD: each container lists the other's process; PID 1 is berth's holder.
    assert "sleep 1002" in _ps(c, a) and "sleep 1001" in _ps(c, b)
    assert _exec(c, a, "cat", "/proc/1/cmdline").stdout.endswith(b"sleep\0infinity\0")
    # Its environment (berth's marker and paths) is not the pod's to read.
    assert _exec(c, a, "cat", "/proc/1/environ").stdout == b""
    pid_ns = {_exec(c, cid, "readlink", "/proc/self/ns/pid").stdout for cid in (a, b)}
    assert len(pid_ns) == 1 and pid_ns != {os.readlink("/proc/self/ns/pid").encode() + b"\n"}
    holder = _pid_holder(c, shared)
    assert _holders(d).get(holder, "").endswith(shared) and pidns.is_ns_init(holder)
    # PID 1 reaps the pod's orphans (SIGCHLD ignored: the kernel reaps them).
    r = _exec(c, a, "sh", "-c", "(sleep 0.1 &); sleep 0.5; ps -o stat,args")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) > 3, r
    assert not [x for x in r.stdout.splitlines()[1:] if x.startswith(b"Z")], r.stdout
    # pid = CONTAINER: each container is PID 1 of its own namespace, alone; no holder.
    assert "sleep 1002" not in _ps(c, x) and "sleep 1001" not in _ps(c, y)
    assert _exec(c, x, "cat", "/proc/1/cmdline").stdout == b"sleep\x001001\x00"
    assert _pid_holder(c, apart) == 0
    assert not [f for f in _holders(d).values() if f.endswith(apart)]

    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=shared))
    for cid in (a, b):
        st = c.runtime("container_status", api.ContainerStatusRequest(container_id=cid)).status
        assert st.state == api.ContainerState.CONTAINER_EXITED
    # No holder process is left (nor a zombie of berthd's), and its pin is gone.
    assert not [f for f in _holders(d).values() if f.endswith(shared)]
    _wait(lambda: not _berthd_zombies(d), "berthd reaping the holder")
    assert shared not in Path("/proc/self/mountinfo").read_text()
    for sid in (shared, apart):
        c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert _holders(d) == {}
    assert daemons.ctr_ok(d.address, "containers", "ls", "-q", namespace="k8s.io").out == ""


def test_pid_holder_survives_berthd_kill_and_its_death_ends_the_pod(
        cri: tuple[daemons.Daemon, CRIClient], base: Path) -> None:  # noqa: F811
    d, c = cri
    sid, config, (a, b) = _pod(c, base, "keep", api.NamespaceMode.POD, "berth")
    holder = _pid_holder(c, sid)
    c.close()
    d.kill()
    # berthd is gone; the holder and the pod's containers are not.
    assert holder in _holders(d)
    d.start()
    with CRIClient(d.state / "cri.sock") as c2:
        st = c2.runtime("pod_sandbox_status", api.PodSandboxStatusRequest(pod_sandbox_id=sid))
        assert st.status.state == api.PodSandboxState.SANDBOX_READY
        assert _pid_holder(c2, sid) == holder
        # A container started after the restart joins the same namespace.
        late = _container(c2, sid, config, "late", "exec sleep 1003", api.NamespaceMode.POD)
        assert "sleep 1001" in _ps(c2, late) and "sleep 1003" in _ps(c2, b)

        # PID 1 of the namespace dying takes the pod's containers with it and makes the
        # pod not ready, as a pause container's death does.
        assert pidns.kill(holder, str(Path(_holders(d)[holder])))
        _wait(lambda: c2.runtime("pod_sandbox_status", api.PodSandboxStatusRequest(
            pod_sandbox_id=sid)).status.state == api.PodSandboxState.SANDBOX_NOTREADY,
            "the pod not ready")

        def exited() -> bool:
            return all(c2.runtime("container_status", api.ContainerStatusRequest(
                container_id=cid)).status.state == api.ContainerState.CONTAINER_EXITED
                for cid in (a, b, late))
        _wait(exited, "the pod's containers killed with their PID namespace")
        c2.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
        c2.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    _wait(lambda: _holders(d) == {}, "no holder left")
    assert sid not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.parametrize("handler", ["berth", "runc"])
def test_target_pid_namespace(cri: tuple[daemons.Daemon, CRIClient], base: Path,  # noqa: F811
                              handler: str) -> None:
    """NamespaceMode.TARGET (``kubectl debug --target``): a container joins a running
    container's own PID namespace, pinned; bad targets are clear errors, nothing made."""
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    d, c = cri
    sid, config, (a, b) = _pod(c, base, "debugged", api.NamespaceMode.CONTAINER, handler)
    other, other_config, (x, _) = _pod(c, base, "other", api.NamespaceMode.CONTAINER, handler)

    def debugger(name: str, target: str, pod: str = sid,
                 pod_config: api.PodSandboxConfig = config) -> str:
        cfg = container_config(name, "exec sleep 1009")
        cfg.linux = api.LinuxContainerConfig(security_context=api.LinuxContainerSecurityContext(
            namespace_options=api.NamespaceOption(network=api.NamespaceMode.NODE,
                                                  pid=api.NamespaceMode.TARGET,
                                                  target_id=target)))
        cid = c.runtime("create_container", api.CreateContainerRequest(
            pod_sandbox_id=pod, sandbox_config=pod_config, config=cfg)).container_id
        c.runtime("start_container", api.StartContainerRequest(container_id=cid))
        return str(cid)

    dbg = debugger("dbg", a)
    assert _exec(c, dbg, "cat", "/proc/1/cmdline").stdout == b"sleep\x001001\x00"
    assert "sleep 1009" in _ps(c, a) and "sleep 1002" not in _ps(c, dbg)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f"containers/{dbg}/pidns" in mounts
    before = sorted(p.name for p in (d.state / "io.containerd.grpc.v1.cri" /
                                     "containers").iterdir())
    for target, code in ((x, Status.INVALID_ARGUMENT), ("f" * 64, Status.NOT_FOUND),
                         ("", Status.INVALID_ARGUMENT)):
        with pytest.raises(GRPCError) as e:
            debugger("bad", target)
        assert e.value.status == code and e.value.message, (target, e.value)
    c.runtime("stop_container", api.StopContainerRequest(container_id=b, timeout=0))
    with pytest.raises(GRPCError) as e:
        debugger("late", b)
    assert e.value.status == Status.FAILED_PRECONDITION, e.value
    assert sorted(p.name for p in (d.state / "io.containerd.grpc.v1.cri" /
                                   "containers").iterdir()) == before
    for pod in (sid, other):
        c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod))
        c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert f"containers/{dbg}/pidns" not in Path("/proc/self/mountinfo").read_text()
