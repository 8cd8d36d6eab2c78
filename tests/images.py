"""Image fixtures: a busybox image built from Debian's busybox-static, and a registry.

The busybox image is built byte for byte the same on every run on a machine (sorted
entries, fixed times and owners, gzip without a timestamp), so its digests are stable
and two daemons importing it must agree on every digest. It comes as an OCI layout tar
(what ``ctr images export`` writes, minus Docker's manifest.json) and as a
docker-archive tar (what ``docker save`` writes).

The registry is Debian's ``docker-registry`` (the CNCF distribution registry) on
127.0.0.1 with a free port and a temporary storage folder, optionally behind htpasswd
basic authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

BUSYBOX = "/bin/busybox"
REGISTRY = "/usr/bin/docker-registry"
NAME = "docker.io/library/busybox:latest"
# An infra ("pause") image for CRI sandboxes: the busybox layer, entrypoint sleep.
PAUSE = "docker.io/library/pause:bench"
MTIME = 1704067200  # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

_ETC = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"
                  b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": b"root:x:0:\nnobody:x:65534:\n",
    "etc/hostname": b"busybox\n",
    "etc/hosts": b"127.0.0.1\tlocalhost\n",
}
_DIRS = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "proc": 0o755,
         "root": 0o700, "sbin": 0o755, "sys": 0o755, "tmp": 0o1777, "usr": 0o755,
         "usr/bin": 0o755, "usr/sbin": 0o755, "var": 0o755}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=False).encode()


def _info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, link
    info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
    return info


@cache
def applets() -> tuple[str, ...]:
    """Paths busybox installs its applets at (``bin/ls``...), from the binary itself."""
    if not os.path.exists(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} missing: install Debian package busybox-static")
    out = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                         check=True).stdout.split()
    return tuple(sorted(p for p in out if p and p != "bin/busybox" and "/" in p))


@cache
def layer_tar() -> bytes:
    """The uncompressed root filesystem layer."""
    binary = Path(BUSYBOX).read_bytes()
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    dirs = dict(_DIRS)
    for applet in applets():
        parent = os.path.dirname(applet)
        while parent and parent not in dirs:
            dirs[parent] = 0o755
            parent = os.path.dirname(parent)
    for d, mode in dirs.items():
        entries.append((_info(d + "/", tarfile.DIRTYPE, mode), None))
    entries.append((_info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), binary))
    for applet in applets():
        entries.append((_info(applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox"), None))
    for name, data in _ETC.items():
        entries.append((_info(name, tarfile.REGTYPE, 0o644, len(data)), data))
    entries.sort(key=lambda e: e[0].name.rstrip("/"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@cache
def layer_gzip() -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(layer_tar())
    return buf.getvalue()


@dataclass
class Image:
    """An image as blobs: what tests compare daemons against."""

    name: str
    manifest: bytes
    manifest_type: str
    config: bytes
    layer: bytes
    layer_type: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    # For an index: the manifests it lists, (media type, bytes), pushed before it.
    children: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def layer_digest(self) -> str:
        return sha256(self.layer)

    @property
    def diff_id(self) -> str:
        return sha256(layer_tar())

    @property
    def chain_id(self) -> str:
        return self.diff_id  # one layer: the chain ID is its diff ID


@cache
def config_json() -> bytes:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    return _json({
        "architecture": arch,
        "config": {"Env": [PATH_ENV], "Cmd": ["sh"]},
        "created": CREATED,
        "history": [{"created": CREATED, "created_by": "berth tests: busybox-static"}],
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar())]},
    })


@cache
def oci_image(name: str = NAME) -> Image:
    config, layer = config_json(), layer_gzip()
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256(layer),
                    "size": len(layer)}],
    })
    img = Image(name, manifest, OCI_MANIFEST, config, layer, OCI_LAYER_GZIP)
    img.blobs = {sha256(b): b for b in (manifest, config, layer)}
    return img


@cache
def pause_image() -> Image:
    """The busybox layer with ``sleep`` as entrypoint: a CRI sandbox (infra) image."""
    config = json.loads(config_json())
    config["config"] = {**config["config"], "Entrypoint": ["sleep", "2147483647"],
                        "Cmd": []}
    config_b, layer = _json(config), layer_gzip()
    manifest = _json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config_b), "size": len(config_b)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256(layer), "size": len(layer)}],
    })
    img = Image(PAUSE, manifest, OCI_MANIFEST, config_b, layer, OCI_LAYER_GZIP)
    img.blobs = {sha256(b): b for b in (manifest, config_b, layer)}
    return img


@cache
def multi_platform_image(name: str = NAME) -> Image:
    """An OCI index: the busybox manifest for this machine's platform, and a one-file
    image for linux/s390x (which no test machine runs), listed first."""
    host = oci_image(name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = b"s390x\n"
        tar.addfile(_info("arch", tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as f:
        f.write(buf.getvalue())
    layer = gz.getvalue()
    config = _json({"architecture": "s390x", "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": [sha256(buf.getvalue())]}})
    manifest = _json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256(layer),
                    "size": len(layer)}],
    })
    arch = json.loads(host.config)["architecture"]
    index = _json({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest),
             "platform": {"architecture": "s390x", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": host.manifest_digest,
             "size": len(host.manifest), "platform": {"architecture": arch, "os": "linux"}},
        ],
    })
    img = Image(name, index, OCI_INDEX, host.config, host.layer, host.layer_type)
    img.blobs = {**host.blobs, **{sha256(b): b for b in (config, layer, manifest, index)}}
    img.children = [(OCI_MANIFEST, manifest), (OCI_MANIFEST, host.manifest)]
    return img


def _add(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int = 0o644) -> None:
    kind = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
    info = _info(name, kind, 0o755 if data is None else mode, len(data or b""))
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def write_oci_tar(dest: Path, name: str = NAME) -> Image:
    """An OCI image layout tar; index.json names the image as ``ctr export`` does."""
    img = oci_image(name)
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = _json({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST, "digest": img.manifest_digest,
            "size": len(img.manifest),
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": tag},
        }],
    })
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "blobs/", None)
        _add(tar, "blobs/sha256/", None)
        for digest in sorted(img.blobs):
            _add(tar, f"blobs/sha256/{digest.split(':')[1]}", img.blobs[digest], 0o444)
        _add(tar, "index.json", index)
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    return img


def write_docker_tar(dest: Path, repo_tag: str = "busybox:latest") -> Image:
    """A docker-archive (``docker save``) tar with an uncompressed layer."""
    config, layer = config_json(), layer_tar()
    layer_id = hashlib.sha256(layer).hexdigest()
    config_name = sha256(config).split(":")[1] + ".json"
    manifest = _json([{"Config": config_name, "RepoTags": [repo_tag],
                       "Layers": [f"{layer_id}/layer.tar"]}])
    repo, tag = repo_tag.rsplit(":", 1)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, f"{layer_id}/", None)
        _add(tar, f"{layer_id}/VERSION", b"1.0")
        _add(tar, f"{layer_id}/json", _json({"id": layer_id, "created": CREATED}))
        _add(tar, f"{layer_id}/layer.tar", layer)
        _add(tar, config_name, config)
        _add(tar, "manifest.json", manifest)
        _add(tar, "repositories", _json({repo: {tag: layer_id}}))
    img = Image("docker.io/library/" + repo_tag, b"", "", config, layer,
                "application/vnd.docker.image.rootfs.diff.tar")
    img.blobs = {sha256(config): config, sha256(layer): layer}
    return img


@pytest.fixture(scope="session")
def busybox_oci(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Image]:
    path = tmp_path_factory.mktemp("images") / "busybox-oci.tar"
    return path, write_oci_tar(path)


@pytest.fixture(scope="session")
def busybox_docker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Image]:
    path = tmp_path_factory.mktemp("images") / "busybox-docker.tar"
    return path, write_docker_tar(path)


# --- the registry ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcrypt_htpasswd(user: str, password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        # Cost 4: the registry checks the hash on every request.
        return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}"


@dataclass
class RegistryServer:
    base: Path
    port: int
    credentials: tuple[str, str] | None = None
    tls: bool = False
    proc: subprocess.Popen | None = None

    @property
    def ca_file(self) -> Path:
        """With ``tls``: the self-signed certificate clients must trust."""
        return self.base / "cert.pem"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base / "registry.log"

    def start(self, timeout: float = 30.0) -> RegistryServer:
        if not os.path.exists(REGISTRY):
            raise RuntimeError(f"{REGISTRY} missing: install Debian package docker-registry")
        storage = self.base / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.credentials is not None:
            htpasswd = self.base / "htpasswd"
            htpasswd.write_text(bcrypt_htpasswd(*self.credentials) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: berth-tests\n    path: {htpasswd}\n"
        tls = ""
        if self.tls:
            key = self.base / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", str(key), "-out", str(self.ca_file), "-days", "2",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, capture_output=True)
            tls = f"  tls:\n    certificate: {self.ca_file}\n    key: {key}\n"
        config = self.base / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
            + tls + auth
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            self.proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                if self.tls:
                    import ssl

                    ctx = ssl.create_default_context(cafile=str(self.ca_file))
                    urllib.request.urlopen(f"https://{self.host}/v2/", timeout=2,
                                           context=ctx).close()
                else:
                    urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2).close()
                break
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry on {self.host} not up after {timeout}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def running_registry(credentials: tuple[str, str] | None = None, *, tls: bool = False
                     ) -> Iterator[RegistryServer]:
    base = Path(tempfile.mkdtemp(prefix="berth-reg-", dir="/tmp"))
    server = RegistryServer(base, free_port(), credentials, tls)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def registry() -> Iterator[RegistryServer]:
    with running_registry() as server:
        yield server


@pytest.fixture
def registry_auth() -> Iterator[RegistryServer]:
    with running_registry(("berth", "s3cret")) as server:
        yield server


@pytest.fixture
def registry_tls() -> Iterator[RegistryServer]:
    """Over TLS with a self-signed certificate for 127.0.0.1 (``server.ca_file``)."""
    with running_registry(tls=True) as server:
        yield server


def push_image(server: RegistryServer, repository: str, tag: str, img: Image) -> None:
    """Put an image into the registry with berth's registry client (no daemon)."""
    from berth.core.client.registry import Credentials, Registry
    from berth.core.images.manifest import Descriptor

    async def run() -> None:
        creds = Credentials(*server.credentials) if server.credentials else None
        from berth.core.client.registry import TLSOptions

        tls = TLSOptions(ca_file=str(server.ca_file)) if server.tls else None
        async with Registry(server.host, plain_http=not server.tls, credentials=creds,
                            tls=tls) as reg:
            manifests = {sha256(img.manifest)} | {sha256(m) for _, m in img.children}
            for digest, data in img.blobs.items():
                if digest in manifests:
                    continue
                if await reg.blob_exists(repository, digest):
                    continue

                async def chunks(offset: int, size: int, data: bytes = data):  # noqa: ANN202
                    yield data[offset:offset + size] if size else data[offset:]

                await reg.upload_blob(repository, Descriptor("", digest, len(data)), chunks)
            for media_type, data in img.children:
                await reg.put_manifest(repository, sha256(data), media_type, data)
            await reg.put_manifest(repository, tag, img.manifest_type, img.manifest)

    asyncio.run(run())
