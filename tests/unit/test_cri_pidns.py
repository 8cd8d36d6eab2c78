"""A pod's PID namespace in container specs and sandbox records, and the systemd
cgroup driver check (pure parts; the holder process itself: tests/integration/
test_cri_namespaces.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.core.api.runtime import v1 as cri
from berth.core.mount import Mount
from berth.plugins.cri import config as cri_config, pidns, records, spec


def _sandbox(tmp: Path, pid: cri.NamespaceMode | None, holder: int = 0) -> records.Sandbox:
    opts = cri.NamespaceOption(pid=pid) if pid is not None else None
    cfg = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="p", uid="u", namespace="n"),
        linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=opts)))
    return records.Sandbox("sb1", cfg, "", "io.containerd.berth.v1", 1, folder=str(tmp),
                           pid_holder=holder)


def _pid_entries(sb: records.Sandbox, mode: cri.NamespaceMode, tmp: Path,
                 target: str = "") -> list[dict]:
    layer = tmp / "layer"
    (layer / "etc").mkdir(parents=True, exist_ok=True)
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="i"),
        command=["sh"], linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(
                namespace_options=cri.NamespaceOption(pid=mode))))
    s = spec.container_spec(sb.view, "c1", config, {"config": {}}, "",
                            [Mount("bind", str(layer), ["rbind"])], spec.OOMPolicy(), target)
    return [n for n in s["linux"]["namespaces"] if n["type"] == "pid"]


def test_containers_join_the_pinned_pid_namespace(tmp_path: Path) -> None:
    shared = _sandbox(tmp_path, cri.NamespaceMode.POD, holder=4242)
    assert shared.shares_pid
    pin = str(tmp_path / pidns.PIN)
    assert _pid_entries(shared, cri.NamespaceMode.POD, tmp_path) == [
        {"type": "pid", "path": pin}]
    # Never /proc/<holder>/ns/pid: a reused pid would name another namespace.
    assert "4242" not in pin
    assert _pid_entries(shared, cri.NamespaceMode.CONTAINER, tmp_path) == [{"type": "pid"}]
    assert _pid_entries(shared, cri.NamespaceMode.NODE, tmp_path) == []
    # A pod without a holder (pid = CONTAINER): a container of its own namespace.
    apart = _sandbox(tmp_path, cri.NamespaceMode.CONTAINER)
    assert not apart.shares_pid
    assert _pid_entries(apart, cri.NamespaceMode.POD, tmp_path) == [{"type": "pid"}]
    # POD is the enum's zero: a pod that says nothing shares, as with containerd.
    assert _sandbox(tmp_path, None).shares_pid
    assert not _sandbox(tmp_path, cri.NamespaceMode.NODE).shares_pid


def test_target_mode_needs_the_pinned_target(tmp_path: Path) -> None:
    from berth.core import errdefs

    sb = _sandbox(tmp_path, cri.NamespaceMode.CONTAINER)
    assert _pid_entries(sb, cri.NamespaceMode.TARGET, tmp_path, "/pins/t") == [
        {"type": "pid", "path": "/pins/t"}]
    with pytest.raises(errdefs.InvalidArgument):
        _pid_entries(sb, cri.NamespaceMode.TARGET, tmp_path)


def test_the_holder_is_recorded(tmp_path: Path) -> None:
    sb = _sandbox(tmp_path, cri.NamespaceMode.POD, holder=77)
    back = records.Sandbox.from_doc(sb.id, sb.to_doc())
    assert back.pid_holder == 77 and back.view.pidns == str(tmp_path / pidns.PIN)
    old = sb.to_doc()
    del old["pid_holder"]  # a record written before holders existed
    assert records.Sandbox.from_doc(sb.id, old).pid_holder == 0


def test_holder_folder_reads_only_holders() -> None:
    import os

    assert pidns.holder_folder(os.getpid()) is None
    assert pidns.holder_folder(1 << 30) is None  # no such process


def test_systemd_cgroup_driver_needs_systemd(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    rt = cri_config.Runtime("sd", cri_config.RUNC_RUNTIME, {"SystemdCgroup": True})
    monkeypatch.setattr(cri_config, "SYSTEMD_RUN", str(tmp_path / "absent"))
    problem = rt.cgroup_driver_problem()
    assert "'sd'" in problem and "SystemdCgroup" in problem and "not running" in problem
    assert cri_config.Runtime("fs", cri_config.RUNC_RUNTIME).cgroup_driver_problem() == ""
    monkeypatch.setattr(cri_config, "SYSTEMD_RUN", str(tmp_path))
    assert rt.cgroup_driver_problem() == ""
