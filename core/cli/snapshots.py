"""`berth snapshots ls|info|rm|prepare|view|commit|mounts|usage|tree` (ctr's, small)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from berth.core import errdefs
from berth.core.cli import app
from berth.core.cli.images import default_snapshotter
from berth.core.cli.output import emit
from berth.core.client import connection

_KINDS = {0: "Unknown", 1: "View", 2: "Active", 3: "Committed"}


def _client(s: connection.Session, args: argparse.Namespace) -> Any:
    from berth.core.client.client import Client

    return Client(s.channel, s.namespace, snapshotter=args.snapshotter or default_snapshotter())


def _kind(info: Any) -> str:
    return _KINDS.get(int(info.kind), str(info.kind))


def print_mounts(target: str, mounts: Any) -> None:
    for m in mounts:
        print(f"mount -t {m.type} {m.source} {target} -o {','.join(m.options)}")


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    infos = await _client(s, args).list_snapshots(args.filters)
    emit(["KEY", "PARENT", "KIND"], [(i.name, i.parent, _kind(i)) for i in infos],
         fmt=args.format, records=[{"key": i.name, "parent": i.parent, "kind": _kind(i),
                                    "labels": dict(i.labels)} for i in infos])
    return 0


async def info(args: argparse.Namespace, s: connection.Session) -> int:
    i = await _client(s, args).stat(args.key)
    if i is None:
        raise app.CommandError(f"snapshot {args.key}: not found")
    doc = {"Kind": _kind(i), "Name": i.name, "Parent": i.parent or None,
           "Labels": dict(i.labels) or None, "Created": i.created_at.isoformat(),
           "Updated": i.updated_at.isoformat()}
    print(json.dumps({k: v for k, v in doc.items() if v is not None}, indent=4))
    return 0


async def rm(args: argparse.Namespace, s: connection.Session) -> int:
    c = _client(s, args)
    failed = False
    for key in args.keys:
        try:
            await c.remove_snapshot(key)
        except errdefs.BerthError as e:
            print(f"berth: unable to remove {key}: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


async def prepare(args: argparse.Namespace, s: connection.Session) -> int:
    mounts = await _client(s, args).prepare(args.key, args.parent,
                                            app.labels_from(args.label))
    if args.target:
        print_mounts(args.target, mounts)
    return 0


async def view(args: argparse.Namespace, s: connection.Session) -> int:
    mounts = await _client(s, args).view(args.key, args.parent, app.labels_from(args.label))
    if args.target:
        print_mounts(args.target, mounts)
    return 0


async def commit(args: argparse.Namespace, s: connection.Session) -> int:
    await _client(s, args).commit_snapshot(args.name, args.key, app.labels_from(args.label))
    return 0


async def mounts(args: argparse.Namespace, s: connection.Session) -> int:
    print_mounts(args.target, await _client(s, args).mounts(args.key))
    return 0


async def usage(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.cli.transfer import human

    c = _client(s, args)
    keys = args.keys or [i.name for i in await c.list_snapshots()]
    rows = []
    for key in keys:
        u = await c.usage(key)
        rows.append((key, human(u.size), u.inodes))
    emit(["KEY", "SIZE", "INODES"], rows, fmt=args.format)
    return 0


async def tree(args: argparse.Namespace, s: connection.Session) -> int:
    infos = await _client(s, args).list_snapshots()
    names = {i.name for i in infos}
    kids: dict[str, list[str]] = {}
    roots = []
    for i in sorted(infos, key=lambda x: x.name):
        if i.parent and i.parent in names:
            kids.setdefault(i.parent, []).append(i.name)
        else:
            roots.append(i.name)

    def show(name: str, level: int) -> None:
        prefix = "  " * level + ("\\_" if level else "")
        print(f"{prefix} {name}")
        for child in kids.get(name, []):
            show(child, level + 1)

    for r in roots:
        show(r, 0)
    return 0


def register(sub: Any) -> None:
    p = app.group(sub, "snapshots", example="berth snapshots ls",
                  aliases=["snapshot"], help="manage snapshots")
    p.add_argument("--snapshotter", default=None,
                   help="snapshotter (env BERTH_SNAPSHOTTER, default overlayfs)")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True
    c = app.add(g, "list", ls, example="berth snapshots ls", help="list snapshots", aliases=["ls"])
    c.add_argument("filters", nargs="*")
    c = app.add(g, "info", info, example="berth snapshots info my-key",
                help="show a snapshot's details")
    c.add_argument("key")
    c = app.add(g, "remove", rm, example="berth snapshots rm my-key",
                help="remove snapshots", aliases=["rm", "delete", "del"])
    c.add_argument("keys", nargs="+")
    for name, fn in (("prepare", prepare), ("view", view)):
        c = app.add(g, name, fn, help=f"{name} a snapshot from a committed one",
                    example=f"berth snapshots {name} my-key my-layer")
        c.add_argument("--target", "-t", default="", help="print the mount command for it")
        c.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
        c.add_argument("key")
        c.add_argument("parent", nargs="?", default="")
    c = app.add(g, "commit", commit, example="berth snapshots commit my-layer my-key",
                help="commit an active snapshot")
    c.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("name")
    c.add_argument("key")
    c = app.add(g, "mounts", mounts, example="berth snapshots mounts /mnt/x my-key",
                help="print the mounts of a snapshot",
                aliases=["m", "mount"])
    c.add_argument("target")
    c.add_argument("key")
    c = app.add(g, "usage", usage, example="berth snapshots usage", help="disk usage of snapshots")
    c.add_argument("keys", nargs="*")
    app.add(g, "tree", tree, example="berth snapshots tree", help="show the snapshots as a tree")
