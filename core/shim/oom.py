"""Notice when the kernel's OOM killer strikes in a container's memory cgroup.

Like containerd's pkg/oom: on cgroup v1 an eventfd is registered for the cgroup's
``memory.oom_control`` through ``cgroup.event_control`` and becomes readable on each
OOM; on cgroup v2, ``memory.events`` is watched with inotify and its ``oom_kill``
count compared. Each OOM becomes one TaskOOM event.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable

import trio

from berth.core import log
from berth.core.oci.libc import load_libc
from berth.core.shim import host

_IN_MODIFY = 0x2
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


def memory_cgroup(pid: int, root: str = "/sys/fs/cgroup") -> tuple[str, int] | None:
    """(directory, cgroup version) holding ``pid``'s memory controller, if any."""
    unified = None
    for controllers, path in host.cgroups_of(pid).items():
        if "memory" in controllers.split(","):
            directory = os.path.join(root, "memory", path.lstrip("/"))
            if os.path.exists(os.path.join(directory, "memory.oom_control")):
                return directory, 1
        if controllers == "":
            unified = path
    if unified is not None:
        for base in (root, os.path.join(root, "unified")):
            directory = os.path.join(base, unified.lstrip("/"))
            if os.path.exists(os.path.join(directory, "memory.events")):
                return directory, 2
    return None


def _oom_kills(directory: str) -> int:
    try:
        with open(os.path.join(directory, "memory.events")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


async def watch(pid: int, on_oom: Callable[[], None], *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Call ``on_oom`` for every OOM in ``pid``'s memory cgroup, until cancelled.

    ``task_status.started()`` comes once the kernel will report OOMs, so that a
    container started after that cannot be killed unnoticed. When watching fails the
    caller's status is not started: callers must not wait on it forever.
    """
    found = memory_cgroup(pid)
    logger = log.get("shim.oom", pid=pid)
    if found is None:
        logger.debug("no memory cgroup to watch")
        task_status.started()
        return
    directory, version = found
    try:
        if version == 1:
            await _watch_v1(directory, on_oom, task_status)
        else:
            await _watch_v2(directory, on_oom, task_status)
    except OSError as exc:
        logger.warning("oom watch ended", cgroup=directory, error=str(exc))


async def _watch_v1(directory: str, on_oom: Callable[[], None],
                    task_status: trio.TaskStatus[None]) -> None:
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        control = os.open(os.path.join(directory, "memory.oom_control"),
                          os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(os.path.join(directory, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {control}")
        finally:
            os.close(control)
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(efd)
            try:
                os.eventfd_read(efd)
            except BlockingIOError:
                continue
            # The cgroup going away also fires the eventfd: that is not an OOM.
            if not os.path.exists(os.path.join(directory, "memory.oom_control")):
                return
            on_oom()
    finally:
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(efd)
        os.close(efd)


async def _watch_v2(directory: str, on_oom: Callable[[], None],
                    task_status: trio.TaskStatus[None]) -> None:
    libc = load_libc()
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        path = os.path.join(directory, "memory.events").encode()
        if libc.inotify_add_watch(fd, path, _IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        seen = _oom_kills(directory)
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(fd)
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 4096)
            if not os.path.exists(directory):
                return
            now = _oom_kills(directory)
            for _ in range(max(0, now - seen)):
                on_oom()
            seen = max(seen, now)
    finally:
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(fd)
        os.close(fd)
