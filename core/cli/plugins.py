"""`berth plugins ls [-d] [FILTER...]`."""

from __future__ import annotations

import argparse
from typing import Any

from berth.core.cli import app
from berth.core.cli.output import emit
from berth.core.client import connection


def _status(p: Any) -> str:
    if p.init_err is None or (p.init_err.code == 0 and not p.init_err.message):
        return "ok"
    return "skip" if "skip plugin" in p.init_err.message else "error"


def _platforms(p: Any) -> str:
    out = []
    for pl in p.platforms:
        s = f"{pl.os}/{pl.architecture}"
        out.append(f"{s}/{pl.variant}" if pl.variant else s)
    return ",".join(out) or "-"


async def ls(args: argparse.Namespace, s: connection.Session) -> int:
    from berth.core.api.containerd.services.introspection.v1 import (
        IntrospectionStub,
        PluginsRequest,
    )

    resp = await IntrospectionStub(s.channel, metadata=s.metadata).plugins(
        PluginsRequest(filters=args.filters))
    records: list[dict[str, Any]] = [{
        "type": p.type, "id": p.id, "requires": list(p.requires),
        "platforms": _platforms(p), "exports": dict(p.exports),
        "capabilities": list(p.capabilities), "status": _status(p),
        "error": p.init_err.message if p.init_err else "",
    } for p in resp.plugins]
    if args.detailed and args.format != "json":
        for r in records:
            print(f"Type:          {r['type']}")
            print(f"ID:            {r['id']}")
            if r["requires"]:
                print("Requires:      ")
                for req in r["requires"]:
                    print(f"               {req}")
            print(f"Platforms:     {r['platforms']}")
            if r["exports"]:
                print("Exports:       ")
                for k, v in sorted(r["exports"].items()):
                    print(f"               {k}  {v}")
            if r["capabilities"]:
                print(f"Capabilities:  {','.join(r['capabilities'])}")
            if r["error"]:
                print(f"Error:         {r['error']}")
            print()
        return 0
    rows = [(r["type"], r["id"], r["platforms"], r["status"]) for r in records]
    emit(["TYPE", "ID", "PLATFORMS", "STATUS"], rows, fmt=args.format, records=records)
    return 0


def register(sub: Any) -> None:
    p = app.group(sub, "plugins", example="berth plugins ls",
                  aliases=["plugin"], help="plugins and their status")
    g = p.add_subparsers(dest="cmd", metavar="COMMAND")
    g.required = True
    c = app.add(g, "list", ls, example="berth plugins ls -d type==io.containerd.snapshotter.v1",
                help="list plugins", aliases=["ls"])
    c.add_argument("--detailed", "-d", action="store_true", help="show details")
    c.add_argument("filters", nargs="*")
