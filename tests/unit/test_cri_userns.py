"""Pod user namespaces: CRI userns_options checked and turned into the OCI spec's user
namespace and mappings; the snapshot chowned into the mapped range."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from berth.core import errdefs
from berth.core.api.runtime import v1 as cri
from berth.core.mount import Mount
from berth.core.oci import default_spec as oci
from berth.plugins.cri import spec, userns
from berth.plugins.cri.config import BERTH_RUNTIME, RUNC_RUNTIME, Runtime

POD = cri.NamespaceMode.POD


def _u(mode: cri.NamespaceMode = POD, *maps: tuple[int, int, int]) -> cri.UserNamespace:
    ms = [cri.IdMapping(host_id=h, container_id=c, length=n)
          for c, h, n in maps or ((0, 100000, 65536),)]
    return cri.UserNamespace(mode=mode, uids=ms, gids=list(ms))


def _pod(opts: cri.UserNamespace | None) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="p", uid="u", namespace="n"),
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=cri.NamespaceOption(userns_options=opts))))


def _sc(opts: cri.UserNamespace | None) -> cri.LinuxContainerSecurityContext:
    return cri.LinuxContainerSecurityContext(
        namespace_options=cri.NamespaceOption(userns_options=opts))


def test_mappings_checked() -> None:
    assert userns.mappings(_pod(None), None) is None
    assert userns.mappings(_pod(_u(cri.NamespaceMode.NODE)), None) is None
    want = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert userns.mappings(_pod(_u()), None) == (want, want)
    assert userns.mappings(_pod(_u()), _sc(_u())) == (want, want)
    with pytest.raises(errdefs.InvalidArgument, match="pod has none"):
        userns.mappings(_pod(None), _sc(_u()))
    two = userns.mappings(_pod(_u(POD, (0, 5000, 10), (10, 9000, 5))), None)
    assert two is not None and len(two[0]) == 2
    for bad in (_u(cri.NamespaceMode.CONTAINER), _u(cri.NamespaceMode.TARGET),
                _u(POD, (0, 1, 0)), _u(POD, (0, 2**32 - 1, 2)), _u(POD, (0, 1, 10), (5, 50, 10))):
        with pytest.raises(errdefs.InvalidArgument):
            userns.mappings(_pod(bad), None)
    # userns_options sent empty (mode POD, no mappings), as a Go kubelet would encode it.
    empty = _pod(None)
    empty.linux.security_context.namespace_options = cri.NamespaceOption().parse(
        b"\x2a\x00")
    with pytest.raises(errdefs.InvalidArgument, match="needs uid mappings"):
        userns.mappings(empty, None)
    with pytest.raises(errdefs.InvalidArgument, match="differ"):
        userns.mappings(_pod(_u()), _sc(_u(POD, (0, 200000, 65536))))


def test_runtime_must_be_berths() -> None:
    berth = Runtime("berth", BERTH_RUNTIME)
    assert userns.for_container(_pod(_u()), None, berth) is not None
    for rt in (Runtime("runc", RUNC_RUNTIME), Runtime("b", BERTH_RUNTIME, {"BinaryName": "runc"})):
        assert userns.for_container(_pod(None), None, rt) is None
        with pytest.raises(errdefs.NotImplemented_, match="in-process runtime"):
            userns.for_container(_pod(_u()), None, rt)


def test_into_spec(tmp_path: Path) -> None:
    pod = spec.PodView("sb1", _pod(_u()), str(tmp_path), False, netns="/run/netns/x")
    s = spec.container_spec(
        pod, "c1", cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                                       command=["sh"], linux=cri.LinuxContainerConfig(
                                           security_context=_sc(_u()))),
        {}, "", [], spec.OOMPolicy())
    linux = s["linux"]
    assert {"type": "user", "path": str(tmp_path / "userns")} in linux["namespaces"]
    assert linux["uidMappings"] == linux["gidMappings"] == [
        {"containerID": 0, "hostID": 100000, "size": 65536}]
    sys_mount = next(m for m in s["mounts"] if m["destination"] == "/sys")
    assert sys_mount["type"] == "bind" and "ro" in sys_mount["options"]
    assert not any(m["type"] == "mqueue" for m in s["mounts"])
    plain = oci.default_unix_spec("k8s.io", "c")
    userns.into_spec(plain, None, str(tmp_path))
    assert "uidMappings" not in plain["linux"]
    # A container with network and IPC namespaces of its own keeps sysfs and mqueue.
    own = oci.default_unix_spec("k8s.io", "c")
    userns.into_spec(own, ([{"containerID": 0, "hostID": 1, "size": 1}],) * 2, "/x")
    assert {m["type"] for m in own["mounts"]} >= {"sysfs", "mqueue"}
    shared = oci.default_unix_spec("k8s.io", "c")
    for ns in shared["linux"]["namespaces"]:
        if ns["type"] == "pid":
            ns["path"] = "/proc/1/ns/pid"
    with pytest.raises(errdefs.NotImplemented_, match="PID namespace"):
        userns.into_spec(shared, ([{"containerID": 0, "hostID": 1, "size": 1}],) * 2, "/x")


@pytest.mark.root
def test_remap_rootfs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (chown)")
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    tool = root / "bin" / "tool"
    tool.write_text("x")
    tool.chmod(0o4755)
    os.symlink("/bin/tool", root / "bin" / "link")
    os.lchown(root / "bin" / "link", 7, 7)
    (root / "home").mkdir()
    os.chown(root / "home", 1000, 100)
    os.chown(root / "bin", 70000, 70000)  # outside the mapping: left as is
    maps = ([{"containerID": 0, "hostID": 100000, "size": 65536}],) * 2
    n = userns.remap_rootfs([Mount("bind", str(root), ["rbind", "rw"])], maps)
    assert n == 4  # the root, the tool, the link and home
    assert (os.stat(root).st_uid, os.stat(tool).st_uid) == (100000, 100000)
    assert stat.S_IMODE(os.stat(tool).st_mode) == 0o4755  # set-id bits put back
    assert os.lstat(root / "bin" / "link").st_uid == 100007
    assert (os.stat(root / "home").st_uid, os.stat(root / "home").st_gid) == (101000, 100100)
    assert os.stat(root / "bin").st_uid == 70000


@pytest.mark.root
def test_remap_rootfs_hard_links_once(tmp_path: Path) -> None:
    """Overlapping ranges (host 1000.. for container 0..): a file with two names moves
    once, not twice."""
    if os.geteuid() != 0:
        pytest.fail("needs root (chown)")
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "a").write_text("x")
    os.link(root / "a", root / "b")
    maps = ([{"containerID": 0, "hostID": 1000, "size": 65536}],) * 2
    userns.remap_rootfs([Mount("bind", str(root), ["rbind", "rw"])], maps)
    assert os.stat(root / "a").st_uid == os.stat(root / "b").st_uid == 1000


_ids = st.integers(0, 2**32 - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_ids, _ids, _ids), max_size=5),
       st.sampled_from(list(cri.NamespaceMode)))
def test_mappings_fuzzed(maps: list[tuple[int, int, int]], mode: cri.NamespaceMode) -> None:
    """Any mappings a client sends: accepted within the 32-bit range without overlap,
    otherwise InvalidArgument; nothing else."""
    ms = [cri.IdMapping(host_id=h, container_id=c, length=n) for c, h, n in maps]
    pod = cri.PodSandboxConfig().parse(bytes(_pod(cri.UserNamespace(
        mode=mode, uids=ms, gids=list(ms)))))
    try:
        got = userns.mappings(pod, None)
    except errdefs.InvalidArgument:
        return
    if got is None:
        assert mode == cri.NamespaceMode.NODE or not maps and mode == POD
        return
    for m in got[0]:
        assert m["size"] > 0 and m["hostID"] + m["size"] <= 2**32


@pytest.mark.root
def test_pod_userns_pinned_once(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (mount)")
    maps = ([{"containerID": 0, "hostID": 100000, "size": 65536}],
            [{"containerID": 0, "hostID": 200000, "size": 10}])
    path = userns.pod_userns(tmp_path, maps)
    try:
        assert path == tmp_path / "userns" and userns.nspin.is_pinned(path, "user")
        assert userns.pod_userns(tmp_path, maps) == path  # the same one, not another
        # What it maps, read through a process that joins it.
        out = subprocess.run(["nsenter", f"--user={path}", "cat", "/proc/self/uid_map",
                              "/proc/self/gid_map"], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out == ["0", "100000", "65536", "0", "200000", "10"]
    finally:
        userns.unpin(tmp_path)
    assert not path.exists()
