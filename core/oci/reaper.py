"""The one place that reaps children in a process that runs containers.

A shim is a child subreaper: container inits, exec'ed processes, hooks and the
intermediate processes of a double fork all end up as its children. If several pieces of
code called ``waitpid`` on their own, one would steal another's exit status, so the Reaper
owns ``waitpid(-1, WNOHANG)`` and everyone else asks it.

Exit statuses follow containerd: the exit code, or 128 + the signal that killed it.
Exits that nobody waited for yet are kept (up to ``keep`` of them, oldest dropped first) so
that ``wait(pid)`` also works for a process that exited before anyone asked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import signal
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from berth.core import log
from berth.core.oci.libc import load_libc

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int
    exited_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def exit_status(wstatus: int) -> int:
    """A ``waitpid`` status as containerd reports it."""
    if os.WIFSIGNALED(wstatus):
        return 128 + os.WTERMSIG(wstatus)
    if os.WIFEXITED(wstatus):
        return os.WEXITSTATUS(wstatus)
    return 255


def _prctl(option: int, arg: int) -> None:
    libc = load_libc()
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def set_child_subreaper(on: bool = True) -> None:
    """Orphaned descendants are re-parented to this process instead of the host's init."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0)


def is_child_subreaper() -> bool:
    flag = ctypes.c_int(0)
    _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.addressof(flag))
    return bool(flag.value)


class Reaper:
    """Reaps every child on SIGCHLD; ``await wait(pid)`` or ``subscribe()`` to all exits.

    Run it in a nursery before starting children: ``await nursery.start(reaper.run)``.
    While it runs the process is a child subreaper (unless ``subreaper=False``); when ``run``
    ends that setting goes back to what it was, so a test process is left as it was. Do not use
    ``subprocess``/``trio.run_process`` waits in the same process while it runs: the Reaper
    would take their statuses.
    """

    def __init__(self, *, subreaper: bool = True, keep: int = 4096) -> None:
        self._subreaper = subreaper
        self._keep = keep
        self._unclaimed: OrderedDict[int, deque[Exit]] = OrderedDict()
        self._waiters: dict[int, list[_Waiter]] = {}
        self._subscribers: list[trio.MemorySendChannel[Exit]] = []
        self._running = False
        self._log = log.get("oci.reaper")

    @property
    def running(self) -> bool:
        """True while ``run`` is reaping (waits only complete then)."""
        return self._running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            was_subreaper = is_child_subreaper()
            if self._subreaper:
                set_child_subreaper()
            self._running = True
            try:
                task_status.started()
                # Children may have exited before the receiver was installed.
                self.reap()
                async for _ in signals:
                    self.reap()
            finally:
                self._running = False
                if self._subreaper and not was_subreaper:
                    set_child_subreaper(False)

    def reap(self) -> list[Exit]:
        """Collect every exited child now; returns what it found."""
        found: list[Exit] = []
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:
                break
            exit = Exit(pid, exit_status(wstatus))
            found.append(exit)
            self._record(exit)
        return found

    def _record(self, exit: Exit) -> None:
        self._log.debug("reaped", pid=exit.pid, status=exit.status)
        for send in list(self._subscribers):
            try:
                send.send_nowait(exit)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(send)
        waiters = self._waiters.pop(exit.pid, None)
        if waiters:
            for w in waiters:
                w.exit = exit
                w.event.set()
            return
        self._unclaimed.setdefault(exit.pid, deque()).append(exit)
        self._unclaimed.move_to_end(exit.pid)
        while len(self._unclaimed) > self._keep:
            self._unclaimed.popitem(last=False)

    def exited(self, pid: int) -> Exit | None:
        """The kept exit of ``pid`` if it exited unclaimed (does not claim it)."""
        kept = self._unclaimed.get(pid)
        return kept[0] if kept else None

    async def wait(self, pid: int) -> Exit:
        """The exit of child ``pid``, claiming it; returns at once if it already exited."""
        kept = self._unclaimed.get(pid)
        if kept:
            exit = kept.popleft()
            if not kept:
                del self._unclaimed[pid]
            return exit
        waiter = _Waiter()
        self._waiters.setdefault(pid, []).append(waiter)
        try:
            await waiter.event.wait()
        finally:
            if waiter.exit is None:
                remaining = [w for w in self._waiters.get(pid, []) if w is not waiter]
                if remaining:
                    self._waiters[pid] = remaining
                else:
                    self._waiters.pop(pid, None)
        assert waiter.exit is not None
        return waiter.exit

    def forget(self, pid: int) -> None:
        """Drop kept exits of ``pid`` (for callers that learnt the status elsewhere)."""
        self._unclaimed.pop(pid, None)

    @contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[Exit]]:
        """Every exit reaped while the context is open (wait() claims do not hide them)."""
        send, receive = trio.open_memory_channel[Exit](math.inf)
        self._subscribers.append(send)
        try:
            yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()
            receive.close()


class _Waiter:
    __slots__ = ("event", "exit")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.exit: Exit | None = None
