"""`berth containers create|ls|info|rm|label` (ctr's containers)."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from datetime import UTC, datetime
from typing import Any

from grpclib import GRPCError

from berth.core import errdefs
from berth.core.cli import app, errors, run as run_cli, tasks as tasks_cli
from berth.core.cli.output import emit
from berth.core.client import connection, tasks as client_tasks


async def create(args: argparse.Namespace, s: connection.Session) -> int:
    await run_cli.new_container(args, s, args.ref, args.id, args.cmd)
    return 0


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.containers.v1 import ListContainersRequest

    resp = await client_tasks.containers_stub(s).list(ListContainersRequest(filters=args.filters))
    if args.quiet:
        for c in resp.containers:
            print(c.id)
        return 0
    emit(["CONTAINER", "IMAGE", "RUNTIME"],
         [(c.id, c.image or "-", c.runtime.name if c.runtime else "")
          for c in resp.containers],
         fmt=args.format,
         records=[{"id": c.id, "image": c.image,
                   "runtime": c.runtime.name if c.runtime else "",
                   "labels": dict(c.labels)} for c in resp.containers])
    return 0


def go_time(t: datetime) -> str:
    """RFC 3339 with the fraction's trailing zeros cut, as Go's RFC3339Nano."""
    t = t.astimezone(UTC)
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def any_json(msg: Any) -> dict[str, str] | None:
    """A gogo types.Any as Go's encoding/json writes it."""
    if msg is None or not (msg.type_url or msg.value):
        return None
    out = {}
    if msg.type_url:
        out["type_url"] = msg.type_url
    if msg.value:
        out["value"] = base64.b64encode(bytes(msg.value)).decode()
    return out


def container_json(c: Any) -> dict[str, Any]:
    from berth.core.oci import default_spec

    doc: dict[str, Any] = {
        "ID": c.id,
        "Labels": dict(c.labels) or None,
        "Image": c.image,
        "Runtime": {"Name": c.runtime.name if c.runtime else "",
                    "Options": any_json(c.runtime.options if c.runtime else None)},
        "SnapshotKey": c.snapshot_key,
        "Snapshotter": c.snapshotter,
        "CreatedAt": go_time(c.created_at),
        "UpdatedAt": go_time(c.updated_at),
        "Extensions": {k: any_json(v) for k, v in c.extensions.items()} or None,
    }
    spec = default_spec.from_any(c.spec)
    if spec:
        doc["Spec"] = spec
    return doc


async def info(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.oci import default_spec

    c = await client_tasks.get_container(s, args.container)
    doc = default_spec.from_any(c.spec) if args.spec else container_json(c)
    print(json.dumps(doc, indent=4))
    return 0


async def delete_one(s: connection.Session, container_id: str, *, keep_snapshot: bool) -> None:
    from berth.core.api.containerd.services.tasks.v1 import GetRequest
    from berth.core.api.containerd.v1.types import Status

    container = await client_tasks.get_container(s, container_id)
    try:
        process = (await client_tasks.tasks_stub(s).get(
            GetRequest(container_id=container_id))).process
    except GRPCError as e:
        if not client_tasks.is_not_found(e):
            raise
    else:
        if process.status not in (Status.STOPPED, Status.CREATED):
            status = client_tasks.status_name(process.status)
            raise app.CommandError(
                f"cannot delete a non stopped container: {{{status}"
                f" {process.exit_status} {tasks_cli.go_time(process.exited_at)}}}")
        await client_tasks.delete_task(s, container_id, force=process.status == Status.CREATED)
    await run_cli.remove_container(s, container, keep_snapshot=keep_snapshot)


async def rm(args: argparse.Namespace, s: connection.Session) -> int:
    failed = False
    for cid in args.containers:
        try:
            await delete_one(s, cid, keep_snapshot=args.keep_snapshot)
        except (GRPCError, errdefs.BerthError, app.CommandError) as e:
            failed = True
            print(f"berth: failed to delete container {cid!r}: {errors.message(e)}",
                  file=sys.stderr)
    return 1 if failed else 0


async def label(args: argparse.Namespace, s: connection.Session) -> int:
    from betterproto.lib.google.protobuf import FieldMask

    from berth.core.api.containerd.services.containers.v1 import Container, UpdateContainerRequest

    if not args.container:
        raise app.CommandError("container id must be provided")
    labels = run_cli.label_args(args.labels)
    resp = await client_tasks.containers_stub(s).update(UpdateContainerRequest(
        container=Container(id=args.container, labels=labels),
        update_mask=FieldMask(paths=[f"labels.{k}" for k in labels])))
    print(",".join(f"{k}={v}" for k, v in sorted(resp.container.labels.items())))
    return 0


def register(sub: Any) -> None:
    p = app.group(sub, "containers", example="berth containers ls",
                  aliases=["container", "c"], help="manage containers")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True

    c = app.add(g, "create", create,
                example="berth containers create docker.io/library/alpine:latest web sleep 300",
                help="create a container")
    run_cli.container_flags(c)
    c.add_argument("ref", metavar="IMAGE|ROOTFS")
    c.add_argument("id", metavar="CONTAINER")
    c.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")

    c = app.add(g, "delete", rm, example="berth containers rm web",
                help="delete one or more containers",
                aliases=["del", "remove", "rm"])
    c.add_argument("--keep-snapshot", action="store_true",
                   help="do not clean up the snapshot with the container")
    c.add_argument("containers", nargs="+", metavar="CONTAINER")

    c = app.add(g, "info", info, example="berth containers info --spec web",
                help="get info about a container")
    c.add_argument("--spec", action="store_true", help="only display the spec")
    c.add_argument("container")

    c = app.add(g, "label", label, example="berth containers label web tier=front owner=",
                help="set and clear labels for a container")
    c.add_argument("container")
    c.add_argument("labels", nargs="*", metavar="KEY=VALUE")

    c = app.add(g, "list", ls, example="berth containers ls -q 'labels.tier==front'",
                help="list containers", aliases=["ls"])
    c.add_argument("--quiet", "-q", action="store_true", help="print only the container id")
    c.add_argument("filters", nargs="*")
