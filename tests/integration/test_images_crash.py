"""berthd killed with SIGKILL in the middle of image work, then restarted on the same root.

Two moments, each with a real client (ctr, berth) pulling from the local registry:

- during a pull: a throttling proxy in front of the registry slows the layer down so
  that the kill lands while the daemon holds a half-written ingest of it;
- during an unpack: a layer of many files keeps Diff.Apply busy; the kill lands once
  the extraction snapshot's directory has started filling up.

Afterwards no half-written blob may be visible (every blob listed reads back with its
digest), no half-applied layer may be a committed snapshot (an active ``extract-...``
is all that may be left, and garbage collection removes it once its lease goes), the
directories a crash leaves in the snapshotter are cleaned up at start-up, and the same
pull, run again against the restarted daemon, completes with the right digests and an
image that mounts.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import daemons

if TYPE_CHECKING:
    from tests.images import Image, RegistryServer

# The registry fixture lives in tests/images.py, loaded by pytest as a plugin: this
# module imports from it only inside functions, so pytest can still rewrite it.
pytest_plugins = ("tests.images",)
pytestmark = [pytest.mark.root, pytest.mark.interop]

CONTENT = "io.containerd.content.v1.content"
OVERLAY = "io.containerd.snapshotter.v1.overlayfs"
BIG_LAYER = 12 << 20        # random bytes: gzip keeps them as big
THROTTLE = 2 << 20          # bytes per second and connection while the pull is slowed
MANY_FILES = 20_000         # entries of the slow-to-apply layer
DEADLINE = 60.0             # bounds a failure only; never decides a pass


# --- images ---------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(entries: Iterator[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1704067200
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _image(name: str, top: bytes) -> tuple[Image, str, str]:
    """busybox's layer, then ``top`` (an uncompressed tar): the image, the top layer's
    gzip digest and the chain ID of both layers."""
    from tests.images import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Image, layer_gzip

    top_gz = gzip.compress(top, compresslevel=1, mtime=0)
    base_gz = layer_gzip()
    diff_ids = [base_diff_id(), sha256(top)]
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = json.dumps({"architecture": arch, "os": "linux",
                         "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256(b), "size": len(b)}
                   for b in (base_gz, top_gz)],
    }).encode()
    img = Image(name, manifest, OCI_MANIFEST, config, top_gz, OCI_LAYER_GZIP)
    img.blobs = {sha256(b): b for b in (manifest, config, base_gz, top_gz)}
    top_chain = sha256(f"{diff_ids[0]} {diff_ids[1]}".encode())
    return img, sha256(top_gz), top_chain


def base_diff_id() -> str:
    """The diff ID (and chain ID) of busybox's layer, the bottom of every image here."""
    from tests.images import layer_tar

    return sha256(layer_tar())


def push(registry: RegistryServer, repository: str, img: Image) -> None:
    from tests.images import push_image

    push_image(registry, repository, "latest", img)


def big_layer_image(name: str) -> tuple[Image, str, str]:
    data = os.urandom(BIG_LAYER)
    return _image(name, _tar(iter([("big/", None), ("big/blob", data)])))


def many_files_image(name: str) -> tuple[Image, str, str]:
    def entries() -> Iterator[tuple[str, bytes | None]]:
        yield "many/", None
        for i in range(MANY_FILES):
            yield f"many/f{i:06d}", b"%06d\n" % i
    return _image(name, _tar(entries()))


# --- a slow registry --------------------------------------------------------------------

class ThrottlingProxy:
    """A TCP proxy in front of the registry that sends answers at ``rate`` bytes per
    second per connection (None: as fast as they come) and keeps what clients sent."""

    def __init__(self, port: int, rate: int | None) -> None:
        self.target = port
        self.rate = rate
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def requests(self) -> str:
        with self._lock:
            return self.sent.decode("latin-1")

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, upstream]
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(16384)
                if not data:
                    break
                if up:
                    with self._lock:
                        self.sent += data
                elif self.rate:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            s.close()
        for t in self._threads:
            t.join(5)


# --- looking at the daemon --------------------------------------------------------------

def ctr(d: daemons.Daemon, *args: str) -> daemons.Result:
    r = daemons.ctr(d.address, *args, timeout=120)
    assert r.rc == 0, f"ctr {' '.join(args)}: {r.err}\n{d.logs()[-3000:]}"
    return r


def wait_until(what: str, check: Callable[[], object]) -> object:
    deadline = time.monotonic() + DEADLINE
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def ingest_of(root: Path, total: int) -> Path | None:
    """The ingest directory (in the content store) of a blob of ``total`` bytes."""
    ingests = root / CONTENT / "ingest"
    for d in ingests.iterdir() if ingests.exists() else ():
        try:
            if (d / "total").read_text() == str(total):
                return d
        except OSError:
            continue
    return None


def blobs_on_disk(root: Path) -> dict[str, int]:
    """Every blob file, checked against its name: a blob is whole or absent."""
    out = {}
    for f in (root / CONTENT / "blobs" / "sha256").iterdir():
        data = f.read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.name, f"blob {f.name} is damaged"
        out["sha256:" + f.name] = len(data)
    return out


def listed_blobs_verified(d: daemons.Daemon) -> set[str]:
    """``ctr content ls``, each blob fetched with ``ctr content get`` and checked."""
    listed = set()
    for line in ctr(d, "content", "ls", "-q").out.split():
        got = subprocess.run([daemons.CTR, "--address", str(d.address), "content", "get",
                              line], capture_output=True, timeout=60)
        assert got.returncode == 0, got.stderr
        assert sha256(got.stdout) == line, f"{line} reads back with another digest"
        listed.add(line)
    return listed


def snapshots(d: daemons.Daemon) -> list[tuple[str, str]]:
    """(key, kind) of every snapshot; keys like ``extract-1 sha256:...`` have a space."""
    out = []
    for line in ctr(d, "snapshots", "ls").out.splitlines()[1:]:
        m = re.match(r"(.*?)\s+(sha256:[0-9a-f]{64})?\s*(Active|Committed|View)\s*$", line)
        assert m, line
        out.append((m.group(1).strip(), m.group(3)))
    return out


def plant_crash_leftovers(root: Path) -> list[Path]:
    """What a crash in the middle of a snapshot create or remove leaves behind."""
    snaps = root / OVERLAY / "snapshots"
    planted = [snaps / "new-0123456789abcdef", snaps / "rm-987654", snaps / "987655"]
    for p in planted:
        (p / "fs" / "etc").mkdir(parents=True)
        (p / "fs" / "etc" / "leftover").write_text("from before the crash\n")
    return planted


def check_mount(d: daemons.Daemon, name: str, target: Path,
                also: Callable[[Path], None] | None = None) -> None:
    target.mkdir()
    try:
        ctr(d, "images", "mount", name, str(target))
        assert (target / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
        if also is not None:
            also(target)
    finally:
        daemons.ctr(d.address, "images", "unmount", "--rm", str(target), timeout=60)
    assert not os.path.ismount(target)


def berth_argv(d: daemons.Daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "berth.core.cli", "--address", str(d.address), *args]


# --- the tests -------------------------------------------------------------------------------

def test_kill_during_pull_leaves_no_blob_and_the_pull_resumes(
        berthd: daemons.Daemon, registry: RegistryServer, tmp_path: Path) -> None:
    img, big, _ = big_layer_image("crash/pull:latest")
    push(registry, "crash/pull", img)
    big_size = len(img.blobs[big])
    proxy = ThrottlingProxy(registry.port, THROTTLE)
    try:
        ref = f"127.0.0.1:{proxy.port}/crash/pull:latest"
        pull = subprocess.Popen([daemons.CTR, "--address", str(berthd.address), "images",
                                 "pull", "--plain-http", ref],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Kill once at least a quarter of the layer is in the daemon's ingest.
            ingest = wait_until("the layer's ingest to fill up", lambda: (
                (p := ingest_of(berthd.root, big_size)) is not None
                and (p / "data").exists()
                and (p / "data").stat().st_size >= big_size // 4 and p))
            berthd.kill()
        finally:
            out, err = pull.communicate(timeout=60)
        assert pull.returncode != 0, (out, err)

        # Mid-way: some bytes of the layer kept, not all, and no blob made of them.
        assert isinstance(ingest, Path)
        kept = (ingest / "data").stat().st_size
        assert big_size // 4 <= kept < big_size
        on_disk = blobs_on_disk(berthd.root)
        assert big not in on_disk

        planted = plant_crash_leftovers(berthd.root)
        berthd.start()
        for p in planted:
            assert not p.exists(), f"{p} survived the start-up cleanup"

        listed = listed_blobs_verified(berthd)
        assert big not in listed
        assert listed <= set(img.blobs)
        active = ctr(berthd, "content", "active").out
        assert f"layer-{big}" in active, active
        assert not [k for k, kind in snapshots(berthd) if kind == "Committed"
                    and k != base_diff_id()]

        # The same pull, now at full speed: it continues the layer from what was kept.
        proxy.rate = None
        with proxy._lock:
            proxy.sent.clear()
        ctr(berthd, "images", "pull", "--plain-http", ref)
        ranges = [int(n) for n in re.findall(
            rf"GET /v2/crash/pull/blobs/{big}[^\r]*\r\n(?:[^\r]+\r\n)*?"
            r"Range: bytes=(\d+)-", proxy.requests(), flags=re.IGNORECASE)]
        assert ranges and ranges[0] >= kept, proxy.requests()[-2000:]
    finally:
        proxy.close()

    assert ctr(berthd, "images", "ls", "-q").out.split() == [ref]
    images = ctr(berthd, "images", "ls").out
    assert img.manifest_digest in images
    assert listed_blobs_verified(berthd) == set(img.blobs)
    assert set(blobs_on_disk(berthd.root)) == set(img.blobs)
    assert ctr(berthd, "content", "active").out.splitlines()[1:] == []
    check_mount(berthd, ref, tmp_path / "mnt")


def test_kill_during_unpack_leaves_no_committed_snapshot_and_the_pull_completes(
        berthd: daemons.Daemon, registry: RegistryServer, tmp_path: Path) -> None:
    img, _, top_chain = many_files_image("crash/unpack:latest")
    push(registry, "crash/unpack", img)
    ref = f"{registry.host}/crash/unpack:latest"
    snaps = berthd.root / OVERLAY / "snapshots"
    base_chain = base_diff_id()

    def filling() -> Path | None:
        # The extraction snapshot of the top layer, once Diff.Apply has begun writing.
        for d in snaps.glob("*/fs/many"):
            try:
                with os.scandir(d) as it:
                    if sum(1 for _ in it) >= MANY_FILES // 10:
                        return d
            except FileNotFoundError:
                continue
        return None

    pull = subprocess.Popen(berth_argv(berthd, "images", "pull", "--plain-http", ref),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        partial = wait_until("Diff.Apply to write the top layer", filling)
        berthd.kill()
    finally:
        out, err = pull.communicate(timeout=60)
    assert pull.returncode != 0, (out, err)
    assert isinstance(partial, Path)
    written = len(os.listdir(partial))
    assert MANY_FILES // 10 <= written < MANY_FILES, written  # the kill landed mid-layer
    partial_dir = partial.parent.parent
    blobs_on_disk(berthd.root)

    planted = plant_crash_leftovers(berthd.root)
    berthd.start()
    for p in planted:
        assert not p.exists(), f"{p} survived the start-up cleanup"

    assert listed_blobs_verified(berthd) == set(img.blobs)  # all fetched before the unpack
    got = snapshots(berthd)
    # The layer below was committed before the kill; of the interrupted one, at most its
    # extraction snapshot is left, active, with the files written so far.
    assert (base_chain, "Committed") in got
    leftover = [(k, kind) for k, kind in got if k != base_chain]
    assert len(leftover) <= 1, got
    for key, kind in leftover:
        assert kind == "Active" and key.startswith("extract-") and key.endswith(top_chain)
    assert partial_dir.exists() == bool(leftover)

    # The same pull again: it completes.
    r = daemons.berth(berthd.address, "images", "pull", "--plain-http", ref, timeout=300)
    assert r.rc == 0, f"{r.err}\n{berthd.logs()[-3000:]}"
    assert ctr(berthd, "images", "ls", "-q").out.split() == [ref]
    assert img.manifest_digest in ctr(berthd, "images", "ls").out
    assert listed_blobs_verified(berthd) == set(img.blobs)
    got = snapshots(berthd)
    assert {(base_chain, "Committed"), (top_chain, "Committed")} <= set(got), got

    # The killed pull's lease gone, garbage collection takes the half-applied snapshot
    # and its files, and leaves the image's snapshots alone.
    for lease in ctr(berthd, "leases", "ls", "-q").out.split():
        ctr(berthd, "leases", "rm", "--sync", lease)
    assert sorted(snapshots(berthd)) == sorted([(base_chain, "Committed"),
                                                (top_chain, "Committed")])
    assert not partial_dir.exists()

    def all_files(root: Path) -> None:
        assert len(os.listdir(root / "many")) == MANY_FILES
        last = MANY_FILES - 1
        assert (root / "many" / f"f{last:06d}").read_bytes() == b"%06d\n" % last

    check_mount(berthd, ref, tmp_path / "mnt", all_files)
