"""``OCIRuntime.stats`` as containerd's ``io.containerd.cgroups.v1.Metrics``.

The runc shim answers Stats with that message (github.com/containerd/cgroups
stats/v1/metrics.proto), which ``ctr task metrics`` and CRI decode. core/api does not
carry the cgroups protos, so the fields berth fills are encoded here by number.
"""

from __future__ import annotations

from berth.core.shim.wire import WIRE_LEN, uint_field, varint

METRICS_TYPE_URL = "io.containerd.cgroups.v1.Metrics"

# MemoryStat scalar fields: number → key of memory.stat (v1 names).
_MEMORY_STAT = {
    1: "cache", 2: "rss", 3: "rss_huge", 4: "mapped_file", 5: "dirty", 6: "writeback",
    7: "pgpgin", 8: "pgpgout", 9: "pgfault", 10: "pgmajfault", 11: "inactive_anon",
    12: "active_anon", 13: "inactive_file", 14: "active_file", 15: "unevictable",
    16: "hierarchical_memory_limit", 17: "hierarchical_memsw_limit",
    18: "total_cache", 19: "total_rss", 20: "total_rss_huge", 21: "total_mapped_file",
    22: "total_dirty", 23: "total_writeback", 24: "total_pgpgin", 25: "total_pgpgout",
    26: "total_pgfault", 27: "total_pgmajfault", 28: "total_inactive_anon",
    29: "total_active_anon", 30: "total_inactive_file", 31: "total_active_file",
    32: "total_unevictable",
}


def _message(number: int, body: bytes) -> bytes:
    return varint(number << 3 | WIRE_LEN) + varint(len(body)) + body


def _uint(value: object) -> int:
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0
    return number if number >= 0 else 0


def _entry(limit: object, usage: object, max_: object = 0, failcnt: object = 0) -> bytes:
    return (uint_field(1, _uint(limit)) + uint_field(2, _uint(usage))
            + uint_field(3, _uint(max_)) + uint_field(4, _uint(failcnt)))


def encode(stats: dict) -> bytes:
    """The Metrics message body for a ``berth.core.oci.spec.STATS_SHAPE`` dict."""
    out = b""
    pids = stats.get("pids")
    if isinstance(pids, dict):
        out += _message(2, uint_field(1, _uint(pids.get("current")))
                        + uint_field(2, _uint(pids.get("limit"))))
    cpu = stats.get("cpu")
    if isinstance(cpu, dict):
        usage = (uint_field(1, _uint(cpu.get("usage_total")))
                 + uint_field(2, _uint(cpu.get("usage_kernel")))
                 + uint_field(3, _uint(cpu.get("usage_user"))))
        per_cpu = cpu.get("usage_percpu")
        if isinstance(per_cpu, list) and per_cpu:
            # CPUUsage.per_cpu: repeated uint64, packed as proto3 writes it.
            usage += _message(4, b"".join(varint(_uint(v)) for v in per_cpu))
        throttle = (uint_field(1, _uint(cpu.get("nr_periods")))
                    + uint_field(2, _uint(cpu.get("throttled_periods")))
                    + uint_field(3, _uint(cpu.get("throttled_time"))))
        out += _message(3, _message(1, usage) + _message(2, throttle))
    memory = stats.get("memory")
    if isinstance(memory, dict):
        raw = memory.get("stat") or {}
        body = b"".join(uint_field(n, _uint(raw.get(k))) for n, k in _MEMORY_STAT.items())
        body += _message(33, _entry(memory.get("limit"), memory.get("usage"),
                                    memory.get("max_usage"), memory.get("failcnt")))
        if "swap_usage" in memory or "swap_limit" in memory:
            body += _message(34, _entry(memory.get("swap_limit"), memory.get("swap_usage")))
        out += _message(4, body)
        if "oom_kill" in memory:
            out += _message(9, uint_field(3, _uint(memory.get("oom_kill"))))
    return out
