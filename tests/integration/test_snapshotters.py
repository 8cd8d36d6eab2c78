"""Real mounts of real snapshot chains (root, overlayfs in the kernel).

Each test builds layers through the snapshotters, mounts what they return with
core.mount, and checks what a process sees: files from lower layers, changes in upper
ones, whiteouts hiding deleted files, read-only views refusing writes. Every test ends
with nothing mounted under its directory.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.core import mount
from berth.core.mount import Mount
from berth.core.snapshots import Kind
from berth.plugins.snapshotters.native import NativeSnapshotter
from berth.plugins.snapshotters.overlayfs import OverlaySnapshotter

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def as_root() -> None:
    assert os.geteuid() == 0, "these tests mount filesystems: run them as root"


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    left = mount.mountpoints(tmp_path)
    for p in sorted(left, key=len, reverse=True):  # do not poison later tests
        mount.unmount_all(p, mount.MNT_DETACH)
    assert left == [], f"left mounted: {left}"


@pytest.fixture
def overlay(base: Path) -> Iterator[OverlaySnapshotter]:
    sn = OverlaySnapshotter(base / "overlayfs")
    yield sn
    sn.close()


@pytest.fixture
def native(base: Path) -> Iterator[NativeSnapshotter]:
    sn = NativeSnapshotter(base / "native")
    yield sn
    sn.close()


def tree(root: Path) -> dict[str, str]:
    """Every file under root with its content ("<dir>" for directories)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "<dir>"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_text()
    return out


async def test_overlay_chain_whiteouts_and_views(overlay: OverlaySnapshotter,
                                                 base: Path) -> None:
    mounts = await overlay.prepare("l1")
    assert mounts[0].type == "bind"
    with mount.mounted(mounts, parent=base) as root:
        (root / "keep").write_text("1")
        (root / "gone").write_text("1")
        (root / "dir").mkdir()
        (root / "dir" / "old").write_text("1")
        (root / "edit").write_text("v1")
    await overlay.commit("l1-c", "l1")

    mounts = await overlay.prepare("l2", "l1-c")
    assert mounts[0].type == "overlay"
    with mount.mounted(mounts, parent=base) as root:
        assert tree(root) == {"keep": "1", "gone": "1", "dir": "<dir>", "dir/old": "1",
                              "edit": "v1"}
        (root / "gone").unlink()
        (root / "dir" / "old").unlink()
        (root / "dir").rmdir()
        (root / "dir").mkdir()           # an opaque directory now
        (root / "dir" / "new").write_text("2")
        (root / "edit").write_text("v2")
        (root / "added").write_text("2")
    await overlay.commit("l2-c", "l2")

    # What the upper layer recorded: a whiteout for the deleted file, an opaque dir.
    info = await overlay.stat("l2-c")
    assert info.kind == Kind.COMMITTED
    upper = overlay.snapshots_dir / "2" / "fs"
    st = os.lstat(upper / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(upper / "dir", "trusted.overlay.opaque") == b"y"
    assert not (upper / "keep").exists()  # unchanged files stay in the lower layer

    view = await overlay.view("v", "l2-c")
    assert view[0].type == "overlay"
    assert [o for o in view[0].options if o.startswith(("upperdir", "workdir"))] == []
    with mount.mounted(view, parent=base) as root:
        assert tree(root) == {"keep": "1", "dir": "<dir>", "dir/new": "2", "edit": "v2",
                              "added": "2"}
        with pytest.raises(OSError) as e:
            (root / "x").write_text("no")
        assert e.value.errno == errno.EROFS

    # The single-parent view is a read-only bind mount of the parent's directory.
    one = await overlay.view("v1", "l1-c")
    assert one == [Mount("bind", str(overlay.snapshots_dir / "1" / "fs"), ["ro", "rbind"])]
    with mount.mounted(one, parent=base) as root:
        assert tree(root)["gone"] == "1"
        with pytest.raises(OSError) as e:
            (root / "gone").write_text("no")
        assert e.value.errno == errno.EROFS

    # A new active snapshot on top sees l2's state and writes to its own upper dir.
    top = await overlay.prepare("l3", "l2-c")
    with mount.mounted(top, parent=base) as root:
        (root / "keep").write_text("3")
    assert (overlay.snapshots_dir / "1" / "fs" / "keep").read_text() == "1"
    assert (await overlay.usage("l3")).inodes == 2  # its root and the copied-up file


async def test_long_chain_mounts_with_compacted_lowerdirs(overlay: OverlaySnapshotter,
                                                          base: Path) -> None:
    parent = ""
    layers = 0
    while True:
        key = f"layer{layers}"
        (m,) = await overlay.prepare(key, parent)
        # Write straight into the layer's upper directory: quicker than mounting each.
        src = m.source if m.type == "bind" else next(
            o for o in m.options if o.startswith("upperdir=")).removeprefix("upperdir=")
        Path(src, f"f{layers}").write_text(str(layers))
        await overlay.commit(f"{key}-c", key)
        parent = f"{key}-c"
        layers += 1
        (m,) = await overlay.view("probe", parent)
        await overlay.remove("probe")
        if sum(map(len, m.options)) >= mount.PAGE_SIZE - 512:
            break
    (m,) = await overlay.prepare("top", parent)
    (call,) = mount.plan(m, str(base / "t"))
    assert call.chdir == f"{overlay.snapshots_dir}/"  # relative lowerdirs
    with mount.mounted([m], parent=base) as root:
        assert {f"f{i}": str(i) for i in range(layers)} == tree(root)
        (root / "new").write_text("x")
    assert (overlay.snapshots_dir / str(2 * layers + 1) / "fs" / "new").exists()


async def test_native_chain(native: NativeSnapshotter, base: Path) -> None:
    with mount.mounted(await native.prepare("a"), parent=base) as root:
        (root / "f").write_text("a")
        os.symlink("f", root / "link")
    await native.commit("a-c", "a")
    with mount.mounted(await native.prepare("b", "a-c"), parent=base) as root:
        assert (root / "link").read_text() == "a"
        (root / "f").write_text("b")
    await native.commit("b-c", "b")
    with mount.mounted(await native.view("v", "b-c"), parent=base) as root:
        assert (root / "f").read_text() == "b"
        with pytest.raises(OSError) as e:
            (root / "g").write_text("no")
        assert e.value.errno == errno.EROFS
    with mount.mounted(await native.view("va", "a-c"), parent=base) as root:
        assert (root / "f").read_text() == "a"


def test_mounted_cleans_up_when_the_body_fails(base: Path) -> None:
    src = base / "src"
    src.mkdir()
    (src / "f").write_text("x")
    with pytest.raises(RuntimeError), \
            mount.mounted([Mount("bind", str(src), ["rbind", "ro"])], parent=base) as root:
        assert (root / "f").read_text() == "x"
        assert mount.mountpoints(root) == [str(root)]
        raise RuntimeError("body failed")
    assert mount.mountpoints(base) == []
    assert sorted(os.listdir(base)) == ["src"]


def test_mount_failure_leaves_nothing(base: Path) -> None:
    good = base / "good"
    good.mkdir()
    mounts = [Mount("bind", str(good), ["rbind"]),
              Mount("bind", str(base / "missing"), ["rbind"])]
    with pytest.raises(FileNotFoundError), mount.mounted(mounts, parent=base):
        pass
    assert mount.mountpoints(base) == []
    assert os.listdir(base) == ["good"]


def test_readonly_mounts_of_an_active_overlay(base: Path) -> None:
    for d in ("lower", "upper", "work"):
        (base / d).mkdir()
    (base / "lower" / "l").write_text("l")
    (base / "upper" / "u").write_text("u")
    m = Mount("overlay", "overlay", [f"workdir={base}/work", f"upperdir={base}/upper",
                                     f"lowerdir={base}/lower"])
    with mount.mounted([m], read_only=True, parent=base) as root:
        assert tree(root) == {"l": "l", "u": "u"}
        with pytest.raises(OSError) as e:
            (root / "x").write_text("no")
        assert e.value.errno == errno.EROFS
