"""Namespaces pinned by bind mounts, with no process in them (as containerd's netns package
and CRI-O's pinns keep them).

A short-lived thread unshares the namespaces, bind-mounts its ``/proc/thread-self/ns/KIND``
files onto files under berth's state dir, and ends, so no thread of berthd ever stays in
another namespace. Unpinning is unmount + unlink and is idempotent (a teardown may be
retried after a crash). Network namespaces (core/networks) and a CRI pod's IPC and UTS
namespaces (plugins/cri) are made this way; a CRI pod's PID namespace is pinned from its
holder process's ``/proc/PID/ns/pid`` (plugins/cri/pidns).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from berth.core import mount
from berth.core.oci.libc import load_libc

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
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


def check(rc: int, what: str) -> None:
    """Raise ``OSError`` worded ``what: strerror`` for a failed libc call."""
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def in_fresh_thread(fn: Callable[[], T], name: str = "nspin") -> T:
    """Run ``fn`` in a new thread that ends with it, so what it unshares dies with it."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller below
            err.append(e)

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def placeholder(path: Path) -> None:
    """The file a namespace is bind-mounted onto; ``path`` must not exist yet."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))


def unshare(flags: int, what: str) -> None:
    """unshare(2) for the calling thread (call it from ``in_fresh_thread``)."""
    check(_unshare(flags), f"unshare {what}")


def pin_own(kind: str, path: Path) -> None:
    """Bind-mount the calling thread's ``kind`` namespace (net, ipc, uts...) onto ``path``."""
    pin_path(f"/proc/thread-self/ns/{kind}", kind, path)


def pin_path(source: str, kind: str, path: Path) -> None:
    """Bind-mount the namespace file ``source`` (``/proc/PID/ns/KIND``) onto ``path``."""
    check(_mount(source.encode(), os.fsencode(path), None, MS_BIND, None),
          f"pin {kind} namespace at {path}")


def unpin(path: Path) -> None:
    """Unmount and delete; a path that is gone or was never mounted is no error."""
    try:
        mount.unmount(path, MNT_DETACH)
    except FileNotFoundError:
        pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def is_pinned(path: Path | str, kind: str) -> bool:
    """Whether ``path`` is a namespace file (nsfs), not the plain file under it."""
    try:
        # Namespace files all live on the one nsfs: same device as our own.
        return os.stat(path).st_dev == os.stat(f"/proc/self/ns/{kind}").st_dev
    except OSError:
        return False
