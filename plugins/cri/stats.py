"""Container and pod resource usage for CRI, from their cgroups (v1 or v2, through the
in-process runtime's cgroup reader, which both runtimes' cgroupfs paths fit) and the
snapshotter's usage. The kubelet's working set is memory usage less inactive file
pages, as cAdvisor and containerd compute it.
"""

from __future__ import annotations

from typing import Any

from berth.core import errdefs
from berth.core.api.runtime import v1 as cri
from berth.plugins.runtimes.inprocess.cgroups import Cgroup


def read(cgroups_path: str, id: str) -> dict[str, Any]:
    """The cgroup's stats dict ({} when it is gone or was never made)."""
    if not cgroups_path.startswith("/"):
        return {}  # a systemd slice or a relative path: not one berth's CRI makes
    try:
        return Cgroup.resolve(cgroups_path, id).stats()
    except (OSError, ValueError, errdefs.BerthError):
        return {}


def usage(stats: dict[str, Any], now: int) -> tuple[cri.CpuUsage, cri.MemoryUsage]:
    mem = stats.get("memory") or {}
    st = mem.get("stat") or {}
    used = int(mem.get("usage", 0))
    inactive = st.get("total_inactive_file", st.get("inactive_file", 0))
    working = max(0, used - int(inactive))
    memory = cri.MemoryUsage(
        timestamp=now, working_set_bytes=cri.UInt64Value(working),
        usage_bytes=cri.UInt64Value(used),
        rss_bytes=cri.UInt64Value(int(st.get("total_rss", st.get("anon", 0)))),
        page_faults=cri.UInt64Value(int(st.get("total_pgfault", st.get("pgfault", 0)))),
        major_page_faults=cri.UInt64Value(
            int(st.get("total_pgmajfault", st.get("pgmajfault", 0)))))
    limit = int(mem.get("limit", 0))
    if 0 < limit < (1 << 62):
        memory.available_bytes = cri.UInt64Value(max(0, limit - working))
    cpu = stats.get("cpu") or {}
    return (cri.CpuUsage(timestamp=now, usage_core_nano_seconds=cri.UInt64Value(
        int(cpu.get("usage_total", 0)))), memory)


def process_count(stats: dict[str, Any]) -> int:
    return int((stats.get("pids") or {}).get("current", 0))
