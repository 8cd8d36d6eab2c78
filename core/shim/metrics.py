"""``OCIRuntime.stats`` as containerd's ``io.containerd.cgroups.v1.Metrics``.

The runc shim answers Stats with that message, which ``ctr task metrics`` and CRI decode;
its proto is proto/containerd/cgroups/v1/metrics.proto (generated into core/api).
"""

from __future__ import annotations

from typing import Any

METRICS_TYPE_URL = "io.containerd.cgroups.v1.Metrics"

# MemoryStat fields ← keys of memory.stat (v1 names).
_MEMORY_STAT = {
    "cache": "cache", "rss": "rss", "rss_huge": "rss_huge", "mapped_file": "mapped_file",
    "dirty": "dirty", "writeback": "writeback", "pg_pg_in": "pgpgin",
    "pg_pg_out": "pgpgout", "pg_fault": "pgfault", "pg_maj_fault": "pgmajfault",
    "inactive_anon": "inactive_anon", "active_anon": "active_anon",
    "inactive_file": "inactive_file", "active_file": "active_file",
    "unevictable": "unevictable", "hierarchical_memory_limit": "hierarchical_memory_limit",
    "hierarchical_swap_limit": "hierarchical_memsw_limit",
    "total_cache": "total_cache", "total_rss": "total_rss",
    "total_rss_huge": "total_rss_huge", "total_mapped_file": "total_mapped_file",
    "total_dirty": "total_dirty", "total_writeback": "total_writeback",
    "total_pg_pg_in": "total_pgpgin", "total_pg_pg_out": "total_pgpgout",
    "total_pg_fault": "total_pgfault", "total_pg_maj_fault": "total_pgmajfault",
    "total_inactive_anon": "total_inactive_anon", "total_active_anon": "total_active_anon",
    "total_inactive_file": "total_inactive_file", "total_active_file": "total_active_file",
    "total_unevictable": "total_unevictable",
}


def _uint(value: object) -> int:
    if not isinstance(value, int | float | str | bytes):
        return 0  # None, a list or a dict: what int() refused with a TypeError
    try:
        number = int(value)
    except (TypeError, ValueError):
        return 0
    return number if 0 <= number < 1 << 64 else 0


def metrics(stats: dict) -> Any:
    """The Metrics message for a ``berth.core.oci.spec.STATS_SHAPE`` dict."""
    from berth.core.api.io.containerd.cgroups import v1

    out = v1.Metrics()
    pids = stats.get("pids")
    if isinstance(pids, dict):
        out.pids = v1.PidsStat(current=_uint(pids.get("current")),
                               limit=_uint(pids.get("limit")))
    cpu = stats.get("cpu")
    if isinstance(cpu, dict):
        per_cpu = cpu.get("usage_percpu")
        out.cpu = v1.CpuStat(
            usage=v1.CpuUsage(total=_uint(cpu.get("usage_total")),
                              kernel=_uint(cpu.get("usage_kernel")),
                              user=_uint(cpu.get("usage_user")),
                              per_cpu=[_uint(v) for v in per_cpu]
                              if isinstance(per_cpu, list) else []),
            throttling=v1.Throttle(periods=_uint(cpu.get("nr_periods")),
                                   throttled_periods=_uint(cpu.get("throttled_periods")),
                                   throttled_time=_uint(cpu.get("throttled_time"))))
    memory = stats.get("memory")
    if isinstance(memory, dict):
        raw = memory.get("stat") or {}
        # Any: mypy cannot tie each computed key to its field (all of them uint64).
        counters: dict[str, Any] = {f: _uint(raw.get(k)) for f, k in _MEMORY_STAT.items()}
        stat = v1.MemoryStat(**counters)
        stat.usage = v1.MemoryEntry(limit=_uint(memory.get("limit")),
                                    usage=_uint(memory.get("usage")),
                                    max=_uint(memory.get("max_usage")),
                                    failcnt=_uint(memory.get("failcnt")))
        if "swap_usage" in memory or "swap_limit" in memory:
            stat.swap = v1.MemoryEntry(limit=_uint(memory.get("swap_limit")),
                                       usage=_uint(memory.get("swap_usage")))
        out.memory = stat
        if "oom_kill" in memory:
            out.memory_oom_control = v1.MemoryOomControl(oom_kill=_uint(memory.get("oom_kill")))
    return out


def encode(stats: dict) -> bytes:
    """The Metrics message body for a ``berth.core.oci.spec.STATS_SHAPE`` dict."""
    return bytes(metrics(stats))
