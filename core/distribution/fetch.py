"""The steps of a pull that both pulls share: the client library's (asyncio) and
berthd's own (``core.transfer``, trio). They only await the ``client`` they are given
(``info``, ``read``, ``update_labels``, ``write_blob``) and the registry client, so they
run on either event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from berth.core import errdefs
from berth.core.distribution.client import Registry
from berth.core.images import mediatypes
from berth.core.images.image import append_source
from berth.core.images.manifest import Descriptor


async def add_source(client: Any, desc: Descriptor, key: str, repository: str) -> None:
    """Name ``repository`` in the blob's distribution source label ``key``.

    Needs only ``client.info`` and ``client.update_labels``.
    """
    info = await client.info(desc.digest)
    existing = info.labels.get(key, "") if info is not None else ""
    value = append_source(existing, repository)
    if value != existing:
        await client.update_labels(desc.digest, {key: value})


async def fetch_document(client: Any, registry: Registry, repository: str, desc: Descriptor,
                         progress: Any, source_key: str) -> bytes:
    """A manifest or index: from the content store if there, else from the registry
    into it; either way labelled with its source. Framework-neutral, as add_source."""
    if await client.info(desc.digest) is not None:
        progress.done(desc, "exists")
        data = await client.read(desc.digest)
    else:
        progress.start(desc, 0)
        data = await registry.fetch_manifest(repository, desc)
        ref = mediatypes.ref_key(desc.media_type, desc.digest, desc.annotations)
        await client.write_blob(ref, data, desc)
        progress.advance(desc, len(data))
        progress.done(desc, "done")
    await add_source(client, desc, source_key, repository)
    return data


async def commit_fetched(w: Any, desc: Descriptor, abort: Callable[[], Awaitable[None]]
                         ) -> str:
    """Commit a fetched blob: "done", or "exists" when someone else committed it first.
    Bytes that do not make the blob are dropped (``abort``) so the next try starts over.
    Framework-neutral, as add_source."""
    try:
        await w.commit(desc.size, desc.digest)
    except errdefs.AlreadyExists:
        return "exists"
    except errdefs.FailedPrecondition:
        await w.close()
        await abort()
        raise
    return "done"
