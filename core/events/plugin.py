"""Registers the event exchange (io.containerd.event.v1.exchange) with its durable log."""

from __future__ import annotations

from berth.core.events import hold as holds
from berth.core.events.exchange import DEFAULT_QUEUE, Exchange
from berth.core.events.log import EventLog
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, METADATA


async def _init(ctx: InitContext) -> Exchange:
    md = ctx.plugins.get(METADATA)
    capacity = int(ctx.config["log_capacity"])
    ctx.exports["log_capacity"] = str(capacity)
    grace = float(ctx.config["reconnect_grace"])
    ctx.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = ctx.state / "subscribers.json"
    hold = holds.BootHold(holds.load(record), grace) if grace > 0 else None
    exchange = Exchange(EventLog(md.db, capacity) if capacity > 0 else None,
                        int(ctx.config["subscriber_queue"]), hold)
    ctx.nursery.start_soon(holds.keep_record, record, hold, lambda: exchange.clients,
                           exchange.clients_changed)
    return exchange


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(
        type=EVENT, id="exchange", init=_init, requires=(METADATA,),
        # reconnect_grace: seconds after boot during which a client that was subscribed
        # before the restart gets, on re-subscribing, the events it missed (0: never).
        config={"log_capacity": 10000, "subscriber_queue": DEFAULT_QUEUE,
                "reconnect_grace": holds.DEFAULT_GRACE},
    )]
