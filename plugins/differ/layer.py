"""What one tar entry of an OCI layer asks for, decided without touching any file.

``plan(name, typeflag, linkname)`` cleans the entry's path into components below the
root and says what to do with it: create a file, directory, link or device node,
white out a path of a lower layer, make a directory opaque, or skip the entry.

Names are cleaned as containerd's archive package cleans them, a join rooted at the
layer's root: ``/etc/x``, ``./etc/x`` and ``etc/y/../x`` all name ``etc/x`` (older
image builders wrote such names, and containerd imports them). Hard link targets are
cleaned the same way. What containerd confines silently, berth refuses with an
InvalidArgument naming the entry: a ``..`` that would climb above the root (in a name,
a hard link target or a whiteout) and a whiteout of ``.`` or ``..``. A layer that
carries those is broken or hostile, and failing loudly is easier to reason about than
rewriting it. (Writes through symlinked parents are refused where the entry is applied.)
"""

from __future__ import annotations

import enum
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass

from berth.core import errdefs
from berth.core.archive import OPAQUE_MARKER, WHITEOUT_META_PREFIX, WHITEOUT_PREFIX

# PAX records that carry extended attributes (GNU tar, Go's archive/tar, containerd).
PAX_XATTR_PREFIX = "SCHILY.xattr."


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    WHITEOUT = "whiteout"  # delete ``path`` as found in lower layers
    OPAQUE = "opaque"  # hide everything lower layers have under ``path``
    SKIP = "skip"


# Regular-file typeflags: '0', the pre-POSIX NUL, contiguous files, and GNU sparse
# files (tarfile hands their data back with the holes filled).
_TYPES: dict[bytes, Kind] = {
    tarfile.REGTYPE: Kind.FILE,
    tarfile.AREGTYPE: Kind.FILE,
    tarfile.CONTTYPE: Kind.FILE,
    tarfile.GNUTYPE_SPARSE: Kind.FILE,
    tarfile.DIRTYPE: Kind.DIR,
    tarfile.SYMTYPE: Kind.SYMLINK,
    tarfile.LNKTYPE: Kind.HARDLINK,
    tarfile.CHRTYPE: Kind.CHAR,
    tarfile.BLKTYPE: Kind.BLOCK,
    tarfile.FIFOTYPE: Kind.FIFO,
}


@dataclass(frozen=True, slots=True)
class Action:
    """One decision. ``path`` is a tuple of components below the root (never empty
    except for SKIP); ``link`` is the cleaned hard link target; ``reason`` explains a
    SKIP."""

    kind: Kind
    path: tuple[str, ...]
    link: tuple[str, ...] | None = None
    reason: str = ""

    @property
    def parent(self) -> tuple[str, ...]:
        return self.path[:-1]

    @property
    def base(self) -> str:
        return self.path[-1]


def invalid(entry: str, why: str) -> errdefs.InvalidArgument:
    """The error for a refused entry; the message names it."""
    return errdefs.InvalidArgument(f"layer entry {entry!r}: {why}")


def clean_path(path: str, *, entry: str, what: str = "path") -> tuple[str, ...]:
    """Split a tar path into components below the root, as a rooted join cleans it.

    A leading ``/``, ``.`` and empty components vanish (``/a//b/`` and ``./a/b`` are
    ``a/b``); ``..`` takes back the component before it, lexically, as Go's
    ``filepath.Clean`` (``a/../b`` is ``b``, whatever ``a`` is in the tree). A ``..``
    with nothing left to take back would climb out of the root: refused, also in an
    absolute name (containerd clamps it to the root instead). ``()`` is the root itself.
    """
    if "\x00" in path:
        raise invalid(entry, f"{what} contains a NUL byte")
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if not parts:
                raise invalid(entry, f"{what} {path!r} contains '..' leading out of the root")
            parts.pop()
        elif part and part != ".":
            parts.append(part)
    return tuple(parts)


def plan(name: str, typeflag: bytes, linkname: str = "") -> Action:
    """Decide what the entry ``name`` of type ``typeflag`` asks for."""
    kind = _TYPES.get(typeflag)
    if kind is None:
        # PAX and GNU long-name headers are consumed by the tar reader; what is left
        # (global PAX headers, volume labels, ...) carries nothing for a filesystem.
        return Action(Kind.SKIP, (), reason=f"unsupported tar entry type {typeflag!r}")
    path = clean_path(name, entry=name)
    if not path:
        # The root itself: containerd ignores it too (its metadata belongs to the
        # snapshot, not to the layer).
        return Action(Kind.SKIP, (), reason="resolves to the root")

    base = path[-1]
    if base.startswith(WHITEOUT_PREFIX):
        return _whiteout(name, path)

    if kind is Kind.HARDLINK:
        if not linkname:
            raise invalid(name, "hard link without a target")
        link = clean_path(linkname, entry=name, what="hard link target")
        if not link:
            raise invalid(name, "hard link to the root directory")
        if link == path:
            raise invalid(name, "hard link to itself")
        return Action(kind, path, link)
    if kind is Kind.SYMLINK and not linkname:
        raise invalid(name, "symlink without a target")
    return Action(kind, path)


def _whiteout(name: str, path: tuple[str, ...]) -> Action:
    base = path[-1]
    if base == OPAQUE_MARKER:
        return Action(Kind.OPAQUE, path[:-1])
    if base.startswith(WHITEOUT_META_PREFIX):
        return Action(Kind.SKIP, (), reason="whiteout metadata entry")
    hidden = base[len(WHITEOUT_PREFIX):]
    if hidden in ("", ".", ".."):
        raise invalid(name, f"invalid whiteout of {hidden or 'an empty name'!r}")
    return Action(Kind.WHITEOUT, path[:-1] + (hidden,))


def xattrs(pax_headers: Mapping[str, str]) -> dict[str, bytes]:
    """The extended attributes a PAX header carries, as the raw bytes to set.

    tarfile decodes PAX values as UTF-8 and falls back to surrogate escapes for
    binary ones (``security.capability``); encoding back the same way restores the
    original bytes either way.
    """
    out: dict[str, bytes] = {}
    for key, value in pax_headers.items():
        if key.startswith(PAX_XATTR_PREFIX):
            attr = key[len(PAX_XATTR_PREFIX):]
            if attr:
                out[attr] = value.encode("utf-8", "surrogateescape")
    return out


def xattr_allowed(attr: str) -> bool:
    """Whether a layer may set ``attr``.

    ``trusted.*`` is the administrator's namespace; overlayfs keeps its whiteout,
    opaque and redirect state there, so a layer setting it could forge those.
    containerd refuses it for the same reason.
    """
    return not attr.startswith("trusted.")


_NS_PER_S = 1_000_000_000
# Times are kept within what a 64-bit time_t (and Go's time package) can hold.
_MAX_S = (1 << 62) // _NS_PER_S


def time_ns(value: str | float | int | None) -> int | None:
    """A tar time (integer seconds, or a PAX decimal like ``1700000000.5``) in ns."""
    if value is None:
        return None
    if isinstance(value, str):
        whole, _, frac = value.strip().partition(".")
        try:
            seconds = int(whole or "0")
            digits = "".join(c for c in frac[:9] if c.isdigit()).ljust(9, "0")
            nanos = int(digits) if frac else 0
        except ValueError:
            return None
        if seconds < 0 and nanos:
            nanos = -nanos
        total = seconds * _NS_PER_S + nanos
    elif isinstance(value, int):
        total = value * _NS_PER_S
    else:
        total = round(value * _NS_PER_S)
    return max(-_MAX_S * _NS_PER_S, min(total, _MAX_S * _NS_PER_S))


def entry_times(mtime: str | float | int, pax_headers: Mapping[str, str]
                ) -> tuple[int, int]:
    """(atime, mtime) in ns for an entry, as containerd sets them.

    The PAX record is more precise than the header field when both exist. The
    access time is never older than the modification time.
    """
    m = time_ns(pax_headers.get("mtime")) if "mtime" in pax_headers else None
    if m is None:
        m = time_ns(mtime) or 0
    a = time_ns(pax_headers.get("atime")) if "atime" in pax_headers else None
    if a is None or a < m:
        a = m
    return a, m
