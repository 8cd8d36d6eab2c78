"""`berth images pull|push|ls|rm|tag|import|export|import-rootfs|mount|unmount`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from berth.core import errdefs
from berth.core.cli import app
from berth.core.cli.output import emit
from berth.core.cli.transfer import for_terminal, human
from berth.core.client import connection


def default_snapshotter() -> str:
    return os.environ.get("BERTH_SNAPSHOTTER") or os.environ.get("CONTAINERD_SNAPSHOTTER") \
        or "overlayfs"


def _client(s: connection.Session, args: argparse.Namespace) -> Any:
    from berth.core.client.client import Client

    return Client(s.channel, s.namespace,
                  snapshotter=getattr(args, "snapshotter", None) or default_snapshotter())


def _matcher(args: argparse.Namespace, *, strict: bool = False) -> Any:
    from berth.core.images import platforms

    if getattr(args, "all_platforms", False):
        return platforms.ALL
    spec = getattr(args, "platform", None)
    if spec:
        p = platforms.parse(spec)
        return platforms.only_strict(p) if strict else platforms.only(p)
    return platforms.default_strict() if strict else platforms.default()


def _registry(args: argparse.Namespace, host: str) -> Any:
    from berth.core.client.registry import Credentials, Registry, TLSOptions
    from berth.core.distribution.auth import parse_credentials

    creds: Credentials | None = parse_credentials(args.user) if args.user else None
    tls = TLSOptions(ca_file=args.tlscacert, skip_verify=args.skip_verify)
    return Registry(host, plain_http=args.plain_http, credentials=creds, tls=tls)


def _registries(args: argparse.Namespace, spec: Any, *, push: bool = False) -> list[Any]:
    """Registry client factories to try in order: the endpoints of ``--hosts-dir``
    (containerd's hosts.toml directories) able to resolve (or push), or the reference's
    host itself."""
    from berth.core.distribution.auth import parse_credentials
    from berth.core.distribution.hosts import CAP_PUSH, Hosts, registry_for, resolvers

    if not getattr(args, "hosts_dir", ""):
        return [lambda: _registry(args, spec.hostname)]
    creds = parse_credentials(args.user) if args.user else None
    eps = Hosts(args.hosts_dir).endpoints(spec.hostname)
    eps = [ep for ep in eps if ep.can(CAP_PUSH)] if push else resolvers(eps, bool(spec.digest))
    if not eps:
        raise app.CommandError(f"no endpoint in {args.hosts_dir} can "
                               f"{'push' if push else 'resolve'} {spec}")
    return [lambda ep=ep: registry_for(spec.hostname, ep, creds) for ep in eps]


def _ref(text: str) -> Any:
    from berth.core.images import reference

    return reference.parse(reference.normalize(text))


# --- pull / push --------------------------------------------------------------------------

async def pull(args: argparse.Namespace, s: connection.Session) -> int:
    import httpx

    from berth.core.client.images.pull import pull as do_pull

    spec = _ref(args.ref)
    c = _client(s, args)
    registries = _registries(args, spec)
    for i, make in enumerate(registries):
        try:
            async with make() as reg:
                with for_terminal() as progress:
                    image, _ = await do_pull(c, reg, spec, matcher=_matcher(args),
                                             unpack=not args.no_unpack, progress=progress,
                                             concurrency=args.max_concurrent_downloads)
            break
        except (errdefs.BerthError, httpx.HTTPError, OSError):
            if i == len(registries) - 1:
                raise  # as containerd: the next endpoint, and the last one's error
    print(f"{image.name}: {image.target.digest}")
    return 0


async def push(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.client.images.push import push as do_push
    from berth.core.images.manifest import Descriptor

    spec = _ref(args.remote)
    c = _client(s, args)
    local = args.local or args.remote
    try:
        img = await c.get_image(local)
    except errdefs.NotFound:
        img = await c.get_image(str(spec))
    root = Descriptor.from_api(img.target)
    from berth.core.images import platforms

    matcher = _matcher(args) if args.platform else platforms.ALL
    async with _registries(args, spec, push=True)[0]() as reg:
        with for_terminal() as progress:
            await do_push(c, reg, spec, root, matcher=matcher, progress=progress)
    print(f"{spec}: pushed {root.digest}")
    return 0


# --- listing and removal ------------------------------------------------------------------

async def _size(c: Any, target: Any, matcher: Any) -> int | None:
    from berth.core.images import mediatypes
    from berth.core.images.manifest import Descriptor, parse_index, parse_manifest

    total = 0

    async def walk(d: Descriptor) -> None:
        nonlocal total
        total += d.size
        if mediatypes.is_index(d.media_type):
            for m in parse_index(await c.read(d.digest)).manifests:
                if m.platform is None or matcher.match(m.platform):
                    await walk(m)
        elif mediatypes.is_manifest(d.media_type):
            manifest = parse_manifest(await c.read(d.digest))
            total += manifest.config.size + sum(x.size for x in manifest.layers)

    try:
        await walk(Descriptor.from_api(target))
    except errdefs.BerthError:
        return None
    return total


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.images import platforms
    from berth.core.images.image import platforms_of
    from berth.core.images.manifest import Descriptor

    c = _client(s, args)
    imgs = await c.list_images(args.filters)
    if args.quiet:
        for img in imgs:
            print(img.name)
        return 0
    rows, records = [], []
    for img in imgs:
        size = await _size(c, img.target, platforms.default())
        try:
            plats = sorted({platforms.format(p) for p in
                            await platforms_of(c, Descriptor.from_api(img.target))})
        except errdefs.BerthError:
            plats = []
        labels = ",".join(f"{k}={v}" for k, v in sorted(img.labels.items())) or "-"
        rows.append((img.name, img.target.media_type, img.target.digest,
                     human(size) if size is not None else "-", ",".join(plats) or "-",
                     labels))
        records.append({"name": img.name, "media_type": img.target.media_type,
                        "digest": img.target.digest, "size": size, "platforms": plats,
                        "labels": dict(img.labels)})
    emit(["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"], rows, fmt=args.format,
         records=records)
    return 0


async def rm(args: argparse.Namespace, s: connection.Session) -> int:
    c = _client(s, args)
    failed = False
    for i, name in enumerate(args.refs):
        try:
            # As ctr: only the last delete waits for garbage collection.
            await c.delete_image(name, sync=args.sync and i == len(args.refs) - 1)
        except errdefs.NotFound:
            print(f"berth: image {name} not found", file=sys.stderr)
            failed = True
            continue
        print(name)
    return 1 if failed else 0


async def tag(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.images.manifest import Descriptor

    c = _client(s, args)
    src = await c.get_image(args.source)
    for target in args.targets:
        await c.put_image(target, Descriptor.from_api(src.target), dict(src.labels) or None)
        print(target)
    return 0


# --- archives -----------------------------------------------------------------------------

async def _unpack(c: Any, name: str, target: Any, matcher: Any) -> None:
    from berth.core.images.image import manifest_for
    from berth.core.images.unpack import unpack

    print(f"unpacking {name} ({target.digest})...", end="", flush=True)
    async with c.lease():
        await unpack(c, await manifest_for(c, target, matcher))
    print("done")


async def import_(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.client.images import archive
    from berth.core.images import platforms

    if args.base_name:
        translate = archive.filter_ref_prefix(args.base_name)
        prefix = args.base_name
    else:
        prefix = archive.default_prefix()
        translate = archive.add_ref_prefix(prefix)
    matcher = platforms.only_strict(platforms.parse(args.platform)) if args.platform \
        else platforms.default()
    opts = archive.ImportOptions(
        matcher=platforms.ALL if args.all_platforms else matcher, translate=translate,
        index_name=args.index_name or "",
        digest_ref=(lambda d: f"{prefix}@{d}") if args.digests else None,
        skip_digest_for_named=args.skip_digest_for_named)
    c = _client(s, args)
    # As ctr: the file is opened before the daemon is asked for anything.
    src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    try:
        async with c.lease():
            imported = await archive.import_archive(c, src, opts)
    except archive.BadArchive as e:
        raise errdefs.InvalidArgument(f"{args.file}: {e}", raw=True) from None
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    if not args.no_unpack:
        for name, target in imported.images:
            await _unpack(c, name, target, matcher)
    for name, target in imported.images:
        print(f"{name} {target.digest}")
    return 0


async def export(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.client.images import archive
    from berth.core.images.manifest import Descriptor

    c = _client(s, args)
    # As ctr: the output file is created first, so a bad path is the error reported.
    out = sys.stdout.buffer if args.out == "-" else open(args.out, "wb")  # noqa: SIM115
    done = False
    try:
        images = [(n, Descriptor.from_api((await c.get_image(n)).target)) for n in args.refs]
        if args.format_ == "docker":
            await archive.export_docker_archive(c, out, images, matcher=_matcher(args))
        else:
            await archive.export_archive(
                c, out, images, matcher=_matcher(args, strict=True),
                all_platforms=args.all_platforms,
                skip_docker_manifest=args.skip_manifest_json,
                skip_non_distributable=args.skip_non_distributable)
        done = True
    finally:
        if out is not sys.stdout.buffer:
            out.close()
            if not done:
                # No half-written archive left behind under the name asked for.
                with contextlib.suppress(OSError):
                    os.unlink(args.out)
    return 0


async def import_rootfs(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.client.images.rootfs import import_rootfs as build
    from berth.core.images import platforms

    c = _client(s, args)
    name = args.ref
    async with c.lease():
        manifest, _ = await build(c, Path(args.source), name)
    if not args.no_unpack:
        await _unpack(c, name, manifest, platforms.default())
    print(f"{name} {manifest.digest}")
    return 0


# --- mount --------------------------------------------------------------------------------

async def mount(args: argparse.Namespace, s: connection.Session) -> int:
    from datetime import UTC, datetime

    from grpclib import GRPCError

    from berth.core import mount as mounting
    from berth.core.api.containerd.services.leases.v1 import CreateRequest, LeasesStub
    from berth.core.client.client import LEASE_EXPIRY, go_time, translate
    from berth.core.images import mediatypes, platforms
    from berth.core.images.image import manifest_for
    from berth.core.images.manifest import Descriptor, chain_id
    from berth.core.images.unpack import unpack

    c = _client(s, args)
    target = os.path.abspath(args.target)
    matcher = platforms.only(platforms.parse(args.platform)) if args.platform \
        else platforms.default()
    img = await c.get_image(args.ref)
    resolved = await manifest_for(c, Descriptor.from_api(img.target), matcher)
    # The lease (named after the target, as ctr names it) keeps the snapshot alive.
    try:
        await LeasesStub(s.channel, metadata=s.metadata).create(CreateRequest(id=target, labels={
            mediatypes.LABEL_GC_EXPIRE: go_time(datetime.now(UTC) + LEASE_EXPIRY),
            f"{mediatypes.LABEL_GC_REF_SNAPSHOT}.{c.snapshotter}": target}))
    except GRPCError as e:
        if not isinstance(translate(e), errdefs.AlreadyExists):
            raise
    c.lease_id = target
    await unpack(c, resolved)
    top = chain_id(d for _, d in resolved.layers)
    print(top)
    try:
        mounts = await (c.prepare(target, top) if args.rw else c.view(target, top))
    except errdefs.AlreadyExists:
        mounts = await c.mounts(target)
    try:
        mounting.mount_all([mounting.Mount.from_proto(m) for m in mounts], target)
    except OSError as e:
        try:
            await c.remove_snapshot(target)
        except errdefs.BerthError:
            pass
        raise app.CommandError(f"mount {target}: {e.strerror}") from None
    print(target)
    return 0


async def unmount(args: argparse.Namespace, s: connection.Session) -> int:
    from grpclib import GRPCError

    from berth.core import mount as mounting
    from berth.core.api.containerd.services.leases.v1 import DeleteRequest, LeasesStub
    from berth.core.client.client import translate

    target = os.path.abspath(args.target)
    try:
        mounting.unmount_all(target)
    except OSError as e:
        raise app.CommandError(f"unmount {target}: {e.strerror}") from None
    if args.rm:
        c = _client(s, args)
        try:
            await LeasesStub(s.channel, metadata=s.metadata).delete(DeleteRequest(id=target))
        except GRPCError as e:
            if not isinstance(translate(e), errdefs.NotFound):
                raise
        try:
            await c.remove_snapshot(target)
        except errdefs.NotFound:
            pass
    print(target)
    return 0


# --- arguments ----------------------------------------------------------------------------

def _remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="store_true", help="use plain HTTP, not TLS")
    p.add_argument("--user", "-u", default="", help="registry credentials USER[:PASSWORD]")
    p.add_argument("--skip-verify", "-k", action="store_true",
                   help="do not verify the registry's TLS certificate")
    p.add_argument("--tlscacert", default=None, help="CA bundle for the registry")
    p.add_argument("--platform", default="", help="platform, e.g. linux/amd64")
    p.add_argument("--hosts-dir", default="",
                   help="registry hosts in containerd's hosts.toml directory format")


def _snapshotter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshotter", default=None,
                   help="snapshotter (env BERTH_SNAPSHOTTER, default overlayfs)")


def register(sub: Any) -> None:
    p = app.group(sub, "images", example="berth images pull docker.io/library/alpine:latest",
                  aliases=["image", "i"], help="manage images")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True

    c = app.add(g, "pull", pull, example="berth images pull docker.io/library/alpine:latest",
                help="pull an image from a registry")
    _remote_flags(c)
    _snapshotter(c)
    c.add_argument("--all-platforms", action="store_true")
    c.add_argument("--no-unpack", action="store_true", help="fetch only")
    c.add_argument("--max-concurrent-downloads", type=int, default=3)
    c.add_argument("ref")

    c = app.add(g, "push", push,
                example="berth images push --plain-http 127.0.0.1:5000/alpine:latest",
                help="push an image to a registry")
    _remote_flags(c)
    c.add_argument("remote")
    c.add_argument("local", nargs="?", default="")

    c = app.add(g, "list", ls, example="berth images ls -q", help="list images", aliases=["ls"])
    c.add_argument("--quiet", "-q", action="store_true")
    c.add_argument("filters", nargs="*")

    c = app.add(g, "remove", rm, example="berth images rm docker.io/library/alpine:latest",
                help="remove images", aliases=["rm", "delete", "del"])
    c.add_argument("--sync", action="store_true", help="wait for garbage collection")
    c.add_argument("refs", nargs="+")

    c = app.add(g, "tag", tag,
                example="berth images tag docker.io/library/alpine:latest alpine:mine",
                help="give an image more names")
    c.add_argument("source")
    c.add_argument("targets", nargs="+")

    c = app.add(g, "import", import_, example="berth images import alpine.tar",
                help="import an OCI layout or docker-archive tar")
    _snapshotter(c)
    c.add_argument("--base-name", default="", help="name prefix for unnamed images")
    c.add_argument("--digests", action="store_true", help="also name images by digest")
    c.add_argument("--skip-digest-for-named", action="store_true")
    c.add_argument("--index-name", default="", help="name the whole index too")
    c.add_argument("--platform", default="")
    c.add_argument("--all-platforms", action="store_true")
    c.add_argument("--no-unpack", action="store_true")
    c.add_argument("file", help="archive path, or - for stdin")

    c = app.add(g, "export", export,
                example="berth images export alpine.tar docker.io/library/alpine:latest",
                help="export images to a tar")
    c.add_argument("--archive-format", dest="format_", default="oci",
                   choices=["oci", "docker"],
                   help="oci: OCI layout with manifest.json (ctr's); docker: docker save's")
    c.add_argument("--platform", default="")
    c.add_argument("--all-platforms", action="store_true")
    c.add_argument("--skip-manifest-json", action="store_true")
    c.add_argument("--skip-non-distributable", action="store_true")
    c.add_argument("out", help="output path, or - for stdout")
    c.add_argument("refs", nargs="+")

    c = app.add(g, "import-rootfs", import_rootfs,
                example="berth images import-rootfs ./rootfs example.com/mine:1",
                help="make a one-layer image from a directory or a tar")
    _snapshotter(c)
    c.add_argument("--no-unpack", action="store_true")
    c.add_argument("source", help="root filesystem directory or tar")
    c.add_argument("ref")

    c = app.add(g, "mount", mount,
                example="berth images mount docker.io/library/alpine:latest /mnt/alpine",
                help="mount an image's root filesystem")
    _snapshotter(c)
    c.add_argument("--rw", action="store_true", help="writable (an active snapshot)")
    c.add_argument("--platform", default="")
    c.add_argument("ref")
    c.add_argument("target")

    c = app.add(g, "unmount", unmount, example="berth images unmount --rm /mnt/alpine",
                help="unmount an image mounted with mount")
    _snapshotter(c)
    c.add_argument("--rm", action="store_true", help="also remove the snapshot and lease")
    c.add_argument("target")
