"""CRI RuntimeService: the runtime's identity and state (Version, Status, RuntimeConfig,
UpdateRuntimeConfig); pods and containers build on it in :mod:`berth.plugins.cri.pods`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from berth.core import __version__, log
from berth.core.api.runtime import v1 as cri
from berth.core.grpc.context import CallContext
from berth.plugins.cri import userns
from berth.plugins.cri.config import CRIConfig

RUNTIME_NAME = "berth"
API_VERSION = "v1"
# The kubelet's version string for CRI v1 (what containerd answers too).
KUBE_API_VERSION = "0.1.0"
RUNTIME_READY = "RuntimeReady"
NETWORK_READY = "NetworkReady"
NETWORK_NOT_READY_REASON = "NetworkPluginNotReady"
CNI_EXTENSIONS = (".conf", ".conflist", ".json")

_log = log.get("cri")


def cni_problem(conf_dir: str, bin_dir: str) -> str:
    """Why pod networking cannot work yet ("" when a CNI config and plugins are there)."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(CNI_EXTENSIONS))
    except OSError as e:
        return f"cni config load failed: {conf_dir}: {e.strerror}"
    if not names:
        return f"cni plugin not initialized: no network config found in {conf_dir}"
    for name in names:
        try:
            doc = json.loads(Path(conf_dir, name).read_bytes()[: 1 << 20])
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and (doc.get("type") or doc.get("plugins")):
            break
    else:
        return f"cni plugin not initialized: no valid network config in {conf_dir}"
    if not os.path.isdir(bin_dir):
        return f"cni plugin not initialized: plugin directory {bin_dir} does not exist"
    return ""


class RuntimeBase:
    """Version, Status and runtime configuration; subclassed by the pod service."""

    base = cri.RuntimeServiceBase

    def __init__(self, config: CRIConfig) -> None:
        self.config = config
        self.pod_cidr = ""

    def version(self, ctx: CallContext, req: cri.VersionRequest) -> cri.VersionResponse:
        return cri.VersionResponse(version=KUBE_API_VERSION, runtime_name=RUNTIME_NAME,
                                   runtime_version=__version__,
                                   runtime_api_version=API_VERSION)

    def status(self, ctx: CallContext, req: cri.StatusRequest) -> cri.StatusResponse:
        problem = self.network_problem()
        conditions = [
            cri.RuntimeCondition(type=RUNTIME_READY, status=True),
            cri.RuntimeCondition(
                type=NETWORK_READY, status=not problem,
                reason=NETWORK_NOT_READY_REASON if problem else "",
                message=f"Network plugin returns error: {problem}" if problem else ""),
        ]
        handlers = [cri.RuntimeHandler(name=name, features=cri.RuntimeHandlerFeatures(
                        user_namespaces=userns.supported(self.config.runtime(name))))
                    for name in ["", *sorted(self.config.runtimes)]]
        out = cri.StatusResponse(status=cri.RuntimeStatus(conditions=conditions),
                                 runtime_handlers=handlers, features=cri.RuntimeFeatures())
        if req.verbose:
            out.info = {
                "config": json.dumps(self._config_view()),
                "lastCNILoadStatus": problem or "OK",
                "podCIDR": json.dumps(self.pod_cidr),
            }
        return out

    def network_problem(self) -> str:
        """Why pods cannot get a network ("" when they can)."""
        return cni_problem(self.config.cni_conf_dir, self.config.cni_bin_dir)

    def _config_view(self) -> dict[str, Any]:
        view = asdict(self.config)
        view["address"] = str(self.config.address)
        return view

    def runtime_config(self, ctx: CallContext, req: cri.RuntimeConfigRequest
                       ) -> cri.RuntimeConfigResponse:
        default = self.config.runtimes[self.config.default_runtime_name]
        driver = cri.CgroupDriver.SYSTEMD if default.systemd_cgroup else cri.CgroupDriver.CGROUPFS
        # CgroupDriver(member): betterproto's enum members look like plain ints to mypy
        # (betterproto#616); the constructor gives back the same member, typed.
        return cri.RuntimeConfigResponse(
            linux=cri.LinuxRuntimeConfiguration(cgroup_driver=cri.CgroupDriver(driver)))

    def update_runtime_config(self, ctx: CallContext, req: cri.UpdateRuntimeConfigRequest
                              ) -> cri.UpdateRuntimeConfigResponse:
        cidr = ""
        if req.runtime_config and req.runtime_config.network_config:
            cidr = req.runtime_config.network_config.pod_cidr
        if cidr and cidr != self.pod_cidr:
            _log.info("pod CIDR updated", namespace="k8s.io", pod_cidr=cidr)
            self.pod_cidr = cidr
        return cri.UpdateRuntimeConfigResponse()
