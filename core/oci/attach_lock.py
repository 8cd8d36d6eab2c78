"""Take the kernel's cgroup attach lock early, so a container's migration does not wait.

Moving a process into a cgroup (a write to ``cgroup.procs``, what every OCI runtime does
to a container's first process) takes a global per-CPU rwsem for writing. Unless the
host mounts its cgroups with ``favordynmods``, the first writer after a quiet spell must
wait for an RCU grace period before it gets the lock: 5-25 ms on a small VM, while the
writes that follow within about one more grace period pass at once. A shim would pay
that wait on the critical path of every Create, right after forking the container.

``prime()`` writes this process's own pid to the ``cgroup.procs`` of the cgroup it is
already in: a migration that moves nothing, but that starts the grace period. Run in a
thread as Create begins, the wait overlaps the work done before the fork (rootfs,
stdio, spec, the cgroup's directories) and the container's real migration finds the
lock ready. Best effort: any error only means no head start. berthd decides when
(``core.runtime.attach_primer``): only for a start with no other under way.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def own_procs_file(proc_cgroup: str, cgroup_root: str = CGROUP_ROOT) -> str | None:
    """The ``cgroup.procs`` of this process's own cgroup in some mounted hierarchy.

    ``proc_cgroup`` is the text of /proc/self/cgroup. A v1 controller hierarchy is
    preferred (on a hybrid host the v2 tree may be empty of controllers, but either
    takes the same lock); the v2 line is tried last, on the root (unified host) and
    under ``unified`` (hybrid host).
    """
    candidates: list[str] = []
    v2: list[str] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if not controllers:
            v2 += [os.path.join(cgroup_root, rel), os.path.join(cgroup_root, "unified", rel)]
            continue
        if controllers.startswith("name="):
            names = [controllers[len("name="):]]
        else:
            names = [controllers, *controllers.split(",")]
        candidates += [os.path.join(cgroup_root, name, rel) for name in names]
    for directory in candidates + v2:
        procs = os.path.join(directory, "cgroup.procs")
        if os.path.exists(procs):
            return procs
    return None


def prime(cgroup_root: str = CGROUP_ROOT) -> bool:
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
