"""Registers the event exchange (io.containerd.event.v1.exchange) with its durable log."""

from __future__ import annotations

from berth.core.events.exchange import DEFAULT_QUEUE, Exchange
from berth.core.events.log import EventLog
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, METADATA


async def _init(ctx: InitContext) -> Exchange:
    md = ctx.plugins.get(METADATA)
    capacity = int(ctx.config["log_capacity"])
    ctx.exports["log_capacity"] = str(capacity)
    return Exchange(EventLog(md.db, capacity) if capacity > 0 else None,
                    int(ctx.config["subscriber_queue"]))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(
        type=EVENT, id="exchange", init=_init, requires=(METADATA,),
        config={"log_capacity": 10000, "subscriber_queue": DEFAULT_QUEUE},
    )]
