"""The walking differ and the diff-service, called directly (as the gRPC layer does):
blobs are verified while they are applied, differs are tried in order."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from berth.core import errdefs
from berth.core.differ import Applied
from berth.core.mount import Mount
from berth.core.services.diff import DiffLocal
from berth.plugins.differ.plugin import apply_sync


def _layer() -> tuple[bytes, bytes]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("etc/", None), ("etc/motd", b"hi\n")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    plain = buf.getvalue()
    return plain, gzip.compress(plain, mtime=0)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def test_apply_onto_bind_mount(tmp_path: Path) -> None:
    plain, blob = _layer()
    path = tmp_path / "blob"
    path.write_bytes(blob)
    target = tmp_path / "rootfs"
    target.mkdir()
    result = apply_sync(path, _sha(blob), len(blob), GZIP,
                        [Mount("bind", str(target), ["rbind", "rw"])])
    assert (result.diff_id, result.size) == (_sha(plain), len(plain))
    assert (target / "etc" / "motd").read_bytes() == b"hi\n"


def test_apply_refuses_a_blob_that_is_not_what_it_claims(tmp_path: Path) -> None:
    _, blob = _layer()
    path = tmp_path / "blob"
    path.write_bytes(blob)
    target = tmp_path / "rootfs"
    target.mkdir()
    mounts = [Mount("bind", str(target), ["rbind"])]
    with pytest.raises(errdefs.FailedPrecondition, match="digest mismatch"):
        apply_sync(path, _sha(b"something else"), len(blob), GZIP, mounts)
    with pytest.raises(errdefs.FailedPrecondition, match="size"):
        apply_sync(path, _sha(blob), len(blob) + 1, GZIP, mounts)
    with pytest.raises(errdefs.NotImplemented_):
        apply_sync(path, _sha(blob), len(blob), "application/vnd.oci.image.config.v1+json",
                   mounts)


class _Differ:
    def __init__(self, answer: Applied | None) -> None:
        self.answer = answer
        self.calls = 0

    async def apply(self, *args: object) -> Applied:
        self.calls += 1
        if self.answer is None:
            raise errdefs.NotImplemented_("not mine")
        return self.answer

    async def compare(self, *args: object, **kw: object) -> Applied:
        return await self.apply()


async def test_differs_are_tried_in_order() -> None:
    from berth.core.api.containerd.types import Descriptor

    first, second = _Differ(None), _Differ(Applied("t", "sha256:x", 1))
    local = DiffLocal([first, second])
    desc = Descriptor(media_type=GZIP, digest="sha256:y", size=1)
    assert await local.apply("ns", desc, []) == second.answer
    assert (first.calls, second.calls) == (1, 1)
    with pytest.raises(errdefs.NotImplemented_):
        await DiffLocal([_Differ(None)]).apply("ns", desc, [])
    with pytest.raises(errdefs.NotImplemented_):
        await DiffLocal([]).compare("ns", [], [], media_type="", ref="", labels={}, lease=None)
