"""Walking an image in a content store: from its target to the manifest for a platform,
its config and layers, and the garbage collection labels that tie them together.

These follow containerd's ``images`` package: ``manifest_for`` is ``images.Manifest``
(an index's children are filtered by platform and the best match wins),
``child_labels`` is ``SetChildrenMappedLabels`` with ``ChildGCLabels``.

Shared by both sides and bound to neither event loop: the walks only await the reader they
are given (``read(digest) -> bytes``), the client library's over gRPC or a trio service's
over the local content store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from berth.core import errdefs
from berth.core.images import mediatypes
from berth.core.images.manifest import (
    Descriptor,
    ImageConfig,
    Manifest,
    parse_config,
    parse_index,
    parse_manifest,
)
from berth.core.images.platforms import Matcher, Platform

# Indexes nest; refuse absurd depths (a loop cannot happen with digests, a bomb can).
MAX_DEPTH = 8


@dataclass
class Resolved:
    """One platform's image: manifest, config and layers paired with their diff IDs."""

    manifest_desc: Descriptor
    manifest: Manifest
    config: ImageConfig

    @property
    def layers(self) -> list[tuple[Descriptor, str]]:
        if len(self.manifest.layers) != len(self.config.diff_ids):
            raise errdefs.InvalidArgument(
                f"number of layers and diffIDs don't match: {len(self.manifest.layers)} != "
                f"{len(self.config.diff_ids)}")
        return list(zip(self.manifest.layers, self.config.diff_ids, strict=True))


def child_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """The labels a parent gets so that garbage collection keeps its children."""
    labels: dict[str, str] = {}
    counts: dict[str, int] = {}
    for child in children:
        key = mediatypes.child_gc_label(child.media_type)
        idx = counts.get(key, 0)
        counts[key] = idx + 1
        if idx > 0 or key.endswith("."):
            key = f"{key}{idx}"
        labels[key] = child.digest
    return labels


def distribution_source_label(host: str) -> str:
    """The label naming the repositories of ``host`` a blob came from; as containerd
    keys it by the host name alone, a port is left out."""
    from urllib.parse import urlsplit

    return f"{mediatypes.LABEL_DISTRIBUTION_SOURCE}.{urlsplit('//' + host).hostname or host}"


def append_source(existing: str, repository: str) -> str:
    """Add a repository to a distribution source label's comma separated value."""
    repos = [r for r in existing.split(",") if r]
    if repository not in repos:
        repos.append(repository)
    return ",".join(repos)


def select_manifests(children: Sequence[Descriptor], matcher: Matcher,
                     limit: int = 0) -> list[Descriptor]:
    """An index's children for a platform: filtered, best first (stable), ``limit`` kept."""
    kept = [c for c in children if c.platform is None or matcher.match(c.platform)]
    kept.sort(key=lambda c: matcher.rank(c.platform))
    if limit > 0:
        if not kept:
            raise errdefs.NotFound("no match for platform in manifest")
        kept = kept[:limit]
    return kept


async def manifest_for(client: Any, target: Descriptor, matcher: Matcher) -> Resolved:
    """The manifest of ``target`` for the platform ``matcher`` prefers (``images.Manifest``).

    ``client`` needs ``read(digest) -> bytes``.
    """
    candidates: list[tuple[Descriptor, Manifest, ImageConfig]] = []

    async def walk(desc: Descriptor, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise errdefs.InvalidArgument("index nesting too deep")
        if mediatypes.is_manifest(desc.media_type):
            if desc.platform is not None and not matcher.match(desc.platform):
                return
            m = parse_manifest(await client.read(desc.digest), desc.media_type)
            config = parse_config(await client.read(m.config.digest))
            if desc.platform is None and not matcher.match(
                    Platform(config.os, config.architecture)):
                return
            candidates.append((desc, m, config))
        elif mediatypes.is_index(desc.media_type):
            idx = parse_index(await client.read(desc.digest), desc.media_type)
            for child in select_manifests(idx.manifests, matcher):
                await walk(child, depth + 1)
        else:
            raise errdefs.NotImplemented_(f"unexpected media type {desc.media_type} for "
                                          f"{desc.digest}")

    await walk(target, 0)
    if not candidates:
        raise errdefs.NotFound(f"manifest {target.digest}: no match for platform")
    # Stable: candidates with equal rank keep the order the index lists them in.
    best = min(range(len(candidates)), key=lambda i: (
        matcher.rank(candidates[i][0].platform or candidates[i][2].platform), i))
    desc, m, config = candidates[best]
    return Resolved(desc, m, config)


async def platforms_of(client: Any, target: Descriptor) -> list[Platform]:
    """Every platform an image has (``images.Platforms``), for listings."""
    out: list[Platform] = []

    async def walk(desc: Descriptor, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        if desc.platform is not None and mediatypes.is_manifest(desc.media_type):
            out.append(desc.platform)
            return
        if mediatypes.is_index(desc.media_type):
            for child in parse_index(await client.read(desc.digest)).manifests:
                await walk(child, depth + 1)
        elif mediatypes.is_manifest(desc.media_type):
            m = parse_manifest(await client.read(desc.digest))
            out.append(parse_config(await client.read(m.config.digest)).platform)

    await walk(target, 0)
    return out
