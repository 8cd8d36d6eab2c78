"""Root filesystem set-up: propagation, spec mounts, pivot_root, masked and read-only paths.

Every function takes the ``Syscalls`` object first; paths are resolved inside the rootfs
with ``secure_join`` so a symlink in an image cannot send a mount outside of it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

from berth.plugins.runtimes.inprocess import syscalls as sys_
from berth.plugins.runtimes.inprocess.spec import Container, Mount

_O_DIR = os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC
# flags a bind remount must keep when the kernel locked them (user namespaces)
_LOCKABLE = (sys_.MS_NOSUID | sys_.MS_NODEV | sys_.MS_NOEXEC | sys_.MS_NOATIME
             | sys_.MS_NODIRATIME | sys_.MS_RELATIME | sys_.MS_RDONLY)
_FS_FLAGS_MASK = ~(sys_.MS_BIND | sys_.MS_REC | sys_.MS_REMOUNT | sys_.PROPAGATION_FLAGS)


def secure_join(sc: sys_.Syscalls, root: str, unsafe: str, *, max_links: int = 255) -> str:
    """``root``/``unsafe`` with every symlink resolved as if ``root`` were ``/``."""
    parts = deque(unsafe.split("/"))
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join([*resolved, part])
        st = sc.lstat(candidate)
        if st is None or not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > max_links:
            raise OSError(errno.ELOOP, f"too many symlinks resolving {unsafe!r}")
        target = sc.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        parts.extendleft(reversed(target.split("/")))
    return root.rstrip("/") + "/" + "/".join(resolved) if resolved else root


def mkdir_all(sc: sys_.Syscalls, root: str, path: str, mode: int = 0o755) -> None:
    """Create ``path`` (already resolved, inside ``root``) and its missing parents."""
    rel = os.path.relpath(path, root)
    if rel == ".":
        return
    current = root
    for part in rel.split("/"):
        current = current.rstrip("/") + "/" + part
        st = sc.lstat(current)
        if st is None:
            try:
                sc.mkdir(current, mode)
            except FileExistsError:
                pass
        elif not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, f"{current} is not a directory")


def _remount(sc: sys_.Syscalls, target: str, flags: int, root: str | None = None) -> None:
    """A bind remount with ``flags``; on EPERM retry keeping the flags the kernel locked.
    With ``root``, ``target`` is reached only inside it (see ``Syscalls.mount_in_root``)."""
    flags |= sys_.MS_REMOUNT | sys_.MS_BIND

    def mount(f: int) -> None:
        if root is None:
            sc.mount("", target, "", f, "")
        else:
            sc.mount_in_root(root, "", target, "", f, "")

    try:
        mount(flags)
    except PermissionError:
        mount(flags | (sc.mount_flags(target) & _LOCKABLE))


def remount_readonly(sc: sys_.Syscalls, target: str) -> None:
    flags = sys_.MS_BIND | sys_.MS_REMOUNT | sys_.MS_RDONLY
    sc.mount("", target, "", flags | (sc.mount_flags(target) & _LOCKABLE), "")


def prepare_root(sc: sys_.Syscalls, c: Container) -> None:
    """Stop mount events from reaching the host, then make the rootfs a mount point."""
    sc.mount("", "/", "", c.rootfs_propagation or (sys_.MS_SLAVE | sys_.MS_REC), "")
    if c.rootfs_propagation & sys_.MS_SHARED:
        # pivot_root refuses a new root whose parent mount is shared.
        parent = _mount_point_of(sc, os.path.dirname(c.rootfs))
        sc.mount("", parent, "", sys_.MS_PRIVATE, "")
    sc.mount(c.rootfs, c.rootfs, "bind", sys_.MS_BIND | sys_.MS_REC, "")


def _mount_point_of(sc: sys_.Syscalls, path: str) -> str:
    best = "/"
    for line in sc.read_file("/proc/self/mountinfo").splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        mp = fields[4].replace("\\040", " ")
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
            best = mp
    return best


def mount_one(sc: sys_.Syscalls, c: Container, m: Mount,
              cgroup_binds: list[tuple[str, str]]) -> bool:
    """Mount ``m`` under the rootfs. Returns True when a read-only remount is deferred
    (a read-only /dev gets its device nodes first).

    As runc does, a bind source is a host path whose symlinks are followed (Debian's
    /lib is a link to usr/lib), and the destination is resolved inside the rootfs: a
    symlink in the image (to /, to ../..) cannot take a mount out of it, neither when
    the path is resolved nor when it is mounted on (``Syscalls.mount_in_root``)."""
    dest = secure_join(sc, c.rootfs, m.destination)
    root = c.rootfs
    if m.type in ("cgroup", "cgroup2") and not m.bind:
        _mount_cgroup(sc, c, m, dest, cgroup_binds)
        return False
    if m.bind:
        source = sc.resolve(m.source)
        src = sc.lstat(source)
        if src is None:
            raise OSError(errno.ENOENT, f"bind mount source {m.source!r} does not exist")
        if stat.S_ISDIR(src.st_mode):
            mkdir_all(sc, c.rootfs, dest)
        else:
            mkdir_all(sc, c.rootfs, os.path.dirname(dest))
            if sc.lstat(dest) is None:
                sc.touch(dest)
        sc.mount_in_root(root, source, dest, "bind", m.flags & (sys_.MS_BIND | sys_.MS_REC),
                         "")
        extra = m.flags & _FS_FLAGS_MASK
        if extra:
            _remount(sc, dest, extra, root)
    else:
        mkdir_all(sc, c.rootfs, dest)
        flags = m.flags
        deferred = False
        if m.destination == "/dev" and flags & sys_.MS_RDONLY:
            flags &= ~sys_.MS_RDONLY
            deferred = True
        try:
            sc.mount_in_root(root, m.source or m.type, dest, m.type, flags, m.data)
        except OSError as e:
            if m.type == "mqueue" and e.errno in (errno.EPERM, errno.ENODEV):
                return False  # no private ipc namespace: keep the image's directory
            raise
        for p in m.propagation:
            sc.mount_in_root(root, "", dest, "", p, "")
        return deferred
    for p in m.propagation:
        sc.mount_in_root(root, "", dest, "", p, "")
    return False


def _mount_cgroup(sc: sys_.Syscalls, c: Container, m: Mount, dest: str,
                  binds: list[tuple[str, str]]) -> None:
    """The container sees its own cgroup directories, bound from the host.

    cgroup v2 (``binds`` is one entry named ""): the container's directory on ``dest``.
    v1: a tmpfs on ``dest`` with one bound directory per hierarchy, then made read-only
    as the spec asks.
    """
    readonly = bool(m.flags & sys_.MS_RDONLY)
    flags = m.flags & ~sys_.MS_RDONLY & _FS_FLAGS_MASK
    mkdir_all(sc, c.rootfs, dest)
    if len(binds) == 1 and binds[0][0] == "":
        sc.mount(binds[0][1], dest, "bind", sys_.MS_BIND, "")
        _remount(sc, dest, flags | (sys_.MS_RDONLY if readonly else 0))
        return
    sc.mount("tmpfs", dest, "tmpfs", flags, "mode=755")
    for name, host_dir in binds:
        target = dest + "/" + name
        if sc.lstat(target) is None:
            sc.mkdir(target, 0o755)
        sc.mount(host_dir, target, "bind", sys_.MS_BIND, "")
        _remount(sc, target, flags | (sys_.MS_RDONLY if readonly else 0))
    if readonly:
        sc.mount("", dest, "", sys_.MS_REMOUNT | sys_.MS_RDONLY | flags, "mode=755")


def pivot_root(sc: sys_.Syscalls, rootfs: str) -> None:
    """Make ``rootfs`` the root, leaving no path to the host's root behind.

    pivot_root(".", ".") stacks the old root on top of the new one; detaching it after
    making it a slave keeps the unmount from propagating to the host. On a root that
    cannot be pivoted (initramfs) fall back to MS_MOVE + chroot.
    """
    old = sc.open("/", _O_DIR)
    try:
        new = sc.open(rootfs, _O_DIR)
        try:
            sc.fchdir(new)
            try:
                sc.pivot_root(".", ".")
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                sc.mount(rootfs, "/", "", sys_.MS_MOVE, "")
                sc.chroot(".")
                sc.chdir("/")
                return
            sc.fchdir(old)
            sc.mount("", ".", "", sys_.MS_SLAVE | sys_.MS_REC, "")
            sc.umount2(".", sys_.MNT_DETACH)
            sc.chdir("/")
        finally:
            sc.close(new)
    finally:
        sc.close(old)


def readonly_paths(sc: sys_.Syscalls, paths: list[str]) -> None:
    for p in paths:
        if sc.lstat(p) is None:
            continue
        sc.mount(p, p, "", sys_.MS_BIND | sys_.MS_REC, "")
        remount_readonly(sc, p)


def mask_paths(sc: sys_.Syscalls, paths: list[str]) -> None:
    """Directories get an empty read-only tmpfs, files get /dev/null bound over them."""
    for p in paths:
        st = sc.lstat(p)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            sc.mount("tmpfs", p, "tmpfs", sys_.MS_RDONLY, "")
        else:
            sc.mount("/dev/null", p, "", sys_.MS_BIND, "")
