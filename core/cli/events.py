"""`berth events [--since SEQ] [FILTER...]`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from berth.core.cli import app
from berth.core.client import connection


def _line(env: Any, seq: int | None, fmt: str) -> str:
    from berth.core.events import typeurl

    payload = typeurl.to_dict(env.event) if env.event else None
    if fmt == "json":
        return json.dumps({
            "seq": seq, "timestamp": env.timestamp.isoformat(), "namespace": env.namespace,
            "topic": env.topic, "type": env.event.type_url if env.event else "",
            "event": payload,
        }, default=str)
    body = json.dumps(payload, separators=(",", ":"), default=str) if payload is not None \
        else (env.event.type_url if env.event else "")
    prefix = f"{seq} " if seq is not None else ""
    return f"{prefix}{env.timestamp} {env.namespace} {env.topic} {body}"


async def events(args: argparse.Namespace, s: connection.Session) -> int:
    if args.since is None:
        from berth.core.api.containerd.services.events.v1 import EventsStub, SubscribeRequest

        async for env in EventsStub(s.channel).subscribe(SubscribeRequest(filters=args.filters)):
            print(_line(env, None, args.format), flush=True)
        return 0
    from berth.core.api.berth.services.eventlog.v1 import EventLogStub, SubscribeRequest as Req

    req = Req(filters=args.filters, since=args.since, follow=not args.no_follow)
    async for item in EventLogStub(s.channel).subscribe(req):
        print(_line(item.envelope, item.seq, args.format), flush=True)
    return 0


def register(sub: Any) -> None:
    c = app.add(sub, "events", events, example="berth events 'topic~=/tasks/'",
                help="display events", aliases=["event"])
    c.add_argument("--since", type=int, default=None,
                   help="replay the durable log after this sequence number, then follow")
    c.add_argument("--no-follow", action="store_true", help="with --since: stop at the end")
    c.add_argument("filters", nargs="*")
