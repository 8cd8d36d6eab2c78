"""CRI ImageService over berth's image, content and snapshot stores (namespace k8s.io).

Images are recorded as containerd's CRI records them, so ``ctr -n k8s.io images ls``
shows the same three names per pull: the reference pulled (when tagged), the
repository at the manifest digest, and the image ID (the config digest), each labelled
``io.cri-containerd.image=managed``. A CRI image is the group of names whose target
leads to one config; its ID is that config's digest.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from berth.core import errdefs, log
from berth.core.api.containerd.services.images import v1 as images_api
from berth.core.api.runtime import v1 as cri
from berth.core.distribution import auth
from berth.core.grpc.context import CallContext
from berth.core.images import platforms, reference
from berth.core.images.image import Resolved, manifest_for
from berth.core.images.manifest import Descriptor, chain_id
from berth.core.transfer.pull import LocalClient, PullOptions, Stores, pull, record_image
from berth.plugins.cri.config import CRIConfig

NAMESPACE = "k8s.io"
IMAGE_LABEL = "io.cri-containerd.image"
IMAGE_LABEL_VALUE = "managed"
_HEX = frozenset("0123456789abcdef")
# Resolved manifests by target digest: content is immutable, so this never goes stale.
_CACHE_MAX = 1024

_log = log.get("cri", namespace=NAMESPACE)


@dataclass
class CRIImage:
    id: str
    resolved: Resolved
    target: Descriptor
    names: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        m = self.resolved.manifest
        return self.target.size + m.config.size + sum(layer.size for layer in m.layers)

    @property
    def chain_id(self) -> str:
        return chain_id(self.resolved.config.diff_ids)

    @property
    def repo_tags(self) -> list[str]:
        return sorted(n for n in self.names if "@" not in n and not n.startswith("sha256:"))

    @property
    def repo_digests(self) -> list[str]:
        return sorted(n for n in self.names if "@" in n)


def parse_ref(ref: str) -> reference.Named:
    """A reference as the kubelet sends it, normalised; InvalidArgument if unparsable."""
    if not ref:
        raise errdefs.InvalidArgument("image reference is empty", raw=True)
    try:
        return reference.parse_docker(ref)
    except errdefs.BerthError as e:
        raise errdefs.InvalidArgument(f"failed to parse image reference {ref!r}: {e}",
                                      raw=True) from None


def _required(spec: cri.ImageSpec | None) -> str:
    if spec is None or not spec.image:
        raise errdefs.InvalidArgument("image spec is required", raw=True)
    return spec.image


def _is_id(text: str) -> bool:
    hexpart = text.removeprefix("sha256:")
    return len(hexpart) == 64 and set(hexpart) <= _HEX


def credentials(a: cri.AuthConfig | None) -> auth.Credentials | None:
    """containerd's ParseAuth: username/password, or ``auth`` as base64 ``user:pass``."""
    if a is None:
        return None
    if a.username:
        return auth.Credentials(a.username, a.password)
    if a.auth:
        try:
            user, sep, password = base64.b64decode(a.auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise errdefs.InvalidArgument("auth: not base64 of user:password",
                                          raw=True) from None
        if not sep:
            raise errdefs.InvalidArgument("auth: no ':' between user and password", raw=True)
        return auth.Credentials(user, password)
    if a.identity_token or a.registry_token:
        raise errdefs.InvalidArgument("identity and registry tokens are not supported",
                                      raw=True)
    return None


def image_user(resolved: Resolved) -> str:
    """The image config's ``User`` ("name", "uid", "uid:gid"...), "" when unset."""
    section = resolved.config.raw.get("config") or {}
    user = section.get("User") if isinstance(section, dict) else ""
    return user if isinstance(user, str) else ""


def _du(path: str) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes under ``path``, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    used = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            used += st.st_blocks * 512
    return used, inodes


class ImageService:
    base = cri.ImageServiceBase

    def __init__(self, stores: Stores, config: CRIConfig, snapshot_root: Path | None) -> None:
        self.stores = stores
        self.config = config
        self.snapshot_root = snapshot_root
        self.matcher = platforms.default()
        self._resolved: dict[str, Resolved] = {}

    # --- the image view -----------------------------------------------------------------

    async def _resolve(self, target: Descriptor) -> Resolved:
        got = self._resolved.get(target.digest)
        if got is None:
            local = LocalClient(self.stores, NAMESPACE, None, self.config.snapshotter)
            got = await manifest_for(local, target, self.matcher)
            if len(self._resolved) >= _CACHE_MAX:
                self._resolved.clear()
            self._resolved[target.digest] = got
        return got

    async def images(self) -> dict[str, CRIImage]:
        """Every usable image of the namespace, by ID."""
        out: dict[str, CRIImage] = {}
        for record in self.stores.images.list(NAMESPACE):
            t = record.target
            target = Descriptor(t.media_type, t.digest, t.size, annotations=dict(t.annotations))
            try:
                resolved = await self._resolve(target)
            except errdefs.BerthError as e:
                # Content missing or for another platform: not an image the node can run.
                _log.debug("image skipped", name=record.name, error=str(e))
                continue
            image_id = resolved.manifest.config.digest
            entry = out.get(image_id)
            if entry is None:
                entry = out[image_id] = CRIImage(image_id, resolved, target)
            entry.names.append(record.name)
        return out

    async def find(self, ref: str) -> CRIImage | None:
        """The image an ImageSpec names: an ID (full or a unique prefix), or a reference."""
        images = await self.images()
        if _is_id(ref):
            return images.get("sha256:" + ref.removeprefix("sha256:"))
        name = str(parse_ref(ref)) if not set(ref) <= _HEX else ""
        for img in images.values():
            if name and name in img.names:
                return img
        if 0 < len(ref) < 64 and set(ref) <= _HEX:
            hits = [i for i in images.values() if i.id.removeprefix("sha256:").startswith(ref)]
            if len(hits) == 1:
                return hits[0]
        return None

    def _to_cri(self, img: CRIImage) -> cri.Image:
        out = cri.Image(id=img.id, repo_tags=img.repo_tags, repo_digests=img.repo_digests,
                        size=img.size, spec=cri.ImageSpec(image=img.id))
        name = image_user(img.resolved).split(":", 1)[0]
        if name.isdigit():
            out.uid = cri.Int64Value(int(name))
        elif name:
            out.username = name
        return out

    # --- the API ------------------------------------------------------------------------

    async def list_images(self, ctx: CallContext, req: cri.ListImagesRequest
                          ) -> cri.ListImagesResponse:
        want = req.filter.image.image if req.filter and req.filter.image else ""
        if want:
            img = await self.find(want)
            return cri.ListImagesResponse(images=[self._to_cri(img)] if img else [])
        images = sorted((await self.images()).values(), key=lambda i: i.id)
        return cri.ListImagesResponse(images=[self._to_cri(i) for i in images])

    async def image_status(self, ctx: CallContext, req: cri.ImageStatusRequest
                           ) -> cri.ImageStatusResponse:
        img = await self.find(_required(req.image))
        if img is None:
            return cri.ImageStatusResponse()
        out = cri.ImageStatusResponse(image=self._to_cri(img))
        if req.verbose:
            out.info = {"info": json.dumps({
                "chainID": img.chain_id, "imageSpec": img.resolved.config.raw,
                "manifestDigest": img.resolved.manifest_desc.digest,
                "names": sorted(img.names), "snapshotter": self.config.snapshotter,
            })}
        return out

    async def pull_image(self, ctx: CallContext, req: cri.PullImageRequest
                         ) -> cri.PullImageResponse:
        ref = req.image.image if req.image else ""
        named = parse_ref(ref)
        opts = PullOptions(snapshotter=self.config.snapshotter, matcher=self.matcher,
                           credentials=credentials(req.auth),
                           labels={IMAGE_LABEL: IMAGE_LABEL_VALUE})
        started = time.monotonic()
        pulled = await pull(self.stores, NAMESPACE, named.spec(), self.config.hosts, opts,
                            names=[str(named)])
        image_id = pulled.resolved.manifest.config.digest
        root = Descriptor(pulled.image.target.media_type, pulled.image.target.digest,
                          pulled.image.target.size)
        extra = [f"{named.name}@{root.digest}", image_id]
        for name in extra:
            if name != str(named):
                record_image(self.stores, NAMESPACE, name, root, opts.labels)
        _log.info("image pulled", ref=ref, id=image_id, endpoint=pulled.endpoint.base,
                  d=f"{time.monotonic() - started:.3f}s")
        return cri.PullImageResponse(image_ref=image_id)

    async def remove_image(self, ctx: CallContext, req: cri.RemoveImageRequest
                           ) -> cri.RemoveImageResponse:
        img = await self.find(_required(req.image))
        if img is None:
            return cri.RemoveImageResponse()  # idempotent, as the API asks
        for name in sorted(img.names, key=lambda n: n == img.id):  # the ID record last
            try:
                self.stores.images.delete(NAMESPACE, name)
            except errdefs.NotFound:
                continue
            if self.stores.events is not None:
                try:
                    self.stores.events.publish(NAMESPACE, "/images/delete",
                                               images_api.ImageDelete(name=name))
                except errdefs.BerthError as e:
                    _log.warning("image event not published", name=name, error=str(e))
        _log.info("image removed", id=img.id, names=sorted(img.names))
        return cri.RemoveImageResponse()

    async def image_fs_info(self, ctx: CallContext, req: cri.ImageFsInfoRequest
                            ) -> cri.ImageFsInfoResponse:
        root = self.snapshot_root
        if root is None:
            return cri.ImageFsInfoResponse()
        used, inodes = await trio.to_thread.run_sync(_du, str(root))
        usage = cri.FilesystemUsage(
            timestamp=time.time_ns(), fs_id=cri.FilesystemIdentifier(mountpoint=str(root)),
            used_bytes=cri.UInt64Value(used), inodes_used=cri.UInt64Value(inodes))
        return cri.ImageFsInfoResponse(image_filesystems=[usage])
