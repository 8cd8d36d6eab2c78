"""``io.containerd.differ.v1.walking``: apply layers from the content store onto mounts,
and write the layer between two mounts into it, as containerd's walking differ does.

Apply reads the blob from the namespace's content, checks its size and digest while
the bytes go by, and unpacks it with :func:`berth.plugins.differ.apply_blob` into the
directory the mounts name (overlay upperdir, bind source) or, for any other mounts,
into a temporary mount of them. Compare mounts both sides (a bind mount is used in
place), writes :func:`berth.plugins.differ.write_diff`'s tar (gzip by default) into a content
writer and commits it with the ``containerd.io/uncompressed`` label.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import trio

from berth.core import errdefs, log
from berth.core.differ import Applied
from berth.core.mount import Mount
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import CONTENT, DIFFER, METADATA, SERVICE
from berth.plugins.differ import ApplyResult, apply_blob, compression, target_for_mounts, write_diff

LAYER = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
# Diff output reaches the content writer in pieces of this size (one trio hop each).
SINK_CHUNK = 1 << 20
VERIFY_CHUNK = 1 << 20

_log = log.get("differ")


class _VerifyingReader:
    """Reads a blob file, counting and hashing; ``finish()`` reads the rest and checks."""

    def __init__(self, f: BinaryIO, digest: str, size: int) -> None:
        self._f = f
        self._digest = digest
        self._size = size
        algorithm = digest.split(":", 1)[0]
        self._hasher = hashlib.new(algorithm)
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        self._hasher.update(data)
        return data

    def finish(self) -> None:
        while self.read(VERIFY_CHUNK):
            pass
        if self._size > 0 and self.count != self._size:
            raise errdefs.FailedPrecondition(
                f"content {self._digest}: size {self.count}, expected {self._size}")
        actual = f"{self._digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"
        if actual != self._digest:
            raise errdefs.FailedPrecondition(
                f"content {self._digest}: digest mismatch, got {actual}")


def _as_tuples(mounts: Sequence[Mount]) -> list[tuple[str, str, Sequence[str]]]:
    return [(m.type, m.source, list(m.options)) for m in mounts]


@contextlib.contextmanager
def _directory(mounts: Sequence[Mount], *, read_only: bool) -> Iterator[Path]:
    """A directory showing ``mounts``: a bind mount's source, else a temporary mount."""
    if len(mounts) == 1 and (mounts[0].type == "bind"
                             or {"bind", "rbind"} & set(mounts[0].options)):
        yield Path(mounts[0].source)
        return
    from berth.core import mount as core_mount

    with core_mount.mounted(list(mounts), read_only=read_only) as root:
        yield root


def apply_sync(blob_path: Path, digest: str, size: int, media_type: str,
               mounts: Sequence[Mount]) -> ApplyResult:
    """Blocking: unpack the blob at ``blob_path`` onto ``mounts``; run in a thread."""
    compression.from_media_type(media_type)
    with open(blob_path, "rb") as f:
        reader = _VerifyingReader(f, digest, size)
        target = target_for_mounts(_as_tuples(mounts))
        if target is not None:
            result = apply_blob(reader, target.path, media_type=media_type,
                                mode=target.mode, parents=target.parents)
        else:
            with _directory(mounts, read_only=False) as root:
                result = apply_blob(reader, root, media_type=media_type,
                                    mode="native")
        reader.finish()
    return result


class _TrioSink:
    """A file-like ``write`` for a worker thread that feeds an async content writer,
    hashing and counting what it passes on."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self._buf = bytearray()
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= SINK_CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            chunk, self._buf = bytes(self._buf), bytearray()
            self.hasher.update(chunk)
            self.size += len(chunk)
            trio.from_thread.run(self._writer.write, chunk)


class _Tee:
    """Hashes the uncompressed tar on its way into the compressor."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self.hasher = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        return self._out.write(data)


def _diff_sync(lower: Sequence[Mount], upper: Sequence[Mount], sink: _TrioSink,
               compress: bool) -> str:
    """Blocking: write the diff into ``sink``; returns the uncompressed digest."""
    with _directory(lower, read_only=True) as lower_root, \
            _directory(upper, read_only=True) as upper_root:
        if compress:
            gz = gzip.GzipFile(fileobj=sink, mode="wb", mtime=0)
            tee = _Tee(gz)
            try:
                write_diff(lower_root, upper_root, tee)
            finally:
                gz.close()
            sink.flush()
            return "sha256:" + tee.hasher.hexdigest()
        tee = _Tee(sink)
        write_diff(lower_root, upper_root, tee)
        sink.flush()
        return "sha256:" + tee.hasher.hexdigest()


def unique_ref() -> str:
    return f"{time.time_ns()}-{base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()}"


class WalkingDiffer:
    """The walking differ over the namespaced content store of the content-service."""

    def __init__(self, plugins: Any) -> None:
        self._plugins = plugins

    @property
    def content(self) -> Any:
        # Looked up on use: the content-service is a plugin of the same "service" type
        # as the diff-service that requires this one, so it cannot be a requirement.
        try:
            return self._plugins.get(SERVICE, "content-service")
        except errdefs.NotFound:
            raise errdefs.Unavailable("content store service not loaded") from None

    async def apply(self, namespace: str, media_type: str, digest: str, size: int,
                    mounts: Sequence[Mount]) -> Applied:
        compression.from_media_type(media_type)
        store = self.content
        info = store.info(namespace, digest)
        path = store.blob_path(namespace, digest)
        started = time.monotonic()
        result = await trio.to_thread.run_sync(
            apply_sync, path, digest, size or info.size, media_type, list(mounts))
        _log.debug("diff applied", namespace=namespace, digest=digest, size=size,
                   media=media_type, d=f"{time.monotonic() - started:.3f}s")
        return Applied(LAYER, result.diff_id, result.size)

    async def compare(self, namespace: str, lower: Sequence[Mount], upper: Sequence[Mount],
                      *, media_type: str = "", ref: str = "",
                      labels: dict[str, str] | None = None, lease: str | None = None
                      ) -> Applied:
        media_type = media_type or LAYER_GZIP
        if media_type not in (LAYER, LAYER_GZIP):
            raise errdefs.NotImplemented_(f"unsupported diff media type: {media_type}")
        compress = media_type == LAYER_GZIP
        store = self.content
        new_ref = not ref
        ref = ref or unique_ref()
        labels = dict(labels or {})
        w = await store.writer(namespace, ref, lease=lease)
        committed = False
        try:
            if not new_ref:
                await w.truncate(0)
            sink = _TrioSink(w)
            uncompressed = await trio.to_thread.run_sync(
                _diff_sync, list(lower), list(upper), sink, compress)
            digest = "sha256:" + sink.hasher.hexdigest()
            if compress:
                labels[LABEL_UNCOMPRESSED] = uncompressed
            try:
                await w.commit(sink.size, digest, labels)
            except errdefs.AlreadyExists:
                pass
            committed = True
        finally:
            if not committed:
                with trio.CancelScope(shield=True):
                    await w.close()
                    if new_ref:
                        with contextlib.suppress(errdefs.BerthError):
                            await store.abort(namespace, ref, lease)
        info = store.info(namespace, digest)
        if compress and LABEL_UNCOMPRESSED not in info.labels:
            from berth.core.metadata.content import Info

            store.update(namespace, Info(digest=digest, labels={
                LABEL_UNCOMPRESSED: labels[LABEL_UNCOMPRESSED]}),
                [f"labels.{LABEL_UNCOMPRESSED}"])
        return Applied(media_type, digest, info.size)


async def _init(ctx: InitContext) -> WalkingDiffer:
    from berth.core.plugin.graph import host_platform

    ctx.platforms.append(host_platform())
    return WalkingDiffer(ctx.plugins)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=DIFFER, id="walking", init=_init, requires=(METADATA, CONTENT))]
