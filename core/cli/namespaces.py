"""`berth namespaces create|ls|label|rm`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from berth.core.cli import app, errors
from berth.core.cli.output import emit
from berth.core.client import connection


def _stub(s: connection.Session) -> Any:
    from berth.core.api.containerd.services.namespaces.v1 import NamespacesStub

    return NamespacesStub(s.channel, metadata=s.metadata)


async def create(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.namespaces.v1 import CreateNamespaceRequest, Namespace

    await _stub(s).create(CreateNamespaceRequest(
        namespace=Namespace(name=args.name, labels=app.labels_from(args.labels))))
    return 0


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.namespaces.v1 import ListNamespacesRequest

    resp = await _stub(s).list(ListNamespacesRequest())
    if args.quiet:
        for ns in resp.namespaces:
            print(ns.name)
        return 0
    rows = [(ns.name, ",".join(sorted(f"{k}={v}" for k, v in ns.labels.items())))
            for ns in resp.namespaces]
    emit(["NAME", "LABELS"], rows, fmt=args.format,
         records=[{"name": ns.name, "labels": dict(ns.labels)} for ns in resp.namespaces])
    return 0


async def label(args: argparse.Namespace, s: connection.Session) -> int:
    from betterproto.lib.google.protobuf import FieldMask

    from berth.core.api.containerd.services.namespaces.v1 import Namespace, UpdateNamespaceRequest

    labels = app.labels_from(args.labels)
    await _stub(s).update(UpdateNamespaceRequest(
        namespace=Namespace(name=args.name, labels=labels),
        update_mask=FieldMask(paths=[f"labels.{k}" for k in labels]),
    ))
    return 0


async def rm(args: argparse.Namespace, s: connection.Session) -> int:
    from grpclib import GRPCError
    from grpclib.const import Status

    from berth.core.api.containerd.services.namespaces.v1 import DeleteNamespaceRequest

    failed = False
    for name in args.names:
        try:
            await _stub(s).delete(DeleteNamespaceRequest(name=name))
        except GRPCError as e:
            if e.status is not Status.NOT_FOUND:
                print(f"berth: unable to delete {name}: {errors.message(e)}", file=sys.stderr)
                failed = True
                continue
        print(name)
    return 1 if failed else 0


def register(sub: Any) -> None:
    p = app.group(sub, "namespaces", example="berth namespaces ls",
                  aliases=["namespace", "ns"], help="manage namespaces")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True
    c = app.add(g, "create", create, example="berth namespaces create web tier=front",
                help="create a namespace", aliases=["c"])
    c.add_argument("name")
    c.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    c = app.add(g, "list", ls, example="berth namespaces ls -q",
                help="list namespaces", aliases=["ls"])
    c.add_argument("--quiet", "-q", action="store_true")
    c = app.add(g, "label", label, example="berth namespaces label web tier=back",
                help="set and clear labels (empty value clears)")
    c.add_argument("name")
    c.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    c = app.add(g, "remove", rm, example="berth namespaces rm web",
                help="remove namespaces", aliases=["rm"])
    c.add_argument("names", nargs="+")
