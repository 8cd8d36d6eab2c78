"""Content: the local blob store plugin, the namespaced content service and its gRPC API.

Three plugins, as in containerd:

- ``io.containerd.content.v1.content``: :class:`berth.core.content.ContentStore` in the plugin
  root (``<root>/io.containerd.content.v1.content/{blobs,ingest}``);
- ``io.containerd.service.v1.content-service``: the namespaced store of
  :mod:`berth.core.metadata.content`, which also publishes ``/content/delete``;
- ``io.containerd.grpc.v1.content``: ``containerd.services.content.v1.Content``, a thin
  translation whose validation, messages and Write protocol follow containerd's
  contentserver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs, log
from berth.core.api.containerd.events import ContentDelete
from berth.core.api.containerd.services.content import v1 as api
from berth.core.content import ContentStore, Status
from berth.core.content.digest import problem
from berth.core.content.errors import go_quote
from berth.core.events.exchange import Exchange
from berth.core.gc.scheduler import notifier
from berth.core.grpc.bridge import AnswerCaches, Encoded
from berth.core.grpc.context import CallContext
from berth.core.metadata.content import Info, NamespacedContent, info_of
from berth.core.metadata.db import Database
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import CONTENT, EVENT, GRPC, METADATA, SERVICE

_log = log.get("content")

# gogo's non-nullable timestamps put Go's zero time on the wire when unset.
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)
# Info answers kept serialized, per namespace and digest: ctr asks for the same few
# blobs a dozen times per run. Past this many the cache starts over (a bound, not LRU).
INFO_ANSWERS = 256
LIST_BATCH = 100
READ_CHUNK = 1 << 20
# Whole small blobs kept as their serialized Read answer: ``ctr run`` reads the same
# manifest, config and index about ten times per run. A digest names its bytes forever
# (the store verified them), and whether the namespace has the blob is still asked of
# the store on every read. Bounded by size: blobs up to SMALL_BLOB, at most KEPT_BYTES.
SMALL_BLOB = 64 << 10
KEPT_BYTES = 4 << 20


class ContentServiceStore(NamespacedContent):
    """The namespaced store as the content-service plugin: deletes publish an event."""

    def __init__(self, db: Database, backend: ContentStore, events: Exchange,
                 mutated: Callable[[bool], None] | None = None) -> None:
        super().__init__(db, backend, mutated=mutated)
        self.events = events

    def delete(self, namespace: str, digest: str, lease: str | None = None) -> None:
        super().delete(namespace, digest, lease)
        try:
            self.events.publish(namespace, "/content/delete", ContentDelete(digest=digest))
        except errdefs.BerthError as e:
            # As containerd: the delete stands, the caller sees the publish error as is.
            raise errdefs.Unknown(e.message, raw=True) from None


def _info(info: Info, *, updated: bool = True) -> api.Info:
    return api.Info(
        digest=info.digest, size=info.size, created_at=info.created_at or ZERO_TIME,
        updated_at=(info.updated_at or ZERO_TIME) if updated else ZERO_TIME,
        labels=dict(info.labels),
    )


def _status(st: Status) -> api.Status:
    return api.Status(started_at=st.started_at, updated_at=st.updated_at, ref=st.ref,
                      offset=st.offset, total=st.total, expected=st.expected or "")


class ContentService:
    """``containerd.services.content.v1.Content`` over the content-service store."""

    base = api.ContentBase

    def __init__(self, store: NamespacedContent) -> None:
        self.store = store
        self._infos = AnswerCaches(INFO_ANSWERS)
        self._reads: dict[str, Encoded] = {}
        self._read_bytes = 0

    def info(self, ctx: CallContext, req: api.InfoRequest) -> Encoded:
        digest = req.digest  # once: each read of a betterproto field costs microseconds
        if problem(digest) is not None:
            raise errdefs.InvalidArgument(f"{go_quote(digest)} failed validation", raw=True)
        ns = ctx.namespace_required()
        # Read every time (the store is the truth), parsed only when it changed.
        raw = self.store.info_raw(ns, digest)
        return self._infos.get((ns, digest), raw,
                               lambda r: api.InfoResponse(info=_info(info_of(r))))

    def update(self, ctx: CallContext, req: api.UpdateRequest) -> api.UpdateResponse:
        given = req.info or api.Info()
        if problem(given.digest) is not None:
            raise errdefs.InvalidArgument(f"{go_quote(given.digest)} failed validation",
                                          raw=True)
        ns = ctx.namespace_required()
        paths = list(req.update_mask.paths) if req.update_mask else []
        info = self.store.update(ns, Info(digest=given.digest, labels=dict(given.labels)),
                                 paths)
        return api.UpdateResponse(info=_info(info))

    async def list(self, ctx: CallContext, req: api.ListContentRequest,
                   send: Callable[[api.ListContentResponse], Awaitable[None]]) -> None:
        ns = ctx.namespace_required()
        infos = self.store.list(ns, list(req.filters))
        # containerd's List sends no updated_at, in blocks of 100.
        for i in range(0, len(infos), LIST_BATCH):
            await send(api.ListContentResponse(
                info=[_info(x, updated=False) for x in infos[i:i + LIST_BATCH]]))

    def delete(self, ctx: CallContext, req: api.DeleteContentRequest) -> Empty:
        why = problem(req.digest)
        if why is not None:
            raise errdefs.InvalidArgument(why, raw=True)
        ns = ctx.namespace_required()
        _log.debug("delete content", namespace=ns, digest=req.digest)
        self.store.delete(ns, req.digest, ctx.lease)
        return Empty()

    async def read(self, ctx: CallContext, req: api.ReadContentRequest,
                   send: Callable[[api.ReadContentResponse | Encoded], Awaitable[None]]
                   ) -> None:
        # Each field read once: a betterproto attribute costs microseconds.
        digest, offset, size = req.digest, req.offset, req.size
        why = problem(digest)
        if why is not None:
            raise errdefs.InvalidArgument(f"{digest}: {why}", raw=True)
        ns = ctx.namespace_required()
        blob_size = self.store.size(ns, digest)
        whole = offset <= 0 and (size <= 0 or size >= blob_size)
        if whole and 0 < blob_size <= SMALL_BLOB:
            kept = self._reads.get(digest)
            if kept is None:
                kept = await self._read_whole(digest, blob_size)
            if kept is not None:
                await send(kept)  # the connection sends an Encoded answer as it is
                return
        # The namespace has the blob (size above): open it without asking again.
        async with self.store.backend.reader(digest) as r:
            offset = max(offset, 0)
            if offset > blob_size:
                raise errdefs.OutOfRange(f"read past object length {blob_size} bytes",
                                         raw=True)
            if size <= 0 or offset + size > blob_size:
                size = blob_size - offset
            # Response offsets count from the start of this read, as containerd's do.
            sent = 0
            async with aclosing(r.chunks(offset, size, READ_CHUNK)) as chunks:
                async for chunk in chunks:
                    await send(api.ReadContentResponse(offset=sent, data=chunk))
                    sent += len(chunk)

    async def _read_whole(self, digest: str, size: int) -> Encoded | None:
        """A small blob's one Read answer, kept; None if the file is not what the
        metadata says (then the ordinary path reads what there is)."""
        async with self.store.backend.reader(digest) as r:
            if r.size != size:
                return None
            data = await r.read_at(0, size)
        if len(data) != size:
            return None
        if digest in self._reads:  # another call kept it meanwhile
            return self._reads[digest]
        kept = Encoded(api.ReadContentResponse(offset=0, data=data))
        while self._reads and self._read_bytes + size > KEPT_BYTES:
            oldest = next(iter(self._reads))
            self._read_bytes -= len(self._reads.pop(oldest).framed)
        self._reads[digest] = kept
        self._read_bytes += len(kept.framed)
        return kept

    async def status(self, ctx: CallContext, req: api.StatusRequest) -> api.StatusResponse:
        try:
            ns = ctx.namespace_required()
            st = await self.store.status(ns, req.ref)
        except errdefs.BerthError as e:
            raise type(e)(f"could not get status for ref {go_quote(req.ref)}: {e}",
                          raw=True) from None
        return api.StatusResponse(status=_status(st))

    async def list_statuses(self, ctx: CallContext, req: api.ListStatusesRequest
                            ) -> api.ListStatusesResponse:
        ns = ctx.namespace_required()
        statuses = await self.store.list_statuses(ns, list(req.filters))
        return api.ListStatusesResponse(statuses=[_status(s) for s in statuses])

    async def abort(self, ctx: CallContext, req: api.AbortRequest) -> Empty:
        ns = ctx.namespace_required()
        await self.store.abort(ns, req.ref, ctx.lease)
        return Empty()

    async def write(self, ctx: CallContext, stream: Any) -> None:
        """The Write session of containerd's contentserver, step for step.

        The first message names the ref (and optionally the total and expected digest).
        Every request gets one response carrying the current offset; STAT adds digest,
        timestamps and total; WRITE appends at the given offset (0 restarts the ingest);
        COMMIT verifies and ends the session. Response fields persist from one response
        to the next, and the last response is sent once more when the session ends
        without error, exactly as containerd does.
        """
        req = await stream.recv()
        if req is None:
            raise errdefs.Unknown("EOF", raw=True)
        ref = req.ref
        if not ref:
            raise errdefs.InvalidArgument("first message must have a reference", raw=True)
        total, expected = req.total, req.expected
        ns = ctx.namespace_required()
        wr = await self.store.writer(ns, ref, total, expected, ctx.lease)
        msg = api.WriteContentResponse(started_at=ZERO_TIME, updated_at=ZERO_TIME)
        try:
            while True:
                msg.action = req.action
                ws = wr.status()
                msg.offset = ws.offset
                if req.expected:
                    expected = req.expected
                    await self._refuse_existing(ns, ref, req.expected, wr)
                if req.total > 0:
                    total = req.total
                if req.action == api.WriteAction.STAT:
                    msg.digest = wr.digest()
                    msg.started_at, msg.updated_at = ws.started_at, ws.updated_at
                    msg.total = total
                elif req.action in (api.WriteAction.WRITE, api.WriteAction.COMMIT):
                    if req.offset > 0 and req.offset != ws.offset:
                        raise errdefs.OutOfRange(
                            f"write @{req.offset} must occur at current offset {ws.offset}",
                            raw=True)
                    if req.offset == 0 and ws.offset > 0:
                        try:
                            await wr.truncate(0)
                        except Exception as e:
                            raise errdefs.Unknown(f"truncate failed: {e}", raw=True) from None
                        msg.offset = 0
                    if req.data:
                        msg.offset += await wr.write(req.data)
                    if req.action == api.WriteAction.COMMIT:
                        await wr.commit(total, expected, dict(req.labels) or None)
                    msg.digest = wr.digest()
                await stream.send(msg)
                if req.action == api.WriteAction.COMMIT:
                    break
                req = await stream.recv()
                if req is None:
                    break
            await stream.send(msg)
        finally:
            await wr.close()

    async def _refuse_existing(self, ns: str, ref: str, digest: str, wr: Any) -> None:
        try:
            self.store.info(ns, digest)
        except errdefs.BerthError:
            return
        await wr.close()
        try:
            await self.store.abort(ns, ref)
        except errdefs.BerthError as e:
            _log.error("failed to abort write", ref=ref, error=str(e))
        raise errdefs.AlreadyExists(f"blob with expected digest {digest} exists", raw=True)


# --- plugins ------------------------------------------------------------------------------

async def _init_store(ctx: InitContext) -> ContentStore:
    ctx.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ctx.exports["root"] = str(ctx.root)
    return ContentStore(ctx.root)


async def _init_service(ctx: InitContext) -> ContentServiceStore:
    md = ctx.plugins.get(METADATA)
    return ContentServiceStore(md.db, ctx.plugins.get(CONTENT), ctx.plugins.get(EVENT),
                               mutated=notifier(ctx.plugins, content=True))


async def _init_grpc(ctx: InitContext) -> ContentService:
    try:
        store = ctx.plugins.get(SERVICE, "content-service")
    except errdefs.NotFound:
        raise errdefs.NotFound("content store service not found", raw=True) from None
    return ContentService(store)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        Registration(type=CONTENT, id="content", init=_init_store),
        Registration(type=SERVICE, id="content-service", init=_init_service,
                     requires=(EVENT, METADATA, CONTENT)),
        Registration(type=GRPC, id="content", init=_init_grpc, requires=(SERVICE,)),
    ]
