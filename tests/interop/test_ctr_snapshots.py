"""The real ``ctr snapshots`` against berthd, and side by side with the real containerd.

The differential tests run one sequence of ctr commands against each daemon and
compare every exit code, stdout and stderr after normalising what must differ: the
daemons' roots (mount paths), timestamps, and the order of ``ctr snapshots label``'s
output (Go prints a map).

Both daemons collect garbage shortly after start and after every removal, and a view
made by ctr has no gc.root label: each test waits for the start-up collection, and
labels its views right away.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from berth.core import mount
from tests import daemons

pytestmark = [pytest.mark.interop, pytest.mark.root]

_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_LOGTIME = re.compile(r'time="[^"]*"')
KEEP = "containerd.io/gc.root=keep"


def collected_once(d: daemons.Daemon, timeout: float = 30.0) -> daemons.Daemon:
    """Wait until the daemon's start-up garbage collection has run (its log says so)."""
    deadline = time.monotonic() + timeout
    while "garbage collected" not in d.logs():
        assert time.monotonic() < deadline, f"{d.name}: no start-up collection in its log"
        time.sleep(0.02)
    return d


def normalise(d: daemons.Daemon, res: daemons.Result, args: tuple[str, ...]
              ) -> tuple[int, str, str]:
    out, err = (s.replace(str(d.root), "<root>") for s in (res.out, res.err))
    out, err = (_TIME.sub("<time>", s) for s in (out, err))
    err = _LOGTIME.sub('time="<t>"', err)
    if "label" in args and res.rc == 0:
        out = ",".join(sorted(out.strip().split(","))) + "\n"
    return res.rc, out, err


def run(d: daemons.Daemon, script: list[tuple[str, ...]], namespace: str | None = None
        ) -> list[tuple[tuple[str, ...], tuple[int, str, str]]]:
    return [(args, normalise(d, daemons.ctr(d.address, *args, namespace=namespace), args))
            for args in script]


def compare(berthd: daemons.Daemon, containerd: daemons.Daemon, script: list[tuple[str, ...]],
            namespace: str | None = None) -> list[tuple[str, ...]]:
    ours = run(collected_once(berthd), script, namespace)
    theirs = run(collected_once(containerd), script, namespace)
    for (args, got), (_, want) in zip(ours, theirs, strict=True):
        assert got == want, f"ctr {' '.join(args)}"
    return ours


def first(results: list[tuple[tuple[str, ...], tuple[int, str, str]]], args: tuple[str, ...]
          ) -> tuple[int, str, str]:
    return next(r for a, r in results if a == args)


def last(results: list[tuple[tuple[str, ...], tuple[int, str, str]]], args: tuple[str, ...]
         ) -> tuple[int, str, str]:
    return [r for a, r in results if a == args][-1]


def snap(*args: str) -> tuple[str, ...]:
    return ("snapshots", *args)


OVERLAY_SCRIPT = [
    snap("prepare", "a"),
    snap("mounts", "/mnt", "a"),
    snap("commit", "a-c", "a"),
    snap("prepare", "--mounts", "b", "a-c"),
    snap("commit", "b-c", "b"),
    snap("view", "--target", "/mnt", "v", "a-c"),
    snap("label", "v", KEEP),
    snap("view", "v2", "b-c"),
    snap("label", "v2", KEEP),
    snap("mounts", "/mnt", "v2"),
    snap("view", "v0"),
    snap("label", "v0", KEEP),
    snap("mounts", "/mnt", "v0"),
    snap("prepare", "c", "b-c"),
    snap("mounts", "/mnt", "c"),
    # Errors, as containerd words them.
    snap("commit", "x", "v"),
    snap("prepare", "d", "v"),
    snap("prepare", "d", "a"),
    snap("prepare", "c"),
    snap("commit", "a-c", "c"),
    snap("commit", "y", "nope"),
    snap("view", "y", "nope"),
    snap("mounts", "/mnt", "a-c"),
    snap("mounts", "/mnt", "nope"),
    snap("info", "nope"),
    snap("usage", "nope"),
    snap("rm", "a-c"),
    snap("rm", "nope"),
    snap("prepare", ""),
    ("snapshots", "--snapshotter", "nope", "ls"),
    # Listing, tree, info, usage, labels.
    snap("ls"),
    snap("tree"),
    snap("info", "b-c"),
    snap("info", "c"),
    snap("usage"),
    snap("usage", "-b", "c", "a-c"),
    snap("label", "c", "foo=bar", "x=y"),
    snap("label", "c", "foo="),
    snap("label", "c"),
    snap("info", "c"),
    ("namespaces", "rm", "default"),
    # Tear down leaves first; views go first so the collector finds nothing to take.
    snap("rm", "v", "v0", "v2"),
    snap("rm", "c"),
    snap("rm", "b-c", "a-c"),
    snap("ls"),
    ("namespaces", "rm", "default"),
]

NATIVE_SCRIPT = [
    ("snapshots", "--snapshotter", "native", *args) for args in [
        ("prepare", "a"),
        ("mounts", "/mnt", "a"),
        ("commit", "a-c", "a"),
        ("prepare", "b", "a-c"),
        ("mounts", "/mnt", "b"),
        ("view", "v", "a-c"),
        ("label", "v", KEEP),
        ("mounts", "/mnt", "v"),
        ("view", "v0"),
        ("label", "v0", KEEP),
        ("mounts", "/mnt", "v0"),
        ("commit", "x", "v"),
        ("commit", "x", "v0"),
        ("mounts", "/mnt", "a-c"),
        ("ls",),
        ("tree",),
        ("usage",),
        ("info", "b"),
    ]
] + [
    ("snapshots", "ls"),  # the overlayfs snapshotter's keys are its own
    ("namespaces", "rm", "other"),
    ("snapshots", "prepare", "a"),
    ("namespaces", "rm", "other"),
    ("snapshots", "--snapshotter", "native", "rm", "v", "v0", "b"),
    ("snapshots", "--snapshotter", "native", "rm", "a-c"),
    ("snapshots", "rm", "a"),
    ("namespaces", "rm", "other"),
]


def test_overlayfs_matches_containerd(berthd: daemons.Daemon,
                                      containerd: daemons.Daemon) -> None:
    results = compare(berthd, containerd, OVERLAY_SCRIPT)
    # Spot-check that the comparison compared something meaningful.
    rc, out, _ = first(results, snap("mounts", "/mnt", "c"))
    assert rc == 0 and out == (
        "mount -t overlay overlay /mnt -o index=off,"
        "workdir=<root>/io.containerd.snapshotter.v1.overlayfs/snapshots/6/work,"
        "upperdir=<root>/io.containerd.snapshotter.v1.overlayfs/snapshots/6/fs,"
        "lowerdir=<root>/io.containerd.snapshotter.v1.overlayfs/snapshots/2/fs:"
        "<root>/io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs\n")
    assert first(results, snap("ls"))[1] == (
        "KEY PARENT KIND      \n"
        "a-c        Committed \n"
        "b-c a-c    Committed \n"
        "c   b-c    Active    \n"
        "v   a-c    View      \n"
        "v0         View      \n"
        "v2  b-c    View      \n")
    assert first(results, ("namespaces", "rm", "default"))[0] == 1
    assert last(results, ("namespaces", "rm", "default"))[0] == 0


def test_native_matches_containerd(berthd: daemons.Daemon, containerd: daemons.Daemon) -> None:
    results = compare(berthd, containerd, NATIVE_SCRIPT, namespace="other")
    rc, out, _ = first(results, ("snapshots", "--snapshotter", "native", "mounts", "/mnt", "v"))
    assert (rc, out) == (0, "mount -t bind <root>/io.containerd.snapshotter.v1.native/"
                            "snapshots/1 /mnt -o rbind,ro\n")
    assert first(results, ("namespaces", "rm", "other"))[0] == 1
    assert last(results, ("namespaces", "rm", "other"))[0] == 0
    assert list((berthd.root / "io.containerd.snapshotter.v1.native" / "snapshots").iterdir()) \
        == []


def sh(command: str) -> None:
    subprocess.run(command, shell=True, check=True)


def test_printed_mount_commands_work(berthd: daemons.Daemon) -> None:
    """ctr prints the mount command for berth's mounts; running it gives the snapshot."""
    collected_once(berthd)
    target = berthd.base / "mnt"
    target.mkdir()

    def ctr(*args: str) -> str:
        res = daemons.ctr(berthd.address, *args)
        assert res.rc == 0, res.err
        return res.out

    try:
        for i, snapshotter in enumerate(["overlayfs", "native"]):
            s = ("snapshots", "--snapshotter", snapshotter)
            sh(ctr(*s, "prepare", "--target", str(target), f"base{i}"))
            (target / "base").write_text("base")
            (target / "doomed").write_text("x")
            mount.unmount_all(target)
            ctr(*s, "commit", f"base{i}-c", f"base{i}")
            sh(ctr(*s, "prepare", "--target", str(target), f"top{i}", f"base{i}-c"))
            assert (target / "base").read_text() == "base"
            (target / "doomed").unlink()
            (target / "top").write_text("top")
            mount.unmount_all(target)
            ctr(*s, "commit", f"top{i}-c", f"top{i}")
            sh(ctr(*s, "view", "--target", str(target), f"view{i}", f"top{i}-c"))
            ctr(*s, "label", f"view{i}", KEEP)
            assert sorted(p.name for p in target.iterdir()) == ["base", "top"]
            mount.unmount_all(target)
            sh(ctr(*s, "mounts", str(target), f"view{i}"))
            assert (target / "top").read_text() == "top"
            mount.unmount_all(target)
    finally:
        mount.unmount_all(target, mount.MNT_DETACH)
    assert mount.mountpoints(berthd.base) == []


def test_namespaces_are_separate(berthd: daemons.Daemon) -> None:
    collected_once(berthd)
    for ns in ("one", "two"):
        res = daemons.ctr(berthd.address, "snapshots", "prepare", "k", namespace=ns)
        assert res.rc == 0, res.err
    a = daemons.ctr(berthd.address, "snapshots", "mounts", "/m", "k", namespace="one").out
    b = daemons.ctr(berthd.address, "snapshots", "mounts", "/m", "k", namespace="two").out
    assert a != b and Path(a.split()[3]).parent != Path(b.split()[3]).parent
    assert daemons.ctr(berthd.address, "snapshots", "rm", "k", namespace="one").rc == 0
    assert daemons.ctr(berthd.address, "snapshots", "ls", namespace="one").out.count("\n") == 1
    assert "k" in daemons.ctr(berthd.address, "snapshots", "ls", namespace="two").out
