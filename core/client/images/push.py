"""Pushing an image from the content store to a registry.

Blobs first (concurrently), then manifests children before parents, the root last
under the reference's tag, as containerd's pusher orders it. A blob the registry has
is skipped; one whose ``containerd.io/distribution.source.<host>`` label names another
repository of the same registry is mounted from there instead of uploaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from berth.core import errdefs
from berth.core.client.images.progress import Progress, first_error
from berth.core.distribution.client import Registry
from berth.core.images import mediatypes
from berth.core.images.image import distribution_source_label
from berth.core.images.manifest import Descriptor, parse_index, parse_manifest
from berth.core.images.platforms import ALL, Matcher
from berth.core.images.reference import Spec


async def _collect(client: Any, root: Descriptor, matcher: Matcher
                   ) -> tuple[list[tuple[Descriptor, bytes]], dict[str, Descriptor]]:
    manifests: list[tuple[Descriptor, bytes]] = []  # children before parents
    blobs: dict[str, Descriptor] = {}

    async def walk(desc: Descriptor, depth: int) -> None:
        if depth > 8:
            raise errdefs.InvalidArgument("index nesting too deep")
        data = await client.read(desc.digest)
        if mediatypes.is_index(desc.media_type):
            for child in parse_index(data, desc.media_type).manifests:
                if child.platform is None or matcher.match(child.platform):
                    await walk(child, depth + 1)
        elif mediatypes.is_manifest(desc.media_type):
            m = parse_manifest(data, desc.media_type)
            for blob in (m.config, *m.layers):
                blobs.setdefault(blob.digest, blob)
        else:
            raise errdefs.NotImplemented_(f"cannot push media type {desc.media_type}")
        if all(d.digest != desc.digest for d, _ in manifests):
            manifests.append((desc, data))

    await walk(root, 0)
    return manifests, blobs


async def push(client: Any, registry: Registry, spec: Spec, root: Descriptor, *,
               matcher: Matcher = ALL, progress: Progress | None = None,
               concurrency: int = 3) -> None:
    progress = progress or Progress()
    repository = spec.repository
    manifests, blobs = await _collect(client, root, matcher)
    limit = asyncio.Semaphore(max(1, concurrency))
    source_key = distribution_source_label(spec.hostname)

    async def push_blob(desc: Descriptor) -> None:
        async with limit:
            if await registry.blob_exists(repository, desc.digest):
                progress.done(desc, "exists")
                return
            info = await client.info(desc.digest)
            if info is None:
                raise errdefs.NotFound(f"content {desc.digest}")
            for source in (info.labels.get(source_key, "") or "").split(","):
                if source and source != repository:
                    try:
                        if await registry.mount_blob(repository, desc.digest, source):
                            progress.done(desc, "mounted")
                            return
                    except errdefs.BerthError:
                        continue  # not allowed there, or gone: upload instead
            progress.start(desc, 0)

            def read(offset: int, size: int = 0) -> AsyncIterator[bytes]:
                return client.read_chunks(desc.digest, offset, size)

            await registry.upload_blob(repository, desc, read,
                                       progress=lambda n: progress.advance(desc, n))
            progress.done(desc, "done")

    try:
        async with asyncio.TaskGroup() as tg:
            for desc in blobs.values():
                tg.create_task(push_blob(desc))
    except BaseExceptionGroup as group:
        raise first_error(group) from None

    for desc, data in manifests:
        is_root = desc.digest == root.digest
        reference = (spec.tag or desc.digest) if is_root else desc.digest
        if not is_root and await registry.manifest_exists(repository, desc.digest):
            progress.done(desc, "exists")
            continue
        progress.start(desc, 0)
        await registry.put_manifest(repository, reference, desc.media_type, data)
        progress.advance(desc, len(data))
        progress.done(desc, "done")
