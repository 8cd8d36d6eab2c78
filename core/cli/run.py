"""`berth run`: create a container from an image or a root filesystem, run its task,
and exit with its exit status (ctr's run).

The container is made as containerd's client makes it (NewContainer under a lease):
for an image, the image is unpacked if it is not yet, a read-write snapshot named after
the container is prepared on the image's top chain ID (WithNewSnapshot), and the spec
takes the image config's env, args, working dir and user (resolved in the snapshot,
mounted read-only for the lookup); for ``--rootfs DIR`` the spec points at the directory.
The spec travels as JSON in an Any typed
``types.containerd.io/opencontainers/runtime-spec/1/Spec``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from typing import Any

from grpclib import GRPCError

from berth.core import errdefs
from berth.core.cli import app, tasks as tasks_cli
from berth.core.client import cio, connection, tasks as client_tasks

DEFAULT_RUNTIME = "io.containerd.berth.v1"
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
#: labels.Validate: an image's label whose key and value exceed this is not copied.
MAX_LABEL_SIZE = 4096


def label_args(items: list[str]) -> dict[str, str]:
    """ctr's LabelArgs: ``key=value``; a bare ``key`` means ``key=true``."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        out[k] = v if sep else "true"
    return out


def runtime_options(runtime: str, runc_binary: str) -> Any:
    """The runtime's options Any: runc's Options for the runc shims (always, as ctr
    sends them), and for any runtime when a runc binary is named."""
    from betterproto.lib.google.protobuf import Any as AnyMsg

    from berth.core.api.containerd.runc.v1 import Options

    if runc_binary or runtime.startswith("io.containerd.runc."):
        return AnyMsg(type_url=RUNC_OPTIONS_TYPE,
                      value=bytes(Options(binary_name=runc_binary)))
    return None


def network_labels(args: argparse.Namespace) -> None:
    """``--net`` and ``-p`` become the labels berthd attaches networks by; a port
    mapping is checked here so a typo fails before anything is made."""
    from berth.core.networks import labels as netlabels

    net = getattr(args, "net", "") or ""
    ports = list(getattr(args, "publish", []) or [])
    if args.net_host:
        net = net or "host"
    if not net and not ports:
        return
    if ports and not net:
        raise app.CommandError("-p needs --net NAME")
    if net == "host":
        args.net_host = True
    try:
        parsed = [netlabels.parse_port(p) for p in ports]
    except errdefs.InvalidArgument as e:
        raise app.CommandError(str(e)) from None
    args.label = [*args.label, f"{netlabels.NETWORK_LABEL}={net}"]
    if parsed:
        args.label.append(f"{netlabels.PORTS_LABEL}="
                          + ",".join(netlabels.format_port(p) for p in parsed))


def spec_options(args: argparse.Namespace, cmd: list[str]) -> Any:
    from berth.core.oci import default_spec

    opts = default_spec.Options(
        args=list(cmd), env=list(args.env), cwd=args.cwd, user=args.user, tty=args.tty,
        net_host=args.net_host, hostname=args.hostname, read_only=args.read_only,
        cpu_shares=getattr(args, "cpu_shares", 0), cgroup=args.cgroup,
        annotations=label_args(args.label),
        mounts=[default_spec.parse_mount_flag(m) for m in args.mount])
    if args.env_file:
        opts.env = read_env_file(args.env_file) + opts.env
    if args.net_host:
        opts.host_hostname = socket.gethostname()
    return opts


def terminal_size() -> tuple[int, int] | None:
    """(width, height) of our terminal, for the process's console size at creation: the
    ResizePty that follows Start may come after the process first looks."""
    fd = cio.terminal_fd()
    if fd is None:
        return None
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return (size.columns, size.lines) if size.columns and size.lines else None


def read_env_file(path: str) -> list[str]:
    """WithEnvFile: one ``K=V`` per line, blank lines and ``#`` comments skipped."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


async def new_container(args: argparse.Namespace, s: connection.Session, ref: str,
                        container_id: str, cmd: list[str],
                        tty_size: tuple[int, int] | None = None) -> Any:
    """Create the container ``ctr run``/``ctr containers create`` would; returns it."""
    from berth.core.api.containerd.services.containers.v1 import (
        Container,
        ContainerRuntime,
        ContainersStub,
        CreateContainerRequest,
    )
    from berth.core.cli.images import default_snapshotter
    from berth.core.client.client import Client
    from berth.core.oci import default_spec

    if not ref:
        raise app.CommandError("image ref must be provided")
    if not container_id:
        raise app.CommandError("container id must be provided")
    network_labels(args)
    opts = spec_options(args, cmd)
    opts.tty_size = tty_size
    runtime = ContainerRuntime(name=args.runtime,
                               options=runtime_options(args.runtime, args.runc_binary))
    images = Client(s.channel, s.namespace,
                    snapshotter=args.snapshotter or default_snapshotter())
    # The lease protects the snapshot until the container record refers to it.
    async with images.lease():
        containers = ContainersStub(s.channel, metadata=images.metadata)
        if not args.rootfs:
            return await _from_image(args, s, images, containers, ref, container_id,
                                     opts, runtime)
        opts.rootfs = os.path.abspath(ref)
        spec = default_spec.build(s.namespace, container_id, opts,
                                  default_spec.UserDB.from_root(opts.rootfs))
        record = Container(id=container_id, labels=label_args(args.label),
                           runtime=runtime, spec=default_spec.to_any(spec))
        return (await containers.create(CreateContainerRequest(container=record))
                ).container


async def _from_image(args: argparse.Namespace, s: connection.Session, images: Any,
                      containers: Any, ref: str, container_id: str, opts: Any,
                      runtime: Any) -> Any:
    from berth.core import mount as mounting
    from berth.core.api.containerd.services.containers.v1 import Container, CreateContainerRequest
    from berth.core.images import platforms
    from berth.core.images.image import manifest_for
    from berth.core.images.manifest import Descriptor, chain_id
    from berth.core.images.unpack import unpack
    from berth.core.oci import default_spec

    image = await images.get_image(ref)
    resolved = await manifest_for(images, Descriptor.from_api(image.target),
                                  platforms.default())
    top = chain_id(diff for _, diff in resolved.layers)
    if top and await images.stat(top) is None:
        await unpack(images, resolved)
    config = resolved.config.raw
    # WithImageConfigLabels, then the image's own and the command line's labels
    # (buildLabels), then the stop signal.
    labels = default_spec.image_labels(config)
    for k, v in image.labels.items():
        if len(k) + len(v) <= MAX_LABEL_SIZE:
            labels[k] = v
    labels.update(label_args(args.label))
    labels[client_tasks.STOP_SIGNAL_LABEL] = default_spec.image_stop_signal(config)
    mounts = await images.prepare(container_id, top,
                                  label_args(args.snapshotter_label))
    try:
        with mounting.mounted([mounting.Mount.from_proto(m) for m in mounts],
                              read_only=True) as root:
            users = default_spec.UserDB.from_root(root)
            spec = default_spec.build(s.namespace, container_id, opts, users, config)
        record = Container(id=container_id, labels=labels, image=image.name,
                           runtime=runtime, spec=default_spec.to_any(spec),
                           snapshotter=images.snapshotter, snapshot_key=container_id)
        return (await containers.create(CreateContainerRequest(container=record))).container
    except BaseException:
        with contextlib.suppress(errdefs.BerthError, GRPCError):
            await images.remove_snapshot(container_id)
        raise


async def remove_container(s: connection.Session, container: Any, *,
                           keep_snapshot: bool = False) -> None:
    """Delete the record and, unless kept, its snapshot (WithSnapshotCleanup)."""
    from berth.core.api.containerd.services.containers.v1 import DeleteContainerRequest
    from berth.core.api.containerd.services.snapshots.v1 import RemoveSnapshotRequest, SnapshotsStub

    if container.snapshot_key and not keep_snapshot:
        if not container.snapshotter:
            raise app.CommandError("container.Snapshotter must be set to cleanup rootfs "
                                   "snapshot: invalid argument")
        try:
            await SnapshotsStub(s.channel, metadata=s.metadata).remove(RemoveSnapshotRequest(
                snapshotter=container.snapshotter, key=container.snapshot_key))
        except GRPCError as e:
            if not client_tasks.is_not_found(e):
                raise
    await client_tasks.containers_stub(s).delete(DeleteContainerRequest(id=container.id))


async def run(args: argparse.Namespace, s: connection.Session) -> int:
    if args.rm and args.detach:
        raise app.CommandError("flags --detach and --rm cannot be specified together")
    container = await new_container(args, s, args.ref, args.id, args.cmd,
                                    tty_size=terminal_size() if args.tty else None)
    try:
        return await _run_task(args, s, container)
    finally:
        if args.rm:
            await remove_container(s, container)


async def _run_task(args: argparse.Namespace, s: connection.Session, container: Any) -> int:
    fifos = cio.new_fifo_set(args.fifo_dir, container.id, terminal=args.tty)
    created = False

    async def create() -> None:
        nonlocal created
        pid = await client_tasks.create_task(s, container, fifos)
        created = True
        if args.pid_file:
            tasks_cli.write_pid_file(args.pid_file, pid)

    try:
        code = await client_tasks.run_attached(s, container.id, fifos, create=create,
                                            detach=args.detach)
    except BaseException:
        if created:
            with contextlib.suppress(Exception):
                await client_tasks.delete_task(s, container.id, force=True, fifos=fifos)
        else:
            fifos.close()
        raise
    if code is None:
        return 0
    await client_tasks.delete_task(s, container.id, fifos=fifos)
    return code


def container_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``run`` and ``containers create`` share (ctr's ContainerFlags)."""
    p.add_argument("--snapshotter", default=None,
                   help="snapshotter (env BERTH_SNAPSHOTTER, default overlayfs)")
    p.add_argument("--snapshotter-label", action="append", default=[], metavar="KEY=VALUE",
                   help="labels added to the new snapshot for this container")
    p.add_argument("--cwd", default="", help="working directory of the process")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="additional environment variables")
    p.add_argument("--env-file", default="", help="environment variables from a file")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="additional labels (also set as OCI annotations)")
    p.add_argument("--mount", action="append", default=[],
                   help="additional mount, e.g. type=bind,src=/tmp,dst=/host,options=rbind:ro")
    p.add_argument("--net-host", action="store_true", help="use the host's network")
    p.add_argument("--net", default="", metavar="none|host|NAME[,NAME]",
                   help="networks to attach (label io.berth.network)")
    p.add_argument("--publish", "-p", action="append", default=[],
                   metavar="[IP:]HOSTPORT:PORT[/tcp|udp]",
                   help="forward a host port (label io.berth.ports)")
    p.add_argument("--read-only", action="store_true", help="read-only root filesystem")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME,
                   help=f"runtime name (default {DEFAULT_RUNTIME})")
    p.add_argument("--runc-binary", default="", help="runc-compatible binary for the shim")
    p.add_argument("--tty", "-t", action="store_true", help="allocate a TTY")
    p.add_argument("--rootfs", action="store_true",
                   help="use a root filesystem directory not managed by a snapshotter")
    p.add_argument("--user", "-u", default="", help="user[:group] to run as")
    p.add_argument("--hostname", default="", help="the container's hostname")
    p.add_argument("--cgroup", default=None,
                   help='cgroup path (default /<namespace>/<id>; "" for none)')


def register(sub: Any) -> None:
    c = app.add(sub, "run", run,
                example="berth run --rm -t docker.io/library/alpine:latest demo sh",
                help="run a container")
    c.add_argument("--rm", action="store_true",
                   help="remove the container after running (not with --detach)")
    c.add_argument("--detach", "-d", action="store_true",
                   help="detach from the task after it has started")
    c.add_argument("--cpu-shares", type=int, default=1024, help="cpu shares")
    c.add_argument("--pid-file", default="", help="file path to write the task's pid")
    tasks_cli.fifo_dir_flag(c)
    container_flags(c)
    c.add_argument("ref", metavar="IMAGE|ROOTFS")
    c.add_argument("id", metavar="ID")
    c.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
