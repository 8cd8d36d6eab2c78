"""Mounting containerd Mounts (type, source, options) through mount(2) and umount2(2).

The option handling is containerd's (``mount/mount_linux.go``): flag words such as
``ro``, ``rbind`` or ``nosuid`` become MS_* flags, everything else is filesystem data
(``lowerdir=...``), and a read-only bind mount takes a second, remounting call because
the kernel ignores MS_RDONLY on the first. Turning a Mount into syscalls is pure
(:func:`plan`), so the sequence is tested without root; :func:`mount` only runs it.

An overlay whose options approach the page size (many layers) is mounted with relative
lowerdirs from the layers' common parent, as containerd does (the kernel takes at most
one page of mount data): containerd forks a child for that, berth uses a thread with
its own working directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from berth.core import errdefs
from berth.core.mountflags import (  # re-exported: callers use these as <module>.MS_*
    MNT_DETACH as MNT_DETACH,
    MNT_FORCE as MNT_FORCE,
    MS_BIND as MS_BIND,
    MS_DIRSYNC as MS_DIRSYNC,
    MS_MANDLOCK as MS_MANDLOCK,
    MS_NOATIME as MS_NOATIME,
    MS_NODEV as MS_NODEV,
    MS_NODIRATIME as MS_NODIRATIME,
    MS_NOEXEC as MS_NOEXEC,
    MS_NOSUID as MS_NOSUID,
    MS_PRIVATE as MS_PRIVATE,
    MS_RDONLY as MS_RDONLY,
    MS_REC as MS_REC,
    MS_RELATIME as MS_RELATIME,
    MS_REMOUNT as MS_REMOUNT,
    MS_SHARED as MS_SHARED,
    MS_SILENT as MS_SILENT,
    MS_SLAVE as MS_SLAVE,
    MS_STRICTATIME as MS_STRICTATIME,
    MS_SYNCHRONOUS as MS_SYNCHRONOUS,
    MS_UNBINDABLE as MS_UNBINDABLE,
    PROPAGATION as PROPAGATION,
)
from berth.core.oci.libc import load_libc

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# (clear, flag): "clear" options switch a flag off (``rw`` clears MS_RDONLY).
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
    # Propagation, as later containerd releases and runc accept them.
    "shared": (False, MS_SHARED),
    "rshared": (False, MS_SHARED | MS_REC),
    "private": (False, MS_PRIVATE),
    "rprivate": (False, MS_PRIVATE | MS_REC),
    "slave": (False, MS_SLAVE),
    "rslave": (False, MS_SLAVE | MS_REC),
    "unbindable": (False, MS_UNBINDABLE),
    "runbindable": (False, MS_UNBINDABLE | MS_REC),
}


@dataclass
class Mount:
    """containerd's mount.Mount: what to mount, and how; the target is the caller's."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)

    def to_proto(self) -> Any:
        from berth.core.api.containerd.types import Mount as ApiMount

        return ApiMount(type=self.type, source=self.source, options=list(self.options))

    @classmethod
    def from_proto(cls, m: Any) -> Mount:
        return cls(type=m.type, source=m.source, options=list(m.options))


@dataclass(frozen=True)
class ParsedOptions:
    flags: int
    data: str
    loop: bool


@dataclass(frozen=True)
class MountCall:
    """One mount(2) call; ``chdir`` set means "with relative paths from that directory"."""

    source: str
    target: str
    fstype: str
    flags: int
    data: str
    chdir: str = ""


def parse_options(options: Iterable[str]) -> ParsedOptions:
    flags, data, loop = 0, [], False
    for o in options:
        known = _FLAGS.get(o)
        if known is not None and known[1] != 0:
            clear, flag = known
            flags = flags & ~flag if clear else flags | flag
        elif o == "loop":
            loop = True
        elif known is None:
            data.append(o)
    return ParsedOptions(flags, ",".join(data), loop)


def _common_prefix(strs: Sequence[str]) -> str:
    lo, hi = min(strs), max(strs)
    for i, (a, b) in enumerate(zip(lo, hi, strict=False)):
        if a != b:
            return lo[:i]
    return lo


def compact_lowerdir(options: Sequence[str]) -> tuple[str, list[str]]:
    """Move the lowerdirs' common parent out of the options: (chdir, new options).

    The lowerdir option moves to the end, as containerd does; nothing changes when
    there is no common parent below "/".
    """
    idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if idx == -1:
        return "", list(options)
    dirs = options[idx].removeprefix("lowerdir=").split(":")
    if len(dirs) == 1:
        return "", list(options)
    common = _common_prefix(dirs)
    if not common:
        return "", list(options)
    common = os.path.dirname(common)
    if common in ("/", ""):
        return "", list(options)
    common += "/"
    out = [o for i, o in enumerate(options) if i != idx]
    out.append("lowerdir=" + ":".join(d[len(common):] for d in dirs))
    return common, out


def plan(m: Mount, target: str) -> list[MountCall]:
    """The mount(2) calls that mount ``m`` on ``target``, in order."""
    if m.type.startswith(("fuse.", "fuse3.")):
        raise errdefs.NotImplemented_(f"mount type {m.type} needs a helper binary")
    chdir, options = "", list(m.options)
    if m.type == "overlay" and sum(len(o) for o in options) >= PAGE_SIZE - 512:
        chdir, options = compact_lowerdir(options)
    parsed = parse_options(options)
    if parsed.loop:
        raise errdefs.NotImplemented_("loop mounts")
    if len(parsed.data) > PAGE_SIZE:
        raise errdefs.InvalidArgument("mount options is too long", raw=True)
    flags = parsed.flags
    oflags = flags & ~PROPAGATION
    calls = []
    if not flags & MS_REMOUNT or parsed.data:
        calls.append(MountCall(m.source, target, m.type, oflags, parsed.data, chdir))
    if flags & PROPAGATION:
        pflags = flags & (PROPAGATION | MS_REC | MS_SILENT)
        calls.append(MountCall("", target, "", pflags, ""))
    if oflags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        # The kernel ignores MS_RDONLY when it creates a bind mount.
        calls.append(MountCall("", target, "", oflags | MS_REMOUNT, ""))
    return calls


def readonly(mounts: Iterable[Mount]) -> list[Mount]:
    """The same mounts made read-only (an overlay's upperdir becomes its top lowerdir)."""
    out = []
    for m in mounts:
        if m.type == "overlay":
            opts, upper = [], ""
            for o in m.options:
                if o.startswith("upperdir="):
                    upper = o.removeprefix("upperdir=")
                elif not o.startswith("workdir="):
                    opts.append(o)
            if upper:
                opts = [
                    f"lowerdir={upper}:{o.removeprefix('lowerdir=')}"
                    if o.startswith("lowerdir=") else o
                    for o in opts
                ]
            out.append(Mount(m.type, m.source, opts))
        else:
            out.append(Mount(m.type, m.source,
                             [o for o in m.options if o not in ("rw", "ro")] + ["ro"]))
    return out


# --------------------------------------------------------------------------- syscalls

# Function pointers of their own (``libc[name]``): the shared libc's attributes carry
# argtypes other modules set.
_libc = load_libc()
_mount = _libc["mount"]
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p]
_umount2 = _libc["umount2"]
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_unshare = _libc["unshare"]
_unshare.argtypes = [ctypes.c_int]
CLONE_FS = 0x00000200


def _b(s: str) -> bytes | None:
    return s.encode() if s else None


def _mount_from(call: MountCall) -> int:
    """mount(2) with relative paths taken from ``call.chdir``; 0 or an errno.

    The working directory is shared by every thread, so the call runs in a thread of
    its own that first unshares its filesystem context (CLONE_FS) and then changes
    directory: no other thread sees the change, and no child process is made (a shim's
    reaper would collect a child's exit before we could).
    """
    result = [0]

    def run() -> None:
        try:
            if _unshare(CLONE_FS) != 0:
                result[0] = ctypes.get_errno() or errno.EPERM
                return
            os.chdir(call.chdir)
            if _mount(_b(call.source), _b(call.target), _b(call.fstype), call.flags,
                           _b(call.data)) != 0:
                result[0] = ctypes.get_errno() or errno.EIO
        except OSError as e:
            result[0] = e.errno or errno.EIO

    t = threading.Thread(target=run, name="mount-chdir")
    t.start()
    t.join()
    return result[0]


def syscall(call: MountCall) -> None:
    """Run one mount(2); OSError on failure."""
    if call.chdir:
        err = _mount_from(call)
        if err:
            raise OSError(err, os.strerror(err), call.target)
        return
    if _mount(_b(call.source), _b(call.target), _b(call.fstype), call.flags,
                   _b(call.data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), call.target)


def mount(m: Mount, target: str | os.PathLike[str]) -> None:
    for call in plan(m, os.fspath(target)):
        syscall(call)


def mount_all(mounts: Iterable[Mount], target: str | os.PathLike[str]) -> None:
    for m in mounts:
        mount(m, target)


def unmount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2 once, retrying while busy; "not mounted" (EINVAL) is not an error."""
    path = os.fsencode(target)
    for _ in range(50):
        if _umount2(path, flags) == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EINVAL:
            return
        if e != errno.EBUSY:
            raise OSError(e, os.strerror(e), os.fsdecode(path))
        time.sleep(0.05)
    raise OSError(errno.EBUSY, f"failed to unmount target {os.fsdecode(path)}")


def unmount_all(target: str | os.PathLike[str], flags: int = 0) -> None:
    """Unmount everything stacked on ``target``, until the kernel says nothing is."""
    path = os.fsencode(target)
    if not os.path.exists(path):
        return
    while True:
        if _umount2(path, flags) != 0:
            e = ctypes.get_errno()
            if e == errno.EINVAL:
                return
            if e == errno.EBUSY:
                unmount(target, flags)  # retries, then raises
                continue
            raise OSError(e, os.strerror(e), os.fsdecode(path))


def temp_location() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()


@contextlib.contextmanager
def mounted(mounts: Sequence[Mount], *, read_only: bool = False,
            parent: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Mount on a fresh temporary directory; unmount and remove it on the way out."""
    root = tempfile.mkdtemp(prefix="berth-mount", dir=parent or temp_location())
    try:
        try:
            mount_all(readonly(mounts) if read_only else mounts, root)
        except BaseException:
            unmount_all(root)
            raise
        yield Path(root)
        unmount_all(root)
    except BaseException:
        # Do not leave a mount behind because the body failed.
        with contextlib.suppress(OSError):
            unmount_all(root, MNT_DETACH)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(root)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountpoints(prefix: str | os.PathLike[str] | None = None) -> list[str]:
    """Mount points of this mount namespace (from /proc/self/mountinfo), under ``prefix``."""
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split(" ")[4]) for line in f if line.strip()]
    if prefix is None:
        return points
    p = os.fspath(prefix).rstrip("/")
    return [m for m in points if m == p or m.startswith(p + "/")]
