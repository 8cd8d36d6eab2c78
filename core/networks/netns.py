"""Network namespaces that berth makes and pins, as containerd's netns package does.

A namespace is made by a thread of its own that unshares CLONE_NEWNET; its
``/proc/thread-self/ns/net`` is bind-mounted onto a file under the state dir, which keeps
the namespace alive without any process in it. The thread then ends, so no worker
thread of berthd ever stays in another namespace. Removing is unmount + unlink.
Netlink inside a namespace goes through pyroute2 from such a thread (``run_in``).
pyroute2 is imported by the functions that use it: it is a sixth of berthd's import time,
and serving the first call after a start needs no netlink.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from berth.core import mount
from berth.core.oci.libc import load_libc

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 0x2

_libc = load_libc()
_unshare = _libc["unshare"]
_unshare.argtypes = [ctypes.c_int]
_mount = _libc["mount"]
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p]

T = TypeVar("T")


def _in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that ends with it (so its namespace dies with it)."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller below
            err.append(e)

    t = threading.Thread(target=run, name="netns")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def _lo_up() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def create(path: Path, *, loopback_up: bool = True) -> None:
    """Make a new network namespace pinned at ``path`` (which must not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)

    def make() -> None:
        if _unshare(CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"unshare network namespace: {os.strerror(e)}")
        if _mount(b"/proc/thread-self/ns/net", os.fsencode(path), None, MS_BIND, None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pin network namespace at {path}: {os.strerror(e)}")
        if loopback_up:
            _lo_up()

    try:
        _in_thread(make)
    except BaseException:
        remove(path)
        raise


def remove(path: Path) -> None:
    """Unpin and delete; a path that is gone or was never mounted is no error."""
    try:
        mount.unmount(path, MNT_DETACH)
    except FileNotFoundError:
        pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def is_netns(path: Path | str) -> bool:
    """Whether ``path`` is a pinned network namespace (nsfs), not a plain file."""
    try:
        # Namespace files all live on the one nsfs: same device as our own.
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def is_own(path: Path | str) -> bool:
    """Whether ``path`` is the namespace this process runs in (the host's, for berthd)."""
    try:
        a, b = os.stat(path), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def run_in(path: Path | str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a thread that has entered the namespace at ``path``."""
    from pyroute2 import netns as pr_netns

    def enter() -> T:
        try:
            pr_netns.setns(os.fspath(path), flags=0)
        except OSError as e:
            raise OSError(e.errno or errno.EINVAL,
                          f"enter network namespace {path}: {e.strerror or e}") from None
        return fn()

    return _in_thread(enter)


def loopback_up(path: Path | str) -> None:
    run_in(path, _lo_up)


def links(path: Path | str) -> list[str]:
    """The names of the links inside the namespace at ``path``."""

    from pyroute2 import IPRoute

    def names() -> list[str]:
        with IPRoute() as ipr:
            return [str(link.get("ifname")) for link in ipr.get_links()]

    return run_in(path, names)
