"""Capability names, masks and the order in which a process's sets are applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from berth.core import errdefs

NAMES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]
NUMBERS = {name: i for i, name in enumerate(NAMES)}


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(NAMES) - 1


@dataclass(frozen=True)
class CapSets:
    """The five sets as bit masks (bit n = capability number n)."""

    bounding: int = 0
    effective: int = 0
    inheritable: int = 0
    permitted: int = 0
    ambient: int = 0


def mask(names: list[str] | None, *, known_last: int) -> int:
    """Bit mask of ``names``; unknown names are an error, caps the kernel lacks are dropped
    (as runc does, so a spec written for a newer kernel still runs)."""
    m = 0
    for name in names or []:
        key = name.upper()
        if not key.startswith("CAP_"):
            key = "CAP_" + key
        if key not in NUMBERS:
            raise errdefs.InvalidArgument(f"unknown capability {name!r}")
        n = NUMBERS[key]
        if n <= known_last:
            m |= 1 << n
    return m


def from_spec(caps: dict[str, Any] | None, *, known_last: int) -> CapSets:
    caps = caps or {}
    return CapSets(**{k: mask(caps.get(k), known_last=known_last)
                      for k in ("bounding", "effective", "inheritable", "permitted",
                                "ambient")})


def bits(m: int) -> list[int]:
    return [i for i in range(m.bit_length()) if m >> i & 1]


def apply_bounding(sc: Any, sets: CapSets, *, known_last: int) -> None:
    """Drop everything outside the bounding set (needs CAP_SETPCAP, so it comes first)."""
    for cap in range(known_last + 1):
        if not sets.bounding >> cap & 1:
            sc.cap_bound_drop(cap)


def apply_sets(sc: Any, sets: CapSets, log: Any = None) -> None:
    """capset the three sets, then raise ambient caps (each needs permitted+inheritable;
    like runc, an ambient cap that cannot be raised is skipped, not fatal)."""
    sc.capset(sets.effective, sets.permitted, sets.inheritable)
    for cap in bits(sets.ambient):
        try:
            sc.cap_ambient_raise(cap)
        except OSError:
            if log is not None:
                log(f"ambient capability {NAMES[cap] if cap < len(NAMES) else cap} not raised")
