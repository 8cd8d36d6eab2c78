"""Bad CRI input on a real berthd: every call given an id that does not exist, pods and
containers that cannot be made (log path or mount source outside what is allowed, an
image reference that does not parse, an unknown runtime handler, a seccomp profile that
does not parse...), a start that fails: each a clear CRI error, and nothing half made is
left (records, state folders, snapshots, leases, mounts, PID namespace holders)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from berth.core.api.runtime import v1 as api
from berth.plugins.cri import pidns
from tests import daemons
from tests.cri import CRIClient
from tests.integration.test_cri_images import base  # noqa: F401 - a fixture
from tests.integration.test_cri_pods import (  # noqa: F401 - fixtures
    container_config,
    mirrored,
    pod_config,
    pulled,
)

pytest_plugins = ("tests.images",)
pytestmark = pytest.mark.root

MISSING = "f" * 64


@pytest.fixture(autouse=True)
def _no_pod_left(pulled: tuple[daemons.Daemon, CRIClient]  # noqa: F811
                 ) -> Iterator[None]:
    from tests.integration.test_cri_namespaces import remove_pods

    yield
    remove_pods(pulled[0])


def _refused(c: CRIClient, call: str, req: object, *codes: Status) -> str:
    with pytest.raises(GRPCError) as e:
        c.runtime(call, req)
    assert e.value.status in codes, (call, e.value.status, e.value.message)
    assert e.value.message, call
    return str(e.value.message)


def _made(d: daemons.Daemon) -> dict[str, list[str]]:
    """What berthd holds for CRI pods and containers, outside its records."""
    cri_state = d.state / "io.containerd.grpc.v1.cri"
    return {
        "folders": sorted(p.name for p in cri_state.glob("*/*")
                          if p.parent.name in ("sandboxes", "containers")),
        "mounts": [x for x in Path("/proc/self/mountinfo").read_text().splitlines()
                   if str(cri_state) in x],
        "holders": sorted(set(pidns.find(d.state).values())),
        "containers": daemons.ctr_ok(d.address, "containers", "ls", "-q",
                                     namespace="k8s.io").out.split(),
        "leases": daemons.ctr_ok(d.address, "leases", "ls", "-q",
                                 namespace="k8s.io").out.split(),
        "snapshots": daemons.ctr_ok(d.address, "snapshots", "ls",
                                    namespace="k8s.io").out.splitlines()[1:],
    }


def test_ids_that_do_not_exist(pulled: tuple[daemons.Daemon, CRIClient]  # noqa: F811
                               ) -> None:
    d, c = pulled
    before = _made(d)
    for call, req in [
        ("container_status", api.ContainerStatusRequest(container_id=MISSING)),
        ("start_container", api.StartContainerRequest(container_id=MISSING)),
        ("stop_container", api.StopContainerRequest(container_id=MISSING)),
        ("exec_sync", api.ExecSyncRequest(container_id=MISSING, cmd=["true"])),
        ("container_stats", api.ContainerStatsRequest(container_id=MISSING)),
        ("update_container_resources", api.UpdateContainerResourcesRequest(
            container_id=MISSING, linux=api.LinuxContainerResources(cpu_shares=2))),
        ("reopen_container_log", api.ReopenContainerLogRequest(container_id=MISSING)),
        ("pod_sandbox_status", api.PodSandboxStatusRequest(pod_sandbox_id=MISSING)),
        ("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=MISSING)),
        ("pod_sandbox_stats", api.PodSandboxStatsRequest(pod_sandbox_id=MISSING)),
        ("create_container", api.CreateContainerRequest(
            pod_sandbox_id=MISSING, config=container_config("x", "true"))),
    ]:
        message = _refused(c, call, req, Status.NOT_FOUND)
        assert MISSING in message or "not found" in message.lower(), (call, message)
    # Removing what does not exist is no error (the kubelet retries removals).
    c.runtime("remove_container", api.RemoveContainerRequest(container_id=MISSING))
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=MISSING))
    assert _made(d) == before


def test_pods_that_cannot_be_made(pulled: tuple[daemons.Daemon, CRIClient],  # noqa: F811
                                  base: Path) -> None:  # noqa: F811
    d, c = pulled
    before = _made(d)
    relative_logs = pod_config(base / "logs", "rel")
    relative_logs.log_directory = "var/log/pods/x"
    bad_host = pod_config(base / "logs", "badhost")
    bad_host.hostname = "no/slashes"
    shared = pod_config(base / "logs", "kata")
    shared.linux.security_context.namespace_options.pid = api.NamespaceMode.POD
    for req, code in [
        (api.RunPodSandboxRequest(config=shared, runtime_handler="kata"), Status.NOT_FOUND),
        (api.RunPodSandboxRequest(config=relative_logs), Status.INVALID_ARGUMENT),
        (api.RunPodSandboxRequest(config=bad_host), Status.INVALID_ARGUMENT),
        (api.RunPodSandboxRequest(config=api.PodSandboxConfig()), Status.INVALID_ARGUMENT),
    ]:
        message = _refused(c, "run_pod_sandbox", req, code)
        if req.runtime_handler:
            assert "kata" in message
    assert c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items == []
    assert _made(d) == before
    # The names of refused pods are free again.
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(config=shared)).pod_sandbox_id
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert _made(d) == before


def test_containers_that_cannot_be_made_or_started(
        pulled: tuple[daemons.Daemon, CRIClient], base: Path) -> None:  # noqa: F811
    d, c = pulled
    config = pod_config(base / "logs", "bad")
    config.linux.security_context.namespace_options.pid = api.NamespaceMode.POD
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(config=config)).pod_sandbox_id
    before = _made(d)
    assert len(before["holders"]) == 1 and before["containers"] == [sid]
    bad_profile = base / "seccomp.json"
    bad_profile.write_text('{"defaultAction": ')

    def seccomp(path: str) -> api.LinuxContainerConfig:
        return api.LinuxContainerConfig(security_context=api.LinuxContainerSecurityContext(
            seccomp=api.SecurityProfile(api.SecurityProfileProfileType.Localhost, path)))

    def mount(host: str, dest: str = "/x") -> list[api.Mount]:
        return [api.Mount(container_path=dest, host_path=host)]

    bad = {
        "log path out of the pod's log directory": container_config(
            "a", "true", log_path="../../etc/escape.log"),
        "absolute log path": container_config("a2", "true", log_path="/etc/escape.log"),
        "mount source that does not exist": container_config(
            "b", "true", mounts=mount("/does/not/exist")),
        "relative mount source": container_config("c", "true", mounts=mount("relative")),
        "relative mount destination": container_config(
            "c2", "true", mounts=mount(str(base), "relative")),
        "unparsable image reference": api.ContainerConfig(
            metadata=api.ContainerMetadata(name="d"), image=api.ImageSpec(image="UPPER/Case")),
        "image not pulled": api.ContainerConfig(
            metadata=api.ContainerMetadata(name="e"), image=api.ImageSpec(image="absent:1")),
        "unparsable seccomp profile": container_config(
            "f", "true", linux=seccomp(str(bad_profile))),
        "missing seccomp profile": container_config(
            "f2", "true", linux=seccomp(str(base / "none.json"))),
        "device that is not one": container_config(
            "g", "true", devices=[api.Device("/dev/x", "/etc/hostname", "r")]),
        "group without user": container_config(
            "h", "true", linux=api.LinuxContainerConfig(
                security_context=api.LinuxContainerSecurityContext(
                    run_as_group=api.Int64Value(5)))),
    }
    for what, cfg in bad.items():
        with pytest.raises(GRPCError) as e:
            c.runtime("create_container", api.CreateContainerRequest(
                pod_sandbox_id=sid, config=cfg, sandbox_config=config))
        assert e.value.status in (Status.INVALID_ARGUMENT, Status.NOT_FOUND), (
            what, e.value.status, e.value.message)
        assert e.value.message, what
        assert c.runtime("list_containers", api.ListContainersRequest()).containers == [], what
        assert _made(d) == before, what

    # A start that fails (no such executable): a clear error, the container exited
    # with containerd's StartError, no task or shim left; it can be removed.
    cid = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=api.ContainerConfig(
            metadata=api.ContainerMetadata(name="nope"), image=api.ImageSpec(image="busybox"),
            command=["/does/not/exist"], log_path="nope.log"))).container_id
    _refused(c, "start_container", api.StartContainerRequest(container_id=cid),
             Status.UNKNOWN, Status.NOT_FOUND, Status.INVALID_ARGUMENT,
             Status.FAILED_PRECONDITION, Status.INTERNAL)
    st = c.runtime("container_status", api.ContainerStatusRequest(container_id=cid)).status
    assert (st.state, st.exit_code, st.reason) == (
        api.ContainerState.CONTAINER_EXITED, 128, "StartError"), st
    assert "/does/not/exist" in st.message
    assert daemons.ctr_ok(d.address, "tasks", "ls", "-q", namespace="k8s.io").out == ""
    _refused(c, "start_container", api.StartContainerRequest(container_id=cid),
             Status.FAILED_PRECONDITION)
    c.runtime("remove_container", api.RemoveContainerRequest(container_id=cid))
    assert _made(d) == before

    # A stopped pod takes no new container.
    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
    stopped = {**before, "holders": [], "mounts": []}  # no holder, no pinned namespace
    assert _made(d) == stopped
    _refused(c, "create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=container_config("late", "true")),
        Status.FAILED_PRECONDITION)
    assert _made(d) == stopped
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert _made(d)["containers"] == [] and _made(d)["folders"] == []
