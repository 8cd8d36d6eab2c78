"""containerd.services.events.v1.Events (gRPC) and the ttrpc Events/Forward for shims."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import betterproto
from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs
from berth.core.api.containerd.services.events.ttrpc import v1 as ttrpc_events
from berth.core.api.containerd.services.events.v1 import (
    Envelope,
    EventsBase,
    ForwardRequest,
    PublishRequest,
    SubscribeRequest,
)
from berth.core.events import envelope as envelopes, forward
from berth.core.events.envelope import Event
from berth.core.events.exchange import Exchange
from berth.core.grpc.bridge import Encoded
from berth.core.grpc.context import CallContext
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GRPC

TTRPC_SERVICE = "containerd.services.events.ttrpc.v1.Events"
# Every answer here is the same empty message; betterproto takes ~7 µs to build one.
_EMPTY = Empty()


class EventsService:
    base = EventsBase

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def publish(self, ctx: CallContext, req: PublishRequest) -> Empty:
        ns = ctx.namespace
        if not ns:
            raise errdefs.FailedPrecondition(
                "failed publishing event: namespace is required", raw=False
            )
        envelopes.validate_topic(req.topic)
        event = req.event
        if event is None:
            ev = Event(0, ns, req.topic, datetime.now(UTC), has_event=False)
        else:
            ev = Event(0, ns, req.topic, datetime.now(UTC), event.type_url, event.value,
                       betterproto.serialized_on_wire(event))
        self.exchange.forward_event(ev)
        return _EMPTY

    def forward(self, ctx: CallContext, req: ForwardRequest) -> Empty:
        self.exchange.forward(req.envelope or Envelope())
        return _EMPTY

    async def subscribe(self, ctx: CallContext, req: SubscribeRequest,
                        send: Callable[[Envelope | Encoded], Awaitable[None]]) -> None:
        try:
            sub = self.exchange.subscribe(list(req.filters), client=True)
        except errdefs.InvalidArgument as e:
            # containerd returns this through its error channel, unwrapped: Unknown.
            raise errdefs.Unknown(f"subscription error: {e}", raw=True) from None
        try:
            async for ev in sub:
                # Serialized once per event, whoever and however many subscribe.
                await send(Encoded.serialized(Envelope, ev.wire))
        finally:
            sub.close()

    # ttrpc side: shims forward their events here, read by ``forward.read_event``.
    async def ttrpc_forward(self, ctx: object, ev: Event) -> Empty:
        self.exchange.forward_event(ev)
        return _EMPTY

    def ttrpc_services(self) -> dict[str, dict[str, tuple]]:
        return {TTRPC_SERVICE: {"Forward": (ttrpc_events.ForwardRequest, self.ttrpc_forward,
                                            forward.read_event)}}


async def _init(ctx: InitContext) -> EventsService:
    return EventsService(ctx.plugins.get(EVENT))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=GRPC, id="events", init=_init, requires=(EVENT,))]
