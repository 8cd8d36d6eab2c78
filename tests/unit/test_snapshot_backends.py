"""The overlayfs and native backends: chains, kinds, mounts, errors, crash leftovers.

Nothing is mounted here; the mounts are checked as data and the trees as files.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest
import trio

from berth.core import errdefs
from berth.core.mount import Mount
from berth.core.snapshots import Info, Kind
from berth.plugins.snapshotters import local
from berth.plugins.snapshotters.native import NativeSnapshotter
from berth.plugins.snapshotters.overlayfs import OverlaySnapshotter, overlay_mounts
from berth.plugins.snapshotters.storage import Snapshot


@pytest.fixture
def overlay(tmp_path: Path) -> OverlaySnapshotter:
    sn = OverlaySnapshotter(tmp_path / "ovl", index_off=True, userxattr=False)
    yield sn
    sn.close()


@pytest.fixture
def native(tmp_path: Path) -> NativeSnapshotter:
    sn = NativeSnapshotter(tmp_path / "native")
    yield sn
    sn.close()


def up(id_: str) -> str:
    return f"/r/snapshots/{id_}/fs"


def work(id_: str) -> str:
    return f"/r/snapshots/{id_}/work"


@pytest.mark.parametrize(("snap", "expected"), [
    (Snapshot("1", Kind.ACTIVE, []), [Mount("bind", up("1"), ["rw", "rbind"])]),
    (Snapshot("1", Kind.VIEW, []), [Mount("bind", up("1"), ["ro", "rbind"])]),
    (Snapshot("2", Kind.VIEW, ["1"]), [Mount("bind", up("1"), ["ro", "rbind"])]),
    (Snapshot("3", Kind.ACTIVE, ["2", "1"]), [Mount("overlay", "overlay", [
        "index=off", f"workdir={work('3')}", f"upperdir={up('3')}",
        f"lowerdir={up('2')}:{up('1')}"])]),
    (Snapshot("2", Kind.ACTIVE, ["1"]), [Mount("overlay", "overlay", [
        "index=off", f"workdir={work('2')}", f"upperdir={up('2')}", f"lowerdir={up('1')}"])]),
    (Snapshot("4", Kind.VIEW, ["3", "2", "1"]), [Mount("overlay", "overlay", [
        "index=off", f"lowerdir={up('3')}:{up('2')}:{up('1')}"])]),
])
def test_overlay_mount_shapes(snap: Snapshot, expected: list[Mount]) -> None:
    assert overlay_mounts(snap, up, work, index_off=True, userxattr=False) == expected


def test_overlay_mount_options_without_index_and_with_userxattr() -> None:
    (m,) = overlay_mounts(Snapshot("2", Kind.VIEW, ["1", "0"]), up, work, index_off=False,
                          userxattr=True)
    assert m.options == ["userxattr", f"lowerdir={up('1')}:{up('0')}"]


async def test_overlay_chain_and_ids(overlay: OverlaySnapshotter) -> None:
    r = overlay.snapshots_dir
    (m,) = await overlay.prepare("a", "", {"containerd.io/snapshot/x": "1"})
    assert m == Mount("bind", f"{r}/1/fs", ["rw", "rbind"])
    assert sorted(os.listdir(r / "1")) == ["fs", "work"]
    assert stat.S_IMODE(os.stat(r / "1" / "fs").st_mode) == 0o755
    (r / "1" / "fs" / "hello").write_text("hi")

    await overlay.commit("a-c", "a", {"containerd.io/snapshot/y": "2"})
    info = await overlay.stat("a-c")
    assert (info.name, info.kind, info.parent) == ("a-c", Kind.COMMITTED, "")
    assert info.labels == {"containerd.io/snapshot/y": "2"}  # replaced, not inherited
    usage = await overlay.usage("a-c")
    assert usage.inodes == 2 and usage.size > 0

    (m,) = await overlay.prepare("b", "a-c")
    assert m.type == "overlay"
    assert m.options == ["index=off", f"workdir={r}/2/work", f"upperdir={r}/2/fs",
                         f"lowerdir={r}/1/fs"]
    await overlay.commit("b-c", "b")
    (m,) = await overlay.view("v", "b-c")
    assert m.options == ["index=off", f"lowerdir={r}/2/fs:{r}/1/fs"]
    assert sorted(os.listdir(r / "3")) == ["fs"]  # a view has no work dir
    assert await overlay.mounts("v") == [m]
    assert [(i.name, i.parent, i.kind) for i in await overlay.walk()] == [
        ("a-c", "", Kind.COMMITTED), ("b-c", "a-c", Kind.COMMITTED), ("v", "b-c", Kind.VIEW)]
    assert [i.name for i in await overlay.walk(["kind==view"])] == ["v"]
    assert [i.name for i in await overlay.walk(["parent==a-c", "name==v"])] == ["b-c", "v"]


async def test_long_chains_nearest_first_and_a_broken_chain_is_not_found(
        overlay: OverlaySnapshotter) -> None:
    r = overlay.snapshots_dir
    parent = ""
    for i in range(1, 6):
        await overlay.prepare(f"l{i}", parent)
        await overlay.commit(f"c{i}", f"l{i}")
        parent = f"c{i}"
    (m,) = await overlay.prepare("top", parent)
    assert m.options[-1] == "lowerdir=" + ":".join(f"{r}/{i}/fs" for i in range(5, 0, -1))
    assert await overlay.mounts("top") == [m]
    # A parent row gone (only a damaged database can lose one): NotFound, as before.
    c = sqlite3.connect(overlay.ms.path)
    c.execute("PRAGMA foreign_keys=OFF")
    c.execute("DELETE FROM snapshots WHERE id = 3")
    c.commit()
    c.close()
    with pytest.raises(errdefs.NotFound, match="missing parent"):
        await overlay.mounts("top")


async def test_backend_errors_read_like_containerd(overlay: OverlaySnapshotter) -> None:
    await overlay.prepare("a")
    await overlay.view("v")
    with pytest.raises(errdefs.AlreadyExists, match=r"^failed to create snapshot: snapshot a:"
                       r" already exists$"):
        await overlay.prepare("a")
    with pytest.raises(errdefs.InvalidArgument, match=r'^failed to create snapshot: parent "a" '
                       r"is not committed snapshot: invalid argument$"):
        await overlay.prepare("b", "a")
    with pytest.raises(errdefs.NotFound, match=r'^failed to create snapshot: missing parent '
                       r'"nope" bucket: not found$'):
        await overlay.view("b", "nope")
    with pytest.raises(errdefs.FailedPrecondition, match=r'^failed to commit snapshot: '
                       r'snapshot "v" is not active: failed precondition$'):
        await overlay.commit("x", "v")
    with pytest.raises(errdefs.NotFound, match=r"^snapshot does not exist: not found$"):
        await overlay.commit("x", "nope")
    await overlay.commit("a-c", "a")
    with pytest.raises(errdefs.FailedPrecondition, match=r"^failed to get active mount: "
                       r"requested snapshot a-c not active or view: failed precondition$"):
        await overlay.mounts("a-c")
    await overlay.prepare("child", "a-c")
    with pytest.raises(errdefs.FailedPrecondition, match=r"^failed to remove: cannot remove "
                       r"snapshot with child: failed precondition$"):
        await overlay.remove("a-c")
    with pytest.raises(errdefs.NotFound, match=r"^failed to remove: snapshot gone: not found$"):
        await overlay.remove("gone")
    with pytest.raises(errdefs.InvalidArgument, match=r'^cannot update "kind" field on '
                       r'snapshot "v": invalid argument$'):
        await overlay.update(Info("v"), ["kind"])


async def test_update_labels_by_path(overlay: OverlaySnapshotter) -> None:
    await overlay.prepare("a", "", {"p/a": "1", "p/b": "2"})
    info = await overlay.update(Info("a", labels={"p/b": "", "p/c": "3"}),
                                ["labels.p/b", "labels.p/c"])
    assert info.labels == {"p/a": "1", "p/c": "3"}
    assert info.updated > info.created
    info = await overlay.update(Info("a", labels={"z": "9"}))
    assert (await overlay.stat("a")).labels == {"z": "9"} == info.labels


async def test_remove_deletes_the_directory_and_ids_are_not_reused(
        overlay: OverlaySnapshotter) -> None:
    await overlay.prepare("a")
    await overlay.remove("a")
    assert os.listdir(overlay.snapshots_dir) == []
    (m,) = await overlay.prepare("a")
    assert m.source == f"{overlay.snapshots_dir}/2/fs"


async def test_usage_of_active_is_measured_now(overlay: OverlaySnapshotter) -> None:
    await overlay.prepare("a")
    before = await overlay.usage("a")
    assert before.inodes == 1
    d = overlay.snapshots_dir / "1" / "fs"
    (d / "f").write_bytes(b"x" * 10000)
    os.link(d / "f", d / "g")  # a hard link is one inode
    after = await overlay.usage("a")
    assert after.inodes == 2
    assert after.size >= before.size + 8192


async def test_a_crashed_create_leaves_only_orphans(overlay: OverlaySnapshotter,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    await overlay.prepare("keep")

    def crash(path: object) -> None:
        raise OSError(5, "simulated crash")

    # Fail after the directory got its id but before the record is committed.
    monkeypatch.setattr(local, "_fsync_dir", crash)
    with pytest.raises(OSError, match="simulated crash"):
        await overlay.prepare("lost")
    monkeypatch.undo()
    with pytest.raises(errdefs.NotFound):
        await overlay.stat("lost")
    assert sorted(os.listdir(overlay.snapshots_dir)) == ["1", "2"]  # 2 is an orphan
    # The id is handed out again; the orphan in its place is replaced, not reused.
    (overlay.snapshots_dir / "2" / "fs" / "stale").write_text("x")
    (m,) = await overlay.prepare("new")
    assert m.source.endswith("/2/fs")
    assert os.listdir(m.source) == []


async def test_cleanup_removes_directories_without_records(
        overlay: OverlaySnapshotter) -> None:
    await overlay.prepare("keep")
    for orphan in ("new-123", "rm-7", "42"):
        (overlay.snapshots_dir / orphan / "fs").mkdir(parents=True)
    await overlay.cleanup()
    assert os.listdir(overlay.snapshots_dir) == ["1"]
    assert (await overlay.stat("keep")).kind == Kind.ACTIVE


async def test_cleanup_while_a_worker_thread_holds_the_store(
        overlay: OverlaySnapshotter) -> None:
    # cleanup searches on the event loop only when the store is free; a create's
    # transaction in a worker thread (its fsyncs) sends the search to a thread instead.
    await overlay.prepare("keep")
    orphan = overlay.snapshots_dir / "42"
    (orphan / "fs").mkdir(parents=True)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with overlay.ms.write():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(overlay.cleanup)
            await trio.sleep(0.05)
            assert orphan.exists()  # the search waits for the store, off the loop
            release.set()
    finally:
        release.set()
        holder.join(30)
    assert os.listdir(overlay.snapshots_dir) == ["1"]


async def test_state_survives_reopening(tmp_path: Path) -> None:
    sn = OverlaySnapshotter(tmp_path / "o", index_off=False, userxattr=False)
    await sn.prepare("a")
    await sn.commit("a-c", "a")
    sn.close()
    sn = OverlaySnapshotter(tmp_path / "o", index_off=False, userxattr=False)
    try:
        (m,) = await sn.view("v", "a-c")
        assert m == Mount("bind", f"{sn.snapshots_dir}/1/fs", ["ro", "rbind"])
    finally:
        sn.close()


async def test_native_copies_the_parent_tree(native: NativeSnapshotter) -> None:
    (m,) = await native.prepare("a")
    root = Path(m.source)
    assert m == Mount("bind", str(native.snapshots_dir / "1"), ["rbind", "rw"])
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    (root / "dir").mkdir(mode=0o710)
    (root / "dir" / "file").write_text("content")
    os.chmod(root / "dir" / "file", 0o640)
    os.link(root / "dir" / "file", root / "hard")
    os.symlink("dir/file", root / "sym")
    os.mkfifo(root / "fifo")
    os.utime(root / "dir" / "file", ns=(1_000_000_000, 2_000_000_123))
    await native.commit("a-c", "a")

    (m,) = await native.prepare("b", "a-c")
    copy = Path(m.source)
    assert copy == native.snapshots_dir / "2"
    assert (copy / "dir" / "file").read_text() == "content"
    st = (copy / "dir" / "file").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 2_000_000_123
    assert stat.S_IMODE((copy / "dir").stat().st_mode) == 0o710
    assert (copy / "hard").stat().st_ino == st.st_ino  # still one inode, twice linked
    assert os.readlink(copy / "sym") == "dir/file"
    assert stat.S_ISFIFO((copy / "fifo").lstat().st_mode)
    # Changes to the copy do not reach the parent.
    (copy / "dir" / "file").write_text("changed")
    assert (root / "dir" / "file").read_text() == "content"


async def test_native_view_of_a_parent_mounts_the_parent(native: NativeSnapshotter) -> None:
    await native.prepare("a")
    await native.commit("a-c", "a")
    (m,) = await native.view("v", "a-c")
    assert m == Mount("bind", str(native.snapshots_dir / "1"), ["rbind", "ro"])
    assert sorted(os.listdir(native.snapshots_dir)) == ["1"]
    (m,) = await native.view("v0")
    assert m == Mount("bind", str(native.snapshots_dir / "3"), ["rbind", "ro"])
    with pytest.raises(errdefs.Unknown, match=r"^lstat .*/snapshots/2: no such file or "
                       r"directory$"):
        await native.commit("x", "v")
    with pytest.raises(errdefs.FailedPrecondition, match=r"^failed to get snapshot mount: "):
        await native.mounts("a-c")
    await native.remove("v")
    await native.remove("v0")
    assert sorted(os.listdir(native.snapshots_dir)) == ["1"]
