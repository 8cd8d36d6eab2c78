"""`berth leases create|ls|rm`."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from berth.core.cli import app, errors
from berth.core.cli.output import emit
from berth.core.client import connection

EXPIRE_LABEL = "containerd.io/gc.expire"


def _duration(text: str) -> timedelta:
    """Go-style durations: 90s, 10m, 1h30m."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return timedelta(seconds=sum(float(a) * unit[b] for a, b in parts))


def _stub(s: connection.Session) -> Any:
    from berth.core.api.containerd.services.leases.v1 import LeasesStub

    return LeasesStub(s.channel, metadata=s.metadata)


async def create(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.leases.v1 import CreateRequest

    labels = app.labels_from(args.labels)
    if args.expires:
        expiry = datetime.now(UTC) + args.expires
        labels[EXPIRE_LABEL] = expiry.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    resp = await _stub(s).create(CreateRequest(id=args.id or "", labels=labels))
    print(resp.lease.id)
    return 0


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.leases.v1 import ListRequest

    resp = await _stub(s).list(ListRequest(filters=args.filters))
    if args.quiet:
        for lease in resp.leases:
            print(lease.id)
        return 0
    rows = [(lease.id, lease.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
             ",".join(sorted(f"{k}={v}" for k, v in lease.labels.items())))
            for lease in resp.leases]
    emit(["ID", "CREATED AT", "LABELS"], rows, fmt=args.format, records=[
        {"id": lease.id, "created_at": lease.created_at.isoformat(),
         "labels": dict(lease.labels)} for lease in resp.leases])
    return 0


async def rm(args: argparse.Namespace, s: connection.Session) -> int:
    from grpclib import GRPCError

    from berth.core.api.containerd.services.leases.v1 import DeleteRequest

    failed = False
    for lid in args.ids:
        try:
            await _stub(s).delete(DeleteRequest(id=lid, sync=args.sync))
        except GRPCError as e:
            print(f"berth: unable to delete {lid}: {errors.message(e)}", file=sys.stderr)
            failed = True
            continue
        print(lid)
    return 1 if failed else 0


def register(sub: Any) -> None:
    p = app.group(sub, "leases", example="berth leases ls", aliases=["lease"], help="manage leases")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True
    c = app.add(g, "create", create, example="berth leases create --id keep -x 1h",
                help="create a lease")
    c.add_argument("--id", help="lease id (random when empty)")
    c.add_argument("--expires", "-x", type=_duration, default=timedelta(hours=24),
                   help="expiry as a duration (0s: never)")
    c.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    c = app.add(g, "list", ls, example="berth leases ls", help="list leases", aliases=["ls"])
    c.add_argument("--quiet", "-q", action="store_true")
    c.add_argument("filters", nargs="*")
    c = app.add(g, "delete", rm, example="berth leases rm keep",
                help="delete leases", aliases=["rm"])
    c.add_argument("--sync", action="store_true", help="collect garbage before returning")
    c.add_argument("ids", nargs="+")
