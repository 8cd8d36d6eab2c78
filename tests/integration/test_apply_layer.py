"""Applying layers onto real directories as root: every entry type, both whiteout
modes (checked through a real overlay mount), and crafted layers that try to reach
outside the target, each of which must fail and leave the outside untouched."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from berth.core import errdefs
from berth.plugins.differ import apply_blob, apply_layer
from berth.plugins.differ.apply import ApplyResult

pytestmark = pytest.mark.root

MODES = ["native", "overlay"]


class Layer:
    """A layer tar built in memory, entry by entry."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT,
                                 encoding="utf-8", errors="surrogateescape")
        self._data: bytes | None = None

    def add(self, name: str, type: bytes = tarfile.REGTYPE, data: bytes = b"", *,
            mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 1_600_000_000,
            linkname: str = "", dev: tuple[int, int] = (0, 0),
            xattrs: dict[str, bytes] | None = None, pax: dict[str, str] | None = None,
            ) -> Layer:
        info = tarfile.TarInfo(name)
        info.type = type
        info.size = len(data)
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname, info.gname = "someone", "somegroup"  # names must be ignored
        info.mtime = mtime
        info.linkname = linkname
        info.devmajor, info.devminor = dev
        headers = dict(pax or {})
        for key, value in (xattrs or {}).items():
            headers["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
        info.pax_headers = headers
        self._tar.addfile(info, io.BytesIO(data) if data else None)
        return self

    def file(self, name: str, data: bytes = b"", **kw: object) -> Layer:
        return self.add(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]

    def dir(self, name: str, **kw: object) -> Layer:
        kw.setdefault("mode", 0o755)
        return self.add(name, tarfile.DIRTYPE, **kw)  # type: ignore[arg-type]

    def symlink(self, name: str, target: str, **kw: object) -> Layer:
        kw.setdefault("mode", 0o777)
        return self.add(name, tarfile.SYMTYPE, linkname=target, **kw)  # type: ignore[arg-type]

    def link(self, name: str, target: str, **kw: object) -> Layer:
        return self.add(name, tarfile.LNKTYPE, linkname=target, **kw)  # type: ignore[arg-type]

    def bytes(self) -> bytes:
        if self._data is None:
            self._tar.close()
            self._data = self._buf.getvalue()
        return self._data


def apply(layer: Layer | bytes, target: Path, mode: str = "native", **kw: object) -> ApplyResult:
    data = layer.bytes() if isinstance(layer, Layer) else layer
    return apply_layer(io.BytesIO(data), target, mode=mode, **kw)  # type: ignore[arg-type]


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {a: os.getxattr(path, a, follow_symlinks=False)
            for a in os.listxattr(path, follow_symlinks=False)}


# -- the world around the target --------------------------------------------------

HOST_FILES = ["/etc/shadow", "/etc/passwd"]


@dataclass
class World:
    root: Path
    target: Path
    outside: Path

    def snapshot(self) -> dict[str, object]:
        """Everything under root except the target, plus the host files we aim at."""
        seen: dict[str, object] = {}
        for path in [self.root, *sorted(self.root.rglob("*"))]:
            if path == self.target or self.target in path.parents:
                continue
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            seen[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_ino,
                               st.st_mtime_ns, st.st_ctime_ns, content, xattrs_of(path))
        for host in HOST_FILES:
            st = os.lstat(host)
            seen[host] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_ino,
                          st.st_mtime_ns, st.st_ctime_ns)
        return seen


@pytest.fixture
def world(tmp_path: Path) -> World:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "victim").write_bytes(b"precious")
    os.chmod(outside / "victim", 0o600)
    (outside / "sub" / "deep").write_bytes(b"also precious")
    os.symlink("victim", outside / "alias")
    target = tmp_path / "target"
    target.mkdir()
    return World(tmp_path, target, outside)


def refused(world: World, layer: Layer, entry: str, needle: str, mode: str) -> None:
    """Apply ``layer``: it must fail naming ``entry`` and change nothing outside."""
    before = world.snapshot()
    with pytest.raises(errdefs.InvalidArgument) as info:
        apply(layer, world.target, mode)
    message = str(info.value)
    assert f"layer entry {entry!r}" in message
    assert needle in message
    assert info.value.code == errdefs.Code.INVALID_ARGUMENT
    assert world.snapshot() == before


# -- entry types ---------------------------------------------------------------------


def test_regular_file(world: World) -> None:
    data = os.urandom(3 << 20) + b"tail"  # crosses copy chunks
    layer = Layer().file("etc/data.bin", data, mode=0o640, uid=1234, gid=5678,
                         pax={"mtime": "1700000000.123456789"})
    apply(layer, world.target)
    path = world.target / "etc" / "data.bin"
    st = path.stat()
    assert st.st_mtime_ns == 1700000000_123456789
    assert st.st_atime_ns == 1700000000_123456789
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert path.read_bytes() == data


def test_special_mode_bits_survive_chown(world: World) -> None:
    layer = (Layer()
             .file("bin/su", b"#!", mode=0o4755, uid=1000, gid=1000)
             .file("bin/wall", b"#!", mode=0o2755, uid=1000, gid=5)
             .dir("tmp", mode=0o1777)
             .dir("srv", mode=0o2775, uid=3, gid=4))
    apply(layer, world.target)
    modes = {name: stat.S_IMODE((world.target / name).stat().st_mode)
             for name in ("bin/su", "bin/wall", "tmp", "srv")}
    assert modes == {"bin/su": 0o4755, "bin/wall": 0o2755, "tmp": 0o1777, "srv": 0o2775}
    assert (world.target / "bin" / "su").stat().st_uid == 1000


def test_directories_and_their_times(world: World) -> None:
    layer = (Layer()
             .dir("./", mode=0o700)  # the root entry is ignored, as containerd does
             .dir("usr", mode=0o755, mtime=1000)
             .dir("usr/lib", mode=0o750, uid=2, gid=3, mtime=2000)
             .file("usr/lib/a", b"a", mtime=3000)
             .file("usr/lib/b", b"b", mtime=4000)
             .file("opt/implicit/c", b"c"))
    apply(layer, world.target)
    lib = world.target / "usr" / "lib"
    assert lib.stat().st_mtime == 2000  # set after a and b were written into it
    assert (world.target / "usr").stat().st_mtime == 1000
    assert stat.S_IMODE(lib.stat().st_mode) == 0o750
    assert (lib.stat().st_uid, lib.stat().st_gid) == (2, 3)
    implicit = world.target / "opt" / "implicit"
    assert stat.S_IMODE(implicit.stat().st_mode) == 0o755
    assert (implicit.stat().st_uid, implicit.stat().st_gid) == (0, 0)
    assert stat.S_IMODE(world.target.stat().st_mode) != 0o700


def test_symlinks(world: World) -> None:
    layer = (Layer()
             .symlink("bin/sh", "/bin/busybox", uid=7, gid=8, mtime=5000)
             .symlink("lib", "usr/lib")
             .symlink("dangling", "../../nowhere"))
    apply(layer, world.target)
    sh = world.target / "bin" / "sh"
    assert os.readlink(sh) == "/bin/busybox"
    st = os.lstat(sh)
    assert (st.st_uid, st.st_gid, st.st_mtime) == (7, 8, 5000)
    assert os.readlink(world.target / "lib") == "usr/lib"
    assert os.readlink(world.target / "dangling") == "../../nowhere"


def test_hard_links(world: World) -> None:
    layer = (Layer()
             .file("usr/bin/python3.11", b"elf", mode=0o755)
             .link("usr/bin/python3", "usr/bin/python3.11", mode=0o755)
             .symlink("s", "/nowhere")
             .link("hs", "s"))
    apply(layer, world.target)
    a = os.lstat(world.target / "usr" / "bin" / "python3.11")
    b = os.lstat(world.target / "usr" / "bin" / "python3")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    # A hard link to a symlink is the symlink itself, not what it points at.
    assert os.lstat(world.target / "hs").st_ino == os.lstat(world.target / "s").st_ino


def test_hard_link_to_missing_target_fails(world: World) -> None:
    refused(world, Layer().link("a", "not/there"), "a",
            "hard link target 'not/there' not found", "native")
    refused(world, Layer().dir("d").link("a", "d"), "a", "is a directory", "native")


def test_device_nodes_and_fifos(world: World) -> None:
    layer = (Layer()
             .add("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
             .add("dev/loop0", tarfile.BLKTYPE, mode=0o660, gid=6, dev=(7, 0))
             .add("run/fifo", tarfile.FIFOTYPE, mode=0o620, uid=9))
    apply(layer, world.target)
    null = os.lstat(world.target / "dev" / "null")
    assert stat.S_ISCHR(null.st_mode) and stat.S_IMODE(null.st_mode) == 0o666
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    loop = os.lstat(world.target / "dev" / "loop0")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_gid == 6
    assert (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 0)
    fifo = os.lstat(world.target / "run" / "fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620
    assert fifo.st_uid == 9


# cap_net_bind_service, effective (a v2 vfs_cap_data).
CAPABILITY = ((0x02000000 | 1).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little")
              + bytes(12))


def test_xattrs(world: World) -> None:
    layer = (Layer()
             .file("bin/ping", b"elf", mode=0o755, uid=0,
                   xattrs={"security.capability": CAPABILITY, "user.bin": b"\xff\x00\x01",
                           "user.text": "héllo".encode(),
                           "trusted.overlay.opaque": b"y"})
             .dir("d", xattrs={"user.dir": b"1"}))
    apply(layer, world.target)
    got = xattrs_of(world.target / "bin" / "ping")
    assert got["security.capability"] == CAPABILITY
    assert got["user.bin"] == b"\xff\x00\x01"
    assert got["user.text"] == "héllo".encode()
    assert not any(a.startswith("trusted.") for a in got)  # a layer may not set them
    assert xattrs_of(world.target / "d")["user.dir"] == b"1"


def test_diff_id_and_size(world: World, tmp_path: Path) -> None:
    layer = Layer().file("a", b"x" * 5000).dir("b").bytes()
    expected = "sha256:" + hashlib.sha256(layer).hexdigest()
    result = apply(layer, world.target)
    assert result == ApplyResult(size=len(layer), diff_id=expected)
    blobs = {"gzip": gzip.compress(layer), "zstd": zstandard.compress(layer)}
    for name, blob in blobs.items():
        target = tmp_path / name
        target.mkdir()
        media = "application/vnd.oci.image.layer.v1.tar+" + name
        got = apply_blob(io.BytesIO(blob), target, media_type=media)
        assert got == result
        assert (target / "a").read_bytes() == b"x" * 5000


def test_empty_blob_is_an_empty_layer(world: World) -> None:
    assert apply(b"", world.target) == ApplyResult(
        0, "sha256:" + hashlib.sha256(b"").hexdigest())
    assert list(world.target.iterdir()) == []


def test_truncated_and_garbage_layers_fail(world: World) -> None:
    layer = Layer().file("big", os.urandom(100_000)).bytes()
    with pytest.raises(errdefs.InvalidArgument, match="'big': unexpected end of tar data"):
        apply(layer[:50_000], world.target)
    with pytest.raises(errdefs.InvalidArgument, match="invalid layer tar"):
        apply(b"this is not a tar archive" * 100, world.target)
    with pytest.raises(errdefs.InvalidArgument, match="gzip stream"):
        apply_blob(io.BytesIO(gzip.compress(layer)[:-100]), world.target)


def test_unknown_media_type_is_refused(world: World) -> None:
    with pytest.raises(errdefs.NotImplemented_):
        apply_blob(io.BytesIO(b""), world.target,
                   media_type="application/vnd.oci.image.manifest.v1+json")


def test_replacing_existing_entries(world: World) -> None:
    apply(Layer().dir("d", mode=0o700).file("d/keep", b"k").file("f", b"f")
          .dir("tree").file("tree/x/y", b"y").file("becomes_dir", b"z"), world.target)
    apply(Layer().dir("d", mode=0o751, uid=5)  # two directories merge
          .file("tree", b"now a file")  # a file replaces a whole tree
          .dir("becomes_dir")
          .symlink("f", "elsewhere"), world.target)
    d = world.target / "d"
    assert (d / "keep").read_bytes() == b"k"
    assert stat.S_IMODE(d.stat().st_mode) == 0o751 and d.stat().st_uid == 5
    assert (world.target / "tree").read_bytes() == b"now a file"
    assert (world.target / "becomes_dir").is_dir()
    assert os.readlink(world.target / "f") == "elsewhere"


# -- whiteouts, native mode ----------------------------------------------------------------


def lower_tree(target: Path) -> None:
    apply(Layer().file("etc/shadow", b"s").file("etc/keep", b"k")
          .file("var/cache/a/b", b"b").file("var/cache/c", b"c")
          .file("opt/old1", b"1").file("opt/old2/sub", b"2"), target)


def test_native_whiteouts_delete(world: World) -> None:
    lower_tree(world.target)
    apply(Layer().file("etc/.wh.shadow").file("var/.wh.cache")
          .file("nothere/.wh.x").file("etc/.wh.missing"), world.target)
    assert sorted(p.name for p in (world.target / "etc").iterdir()) == ["keep"]
    assert list((world.target / "var").iterdir()) == []
    assert not (world.target / "nothere").exists()  # no parent made for nothing


def test_native_opaque_keeps_only_this_layer(world: World) -> None:
    lower_tree(world.target)
    # The marker may come after entries of the same directory: those stay.
    apply(Layer().file("opt/new1", b"n1").file("opt/old2/fresh", b"f")
          .file("opt/.wh..wh..opq").file("opt/new2", b"n2"), world.target)
    opt = world.target / "opt"
    assert sorted(str(p.relative_to(opt)) for p in opt.rglob("*")) == [
        "new1", "new2", "old2", "old2/fresh"]


def test_whiteout_never_hides_its_own_layer(world: World) -> None:
    for mode in MODES:
        target = world.root / f"own-{mode}"
        target.mkdir()
        apply(Layer().file("f", b"mine").file(".wh.f"), target, mode)
        assert (target / "f").read_bytes() == b"mine"


# -- whiteouts, overlay mode ---------------------------------------------------------------


@pytest.fixture
def overlay_mount(tmp_path: Path) -> Iterator[callable]:
    mounted: list[Path] = []

    def mount(*lowers: Path) -> Path:
        merged = tmp_path / f"merged{len(mounted)}"
        merged.mkdir()
        lowerdir = ":".join(str(p) for p in lowers)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}",
                        str(merged)], check=True)
        mounted.append(merged)
        return merged

    yield mount
    for merged in mounted:
        subprocess.run(["umount", str(merged)], check=True)


def test_overlay_whiteouts_through_a_real_mount(world: World, tmp_path: Path,
                                                overlay_mount: callable) -> None:
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    l1.mkdir()
    l2.mkdir()
    lower_tree(l1)
    apply(Layer().file("etc/.wh.shadow", uid=3, gid=4).file("var/.wh.cache")
          .file("opt/new1", b"n1").file("opt/.wh..wh..opq"), l2, "overlay")

    whiteout = os.lstat(l2 / "etc" / "shadow")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert (whiteout.st_uid, whiteout.st_gid) == (3, 4)
    assert os.getxattr(l2 / "opt", "trusted.overlay.opaque") == b"y"

    merged = overlay_mount(l2, l1)
    assert sorted(p.name for p in (merged / "etc").iterdir()) == ["keep"]
    assert list((merged / "var").iterdir()) == []
    assert sorted(p.name for p in (merged / "opt").iterdir()) == ["new1"]


def test_overlay_parents_give_implicit_directories_their_metadata(world: World,
                                                                  tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    apply(Layer().dir("usr", mode=0o711, uid=1, gid=2, mtime=1111)
          .dir("usr/share", mode=0o750, uid=3, gid=4, mtime=2222,
               xattrs={"user.k": b"v"}), lower, "overlay")
    os.setxattr(lower / "usr" / "share", "trusted.berth.test", b"t")
    apply(Layer().file("usr/share/doc/x", b"x").file("new/y", b"y"), upper, "overlay",
          parents=[lower])
    share = (upper / "usr" / "share").stat()
    assert (stat.S_IMODE(share.st_mode), share.st_uid, share.st_gid) == (0o750, 3, 4)
    assert xattrs_of(upper / "usr" / "share") == {"user.k": b"v"}  # not trusted.*
    usr = (upper / "usr").stat()
    assert (stat.S_IMODE(usr.st_mode), usr.st_uid, usr.st_gid) == (0o711, 1, 2)
    new = (upper / "new").stat()
    assert (stat.S_IMODE(new.st_mode), new.st_uid) == (0o755, 0)


def test_layer_cannot_forge_overlay_xattrs(world: World) -> None:
    apply(Layer().dir("d", xattrs={"trusted.overlay.opaque": b"y",
                                   "trusted.overlay.redirect": b"/etc"}), world.target,
          "overlay")
    assert xattrs_of(world.target / "d") == {}


# -- crafted layers --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_dotdot_escape(world: World, mode: str) -> None:
    refused(world, Layer().file("../outside/victim", b"pwned"), "../outside/victim",
            "contains '..'", mode)
    refused(world, Layer().file("a/../../escape", b"x"), "a/../../escape", "contains '..'",
            mode)
    assert not (world.root / "escape").exists()


@pytest.mark.parametrize("mode", MODES)
def test_absolute_path_lands_inside(world: World, mode: str) -> None:
    # containerd cleans names as a join rooted at the layer: an absolute name aimed at a
    # file outside is created at the same path below the target, and nothing outside moves.
    name = str(world.outside / "victim")
    before = world.snapshot()
    apply(Layer().file(name, b"inside").file("/etc/x", b"x").file("./etc/y", b"y")
          .link("/etc/z", "/etc/x"), world.target, mode)
    assert world.snapshot() == before
    assert (world.target / name.lstrip("/")).read_bytes() == b"inside"
    assert (world.target / "etc" / "y").read_bytes() == b"y"
    assert os.stat(world.target / "etc" / "z").st_ino == os.stat(world.target / "etc/x").st_ino


@pytest.mark.parametrize("mode", MODES)
def test_dotdot_that_stays_inside(world: World, mode: str) -> None:
    before = world.snapshot()
    apply(Layer().dir("a").file("a/../b", b"b").file("a/c/../d", b"d"), world.target, mode)
    assert world.snapshot() == before
    assert (world.target / "b").read_bytes() == b"b"
    assert (world.target / "a" / "d").read_bytes() == b"d"
    assert not (world.target / "a" / "c").exists()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("link", ["abs", "rel"])
def test_file_through_symlinked_parent(world: World, mode: str, link: str) -> None:
    target = str(world.outside) if link == "abs" else "../outside"
    layer = Layer().symlink("a", target).file("a/victim", b"pwned", mode=0o777, uid=1234)
    refused(world, layer, "a/victim", "parent 'a' is a symlink", mode)


@pytest.mark.parametrize("mode", MODES)
def test_symlink_parent_chains(world: World, mode: str) -> None:
    refused(world, Layer().symlink("x", "y").symlink("y", "../outside").file("x/new", b"!"),
            "x/new", "parent 'x' is a symlink", mode)
    refused(world, Layer().dir("d").symlink("d/l", "../../outside")
            .add("d/l/sub/node", tarfile.FIFOTYPE), "d/l/sub/node",
            "parent 'd/l' is a symlink", mode)
    # A directory replaced by a symlink later in the same layer must not keep
    # serving as a parent (the unpacker caches directory fds).
    refused(world, Layer().dir("c").file("c/ok", b"ok").symlink("c", str(world.outside))
            .file("c/victim", b"pwned"), "c/victim", "parent 'c' is a symlink", mode)


@pytest.mark.parametrize("mode", MODES)
def test_symlink_planted_by_a_lower_layer(world: World, mode: str) -> None:
    os.symlink(world.outside, world.target / "etc")
    refused(world, Layer().file("etc/victim", b"pwned"), "etc/victim",
            "parent 'etc' is a symlink", mode)
    refused(world, Layer().dir("etc/sub"), "etc/sub", "parent 'etc' is a symlink", mode)


@pytest.mark.parametrize("mode", MODES)
def test_hard_link_to_host_shadow(world: World, mode: str) -> None:
    # Absolute: looked up inside the target, where there is no etc/shadow.
    refused(world, Layer().link("shadow", "/etc/shadow"), "shadow",
            "hard link target 'etc/shadow' not found in the layer", mode)
    refused(world, Layer().link("shadow", "../../../../../../../../etc/shadow"), "shadow",
            "contains '..'", mode)
    refused(world, Layer().symlink("e", "/etc").link("shadow", "e/shadow"), "shadow",
            "parent 'e' is a symlink", mode)
    refused(world, Layer().symlink("o", "../outside").link("v", "o/victim"), "v",
            "parent 'o' is a symlink", mode)


@pytest.mark.parametrize("mode", MODES)
def test_hard_link_to_a_symlink_does_not_reach_its_target(world: World, mode: str) -> None:
    before = world.snapshot()
    apply(Layer().symlink("s", str(world.outside / "victim"))
          .link("h", "s", mode=0o777, uid=1234), world.target, mode)
    assert world.snapshot() == before
    assert os.path.islink(world.target / "h")


@pytest.mark.parametrize("mode", MODES)
def test_symlink_as_final_component_is_replaced_not_followed(world: World, mode: str) -> None:
    victim = str(world.outside / "victim")
    before = world.snapshot()
    apply(Layer().symlink("f", victim).file("f", b"new", mode=0o777, uid=1234)
          .symlink("d", str(world.outside)).dir("d", mode=0o700, uid=1234)
          .symlink("p", victim).add("p", tarfile.FIFOTYPE, mode=0o777)
          .file("real", b"r").symlink("l", victim).link("l", "real"), world.target, mode)
    assert world.snapshot() == before
    assert (world.target / "f").read_bytes() == b"new"
    assert not (world.target / "f").is_symlink()
    assert (world.target / "d").is_dir() and not (world.target / "d").is_symlink()
    assert stat.S_ISFIFO(os.lstat(world.target / "p").st_mode)
    assert os.lstat(world.target / "l").st_ino == os.lstat(world.target / "real").st_ino


@pytest.mark.parametrize("mode", MODES)
def test_whiteout_of_dotdot(world: World, mode: str) -> None:
    refused(world, Layer().file("a/.wh.."), "a/.wh..", "invalid whiteout", mode)
    refused(world, Layer().file("a/.wh..."), "a/.wh...", "invalid whiteout", mode)
    refused(world, Layer().file(".wh.."), ".wh..", "invalid whiteout", mode)


@pytest.mark.parametrize("mode", MODES)
def test_whiteouts_through_symlinked_parent(world: World, mode: str) -> None:
    refused(world, Layer().symlink("a", str(world.outside)).file("a/.wh.victim"),
            "a/.wh.victim", "parent 'a' is a symlink", mode)
    # In native mode an opaque marker deletes everything below: through a link
    # that would wipe the outside directory.
    refused(world, Layer().symlink("a", "../outside").file("a/.wh..wh..opq"),
            "a/.wh..wh..opq", "parent 'a' is a symlink", mode)


# -- making layers ---------------------------------------------------------------------


def tree_of(root: Path) -> dict[str, object]:
    """What a layer can carry about a tree (dir mtimes left out: they follow content)."""
    out: dict[str, object] = {}
    inodes: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        rel = str(path.relative_to(root))
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        link_of = inodes.setdefault(st.st_ino, rel) if not stat.S_ISDIR(st.st_mode) else None
        mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns // 10**9
        caps = (os.getxattr(path, "security.capability", follow_symlinks=False)
                if "security.capability" in os.listxattr(path, follow_symlinks=False) else None)
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, mtime, content, link_of, caps)
    return out


def test_write_diff_round_trips(tmp_path: Path) -> None:
    from berth.core.archive.diff import write_diff

    lower, upper, rebuilt = tmp_path / "lower", tmp_path / "upper", tmp_path / "rebuilt"
    lower.mkdir()
    apply(Layer().file("etc/passwd", b"root", mode=0o644).file("etc/shadow", b"s", mode=0o600)
          .file("bin/ping", b"elf", mode=0o4755, uid=1, xattrs={"security.capability": CAPABILITY})
          .file("bin/a", b"same inode").link("bin/b", "bin/a")
          .file("var/cache/x/y", b"y").file("var/cache/z", b"z")
          .file("swap/dir_to_file/inner", b"i").file("swap/file_to_dir", b"f")
          .symlink("lib", "usr/lib").add("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
          .add("run/fifo", tarfile.FIFOTYPE).file("untouched/u", b"u"), lower)
    for dst in (upper, rebuilt):
        subprocess.run(["cp", "-a", f"{lower}/.", str(dst)], check=True)

    (upper / "etc" / "passwd").write_bytes(b"root\nuser")
    (upper / "etc" / "shadow").unlink()
    subprocess.run(["rm", "-rf", str(upper / "var" / "cache")], check=True)
    (upper / "new" / "deep").mkdir(parents=True)
    (upper / "new" / "deep" / "file").write_bytes(b"n")
    subprocess.run(["rm", "-rf", str(upper / "swap" / "dir_to_file")], check=True)
    (upper / "swap" / "dir_to_file").write_bytes(b"now a file")
    (upper / "swap" / "file_to_dir").unlink()
    (upper / "swap" / "file_to_dir").mkdir(mode=0o710)
    os.chown(upper / "bin" / "ping", 1, 2)
    os.chmod(upper / "bin" / "ping", 0o4755)
    os.setxattr(upper / "bin" / "ping", "security.capability", CAPABILITY)  # chown dropped it
    os.link(upper / "bin" / "a", upper / "bin" / "c")  # a new link to an unchanged file
    os.symlink("elsewhere", upper / "lib2")

    out = io.BytesIO()
    write_diff(lower, upper, out)
    members = list(tarfile.open(fileobj=io.BytesIO(out.getvalue())))
    # containerd's order: parents first, whiteouts for removed paths only (nothing
    # below var/cache), and an unchanged file that gained a link (bin/a, bin/b) is
    # written as links to the new name.
    assert [m.name for m in members] == [
        "bin", "bin/c", "bin/a", "bin/b", "bin/ping", "etc", "etc/passwd", "etc/.wh.shadow",
        "lib2", "new", "new/deep", "new/deep/file", "swap", "swap/dir_to_file",
        "swap/file_to_dir", "var", "var/.wh.cache"]
    by_name = {m.name: m for m in members}
    assert by_name["bin/a"].islnk() and by_name["bin/a"].linkname == "bin/c"
    assert by_name["bin/ping"].pax_headers["SCHILY.xattr.security.capability"].encode(
        "utf-8", "surrogateescape") == CAPABILITY
    assert (by_name["bin/ping"].uid, by_name["bin/ping"].gid) == (1, 2)

    apply(out.getvalue(), rebuilt, "native")
    assert tree_of(rebuilt) == tree_of(upper)


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_from_gnu_tar(tmp_path: Path, fmt: str) -> None:
    src, target = tmp_path / "src", tmp_path / "target"
    src.mkdir()
    target.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(5 << 20)
        f.write(b"middle")
        f.seek(9 << 20)
        f.write(b"tail")
    blob = subprocess.run(["tar", "--sparse", f"--format={fmt}", "--numeric-owner", "-C",
                           str(src), "-cf", "-", "sparse"], check=True,
                          capture_output=True).stdout
    assert len(blob) < 1 << 20  # the holes really are left out of the archive
    apply(blob, target)
    assert (target / "sparse").read_bytes() == (src / "sparse").read_bytes()
