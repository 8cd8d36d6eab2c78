"""Platforms (os/arch/variant): parsing, normalising and matching as containerd does.

:func:`default` is containerd's ``platforms.Default()`` on Linux (``Only`` the host
platform, which also accepts what the host runs natively: older amd64 levels and 386,
older arm variants, arm on arm64), :func:`only_strict` accepts one platform exactly.
A matcher's ``less`` orders candidates, best first, for picking one manifest of an index.
"""

from __future__ import annotations

import platform as _platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from berth.core import errdefs

_SPECIFIER = re.compile(r"[A-Za-z0-9_-]+")
_KNOWN_OS = frozenset({
    "aix", "android", "darwin", "dragonfly", "freebsd", "hurd", "illumos", "ios", "js",
    "linux", "nacl", "netbsd", "openbsd", "plan9", "solaris", "windows", "zos"})
_KNOWN_ARCH = frozenset({
    "386", "amd64", "amd64p32", "arm", "armbe", "arm64", "arm64be", "ppc64", "ppc64le",
    "loong64", "mips", "mipsle", "mips64", "mips64le", "mips64p32", "mips64p32le", "ppc",
    "riscv", "riscv64", "s390", "s390x", "sparc", "sparc64", "wasm"})


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return format(self)

    def to_json(self) -> dict[str, object]:
        """OCI's platform object, fields in the image-spec's order."""
        out: dict[str, object] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Platform:
        return cls(os=str(data.get("os", "")), architecture=str(data.get("architecture", "")),
                   variant=str(data.get("variant", "") or ""),
                   os_version=str(data.get("os.version", "") or ""),
                   os_features=tuple(data.get("os.features") or ()))  # type: ignore[arg-type]


def format(p: Platform) -> str:  # noqa: A001 - containerd's name
    if not p.os:
        return "unknown"
    return "/".join(x for x in (p.os, p.architecture, p.variant) if x)


def _host_arch() -> str:
    machine = _platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm",
            "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
            "riscv64": "riscv64"}.get(machine, machine)


def _host_variant() -> str:
    machine = _platform.machine().lower()
    return {"armv7l": "v7", "armv6l": "v6"}.get(machine, "")


def default_spec() -> Platform:
    """The host platform (containerd's DefaultSpec)."""
    return normalize(Platform("linux", _host_arch(), _host_variant()))


def normalize_os(os: str) -> str:
    if not os:
        return "linux"
    os = os.lower()
    return "darwin" if os == "macos" else os


def normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        return "arm64", "" if variant in ("8", "v8") else variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
    return arch, variant


def normalize(p: Platform) -> Platform:
    arch, variant = normalize_arch(p.architecture, p.variant)
    return Platform(normalize_os(p.os), arch, variant, p.os_version, p.os_features)


def parse(specifier: str) -> Platform:
    """containerd's platforms.Parse: ``os``, ``arch``, ``os/arch`` or ``os/arch/variant``."""
    if "*" in specifier:
        raise errdefs.InvalidArgument(f"{specifier!r}: wildcards not yet supported")
    parts = specifier.split("/")
    for part in parts:
        if not _SPECIFIER.fullmatch(part):
            raise errdefs.InvalidArgument(
                f"{part!r} is an invalid component of {specifier!r}: platform specifier "
                f"component must match {_SPECIFIER.pattern!r}")
    if len(parts) == 1:
        os = normalize_os(parts[0])
        if os in _KNOWN_OS:
            host = default_spec()
            return Platform(os, host.architecture, host.variant if host.variant != "v7" else "")
        arch, variant = normalize_arch(parts[0], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        if arch in _KNOWN_ARCH:
            return Platform("linux", arch, variant)
        raise errdefs.InvalidArgument(f"{specifier!r}: unknown operating system or architecture")
    if len(parts) == 2:
        arch, variant = normalize_arch(parts[1], "")
        if arch == "arm" and variant == "v7":
            variant = ""
        return Platform(normalize_os(parts[0]), arch, variant)
    if len(parts) == 3:
        arch, variant = normalize_arch(parts[1], parts[2])
        if arch == "arm64" and variant == "":
            variant = "v8"
        return Platform(normalize_os(parts[0]), arch, variant)
    raise errdefs.InvalidArgument(f"{specifier!r}: cannot parse platform specifier")


def _same(want: Platform) -> Callable[[Platform], bool]:
    want = normalize(want)

    def match(p: Platform) -> bool:
        n = normalize(p)
        return (n.os, n.architecture, n.variant) == (want.os, want.architecture, want.variant)

    return match


def _vector(p: Platform) -> list[Platform]:
    """What a platform can run, best first (containerd's platformVector)."""
    out = [p]
    if p.architecture == "amd64":
        level = p.variant.removeprefix("v")
        if level.isdigit() and int(level) > 1:
            for n in range(int(level) - 1, 0, -1):
                out.append(Platform(p.os, "amd64", f"v{n}", p.os_version, p.os_features))
        out.append(Platform(p.os, "386", "", p.os_version, p.os_features))
    elif p.architecture == "arm":
        level = p.variant.removeprefix("v")
        if level.isdigit() and int(level) > 5:
            for n in range(int(level) - 1, 4, -1):
                out.append(Platform(p.os, "arm", f"v{n}", p.os_version, p.os_features))
    elif p.architecture == "arm64":
        out.extend(_vector(Platform(p.os, "arm", p.variant or "v8", p.os_version,
                                    p.os_features)))
    return out


class Matcher:
    """containerd's MatchComparer: ``match`` and ``less`` (True: p1 is preferred)."""

    def __init__(self, ordered: Sequence[Platform] | None) -> None:
        self._matchers = None if ordered is None else [_same(p) for p in ordered]
        self.platforms = list(ordered or [])

    def match(self, p: Platform) -> bool:
        if self._matchers is None:
            return True
        return any(m(p) for m in self._matchers)

    def less(self, p1: Platform, p2: Platform) -> bool:
        if self._matchers is None:
            return False
        for m in self._matchers:
            a, b = m(p1), m(p2)
            if a and not b:
                return True
            if a or b:
                return False
        return False

    def rank(self, p: Platform | None) -> int:
        """Sort key equivalent to ``less``: lower is better, unmatched last."""
        if p is None:
            return len(self._matchers or ()) + 1
        if self._matchers is None:
            return 0
        for i, m in enumerate(self._matchers):
            if m(p):
                return i
        return len(self._matchers)


def only(p: Platform) -> Matcher:
    return Matcher(_vector(normalize(p)))


def only_strict(p: Platform) -> Matcher:
    return Matcher([normalize(p)])


def ordered(*ps: Platform) -> Matcher:
    return Matcher(list(ps))


def default() -> Matcher:
    return only(default_spec())


def default_strict() -> Matcher:
    return only_strict(default_spec())


ALL = Matcher(None)
