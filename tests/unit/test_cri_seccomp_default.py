"""RuntimeDefault as containerd builds it: chosen by the bounding set, per architecture,
and loadable as it is by the seccomp compiler berth's in-process runtime uses
(libseccomp, the library runc and crun use too)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from berth.core import errdefs
from berth.core.api.runtime import v1 as cri
from berth.core.oci import default_spec as oci
from berth.plugins.cri import apparmor, seccomp_default as sd, spec
from berth.plugins.cri.config import parse
from berth.plugins.runtimes.inprocess import seccomp


def _allowed(profile: dict) -> set[str]:
    return {n for e in profile["syscalls"] if e["action"] == sd.ALLOW and not e.get("args")
            for n in e["names"]}


def test_profile_by_capability() -> None:
    caps = oci.default_unix_spec("k8s.io", "c")["process"]["capabilities"]["bounding"]
    plain = sd.profile(caps, arch="amd64", release="6.1.0")
    assert plain["defaultAction"] == "SCMP_ACT_ERRNO" and "defaultErrnoRet" not in plain
    assert plain["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    names = _allowed(plain)
    assert {"read", "execve", "arch_prctl", "ptrace", "chroot"} <= names  # chroot: default cap
    assert not {"mount", "unshare", "setns", "keyctl", "add_key", "bpf", "reboot",
                "init_module", "kcmp", "process_vm_readv", "clone", "clone3"} & names
    clone = [e for e in plain["syscalls"] if e["names"] == ["clone"]]
    assert clone[0]["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0,
                                 "op": "SCMP_CMP_MASKED_EQ"}]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO",
            "errnoRet": errno.ENOSYS} in plain["syscalls"]
    personas = {e["args"][0]["value"] for e in plain["syscalls"] if e["names"] == ["personality"]}
    assert personas == {0, 8, 0x20000, 0x20008, 0xFFFFFFFF}

    admin = sd.profile([*caps, "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"], arch="amd64")
    assert {"mount", "unshare", "setns", "clone", "clone3", "kcmp",
            "process_vm_readv"} <= _allowed(admin)
    assert not any(e["action"] == sd.ERRNO for e in admin["syscalls"])
    none = sd.profile([], arch="amd64")
    assert "chroot" not in _allowed(none) and "read" in _allowed(none)


def test_arches_and_kernels() -> None:
    assert sd.profile([], arch="s390x")["syscalls"][-2]["args"][0]["index"] == 1
    assert sd.profile([], arch="arm64")["architectures"] == ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]
    assert "cacheflush" in _allowed(sd.profile([], arch="arm64"))
    assert sd.profile([], arch="ppc64le")["architectures"] == []
    assert "ptrace" not in _allowed(sd.profile([], arch="amd64", release="4.4.0-foo"))
    assert sd.kernel_at_least(4, 8, "6.18.44-fc") and not sd.kernel_at_least(4, 8, "x")
    assert sd.goarch("x86_64") == "amd64" and sd.goarch("aarch64") == "arm64"


def test_profile_compiles_and_spec_hook() -> None:
    bpf, flags = seccomp.build(sd.profile(["CAP_SYS_ADMIN"]))
    assert flags == 0 and len(bpf) % 8 == 0 and bpf
    bpf2, _ = seccomp.build(spec.default_seccomp())
    assert bpf2 != bpf
    # Compiled once per profile in a runtime process (each container, each exec asks).
    assert seccomp.build(sd.profile(["CAP_SYS_ADMIN"]))[0] is bpf


def test_security_profile_choices() -> None:
    P = cri.SecurityProfileProfileType
    ctx = cri.LinuxContainerSecurityContext
    with pytest.raises(errdefs.InvalidArgument, match="localhost_ref"):
        spec.seccomp_for(ctx(seccomp=cri.SecurityProfile(P.RuntimeDefault, "/x.json")))
    with pytest.deprecated_call():
        legacy = ctx(seccomp_profile_path="runtime/default")
    assert spec.seccomp_for(legacy, ["CAP_SYS_ADMIN"]) == sd.profile(["CAP_SYS_ADMIN"])
    # The kubelet's empty SecurityProfile (on the wire, all defaults) is RuntimeDefault.
    sent = ctx().parse(b"\x7a\x00")
    assert spec.seccomp_for(sent, [])["defaultAction"] == "SCMP_ACT_ERRNO"
    # A pause sandbox gets its pod's profile, for its own capabilities.
    pod = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="p", uid="u", namespace="n"),
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            seccomp=cri.SecurityProfile(P.RuntimeDefault))))
    pod = cri.PodSandboxConfig().parse(bytes(pod))  # as received
    infra = spec.infra_spec(spec.PodView("sb", pod, "/nonexistent", True),
                            {"config": {"Cmd": ["/pause"]}}, "", [], spec.OOMPolicy())
    caps = infra["process"]["capabilities"]["bounding"]
    assert infra["linux"]["seccomp"] == sd.profile(caps)


def test_apparmor_on_a_node_without_it() -> None:
    P = cri.SecurityProfileProfileType
    ctx = cri.LinuxContainerSecurityContext
    for ok in (ctx(), ctx(apparmor=cri.SecurityProfile(P.Unconfined)),
               ctx().parse(bytes(ctx(apparmor=cri.SecurityProfile(P.RuntimeDefault))))):
        apparmor.check(ok)
    with pytest.raises(errdefs.Unknown, match="apparmor is not supported"):
        apparmor.check(ctx(apparmor=cri.SecurityProfile(P.Localhost, "k8s-nginx")))
    with pytest.deprecated_call():
        legacy = ctx(apparmor_profile="localhost/k8s-nginx")
    with pytest.raises(errdefs.Unknown):
        apparmor.check(legacy)


def test_unset_seccomp_profile(tmp_path: Path) -> None:
    """containerd's ``unset_seccomp_profile``: the profile of a container naming none."""
    assert parse({}, state=tmp_path).unset_seccomp_profile == ""
    cfg = parse({"unset_seccomp_profile": "runtime/default"}, state=tmp_path)
    assert "unset_seccomp_profile" not in cfg.unsupported
    ctx = cri.LinuxContainerSecurityContext
    assert spec.seccomp_for(ctx(), [], cfg.unset_seccomp_profile) == sd.profile([])
    assert spec.seccomp_for(ctx(), [], "") is None
    named = ctx().parse(bytes(ctx(seccomp=cri.SecurityProfile(
        cri.SecurityProfileProfileType.Unconfined))))
    assert spec.seccomp_for(named, [], "runtime/default") is None  # a choice made stays
    for bad in ("weird", "localhost/relative.json"):
        with pytest.raises(errdefs.InvalidArgument, match="unset_seccomp_profile"):
            parse({"unset_seccomp_profile": bad}, state=tmp_path)
