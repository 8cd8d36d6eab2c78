"""The narrow syscall layer: the only module of the runtime that calls libc (via ctypes).

Everything the container set-up does to the kernel goes through a ``Syscalls`` object so
that ``steps`` can run against a recording fake in unit tests. Methods raise ``OSError``
with the errno and the call in the message. This module is imported before any fork and
binds every libc function eagerly: the forked child must not import or load anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import socket
import struct
from collections.abc import Callable
from typing import Protocol

from berth.core.mountflags import (  # re-exported: callers use these as <module>.MS_*
    MNT_DETACH as MNT_DETACH,
    MS_BIND as MS_BIND,
    MS_DIRSYNC as MS_DIRSYNC,
    MS_LAZYTIME as MS_LAZYTIME,
    MS_MANDLOCK as MS_MANDLOCK,
    MS_MOVE as MS_MOVE,
    MS_NOATIME as MS_NOATIME,
    MS_NODEV as MS_NODEV,
    MS_NODIRATIME as MS_NODIRATIME,
    MS_NOEXEC as MS_NOEXEC,
    MS_NOSUID as MS_NOSUID,
    MS_NOSYMFOLLOW as MS_NOSYMFOLLOW,
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
)
from berth.core.oci.libc import load_libc

# clone/unshare/setns flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

PROPAGATION_FLAGS = MS_SHARED | MS_SLAVE | MS_PRIVATE | MS_UNBINDABLE

# prctl options
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SECCOMP_SET_MODE_FILTER = 1
_CLOSE_RANGE_CLOEXEC = 1 << 2

_SYSCALL_NUMBERS = {
    # name: (x86_64, aarch64)
    "pivot_root": (155, 41),
    "seccomp": (317, 277),
    "close_range": (436, 436),
    "openat2": (437, 437),
}
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_ARCH_INDEX = {"x86_64": 0, "aarch64": 1}

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_TIOCSPTLCK = 0x40045431
_TIOCGPTN = 0x80045430
_TIOCSCTTY = 0x540E

# statvfs f_flag bits -> mount flags (ST_RELATIME differs from MS_RELATIME)
_ST_TO_MS = (
    (os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC), (os.ST_SYNCHRONOUS, MS_SYNCHRONOUS),
    (os.ST_MANDLOCK, MS_MANDLOCK), (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME),
)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class _Rlimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _bind(libc: ctypes.CDLL, name: str, restype: type, *argtypes: type) -> Callable[..., int]:
    fn = getattr(libc, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


class Syscalls(Protocol):
    """What the container set-up asks of the kernel: :class:`LibcSyscalls` does it, the unit
    tests record it with a fake."""

    def unshare(self, flags: int) -> None: ...
    def setns(self, fd: int, nstype: int) -> None: ...
    def fork(self) -> int: ...
    def getpid(self) -> int: ...
    def setsid(self) -> None: ...
    def exit(self, code: int) -> None: ...
    def execve(self, path: str | int, args: list[str], env: dict[str, str]) -> None: ...
    def waitpid(self, pid: int, options: int) -> tuple[int, int]: ...
    def kill(self, pid: int, sig: int) -> None: ...
    def prctl(self, option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int: ...
    def set_no_new_privs(self) -> None: ...
    def set_keepcaps(self, keep: bool) -> None: ...
    def set_dumpable(self, dumpable: bool) -> None: ...
    def set_pdeathsig(self, sig: int) -> None: ...
    def set_child_subreaper(self) -> None: ...
    def is_child_subreaper(self) -> bool: ...
    def cap_bound_drop(self, cap: int) -> None: ...
    def cap_ambient_raise(self, cap: int) -> None: ...
    def cap_ambient_clear(self) -> None: ...
    def capset(self, effective: int, permitted: int, inheritable: int) -> None: ...
    def capget(self) -> tuple[int, int, int]: ...
    def setgroups(self, gids: list[int]) -> None: ...
    def setresgid(self, gid: int) -> None: ...
    def setresuid(self, uid: int) -> None: ...
    def setrlimit(self, resource: int, soft: int, hard: int) -> None: ...
    def umask(self, mask: int) -> None: ...
    def sethostname(self, name: str) -> None: ...
    def setdomainname(self, name: str) -> None: ...
    def seccomp_set_filter(self, bpf: bytes, flags: int) -> None: ...
    def open(self, path: str, flags: int, mode: int = 0o777) -> int: ...
    def close(self, fd: int) -> None: ...
    def dup2(self, fd: int, fd2: int) -> None: ...
    def dup_above(self, fd: int, lowest: int) -> int: ...
    def write(self, fd: int, data: bytes) -> None: ...
    def cloexec_from(self, lowest: int) -> None: ...
    def close_fds_except(self, keep: set[int]) -> None: ...
    def send_fd(self, sock_fd: int, fd: int, name: str) -> None: ...
    def loopback_up(self) -> None: ...
    def open_pty(self, ptmx: str) -> tuple[int, str]: ...
    def set_ctty(self, fd: int) -> None: ...
    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None: ...
    def open_in_root(self, root: str, path: str) -> int: ...
    def mount_in_root(self, root: str, source: str | None, target: str, fstype: str | None,
                      flags: int, data: str | None = None) -> None: ...
    def resolve(self, path: str) -> str: ...
    def umount2(self, target: str, flags: int) -> None: ...
    def pivot_root(self, new_root: str, put_old: str) -> None: ...
    def chroot(self, path: str) -> None: ...
    def chdir(self, path: str) -> None: ...
    def fchdir(self, fd: int) -> None: ...
    def mkdir(self, path: str, mode: int = 0o755) -> None: ...
    def touch(self, path: str, mode: int = 0o644) -> None: ...
    def mknod(self, path: str, mode: int, device: int) -> None: ...
    def chown(self, path: str, uid: int, gid: int) -> None: ...
    def chmod(self, path: str, mode: int) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def write_file(self, path: str, data: str) -> None: ...
    def read_file(self, path: str) -> str: ...
    def lstat(self, path: str) -> os.stat_result | None: ...
    def readlink(self, path: str) -> str: ...
    def mount_flags(self, path: str) -> int: ...
    def read_head(self, path: str, size: int) -> bytes: ...
    def executable(self, path: str) -> bool: ...


class LibcSyscalls:
    """Real syscalls."""

    def __init__(self) -> None:
        libc = load_libc()
        c_int, c_ulong, c_char_p, c_void_p = (ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p,
                                               ctypes.c_void_p)
        c_long = ctypes.c_long
        self._mount = _bind(libc, "mount", c_int, c_char_p, c_char_p, c_char_p, c_ulong,
                            c_char_p)
        self._umount2 = _bind(libc, "umount2", c_int, c_char_p, c_int)
        self._unshare = _bind(libc, "unshare", c_int, c_int)
        self._setns = _bind(libc, "setns", c_int, c_int, c_int)
        self._sethostname = _bind(libc, "sethostname", c_int, c_char_p, ctypes.c_size_t)
        self._setdomainname = _bind(libc, "setdomainname", c_int, c_char_p, ctypes.c_size_t)
        self._prctl = _bind(libc, "prctl", c_int, c_int, c_ulong, c_ulong, c_ulong, c_ulong)
        self._capset = _bind(libc, "capset", c_int, c_void_p, c_void_p)
        self._capget = _bind(libc, "capget", c_int, c_void_p, c_void_p)
        self._prlimit = _bind(libc, "prlimit", c_int, c_int, c_int, c_void_p, c_void_p)
        self._syscall = libc.syscall
        self._syscall.restype = c_long
        arch = _ARCH_INDEX.get(platform.machine())
        self._nr = {name: nrs[arch] if arch is not None else -1
                    for name, nrs in _SYSCALL_NUMBERS.items()}

    # ---- helpers --------------------------------------------------------------------
    @staticmethod
    def _check(rc: int, what: str) -> int:
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return rc

    # ---- namespaces and processes ---------------------------------------------------
    def unshare(self, flags: int) -> None:
        self._check(self._unshare(flags), f"unshare({flags:#x})")

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self._setns(fd, nstype), f"setns({fd}, {nstype:#x})")

    def fork(self) -> int:
        return os.fork()

    def getpid(self) -> int:
        return os.getpid()

    def setsid(self) -> None:
        os.setsid()

    def exit(self, code: int) -> None:
        os._exit(code)

    def execve(self, path: str | int, args: list[str], env: dict[str, str]) -> None:
        """``path`` may be an fd (fexecve: execveat with AT_EMPTY_PATH)."""
        os.execve(path, args, env)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        return os.waitpid(pid, options)

    def kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    # ---- prctl and credentials ------------------------------------------------------
    def prctl(self, option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
        return self._check(self._prctl(option, a2, a3, a4, a5), f"prctl({option})")

    def set_no_new_privs(self) -> None:
        self.prctl(PR_SET_NO_NEW_PRIVS, 1)

    def set_keepcaps(self, keep: bool) -> None:
        self.prctl(PR_SET_KEEPCAPS, 1 if keep else 0)

    def set_dumpable(self, dumpable: bool) -> None:
        self.prctl(PR_SET_DUMPABLE, 1 if dumpable else 0)

    def set_pdeathsig(self, sig: int) -> None:
        self.prctl(PR_SET_PDEATHSIG, sig)

    def set_child_subreaper(self) -> None:
        self.prctl(PR_SET_CHILD_SUBREAPER, 1)

    def is_child_subreaper(self) -> bool:
        flag = ctypes.c_int(0)
        self.prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(flag))
        return bool(flag.value)

    def cap_bound_drop(self, cap: int) -> None:
        self.prctl(PR_CAPBSET_DROP, cap)

    def cap_ambient_raise(self, cap: int) -> None:
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)

    def cap_ambient_clear(self) -> None:
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for i in range(2):
            shift = 32 * i
            data[i].effective = (effective >> shift) & 0xFFFFFFFF
            data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
            data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
        self._check(self._capset(ctypes.byref(header), ctypes.byref(data)), "capset")

    def capget(self) -> tuple[int, int, int]:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        self._check(self._capget(ctypes.byref(header), ctypes.byref(data)), "capget")
        e = data[0].effective | (data[1].effective << 32)
        p = data[0].permitted | (data[1].permitted << 32)
        i = data[0].inheritable | (data[1].inheritable << 32)
        return e, p, i

    def setgroups(self, gids: list[int]) -> None:
        os.setgroups(gids)

    def setresgid(self, gid: int) -> None:
        os.setresgid(gid, gid, gid)

    def setresuid(self, uid: int) -> None:
        os.setresuid(uid, uid, uid)

    def setrlimit(self, resource: int, soft: int, hard: int) -> None:
        new = _Rlimit(soft, hard)
        self._check(self._prlimit(0, resource, ctypes.byref(new), None),
                    f"setrlimit({resource}, {soft}, {hard})")

    def umask(self, mask: int) -> None:
        os.umask(mask)

    def sethostname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._sethostname(raw, len(raw)), "sethostname")

    def setdomainname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._setdomainname(raw, len(raw)), "setdomainname")

    def seccomp_set_filter(self, bpf: bytes, flags: int) -> None:
        """Install a classic-BPF program (8-byte instructions) as the seccomp filter."""
        buf = ctypes.create_string_buffer(bpf, len(bpf))
        prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
        self._check(self._syscall(ctypes.c_long(self._nr["seccomp"]),
                                  ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
                                  ctypes.c_long(flags), ctypes.byref(prog)), "seccomp")

    # ---- file descriptors -----------------------------------------------------------
    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def dup2(self, fd: int, fd2: int) -> None:
        os.dup2(fd, fd2, inheritable=True)

    def dup_above(self, fd: int, lowest: int) -> int:
        """A close-on-exec copy of ``fd`` numbered ``lowest`` or higher."""
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)

    def write(self, fd: int, data: bytes) -> None:
        while data:
            n = os.write(fd, data)
            data = data[n:]

    def cloexec_from(self, lowest: int) -> None:
        """Mark every fd >= ``lowest`` close-on-exec: nothing of the shim leaks into a
        container process (close_range with CLOSE_RANGE_CLOEXEC, else close them)."""
        rc = self._syscall(ctypes.c_long(self._nr["close_range"]), ctypes.c_uint(lowest),
                           ctypes.c_uint(0xFFFFFFFF), ctypes.c_uint(_CLOSE_RANGE_CLOEXEC))
        if rc < 0:
            os.closerange(lowest, os.sysconf("SC_OPEN_MAX"))

    def close_fds_except(self, keep: set[int]) -> None:
        """Close every fd but ``keep`` (close_range over the gaps, as CPython's closerange
        uses it)."""
        low = 0
        for fd in sorted(keep):
            if fd > low:
                os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 0x7FFFFFFF)

    def send_fd(self, sock_fd: int, fd: int, name: str) -> None:
        sock = socket.socket(fileno=sock_fd)
        try:
            socket.send_fds(sock, [name.encode()], [fd])
        finally:
            sock.detach()

    def loopback_up(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sH22x", b"lo", 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo",
                                                               flags | _IFF_UP))

    def open_pty(self, ptmx: str) -> tuple[int, str]:
        """Open a new pty from ``ptmx``; (master fd, slave path under the same devpts)."""
        master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
            n = struct.unpack("I", fcntl.ioctl(master, _TIOCGPTN, struct.pack("I", 0)))[0]
        except BaseException:
            os.close(master)
            raise
        return master, f"/dev/pts/{n}"

    def set_ctty(self, fd: int) -> None:
        fcntl.ioctl(fd, _TIOCSCTTY, 0)

    # ---- mounts and files -----------------------------------------------------------
    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        rc = self._mount(source.encode() if source is not None else None, target.encode(),
                         fstype.encode() if fstype is not None else None, flags,
                         data.encode() if data else None)
        self._check(rc, f"mount {source!r} on {target!r} ({fstype}, {flags:#x}, {data!r})")

    def open_in_root(self, root: str, path: str) -> int:
        """An O_PATH fd of ``path`` (a path under ``root``) opened with every symlink
        resolved as if ``root`` were ``/`` (openat2 RESOLVE_IN_ROOT): whatever changed in
        the tree since ``path`` was resolved, the fd cannot point outside of ``root``."""
        rel = os.path.relpath(path, root)
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0,
                           _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
            rc = self._syscall(ctypes.c_long(self._nr["openat2"]), ctypes.c_int(root_fd),
                               ctypes.c_char_p(rel.encode()), ctypes.byref(how),
                               ctypes.c_size_t(ctypes.sizeof(how)))
            if rc < 0 and ctypes.get_errno() == errno.ENOSYS:
                # Kernels before 5.6: the path was resolved inside root a moment ago;
                # refuse at least a symlink put in its place since.
                return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            return self._check(rc, f"openat2({root!r}, {rel!r})")
        finally:
            os.close(root_fd)

    def mount_in_root(self, root: str, source: str | None, target: str, fstype: str | None,
                      flags: int, data: str | None = None) -> None:
        """``mount`` on ``target`` (resolved under ``root``) through an fd that cannot
        leave ``root`` (see ``open_in_root``), as runc mounts through /proc/self/fd."""
        fd = self.open_in_root(root, target)
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
            expected = os.path.normpath(os.path.join(os.path.realpath(root),
                                                     os.path.relpath(target, root)))
            if where != expected:
                raise OSError(errno.EXDEV, f"mount target {target!r} moved to {where!r} "
                              "while it was set up")
            self.mount(source, f"/proc/self/fd/{fd}", fstype, flags, data)
        finally:
            os.close(fd)

    def resolve(self, path: str) -> str:
        """``path`` with every symlink followed (a host path: a bind mount's source)."""
        return os.path.realpath(path)

    def umount2(self, target: str, flags: int) -> None:
        self._check(self._umount2(target.encode(), flags), f"umount2({target!r})")

    def pivot_root(self, new_root: str, put_old: str) -> None:
        rc = self._syscall(ctypes.c_long(self._nr["pivot_root"]),
                           ctypes.c_char_p(new_root.encode()), ctypes.c_char_p(put_old.encode()))
        self._check(rc, f"pivot_root({new_root!r}, {put_old!r})")

    def chroot(self, path: str) -> None:
        os.chroot(path)

    def chdir(self, path: str) -> None:
        os.chdir(path)

    def fchdir(self, fd: int) -> None:
        os.fchdir(fd)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(path, mode)

    def touch(self, path: str, mode: int = 0o644) -> None:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, mode))

    def mknod(self, path: str, mode: int, device: int) -> None:
        os.mknod(path, mode, device)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(path, uid, gid)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, path)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def write_file(self, path: str, data: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_TRUNC)
        try:
            self.write(fd, data.encode())
        finally:
            os.close(fd)

    def read_file(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except FileNotFoundError:
            return None

    def readlink(self, path: str) -> str:
        return os.readlink(path)

    def mount_flags(self, path: str) -> int:
        """The MS_* flags of the mount ``path`` is on."""
        f = os.statvfs(path).f_flag
        return sum(ms for st, ms in _ST_TO_MS if f & st)

    def read_head(self, path: str, size: int) -> bytes:
        """The first ``size`` bytes of ``path``, or b"" when it cannot be read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return b""
        try:
            return os.read(fd, size)
        except OSError:
            return b""
        finally:
            os.close(fd)

    def executable(self, path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_mode & 0o170000) == 0o100000 and os.access(path, os.X_OK)


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))
