"""``runc events --stats`` output turned into ``berth.core.oci.spec.STATS_SHAPE``."""

from __future__ import annotations

from typing import Any


def _get(d: Any, *path: str, default: Any = 0) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def from_events(event: dict) -> dict:
    """The stats dict from one ``{"type": "stats", "data": {...}}`` event."""
    data = event.get("data", event) if isinstance(event, dict) else {}
    out: dict[str, dict] = {}
    cpu = data.get("cpu")
    if isinstance(cpu, dict):
        out["cpu"] = {
            "usage_total": _get(cpu, "usage", "total"),
            "usage_user": _get(cpu, "usage", "user"),
            "usage_kernel": _get(cpu, "usage", "kernel"),
            "nr_periods": _get(cpu, "throttling", "periods"),
            "throttled_periods": _get(cpu, "throttling", "throttledPeriods"),
            "throttled_time": _get(cpu, "throttling", "throttledTime"),
        }
        per_cpu = _get(cpu, "usage", "percpu", default=None)
        if isinstance(per_cpu, list):  # cgroup v1 only
            out["cpu"]["usage_percpu"] = per_cpu
    memory = data.get("memory")
    if isinstance(memory, dict):
        out["memory"] = {
            "usage": _get(memory, "usage", "usage"),
            "limit": _get(memory, "usage", "limit"),
            "max_usage": _get(memory, "usage", "max"),
            "failcnt": _get(memory, "usage", "failcnt"),
            "swap_usage": _get(memory, "swap", "usage"),
            "swap_limit": _get(memory, "swap", "limit"),
            "stat": dict(_get(memory, "raw", default={}) or {}),
        }
        raw = out["memory"]["stat"]
        if "oom_kill" in raw:
            out["memory"]["oom_kill"] = raw["oom_kill"]
    pids = data.get("pids")
    if isinstance(pids, dict):
        out["pids"] = {"current": pids.get("current", 0), "limit": pids.get("limit", 0)}
    return out
