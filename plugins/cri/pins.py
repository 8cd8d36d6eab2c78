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
from pathlib import Path

from berth.core import nspin
from berth.core.oci.libc import load_libc

KINDS = ("ipc", "uts")

_sethostname = load_libc()["sethostname"]
_sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def paths(folder: Path) -> dict[str, Path]:
    return {kind: folder / f"{kind}ns" for kind in KINDS}


def create(folder: Path, hostname: str) -> dict[str, Path]:
    """Pin fresh IPC and UTS namespaces (hostname set) in ``folder``; blocking."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    pins = paths(folder)
    for p in pins.values():
        if not p.exists():  # a retried start after a crash finds its placeholders
            nspin.placeholder(p)

    def make() -> None:
        nspin.unshare(nspin.CLONE_NEWIPC | nspin.CLONE_NEWUTS, "ipc and uts namespaces")
        if hostname:
            name = hostname.encode()
            nspin.check(_sethostname(name, len(name)), f"set hostname {hostname!r}")
        for kind, p in pins.items():
            nspin.pin_own(kind, p)

    try:
        nspin.in_fresh_thread(make, "cri-pins")
    except BaseException:
        remove(folder)
        raise
    return pins


def remove(folder: Path) -> None:
    for p in paths(folder).values():
        nspin.unpin(p)
    nspin.unpin(folder / "userns")  # the pod's user namespace (plugins/cri/userns), if any


def pinned(path: Path) -> bool:
    return nspin.is_pinned(path, "ipc")
