"""Reading /proc/<pid>/cgroup and finding where its hierarchies are mounted.

Shared by the shim (which moves itself into cgroups) and berthd (which primes its own
cgroup for shims it hands over); only the standard library.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def parse_cgroups(text: str) -> dict[str, str]:
    """hierarchy (controllers, "" for cgroup v2) → path, from /proc/<pid>/cgroup's text."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def hierarchy_candidates(controllers: str, root: str = CGROUP_ROOT) -> list[str]:
    """Where a hierarchy of /proc/<pid>/cgroup may be mounted, most likely first: v2
    under ``unified`` (hybrid hosts) or at the root; a v1 hierarchy under its name or
    one of its controllers' names."""
    if controllers == "":
        return [os.path.join(root, "unified"), root]
    name = controllers.removeprefix("name=")
    return [os.path.join(root, name)] + [os.path.join(root, c) for c in controllers.split(",")]
