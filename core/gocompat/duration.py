"""Go's durations: ``time.Duration.String`` and ``time.ParseDuration``, for config values,
messages and exports that read like containerd's."""

from __future__ import annotations

import re

from berth.core import errdefs


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


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
          "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d*\.?\d*)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(value: str | int | float) -> float:
    """A Go duration ("1m30s", "100ms", "0") in seconds; plain numbers are seconds."""
    if isinstance(value, bool):
        raise errdefs.InvalidArgument(f"invalid duration {value!r}", raw=True)
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    if text == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None or m.group(1) in ("", "."):
            raise errdefs.InvalidArgument(f'time: invalid duration "{value}"', raw=True)
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise errdefs.InvalidArgument(f'time: invalid duration "{value}"', raw=True)
    return sign * total


def format_duration(seconds: float) -> str:
    """Go's time.Duration.String for the exports (0s, 100ms, 1.5s, 1m30s)."""
    return go_duration(round(seconds * 1e9))
