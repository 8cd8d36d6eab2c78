"""berthd gives the kernel's cgroup attach lock a head start before a container's move.

Moving a process into a cgroup (a write to ``cgroup.procs``, what every OCI runtime does
to a container's first process) takes a global per-CPU rwsem for writing. Unless the
host mounts its cgroups with ``favordynmods``, the first writer after a quiet spell
waits for an RCU grace period before it gets the lock (5-25 ms on a small VM), while the
writes that follow within about one more grace period pass at once. ``prime()`` writes
berthd's own pid to the ``cgroup.procs`` of the cgroup it is already in: a migration
that moves nothing but starts the grace period. Written in a thread as Tasks.Create (or
an exec's Tasks.Start) arrives, the wait overlaps the shim's work before the fork, and
the container's move finds the lock ready (about 7 ms less per ``ctr run`` here).

While other starts are under way the lock is kept ready by their own moves, and every
extra writer holds up each fork and exit on the host while it waits (measured: priming
every create made 30 parallel starts ~15% slower). So a prime is written only for a
start that has the field to itself: none in progress, the last one finished at least
``QUIET`` seconds ago, no prime in flight. The decision is a pure function
(``should_prime``); ``Primer`` keeps the counts and owns the writing thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from berth.core import cgroups as cgroupfs

QUIET = 0.03


def own_procs_file(proc_cgroup: str, cgroup_root: str = cgroupfs.CGROUP_ROOT) -> str | None:
    """The ``cgroup.procs`` of this process's own cgroup in some mounted hierarchy.

    ``proc_cgroup`` is the text of /proc/self/cgroup. v1 hierarchies are tried first (on
    a hybrid host the v2 tree may hold no controllers; either takes the same lock).
    """
    cgroups = cgroupfs.parse_cgroups(proc_cgroup)
    for controllers in sorted(cgroups, key=lambda c: c == ""):
        for base in cgroupfs.hierarchy_candidates(controllers, cgroup_root):
            procs = os.path.join(base, cgroups[controllers].lstrip("/"), "cgroup.procs")
            if os.path.exists(procs):
                return procs
    return None


def prime(cgroup_root: str = cgroupfs.CGROUP_ROOT) -> bool:
    """Blocking (run it in a thread): whether the no-op migration was written."""
    try:
        with open("/proc/self/cgroup") as f:
            procs = own_procs_file(f.read(), cgroup_root)
        if procs is None:
            return False
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def should_prime(now: float, active: int, last_done: float, in_flight: bool,
                 quiet: float = QUIET) -> bool:
    """Prime for a start at ``now`` with ``active`` others under way?"""
    return active == 0 and not in_flight and now - last_done >= quiet


class Primer:
    def __init__(self, nursery: trio.Nursery, quiet: float = QUIET) -> None:
        self._nursery = nursery
        self._quiet = quiet
        self._active = 0
        self._last_done = -math.inf
        self._in_flight = False
        self.primed = 0  # primes written, for tests and logs

    @contextmanager
    def starting(self) -> Iterator[None]:
        """Around a request that makes a shim move a process into a cgroup."""
        if should_prime(trio.current_time(), self._active, self._last_done,
                        self._in_flight, self._quiet):
            self._in_flight = True
            self._nursery.start_soon(self._prime)
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._last_done = trio.current_time()

    async def _prime(self) -> None:
        try:
            if await trio.to_thread.run_sync(prime, abandon_on_cancel=True):
                self.primed += 1
        finally:
            self._in_flight = False
