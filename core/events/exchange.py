"""The exchange: publish and forward fan out to subscribers without ever blocking.

Each subscriber owns a bounded queue. Publishing is synchronous and never waits: when
a subscriber's queue is full, that subscriber is cut off (its stream ends with
ResourceExhausted naming the last sequence it received) while publishers and every
other subscriber carry on. A cut-off client resumes losslessly from the durable log
with ``since``; containerd's own Subscribe has no such resume, so its clients just
see the stream end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence

import betterproto
import structlog
import trio

from berth.core import errdefs, filters, identifiers
from berth.core.api.containerd.services.events.v1 import Envelope
from berth.core.events import envelope as envelopes, hold as holds
from berth.core.events.envelope import Event
from berth.core.events.hold import BootHold
from berth.core.events.log import EventLog

log = structlog.get_logger("events")

DEFAULT_QUEUE = 1024

__all__ = ["DEFAULT_QUEUE", "Event", "Exchange", "Subscription"]


class Subscription:
    """One subscriber's queue and filter; iterate it to receive events."""

    def __init__(self, exchange: Exchange, flt: filters.Filter, size: int) -> None:
        self._exchange = exchange
        self._filter = flt
        self._send, self._recv = trio.open_memory_channel[Event](size)
        self.last_seq = 0
        self.overflowed = False
        # Set for a client's Events subscription: its identity across a restart.
        self.key: holds.Key | None = None
        # Events held since boot for this subscriber, all older than its live ones.
        self.backlog: list[Event] = []

    def matches(self, adaptor: filters.Adaptor) -> bool:
        return self._filter.match(adaptor)

    def offer(self, ev: Event) -> None:
        try:
            self._send.send_nowait(ev)
        except trio.WouldBlock:
            self.overflowed = True
            self._send.close()
            self._exchange._remove(self)
            log.warning("event subscriber too slow, disconnected", seq=ev.seq)
        except trio.ClosedResourceError:
            self._exchange._remove(self)

    def close(self) -> None:
        self._send.close()
        self._exchange._remove(self)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        backlog, self.backlog = self.backlog, []
        for ev in backlog:
            self.last_seq = ev.seq
            yield ev
        async for ev in self._recv:
            self.last_seq = ev.seq
            yield ev
        if self.overflowed:
            raise errdefs.ResourceExhausted(
                f"event subscriber fell behind; last delivered sequence {self.last_seq}, "
                f"resume with since={self.last_seq}",
                raw=True,
            )


class Exchange:
    """containerd's events.Publisher, Forwarder and Subscriber, in one object."""

    def __init__(self, event_log: EventLog | None = None, queue_size: int = DEFAULT_QUEUE,
                 hold: BootHold | None = None) -> None:
        self.log = event_log
        self.queue_size = queue_size
        self._subs: list[Subscription] = []
        self._seq = event_log.bounds()[1] if event_log else 0
        self.listeners: list[Callable[[Event], None]] = []
        self.hold = hold
        self.clients: Counter[holds.Key] = Counter()
        self._clients_changed = trio.Event()
        # Bound now (after berthd's logging set-up): calls through structlog's lazy
        # module-level proxy re-resolve the logger on every use, even a filtered one.
        self._log = log.bind()

    def publish(self, namespace: str, topic: str, event: betterproto.Message) -> Event:
        if not namespace:
            raise errdefs.FailedPrecondition(
                "failed publishing event: namespace is required: failed precondition", raw=True
            )
        try:
            identifiers.validate(namespace)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(
                f"failed publishing event: namespace validation: {e}", raw=True
            ) from None
        return self._deliver(envelopes.make_event(namespace, topic, event))

    def forward(self, env: Envelope) -> Event:
        return self.forward_event(Event.of(0, env))

    def forward_event(self, ev: Event) -> Event:
        """Forward an event someone else made (a shim, a client), numbering it."""
        envelopes.validate(ev)
        return self._deliver(ev)

    def _deliver(self, ev: Event) -> Event:
        if self.log is not None:
            ev.seq = self.log.append(ev)
        else:
            self._seq += 1
            ev.seq = self._seq
        if self.hold is not None:
            self.hold.record(ev)
        self._log.debug("event published", topic=ev.topic, ns=ev.namespace,
                        type=ev.type_url, seq=ev.seq)
        if self._subs:
            # Matching runs here, in the publisher's call, once per subscriber: it must
            # stay cheap whatever a subscriber asked for. Filters match in linear time
            # (RE2, a bounded program) and the adaptor decodes the payload once for all.
            adaptor = envelopes.adaptor(ev)
            for sub in list(self._subs):
                if sub.matches(adaptor):
                    sub.offer(ev)
        for listener in self.listeners:
            listener(ev)
        return ev

    def subscribe(self, filter_exprs: Sequence[str] = (), *, size: int | None = None,
                  client: bool = False) -> Subscription:
        """A live subscription. ``client`` marks a client's Events.Subscribe: it is
        recorded for the next boot, and may be given the events held since this boot
        (see ``berth.core.events.hold``)."""
        try:
            flt = filters.parse_all(list(filter_exprs))
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(
                f"failed parsing subscription filters: {e}", raw=True
            ) from None
        sub = Subscription(self, flt, size or self.queue_size)
        if client:
            sub.key = holds.key(filter_exprs)
            if self.hold is not None:
                # No await between the claim and joining the live list: every held
                # event is older than every live one this subscriber will get.
                held = self.hold.claim(sub.key)
                sub.backlog = [ev for ev in held if sub.matches(envelopes.adaptor(ev))]
                if held:
                    log.info("reconnected subscriber gets the events it missed since boot",
                             filters=list(sub.key), events=len(sub.backlog))
            self.clients[sub.key] += 1
            self._notify_clients()
        self._subs.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            if sub.key is not None:
                self.clients[sub.key] -= 1
                self.clients = +self.clients
                self._notify_clients()

    def _notify_clients(self) -> None:
        self._clients_changed.set()
        self._clients_changed = trio.Event()

    def clients_changed(self) -> trio.Event:
        """An event set at the next change of the open client subscriptions."""
        return self._clients_changed

    async def replay(self, since: int, filter_exprs: Sequence[str] = (), *, follow: bool = True
                     ) -> AsyncGenerator[Event, None]:
        """Events after ``since`` from the log, then (with ``follow``) live ones, gap-free.

        The live subscription starts before the log is read, so an event published
        meanwhile is in one or both; sequence numbers drop the duplicates.
        """
        live = self.subscribe(filter_exprs) if follow else None
        flt = filters.parse_all(list(filter_exprs))
        try:
            last = since
            if self.log is not None:
                upto = self._seq_now()
                for n, ev in enumerate(self.log.since(since, upto=upto)):
                    if flt.match(envelopes.adaptor(ev)):
                        yield ev
                    if n % 256 == 255:
                        await trio.lowlevel.checkpoint()
                last = max(last, upto)
            if live is None:
                return
            async for ev in live:
                if ev.seq > last:
                    yield ev
        finally:
            if live is not None:
                live.close()

    def _seq_now(self) -> int:
        return self.log.bounds()[1] if self.log is not None else self._seq
