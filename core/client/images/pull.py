"""Pulling: resolve a reference at a registry, fetch what the platform needs into the
content store, record the image, unpack it.

What lands in the content store is what containerd's pull leaves there: every blob
carries ``containerd.io/distribution.source.<host>=<repository>``, parents carry the
garbage collection labels of their children, an index is limited to the best manifest
for the platform. Each blob is written through the ingest ref containerd uses
(``layer-<digest>``...), so an interrupted pull, rerun, continues every blob from the
bytes the daemon already has (a ``Range`` request), by berth's client or by ctr's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from berth.core import errdefs
from berth.core.client.images.progress import Progress, first_error
from berth.core.distribution.client import Registry
from berth.core.distribution.fetch import add_source, commit_fetched, fetch_document
from berth.core.images import mediatypes
from berth.core.images.image import (
    child_labels,
    distribution_source_label,
    select_manifests,
)
from berth.core.images.manifest import Descriptor, children
from berth.core.images.platforms import Matcher
from berth.core.images.reference import Spec

DEFAULT_CONCURRENCY = 3
# Network chunks (up to ~64 KiB each) held while the content writer is busy.
COPY_QUEUE = 64


@dataclass
class Fetched:
    root: Descriptor
    manifests: list[Descriptor]
    blobs: list[Descriptor]


class Puller:
    """Fetches one image from ``registry``'s ``repository`` into ``client``'s store."""

    def __init__(self, client: Any, registry: Registry, spec: Spec, *, matcher: Matcher,
                 progress: Progress | None = None,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.client = client
        self.registry = registry
        self.spec = spec
        self.repository = spec.repository
        self.matcher = matcher
        self.progress = progress or Progress()
        self._limit = asyncio.Semaphore(max(1, concurrency))
        self._source_key = distribution_source_label(spec.hostname)

    async def resolve(self) -> Descriptor:
        reference = self.spec.digest or self.spec.tag or "latest"
        desc = await self.registry.resolve(self.repository, reference)
        self.progress.resolved(str(self.spec), desc)
        return desc

    async def fetch(self, root: Descriptor) -> Fetched:
        """Fetch ``root`` and what it needs for the platform: each document, then its
        GC labels, then its children (an index's best manifest; a manifest's config and
        layers, concurrently)."""
        out = Fetched(root, [], [])
        await self._walk(root, out, 0)
        return out

    async def _walk(self, desc: Descriptor, out: Fetched, depth: int) -> None:
        if depth > 8:
            raise errdefs.InvalidArgument("index nesting too deep")
        if not (mediatypes.is_index(desc.media_type) or mediatypes.is_manifest(desc.media_type)):
            raise errdefs.NotImplemented_(f"cannot pull media type {desc.media_type}")
        data = await self._fetch_manifest(desc)
        kids = children(desc, data)
        # As containerd: label every child of the document, then choose among them.
        await self._label(desc, child_labels(kids))
        out.manifests.append(desc)
        if mediatypes.is_index(desc.media_type):
            for child in select_manifests(kids, self.matcher, limit=1):
                await self._walk(child, out, depth + 1)
            return
        blobs = kids  # a manifest's children: its config and layers
        out.blobs.extend(blobs)
        try:
            async with asyncio.TaskGroup() as tg:
                for blob in blobs:
                    tg.create_task(self._fetch_blob(blob))
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _label(self, desc: Descriptor, labels: dict[str, str]) -> None:
        if labels:
            await self.client.update_labels(desc.digest, labels)

    async def _add_source(self, desc: Descriptor) -> None:
        await add_source(self.client, desc, self._source_key, self.repository)

    async def _fetch_manifest(self, desc: Descriptor) -> bytes:
        return await fetch_document(self.client, self.registry, self.repository, desc,
                                    self.progress, self._source_key)

    async def _fetch_blob(self, desc: Descriptor) -> None:
        async with self._limit:
            status = await fetch_blob(self.client, self.registry, self.repository, desc,
                                      self.progress)
        self.progress.done(desc, status)
        await self._add_source(desc)


async def fetch_blob(client: Any, registry: Registry, repository: str, desc: Descriptor,
                     progress: Progress) -> str:
    """Copy one blob into the content store, continuing an earlier ingest of it."""
    if await client.info(desc.digest) is not None:
        return "exists"
    ref = mediatypes.ref_key(desc.media_type, desc.digest, desc.annotations)
    try:
        w = await client.writer(ref, desc.size, desc.digest)
    except errdefs.AlreadyExists:
        return "exists"
    try:
        if w.offset > desc.size:
            await w.truncate()
        progress.start(desc, w.offset)
        if w.offset < desc.size:
            async with registry.fetch_blob(repository, desc, w.offset) as stream:
                if stream.start != w.offset:
                    await w.truncate()
                await _copy(stream, w, lambda n: progress.advance(desc, n))
        return await commit_fetched(w, desc, lambda: client.abort(ref))
    finally:
        await w.close()


async def _copy(chunks: Any, w: Any, advance: Any) -> None:
    """Network to content writer, the two running side by side.

    What arrives while a write is on its way is sent with the next write (up to
    ``WRITE_CHUNK``), so a fast network makes few large writes and a slow one small
    prompt ones: nothing received waits for more to arrive before it is sent.
    """
    from berth.core.client.client import WRITE_CHUNK

    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=COPY_QUEUE)

    async def produce() -> None:
        async for chunk in chunks:
            await queue.put(chunk)
        await queue.put(None)

    async def consume() -> None:
        end = False
        while not end:
            first = await queue.get()
            if first is None:
                return
            parts, size = [first], len(first)
            while size < WRITE_CHUNK:
                try:
                    more = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if more is None:
                    end = True
                    break
                parts.append(more)
                size += len(more)
            await w.write(b"".join(parts))
            advance(size)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(produce())
            tg.create_task(consume())
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def pull(client: Any, registry: Registry, spec: Spec, *, matcher: Matcher,
               name: str | None = None, unpack: bool = True,
               progress: Progress | None = None,
               concurrency: int = DEFAULT_CONCURRENCY) -> tuple[Any, Fetched]:
    """Pull ``spec`` and record it as image ``name`` (default: the reference)."""
    from berth.core.images.image import manifest_for
    from berth.core.images.unpack import unpack as unpack_image

    progress = progress or Progress()
    puller = Puller(client, registry, spec, matcher=matcher, progress=progress,
                    concurrency=concurrency)
    async with client.lease():
        root = await puller.resolve()
        fetched = await puller.fetch(root)
        # As containerd's Pull: the image is recorded once it is usable (unpacked),
        # and not at all for a platform it does not have.
        resolved = await manifest_for(client, root, matcher)
        if unpack:
            await unpack_image(client, resolved, on_layer=progress.unpacked)
        image = await client.put_image(name or str(spec), root)
    return image, fetched
