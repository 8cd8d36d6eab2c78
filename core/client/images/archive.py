"""Image archives: importing OCI layout and docker-archive tars, exporting both.

Import follows containerd's ``archive.ImportIndex`` and ``Client.Import`` step for step,
so that importing a tar into berthd gives the digests containerd gives: every regular
file of the tar goes into the content store (ref ``tar-<name>``); an OCI layout's
``index.json`` is the index; a docker-archive's ``manifest.json`` becomes Docker schema 2
manifests and an index, written as Go writes JSON. Images are named from the
``io.containerd.image.name`` annotation, or from ``org.opencontainers.image.ref.name``
through a translator (ctr's ``--base-name``).

Export writes what ``ctr images export`` writes: an OCI layout with a Docker
``manifest.json`` beside it (readable by both importers), entries sorted by name. The
``docker`` format writes ``docker save``'s layout instead.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import IO, Any, BinaryIO

from berth.core import errdefs
from berth.core.archive import compression
from berth.core.gocompat import json as gojson
from berth.core.images import mediatypes, reference
from berth.core.images.image import child_labels
from berth.core.images.manifest import (
    Descriptor,
    Index,
    descriptor_for,
    parse_config,
    parse_index,
    parse_manifest,
)
from berth.core.images.platforms import Matcher, Platform, normalize

COPY_CHUNK = 1 << 20
JSON_LIMIT = 20 << 20
OCI_LAYOUT_VERSION = "1.0.0"


# --- names ------------------------------------------------------------------------------

class BadArchive(errdefs.InvalidArgument):
    """The stream is not an image archive berth can read (the caller names the file)."""


def add_ref_prefix(prefix: str) -> Callable[[str], str]:
    """ctr's default translator: a bare OCI ref name ("latest") gets ``prefix:``."""
    def translate(ref: str) -> str:
        if any(c in ref for c in "/:@"):
            return ref
        return f"{prefix}:{ref}"
    return translate


def filter_ref_prefix(prefix: str) -> Callable[[str], str]:
    """ctr's ``--base-name``: full names must start with ``prefix``, bare ones get it."""
    def translate(ref: str) -> str:
        if any(c in ref for c in "/:@"):
            if not ref.startswith(prefix) or (len(ref) > len(prefix)
                                              and ref[len(prefix)] not in "/:@"):
                return ""
            return ref
        return f"{prefix}:{ref}"
    return translate


def default_prefix() -> str:
    return f"import-{date.today().isoformat()}"


def image_name(annotations: dict[str, str], translate: Callable[[str], str] | None) -> str:
    name = annotations.get(mediatypes.ANNOTATION_IMAGE_NAME, "")
    if name:
        return name
    name = annotations.get(mediatypes.ANNOTATION_REF_NAME, "")
    if name and translate is not None:
        name = translate(name)
    return name


# --- import -----------------------------------------------------------------------------

@dataclass
class ImportOptions:
    matcher: Matcher
    translate: Callable[[str], str] | None = None
    index_name: str = ""
    digest_ref: Callable[[str], str] | None = None
    skip_digest_for_named: bool = False


@dataclass
class Imported:
    index: Descriptor
    images: list[tuple[str, Descriptor]] = field(default_factory=list)


async def _ingest(client: Any, ref: str, src: IO[bytes], size: int) -> str:
    """Copy ``size`` bytes of ``src`` into the content store; returns their digest."""
    hasher = hashlib.sha256()
    try:
        w = await client.writer(ref, size)
    except errdefs.AlreadyExists:
        # Only with an expected digest, which is not given here; be safe anyway.
        while chunk := src.read(COPY_CHUNK):
            hasher.update(chunk)
        return "sha256:" + hasher.hexdigest()
    try:
        if w.offset:
            await w.truncate()
        left = size
        while left > 0:
            chunk = src.read(min(COPY_CHUNK, left))
            if not chunk:
                raise BadArchive(f"{ref}: archive entry shorter than its header")
            hasher.update(chunk)
            await w.write(chunk)
            left -= len(chunk)
        digest = "sha256:" + hasher.hexdigest()
        try:
            await w.commit(size, digest)
        except errdefs.AlreadyExists:
            pass
    finally:
        await w.close()
    return digest


def _load_json(src: IO[bytes], what: str) -> Any:
    data = src.read(JSON_LIMIT + 1)
    if len(data) > JSON_LIMIT:
        raise BadArchive(f"{what} larger than {JSON_LIMIT} bytes")
    try:
        return json.loads(data)
    except ValueError as e:
        raise BadArchive(f"untar {what}: {e}") from None


async def import_index(client: Any, src: BinaryIO) -> Descriptor:
    """Put an archive's blobs into the content store; returns its index descriptor."""
    layout: dict[str, Any] | None = None
    docker_manifests: list[dict[str, Any]] | None = None
    symlinks: dict[str, str] = {}
    blobs: dict[str, Descriptor] = {}
    try:
        tar = tarfile.open(fileobj=src, mode="r|*")
    except tarfile.TarError as e:
        raise BadArchive(f"not an image archive: {e}") from None
    with tar:
        for member in tar:
            if member.issym():
                symlinks[member.name] = posixpath.join(posixpath.dirname(member.name),
                                                       member.linkname)
            if not member.isreg():
                continue
            name = posixpath.normpath(member.name)
            f = tar.extractfile(member)
            assert f is not None
            if name == "oci-layout":
                layout = _load_json(f, f"oci layout {member.name!r}")
            elif name == "manifest.json":
                docker_manifests = _load_json(f, f"manifest {member.name!r}")
            else:
                digest = await _ingest(client, "tar-" + name, f, member.size)
                blobs[name] = Descriptor("", digest, member.size)
    if layout and layout.get("imageLayoutVersion"):
        if layout["imageLayoutVersion"] != OCI_LAYOUT_VERSION:
            raise BadArchive(
                f"unsupported OCI version {layout['imageLayoutVersion']}")
        idx = blobs.get("index.json")
        if idx is None:
            raise BadArchive(
                f"missing index.json in OCI layout {OCI_LAYOUT_VERSION}")
        return Descriptor(mediatypes.OCI_INDEX, idx.digest, idx.size)
    if docker_manifests is None or not isinstance(docker_manifests, list):
        raise BadArchive("unrecognized image format")
    for name, target in symlinks.items():
        if target not in blobs:
            raise BadArchive(f"no target for symlink layer from {name!r} to "
                                          f"{target!r}")
        blobs[name] = blobs[target]
    return await _docker_index(client, docker_manifests, blobs)


async def _docker_index(client: Any, manifests: list[dict[str, Any]],
                        blobs: dict[str, Descriptor]) -> Descriptor:
    index = Index([])
    for mfst in manifests:
        config_name = str(mfst.get("Config", ""))
        if config_name not in blobs:
            raise errdefs.NotFound(f"image config {config_name!r}")
        config = blobs[config_name]
        config = Descriptor(mediatypes.DOCKER_CONFIG, config.digest, config.size)
        layers = await _resolve_layers(client, [str(x) for x in mfst.get("Layers") or []],
                                       blobs)
        doc = {"schemaVersion": 2, "mediaType": mediatypes.DOCKER_MANIFEST,
               "config": config.to_json(), "layers": [x.to_json() for x in layers]}
        data = gojson.marshal(doc)
        desc = descriptor_for(mediatypes.DOCKER_MANIFEST, data)
        await client.write_blob(f"manifest-{desc.digest}", data, desc)
        cfg = parse_config(await client.read(config.digest))
        desc.platform = normalize(Platform(cfg.os, cfg.architecture))
        tags = mfst.get("RepoTags") or []
        if not tags:
            index.manifests.append(desc)
        for tag in tags:
            normalized = reference.normalize(str(tag))
            index.manifests.append(desc.with_annotations({
                mediatypes.ANNOTATION_IMAGE_NAME: normalized,
                mediatypes.ANNOTATION_REF_NAME: reference.oci_ref_name(normalized),
            }))
    data = index.encode()
    desc = descriptor_for(mediatypes.OCI_INDEX, data)
    await client.write_blob(f"manifest-{desc.digest}", data, desc)
    return desc


async def _resolve_layers(client: Any, files: list[str], blobs: dict[str, Descriptor]
                          ) -> list[Descriptor]:
    layers: list[Descriptor] = []
    for f in files:
        if f not in blobs:
            raise errdefs.NotFound(f"layer {f!r}")
        layers.append(Descriptor("", blobs[f].digest, blobs[f].size))
    # A compressed copy stored earlier (labelled with this uncompressed digest) is used
    # instead, as containerd does.
    for layer in layers:
        found = await client.list_content(
            [f'labels."{mediatypes.LABEL_UNCOMPRESSED}"=={layer.digest}'])
        for info in found:
            if info.labels.get(mediatypes.LABEL_UNCOMPRESSED) == layer.digest:
                layer.digest, layer.size = info.digest, info.size
                layer.media_type = await _layer_media_type(client, info.digest)
                break
    for layer in layers:
        if not layer.media_type:
            layer.media_type = await _layer_media_type(client, layer.digest)
    return layers


async def _layer_media_type(client: Any, digest: str) -> str:
    head = b""
    async for chunk in client.read_chunks(digest, 0, 10):
        head += chunk
    if len(head) < 10:
        return mediatypes.DOCKER_LAYER
    if compression.detect(head) is compression.Compression.UNCOMPRESSED:
        return mediatypes.DOCKER_LAYER
    return mediatypes.DOCKER_LAYER_GZIP


async def import_archive(client: Any, src: BinaryIO, opts: ImportOptions) -> Imported:
    """containerd's Client.Import: blobs in, GC labels set, images named and recorded.

    Run it under a lease (``client.lease()``).
    """
    index = await import_index(client, src)
    out = Imported(index)
    if opts.index_name:
        out.images.append((opts.index_name, index))

    async def walk(desc: Descriptor, depth: int) -> None:
        if depth > 8:
            raise BadArchive("index nesting too deep")
        data = await client.read(desc.digest) if (
            mediatypes.is_index(desc.media_type) or mediatypes.is_manifest(desc.media_type)
        ) else b""
        if desc.digest == index.digest:
            kids = parse_index(data).manifests
            for m in kids:
                name = image_name(m.annotations, opts.translate)
                if name:
                    out.images.append((name, m))
                if opts.skip_digest_for_named and name:
                    continue
                if opts.digest_ref is not None:
                    ref = opts.digest_ref(m.digest)
                    if ref:
                        out.images.append((ref, m))
        elif mediatypes.is_index(desc.media_type):
            kids = parse_index(data, desc.media_type).manifests
        elif mediatypes.is_manifest(desc.media_type):
            manifest = parse_manifest(data, desc.media_type)
            kids = [manifest.config, *manifest.layers]
        else:
            kids = []
        kids = [k for k in kids if k.platform is None or opts.matcher.match(k.platform)]
        labels = child_labels(kids)
        if labels:
            await client.update_labels(desc.digest, labels)
        for k in kids:
            await walk(k, depth + 1)

    await walk(index, 0)
    for name, target in out.images:
        await client.put_image(name, target)
    return out


# --- export -----------------------------------------------------------------------------

class TarWriter:
    """Writes tar entries to a blocking stream from async data sources (Go's layout:
    two zero blocks at the end, no record padding)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def header(self, name: str, size: int, *, mode: int = 0o644, directory: bool = False
               ) -> None:
        info = tarfile.TarInfo(name)
        info.size = 0 if directory else size
        info.mode = mode
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        info.mtime = 0
        info.uname = info.gname = ""
        self.out.write(info.tobuf(format=tarfile.PAX_FORMAT))

    def pad(self, size: int) -> None:
        rest = size % tarfile.BLOCKSIZE
        if rest:
            self.out.write(b"\0" * (tarfile.BLOCKSIZE - rest))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.header(name, len(data), mode=mode)
        self.out.write(data)
        self.pad(len(data))

    async def blob(self, client: Any, name: str, desc: Descriptor) -> None:
        self.header(name, desc.size, mode=0o444)
        hasher = hashlib.new(desc.digest.split(":", 1)[0])
        n = 0
        async for chunk in client.read_chunks(desc.digest):
            hasher.update(chunk)
            self.out.write(chunk)
            n += len(chunk)
        if n != desc.size:
            raise errdefs.FailedPrecondition(f"unexpected copy size for {name}")
        if f"{desc.digest.split(':', 1)[0]}:{hasher.hexdigest()}" != desc.digest:
            raise errdefs.FailedPrecondition(f"unexpected digest copied for {name}")
        self.pad(n)

    def close(self) -> None:
        self.out.write(b"\0" * (2 * tarfile.BLOCKSIZE))


def blob_path(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


@dataclass
class _ExportManifest:
    desc: Descriptor
    names: list[str] = field(default_factory=list)


async def _tree(client: Any, desc: Descriptor, found: dict[str, Descriptor]) -> None:
    """Every blob below ``desc`` (containerd's images.Walk with ChildrenHandler)."""
    found.setdefault(desc.digest, desc)
    if mediatypes.is_index(desc.media_type):
        for child in parse_index(await client.read(desc.digest)).manifests:
            await _tree(client, child, found)
    elif mediatypes.is_manifest(desc.media_type):
        m = parse_manifest(await client.read(desc.digest))
        for child in (m.config, *m.layers):
            found.setdefault(child.digest, child)


async def export_archive(client: Any, out: BinaryIO, images: list[tuple[str, Descriptor]],
                         *, matcher: Matcher, all_platforms: bool = False,
                         skip_docker_manifest: bool = False,
                         skip_non_distributable: bool = False) -> None:
    """ctr's export: OCI layout plus Docker ``manifest.json``."""
    targets = [t.with_annotations({
        mediatypes.ANNOTATION_IMAGE_NAME: name,
        mediatypes.ANNOTATION_REF_NAME: reference.oci_ref_name(name)}) for name, t in images]
    blobs: dict[str, Descriptor] = {}
    docker: dict[str, _ExportManifest] = {}
    resolved: dict[str, str] = {}
    for desc in targets:
        if mediatypes.is_manifest(desc.media_type):
            if desc.digest not in docker:
                await _tree(client, desc, blobs)
                docker[desc.digest] = _ExportManifest(desc)
            name = desc.annotations.get(mediatypes.ANNOTATION_IMAGE_NAME, "")
            if name and not skip_docker_manifest:
                docker[desc.digest].names.append(name)
        elif mediatypes.is_index(desc.media_type):
            if desc.digest not in resolved:
                blobs.setdefault(desc.digest, desc)
                chosen: list[Descriptor] = []
                for m in parse_index(await client.read(desc.digest)).manifests:
                    if m.platform is None or matcher.match(m.platform):
                        chosen.append(m)
                    elif not all_platforms:
                        continue
                    await _tree(client, m, blobs)
                best = ""
                if not skip_docker_manifest:
                    if chosen:
                        chosen.sort(key=lambda c: matcher.rank(c.platform))
                        best = chosen[0].digest
                        docker.setdefault(best, _ExportManifest(chosen[0]))
                    else:
                        raise errdefs.NotFound("no manifest found for platform")
                resolved[desc.digest] = best
            best = resolved[desc.digest]
            name = desc.annotations.get(mediatypes.ANNOTATION_IMAGE_NAME, "")
            if best and name:
                docker[best].names.append(name)
        else:
            raise errdefs.InvalidArgument("only manifests may be exported")

    records: dict[str, Any] = {
        "oci-layout": gojson.marshal({"imageLayoutVersion": OCI_LAYOUT_VERSION}),
        "index.json": Index(targets).encode(),
    }
    for d in blobs.values():
        if skip_non_distributable and mediatypes.is_non_distributable(d.media_type):
            continue
        records[blob_path(d.digest)] = d
    if docker:
        records["manifest.json"] = await _docker_manifest_json(client, docker, blob_path)
    if blobs:
        records["blobs/"] = None
        for algorithm in sorted({d.digest.split(":", 1)[0] for d in blobs.values()}):
            records[f"blobs/{algorithm}/"] = None
    tw = TarWriter(out)
    for name in sorted(records):
        value = records[name]
        if value is None:
            tw.header(name, 0, mode=0o755, directory=True)
        elif isinstance(value, Descriptor):
            await tw.blob(client, name, value)
        else:
            tw.file(name, value, 0o444 if name == "oci-layout" else 0o644)
    tw.close()


async def _docker_manifest_json(client: Any, manifests: dict[str, _ExportManifest],
                                path_of: Callable[[str], str]) -> bytes:
    entries = []
    for m in manifests.values():
        manifest = parse_manifest(await client.read(m.desc.digest))
        entries.append({
            "Config": path_of(manifest.config.digest),
            "RepoTags": [reference.familiar(n) for n in m.names] or None,
            "Layers": [path_of(layer.digest) for layer in manifest.layers],
        })
    return gojson.marshal(entries)


async def export_docker_archive(client: Any, out: BinaryIO,
                                images: list[tuple[str, Descriptor]], *,
                                matcher: Matcher) -> None:
    """``docker save``'s layout: ``manifest.json``, ``<config>.json``,
    ``<layer>/layer.tar``, ``repositories``."""
    from berth.core.images.image import manifest_for

    tw = TarWriter(out)
    written: set[str] = set()
    entries: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    by_manifest: dict[str, dict[str, Any]] = {}
    for name, target in images:
        resolved = await manifest_for(client, target, matcher)
        entry = by_manifest.get(resolved.manifest_desc.digest)
        if entry is None:
            config = resolved.manifest.config
            config_name = config.digest.split(":", 1)[1] + ".json"
            if config_name not in written:
                tw.file(config_name, await client.read(config.digest))
                written.add(config_name)
            layer_names = []
            for layer, diff_id in resolved.layers:
                layer_dir = diff_id.split(":", 1)[1]
                layer_name = f"{layer_dir}/layer.tar"
                if layer_name not in written:
                    tw.header(f"{layer_dir}/", 0, mode=0o755, directory=True)
                    tw.file(f"{layer_dir}/VERSION", b"1.0")
                    await tw.blob(client, layer_name, layer)
                    written.add(layer_name)
                layer_names.append(layer_name)
            entry = {"Config": config_name, "RepoTags": [], "Layers": layer_names}
            by_manifest[resolved.manifest_desc.digest] = entry
            entries.append(entry)
        named = reference.parse_normalized(name)
        if named.tag:
            entry["RepoTags"].append(named.familiar())
            repo = reference.Named(named.domain, named.path).familiar()
            last = entry["Layers"][-1].split("/", 1)[0] if entry["Layers"] else ""
            repositories.setdefault(repo, {})[named.tag] = last
    tw.file("manifest.json", gojson.marshal(entries))
    tw.file("repositories", gojson.marshal(gojson.Map(
        {k: gojson.Map(v) for k, v in repositories.items()})))
    tw.close()

