"""The CRI plugin's pure parts: container specs, OOM clamping, log lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from berth.core import errdefs
from berth.core.api.runtime import v1 as cri
from berth.core.mount import Mount
from berth.plugins.cri import logs, spec

IMAGE = {"config": {"Entrypoint": ["/bin/entry"], "Cmd": ["default"], "User": "nobody",
                    "Env": ["PATH=/bin", "A=image"], "WorkingDir": "/work"}}


def _pod(tmp: Path, *, host: bool = False, privileged: bool = False) -> spec.PodView:
    cfg = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="p", uid="u", namespace="n"),
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/podu",
            security_context=cri.LinuxSandboxSecurityContext(privileged=privileged)))
    return spec.PodView("sb1", cfg, str(tmp), host)


def _rootfs(tmp: Path) -> list[Mount]:
    layer = tmp / "layer"
    (layer / "etc").mkdir(parents=True, exist_ok=True)
    (layer / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nnobody:x:65534:65533::/:\n")
    (layer / "etc" / "group").write_text("root:x:0:\nnogroup:x:65533:\nextra:x:7:nobody\n")
    return [Mount("overlay", "overlay", [f"lowerdir={layer}", f"upperdir={tmp / 'up'}"])]


def _build(tmp: Path, config: cri.ContainerConfig, **kw: object) -> dict:
    return spec.container_spec(kw.pop("pod", None) or _pod(tmp), "c1", config, IMAGE,
                               "nobody", _rootfs(tmp), spec.OOMPolicy(current=-500))


def test_command_env_user_and_annotations(tmp_path: Path) -> None:
    s = _build(tmp_path, cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="img"),
        args=["x"], envs=[cri.KeyValue("A", "mine")]))
    p = s["process"]
    assert p["args"] == ["/bin/entry", "x"]  # CRI args replace the image's Cmd
    assert p["env"] == ["PATH=/bin", "A=mine"] and p["cwd"] == "/work"
    assert p["user"] == {"uid": 65534, "gid": 65533, "additionalGids": [65533, 7]}
    assert s["annotations"]["io.kubernetes.cri.sandbox-id"] == "sb1"
    assert s["annotations"]["io.kubernetes.cri.container-type"] == "container"
    assert s["linux"]["cgroupsPath"] == "/kubepods/podu/c1"
    assert {"type": "ipc", "path": str(tmp_path / "ipcns")} in s["linux"]["namespaces"]
    assert p["oomScoreAdj"] == 0
    s = _build(tmp_path, cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="img"),
        command=["/bin/sh"], linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(oom_score_adj=-999, cpu_shares=2,
                                                  memory_limit_in_bytes=1 << 20),
            security_context=cri.LinuxContainerSecurityContext(
                run_as_user=cri.Int64Value(0), readonly_rootfs=True,
                capabilities=cri.Capability(add_capabilities=["NET_ADMIN"],
                                            drop_capabilities=["CAP_CHOWN"])))))
    assert s["process"]["args"] == ["/bin/sh"] and s["process"]["user"]["uid"] == 0
    # Below berthd's own score: clamped to it (no CAP_SYS_RESOURCE to go lower).
    assert s["process"]["oomScoreAdj"] == -500 and s["root"]["readonly"] is True
    assert s["linux"]["resources"]["memory"] == {"limit": 1 << 20}
    caps = s["process"]["capabilities"]["bounding"]
    assert "CAP_NET_ADMIN" in caps and "CAP_CHOWN" not in caps


def test_host_network_and_bad_specs(tmp_path: Path) -> None:
    s = _build(tmp_path, cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                                             image=cri.ImageSpec(image="i")),
               pod=_pod(tmp_path, host=True))
    kinds = [n["type"] for n in s["linux"]["namespaces"]]
    assert "network" not in kinds and "uts" not in kinds
    bad = [
        cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                            linux=cri.LinuxContainerConfig(
                                security_context=cri.LinuxContainerSecurityContext(
                                    privileged=True))),
        cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                            mounts=[cri.Mount(container_path="/x", host_path="/nope/x")]),
        cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                            mounts=[cri.Mount(container_path="x", host_path="/")]),
        cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"),
                            linux=cri.LinuxContainerConfig(
                                security_context=cri.LinuxContainerSecurityContext(
                                    run_as_group=cri.Int64Value(5)))),
    ]
    for config in bad:
        config.image = cri.ImageSpec(image="i")
        with pytest.raises(errdefs.InvalidArgument):
            _build(tmp_path, config)
    for path in ("../x", "/abs", "a/../../b", ""):
        with pytest.raises(errdefs.InvalidArgument):
            spec.check_relative(path, "log path")


def test_oom_clamp() -> None:
    assert spec.clamp_oom_score_adj(-998, 0, restrict=False, privileged=False) == 0
    assert spec.clamp_oom_score_adj(-998, 0, restrict=False, privileged=True) == -998
    assert spec.clamp_oom_score_adj(-998, -10, restrict=True, privileged=True) == -10
    assert spec.clamp_oom_score_adj(5000, 0, restrict=True, privileged=False) == 1000


def test_log_lines() -> None:
    assert logs.timestamp(1_700_000_000_123_400_000) == "2023-11-14T22:13:20.1234Z"
    assert logs.timestamp(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    sp = logs.LineSplitter(4)
    assert list(sp.feed(b"ab\ncdefgh")) == [("F", b"ab"), ("P", b"cdef")]
    assert list(sp.feed(b"i\n")) == [("F", b"ghi")]
    assert list(sp.feed(b"tail")) == []
    assert list(sp.close()) == [("F", b"tail")]
    assert logs.format_line(0, "stderr", "F", b"x") == b"1970-01-01T00:00:00Z stderr F x\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=12), st.integers(0, 9))
def test_log_splitter_keeps_every_byte(chunks: list[bytes], limit: int) -> None:
    sp = logs.LineSplitter(limit)
    out = [x for c in chunks for x in sp.feed(c)] + list(sp.close())
    rebuilt = b"".join(line + (b"\n" if tag == "F" else b"") for tag, line in out)
    data = b"".join(chunks)
    assert rebuilt == data + (b"\n" if data and not data.endswith(b"\n") else b"")
    assert all(limit <= 0 or len(line) <= limit for _, line in out)
    assert all(re.fullmatch(rb"[^\n]*", line) for _, line in out)


def test_seccomp_devices_sysctls(tmp_path: Path) -> None:
    P = cri.SecurityProfileProfileType
    sc = cri.LinuxContainerSecurityContext(seccomp=cri.SecurityProfile(P.RuntimeDefault))
    prof = spec.seccomp_for(sc)
    assert prof is not None and prof["defaultAction"] == "SCMP_ACT_ERRNO"
    assert "read" in prof["syscalls"][0]["names"]
    assert "mount" not in {n for e in prof["syscalls"] for n in e["names"]}
    assert spec.seccomp_for(cri.LinuxContainerSecurityContext()) is None
    assert spec.seccomp_for(cri.LinuxContainerSecurityContext(
        seccomp=cri.SecurityProfile(P.Unconfined))) is None
    good = tmp_path / "good.json"
    good.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}')
    assert spec.seccomp_for(cri.LinuxContainerSecurityContext(seccomp=cri.SecurityProfile(
        P.Localhost, str(good))))["defaultAction"] == "SCMP_ACT_ERRNO"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for ref in (str(bad), str(tmp_path / "missing.json"), "relative.json", str(tmp_path)):
        with pytest.raises(errdefs.InvalidArgument):
            spec.seccomp_for(cri.LinuxContainerSecurityContext(
                seccomp=cri.SecurityProfile(P.Localhost, ref)))
    with pytest.deprecated_call():  # the field is deprecated; old kubelets still send it
        legacy = cri.LinuxContainerSecurityContext(seccomp_profile_path="weird")
    with pytest.raises(errdefs.InvalidArgument):
        spec.seccomp_for(legacy)
    entry, rule = spec.device_entry(cri.Device("/dev/mynull", "/dev/null", "rw"))
    assert (entry["type"], entry["major"], entry["minor"]) == ("c", 1, 3)
    assert rule == {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"}
    for d in (cri.Device("/x", str(good), "rw"), cri.Device("/x", "/dev/null", "rwx"),
              cri.Device("x", "/dev/null", "r")):
        with pytest.raises(errdefs.InvalidArgument):
            spec.device_entry(d)
    pod = _pod(tmp_path)
    pod.config.linux.sysctls = {"kernel.shm_rmid_forced": "1"}
    s = spec.container_spec(pod, "c1", cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="i"),
        devices=[cri.Device("/dev/mynull", "/dev/null", "rw")]),
        IMAGE, "", _rootfs(tmp_path), spec.OOMPolicy())
    assert s["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}
    assert s["linux"]["devices"][0]["path"] == "/dev/mynull"
    assert spec.linux_resources(cri.LinuxContainerResources(
        cpu_quota=5000, memory_limit_in_bytes=1 << 26)) == {
        "cpu": {"quota": 5000}, "memory": {"limit": 1 << 26}}


def test_resources_as_the_runtime_spec_has_them() -> None:
    """CPU, memory, hugepages and unified limits land in linux.resources under the OCI
    runtime spec's names; unset ones stay out (this VM has no hugetlb controller, so
    hugepages are checked here, in the spec, and not in a running container)."""
    res = cri.LinuxContainerResources(
        cpu_shares=512, cpu_quota=50000, cpu_period=100000, cpuset_cpus="0",
        memory_limit_in_bytes=64 << 20, memory_swap_limit_in_bytes=128 << 20,
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=4 << 21)],
        unified={"memory.high": "60000000"})
    assert spec.linux_resources(res) == {
        "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"},
        "memory": {"limit": 64 << 20, "swap": 128 << 20},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 21}],
        "unified": {"memory.high": "60000000"},
    }
    assert spec.linux_resources(cri.LinuxContainerResources()) == {}
