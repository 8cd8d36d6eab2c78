"""Helpers around OCI bundles: reading config.json, a default spec, the state given to hooks.

A default spec mirrors what ``runc spec`` writes (the same mounts, masked and read-only
paths, namespaces and a small capability set), so tests and tools start from what users
of runc know.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from berth.core import errdefs

OCI_VERSION = "1.0.2"

#: The dict returned by ``OCIRuntime.stats``. Missing controllers leave their key out.
STATS_SHAPE = {
    "memory": {
        "usage": "bytes in use (v1 memory.usage_in_bytes, v2 memory.current)",
        "limit": "bytes (a huge number when unlimited)",
        "max_usage": "peak bytes (v1 only, v2 memory.peak when present)",
        "failcnt": "times the limit was hit (v1 memory.failcnt, v2 memory.events max)",
        "oom": "OOM situations (v1 under_oom events are not counted: oom_kill is)",
        "oom_kill": "processes killed by the OOM killer in this cgroup",
        "swap_usage": "bytes, memory+swap on v1",
        "swap_limit": "bytes",
        "stat": "dict of memory.stat",
    },
    "cpu": {"usage_total": "ns", "usage_user": "ns", "usage_kernel": "ns",
            "throttled_periods": "count", "throttled_time": "ns", "nr_periods": "count"},
    "pids": {"current": "count", "limit": "0 when unlimited"},
}

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,1023}$")

DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]

DEFAULT_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
     "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
     "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
     "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
     "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs",
     "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
     "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
]

DEFAULT_MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/proc/scsi",
]
DEFAULT_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def validate_id(id: str) -> str:
    """Container ids become directory names: refuse anything that could escape the root."""
    if not isinstance(id, str) or not _ID.match(id):
        raise errdefs.InvalidArgument(f"invalid container id {id!r}")
    return id


def load(bundle: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of ``bundle``."""
    path = Path(bundle) / "config.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise errdefs.NotFound(f"bundle config {str(path)!r}") from None
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise errdefs.InvalidArgument(f"{path}: invalid JSON: {e}") from None
    if not isinstance(config, dict):
        raise errdefs.InvalidArgument(f"{path}: not a JSON object")
    return config


def hook_state(id: str, status: str, pid: int, bundle: str | Path,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The OCI state document, as hooks read it on stdin."""
    state: dict[str, Any] = {"ociVersion": OCI_VERSION, "id": id, "status": status,
                             "bundle": str(bundle)}
    if pid:
        state["pid"] = pid
    if annotations:
        state["annotations"] = dict(annotations)
    return state


def default(args: list[str] | None = None, *, terminal: bool = False,
            hostname: str = "berth", readonly: bool = True) -> dict[str, Any]:
    """A config like ``runc spec`` writes (rootfs at ``rootfs``, a small capability set)."""
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args or ["sh"]),
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm"],
            "cwd": "/",
            "capabilities": {k: list(caps) for k in
                             ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": hostname,
        "mounts": copy.deepcopy(DEFAULT_MOUNTS),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": list(DEFAULT_MASKED),
            "readonlyPaths": list(DEFAULT_READONLY),
        },
    }
