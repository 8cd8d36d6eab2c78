"""The daemon side of image work, as a client sees it: content, images, snapshots, diff
and leases over containerd's gRPC API (berthd's or containerd's own).

Every call carries the namespace header, and the lease header while a lease is held
(:meth:`Client.lease`), so whatever a pull or an import writes is protected from
garbage collection until it is referenced by an image, as with containerd's clients.
gRPC errors come back as :mod:`berth.core.errdefs` errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from betterproto.lib.google.protobuf import FieldMask
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality

from berth.core import errdefs
from berth.core.api.containerd.services.content import v1 as content_api
from berth.core.api.containerd.services.content.v1 import WriteAction
from berth.core.api.containerd.services.diff import v1 as diff_api
from berth.core.api.containerd.services.images import v1 as images_api
from berth.core.api.containerd.services.leases import v1 as leases_api
from berth.core.api.containerd.services.snapshots import v1 as snapshots_api
from berth.core.api.containerd.types import Mount
from berth.core.client.connection import NAMESPACE_HEADER
from berth.core.headers import GRPC_LEASE as LEASE_HEADER
from berth.core.images import mediatypes
from berth.core.images.manifest import Descriptor

DEFAULT_SNAPSHOTTER = "overlayfs"
WRITE_CHUNK = 1 << 20
# Write messages sent ahead of their answers.
WRITE_WINDOW = 4
LEASE_EXPIRY = timedelta(hours=24)


# The classes containerd's client (errdefs.FromGRPC) knows; any other code reads "unknown".
_CLIENT_CLASSES = frozenset({
    errdefs.Code.INVALID_ARGUMENT, errdefs.Code.ALREADY_EXISTS, errdefs.Code.NOT_FOUND,
    errdefs.Code.UNAVAILABLE, errdefs.Code.FAILED_PRECONDITION, errdefs.Code.UNIMPLEMENTED,
    errdefs.Code.CANCELLED, errdefs.Code.DEADLINE_EXCEEDED,
})


def translate(e: GRPCError) -> errdefs.BerthError:
    """The typed error for a gRPC status, its message as containerd's client words it:
    ``<description>: <class>``, the class said once (``image "x": not found``)."""
    code = int(e.status.value)
    err = errdefs.from_status(code, e.message or "")
    suffix = err.suffix if code in _CLIENT_CLASSES else errdefs.Unknown.suffix
    desc = e.message or ""
    if desc and desc != suffix:
        err.message = f"{desc.removesuffix(': ' + suffix)}: {suffix}"
    else:
        err.message = suffix
    err.args = (err.message,)
    return err


@contextlib.contextmanager
def _errors() -> Any:
    try:
        yield
    except GRPCError as e:
        raise translate(e) from None


async def _unless_missing(call: Awaitable[Any]) -> Any:
    """The call's answer, or None when the server says NotFound."""
    try:
        return await call
    except GRPCError as e:
        err = translate(e)
        if isinstance(err, errdefs.NotFound):
            return None
        raise err from None


def go_time(t: datetime) -> str:
    """RFC 3339 with nanoseconds, as containerd writes gc.expire labels."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class ContentWriter:
    """One ingest over the Write stream: ``offset`` tells where a resumed ingest stands."""

    def __init__(self, client: Client, ref: str) -> None:
        self.client = client
        self.ref = ref
        self.offset = 0  # what the daemon will have once every write sent is applied
        self.total = 0
        self.digest = ""
        self._cm: Any = None
        self._stream: Any = None
        self._pending = 0  # writes whose response has not been read yet

    async def _open(self, total: int, expected: str) -> ContentWriter:
        self._cm = self.client.channel.request(
            "/containerd.services.content.v1.Content/Write", Cardinality.STREAM_STREAM,
            content_api.WriteContentRequest, content_api.WriteContentResponse,
            metadata=self.client.metadata)
        self._stream = await self._cm.__aenter__()
        try:
            # WriteAction(member): betterproto's enum members look like plain ints to
            # mypy (betterproto#616); the constructor gives back the same member, typed.
            resp = await self._round(content_api.WriteContentRequest(
                action=WriteAction(WriteAction.STAT), ref=self.ref, total=total,
                expected=expected))
        except BaseException:
            await self._abandon()
            raise
        self.total = resp.total or total
        return self

    async def _recv(self) -> content_api.WriteContentResponse:
        with _errors():
            resp = await self._stream.recv_message()
            if resp is None:
                await self._stream.recv_trailing_metadata()
                raise errdefs.Unknown(f"write {self.ref}: stream ended without a response")
        if resp.digest:
            self.digest = resp.digest
        return resp

    async def _drain(self) -> None:
        while self._pending:
            self._pending -= 1
            await self._recv()

    async def _round(self, req: content_api.WriteContentRequest, *, end: bool = False
                     ) -> content_api.WriteContentResponse:
        await self._drain()
        with _errors():
            await self._stream.send_message(req, end=end)
        resp = await self._recv()
        self.offset = resp.offset
        return resp

    async def write(self, data: bytes) -> None:
        """Send ``data``; the daemon's answers are read behind the sends (at most
        ``WRITE_WINDOW`` unread), so a stream of small chunks does not pay a round trip
        each, and every byte sent is on its way to the daemon at once."""
        for i in range(0, len(data), WRITE_CHUNK):
            chunk = data[i:i + WRITE_CHUNK]
            with _errors():
                await self._stream.send_message(content_api.WriteContentRequest(
                    action=WriteAction(WriteAction.WRITE), offset=self.offset, data=chunk))
            self.offset += len(chunk)
            self._pending += 1
            if self._pending > WRITE_WINDOW:
                self._pending -= 1
                await self._recv()

    async def truncate(self) -> None:
        """Start over (a write at offset 0 restarts an ingest)."""
        await self._round(content_api.WriteContentRequest(
            action=WriteAction(WriteAction.WRITE), offset=0))

    async def commit(self, size: int, expected: str, labels: dict[str, str] | None = None
                     ) -> None:
        """Verify and publish; AlreadyExists when the namespace already had it."""
        try:
            await self._round(content_api.WriteContentRequest(
                action=WriteAction(WriteAction.COMMIT), offset=self.offset, total=size,
                expected=expected, labels=dict(labels or {})), end=True)
            with _errors():
                while await self._stream.recv_message() is not None:
                    pass
                await self._stream.recv_trailing_metadata()
        finally:
            await self._abandon()

    async def close(self) -> None:
        """Leave the ingest for a later resume."""
        if self._stream is None:
            return
        try:
            with contextlib.suppress(GRPCError, Exception):
                await self._drain()
                await self._stream.end()
                while await self._stream.recv_message() is not None:
                    pass
        finally:
            await self._abandon()

    async def _abandon(self) -> None:
        cm, self._cm, self._stream = self._cm, None, None
        if cm is not None:
            with contextlib.suppress(GRPCError, Exception):
                await cm.__aexit__(None, None, None)

    async def __aenter__(self) -> ContentWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """Namespaced access to a daemon's content, images, snapshots, diff and leases."""

    def __init__(self, channel: Channel, namespace: str, *,
                 snapshotter: str = DEFAULT_SNAPSHOTTER) -> None:
        self.channel = channel
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.lease_id: str | None = None

    @property
    def metadata(self) -> dict[str, str]:
        md = {NAMESPACE_HEADER: self.namespace}
        if self.lease_id:
            md[LEASE_HEADER] = self.lease_id
        return md

    def _stub(self, cls: type) -> Any:
        return cls(self.channel, metadata=self.metadata)

    # --- leases -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, expiry: timedelta = LEASE_EXPIRY) -> AsyncIterator[str]:
        """Hold a lease (expiring, so a crashed client leaves nothing forever)."""
        if self.lease_id is not None:
            yield self.lease_id
            return
        labels = {mediatypes.LABEL_GC_EXPIRE: go_time(datetime.now(UTC) + expiry)}
        with _errors():
            resp = await self._stub(leases_api.LeasesStub).create(
                leases_api.CreateRequest(labels=labels))
        self.lease_id = resp.lease.id
        try:
            yield resp.lease.id
        finally:
            lid, self.lease_id = self.lease_id, None
            with contextlib.suppress(GRPCError):
                await self._stub(leases_api.LeasesStub).delete(
                    leases_api.DeleteRequest(id=lid))

    # --- content ------------------------------------------------------------------

    async def info(self, digest: str) -> content_api.Info | None:
        resp = await _unless_missing(self._stub(content_api.ContentStub).info(
            content_api.InfoRequest(digest=digest)))
        return resp.info if resp is not None else None

    async def list_content(self, filters: Sequence[str] = ()) -> list[content_api.Info]:
        out: list[content_api.Info] = []
        with _errors():
            async for resp in self._stub(content_api.ContentStub).list(
                    content_api.ListContentRequest(filters=list(filters))):
                out.extend(resp.info)
        return out

    async def read_chunks(self, digest: str, offset: int = 0, size: int = 0
                          ) -> AsyncIterator[bytes]:
        with _errors():
            async for resp in self._stub(content_api.ContentStub).read(
                    content_api.ReadContentRequest(digest=digest, offset=offset, size=size)):
                yield resp.data

    async def read(self, digest: str) -> bytes:
        return b"".join([c async for c in self.read_chunks(digest)])

    async def update_labels(self, digest: str, labels: dict[str, str]) -> None:
        """Set (or with "" clear) the given labels, leaving the others alone."""
        info = content_api.Info(digest=digest, labels=dict(labels))
        with _errors():
            await self._stub(content_api.ContentStub).update(content_api.UpdateRequest(
                info=info, update_mask=FieldMask(paths=[f"labels.{k}" for k in labels])))

    async def delete_content(self, digest: str) -> None:
        with _errors():
            await self._stub(content_api.ContentStub).delete(
                content_api.DeleteContentRequest(digest=digest))

    async def status(self, ref: str) -> content_api.Status | None:
        resp = await _unless_missing(self._stub(content_api.ContentStub).status(
            content_api.StatusRequest(ref=ref)))
        return resp.status if resp is not None else None

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[content_api.Status]:
        with _errors():
            resp = await self._stub(content_api.ContentStub).list_statuses(
                content_api.ListStatusesRequest(filters=list(filters)))
        return list(resp.statuses)

    async def abort(self, ref: str) -> None:
        with _errors():
            await self._stub(content_api.ContentStub).abort(content_api.AbortRequest(ref=ref))

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> ContentWriter:
        """Open (or resume) an ingest; AlreadyExists when ``expected`` is present."""
        return await ContentWriter(self, ref)._open(total, expected)

    async def write_blob(self, ref: str, data: bytes, desc: Descriptor,
                         labels: dict[str, str] | None = None) -> bool:
        """Store ``data`` as ``desc``; False when the namespace already had it."""
        try:
            w = await self.writer(ref, desc.size, desc.digest)
        except errdefs.AlreadyExists:
            return False
        try:
            if w.offset:
                await w.truncate()
            await w.write(data)
            await w.commit(desc.size, desc.digest, labels)
        except errdefs.AlreadyExists:
            return False
        finally:
            await w.close()
        return True

    # --- images -------------------------------------------------------------------

    async def get_image(self, name: str) -> images_api.Image:
        with _errors():
            resp = await self._stub(images_api.ImagesStub).get(
                images_api.GetImageRequest(name=name))
        return resp.image

    async def list_images(self, filters: Sequence[str] = ()) -> list[images_api.Image]:
        with _errors():
            resp = await self._stub(images_api.ImagesStub).list(
                images_api.ListImagesRequest(filters=list(filters)))
        return list(resp.images)

    async def put_image(self, name: str, target: Descriptor,
                        labels: dict[str, str] | None = None) -> images_api.Image:
        """Point ``name`` at ``target`` (update, else create), as containerd's clients do."""
        img = images_api.Image(name=name, target=target.to_api(), labels=dict(labels or {}))
        paths = ["target"] + ([f"labels.{k}" for k in labels] if labels else [])
        try:
            with _errors():
                resp = await self._stub(images_api.ImagesStub).update(
                    images_api.UpdateImageRequest(image=img,
                                                  update_mask=FieldMask(paths=paths)))
            return resp.image
        except errdefs.NotFound:
            pass
        with _errors():
            created = await self._stub(images_api.ImagesStub).create(
                images_api.CreateImageRequest(image=img))
        return created.image

    async def delete_image(self, name: str, *, sync: bool = False) -> None:
        with _errors():
            await self._stub(images_api.ImagesStub).delete(
                images_api.DeleteImageRequest(name=name, sync=sync))

    # --- snapshots ----------------------------------------------------------------

    def _snap(self) -> Any:
        return self._stub(snapshots_api.SnapshotsStub)

    async def stat(self, key: str) -> snapshots_api.Info | None:
        resp = await _unless_missing(self._snap().stat(snapshots_api.StatSnapshotRequest(
            snapshotter=self.snapshotter, key=key)))
        return resp.info if resp is not None else None

    async def prepare(self, key: str, parent: str = "",
                      labels: dict[str, str] | None = None) -> list[Mount]:
        with _errors():
            resp = await self._snap().prepare(snapshots_api.PrepareSnapshotRequest(
                snapshotter=self.snapshotter, key=key, parent=parent,
                labels=dict(labels or {})))
        return list(resp.mounts)

    async def view(self, key: str, parent: str, labels: dict[str, str] | None = None
                   ) -> list[Mount]:
        with _errors():
            resp = await self._snap().view(snapshots_api.ViewSnapshotRequest(
                snapshotter=self.snapshotter, key=key, parent=parent,
                labels=dict(labels or {})))
        return list(resp.mounts)

    async def mounts(self, key: str) -> list[Mount]:
        with _errors():
            resp = await self._snap().mounts(snapshots_api.MountsRequest(
                snapshotter=self.snapshotter, key=key))
        return list(resp.mounts)

    async def commit_snapshot(self, name: str, key: str,
                              labels: dict[str, str] | None = None) -> None:
        with _errors():
            await self._snap().commit(snapshots_api.CommitSnapshotRequest(
                snapshotter=self.snapshotter, name=name, key=key, labels=dict(labels or {})))

    async def remove_snapshot(self, key: str) -> None:
        with _errors():
            await self._snap().remove(snapshots_api.RemoveSnapshotRequest(
                snapshotter=self.snapshotter, key=key))

    async def list_snapshots(self, filters: Sequence[str] = ()) -> list[snapshots_api.Info]:
        out: list[snapshots_api.Info] = []
        with _errors():
            async for resp in self._snap().list(snapshots_api.ListSnapshotsRequest(
                    snapshotter=self.snapshotter, filters=list(filters))):
                out.extend(resp.info)
        return out

    async def usage(self, key: str) -> snapshots_api.UsageResponse:
        with _errors():
            return await self._snap().usage(snapshots_api.UsageRequest(
                snapshotter=self.snapshotter, key=key))

    # --- diff ---------------------------------------------------------------------

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        with _errors():
            resp = await self._stub(diff_api.DiffStub).apply(diff_api.ApplyRequest(
                diff=desc.to_api(), mounts=list(mounts)))
        return Descriptor.from_api(resp.applied)

    async def diff(self, left: Sequence[Mount], right: Sequence[Mount], *,
                   media_type: str = "", ref: str = "",
                   labels: dict[str, str] | None = None) -> Descriptor:
        with _errors():
            resp = await self._stub(diff_api.DiffStub).diff(diff_api.DiffRequest(
                left=list(left), right=list(right), media_type=media_type, ref=ref,
                labels=dict(labels or {})))
        return Descriptor.from_api(resp.diff)
