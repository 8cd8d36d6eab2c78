"""Go's formatting of durations, for messages and exports that read like containerd's."""

from __future__ import annotations


def go_duration(ns: int) -> str:
    """Go's time.Duration.String of ``ns`` nanoseconds (0s, 1.5ms, 1m30s)."""
    if ns == 0:
        return "0s"
    if ns < 1000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.3f}".rstrip("0").rstrip(".") + "µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.6f}".rstrip("0").rstrip(".") + "ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    secs = f"{rest / 1e9:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs
