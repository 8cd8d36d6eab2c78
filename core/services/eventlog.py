"""berth.services.eventlog.v1.EventLog: resumable, sequenced event subscriptions.

A berth extension beside containerd's Events service (whose messages stay untouched):
``Subscribe(since=N)`` replays the durable log after N, then follows live events.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing

from berth.core import errdefs
from berth.core.api.berth.services.eventlog.v1 import (
    EventLogBase,
    InfoRequest,
    InfoResponse,
    SequencedEnvelope,
    SubscribeRequest,
)
from berth.core.events.exchange import Exchange
from berth.core.grpc.context import CallContext
from berth.core.plugin import InitContext, Registration, SkipPlugin, hookimpl
from berth.core.plugin.registration import EVENT, GRPC


class EventLogService:
    base = EventLogBase

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        assert exchange.log is not None
        self.log = exchange.log

    def info(self, ctx: CallContext, req: InfoRequest) -> InfoResponse:
        first, last = self.log.bounds()
        return InfoResponse(first_seq=first, last_seq=last, capacity=self.log.capacity)

    async def subscribe(self, ctx: CallContext, req: SubscribeRequest,
                        send: Callable[[SequencedEnvelope], Awaitable[None]]) -> None:
        first, last = self.log.bounds()
        if req.since and first and req.since + 1 < first:
            # Silently skipping the lost events would defeat the point of resuming.
            raise errdefs.FailedPrecondition(
                f"sequence {req.since} is older than the log holds (first is {first})"
            )
        # Closed here, not by the garbage collector: the replay holds a subscription.
        async with aclosing(self.exchange.replay(req.since, list(req.filters),
                                                 follow=req.follow)) as events:
            async for ev in events:
                await send(SequencedEnvelope(seq=ev.seq, envelope=ev.envelope))


async def _init(ctx: InitContext) -> EventLogService:
    exchange: Exchange = ctx.plugins.get(EVENT)
    if exchange.log is None:
        raise SkipPlugin("event log disabled (log_capacity = 0)")
    return EventLogService(exchange)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="berth.eventlog", init=_init, requires=(EVENT,))]
