"""Removing the cgroups a runtime create cut short left, as berthd does when it cleans up
a task the shim never created (no root: plain folders stand in for hierarchies)."""

from __future__ import annotations

from pathlib import Path

from berth.core import cgroups


def _mountinfo(*mounts: tuple[Path, str, str]) -> str:
    return "\n".join(f"{30 + i} 25 0:{40 + i} {root} {point} rw,nosuid - {fs} {fs} rw"
                     for i, (point, root, fs) in enumerate(mounts))


def test_only_the_empty_leaf_goes_in_every_hierarchy(tmp_path: Path) -> None:
    memory, unified, other = tmp_path / "memory", tmp_path / "unified", tmp_path / "tmp"
    for h in (memory, unified, other):
        (h / "pod" / "c1").mkdir(parents=True)
    (unified / "pod" / "c1" / "child").mkdir()  # a cgroup with children stays
    info = _mountinfo((memory, "/", "cgroup"), (unified, "/", "cgroup2"),
                      (other, "/", "tmpfs"))
    assert cgroups.remove_empty("/pod/c1", info) == [str(memory / "pod" / "c1")]
    assert (memory / "pod").is_dir()  # the parent is the caller's
    assert (unified / "pod" / "c1" / "child").is_dir()
    assert (other / "pod" / "c1").is_dir()  # not a cgroup mount
    assert cgroups.remove_empty("/pod/c1", info) == []  # gone already: nothing to do


def test_paths_berth_does_not_own_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "pod" / "c1").mkdir(parents=True)
    info = _mountinfo((tmp_path, "/", "cgroup"))
    for path in ("", "/", "pod/c1", "pod.slice:cri:c1", "/../"):
        assert cgroups.remove_empty(path, info) == []
    assert (tmp_path / "pod" / "c1").is_dir()


def test_a_mount_of_part_of_a_hierarchy(tmp_path: Path) -> None:
    """A hierarchy mounted from below its root (a cgroup namespace's view) maps the path
    into the part it shows, and is skipped when the path lies outside."""
    (tmp_path / "c1").mkdir()
    info = _mountinfo((tmp_path, "/pod", "cgroup"))
    assert cgroups.remove_empty("/other/c1", info) == []
    assert cgroups.remove_empty("/pod/c1", info) == [str(tmp_path / "c1")]
