"""`berth images` against berthd and a real registry: pull with progress and resume,
push, import/export round trips, import-rootfs, and registry authentication."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import daemons

if TYPE_CHECKING:
    from tests.images import Image, RegistryServer

pytest_plugins = ("tests.images",)

NAME = "docker.io/library/busybox:latest"
# Bounds a wait that should end by itself; nothing is measured by it.
HANG_GUARD = 60.0


def berth(d: daemons.Daemon, *args: str, ok: bool = True, ns: str | None = None
          ) -> daemons.Result:
    r = daemons.berth(d.address, *args, namespace=ns, timeout=120)
    if ok:
        assert r.rc == 0, f"berth {' '.join(args)}: rc={r.rc}\n{r.err}\n{r.out}\n" \
                          f"{d.logs()[-3000:]}"
    return r


def image_digests(d: daemons.Daemon, ns: str | None = None) -> dict[str, str]:
    out = berth(d, "images", "ls", ns=ns).out.splitlines()[1:]
    return {line.split()[0]: line.split()[2] for line in out}


# --- a counting, gating proxy in front of the registry --------------------------------------

class GatedProxy(ThreadingHTTPServer):
    """Forwards to the registry, records each blob request's Range and the bytes it
    sent; while ``hold`` names a digest, its body stops after ``hold_after`` bytes
    until ``release`` is set."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.hold = ""
        self.hold_after = 0
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.blob_gets: list[tuple[str, str | None, int]] = []  # (digest, range, bytes)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: GatedProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._forward()

    def do_GET(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        up = http.client.HTTPConnection(self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        up.request(self.command, self.path, headers=headers)
        resp = up.getresponse()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        digest = self.path.rsplit("/", 1)[-1] if "/blobs/" in self.path else ""
        try:
            if self.command == "GET":
                while chunk := resp.read(16384):
                    if digest and digest == self.server.hold:
                        room = self.server.hold_after - sent
                        if room <= len(chunk):
                            self.wfile.write(chunk[:max(room, 0)])
                            self.wfile.flush()
                            sent += max(room, 0)
                            self.server.held.set()
                            self.server.release.wait()
                            return
                    self.wfile.write(chunk)
                    sent += len(chunk)
        except OSError:
            pass  # the client went away
        finally:
            if digest and self.command == "GET":
                with self.server.lock:
                    self.server.blob_gets.append((digest, self.headers.get("Range"), sent))
            up.close()
            self.close_connection = True


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[GatedProxy]:
    server = GatedProxy(registry.host)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        t.join(10)


def _active(d: daemons.Daemon, ref: str) -> int | None:
    r = berth(d, "content", "active")
    for line in r.out.splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == ref:
            return int(cols[1])
    return None


# --- pull ----------------------------------------------------------------------------------

def test_pull_resumes_interrupted_layer(berthd: daemons.Daemon, registry: RegistryServer,
                                        proxy: GatedProxy,
                                        busybox_oci: tuple[Path, Image]) -> None:
    from tests.images import push_image

    _, img = busybox_oci
    push_image(registry, "busybox", "latest", img)
    half = len(img.layer) // 2
    proxy.hold, proxy.hold_after = img.layer_digest, half
    ref = f"{proxy.host}/busybox:latest"
    ingest = f"layer-{img.layer_digest}"

    argv = [sys.executable, "-m", "berth.core.cli", "--address", str(berthd.address),
            "images", "pull", "--plain-http", ref]
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        assert proxy.held.wait(HANG_GUARD), "the layer download never started"
        # Everything the proxy sent reaches the daemon's ingest; then kill the client.
        deadline = time.monotonic() + HANG_GUARD
        while _active(berthd, ingest) != half:
            assert client.poll() is None, client.communicate()
            assert time.monotonic() < deadline, f"ingest at {_active(berthd, ingest)}"
            time.sleep(0.05)
        os.killpg(client.pid, signal.SIGKILL)
    finally:
        client.kill()
        client.communicate()
    proxy.release.set()
    assert _active(berthd, ingest) == half  # kept for the next run

    proxy.hold = ""
    r = berth(berthd, "images", "pull", "--plain-http", ref)
    assert f"{ingest}: resuming at {half} of {len(img.layer)} bytes" in r.out
    assert f"{ingest}: done" in r.out
    assert f"layer 0: unpacked as {img.chain_id}" in r.out
    layer_gets = [(rng, n) for d, rng, n in proxy.blob_gets if d == img.layer_digest]
    # The second request asked for the rest only, and nothing was fetched twice.
    assert layer_gets == [(None, half), (f"bytes={half}-", len(img.layer) - half)]
    assert image_digests(berthd)[ref] == img.manifest_digest
    assert _active(berthd, ingest) is None


def test_pull_shows_progress_and_skips_present_content(berthd: daemons.Daemon,
                                                       registry: RegistryServer,
                                                       busybox_oci: tuple[Path, Image]
                                                       ) -> None:
    from tests.images import push_image

    _, img = busybox_oci
    push_image(registry, "busybox", "latest", img)
    ref = f"{registry.host}/busybox:latest"
    r = berth(berthd, "images", "pull", "--plain-http", "--platform", "linux/amd64"
              if os.uname().machine == "x86_64" else "linux/arm64", ref)
    assert f"{ref}: resolved {img.manifest_digest}" in r.out
    for kind, digest in (("manifest", img.manifest_digest), ("config", img.config_digest),
                         ("layer", img.layer_digest)):
        assert f"{kind}-{digest}: started" in r.out
        assert f"{kind}-{digest}: done" in r.out
    again = berth(berthd, "images", "pull", "--plain-http", ref)
    assert f"layer-{img.layer_digest}: exists" in again.out
    assert "already unpacked" in again.out
    # Pulling for a platform the image lacks fails without recording anything new.
    r = berth(berthd, "--namespace", "other", "images", "pull", "--plain-http",
              "--platform", "linux/s390x", ref, ok=False)
    assert r.rc != 0 and "platform" in r.err
    assert image_digests(berthd, ns="other") == {}


# --- push ----------------------------------------------------------------------------------

def test_push_then_pull_elsewhere(berthd: daemons.Daemon, registry: RegistryServer,
                                  busybox_oci: tuple[Path, Image]) -> None:
    path, img = busybox_oci
    berth(berthd, "images", "import", str(path))
    remote = f"{registry.host}/mirror/busybox:v1"
    r = berth(berthd, "images", "push", "--plain-http", remote, NAME)
    assert f"layer-{img.layer_digest}: done" in r.out
    again = berth(berthd, "images", "push", "--plain-http", remote, NAME)
    assert f"layer-{img.layer_digest}: exists" in again.out
    berth(berthd, "images", "pull", "--plain-http", remote, ns="fresh")
    assert image_digests(berthd, ns="fresh") == {remote: img.manifest_digest}


def test_registry_basic_auth(berthd: daemons.Daemon, registry_auth: RegistryServer,
                             busybox_oci: tuple[Path, Image]) -> None:
    path, img = busybox_oci
    berth(berthd, "images", "import", str(path))
    remote = f"{registry_auth.host}/busybox:latest"
    r = berth(berthd, "images", "push", "--plain-http", remote, NAME, ok=False)
    assert r.rc != 0 and "credentials" in r.err
    berth(berthd, "images", "push", "--plain-http", "--user", "berth:wrong", remote, NAME,
          ok=False)
    berth(berthd, "images", "push", "--plain-http", "--user", "berth:s3cret", remote, NAME)
    berth(berthd, "images", "pull", "--plain-http", "--user", "berth:s3cret", remote,
          ns="authed")
    assert image_digests(berthd, ns="authed") == {remote: img.manifest_digest}


# --- archives ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_export_import_round_trip(fmt: str, berthd: daemons.Daemon,
                                  busybox_docker: tuple[Path, Image], tmp_path: Path) -> None:
    path, img = busybox_docker
    r = berth(berthd, "images", "import", str(path))
    digest = image_digests(berthd)[NAME]
    assert f"{NAME} {digest}" in r.out
    out = tmp_path / f"export-{fmt}.tar"
    berth(berthd, "images", "export", "--archive-format", fmt, str(out), NAME)
    with tarfile.open(out) as tar:
        names = tar.getnames()
    if fmt == "oci":
        assert {"oci-layout", "index.json", "manifest.json"} <= set(names)
        assert f"blobs/sha256/{img.layer_digest.split(':')[1]}" in names
    else:
        assert f"{img.diff_id.split(':')[1]}/layer.tar" in names
        assert "repositories" in names and "oci-layout" not in names
    berth(berthd, "images", "rm", "--sync", NAME)
    assert berth(berthd, "snapshots", "ls").out.splitlines()[1:] == []
    berth(berthd, "images", "import", str(out))
    # The same manifest comes back, and so does the same root filesystem.
    assert image_digests(berthd)[NAME] == digest
    snaps = berth(berthd, "snapshots", "ls").out
    assert img.chain_id in snaps


def test_import_rootfs_from_directory_and_tar(berthd: daemons.Daemon,
                                              tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello from berth\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o755)
    os.symlink("tool", root / "bin" / "alias")
    r = berth(berthd, "images", "import-rootfs", str(root), "example.com/rootfs:dir")
    assert "unpacking example.com/rootfs:dir" in r.out and "done" in r.out
    tar_path = tmp_path / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for p in ("etc", "etc/motd", "bin", "bin/tool", "bin/alias"):
            tar.add(root / p, arcname=p, recursive=False)
    berth(berthd, "images", "import-rootfs", str(tar_path), "example.com/rootfs:tar")
    digests = image_digests(berthd)
    assert {"example.com/rootfs:dir", "example.com/rootfs:tar"} <= set(digests)

    target = tmp_path / "mnt"
    target.mkdir()
    try:
        berth(berthd, "images", "mount", "example.com/rootfs:dir", str(target))
        assert (target / "etc" / "motd").read_text() == "hello from berth\n"
        assert os.readlink(target / "bin" / "alias") == "tool"
        assert os.stat(target / "bin" / "tool").st_mode & 0o777 == 0o755
        with pytest.raises(OSError):
            (target / "new").write_text("read-only view")
    finally:
        berth(berthd, "images", "unmount", "--rm", str(target), ok=False)
    assert not os.path.ismount(target)


def test_registry_over_tls(berthd: daemons.Daemon, registry_tls: RegistryServer,
                           busybox_oci: tuple[Path, Image]) -> None:
    from tests.images import push_image

    _, img = busybox_oci
    push_image(registry_tls, "busybox", "latest", img)
    ref = f"{registry_tls.host}/busybox:latest"
    # Not trusted by default; trusted with its certificate, or without verification.
    r = berth(berthd, "images", "pull", ref, ok=False)
    assert r.rc != 0 and "certificate" in r.err.lower()
    berth(berthd, "images", "pull", "--tlscacert", str(registry_tls.ca_file), ref)
    assert image_digests(berthd)[ref] == img.manifest_digest
    berth(berthd, "images", "push", "-k", f"{registry_tls.host}/copy:v1", ref)
    berth(berthd, "images", "pull", "-k", f"{registry_tls.host}/copy:v1", ns="copy")
    assert image_digests(berthd, ns="copy") == {f"{registry_tls.host}/copy:v1":
                                                img.manifest_digest}
