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


def mounted_hierarchies(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, root inside the hierarchy) of every cgroup v1 and v2 mount, from
    /proc/self/mountinfo's text."""
    out: list[tuple[str, str]] = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or tail.split()[:1] not in (["cgroup"], ["cgroup2"]):
            continue
        # mountinfo escapes spaces and the like in octal.
        point = fields[4].encode().decode("unicode_escape")
        out.append((point, fields[3].encode().decode("unicode_escape")))
    return out


def remove_empty(cgroups_path: str, mountinfo: str | None = None) -> list[str]:
    """rmdir the cgroup an OCI spec's absolute cgroupfs ``cgroupsPath`` names, in every
    mounted hierarchy; the folders removed.

    For what a runtime killed half-way through ``create`` leaves: runc makes the
    container's cgroups before it writes its state, so ``runc delete --force`` finds
    no container and removes none of them. Only the leaf goes (its parent is the
    caller's, a pod's for the kubelet), and rmdir refuses a cgroup that still has tasks
    or children, so a live container keeps its own. Relative and systemd
    ("slice:prefix:name") paths are left alone: where they land depends on the
    runtime's own cgroup or on systemd, which own them.
    """
    if not cgroups_path.startswith("/") or ":" in cgroups_path:
        return []
    leaf = os.path.normpath(cgroups_path)
    if leaf == "/":
        return []
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
        except OSError:
            return []
    removed = []
    for point, root in mounted_hierarchies(mountinfo):
        rel = os.path.relpath(leaf, root)
        if rel == "." or rel.startswith(".."):
            continue  # outside what this mount shows (a cgroup namespace's view)
        path = os.path.join(point, rel)
        try:
            os.rmdir(path)
        except OSError:
            continue  # gone already, still in use, or not a cgroup of ours to take
        removed.append(path)
    return removed
