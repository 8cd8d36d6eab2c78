"""A pod's namespaces without an infra process: made by a short-lived thread and pinned
by bind mounts of their nsfs files under the pod's state folder (as CRI-O's pinns).

The thread unshares the IPC and UTS namespaces (both per-task), sets the pod's hostname
in the new UTS namespace, bind-mounts ``/proc/thread-self/ns/{ipc,uts}`` onto files,
and ends, so no thread of berthd stays in a pod's namespace. Containers join through
the paths in their OCI spec. Removing is unmount + unlink, and is idempotent (a stop
may be retried after a crash).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from berth.core import mount
from berth.core.oci.libc import load_libc

CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
KINDS = ("ipc", "uts")

_libc = load_libc()
_unshare = _libc["unshare"]
_unshare.argtypes = [ctypes.c_int]
_mount = _libc["mount"]
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p]
_sethostname = _libc["sethostname"]
_sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def paths(folder: Path) -> dict[str, Path]:
    return {kind: folder / f"{kind}ns" for kind in KINDS}


def create(folder: Path, hostname: str) -> dict[str, Path]:
    """Pin fresh IPC and UTS namespaces (hostname set) in ``folder``; blocking."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    pins = paths(folder)
    for p in pins.values():
        os.close(os.open(p, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))
    err: list[BaseException] = []

    def make() -> None:
        try:
            _check(_unshare(CLONE_NEWIPC | CLONE_NEWUTS), "unshare ipc and uts namespaces")
            if hostname:
                name = hostname.encode()
                _check(_sethostname(name, len(name)), f"set hostname {hostname!r}")
            for kind, p in pins.items():
                _check(_mount(f"/proc/thread-self/ns/{kind}".encode(), os.fsencode(p), None,
                              MS_BIND, None), f"pin {kind} namespace at {p}")
        except BaseException as e:  # handed to the caller below
            err.append(e)

    t = threading.Thread(target=make, name="cri-pins")
    t.start()
    t.join()
    if err:
        remove(folder)
        raise err[0]
    return pins


def remove(folder: Path) -> None:
    for p in paths(folder).values():
        try:
            mount.unmount(p, MNT_DETACH)
        except FileNotFoundError:
            pass
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def pinned(path: Path) -> bool:
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/ipc").st_dev
    except OSError:
        return False
