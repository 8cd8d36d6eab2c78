"""Pulling an image inside berthd (trio) into the local stores.

The same result as containerd's pull and as berth's client pull (``core.client.images.pull``):
every blob labelled with its distribution source, parents with the GC labels of their
children, an index limited to the platform's best manifest, layers unpacked into the
snapshotter with containerd's snapshot names, and the image recorded once usable. All
of it under a lease that expires by itself should berthd die half way, so GC takes back
what an interrupted pull left. Registry endpoints come from containerd's hosts.toml
rules (:mod:`berth.core.distribution.hosts`; the registry client is the client
library's, on httpx, which runs on trio too): each endpoint able to resolve is tried in
order, and the one that answered serves the blobs. Progress is published per blob as
``berth.events.v1.ImagePullProgress`` on ``/images/pull/progress``.

The manifest walk (``core.images``) and the client library's unpacker and document
fetch (framework-neutral: they only await the client they are given) are reused through
:class:`LocalClient`, which offers them the client methods they call, over local stores.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from berth.core import errdefs, log
from berth.core.api.berth.events.v1 import ImagePullProgress
from berth.core.api.containerd.services.images import v1 as images_api
from berth.core.api.containerd.types import Descriptor as ApiDescriptor
from berth.core.distribution import auth
from berth.core.distribution.client import Registry
from berth.core.distribution.fetch import add_source, commit_fetched, fetch_document
from berth.core.distribution.hosts import Endpoint, Hosts, registry_for, resolvers
from berth.core.images import mediatypes, platforms
from berth.core.images.image import (
    Resolved,
    child_labels,
    distribution_source_label,
    manifest_for,
    select_manifests,
)
from berth.core.images.manifest import Descriptor, children
from berth.core.images.reference import Spec
from berth.core.images.unpack import unpack as unpack_image
from berth.core.metadata.content import Info, NamespacedContent
from berth.core.metadata.images import Descriptor as ImageTarget, Image, ImageStore
from berth.core.metadata.leases import LeaseStore, random_id
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.core.mount import Mount

_log = log.get("pull")

PROGRESS_TOPIC = "/images/pull/progress"

DEFAULT_CONCURRENCY = 3
LEASE_EXPIRY = timedelta(hours=1)
MAX_DEPTH = 8


@dataclass
class Stores:
    """The local stores a pull writes to (all from plugin instances)."""

    content: NamespacedContent
    images: ImageStore
    snapshotters: Mapping[str, NamespacedSnapshotter]
    differ: Any  # core.services.diff.DiffLocal: ``apply(ns, desc, mounts)``
    leases: LeaseStore
    events: Any = None  # core.events.exchange.Exchange
    mutated: Callable[[bool], None] = lambda deletion: None  # GC notifier


@dataclass
class PullOptions:
    snapshotter: str = "overlayfs"
    unpack: bool = True
    matcher: platforms.Matcher = field(default_factory=platforms.default)
    credentials: auth.Credentials | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Pulled:
    image: Image
    resolved: Resolved
    endpoint: Endpoint
    chain_id: str = ""


def _api_desc(desc: Descriptor) -> ApiDescriptor:
    return ApiDescriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size)


class LocalClient:
    """The calls ``core.images``' manifest walk and unpacker make, on the local stores
    of one namespace, under one lease."""

    def __init__(self, stores: Stores, namespace: str, lease: str | None,
                 snapshotter: str) -> None:
        self.stores = stores
        self.namespace = namespace
        self.lease = lease
        self.snapshotter = snapshotter

    @property
    def _sn(self) -> NamespacedSnapshotter:
        try:
            return self.stores.snapshotters[self.snapshotter]
        except KeyError:
            raise errdefs.NotFound(f"snapshotter {self.snapshotter} was not found",
                                   raw=True) from None

    # content
    async def info(self, digest: str) -> Info | None:
        try:
            return self.stores.content.info(self.namespace, digest)
        except errdefs.NotFound:
            return None

    async def read(self, digest: str) -> bytes:
        async with self.stores.content.reader(self.namespace, digest) as r:
            return await r.read_at(0, r.size)

    async def update_labels(self, digest: str, labels: dict[str, str]) -> None:
        self.stores.content.update(self.namespace, Info(digest=digest, labels=labels),
                                   [f"labels.{k}" for k in labels])

    async def write_blob(self, ref: str, data: bytes, desc: Descriptor) -> None:
        try:
            w = await self.stores.content.writer(self.namespace, ref, len(data), desc.digest,
                                                 lease=self.lease)
        except errdefs.AlreadyExists:
            return
        try:
            if w.status().offset:
                await w.truncate(0)
            await w.write(data)
            try:
                await w.commit(len(data), desc.digest)
            except errdefs.AlreadyExists:
                pass
        finally:
            await w.close()

    # snapshots and diff
    async def stat(self, key: str) -> Any:
        try:
            return await self._sn.stat(self.namespace, key)
        except errdefs.NotFound:
            return None

    async def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return await self._sn.prepare(self.namespace, key, parent, labels, lease=self.lease)

    async def apply(self, layer: Descriptor, mounts: list[Mount]) -> Any:
        return await self.stores.differ.apply(self.namespace, _api_desc(layer), mounts)

    async def commit_snapshot(self, name: str, key: str, labels: dict[str, str]) -> None:
        await self._sn.commit(self.namespace, name, key, labels, lease=self.lease)

    async def remove_snapshot(self, key: str) -> None:
        await self._sn.remove(self.namespace, key, lease=self.lease)


class _Progress:
    """Publishes each blob's start and end (and each layer's unpacking) as an event."""

    def __init__(self, stores: Stores, namespace: str, ref: str) -> None:
        self.stores, self.namespace, self.ref = stores, namespace, ref

    def _publish(self, desc: Descriptor, status: str, offset: int) -> None:
        if self.stores.events is None:
            return
        try:
            self.stores.events.publish(self.namespace, PROGRESS_TOPIC, ImagePullProgress(
                ref=self.ref, digest=desc.digest, media_type=desc.media_type, offset=offset,
                total=desc.size, status=status))
        except errdefs.BerthError as e:  # progress is news, never a reason to fail
            _log.warning("pull progress not published", namespace=self.namespace,
                         ref=self.ref, error=str(e))

    def start(self, desc: Descriptor, offset: int) -> None:
        self._publish(desc, "start", offset)

    def done(self, desc: Descriptor, status: str) -> None:
        self._publish(desc, status, desc.size)

    def advance(self, desc: Descriptor, n: int) -> None:
        """Bytes as they come are not news: start and end are."""


class _Fetcher:
    """Fetches one image's documents and blobs from one endpoint (trio)."""

    def __init__(self, local: LocalClient, registry: Registry, spec: Spec,
                 opts: PullOptions, progress: _Progress) -> None:
        self.local = local
        self.registry = registry
        self.repository = spec.repository
        self.opts = opts
        self.progress = progress
        self.limit = trio.CapacityLimiter(max(1, opts.concurrency))
        self.source_key = distribution_source_label(spec.hostname)

    async def walk(self, desc: Descriptor, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise errdefs.InvalidArgument("index nesting too deep")
        if not (mediatypes.is_index(desc.media_type) or mediatypes.is_manifest(desc.media_type)):
            raise errdefs.NotImplemented_(f"cannot pull media type {desc.media_type}")
        data = await self._document(desc)
        kids = children(desc, data)
        labels = child_labels(kids)
        if labels:
            await self.local.update_labels(desc.digest, labels)
        if mediatypes.is_index(desc.media_type):
            for child in select_manifests(kids, self.opts.matcher, limit=1):
                await self.walk(child, depth + 1)
            return
        async with trio.open_nursery() as nursery:
            for blob in kids:
                nursery.start_soon(self._blob, blob)

    async def _document(self, desc: Descriptor) -> bytes:
        return await fetch_document(self.local, self.registry, self.repository, desc,
                                    self.progress, self.source_key)

    async def _blob(self, desc: Descriptor) -> None:
        async with self.limit:
            status = await self._copy(desc)
        self.progress.done(desc, status)
        await add_source(self.local, desc, self.source_key, self.repository)

    async def _copy(self, desc: Descriptor) -> str:
        """Network to content store, continuing an earlier ingest of the same blob."""
        if await self.local.info(desc.digest) is not None:
            return "exists"
        content, ns = self.local.stores.content, self.local.namespace
        ref = mediatypes.ref_key(desc.media_type, desc.digest, desc.annotations)
        try:
            w = await content.writer(ns, ref, desc.size, desc.digest, lease=self.local.lease)
        except errdefs.AlreadyExists:
            return "exists"
        try:
            offset = w.status().offset
            if offset > desc.size:
                await w.truncate(0)
                offset = 0
            self.progress.start(desc, offset)
            if offset < desc.size:
                async with self.registry.fetch_blob(self.repository, desc, offset) as stream:
                    if stream.start != offset:
                        await w.truncate(stream.start)
                    async for chunk in stream:
                        await w.write(chunk)
            return await commit_fetched(
                w, desc, lambda: content.abort(ns, ref, self.local.lease))
        finally:
            await w.close()


async def _resolve(spec: Spec, endpoints: list[Endpoint], opts: PullOptions
                   ) -> tuple[Registry, Endpoint, Descriptor]:
    """The first endpoint that resolves the reference, and what it names."""
    reference = spec.digest or spec.tag or "latest"
    errors: list[str] = []
    not_found = True
    for ep in resolvers(endpoints, bool(spec.digest)):
        reg = registry_for(spec.hostname, ep, opts.credentials)
        try:
            desc = await reg.resolve(spec.repository, reference)
        except errdefs.NotFound as e:
            errors.append(f"{ep.base}: {e}")
        except (errdefs.BerthError, OSError, ValueError) as e:
            not_found = False
            errors.append(f"{ep.base}: {e}")
        except Exception as e:  # httpx transport errors, TLS failures
            not_found = False
            errors.append(f"{ep.base}: {type(e).__name__}: {e}")
        else:
            return reg, ep, desc
        await reg.aclose()
    if not errors:
        raise errdefs.FailedPrecondition(f"no registry endpoint of {spec.hostname} can "
                                         f"resolve {spec}", raw=True)
    text = f"failed to resolve reference {str(spec)!r}: " + "; ".join(errors)
    if not_found:
        raise errdefs.NotFound(text, raw=True)
    raise errdefs.Unavailable(text, raw=True)


def record_image(stores: Stores, namespace: str, name: str, root: Descriptor,
            labels: dict[str, str]) -> Image:
    """Create or retarget image ``name``, publishing containerd's image event."""
    target = ImageTarget(root.media_type, root.digest, root.size,
                         annotations=dict(root.annotations))
    image = Image(name=name, target=target, labels=dict(labels))
    event: images_api.ImageCreate | images_api.ImageUpdate
    try:
        out = stores.images.create(namespace, image)
        topic, event = "/images/create", images_api.ImageCreate(name=name, labels=out.labels)
    except errdefs.AlreadyExists:
        out = stores.images.update(namespace, image, ["target", *(
            f"labels.{k}" for k in labels)])
        topic, event = "/images/update", images_api.ImageUpdate(name=name, labels=out.labels)
    if stores.events is not None:
        try:
            stores.events.publish(namespace, topic, event)
        except errdefs.BerthError as e:
            _log.warning("image event not published", namespace=namespace, name=name,
                         error=str(e))
    return out


async def pull(stores: Stores, namespace: str, spec: Spec, hosts: Hosts,
               opts: PullOptions | None = None, *, names: list[str] | None = None
               ) -> Pulled:
    """Pull ``spec`` into ``namespace`` and record it under ``names`` (default: the
    reference itself); every name gets ``opts.labels``."""
    opts = opts or PullOptions()
    if opts.unpack and opts.snapshotter not in stores.snapshotters:
        raise errdefs.FailedPrecondition(
            f"snapshotter {opts.snapshotter!r} is not loaded", raw=True)
    endpoints = hosts.endpoints(spec.hostname)
    expire = (datetime.now(UTC) + LEASE_EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ")
    lease = stores.leases.create(namespace, f"pull-{random_id()}-{secrets.token_hex(3)}",
                                 {mediatypes.LABEL_GC_EXPIRE: expire}).id
    progress = _Progress(stores, namespace, str(spec))
    try:
        local = LocalClient(stores, namespace, lease, opts.snapshotter)
        registry, ep, root = await _resolve(spec, endpoints, opts)
        try:
            await _Fetcher(local, registry, spec, opts, progress).walk(root)
        finally:
            await registry.aclose()
        resolved = await manifest_for(local, root, opts.matcher)
        top = ""
        if opts.unpack:
            def unpacked(index: int, chain: str, applied: bool) -> None:
                layer = resolved.manifest.layers[index]
                progress.done(layer, "unpacked" if applied else "exists")
            top = await unpack_image(local, resolved, on_layer=unpacked)
        images = [record_image(stores, namespace, n, root, opts.labels)
                  for n in (names or [str(spec)])]
    finally:
        with trio.CancelScope(shield=True):
            try:
                stores.leases.delete(namespace, lease)
            except errdefs.BerthError as e:
                _log.warning("pull lease not removed", namespace=namespace, lease=lease,
                             error=str(e))
            stores.mutated(True)
    _log.info("pulled", namespace=namespace, ref=str(spec), digest=root.digest,
              endpoint=ep.base)
    return Pulled(images[0], resolved, ep, top)
