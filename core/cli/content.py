"""`berth content ls|get|rm|label|active` (ctr's, small)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from berth.core import errdefs
from berth.core.cli import app, errors
from berth.core.cli.output import emit
from berth.core.cli.transfer import human
from berth.core.client import connection


def _client(s: connection.Session) -> Any:
    from berth.core.client.client import Client

    return Client(s.channel, s.namespace)


def _age(t: datetime) -> str:
    secs = (datetime.now(UTC) - t).total_seconds()
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if secs >= size:
            return f"{int(secs // size)} {unit}"
    return f"{int(secs)} seconds" if secs >= 1 else "Less than a second"


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    infos = await _client(s).list_content(args.filters)
    if args.quiet:
        for i in infos:
            print(i.digest)
        return 0
    rows = [(i.digest, human(i.size), _age(i.created_at),
             ",".join(f"{k}={v}" for k, v in sorted(i.labels.items())) or "-") for i in infos]
    emit(["DIGEST", "SIZE", "AGE", "LABELS"], rows, fmt=args.format, records=[
        {"digest": i.digest, "size": i.size, "created_at": i.created_at.isoformat(),
         "labels": dict(i.labels)} for i in infos])
    return 0


async def get(args: argparse.Namespace, s: connection.Session) -> int:
    out = sys.stdout.buffer
    with errors.naming(args.digest):
        async for chunk in _client(s).read_chunks(args.digest):
            out.write(chunk)
    out.flush()
    return 0


async def rm(args: argparse.Namespace, s: connection.Session) -> int:
    c = _client(s)
    failed = False
    for d in args.digests:
        try:
            await c.delete_content(d)
        except errdefs.NotFound:
            print(f"berth: content {d} not found", file=sys.stderr)
            failed = True
            continue
        except errdefs.BerthError as e:
            print(f"berth: could not delete {d}: {errors.message(e)}", file=sys.stderr)
            failed = True
            continue
        print(d)
    return 1 if failed else 0


async def label(args: argparse.Namespace, s: connection.Session) -> int:
    labels = app.labels_from(args.labels)
    with errors.naming(args.digest):
        await _client(s).update_labels(args.digest, labels)
    return 0


async def active(args: argparse.Namespace, s: connection.Session) -> int:
    statuses = await _client(s).list_statuses(args.filters)
    rows = [(st.ref, st.offset, st.total, st.updated_at.isoformat()) for st in statuses]
    emit(["REF", "OFFSET", "TOTAL", "UPDATED"], rows, fmt=args.format, records=[
        {"ref": st.ref, "offset": st.offset, "total": st.total, "expected": st.expected,
         "started_at": st.started_at.isoformat(), "updated_at": st.updated_at.isoformat()}
        for st in statuses])
    return 0


def register(sub: Any) -> None:
    p = app.group(sub, "content", example="berth content ls", help="manage content")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True
    c = app.add(g, "list", ls, example="berth content ls -q", help="list blobs", aliases=["ls"])
    c.add_argument("--quiet", "-q", action="store_true")
    c.add_argument("filters", nargs="*")
    c = app.add(g, "get", get, example="berth content get sha256:<64 hex digits> > blob",
                help="write a blob to stdout")
    c.add_argument("digest")
    c = app.add(g, "delete", rm, example="berth content rm sha256:<64 hex digits>",
                help="remove blobs", aliases=["rm", "del", "remove"])
    c.add_argument("digests", nargs="+")
    c = app.add(g, "label", label, example="berth content label sha256:<64 hex digits> keep=yes",
                help="set (KEY=VALUE) and clear (KEY=) labels")
    c.add_argument("digest")
    c.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    c = app.add(g, "active", active, example="berth content active",
                help="show ingests in progress")
    c.add_argument("filters", nargs="*")
