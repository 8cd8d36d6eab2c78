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

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from berth.core import nspin

T = TypeVar("T")
_in_thread = nspin.in_fresh_thread


def _lo_up() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def create(path: Path, *, loopback_up: bool = True) -> None:
    """Make a new network namespace pinned at ``path`` (which must not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    nspin.placeholder(path)

    def make() -> None:
        nspin.unshare(nspin.CLONE_NEWNET, "network namespace")
        nspin.pin_own("net", path)
        if loopback_up:
            _lo_up()

    try:
        _in_thread(make, "netns")
    except BaseException:
        remove(path)
        raise


def remove(path: Path) -> None:
    """Unpin and delete; a path that is gone or was never mounted is no error."""
    nspin.unpin(path)


def is_netns(path: Path | str) -> bool:
    """Whether ``path`` is a pinned network namespace (nsfs), not a plain file."""
    return nspin.is_pinned(path, "net")


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
