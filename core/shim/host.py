"""Small host facts the ``start`` action applies to a new shim: OOM score and cgroups.

containerd's runc manager gives the shim an OOM score one above containerd's (so the
kernel kills a shim before the daemon) and moves it into ``shim_cgroup`` when the
runtime options name one. Only the standard library: ``start`` must stay cheap.
"""

from __future__ import annotations

import contextlib
import os

from berth.core.cgroups import hierarchy_candidates, parse_cgroups

OOM_SCORE_MAX = 1000


def adjust_oom_score(pid: int, parent: int | None = None) -> None:
    """Set ``pid``'s oom_score_adj to the parent's plus one (best effort)."""
    parent = os.getppid() if parent is None else parent
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{parent}/oom_score_adj") as f:
            score = int(f.read().strip())
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, OOM_SCORE_MAX)))


def cgroups_of(pid: int | str = "self") -> dict[str, str]:
    """``parse_cgroups`` of /proc/<pid>/cgroup ({} when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return parse_cgroups(f.read())
    except OSError:
        return {}


def _hierarchy_dirs(controllers: str) -> list[str]:
    return [c for c in hierarchy_candidates(controllers) if os.path.isdir(c)][:1]


def join_cgroups(pid: int, cgroups: dict[str, str]) -> None:
    """Move ``pid`` into the given per-hierarchy paths (best effort, as far as allowed)."""
    for controllers, path in cgroups.items():
        for base in _hierarchy_dirs(controllers):
            with contextlib.suppress(OSError):
                with open(os.path.join(base, path.lstrip("/"), "cgroup.procs"), "w") as f:
                    f.write(str(pid))


def join_static_cgroup(pid: int, path: str) -> None:
    """``shim_cgroup``: the same path in every hierarchy that has it (cgroups.StaticPath)."""
    targets = {}
    for controllers in cgroups_of("self"):
        targets[controllers] = path
    join_cgroups(pid, targets)


def follow_cgroups(child: int) -> None:
    """Put ``child`` where this process is, when it was born elsewhere (a zygote's fork)."""
    mine, theirs = cgroups_of("self"), cgroups_of(child)
    differing = {k: v for k, v in mine.items() if theirs.get(k) != v}
    if differing:
        join_cgroups(child, differing)
