"""Hostile image layers, end to end: ``ctr images import`` of crafted OCI archives.

Each archive holds an image whose layer carries one entry that tries to reach outside
the snapshot it is unpacked into: a ``..`` path, a write through a
symlink planted by the layer (``a -> dir`` then ``a/file``), a hard link to the host's
``/etc/shadow``, a whiteout of ``..``. A few harmless entries come first, so the bad
one arrives while the layer is half applied. ctr unpacks on import, through berthd's
Snapshots and Diff services; the import must fail with an error that names the entry,
leave no committed snapshot for the layer (the half-filled extraction snapshot is
removed), and change nothing outside the snapshot directories: the sentinel files the
test puts next to the daemon's root, and ``/etc/shadow`` (content, times, link count)
stay as they were. An absolute name is no escape: it is cleaned as a join rooted at the
snapshot, as containerd cleans it, and lands inside (``test_absolute_name_lands_inside``).

Paths that would land outside are aimed at the sentinel folder, never at files the
machine needs: a layer that got through would overwrite a sentinel, not the host. The
symlink aimed at the host's ``/etc`` only ever tries to create a new, uniquely named
file there.

How the real containerd 1.6.20 takes the same archives (recorded by hand with
``ctr images import`` into an isolated containerd, same cases; nothing outside its
root changed in any of them, but it confines where berth refuses):

- ``../escape``, the deep ``../../..`` path and the absolute path: cleaned as if rooted
  at the snapshot, the file lands inside it (``<fs>/escape``, ``<fs>/tmp/.../abs-path``);
  the import succeeds;
- ``a -> <dir>`` then ``a/passwd`` (also ``a/newdir/``, and ``a -> /etc`` then
  ``a/<probe>``): the link is followed but resolved inside the snapshot, so
  ``<fs>/<dir>/passwd`` is created next to the link; the import succeeds;
- a hard link to ``/etc/shadow`` (absolute, ``../``-climbing, or through an in-layer
  ``a -> /etc``): the target is looked up inside the snapshot, where it does not exist:
  "failed to extract layer ...: link <fs>/etc/shadow <fs>/shadow: no such file or
  directory";
- ``.wh...`` on top of a layer: "invalid whiteout name: .wh...: invalid archive"; as the
  first layer it fails too (inside a temporary mount); the ``../..`` whiteout is
  confined: it is recorded at ``<fs>/tmp/.../outside/victim`` inside the snapshot and
  the import succeeds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import daemons

pytestmark = [pytest.mark.root, pytest.mark.interop]

NAME = "docker.io/library/hostile:latest"
OVERLAY = "io.containerd.snapshotter.v1.overlayfs"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MTIME = 1704067200
DEEP = "../" * 24  # more than any snapshot directory is deep: from there on, "/"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- crafted layers ---------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    name: str
    kind: bytes = tarfile.REGTYPE
    link: str = ""
    data: bytes = b""
    mode: int | None = None  # by kind when None


def layer(entries: list[Entry]) -> bytes:
    """An uncompressed layer tar with exactly these names (tarfile would clean none)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.linkname, info.mtime = e.kind, e.link, MTIME
            info.mode = e.mode if e.mode is not None else \
                0o755 if e.kind in (tarfile.DIRTYPE, tarfile.SYMTYPE) else 0o644
            if e.kind == tarfile.REGTYPE:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def oci_archive(dest: Path, layers: list[bytes]) -> list[str]:
    """An OCI layout tar of an image made of ``layers`` (uncompressed tars, gzipped
    here; busybox's layer is passed as its gzip already); returns the diff IDs."""
    from tests.images import layer_gzip, layer_tar

    blobs, descs, diff_ids = {}, [], []
    for raw in layers:
        if raw == layer_tar():
            gz = layer_gzip()
        else:
            gz = gzip.compress(raw, mtime=0)
        blobs[sha256(gz)] = gz
        descs.append({"mediaType": OCI_LAYER_GZIP, "digest": sha256(gz), "size": len(gz)})
        diff_ids.append(sha256(raw))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = json.dumps({"architecture": arch, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": descs}).encode()
    blobs[sha256(config)] = config
    blobs[sha256(manifest)] = manifest
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest),
        "annotations": {"io.containerd.image.name": NAME,
                        "org.opencontainers.image.ref.name": "latest"}}]}).encode()
    files = {f"blobs/sha256/{d[7:]}": b for d, b in blobs.items()}
    files["index.json"] = index
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, MTIME
            tar.addfile(info, io.BytesIO(data))
    return diff_ids


# --- the cases ---------------------------------------------------------------------------

@dataclass
class Place:
    """Where the test runs: the daemon's folder and, beside it, the sentinels."""

    base: Path
    outside: Path  # sentinels: a layer that escaped would write or delete here
    probe: str     # a file name no one has in /etc

    @property
    def rel_outside(self) -> str:
        return DEEP + str(self.outside).lstrip("/")


GOOD = [Entry("etc/", tarfile.DIRTYPE), Entry("etc/motd", data=b"hello\n"),
        Entry("usr/", tarfile.DIRTYPE), Entry("usr/share/", tarfile.DIRTYPE)]


def case_entries(case: str, p: Place) -> tuple[list[Entry], str]:
    """The layer's entries (harmless ones first) and the name of the bad entry."""
    bad: list[Entry]
    if case == "dotdot":
        bad = [Entry("../escape", data=b"escaped\n")]
    elif case == "dotdot-deep":
        bad = [Entry(p.rel_outside + "/escape", data=b"escaped\n")]
    elif case == "symlink-parent":
        bad = [Entry("a", tarfile.SYMTYPE, str(p.outside / "etc")),
               Entry("a/passwd", data=b"root::0:0::/:/bin/sh\n")]
    elif case == "symlink-host-etc":
        bad = [Entry("a", tarfile.SYMTYPE, "/etc"), Entry(f"a/{p.probe}", data=b"x\n")]
    elif case == "symlink-dir-entry":
        # A directory entry below the link: mkdir through it would land outside.
        bad = [Entry("a", tarfile.SYMTYPE, str(p.outside)),
               Entry("a/newdir/", tarfile.DIRTYPE)]
    elif case == "hardlink-shadow":
        bad = [Entry("shadow", tarfile.LNKTYPE, "/etc/shadow")]
    elif case == "hardlink-shadow-dotdot":
        bad = [Entry("shadow", tarfile.LNKTYPE, DEEP + "etc/shadow")]
    elif case == "hardlink-via-symlink":
        # In-layer link whose target's parent is a symlink to the host's /etc.
        bad = [Entry("a", tarfile.SYMTYPE, "/etc"),
               Entry("shadow", tarfile.LNKTYPE, "a/shadow")]
    elif case == "whiteout-dotdot":
        bad = [Entry(".wh...")]
    elif case == "whiteout-outside":
        bad = [Entry(p.rel_outside + "/.wh.victim")]
    else:
        raise AssertionError(case)
    return GOOD + bad, bad[-1].name


# --- what must not change -----------------------------------------------------------------

def fingerprint(path: Path) -> dict[str, tuple[int, int, int, str]]:
    """mode, size, mtime and content hash of everything under ``path`` (and itself)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [".", *dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(Path(full).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(full)
            out[os.path.relpath(full, path)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def host_files() -> dict[str, tuple[int, int, int, int, str]]:
    out = {}
    for f in ("/etc/shadow", "/etc/passwd"):
        st = os.lstat(f)
        out[f] = (st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns,
                  hashlib.sha256(Path(f).read_bytes()).hexdigest())
    return out


@pytest.fixture
def place() -> Iterator[Place]:
    base = Path(tempfile.mkdtemp(prefix="berth-sec-", dir="/tmp"))
    outside = base / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc" / "passwd").write_text("sentinel passwd\n")
    (outside / "victim").write_text("must stay\n")
    (outside / "dir").mkdir()
    (outside / "dir" / "keep").write_text("keep me\n")
    p = Place(base, outside, f"berth-escape-probe-{uuid.uuid4().hex}")
    try:
        yield p
    finally:
        leaked = Path("/etc") / p.probe
        if leaked.exists():  # only a broken applier gets here; leave the host clean
            leaked.unlink()
        shutil.rmtree(base, ignore_errors=True)


CASES = [
    ("dotdot", "top"), ("dotdot-deep", "top"), ("dotdot-deep", "first"),
    ("symlink-parent", "top"), ("symlink-parent", "first"), ("symlink-host-etc", "top"),
    ("symlink-dir-entry", "top"),
    ("hardlink-shadow", "top"), ("hardlink-shadow-dotdot", "top"),
    ("hardlink-via-symlink", "top"),
    ("whiteout-dotdot", "top"), ("whiteout-dotdot", "first"), ("whiteout-outside", "top"),
]


def snapshot_keys(d: daemons.Daemon) -> list[tuple[str, str]]:
    r = daemons.ctr(d.address, "snapshots", "ls")
    assert r.rc == 0, r.err
    out = []
    for line in r.out.splitlines()[1:]:
        m = re.match(r"(.*?)\s+(sha256:[0-9a-f]{64})?\s*(Active|Committed|View)\s*$", line)
        assert m, line
        out.append((m.group(1).strip(), m.group(3)))
    return out


@pytest.mark.parametrize(("case", "position"), CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_hostile_layer_is_refused_and_nothing_outside_changes(
        case: str, position: str, place: Place) -> None:
    from tests.images import layer_tar

    entries, bad_name = case_entries(case, place)
    bad = layer(entries)
    layers = [bad] if position == "first" else [layer_tar(), bad]
    archive = place.base / "hostile.tar"
    diff_ids = oci_archive(archive, layers)
    bad_chain = sha256(f"{diff_ids[0]} {diff_ids[1]}".encode()) if len(diff_ids) == 2 \
        else diff_ids[0]

    d = daemons.berthd(place.base / "daemon").start()
    try:
        before_outside = fingerprint(place.outside)
        before_host = host_files()

        r = daemons.ctr(d.address, "images", "import", str(archive), timeout=120)

        assert r.rc != 0, f"the hostile layer was accepted: {r.out}"
        # ctr shows the daemon's message, which names the entry (quoted as Python does).
        assert "layer entry " + repr(bad_name.rstrip("/")) in r.err, r.err
        assert fingerprint(place.outside) == before_outside
        assert host_files() == before_host
        assert not (Path("/etc") / place.probe).exists()

        # No snapshot of the bad layer, committed or not: the half-filled extraction
        # snapshot was removed. The good layer below may still be there until garbage
        # collection takes it (the image record ctr made stays, as with containerd,
        # but nothing refers to snapshots of an image that never unpacked).
        keys = snapshot_keys(d)
        assert bad_chain not in [k for k, _ in keys]
        below = [(diff_ids[0], "Committed")] if position == "top" else []
        assert set(keys) <= set(below), keys
        # Once garbage collection has run, nothing is left in the snapshotter: no
        # directory of the layer, nothing written beside a snapshot's own tree
        # ("../escape" from an upper directory would land there).
        lease = daemons.ctr(d.address, "leases", "create").out.strip()
        assert daemons.ctr(d.address, "leases", "rm", "--sync", lease).rc == 0
        assert snapshot_keys(d) == []
        assert os.listdir(d.root / OVERLAY / "snapshots") == []
    finally:
        d.stop()


@pytest.mark.parametrize("position", ["top", "first"])
def test_absolute_name_lands_inside(position: str, place: Place) -> None:
    # Aimed at a sentinel outside, an absolute name is created at the same path below
    # the snapshot's root, as containerd does; nothing outside changes.
    from tests.images import layer_tar

    name = str(place.outside / "abs-path")
    bad = layer(GOOD + [Entry(name, data=b"inside\n")])
    layers = [bad] if position == "first" else [layer_tar(), bad]
    archive = place.base / "absolute.tar"
    oci_archive(archive, layers)
    d = daemons.berthd(place.base / "daemon").start()
    try:
        before_outside, before_host = fingerprint(place.outside), host_files()
        r = daemons.ctr(d.address, "images", "import", str(archive), timeout=120)
        assert r.rc == 0, r
        assert fingerprint(place.outside) == before_outside
        assert host_files() == before_host
        landed = list((d.root / OVERLAY / "snapshots").glob("*/fs" + name))
        assert [p.read_bytes() for p in landed] == [b"inside\n"], landed
    finally:
        d.stop()
