"""CRI pods on a real berthd, driven in the kubelet's order: pull, RunPodSandbox
(hostNetwork, namespaces pinned by berth, no infra image), CreateContainer x2,
StartContainer, ExecSync, CRI-format logs, ContainerStatus, ListContainers, StopContainer,
StopPodSandbox, RemovePodSandbox; and bad input, each a clear error leaving nothing."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from berth.core.api.runtime import v1 as api
from tests import daemons
from tests.cri import CRIClient
from tests.integration.test_cri_images import base, mirrored  # noqa: F401 - fixtures

if TYPE_CHECKING:
    from tests.images import Image, RegistryServer

pytest_plugins = ("tests.images",)
pytestmark = pytest.mark.root

LOG_LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z (stdout|stderr) [FP] ")
# Bounds waits that end by themselves; nothing is measured by it.
HANG_GUARD = 60.0


def _wait(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + HANG_GUARD
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def pod_config(logs: Path, name: str = "web") -> api.PodSandboxConfig:
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"),
        hostname=name, log_directory=str(logs), labels={"app": name},
        annotations={"note": "kept as is"},
        linux=api.LinuxPodSandboxConfig(security_context=api.LinuxSandboxSecurityContext(
            namespace_options=api.NamespaceOption(network=api.NamespaceMode.NODE,
                                                  pid=api.NamespaceMode.CONTAINER))))


def container_config(name: str, script: str, **kw: object) -> api.ContainerConfig:
    fields: dict[str, object] = {"log_path": f"{name}/0.log", "labels": {"c": name}, **kw}
    return api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name), image=api.ImageSpec(image="busybox"),
        command=["sh", "-c", script], **fields)  # type: ignore[arg-type]


@pytest.fixture
def pulled(mirrored: tuple[daemons.Daemon, Image]  # noqa: F811 - a fixture
           ) -> Iterator[tuple[daemons.Daemon, CRIClient]]:
    d, _ = mirrored
    with CRIClient(d.state / "cri.sock") as c:
        c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
        yield d, c


def _exec(c: CRIClient, cid: str, *cmd: str, timeout: int = 0) -> api.ExecSyncResponse:
    return c.runtime("exec_sync", api.ExecSyncRequest(container_id=cid, cmd=list(cmd),
                                                      timeout=timeout))


def _addresses(d: daemons.Daemon, *ids: str) -> set[str]:
    out = set()
    for cid in ids:
        hits = list(d.state.glob(f"*/k8s.io/{cid}/address"))
        assert hits, f"no bundle for {cid}"
        out.add(hits[0].read_text())
    return out


@pytest.mark.parametrize("handler", ["berth", "runc"])
def test_kubelet_sequence_for_a_host_network_pod(pulled: tuple[daemons.Daemon, CRIClient],
                                                 base: Path, handler: str  # noqa: F811
                                                 ) -> None:
    d, c = pulled
    logs = base / "pods" / "default_web"
    config = pod_config(logs)
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
        config=config, runtime_handler=handler)).pod_sandbox_id
    st = c.runtime("pod_sandbox_status", api.PodSandboxStatusRequest(
        pod_sandbox_id=sid, verbose=True))
    assert st.status.state == api.PodSandboxState.SANDBOX_READY
    assert st.status.annotations == {"note": "kept as is"}
    assert st.status.runtime_handler == handler and "ipc" in st.info["info"]

    writer = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=container_config(
            "writer", "echo out; echo err >&2; head -c 20000 /dev/zero | tr '\\0' x; echo;"
                      " exec sleep 1000",
            envs=[api.KeyValue("GREETING", "hello")]))).container_id
    reader = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config,
        config=container_config(
            "reader", "exec sleep 1000",
            devices=[api.Device("/dev/mynull", "/dev/null", "rw")],
            linux=api.LinuxContainerConfig(security_context=api.LinuxContainerSecurityContext(
                seccomp=api.SecurityProfile(
                    api.SecurityProfileProfileType.RuntimeDefault)))))).container_id
    listed = c.runtime("list_containers", api.ListContainersRequest()).containers
    assert {x.id: x.state for x in listed} == {
        writer: api.ContainerState.CONTAINER_CREATED,
        reader: api.ContainerState.CONTAINER_CREATED}
    for cid in (writer, reader):
        c.runtime("start_container", api.StartContainerRequest(container_id=cid))
    st = c.runtime("container_status", api.ContainerStatusRequest(
        container_id=writer, verbose=True)).status
    assert st.state == api.ContainerState.CONTAINER_RUNNING and st.started_at > 0
    assert st.log_path == str(logs / "writer" / "0.log")

    # The CRI log: every line stamped, streams told apart, a long line in pieces.
    log_file = logs / "writer" / "0.log"
    _wait(lambda: log_file.exists() and log_file.read_bytes().count(b"\n") >= 4,
          "writer's log")
    lines = log_file.read_bytes().splitlines()
    assert all(LOG_LINE.match(x) for x in lines), lines[:3]
    assert any(x.endswith(b" stdout F out") for x in lines)
    assert any(x.endswith(b" stderr F err") for x in lines)
    pieces = [x for x in lines if b" stdout P " in x]
    assert len(pieces) == 1 and len(pieces[0].split(b" ", 3)[3]) == 16384

    # Stats from the containers' cgroups and the snapshotter.
    stats = c.runtime("container_stats", api.ContainerStatsRequest(container_id=writer)).stats
    assert stats.attributes.id == writer and stats.memory.usage_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0 and stats.writable_layer.fs_id.mountpoint
    listed = c.runtime("list_container_stats", api.ListContainerStatsRequest()).stats
    assert {s.attributes.id for s in listed} == {writer, reader}
    pod_stats = c.runtime("pod_sandbox_stats", api.PodSandboxStatsRequest(
        pod_sandbox_id=sid)).stats
    assert len(pod_stats.linux.containers) == 2 and pod_stats.linux.memory.usage_bytes.value

    r = _exec(c, writer, "sh", "-c", "echo $GREETING; echo oops >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == (b"hello\n", b"oops\n", 3)
    # One pod, one IPC namespace (pinned by berth), the node's network; one shim.
    ipc = {_exec(c, cid, "readlink", "/proc/self/ns/ipc").stdout for cid in (writer, reader)}
    assert len(ipc) == 1 and ipc != {os.readlink("/proc/self/ns/ipc").encode() + b"\n"}
    net = _exec(c, reader, "readlink", "/proc/self/ns/net").stdout
    assert net == os.readlink("/proc/self/ns/net").encode() + b"\n"
    assert len(_addresses(d, writer, reader)) == 1
    # RuntimeDefault seccomp (containerd's) refuses unshare(2) without CAP_SYS_ADMIN; the
    # writer has no profile. A device given by the pod spec is there.
    assert _exec(c, writer, "unshare", "-U", "true").exit_code == 0
    assert _exec(c, reader, "unshare", "-U", "true").exit_code != 0
    assert _exec(c, reader, "sh", "-c", "echo x > /dev/mynull").exit_code == 0
    # UpdateContainerResources reaches the running container's cgroup.
    c.runtime("update_container_resources", api.UpdateContainerResourcesRequest(
        container_id=reader, linux=api.LinuxContainerResources(
            memory_limit_in_bytes=64 << 20)))
    mem = c.runtime("container_stats", api.ContainerStatsRequest(
        container_id=reader)).stats.memory
    assert 0 < mem.available_bytes.value <= 64 << 20
    st = c.runtime("container_status", api.ContainerStatusRequest(container_id=reader)).status
    assert st.resources.linux.memory_limit_in_bytes == 64 << 20

    with pytest.raises(GRPCError) as e:
        _exec(c, writer, "sleep", "30", timeout=1)
    assert e.value.status == Status.DEADLINE_EXCEEDED

    # StopContainer: sh as pid 1 ignores SIGTERM, so the grace period ends in SIGKILL.
    c.runtime("stop_container", api.StopContainerRequest(container_id=writer, timeout=1))
    st = c.runtime("container_status", api.ContainerStatusRequest(container_id=writer)).status
    assert st.state == api.ContainerState.CONTAINER_EXITED and st.exit_code == 137
    running = c.runtime("list_containers", api.ListContainersRequest(filter=api.ContainerFilter(
        state=api.ContainerStateValue(api.ContainerState.CONTAINER_RUNNING)))).containers
    assert [x.id for x in running] == [reader]
    by_label = c.runtime("list_containers", api.ListContainersRequest(
        filter=api.ContainerFilter(label_selector={"c": "writer"}))).containers
    assert [x.id for x in by_label] == [writer]

    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
    items = c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items
    assert [(x.id, x.state) for x in items] == [(sid, api.PodSandboxState.SANDBOX_NOTREADY)]
    # State filters whose value is 0 (READY, CREATED) still filter: the kubelet's own.
    ready = c.runtime("list_pod_sandbox", api.ListPodSandboxRequest(filter=api.PodSandboxFilter(
        state=api.PodSandboxStateValue(api.PodSandboxState.SANDBOX_READY)))).items
    assert ready == []
    created = c.runtime("list_containers", api.ListContainersRequest(filter=api.ContainerFilter(
        state=api.ContainerStateValue(api.ContainerState.CONTAINER_CREATED)))).containers
    assert created == []
    st = c.runtime("container_status", api.ContainerStatusRequest(container_id=reader)).status
    assert st.state == api.ContainerState.CONTAINER_EXITED
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items == []
    assert c.runtime("list_containers", api.ListContainersRequest()).containers == []
    # Nothing left: no berth container, no container snapshot, no pinned namespace.
    assert daemons.ctr_ok(d.address, "containers", "ls", "-q", namespace="k8s.io").out == ""
    snaps = daemons.ctr_ok(d.address, "snapshots", "ls", namespace="k8s.io").out
    assert writer not in snaps and reader not in snaps
    assert sid not in Path("/proc/self/mountinfo").read_text()
    assert log_file.exists()  # logs belong to the kubelet, as with containerd


def test_bad_pod_and_container_input(pulled: tuple[daemons.Daemon, CRIClient],
                                     base: Path) -> None:  # noqa: F811
    d, c = pulled
    config = pod_config(base / "logs", "bad")
    bad_host = pod_config(base / "logs", "badhost")
    bad_host.hostname = "no/slashes"
    for call, req, code in [
        ("container_status", api.ContainerStatusRequest(container_id="f" * 64),
         Status.NOT_FOUND),
        ("start_container", api.StartContainerRequest(container_id="nope"), Status.NOT_FOUND),
        ("exec_sync", api.ExecSyncRequest(container_id="nope", cmd=["true"]),
         Status.NOT_FOUND),
        ("pod_sandbox_status", api.PodSandboxStatusRequest(pod_sandbox_id="nope"),
         Status.NOT_FOUND),
        ("run_pod_sandbox", api.RunPodSandboxRequest(config=config, runtime_handler="kata"),
         Status.NOT_FOUND),
        ("run_pod_sandbox", api.RunPodSandboxRequest(config=api.PodSandboxConfig()),
         Status.INVALID_ARGUMENT),
        ("run_pod_sandbox", api.RunPodSandboxRequest(config=bad_host), Status.INVALID_ARGUMENT),
    ]:
        with pytest.raises(GRPCError) as e:
            c.runtime(call, req)
        assert e.value.status == code, (call, e.value.message)
        assert e.value.message
    assert c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items == []
    # Removing what does not exist is no error (the kubelet retries).
    c.runtime("remove_container", api.RemoveContainerRequest(container_id="nope"))

    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(config=config)).pod_sandbox_id
    bad_profile = base / "seccomp.json"
    bad_profile.write_text('{"defaultAction": ')
    bad = [
        container_config("a", "true", log_path="../../etc/escape.log"),
        container_config("b", "true", mounts=[api.Mount(container_path="/x",
                                                        host_path="/does/not/exist")]),
        container_config("c", "true", mounts=[api.Mount(container_path="/x",
                                                        host_path="relative")]),
        api.ContainerConfig(metadata=api.ContainerMetadata(name="d"),
                            image=api.ImageSpec(image="UPPER/Case")),
        api.ContainerConfig(metadata=api.ContainerMetadata(name="e"),
                            image=api.ImageSpec(image="not-pulled:1")),
        container_config("f", "true", linux=api.LinuxContainerConfig(
            security_context=api.LinuxContainerSecurityContext(seccomp=api.SecurityProfile(
                api.SecurityProfileProfileType.Localhost, str(bad_profile))))),
        container_config("g", "true", devices=[api.Device("/dev/x", "/etc/hostname", "r")]),
    ]
    for cfg in bad:
        with pytest.raises(GRPCError) as e:
            c.runtime("create_container", api.CreateContainerRequest(
                pod_sandbox_id=sid, config=cfg, sandbox_config=config))
        assert e.value.status in (Status.INVALID_ARGUMENT, Status.NOT_FOUND), e.value.message
    assert c.runtime("list_containers", api.ListContainersRequest()).containers == []
    # The kubelet may stop and remove one container at once, and repeat itself.
    cid = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config,
        config=container_config("busy", "exec sleep 1000"))).container_id
    c.runtime("start_container", api.StartContainerRequest(container_id=cid))
    results = c.concurrently(
        ("stop_container", api.StopContainerRequest(container_id=cid, timeout=1)),
        ("remove_container", api.RemoveContainerRequest(container_id=cid)),
        ("stop_container", api.StopContainerRequest(container_id=cid, timeout=0)),
        ("remove_container", api.RemoveContainerRequest(container_id=cid)))
    assert not [r for r in results if isinstance(r, GRPCError)
                and r.status != Status.NOT_FOUND], results
    assert c.runtime("list_containers", api.ListContainersRequest()).containers == []
    names = daemons.ctr_ok(d.address, "containers", "ls", "-q", namespace="k8s.io").out.split()
    assert names == [sid]
    snaps = daemons.ctr_ok(d.address, "snapshots", "ls", namespace="k8s.io").out.splitlines()
    assert len(snaps) == 2  # the header and the image's one layer
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert c.runtime("version", api.VersionRequest()).runtime_name == "berth"


def test_pod_on_a_cni_network(base: Path, registry: RegistryServer,  # noqa: F811
                              busybox_oci: tuple[Path, Image]) -> None:
    """Two containers in one network namespace (one serves HTTP on localhost, the other
    fetches it), a host port on 127.0.0.1 into the pod, and nothing left after removal."""
    import urllib.request

    from tests.images import free_port
    from tests.integration.test_networks import remove_bridge

    d, bridge = _cni_daemon(base, registry, busybox_oci[1])
    port = free_port()
    try:
        with CRIClient(d.state / "cri.sock") as c:
            conds = {x.type: x for x in c.runtime("status", api.StatusRequest()).status.conditions}
            assert conds["NetworkReady"].status is True
            c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
            pod = pod_config(base / "logs", "net")
            pod.linux.security_context.namespace_options.network = api.NamespaceMode.POD
            pod.port_mappings = [api.PortMapping(protocol=api.Protocol.TCP, container_port=80,
                                                 host_port=port, host_ip="127.0.0.1")]
            sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
                config=pod, runtime_handler="berth")).pod_sandbox_id
            ip = c.runtime("pod_sandbox_status", api.PodSandboxStatusRequest(
                pod_sandbox_id=sid)).status.network.ip
            assert ip and not ip.startswith("127.")
            ids = []
            for name, script in (("web", "exec httpd -f -p 80 -h /etc"),
                                 ("fetch", "exec sleep 1000")):
                cid = c.runtime("create_container", api.CreateContainerRequest(
                    pod_sandbox_id=sid, sandbox_config=pod,
                    config=container_config(name, script))).container_id
                c.runtime("start_container", api.StartContainerRequest(container_id=cid))
                ids.append(cid)
            web, fetch = ids

            def fetched() -> bool:
                r = _exec(c, fetch, "wget", "-q", "-O-", "http://127.0.0.1:80/hostname")
                return r.exit_code == 0 and r.stdout == b"net\n"
            _wait(fetched, "the pod's second container fetching from the first")
            nets = {_exec(c, cid, "readlink", "/proc/self/ns/net").stdout for cid in ids}
            assert len(nets) == 1
            addr = _exec(c, fetch, "ip", "-4", "-o", "addr", "show", "eth0").stdout
            assert ip.encode() in addr

            def from_host() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/hostname",
                                                timeout=5) as r:
                        return r.read() == b"net\n"
                except OSError:
                    return False
            _wait(from_host, "the host port into the pod")
            c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
            c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
            assert c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items == []
        assert sid not in Path("/proc/self/mountinfo").read_text()
        assert not [p for p in d.state.rglob("*") if sid in p.name]  # no netns pin, no files
        assert not list((base / "ipam").rglob("10.*"))  # the pod's address is free again
    finally:
        d.stop()
        remove_bridge(bridge)


def test_berthd_killed_and_restarted(pulled: tuple[daemons.Daemon, CRIClient],
                                     base: Path) -> None:  # noqa: F811
    """kill -9 of berthd: after the restart the pod and its containers are listed with
    the right states, a running one keeps running and logging, an exit that happened
    while berthd was down is reported, and the pod stops and goes away."""
    d, c = pulled
    config = pod_config(base / "logs", "survivor")
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
        config=config, runtime_handler="berth")).pod_sandbox_id
    shared = base / "shared"
    shared.mkdir()
    mount = [api.Mount(container_path="/shared", host_path=str(shared))]
    ids = {}
    for name, script in (("ticker", "while true; do echo tick; sleep 0.2; done"),
                         ("quitter", "until [ -e /shared/go ]; do sleep 0.1; done;"
                                     " touch /shared/done; exit 7")):
        ids[name] = c.runtime("create_container", api.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config,
            config=container_config(name, script, mounts=mount))).container_id
        c.runtime("start_container", api.StartContainerRequest(container_id=ids[name]))
    c.close()
    d.kill()
    log_file = base / "logs" / "ticker" / "0.log"
    size = log_file.stat().st_size
    (shared / "go").touch()  # the quitter exits while berthd is down
    _wait(lambda: (shared / "done").exists(), "the quitter's last step")
    d.start()
    with CRIClient(d.state / "cri.sock") as c2:
        items = c2.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items
        assert [(x.id, x.state) for x in items] == [(sid, api.PodSandboxState.SANDBOX_READY)]

        def status(name: str) -> api.ContainerStatus:
            return c2.runtime("container_status", api.ContainerStatusRequest(
                container_id=ids[name])).status
        assert status("ticker").state == api.ContainerState.CONTAINER_RUNNING
        _wait(lambda: status("quitter").state == api.ContainerState.CONTAINER_EXITED,
              "the exit that happened while berthd was down")
        assert status("quitter").exit_code == 7
        _wait(lambda: log_file.stat().st_size > size + 200, "logging after the restart")
        assert all(LOG_LINE.match(x) for x in log_file.read_bytes().splitlines())
        assert _exec(c2, ids["ticker"], "echo", "alive").stdout == b"alive\n"
        # Rotation, as the kubelet does it: move the file, then ReopenContainerLog.
        log_file.rename(log_file.with_suffix(".log.1"))
        c2.runtime("reopen_container_log", api.ReopenContainerLogRequest(
            container_id=ids["ticker"]))
        _wait(lambda: log_file.exists() and b"stdout F tick" in log_file.read_bytes(),
              "a new log file after ReopenContainerLog")
        c2.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
        assert status("ticker").state == api.ContainerState.CONTAINER_EXITED
        c2.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
        assert c2.runtime("list_containers", api.ListContainersRequest()).containers == []
    assert daemons.ctr_ok(d.address, "containers", "ls", "-q", namespace="k8s.io").out == ""
    assert sid not in Path("/proc/self/mountinfo").read_text()


def test_container_events_stream(pulled: tuple[daemons.Daemon, CRIClient],
                                 base: Path) -> None:  # noqa: F811
    d, c = pulled
    got, task = c.watch_events()
    E = api.ContainerEventType
    # The stream is open once events for a pod arrive (bounded retries, no timing).
    for attempt in range(100):
        config = pod_config(base / "logs", f"probe{attempt}")
        sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(config=config))
        sid = sid.pod_sandbox_id
        c.pump()
        if any(e.container_id == sid for e in got):
            break
        c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    else:
        raise AssertionError("no container events arrived")
    cid = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config,
        config=container_config("short", "exit 0"))).container_id
    c.runtime("start_container", api.StartContainerRequest(container_id=cid))

    def stopped_seen() -> bool:
        c.pump()
        return any(e.container_id == cid and e.container_event_type ==
                   E.CONTAINER_STOPPED_EVENT for e in got)
    _wait(stopped_seen, "the exit event")
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    _wait(lambda: c.pump() or any(e.container_id == sid and e.container_event_type ==
                                  E.CONTAINER_DELETED_EVENT for e in got), "pod deleted")
    mine = [e.container_event_type for e in got if e.container_id == cid]
    assert mine == [E.CONTAINER_CREATED_EVENT, E.CONTAINER_STARTED_EVENT,
                    E.CONTAINER_STOPPED_EVENT, E.CONTAINER_DELETED_EVENT]
    stopped = next(e for e in got if e.container_id == cid
                   and e.container_event_type == E.CONTAINER_STOPPED_EVENT)
    assert stopped.pod_sandbox_status.id == sid
    assert [s.exit_code for s in stopped.containers_statuses] == [0]
    assert [e.container_event_type for e in got if e.container_id == sid][-1] == \
        E.CONTAINER_DELETED_EVENT
    c.stop_watch(task)


def test_ten_megabytes_of_output_in_the_log(pulled: tuple[daemons.Daemon, CRIClient],
                                            base: Path) -> None:  # noqa: F811
    """Every line of ~10 MB of stdout, in order, and a long stderr line in P pieces then
    F, all in the log once the container shows as exited."""
    d, c = pulled
    config = pod_config(base / "logs", "chatty")
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(config=config)).pod_sandbox_id
    n = 1_400_000
    cid = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=container_config(
            "chatty", f"seq 1 {n}; head -c 40000 /dev/zero | tr '\\0' y >&2; echo >&2"))
    ).container_id
    c.runtime("start_container", api.StartContainerRequest(container_id=cid))
    _wait(lambda: c.runtime("container_status", api.ContainerStatusRequest(
        container_id=cid)).status.state == api.ContainerState.CONTAINER_EXITED, "exit")
    data = (base / "logs" / "chatty" / "0.log").read_bytes()
    assert len(data) > 10_000_000
    out, err = [], []
    for line in data.splitlines():
        assert LOG_LINE.match(line), line[:80]
        _, stream, tag, text = line.split(b" ", 3)
        (out if stream == b"stdout" else err).append((tag, text))
    assert out == [(b"F", str(i).encode()) for i in range(1, n + 1)]
    assert [t for t, _ in err] == [b"P", b"P", b"F"]
    assert b"".join(x for _, x in err) == b"y" * 40000
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))


def _cni_daemon(folder: Path, registry: RegistryServer, img: Image
                ) -> tuple[daemons.Daemon, str]:
    import json

    from tests.cri import cri_config, hosts_dir
    from tests.images import push_image
    from tests.integration.test_networks import free_subnet

    push_image(registry, "library/busybox", "latest", img)
    bridge = f"bc{os.urandom(4).hex()}"
    conf_dir = folder / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-pods.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "pods", "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True,
             "ipam": {"type": "host-local", "dataDir": str(folder / "ipam"),
                      "ranges": [[{"subnet": free_subnet()}]]}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    config = cri_config(folder / "berth.toml", registry={"config_path": str(
        hosts_dir(folder, "docker.io", registry.host))},
        cni={"conf_dir": str(conf_dir), "bin_dir": "/usr/lib/cni"})
    d = daemons.berthd(folder / "d", "--config", str(config))
    d.env["BERTH_SHIM_ZYGOTE_IDLE"] = "1"
    return d.start(), bridge


def _leftovers(d: daemons.Daemon, folder: Path, cgroup_parent: str = ""
               ) -> dict[str, list[str]]:
    from berth.plugins.cri import pidns

    mounts = [x for x in Path("/proc/self/mountinfo").read_text().splitlines()
              if str(d.state) in x and ("cri" in x or "netns" in x)]
    ips = [p.name for p in (folder / "ipam").rglob("*") if p.name[:1].isdigit()]
    netns = [p.name for p in d.state.rglob("k8s.io@*")]
    shims = [x for x in os.popen("pgrep -af containerd-shim").read().splitlines()
             if str(d.address) in x and " start" not in x]
    holders = [f"{pid} {f}" for pid, f in pidns.find(d.state).items()]
    # The containers' cgroups under the pod's parent, in every hierarchy.
    cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*{cgroup_parent}/*")
               if cgroup_parent and p.is_dir()]
    return {"mounts": mounts, "ips": ips, "netns": netns, "shims": shims,
            "holders": holders, "cgroups": cgroups}


def _states_agree(d: daemons.Daemon, c: CRIClient, pods: list[api.PodSandbox]) -> None:
    """What the CRI says after a restart is what runs: a running container has a running
    task, any other none; a ready pod (sharing its PID namespace) has its holder, a pod
    not ready has no running container."""
    from berth.plugins.cri import pidns

    tasks = {}
    for line in daemons.ctr_ok(d.address, "tasks", "ls", namespace="k8s.io").out.splitlines()[1:]:
        cid, _, status = line.split()[:3]
        tasks[cid] = status
    holders = set(pidns.find(d.state).values())
    ctrs = c.runtime("list_containers", api.ListContainersRequest()).containers
    for x in ctrs:
        running = x.state == api.ContainerState.CONTAINER_RUNNING
        assert (tasks.get(x.id) == "RUNNING") == running, (x.id, x.state, tasks)
    for p in pods:
        mine = [x for x in ctrs if x.pod_sandbox_id == p.id]
        if p.state == api.PodSandboxState.SANDBOX_READY:
            assert any(f.endswith(p.id) for f in holders), (p.id, holders)
        else:
            assert not [x for x in mine if x.state == api.ContainerState.CONTAINER_RUNNING]


@pytest.mark.parametrize("handler", ["berth", "runc"])
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.6])
def test_berthd_killed_during_pod_start_and_stop(base: Path, registry: RegistryServer,  # noqa: F811
                                                 busybox_oci: tuple[Path, Image],
                                                 delay: float, handler: str) -> None:
    """kill -9 while a pod starts (RunPodSandbox, CreateContainer, StartContainer in
    flight) and while it stops, at a few points: after a restart the calls can be
    retried, the pod removed, and nothing is left (pins, netns, IPs, shims, cgroups, the
    PID namespace holder, records)."""
    import asyncio

    from tests.integration.test_networks import remove_bridge

    d, bridge = _cni_daemon(base, registry, busybox_oci[1])
    cgroup_parent = f"/berth-k9-{os.urandom(4).hex()}"
    try:
        for phase in ("start", "stop"):
            with CRIClient(d.state / "cri.sock") as c:
                c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
                pod = pod_config(base / "logs", f"k9{phase}")
                pod.linux.security_context.namespace_options.network = api.NamespaceMode.POD
                pod.linux.security_context.namespace_options.pid = api.NamespaceMode.POD
                pod.linux.cgroup_parent = cgroup_parent

                async def start(c: CRIClient = c, pod: api.PodSandboxConfig = pod) -> None:
                    rt = c.runtime_stub
                    sid = (await rt.run_pod_sandbox(api.RunPodSandboxRequest(
                        config=pod, runtime_handler=handler))).pod_sandbox_id
                    cid = (await rt.create_container(api.CreateContainerRequest(
                        pod_sandbox_id=sid, sandbox_config=pod,
                        config=container_config("c", "exec sleep 1000")))).container_id
                    await rt.start_container(api.StartContainerRequest(container_id=cid))

                if phase == "stop":
                    c.run(start())
                    running = _leftovers(d, base, cgroup_parent)
                    assert running["holders"] and running["cgroups"], running  # seen
                    sid = c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items[0].id
                    call = c.runtime_stub.stop_pod_sandbox(
                        api.StopPodSandboxRequest(pod_sandbox_id=sid))
                else:
                    call = start()
                task = c.spawn(call)
                # Where berthd dies varies with the delay; no outcome depends on it.
                c.run(asyncio.sleep(delay))
                d.kill()
                c.run(asyncio.gather(task, return_exceptions=True))
            d.start()
            with CRIClient(d.state / "cri.sock") as c:
                found = c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items
                _states_agree(d, c, found)
                for p in found:
                    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=p.id))
                    c.runtime("remove_pod_sandbox",
                              api.RemovePodSandboxRequest(pod_sandbox_id=p.id))
                assert c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items == []
                assert c.runtime("list_containers", api.ListContainersRequest()).containers == []
            empty: dict[str, list[str]] = {
                "mounts": [], "ips": [], "netns": [], "shims": [], "holders": [],
                "cgroups": []}
            deadline = time.monotonic() + HANG_GUARD
            while (left := _leftovers(d, base, cgroup_parent)) != empty \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            assert left == empty, (phase, left)
            assert daemons.ctr_ok(d.address, "containers", "ls", "-q",
                                  namespace="k8s.io").out == ""
            assert not list((d.state / "io.containerd.grpc.v1.cri").glob("*/*"))
    finally:
        d.stop()
        remove_bridge(bridge)
        for p in Path("/sys/fs/cgroup").glob(f"*{cgroup_parent}"):
            p.rmdir()  # the pod's parent is the kubelet's to make and remove


@pytest.mark.parametrize("handler", ["berth", "runc"])
def test_oom_killed_container(pulled: tuple[daemons.Daemon, CRIClient], base: Path,  # noqa: F811
                              handler: str) -> None:
    """A container over its memory limit is ended by the kernel: reason OOMKilled."""
    d, c = pulled
    config = pod_config(base / "logs", "hungry")
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
        config=config, runtime_handler=handler)).pod_sandbox_id
    cid = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=container_config(
            "hungry", "head -c 200m /dev/zero | tail > /dev/null",
            linux=api.LinuxContainerConfig(resources=api.LinuxContainerResources(
                memory_limit_in_bytes=16 << 20))))).container_id
    c.runtime("start_container", api.StartContainerRequest(container_id=cid))

    def status() -> api.ContainerStatus:
        return c.runtime("container_status", api.ContainerStatusRequest(
            container_id=cid)).status
    _wait(lambda: status().state == api.ContainerState.CONTAINER_EXITED, "the OOM kill")
    assert status().reason == "OOMKilled" and status().exit_code != 0, status()
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))


@pytest.mark.parametrize("handler", ["berth", "runc"])
def test_sandbox_mode_pause(base: Path, registry: RegistryServer,  # noqa: F811
                            busybox_oci: tuple[Path, Image], handler: str) -> None:
    """``sandbox_mode = "pause"``: a sandbox container from sandbox_image (pulled when
    missing) holds the pod's namespaces, PID included for a pod that shares it."""
    from tests.cri import cri_config, hosts_dir
    from tests.images import PAUSE, pause_image, push_image

    push_image(registry, "library/busybox", "latest", busybox_oci[1])
    push_image(registry, "library/pause", "bench", pause_image())
    config = cri_config(base / "berth.toml", sandbox_mode="pause", sandbox_image=PAUSE,
                        registry={"config_path": str(hosts_dir(base, "docker.io",
                                                               registry.host))})
    d = daemons.berthd(base / "d", "--config", str(config)).start()
    try:
        with CRIClient(d.state / "cri.sock") as c:
            c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
            pod = pod_config(base / "logs", "paused")
            pod.linux.security_context.namespace_options.pid = api.NamespaceMode.POD
            sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
                config=pod, runtime_handler=handler)).pod_sandbox_id
            ids = []
            for name in ("a", "b"):
                cfg = container_config(name, "exec sleep 1000")
                cfg.linux = api.LinuxContainerConfig(
                    security_context=api.LinuxContainerSecurityContext(
                        namespace_options=api.NamespaceOption(
                            network=api.NamespaceMode.NODE, pid=api.NamespaceMode.POD)))
                cid = c.runtime("create_container", api.CreateContainerRequest(
                    pod_sandbox_id=sid, sandbox_config=pod, config=cfg)).container_id
                c.runtime("start_container", api.StartContainerRequest(container_id=cid))
                ids.append(cid)
            for kind in ("pid", "ipc"):
                seen = {_exec(c, cid, "readlink", f"/proc/self/ns/{kind}").stdout
                        for cid in ids}
                assert len(seen) == 1, (kind, seen)
            # PID 1 of the shared namespace is the sandbox container's sleep.
            assert _exec(c, ids[0], "cat", "/proc/1/cmdline").stdout.startswith(b"sleep\0")
            names = daemons.ctr_ok(d.address, "containers", "ls", "-q",
                                   namespace="k8s.io").out.split()
            assert sorted(names) == sorted([sid, *ids])
            c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
            st = c.runtime("pod_sandbox_status", api.PodSandboxStatusRequest(
                pod_sandbox_id=sid)).status
            assert st.state == api.PodSandboxState.SANDBOX_NOTREADY
            c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
        assert daemons.ctr_ok(d.address, "containers", "ls", "-q", namespace="k8s.io").out == ""
        assert daemons.ctr_ok(d.address, "tasks", "ls", "-q", namespace="k8s.io").out == ""
    finally:
        d.stop()
