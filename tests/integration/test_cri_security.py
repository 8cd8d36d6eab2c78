"""CRI security profiles on a real berthd: RuntimeDefault seccomp (containerd's default
profile, chosen by the container's capabilities) seen from inside containers with a
static probe, and the profile berth writes next to the one the real containerd 1.6 CRI
writes into its bundle for the same pod and containers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from berth.core.api.runtime import v1 as api
from tests import daemons
from tests.cri import CRIClient, cri_config, hosts_dir
from tests.integration.test_cri_images import base, mirrored  # noqa: F401 - fixtures
from tests.integration.test_cri_pods import _exec, container_config, pod_config, pulled  # noqa: F401

if TYPE_CHECKING:
    from tests.images import Image, RegistryServer

pytest_plugins = ("tests.images",)
pytestmark = pytest.mark.root

PROBE_C = Path(__file__).with_name("seccomp_probe.c")
P = api.SecurityProfileProfileType
# unshare_user last: it moves the probe into a new user namespace.
CALLS = ("keyctl", "add_key", "process_vm_readv", "kcmp", "clone_newns", "fork", "clone3",
         "personality_query", "personality_addr_no_randomize", "unshare_user")


@pytest.fixture
def probe(base: Path) -> Path:  # noqa: F811 - a fixture
    """A folder with the static probe, bind-mounted read-only at /probe."""
    assert shutil.which("gcc"), "gcc is needed to build the probe (tests/setup-host.sh)"
    d = base / "probe"
    d.mkdir()
    r = subprocess.run(["gcc", "-static", "-O1", "-o", str(d / "probe"), str(PROBE_C)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (d / "hello.txt").write_text("hello from the host\n")
    return d


def _security(profile: api.SecurityProfile | None, add: tuple[str, ...] = (),
              drop: tuple[str, ...] = ()) -> api.LinuxContainerConfig:
    sc = api.LinuxContainerSecurityContext(
        namespace_options=api.NamespaceOption(network=api.NamespaceMode.NODE,
                                              pid=api.NamespaceMode.CONTAINER),
        capabilities=api.Capability(add_capabilities=list(add),
                                    drop_capabilities=list(drop)))
    if profile is not None:
        sc.seccomp = profile
    return api.LinuxContainerConfig(security_context=sc)


def _probe(c: CRIClient, cid: str) -> dict[str, str]:
    r = _exec(c, cid, "/probe/probe", *CALLS)
    assert r.exit_code == 0, r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.decode().splitlines())


@pytest.mark.parametrize("handler", ["berth", "runc"])
def test_runtime_default_seccomp_inside_containers(
        pulled: tuple[daemons.Daemon, CRIClient], base: Path, probe: Path,  # noqa: F811
        handler: str) -> None:
    d, c = pulled
    config = pod_config(base / "logs", "sec")
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
        config=config, runtime_handler=handler)).pod_sandbox_id
    mounts = [api.Mount(container_path="/probe", host_path=str(probe), readonly=True)]
    ids = {}
    for name, linux in (
            ("default", _security(api.SecurityProfile(P.RuntimeDefault))),
            ("admin", _security(api.SecurityProfile(P.RuntimeDefault), add=("SYS_ADMIN",))),
            ("unconfined", _security(api.SecurityProfile(P.Unconfined))),
            ("nobody", _security(api.SecurityProfile(P.RuntimeDefault))),
            ("tracer", _security(api.SecurityProfile(P.RuntimeDefault),
                                 add=("SYS_PTRACE",)))):
        if name == "nobody":  # the runtime changes user with the profile already on
            linux.security_context.run_as_user = api.Int64Value(65534)
        ids[name] = c.runtime("create_container", api.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=container_config(
                name, "exec sleep 1000", mounts=mounts, linux=linux))).container_id
        c.runtime("start_container", api.StartContainerRequest(container_id=ids[name]))

    got = _probe(c, ids["default"])
    assert got == {
        "keyctl": "EPERM", "add_key": "EPERM", "process_vm_readv": "EPERM", "kcmp": "EPERM",
        "clone_newns": "EPERM", "fork": "ok", "clone3": "ENOSYS", "personality_query": "ok",
        "personality_addr_no_randomize": "EPERM", "unshare_user": "EPERM"}, got
    # Everyday busybox work goes on: a shell, files, sockets to 127.0.0.1.
    r = _exec(c, ids["default"], "sh", "-c",
              "ls / >/dev/null && cat /probe/hello.txt && "
              "httpd -p 127.0.0.1:18765 -h /probe && "
              "wget -q -O - http://127.0.0.1:18765/hello.txt; rc=$?; "
              "kill $(pidof httpd); exit $rc")
    assert r.exit_code == 0 and r.stdout == b"hello from the host\n" * 2, r
    r = _exec(c, ids["default"], "sh", "-c", "unshare -U true")
    assert r.exit_code != 0 and b"Operation not permitted" in r.stderr, r
    r = _exec(c, ids["default"], "mount", "-t", "tmpfs", "none", "/tmp")
    assert r.exit_code != 0, r

    # CAP_SYS_ADMIN unlocks mount, unshare and clone with namespace flags, as containerd's.
    r = _exec(c, ids["admin"], "sh", "-c",
              "mount -t tmpfs none /tmp && echo x > /tmp/f && grep ' /tmp tmpfs' "
              "/proc/mounts && umount /tmp")
    assert r.exit_code == 0, r
    got = _probe(c, ids["admin"])
    assert got["clone_newns"] == "ok" and got["clone3"] == "ok", got
    assert got["keyctl"] == "EPERM" and got["kcmp"] == "EPERM", got

    got = _probe(c, ids["tracer"])  # CAP_SYS_PTRACE unlocks the ptrace class only
    assert got["kcmp"] == "ok" and got["process_vm_readv"] == "ok", got
    assert got["keyctl"] == "EPERM" and got["unshare_user"] == "EPERM", got
    r = _exec(c, ids["nobody"], "sh", "-c", "id -u; ls / >/dev/null; unshare -U true")
    assert r.stdout == b"65534\n" and r.exit_code != 0, r
    assert _probe(c, ids["nobody"])["clone3"] == "ENOSYS"

    got = _probe(c, ids["unconfined"])
    assert got["unshare_user"] == "ok" and got["personality_addr_no_randomize"] == "ok", got
    assert got["clone3"] == "ok" and got["process_vm_readv"] == "ok", got

    # No AppArmor on this node: a Localhost profile is refused as containerd 1.6 does.
    linux = _security(None)
    linux.security_context.apparmor = api.SecurityProfile(P.Localhost, "k8s-probe")
    with pytest.raises(GRPCError) as e:
        c.runtime("create_container", api.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=container_config(
                "armored", "true", linux=linux)))
    assert e.value.status == Status.UNKNOWN and "apparmor" in (e.value.message or ""), e.value
    assert len(c.runtime("list_containers", api.ListContainersRequest()).containers) == 5
    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))


# --- berth's profile next to containerd's -------------------------------------------

CAP_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain": ((), ()),
    "admin": (("SYS_ADMIN",), ()),  # as the kubelet spells them
    "many": (("SYS_PTRACE", "SYS_BOOT", "SYS_MODULE", "SYS_TIME", "SYS_NICE", "SYSLOG",
              "BPF", "PERFMON", "DAC_READ_SEARCH", "SYS_RAWIO", "SYS_PACCT",
              "SYS_TTY_CONFIG"), ()),
    "none": ((), ("ALL",)),
    "chroot-only": (("SYS_CHROOT",), ("ALL",)),
}


def _rules(seccomp: dict[str, Any]) -> set[tuple[str, str, int, str]]:
    """A profile as its set of (syscall, action, errno, args): order and grouping aside."""
    out = set()
    for e in seccomp.get("syscalls") or []:
        for n in e["names"]:
            out.add((n, e["action"], e.get("errnoRet") or 0,
                     json.dumps(sorted((a["index"], a["value"], a.get("valueTwo", 0), a["op"])
                                       for a in e.get("args") or []))))
    return out


def _bundle_spec(d: daemons.Daemon, cid: str) -> dict[str, Any]:
    hits = list(d.state.glob(f"**/k8s.io/{cid}/config.json"))
    assert len(hits) == 1, (cid, hits)
    return json.loads(hits[0].read_text())


def _run_pod(c: CRIClient, folder: Path, handler: str) -> dict[str, str]:
    """One pod (as the kubelet asks for it) with a container per capability set."""
    config = pod_config(folder / "logs", "cmp")
    config.hostname = ""  # containerd 1.6 would hand runc a hostname without a UTS ns
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
        config=config, runtime_handler=handler)).pod_sandbox_id
    ids = {}
    for name, (add, drop) in CAP_SETS.items():
        cfg = container_config(name, "exec sleep 1000", linux=_security(
            api.SecurityProfile(P.RuntimeDefault), add, drop))
        ids[name] = c.runtime("create_container", api.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=cfg)).container_id
        c.runtime("start_container", api.StartContainerRequest(container_id=ids[name]))
    ids["_sandbox"] = sid
    return ids


def _remove_pod(c: CRIClient, sid: str) -> None:
    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))


@pytest.fixture
def both(base: Path, registry: RegistryServer, busybox_oci: tuple[Path, Image]  # noqa: F811
         ) -> Iterator[tuple[daemons.Daemon, daemons.Daemon]]:
    """berthd and the real containerd (CRI on), both pulling through the local registry."""
    from benchmarks.bench_cri import containerd_with_cri
    from tests.images import pause_image, push_image

    push_image(registry, "library/busybox", "latest", busybox_oci[1])
    push_image(registry, "library/pause", "bench", pause_image())
    certs = hosts_dir(base, "docker.io", registry.host)
    config = cri_config(base / "berth.toml", registry={"config_path": str(certs)})
    berth = daemons.berthd(base / "b", "--config", str(config)).start()
    try:
        ctrd = containerd_with_cri(base / "c", certs).start()
        try:
            yield berth, ctrd
        finally:
            ctrd.stop()
    finally:
        berth.stop()


def test_runtime_default_is_containerds_profile(
        both: tuple[daemons.Daemon, daemons.Daemon], base: Path) -> None:  # noqa: F811
    berth, ctrd = both
    specs: dict[str, dict[str, dict[str, Any]]] = {}
    for side, d, sock, handler in (("berth", berth, berth.state / "cri.sock", "runc"),
                                   ("containerd", ctrd, ctrd.address, "")):
        with CRIClient(sock) as c:
            c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
            ids = _run_pod(c, base / side, handler)
            try:
                specs[side] = {name: _bundle_spec(d, cid) for name, cid in ids.items()
                               if name != "_sandbox"}
            finally:
                _remove_pod(c, ids["_sandbox"])
    for name in CAP_SETS:
        ours, theirs = specs["berth"][name], specs["containerd"][name]
        # Same capabilities in, so the same profile must come out.
        assert ours["process"]["capabilities"].get("bounding", []) == \
            theirs["process"]["capabilities"].get("bounding", []), name
        a, b = ours["linux"]["seccomp"], theirs["linux"]["seccomp"]
        assert a["defaultAction"] == b["defaultAction"] == "SCMP_ACT_ERRNO"
        assert a["architectures"] == b["architectures"], name
        assert _rules(a) == _rules(b), (name, _rules(a) ^ _rules(b))
    admin = {r[0] for r in _rules(specs["berth"]["admin"]["linux"]["seccomp"])}
    plain = {r[0] for r in _rules(specs["berth"]["plain"]["linux"]["seccomp"])}
    assert {"mount", "unshare", "setns"} <= admin - plain


# --- CDI devices -----------------------------------------------------------------------

CDI_SPEC = """\
cdiVersion: "0.6.0"
kind: example.com/probe
devices:
  - name: null0
    containerEdits:
      env: ["CDI_PROBE=null0"]
      deviceNodes:
        - path: /dev/cdi-null
          hostPath: /dev/null
          permissions: rw
      mounts:
        - hostPath: {share}
          containerPath: /cdi/share
          options: [ro, rbind]
      hooks:
        - hookName: createRuntime
          path: /bin/sh
          args: [sh, -c, "cat > {share}/hook-state.json"]
"""


@pytest.fixture
def cdi_daemon(base: Path, registry: RegistryServer,  # noqa: F811
               busybox_oci: tuple[Path, Image]) -> Iterator[tuple[daemons.Daemon, Path]]:
    """berthd with CDI on, its spec folder (YAML) under the test's folder."""
    from tests.images import push_image

    push_image(registry, "library/busybox", "latest", busybox_oci[1])
    share = base / "share"
    share.mkdir()
    (share / "note.txt").write_text("shared by a CDI mount\n")
    specs = base / "cdi"
    specs.mkdir()
    (specs / "probe.yaml").write_text(CDI_SPEC.format(share=share))
    config = cri_config(base / "berth.toml", enable_cdi=True,
                        cdi_spec_dirs=[str(base / "missing"), str(specs)],
                        registry={"config_path": str(hosts_dir(base, "docker.io",
                                                               registry.host))})
    d = daemons.berthd(base / "d", "--config", str(config)).start()
    try:
        yield d, specs
    finally:
        d.stop()


@pytest.mark.parametrize("handler", ["berth", "runc"])
def test_cdi_devices_inside_the_container(cdi_daemon: tuple[daemons.Daemon, Path],
                                          base: Path, handler: str) -> None:  # noqa: F811
    d, _ = cdi_daemon
    with CRIClient(d.state / "cri.sock") as c:
        c.image("pull_image", api.PullImageRequest(image=api.ImageSpec(image="busybox")))
        config = pod_config(base / "logs", "cdi")
        sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
            config=config, runtime_handler=handler)).pod_sandbox_id
        cfg = container_config("dev", "exec sleep 1000",
                               cdi_devices=[api.CdiDevice("example.com/probe=null0")])
        cid = c.runtime("create_container", api.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=cfg)).container_id
        c.runtime("start_container", api.StartContainerRequest(container_id=cid))
        r = _exec(c, cid, "sh", "-c",
                  'echo "$CDI_PROBE"; cat /cdi/share/note.txt; stat -c "%F %t:%T" '
                  "/dev/cdi-null; echo data > /dev/cdi-null && echo wrote; "
                  "touch /cdi/share/x 2>/dev/null || echo read-only")
        assert r.exit_code == 0, r
        assert r.stdout.decode().splitlines() == [
            "null0", "shared by a CDI mount", "character special file 1:3", "wrote",
            "read-only"], r
        # The spec's createRuntime hook ran, on the host, with the container's state.
        state = json.loads((base / "share" / "hook-state.json").read_text())
        assert state["id"] == cid, state

        # By annotation too (cdi.k8s.io/...); an unknown device: a clear error, nothing made.
        cfg = container_config("ann", "exec sleep 1000",
                               annotations={"cdi.k8s.io/probe": "example.com/probe=null0"})
        ann = c.runtime("create_container", api.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=cfg)).container_id
        for name, kw in (("bad", {"cdi_devices": [api.CdiDevice("example.com/probe=nope")]}),
                         ("bad2", {"annotations": {"cdi.k8s.io/x": "not-a-name"}})):
            with pytest.raises(GRPCError) as e:
                c.runtime("create_container", api.CreateContainerRequest(
                    pod_sandbox_id=sid, sandbox_config=config,
                    config=container_config(name, "true", **kw)))
            assert e.value.status == Status.INVALID_ARGUMENT, e.value
            assert "CDI" in (e.value.message or ""), e.value
        listed = c.runtime("list_containers", api.ListContainersRequest()).containers
        assert {x.id for x in listed} == {cid, ann}
        names = daemons.ctr_ok(d.address, "snapshots", "ls", namespace="k8s.io").out
        # A header, the image's layer and the two containers' snapshots.
        assert len(names.splitlines()) == 4, names
        c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
        c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))


# --- user namespaces -------------------------------------------------------------------

HOST_BASE = 300000  # host ids 300000..365535 become the pod's 0..65535


def _userns(mode: api.NamespaceMode = api.NamespaceMode.POD, length: int = 65536
            ) -> api.UserNamespace:
    maps = [api.IdMapping(host_id=HOST_BASE, container_id=0, length=length)]
    return api.UserNamespace(mode=mode, uids=maps, gids=list(maps))


@pytest.mark.parametrize("handler", ["berth", "runc"])
def test_pod_user_namespace(pulled: tuple[daemons.Daemon, CRIClient], base: Path,  # noqa: F811
                            handler: str) -> None:
    d, c = pulled
    # The mapped root walks to its bundle as any other user (berthd's state folders are
    # 0711, the bundle's group is the mapped root's); the test's own folder is 0700.
    base.chmod(0o711)
    # Status tells the kubelet which handlers take user namespaces.
    st = c.runtime("status", api.StatusRequest())
    assert {h.name: h.features.user_namespaces for h in st.runtime_handlers} == {
        "": False, "runc": False, "berth": True}
    config = pod_config(base / "logs", "userns")
    config.linux.security_context.namespace_options.userns_options = _userns()
    if handler == "runc":
        # runc 1.1's exec joins the user namespace first, then fails on the pod's others:
        # refused before anything is made.
        with pytest.raises(GRPCError) as e:
            c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
                config=config, runtime_handler=handler))
        assert e.value.status == Status.UNIMPLEMENTED, e.value
        assert "in-process runtime" in (e.value.message or ""), e.value
        assert c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items == []
        # A pod without one, whose container asks for one, is refused the same way.
        plain = pod_config(base / "logs", "plain")
        sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
            config=plain, runtime_handler=handler)).pod_sandbox_id
        cfg = container_config("mapped", "true", linux=api.LinuxContainerConfig(
            security_context=api.LinuxContainerSecurityContext(
                namespace_options=api.NamespaceOption(userns_options=_userns()))))
        with pytest.raises(GRPCError) as e:
            c.runtime("create_container", api.CreateContainerRequest(
                pod_sandbox_id=sid, sandbox_config=plain, config=cfg))
        assert e.value.status == Status.INVALID_ARGUMENT, e.value
        assert c.runtime("list_containers", api.ListContainersRequest()).containers == []
        c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
        return
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
        config=config, runtime_handler=handler)).pod_sandbox_id

    def make(name: str, opts: api.UserNamespace, script: str = "exec sleep 1000") -> str:
        cfg = container_config(name, script, linux=api.LinuxContainerConfig(
            security_context=api.LinuxContainerSecurityContext(
                namespace_options=api.NamespaceOption(
                    network=api.NamespaceMode.NODE, pid=api.NamespaceMode.CONTAINER,
                    userns_options=opts))))
        return c.runtime("create_container", api.CreateContainerRequest(
            pod_sandbox_id=sid, sandbox_config=config, config=cfg)).container_id

    cid = make("mapped", _userns())
    c.runtime("start_container", api.StartContainerRequest(container_id=cid))
    r = _exec(c, cid, "sh", "-c",
              "cat /proc/self/uid_map /proc/self/gid_map; id -u; stat -c '%u:%g' / "
              "/bin/busybox; echo hi > /root/note && cat /root/note; ls /proc/1 >/dev/null")
    assert r.exit_code == 0, r
    lines = [" ".join(x.split()) for x in r.stdout.decode().splitlines()]
    assert lines == [f"0 {HOST_BASE} 65536", f"0 {HOST_BASE} 65536", "0", "0:0", "0:0",
                     "hi"], lines
    # One user namespace for the pod: a second container is in the same one.
    other = make("second", _userns())
    c.runtime("start_container", api.StartContainerRequest(container_id=other))
    seen = {_exec(c, x, "readlink", "/proc/self/ns/user").stdout for x in (cid, other)}
    assert len(seen) == 1 and seen != {os.readlink("/proc/self/ns/user").encode() + b"\n"}
    # Seen from the host, the container's root is the mapped id.
    st = c.runtime("container_status", api.ContainerStatusRequest(
        container_id=cid, verbose=True))
    pid = json.loads(st.info["info"])["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"Uid:\t{HOST_BASE}\t" in status, status

    # What a kubelet never sends: a clear error, nothing made.
    for name, opts in (("container-mode", _userns(api.NamespaceMode.CONTAINER)),
                       ("empty", _userns(length=0)),
                       ("differs", api.UserNamespace(mode=api.NamespaceMode.POD, uids=[
                           api.IdMapping(host_id=1, container_id=0, length=1)], gids=[
                           api.IdMapping(host_id=1, container_id=0, length=1)]))):
        with pytest.raises(GRPCError) as e:
            make(name, opts)
        assert e.value.status == Status.INVALID_ARGUMENT, (name, e.value)
    listed = c.runtime("list_containers", api.ListContainersRequest()).containers
    assert {x.id for x in listed} == {cid, other}
    c.runtime("stop_pod_sandbox", api.StopPodSandboxRequest(pod_sandbox_id=sid))
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert sid not in Path("/proc/self/mountinfo").read_text()  # the pin is gone
