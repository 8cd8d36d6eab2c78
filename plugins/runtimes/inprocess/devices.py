"""/dev inside the container: default nodes, linux.devices, ptmx and the fd symlinks."""

from __future__ import annotations

import os
import stat
from typing import Any

from berth.plugins.runtimes.inprocess import syscalls as sys_
from berth.plugins.runtimes.inprocess.mounts import mkdir_all, secure_join
from berth.plugins.runtimes.inprocess.spec import Device

DEFAULT_DEVICES = [
    Device("/dev/null", "c", 1, 3),
    Device("/dev/zero", "c", 1, 5),
    Device("/dev/full", "c", 1, 7),
    Device("/dev/random", "c", 1, 8),
    Device("/dev/urandom", "c", 1, 9),
    Device("/dev/tty", "c", 5, 0),
]

#: device cgroup rules every container gets (as runc), after the spec's own rules
DEFAULT_ALLOW = [
    ("c", -1, -1, "m"), ("b", -1, -1, "m"),
    ("c", 1, 3, "rwm"), ("c", 1, 5, "rwm"), ("c", 1, 7, "rwm"), ("c", 1, 8, "rwm"),
    ("c", 1, 9, "rwm"), ("c", 5, 0, "rwm"), ("c", 5, 1, "rwm"), ("c", 5, 2, "rwm"),
    ("c", 136, -1, "rwm"),
]

SYMLINKS = [
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
]

_TYPE_BITS = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def all_devices(spec_devices: list[Device]) -> list[Device]:
    """The defaults, overridden by the spec's devices of the same path."""
    paths = {d.path for d in spec_devices}
    return [d for d in DEFAULT_DEVICES if d.path not in paths] + list(spec_devices)


def create_devices(sc: Any, rootfs: str, devices: list[Device], *, bind: bool) -> None:
    """mknod each device; in a user namespace (no mknod there) bind the host's node."""
    for d in devices:
        dest = secure_join(sc, rootfs, d.path)
        mkdir_all(sc, rootfs, os.path.dirname(dest))
        if bind:
            if sc.lstat(dest) is None:
                sc.touch(dest)
            sc.mount(d.path, dest, "bind", sys_.MS_BIND, "")
            continue
        if sc.lstat(dest) is not None:
            sc.unlink(dest)
        sc.mknod(dest, _TYPE_BITS[d.type] | (d.file_mode & 0o7777),
                 os.makedev(d.major, d.minor))
        sc.chmod(dest, d.file_mode & 0o7777)
        sc.chown(dest, d.uid, d.gid)


def setup_ptmx(sc: Any, rootfs: str) -> None:
    """/dev/ptmx points at the container's own devpts instance."""
    dest = rootfs + "/dev/ptmx"
    if sc.lstat(dest) is not None:
        sc.unlink(dest)
    sc.symlink("pts/ptmx", dest)


def setup_symlinks(sc: Any, rootfs: str, *, kcore: bool) -> None:
    links = list(SYMLINKS)
    if kcore:
        links.append(("/proc/kcore", "/dev/core"))
    for target, path in links:
        dest = rootfs + path
        if sc.lstat(dest) is None:
            sc.symlink(target, dest)


def ensure_dirs(sc: Any, rootfs: str) -> None:
    for d in ("/dev/pts", "/dev/shm"):
        mkdir_all(sc, rootfs, secure_join(sc, rootfs, d))
