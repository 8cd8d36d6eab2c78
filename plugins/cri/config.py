"""The CRI plugin's configuration: containerd 1.6's ``[plugins."io.containerd.grpc.v1.cri"]``
section, read as it is, plus a few berth keys in the same section.

What berth does not support is collected by name (:attr:`CRIConfig.unsupported`), with
the keys whose value asks for something berth would not do (anything but containerd's
default) in :attr:`CRIConfig.changed`, so the plugin can say so at start instead of
ignoring them silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from berth.core import errdefs

if TYPE_CHECKING:
    # The registry client (httpx, ~35 ms of imports) loads when a pull needs it.
    from berth.core.distribution.hosts import Hosts

URI = "io.containerd.grpc.v1.cri"
BERTH_RUNTIME = "io.containerd.berth.v1"
RUNC_RUNTIME = "io.containerd.runc.v2"
RUNTIME_TYPES = (BERTH_RUNTIME, RUNC_RUNTIME)
SANDBOX_MODES = ("pinned", "pause")
# runc's Options (containerd.runc.v1.Options) as containerd's TOML spells them.
RUNC_OPTION_KEYS = {
    "BinaryName": str, "Root": str, "SystemdCgroup": bool, "NoPivotRoot": bool,
    "NoNewKeyring": bool, "ShimCgroup": str, "IoUid": int, "IoGid": int,
    "CriuPath": str, "CriuImagePath": str, "CriuWorkPath": str,
}

# What `berthd config default` shows for the section: containerd's keys that berth
# reads, with containerd's defaults, and berth's own (address, sandbox_mode).
DEFAULTS: dict[str, Any] = {
    "address": "",
    "sandbox_mode": "pinned",
    "sandbox_image": "registry.k8s.io/pause:3.6",
    "restrict_oom_score_adj": False,
    "stream_server_address": "127.0.0.1",
    "stream_server_port": "0",
    "enable_tls_streaming": False,
    "x509_key_pair_streaming": {"tls_cert_file": "", "tls_key_file": ""},
    "max_container_log_line_size": 16384,
    "enable_cdi": False,
    "cdi_spec_dirs": ["/etc/cdi", "/var/run/cdi"],
    "unset_seccomp_profile": "",
    "containerd": {
        "snapshotter": "overlayfs",
        "default_runtime_name": "runc",
        "runtimes": {
            "runc": {"runtime_type": RUNC_RUNTIME, "options": {}},
            "berth": {"runtime_type": BERTH_RUNTIME, "options": {}},
        },
    },
    "cni": {"bin_dir": "/opt/cni/bin", "conf_dir": "/etc/cni/net.d"},
    "registry": {"config_path": "", "mirrors": {}},
}

# containerd 1.6's defaults of keys berth does not act on: set to these, they ask for
# nothing berth fails to do.
_CONTAINERD_DEFAULTS: dict[str, Any] = {
    "disable_tcp_service": True, "stream_idle_timeout": "4h0m0s", "systemd_cgroup": False,
    "enable_selinux": False, "selinux_category_range": 1024, "max_concurrent_downloads": 3,
    "stats_collect_period": 10, "disable_hugetlb_controller": True,
    "tolerate_missing_hugetlb_controller": True, "disable_cgroup": False,
    "disable_apparmor": False, "disable_proc_mount": False,
    "device_ownership_from_security_context": False, "enable_unprivileged_icmp": False,
    "enable_unprivileged_ports": False, "ignore_image_defined_volumes": False,
    "netns_mounts_under_state_dir": False,
    "cni.conf_template": "", "cni.ip_pref": "", "cni.max_conf_num": 1,
    "containerd.disable_snapshot_annotations": True,
    "containerd.discard_unpacked_layers": False,
    "containerd.ignore_rdt_not_enabled_errors": False, "containerd.no_pivot": False,
    "image_decryption.key_model": "node",
}
_RUNTIME_KEYS = ("runtime_type", "options")
_RUNTIME_DEFAULTS: dict[str, Any] = {
    "base_runtime_spec": "", "cni_conf_dir": "", "cni_max_conf_num": 0,
    "container_annotations": [], "pod_annotations": [],
    "privileged_without_host_devices": False, "runtime_engine": "", "runtime_path": "",
    "runtime_root": "",
}


@dataclass
class Runtime:
    """A runtime handler: the berth runtime it runs on, and its options."""

    name: str
    runtime_type: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def systemd_cgroup(self) -> bool:
        return bool(self.options.get("SystemdCgroup", False))

    def cgroup_driver_problem(self) -> str:
        """Why this handler's pods cannot run ("" when they can): the systemd cgroup
        driver with no systemd to ask. berth does not fall back to cgroupfs behind the
        driver RuntimeConfig names."""
        if self.systemd_cgroup and not systemd_running():
            return (f"runtime handler {self.name!r} asks for the systemd cgroup driver "
                    "(options SystemdCgroup = true) but systemd is not running on this "
                    f"node (no {SYSTEMD_RUN}): set SystemdCgroup = false (cgroupfs)")
        return ""


SYSTEMD_RUN = "/run/systemd/system"


def systemd_running() -> bool:
    """systemd is PID 1 (sd_booted(3)'s test, as runc's)."""
    return os.path.isdir(SYSTEMD_RUN)


@dataclass
class CRIConfig:
    address: Path
    sandbox_mode: str = "pinned"
    sandbox_image: str = DEFAULTS["sandbox_image"]
    restrict_oom_score_adj: bool = False
    stream_server_address: str = "127.0.0.1"
    stream_server_port: str = "0"
    enable_tls_streaming: bool = False
    # x509_key_pair_streaming: the streaming server's certificate instead of a self-signed one
    stream_tls_cert_file: str = ""
    stream_tls_key_file: str = ""
    max_container_log_line_size: int = 16384
    snapshotter: str = "overlayfs"
    default_runtime_name: str = "runc"
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    cni_bin_dir: str = "/opt/cni/bin"
    cni_conf_dir: str = "/etc/cni/net.d"
    registry_config_path: str = ""
    registry_mirrors: dict[str, list[str]] = field(default_factory=dict)
    enable_cdi: bool = False
    cdi_spec_dirs: list[str] = field(default_factory=lambda: list(DEFAULTS["cdi_spec_dirs"]))
    # The seccomp profile of a container that names none (containerd 1.6's key; "" none).
    unset_seccomp_profile: str = ""
    unsupported: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def hosts(self) -> Hosts:
        from berth.core.distribution.hosts import Hosts

        return Hosts(self.registry_config_path, self.registry_mirrors)

    def runtime(self, handler: str) -> Runtime:
        """The runtime a RuntimeClass handler names ("" is the default)."""
        name = handler or self.default_runtime_name
        try:
            return self.runtimes[name]
        except KeyError:
            raise errdefs.NotFound(f"no runtime for {handler!r} is configured",
                                   raw=True) from None


def _bad(key: str, want: str) -> errdefs.InvalidArgument:
    return errdefs.InvalidArgument(f'[plugins."{URI}"] {key}: expected {want}', raw=True)


def _get(section: dict[str, Any], key: str, kind: type, default: Any, path: str) -> Any:
    value = section.get(key, default)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise _bad(path + key, kind.__name__)
    return value


def _table(section: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = section.get(key, {})
    if not isinstance(value, dict):
        raise _bad(path + key, "a table")
    return value


class _Unsupported:
    def __init__(self) -> None:
        self.keys: list[str] = []
        self.changed: list[str] = []

    def note(self, key: str, value: Any, default: Any = None) -> None:
        """``default`` None: containerd's default is empty, so any value asks for more.
        A table is noted key by key (``image_decryption.key_model``)."""
        if isinstance(value, dict) and value:
            for k, v in value.items():
                self.note(f"{key}.{k}", v, _CONTAINERD_DEFAULTS.get(f"{key}.{k}"))
            return
        self.keys.append(key)
        empty = value in ("", 0, False, [], {}) and not isinstance(value, float)
        if (value != default) if default is not None else not empty:
            self.changed.append(key)


def _streaming_tls(cfg: CRIConfig, pair: dict[str, Any], seen: _Unsupported) -> None:
    """x509_key_pair_streaming, with containerd's rules: both files or neither, and only
    with enable_tls_streaming (the files are loaded when the plugin starts)."""
    path = "x509_key_pair_streaming."
    for key, value in pair.items():
        if key not in ("tls_cert_file", "tls_key_file"):
            seen.note(path + key, value)
    cert = _get(pair, "tls_cert_file", str, "", path)
    key = _get(pair, "tls_key_file", str, "", path)
    if cfg.enable_tls_streaming:
        if cert and not key:
            raise errdefs.InvalidArgument(
                f'[plugins."{URI}"] {path}tls_key_file must be set with tls_cert_file',
                raw=True)
        if key and not cert:
            raise errdefs.InvalidArgument(
                f'[plugins."{URI}"] {path}tls_cert_file must be set with tls_key_file',
                raw=True)
    else:
        for name, value in (("tls_cert_file", cert), ("tls_key_file", key)):
            if value:
                raise errdefs.InvalidArgument(
                    f'[plugins."{URI}"] {path}{name} is set but enable_tls_streaming is not',
                    raw=True)
    cfg.stream_tls_cert_file, cfg.stream_tls_key_file = cert, key


def parse(section: dict[str, Any], *, state: Path) -> CRIConfig:
    """Read the plugin's section; unknown keys are collected, wrong types refused."""
    seen = _Unsupported()
    top = {"address", "sandbox_mode", "sandbox_image", "restrict_oom_score_adj",
           "stream_server_address", "stream_server_port", "enable_tls_streaming",
           "x509_key_pair_streaming", "max_container_log_line_size", "containerd", "cni",
           "registry", "enable_cdi", "cdi_spec_dirs", "unset_seccomp_profile"}
    for key, value in section.items():
        if key not in top:
            seen.note(key, value, _CONTAINERD_DEFAULTS.get(key))
    address = _get(section, "address", str, "", "")
    mode = _get(section, "sandbox_mode", str, "pinned", "")
    if mode not in SANDBOX_MODES:
        raise _bad("sandbox_mode", f"one of {', '.join(SANDBOX_MODES)}")
    port = section.get("stream_server_port", "0")
    if isinstance(port, int) and not isinstance(port, bool):
        port = str(port)
    if not isinstance(port, str) or not port.isdigit() or int(port) > 65535:
        raise _bad("stream_server_port", "a port number")
    cfg = CRIConfig(
        address=Path(address) if address else state / "cri.sock",
        sandbox_mode=mode,
        sandbox_image=_get(section, "sandbox_image", str, DEFAULTS["sandbox_image"], ""),
        restrict_oom_score_adj=_get(section, "restrict_oom_score_adj", bool, False, ""),
        stream_server_address=_get(section, "stream_server_address", str, "127.0.0.1", ""),
        stream_server_port=port,
        enable_tls_streaming=_get(section, "enable_tls_streaming", bool, False, ""),
        max_container_log_line_size=_get(section, "max_container_log_line_size", int,
                                         16384, ""),
    )
    _streaming_tls(cfg, _table(section, "x509_key_pair_streaming", ""), seen)
    cfg.enable_cdi = _get(section, "enable_cdi", bool, False, "")
    dirs = section.get("cdi_spec_dirs", DEFAULTS["cdi_spec_dirs"])
    if not isinstance(dirs, list) or not all(isinstance(x, str) and x.startswith("/")
                                             for x in dirs):
        raise _bad("cdi_spec_dirs", "a list of absolute paths")
    cfg.cdi_spec_dirs = list(dirs)
    unset = _get(section, "unset_seccomp_profile", str, "", "")
    if unset not in ("", "unconfined", "runtime/default", "docker/default") and not (
            unset.startswith("localhost//")):
        raise _bad("unset_seccomp_profile", '"", "unconfined", "runtime/default" or '
                   '"localhost/<absolute path>"')
    cfg.unset_seccomp_profile = unset
    ctrd = _table(section, "containerd", "")
    for key, value in ctrd.items():
        if key not in ("snapshotter", "default_runtime_name", "runtimes"):
            seen.note(f"containerd.{key}", value, _CONTAINERD_DEFAULTS.get(f"containerd.{key}"))
    cfg.snapshotter = _get(ctrd, "snapshotter", str, "overlayfs", "containerd.")
    cfg.default_runtime_name = _get(ctrd, "default_runtime_name", str, "runc", "containerd.")
    runtimes = ctrd.get("runtimes", DEFAULTS["containerd"]["runtimes"])
    if not isinstance(runtimes, dict):
        raise _bad("containerd.runtimes", "a table")
    for name, rt in runtimes.items():
        path = f"containerd.runtimes.{name}."
        if not isinstance(rt, dict):
            raise _bad(path.rstrip("."), "a table")
        for key, value in rt.items():
            if key not in _RUNTIME_KEYS:
                seen.note(path + key, value, _RUNTIME_DEFAULTS.get(key))
        rtype = _get(rt, "runtime_type", str, "", path)
        if rtype not in RUNTIME_TYPES:
            raise _bad(path + "runtime_type", f"one of {', '.join(RUNTIME_TYPES)}")
        options = _table(rt, "options", path)
        for key, value in options.items():
            kind = RUNC_OPTION_KEYS.get(key)
            if kind is None:
                seen.note(path + "options." + key, value)
            elif kind is int and isinstance(value, bool) or not isinstance(value, kind):
                raise _bad(path + "options." + key, kind.__name__)
        cfg.runtimes[name] = Runtime(name, rtype, dict(options))
    if cfg.default_runtime_name not in cfg.runtimes:
        raise errdefs.InvalidArgument(
            f'[plugins."{URI}"] containerd.default_runtime_name: no runtime named '
            f"{cfg.default_runtime_name!r} in containerd.runtimes", raw=True)
    cni = _table(section, "cni", "")
    for key, value in cni.items():
        if key not in ("bin_dir", "conf_dir"):
            seen.note(f"cni.{key}", value, _CONTAINERD_DEFAULTS.get(f"cni.{key}"))
    cfg.cni_bin_dir = _get(cni, "bin_dir", str, "/opt/cni/bin", "cni.")
    cfg.cni_conf_dir = _get(cni, "conf_dir", str, "/etc/cni/net.d", "cni.")
    registry = _table(section, "registry", "")
    for key, value in registry.items():
        if key not in ("config_path", "mirrors"):
            seen.note(f"registry.{key}", value)
    cfg.registry_config_path = _get(registry, "config_path", str, "", "registry.")
    for host, mirror in _table(registry, "mirrors", "registry.").items():
        path = f"registry.mirrors.{host}."
        if not isinstance(mirror, dict):
            raise _bad(path.rstrip("."), "a table")
        endpoints = mirror.get("endpoint", [])
        if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
            raise _bad(path + "endpoint", "a list of URLs")
        for key, value in mirror.items():
            if key != "endpoint":
                seen.note(path + key, value)
        cfg.registry_mirrors[host] = list(endpoints)
    if cfg.registry_config_path and cfg.registry_mirrors:
        # containerd refuses the mix too: which one wins would be a guess.
        raise errdefs.InvalidArgument(
            f'[plugins."{URI}"] registry: config_path and mirrors cannot be used '
            "together", raw=True)
    cfg.unsupported = sorted(set(seen.keys))
    cfg.changed = sorted(set(seen.changed))
    return cfg

