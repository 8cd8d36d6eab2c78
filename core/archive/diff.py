"""Make a layer: the tar of what changed from a lower directory to an upper one.

Semantics follow containerd's ``archive.WriteDiff`` over continuity's double walk:
both trees are walked in the same order, a path only in the lower one becomes an
OCI whiteout (``.wh.<name>``, nothing for what lies below a removed directory),
a path only in the upper one or changed in it is written whole, and every entry's
parent directories come first. Headers carry numeric ids only, whole-second
mtimes, and of the xattrs only ``security.capability`` (as containerd).
"""

from __future__ import annotations

import os
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from berth.core.archive import WHITEOUT_PREFIX

_CAPABILITY = "security.capability"


class ByteSink(Protocol):
    """Where a layer tar goes: a file, a compressor, or a wrapper that hashes on the way."""

    def write(self, data: bytes, /) -> object: ...

_COPY_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class _Entry:
    path: str  # "/a/b", relative to the walked root
    key: bytes  # sort key: the path's bytes with "/" as the lowest byte
    st: os.stat_result
    full: str


def write_diff(lower: Path | str, upper: Path | str, out: ByteSink) -> None:
    """Write to ``out`` the layer tar that turns ``lower`` into ``upper``."""
    writer = _ChangeWriter(out, str(upper))
    try:
        for kind, entry in _changes(str(lower), str(upper)):
            writer.handle(kind, entry)
    finally:
        writer.close()


# -- the double walk -------------------------------------------------------------------


def _walk(root: str) -> Iterator[_Entry]:
    """Every path below ``root``, depth first, names in byte order, links not followed."""
    stack = [iter(_children(root, ""))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        if stat.S_ISDIR(entry.st.st_mode):
            stack.append(iter(_children(root, entry.path)))


def _children(root: str, rel: str) -> list[_Entry]:
    with os.scandir(root + rel) as it:
        names = sorted(os.fsencode(e.name) for e in it)
    out = []
    for raw in names:
        path = f"{rel}/{os.fsdecode(raw)}"
        full = root + path
        out.append(_Entry(path, os.fsencode(path).replace(b"/", b"\x00"), os.lstat(full), full))
    return out


def _changes(lower: str, upper: str) -> Iterator[tuple[str, _Entry]]:
    """(kind, entry) with kind add, delete, modify or unmodified (hard links only)."""
    a_iter, b_iter = _walk(lower), _walk(upper)
    f1 = next(a_iter, None)
    f2 = next(b_iter, None)
    removed_dir = b""  # key prefix of a deleted (or replaced) lower directory
    while f1 is not None or f2 is not None:
        if f2 is None or (f1 is not None and f1.key < f2.key):
            assert f1 is not None
            if removed_dir and f1.key.startswith(removed_dir):
                f1 = next(a_iter, None)
                continue
            removed_dir = f1.key + b"\x00" if stat.S_ISDIR(f1.st.st_mode) else b""
            yield "delete", f1
            f1 = next(a_iter, None)
        elif f1 is None or f2.key < f1.key:
            removed_dir = b""
            yield "add", f2
            f2 = next(b_iter, None)
        else:
            same = _same_file(f1, f2)
            if stat.S_ISDIR(f1.st.st_mode) and not stat.S_ISDIR(f2.st.st_mode):
                removed_dir = f1.key + b"\x00"
            else:
                removed_dir = b""
            entry = f2
            f1 = next(a_iter, None)
            f2 = next(b_iter, None)
            if same:
                if stat.S_ISDIR(entry.st.st_mode) or entry.st.st_nlink <= 1:
                    continue
                yield "unmodified", entry
            else:
                yield "modify", entry


def _same_file(f1: _Entry, f2: _Entry) -> bool:
    s1, s2 = f1.st, f2.st
    if (s1.st_dev, s1.st_ino) == (s2.st_dev, s2.st_ino):
        return True
    if (s1.st_mode, s1.st_uid, s1.st_gid, s1.st_rdev) != (s2.st_mode, s2.st_uid, s2.st_gid,
                                                          s2.st_rdev):
        return False
    if _capability(f1.full) != _capability(f2.full):
        return False
    if stat.S_ISDIR(s1.st_mode):
        return True
    if s1.st_size != s2.st_size:
        return False
    if s1.st_mtime_ns // 1_000_000_000 != s2.st_mtime_ns // 1_000_000_000:
        return False
    n1, n2 = s1.st_mtime_ns % 1_000_000_000, s2.st_mtime_ns % 1_000_000_000
    if n1 == 0 and n2 == 0:
        # Times may have been truncated by a tar round trip: look at the content.
        if stat.S_ISLNK(s1.st_mode):
            return os.readlink(f1.full) == os.readlink(f2.full)
        if s1.st_size == 0:
            return True
        return _same_content(f1.full, f2.full)
    return n1 == n2


def _same_content(p1: str, p2: str) -> bool:
    with open(p1, "rb") as a, open(p2, "rb") as b:
        while True:
            c1, c2 = a.read(_COPY_CHUNK), b.read(_COPY_CHUNK)
            if c1 != c2:
                return False
            if not c1:
                return True


def _capability(path: str) -> bytes | None:
    try:
        return os.getxattr(path, _CAPABILITY, follow_symlinks=False)
    except OSError:
        return None


# -- the tar ----------------------------------------------------------------------------


class _ChangeWriter:
    def __init__(self, out: ByteSink, source: str) -> None:
        # Stream mode ("w|") only ever calls write(); typeshed's tarfile asks every
        # fileobj for read/seek/tell too.
        self._tar = tarfile.open(  # type: ignore[call-overload]
            fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
            encoding="utf-8", errors="surrogateescape")
        self._source = source
        self._whiteout_time = int(time.time())
        self._added_dirs: set[str] = set()
        self._inode_source: dict[tuple[int, int], str] = {}
        self._inode_refs: dict[tuple[int, int], list[str]] = {}

    def close(self) -> None:
        self._tar.close()

    def handle(self, kind: str, entry: _Entry) -> None:
        if kind == "delete":
            parent, _, base = entry.path.rpartition("/")
            info = tarfile.TarInfo(f"{parent}/{WHITEOUT_PREFIX}{base}".lstrip("/"))
            info.mtime = self._whiteout_time
            info.mode = 0
            self._include_parents(info.name, is_dir=False)
            self._tar.addfile(info)
            return
        self._write(kind, entry.path, entry.st, entry.full)

    def _write(self, kind: str, path: str, st: os.stat_result, full: str) -> None:
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return  # sockets do not travel in layers
        name = path.lstrip("/")
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = st.st_mtime_ns // 1_000_000_000
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(full)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            info.type = tarfile.REGTYPE
            info.size = st.st_size

        extra_links: list[str] = []
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            inode = (st.st_dev, st.st_ino)
            source = self._inode_source.get(inode)
            if source is not None:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, source, 0
            elif kind == "unmodified":
                # Unchanged, but a changed path may link to it later.
                self._inode_refs.setdefault(inode, []).append(name)
                return
            else:
                self._inode_source[inode] = name
                extra_links = self._inode_refs.pop(inode, [])
        elif kind == "unmodified":
            return

        capability = _capability(full)
        if capability:
            info.pax_headers = {
                "SCHILY.xattr." + _CAPABILITY: capability.decode("utf-8", "surrogateescape")
            }
        self._include_parents(name, is_dir=info.type == tarfile.DIRTYPE)
        if info.type == tarfile.REGTYPE and info.size:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as data:
                self._tar.addfile(info, data)
        else:
            self._tar.addfile(info)
        for extra in extra_links:
            link = tarfile.TarInfo(extra)
            link.type, link.linkname = tarfile.LNKTYPE, name
            link.mode, link.uid, link.gid, link.mtime = info.mode, info.uid, info.gid, info.mtime
            self._include_parents(extra, is_dir=False)
            self._tar.addfile(link)

    def _include_parents(self, name: str, *, is_dir: bool) -> None:
        name = name.rstrip("/")
        parent = os.path.dirname(name)
        if parent and parent not in self._added_dirs:
            self._added_dirs.add(parent)
            full = os.path.join(self._source, parent)
            self._write("modify", "/" + parent, os.stat(full), full)
        if is_dir:
            self._added_dirs.add(name)
