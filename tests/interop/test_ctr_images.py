"""Images through the real ctr against berthd, and berthd against the real containerd.

ctr does the image work client-side (import, pull, push, export, unpack) over the
Content, Images, Snapshots, Diff and Leases services, so these scenarios check that
berthd's services carry it. The differential ones import the same archives into the
real containerd and into berthd and compare what a client sees: image digests, the
content list with its labels, the snapshot chain.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import daemons

if TYPE_CHECKING:
    from tests.images import Image, RegistryServer

# The busybox archives and the registry are fixtures of tests/images.py (imported by
# pytest as a plugin, so this module imports from it only inside tests).
pytest_plugins = ("tests.images",)
pytestmark = [pytest.mark.interop]

NAME = "docker.io/library/busybox:latest"


def ctr(d: daemons.Daemon, *args: str, ok: bool = True) -> daemons.Result:
    r = daemons.ctr(d.address, *args, timeout=120)
    if ok:
        assert r.rc == 0, f"ctr {' '.join(args)}: {r.err}\n{d.logs()[-3000:]}"
    return r


def berth(d: daemons.Daemon, *args: str, ok: bool = True) -> daemons.Result:
    r = daemons.berth(d.address, *args, timeout=120)
    if ok:
        assert r.rc == 0, f"berth {' '.join(args)}: {r.err}\n{r.out}\n{d.logs()[-3000:]}"
    return r


def images(d: daemons.Daemon) -> dict[str, tuple[str, str]]:
    """name -> (media type, digest) from ``ctr images ls``."""
    out = {}
    for line in ctr(d, "images", "ls").out.splitlines()[1:]:
        name, mt, digest = line.split()[:3]
        out[name] = (mt, digest)
    return out


def content(d: daemons.Daemon, ns: str = "default") -> dict[str, dict[str, str]]:
    """digest -> labels from ``ctr content ls`` (tab separated: digest, size, age, labels)."""
    out = {}
    for line in ctr(d, "--namespace", ns, "content", "ls").out.splitlines()[1:]:
        cols = line.split("\t")
        labels = {}
        if cols[-1].strip() not in ("", "-"):
            for kv in cols[-1].strip().split(","):
                k, _, v = kv.partition("=")
                labels[k] = v
        out[cols[0]] = labels
    return out


def snapshots(d: daemons.Daemon) -> list[tuple[str, ...]]:
    return sorted(tuple(line.split()) for line in
                  ctr(d, "snapshots", "ls").out.splitlines()[1:])


def collect_garbage(d: daemons.Daemon) -> None:
    """A synchronous collection: delete a fresh lease with --sync."""
    lease = ctr(d, "leases", "create").out.strip()
    ctr(d, "leases", "rm", "--sync", lease)


def distribution_labels(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k.startswith("containerd.io/distribution")}


# --- import ---------------------------------------------------------------------------------

def test_ctr_import_unpacks_into_berthd(berthd: daemons.Daemon,
                                        busybox_oci: tuple[Path, Image]) -> None:
    path, img = busybox_oci
    r = ctr(berthd, "images", "import", str(path))
    assert f"unpacking {NAME} ({img.manifest_digest})...done" in r.out
    assert images(berthd) == {NAME: ("application/vnd.oci.image.manifest.v1+json",
                                     img.manifest_digest)}
    assert snapshots(berthd) == [(img.chain_id, "Committed")]
    tree = ctr(berthd, "snapshots", "tree").out
    assert tree.strip() == img.chain_id
    info = content(berthd)
    assert info[img.layer_digest]["containerd.io/uncompressed"] == img.diff_id
    assert info[img.config_digest]["containerd.io/gc.ref.snapshot.overlayfs"] == img.chain_id
    assert info[img.manifest_digest] == {
        "containerd.io/gc.ref.content.config": img.config_digest,
        "containerd.io/gc.ref.content.l.0": img.layer_digest,
    }
    # The blob ctr reads back is the one it imported.
    got = subprocess.run([daemons.CTR, "--address", str(berthd.address), "content", "get",
                          img.layer_digest], capture_output=True, timeout=60)
    assert got.returncode == 0 and got.stdout == img.layer


@pytest.mark.parametrize("archive", ["oci", "docker"])
def test_import_matches_containerd(archive: str, berthd: daemons.Daemon,
                                   containerd: daemons.Daemon,
                                   busybox_oci: tuple[Path, Image],
                                   busybox_docker: tuple[Path, Image]) -> None:
    path, _ = busybox_oci if archive == "oci" else busybox_docker
    ctr(containerd, "images", "import", str(path))
    berth(berthd, "images", "import", str(path))
    # ctr against berthd, in another namespace, must agree as well.
    ctr(berthd, "--namespace", "viactr", "images", "import", str(path))
    for d in (containerd, berthd):
        collect_garbage(d)
    want = images(containerd)
    assert want and images(berthd) == want
    assert content(berthd) == content(containerd)
    assert snapshots(berthd) == snapshots(containerd)
    via_ctr = daemons.ctr(berthd.address, "images", "ls", namespace="viactr").out
    assert want[NAME][1] in via_ctr


# --- registry ---------------------------------------------------------------------------------

def test_ctr_pull_push_and_fetch(berthd: daemons.Daemon, registry: RegistryServer,
                                 busybox_oci: tuple[Path, Image]) -> None:
    from tests.images import push_image

    _, img = busybox_oci
    push_image(registry, "busybox", "latest", img)
    ref = f"{registry.host}/busybox:latest"
    r = ctr(berthd, "images", "pull", "--plain-http", ref)
    assert "done" in r.out
    assert images(berthd)[ref] == ("application/vnd.oci.image.manifest.v1+json",
                                   img.manifest_digest)
    assert snapshots(berthd) == [(img.chain_id, "Committed")]
    info = content(berthd)
    # containerd keys the label by host name, without the port.
    source = "containerd.io/distribution.source.127.0.0.1"
    for digest in (img.manifest_digest, img.config_digest, img.layer_digest):
        assert distribution_labels(info[digest]) == {source: "busybox"}

    # berth's pull leaves the content labelled exactly as ctr's does.
    berth(berthd, "--namespace", "viaberth", "images", "pull", "--plain-http", ref)
    assert content(berthd, "viaberth") == info

    # Push under another name; fetching it back gives the same blobs.
    copy = f"{registry.host}/copy:v1"
    ctr(berthd, "images", "push", "--plain-http", copy, ref)
    ctr(berthd, "--namespace", "fetched", "content", "fetch", "--plain-http", copy)
    fetched = content(berthd, "fetched")
    for digest in (img.manifest_digest, img.config_digest, img.layer_digest):
        assert distribution_labels(fetched[digest]) == {source: "copy"}


def test_index_pull_matches_containerd(berthd: daemons.Daemon, containerd: daemons.Daemon,
                                      registry: RegistryServer) -> None:
    """An index with two platforms: only this machine's manifest is fetched and
    unpacked, and the index keeps GC references to both, as containerd's pull does."""
    from tests.images import multi_platform_image, push_image

    img = multi_platform_image()
    push_image(registry, "multi", "latest", img)
    ref = f"{registry.host}/multi:latest"
    ctr(containerd, "images", "pull", "--plain-http", ref)
    berth(berthd, "images", "pull", "--plain-http", ref)
    ctr(berthd, "--namespace", "viactr", "images", "pull", "--plain-http", ref)
    want = content(containerd)
    index_digest = images(containerd)[ref][1]
    other, host = (hashlib.sha256(m).hexdigest() for _, m in img.children)
    assert want[index_digest]["containerd.io/gc.ref.content.m.0"] == f"sha256:{other}"
    assert want[index_digest]["containerd.io/gc.ref.content.m.1"] == f"sha256:{host}"
    assert img.layer_digest in want and len(want) == 4  # index, manifest, config, layer
    assert content(berthd) == want
    assert content(berthd, "viactr") == want
    assert images(berthd) == images(containerd)
    assert snapshots(berthd) == snapshots(containerd) == [(img.chain_id, "Committed")]


def test_ctr_export_reimports_into_containerd(berthd: daemons.Daemon,
                                              containerd: daemons.Daemon,
                                              busybox_oci: tuple[Path, Image],
                                              tmp_path: Path) -> None:
    path, img = busybox_oci
    ctr(berthd, "images", "import", str(path))
    out = tmp_path / "export.tar"
    ctr(berthd, "images", "export", str(out), NAME)
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    for digest in (img.manifest_digest, img.config_digest, img.layer_digest):
        assert f"blobs/sha256/{digest.split(':')[1]}" in names
    assert {"index.json", "oci-layout", "manifest.json"} <= names
    ctr(containerd, "images", "import", str(out))
    assert images(containerd)[NAME][1] == img.manifest_digest


# --- removal and garbage collection -------------------------------------------------------

def test_ctr_rm_collects_content_and_snapshots(berthd: daemons.Daemon,
                                               busybox_oci: tuple[Path, Image]) -> None:
    path, img = busybox_oci
    ctr(berthd, "images", "import", str(path))
    assert img.layer_digest in content(berthd)
    ctr(berthd, "images", "rm", "--sync", NAME)
    assert images(berthd) == {}
    assert content(berthd) == {}
    assert snapshots(berthd) == []


# --- mount ---------------------------------------------------------------------------------

@pytest.mark.root
def test_ctr_images_mount_shows_busybox(berthd: daemons.Daemon,
                                        busybox_oci: tuple[Path, Image],
                                        tmp_path: Path) -> None:
    path, img = busybox_oci
    ctr(berthd, "images", "import", str(path))
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        r = ctr(berthd, "images", "mount", NAME, str(target))
        assert img.chain_id in r.out
        assert (target / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
        assert os.readlink(target / "bin" / "ls") == "/bin/busybox"
        assert (target / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    finally:
        ctr(berthd, "images", "unmount", "--rm", str(target), ok=False)
    assert not os.path.ismount(target)
    assert str(target) not in [s[0] for s in snapshots(berthd)]


# --- diff ----------------------------------------------------------------------------------

def _layer_entries(data: bytes) -> list[tuple[str, bytes]]:
    import gzip
    import io

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        return sorted((m.name, m.type) for m in tar.getmembers())


def _changed_layer(d: daemons.Daemon, chain: str, mnt: Path) -> list[tuple[str, bytes]]:
    """Prepare on ``chain``, change the tree through a real mount, diff it with ctr."""
    ctr(d, "snapshots", "prepare", "work", chain)
    mounts = ctr(d, "snapshots", "mounts", str(mnt), "work").out.strip()
    mnt.mkdir(exist_ok=True)
    subprocess.run(mounts, shell=True, check=True)
    try:
        (mnt / "etc" / "motd").write_text("changed\n")
        os.unlink(mnt / "etc" / "hostname")
        os.mkdir(mnt / "srv")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    r = subprocess.run([daemons.CTR, "--address", str(d.address), "snapshots", "diff",
                        "--keep", "work"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return _layer_entries(r.stdout)


@pytest.mark.root
def test_ctr_snapshots_diff_matches_containerd(berthd: daemons.Daemon,
                                               containerd: daemons.Daemon,
                                               busybox_oci: tuple[Path, Image],
                                               tmp_path: Path) -> None:
    path, img = busybox_oci
    got = {}
    for d in (containerd, berthd):
        ctr(d, "images", "import", str(path))
        got[d.name] = _changed_layer(d, img.chain_id, tmp_path / d.name)
    assert ("etc/.wh.hostname", tarfile.REGTYPE) in got["berth"]
    assert ("etc/motd", tarfile.REGTYPE) in got["berth"]
    assert got["berth"] == got["containerd"]
    # The kept diff is content labelled with its uncompressed digest, as containerd's.
    def kept(d: daemons.Daemon) -> list[str]:
        return sorted(k for labels in content(d).values() if "containerd.io/gc.root" in labels
                      for k in labels if k != "containerd.io/gc.root")

    assert kept(berthd) == kept(containerd) == ["containerd.io/uncompressed"]
