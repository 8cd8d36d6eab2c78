"""The systemd cgroup driver on a node without systemd (PID 1 here is not systemd): a
handler with ``SystemdCgroup = true`` is named in a warning at start and its pods are
refused with a clear FailedPrecondition, never run on cgroupfs behind RuntimeConfig's
"systemd" answer; containerd 1.6's top-level ``systemd_cgroup`` is named as unsupported."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from berth.core.api.runtime import v1 as api
from berth.plugins.cri.config import SYSTEMD_RUN, systemd_running
from tests import daemons
from tests.cri import CRIClient, cri_config
from tests.integration.test_cri_images import base  # noqa: F401 - a fixture
from tests.integration.test_cri_pods import pod_config

pytestmark = pytest.mark.root


def test_systemd_cgroup_without_systemd(base: Path) -> None:  # noqa: F811
    assert not systemd_running(), f"this test expects a node without systemd ({SYSTEMD_RUN})"
    (base / "net.d").mkdir()
    config = cri_config(base / "berth.toml", systemd_cgroup=True,
                        cni={"conf_dir": str(base / "net.d")}, containerd={
                            "default_runtime_name": "sd", "runtimes": {
                                "sd": {"runtime_type": "io.containerd.runc.v2",
                                       "options": {"SystemdCgroup": True}},
                                "berth-sd": {"runtime_type": "io.containerd.berth.v1",
                                             "options": {"SystemdCgroup": True}},
                                "fs": {"runtime_type": "io.containerd.berth.v1"}}})
    d = daemons.berthd(base / "d", "--config", str(config)).start()
    try:
        with CRIClient(d.state / "cri.sock") as c:
            # The driver the configuration names, not a fallback's.
            driver = c.runtime("runtime_config", api.RuntimeConfigRequest()).linux.cgroup_driver
            assert driver == api.CgroupDriver.SYSTEMD
            for handler in ("sd", "berth-sd", ""):
                with pytest.raises(GRPCError) as e:
                    c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
                        config=pod_config(base / "logs", f"p{handler}"),
                        runtime_handler=handler))
                assert e.value.status == Status.FAILED_PRECONDITION
                assert "systemd is not running" in str(e.value.message)
                assert "SystemdCgroup" in str(e.value.message)
            assert c.runtime("list_pod_sandbox", api.ListPodSandboxRequest()).items == []
            assert not list((d.state / "io.containerd.grpc.v1.cri").glob("sandboxes/*"))
            # A cgroupfs handler of the same berthd runs pods.
            sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(
                config=pod_config(base / "logs", "fs"), runtime_handler="fs")).pod_sandbox_id
            c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
        logs = d.logs()
        for handler in ("sd", "berth-sd"):
            assert f'"handler": "{handler}"' in logs and "will be refused" in logs
        assert '"keys": ["systemd_cgroup"]' in logs
    finally:
        d.stop()
