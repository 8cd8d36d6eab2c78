"""Odd but legal layer entry names, imported by the real ``ctr`` into berthd and containerd.

Issue 8.9: berth refused entries named ``/etc/x`` or ``./etc/x``; containerd's archive
package cleans every name as a join rooted at the layer (and so do old image builders'
layers rely on). The same single-layer image goes into both daemons with
``ctr images import``; the trees the overlayfs snapshotters hold afterwards must be the
same: names, types, modes, owners, contents, link targets, hard link groups, file times.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tests import daemons
from tests.daemons import Daemon
from tests.interop.test_images_security import OVERLAY, Entry, layer, oci_archive

pytestmark = [pytest.mark.root, pytest.mark.interop]


def E(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "",
      mode: int = 0o644) -> Entry:
    return Entry(name, kind, link, data, mode)


ODD = [
    E("./", tarfile.DIRTYPE, mode=0o755),              # the root: ignored by both
    E("/", tarfile.DIRTYPE, mode=0o700),
    E("/etc/abs", data=b"absolute\n"),                 # parent made implicitly
    E("./etc/dot", data=b"dot\n", mode=0o600),
    E("/abs-dir/", tarfile.DIRTYPE, mode=0o750),
    E("/abs-dir/f", data=b"in abs dir\n"),
    E("dup", data=b"one\n"),                           # the later entry wins
    E("dup", data=b"two, longer\n", mode=0o640),
    E("dupdir/", tarfile.DIRTYPE, mode=0o700),         # two dirs merge, last mode wins
    E("dupdir/keep", data=b"keep\n"),
    E("dupdir/", tarfile.DIRTYPE, mode=0o751),
    E("rep", data=b"file first\n"),                    # a file replaced by a directory
    E("rep/", tarfile.DIRTYPE, mode=0o755),
    E("rep/in", data=b"in\n"),
    E("sym", data=b"file, then a symlink\n"),
    E("sym", tarfile.SYMTYPE, link="/etc/abs", mode=0o777),
    E("a/../b", data=b"b\n"),                          # .. that stays inside
    E("c/", tarfile.DIRTYPE, mode=0o755),
    E("c/x/../d", data=b"d\n"),
    E("e/f/../../g", data=b"g\n"),
    E("/etc/hl", tarfile.LNKTYPE, link="/etc/abs"),    # absolute hard link target
    E("./etc/hl2", tarfile.LNKTYPE, link="etc/./dot"),
    E("h/../etc/hl3", tarfile.LNKTYPE, link="/x/../etc/abs"),
    E("/lnk", tarfile.SYMTYPE, link="../../etc/abs", mode=0o777),  # symlink text is content
    E("//double//slash//f", data=b"slashes\n"),
]


def tree(fs: Path) -> dict[str, tuple]:
    """What a snapshot holds, comparable across daemons (directory times aside: a parent
    made implicitly gets the time of the import)."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(fs):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(fs))
            st = full.lstat()
            kind = stat.S_IFMT(st.st_mode)
            content = ""
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(full.read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content, mtime)
    links = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    out["<hard link groups>"] = tuple(tuple(g) for g in links)
    return out


def imported_tree(d: Daemon, archive: Path) -> dict[str, tuple]:
    r = daemons.ctr(d.address, "images", "import", str(archive), timeout=120)
    assert r.rc == 0, (d.name, r)
    snaps = d.root / OVERLAY / "snapshots"
    dirs = [p for p in snaps.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs  # one layer, one committed snapshot
    return tree(dirs[0] / "fs")


def test_odd_layer_names_unpack_as_in_containerd(berthd: Daemon, containerd: Daemon,
                                                  tmp_path: Path) -> None:
    archive = tmp_path / "odd.tar"
    oci_archive(archive, [layer(ODD)])
    got, want = imported_tree(berthd, archive), imported_tree(containerd, archive)
    assert got == want
    # And the tree is what the names say, not an empty agreement.
    assert {"etc/abs", "etc/dot", "abs-dir/f", "dup", "b", "c/d", "g", "double/slash/f",
            "rep/in", "dupdir/keep", "etc/hl", "etc/hl2", "etc/hl3", "lnk"} <= set(got)
    assert got["<hard link groups>"] == (("etc/abs", "etc/hl", "etc/hl3"), ("etc/dot", "etc/hl2"))
    assert got["dupdir"][1] == 0o751 and got["sym"][4] == "/etc/abs"
