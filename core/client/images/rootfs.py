"""A one-layer image from a root filesystem (a directory or a tar), like ``docker import``.

A directory becomes the layer tar :func:`berth.core.archive.diff.write_diff` writes against an
empty directory (numeric owners, whole-second times, capabilities kept); a tar is used
as given (plain, gzip or zstd). The layer is stored gzip-compressed, with an OCI config
for the host platform and an OCI manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from berth.core import errdefs
from berth.core.archive import compression
from berth.core.archive.diff import write_diff
from berth.core.gocompat import json as gojson
from berth.core.images import mediatypes
from berth.core.images.manifest import Descriptor, Manifest, descriptor_for
from berth.core.images.platforms import default_spec

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHUNK = 1 << 20


@dataclass
class Layer:
    path: Path  # the gzip blob, in a temporary directory the caller removes
    digest: str
    size: int
    diff_id: str


class _Hashing:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def build_layer(source: Path, workdir: Path) -> Layer:
    """Blocking: the gzip layer of ``source`` (a directory or a tar) in ``workdir``."""
    blob = workdir / "layer.tar.gz"
    with open(blob, "wb") as raw:
        outer = _Hashing(raw)
        with gzip.GzipFile(fileobj=outer, mode="wb", mtime=0) as gz:
            inner = _Hashing(gz)
            if source.is_dir():
                empty = workdir / "empty"
                empty.mkdir()
                write_diff(empty, source, inner)
            elif source.is_file():
                with open(source, "rb") as f:
                    reader = compression.open_stream(f)
                    try:
                        while chunk := reader.read(CHUNK):
                            inner.write(chunk)
                    finally:
                        reader.close()
            else:
                raise errdefs.InvalidArgument(f"{source}: not a directory or a tar file")
    return Layer(blob, "sha256:" + outer.hasher.hexdigest(), outer.size,
                 "sha256:" + inner.hasher.hexdigest())


def config_for(diff_id: str, created: datetime, comment: str = "") -> bytes:
    p = default_spec()
    stamp = created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    history: dict[str, Any] = {"created": stamp, "created_by": "berth images import-rootfs"}
    if comment:
        history["comment"] = comment
    doc: dict[str, Any] = {"created": stamp, "architecture": p.architecture}
    if p.variant:
        doc["variant"] = p.variant
    doc.update({
        "os": "linux",
        "config": {"Env": [PATH_ENV]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [history],
    })
    return gojson.marshal(doc)


async def import_rootfs(client: Any, source: Path, name: str, *,
                        created: datetime | None = None) -> tuple[Descriptor, Descriptor]:
    """Store the image and name it; returns (manifest descriptor, layer descriptor).

    Run under a lease (``client.lease()``); unpacking is the caller's choice.
    """
    import asyncio

    workdir = Path(tempfile.mkdtemp(prefix="berth-rootfs-"))
    try:
        layer = await asyncio.to_thread(build_layer, source, workdir)
        layer_desc = Descriptor(mediatypes.OCI_LAYER_GZIP, layer.digest, layer.size)
        await _upload_file(client, layer.path, layer_desc, {
            mediatypes.LABEL_UNCOMPRESSED: layer.diff_id})
        config = config_for(layer.diff_id, created or datetime.now(UTC))
        config_desc = descriptor_for(mediatypes.OCI_CONFIG, config)
        await client.write_blob(f"config-{config_desc.digest}", config, config_desc)
        manifest = Manifest(config_desc, [layer_desc], mediatypes.OCI_MANIFEST)
        data = manifest.encode()
        manifest_desc = descriptor_for(mediatypes.OCI_MANIFEST, data)
        await client.write_blob(f"manifest-{manifest_desc.digest}", data, manifest_desc, {
            "containerd.io/gc.ref.content.config": config_desc.digest,
            "containerd.io/gc.ref.content.l.0": layer_desc.digest,
        })
        await client.put_image(name, manifest_desc)
        return manifest_desc, layer_desc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _upload_file(client: Any, path: Path, desc: Descriptor,
                       labels: dict[str, str]) -> None:
    ref = mediatypes.ref_key(desc.media_type, desc.digest)
    try:
        w = await client.writer(ref, desc.size, desc.digest)
    except errdefs.AlreadyExists:
        return
    try:
        if w.offset:
            await w.truncate()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                await w.write(chunk)
        try:
            await w.commit(desc.size, desc.digest, labels)
        except errdefs.AlreadyExists:
            pass
    finally:
        await w.close()
