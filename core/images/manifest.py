"""Descriptors, manifests, indexes and image configs (OCI and Docker schema 2), as data.

Pure parsing and building: nothing here reads or writes content. JSON that becomes
content is produced through :mod:`berth.core.images.gojson`, with fields in the order of the
Go structs containerd marshals, so a document built here has containerd's digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from berth.core import errdefs
from berth.core.gocompat import json as gojson
from berth.core.images import mediatypes
from berth.core.images.platforms import Platform, normalize

# Manifests and configs are small; refuse to parse anything larger (containerd's limit).
MAX_JSON = 20 << 20


@dataclass
class Descriptor:
    """An OCI content descriptor: manifests' entries and an image's target alike."""

    media_type: str = ""
    digest: str = ""
    size: int = 0
    urls: list[str] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    def to_json(self) -> dict[str, Any]:
        """The OCI descriptor object (Go field order, empty fields left out)."""
        out: dict[str, Any] = {}
        if self.media_type:
            out["mediaType"] = self.media_type
        out["digest"] = self.digest
        out["size"] = self.size
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = gojson.Map(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any) -> Descriptor:
        if not isinstance(data, dict):
            raise errdefs.InvalidArgument("descriptor must be an object")
        digest = data.get("digest")
        size = data.get("size", 0)
        if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
            raise errdefs.InvalidArgument("descriptor needs a digest and a size")
        platform = data.get("platform")
        return cls(
            media_type=str(data.get("mediaType", "") or ""),
            digest=digest,
            size=size,
            urls=[str(u) for u in data.get("urls") or []],
            annotations={str(k): str(v) for k, v in (data.get("annotations") or {}).items()},
            platform=Platform.from_json(platform) if isinstance(platform, dict) else None,
        )

    def to_api(self) -> Any:
        from berth.core.api.containerd.types import Descriptor as ApiDescriptor

        return ApiDescriptor(media_type=self.media_type, digest=self.digest, size=self.size,
                             annotations=dict(self.annotations))

    @classmethod
    def from_api(cls, d: Any) -> Descriptor:
        return cls(media_type=d.media_type, digest=d.digest, size=d.size,
                   annotations=dict(d.annotations))

    def with_annotations(self, extra: dict[str, str]) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size, list(self.urls),
                          {**self.annotations, **extra}, self.platform)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor_for(media_type: str, data: bytes) -> Descriptor:
    return Descriptor(media_type, digest_of(data), len(data))


def load_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON:
        raise errdefs.InvalidArgument(f"{what} larger than {MAX_JSON} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise errdefs.InvalidArgument(f"{what}: {e}") from None
    if not isinstance(doc, dict):
        raise errdefs.InvalidArgument(f"{what} must be a JSON object")
    return doc


@dataclass
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    media_type: str = mediatypes.OCI_MANIFEST
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": 2}
        if self.media_type:
            out["mediaType"] = self.media_type
        out["config"] = self.config.to_json()
        out["layers"] = [layer.to_json() for layer in self.layers]
        if self.annotations:
            out["annotations"] = gojson.Map(self.annotations)
        return out

    def encode(self) -> bytes:
        return gojson.marshal(self.to_json())


@dataclass
class Index:
    manifests: list[Descriptor]
    media_type: str = ""
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": 2}
        if self.media_type:
            out["mediaType"] = self.media_type
        out["manifests"] = [m.to_json() for m in self.manifests]
        if self.annotations:
            out["annotations"] = gojson.Map(self.annotations)
        return out

    def encode(self) -> bytes:
        return gojson.marshal(self.to_json())


def parse_manifest(data: bytes, media_type: str = "") -> Manifest:
    doc = load_json(data, "manifest")
    if "manifests" in doc and "layers" not in doc:
        raise errdefs.InvalidArgument("expected a manifest, got an index")
    try:
        config = Descriptor.from_json(doc["config"])
        layers = [Descriptor.from_json(x) for x in doc.get("layers") or []]
    except KeyError:
        raise errdefs.InvalidArgument("manifest has no config") from None
    return Manifest(config, layers, str(doc.get("mediaType", "") or media_type),
                    dict(doc.get("annotations") or {}))


def parse_index(data: bytes, media_type: str = "") -> Index:
    doc = load_json(data, "index")
    if "layers" in doc or "config" in doc:
        raise errdefs.InvalidArgument("expected an index, got a manifest")
    manifests = [Descriptor.from_json(x) for x in doc.get("manifests") or []]
    return Index(manifests, str(doc.get("mediaType", "") or media_type),
                 dict(doc.get("annotations") or {}))


def children(desc: Descriptor, data: bytes) -> list[Descriptor]:
    """What a manifest or index refers to (containerd's images.Children)."""
    if mediatypes.is_manifest(desc.media_type):
        m = parse_manifest(data, desc.media_type)
        return [m.config, *m.layers]
    if mediatypes.is_index(desc.media_type):
        return parse_index(data, desc.media_type).manifests
    if desc.media_type in (mediatypes.DOCKER_SCHEMA1, mediatypes.DOCKER_SCHEMA1_SIGNED):
        raise errdefs.NotImplemented_("Docker schema 1 manifests are not supported")
    return []


def detect_media_type(data: bytes) -> str:
    """The media type of a manifest or index that does not say (old registries)."""
    doc = load_json(data, "manifest")
    if isinstance(doc.get("mediaType"), str) and doc["mediaType"]:
        return doc["mediaType"]
    if "manifests" in doc:
        return mediatypes.OCI_INDEX
    if "config" in doc:
        return mediatypes.OCI_MANIFEST
    if doc.get("schemaVersion") == 1:
        return mediatypes.DOCKER_SCHEMA1
    raise errdefs.InvalidArgument("unknown manifest format")


@dataclass
class ImageConfig:
    os: str
    architecture: str
    variant: str
    diff_ids: list[str]
    raw: dict[str, Any]

    @property
    def platform(self) -> Platform:
        return normalize(Platform(self.os, self.architecture, self.variant))


def parse_config(data: bytes) -> ImageConfig:
    doc = load_json(data, "image config")
    rootfs = doc.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") or []
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise errdefs.InvalidArgument("image config: rootfs.diff_ids must be strings")
    return ImageConfig(str(doc.get("os", "")), str(doc.get("architecture", "")),
                       str(doc.get("variant", "") or ""), list(diff_ids), doc)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of every prefix (OCI identity: ChainID(n) = sha256(ChainID(n-1) + " " +
    DiffID(n)), with ChainID(1) = DiffID(1))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else digest_of(f"{out[-1]} {d}".encode()))
    return out


def chain_id(diff_ids: Iterable[str]) -> str:
    ids = chain_ids(list(diff_ids))
    return ids[-1] if ids else ""
