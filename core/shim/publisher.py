"""Task events from the shim to the daemon: ``Events/Forward`` over ttrpc.

containerd's shim publisher (runtime/v2/shim/publisher.go) wraps each event in an
Envelope (timestamp, namespace, topic, Any), calls Forward on TTRPC_ADDRESS with the
namespace as ttrpc metadata, reconnects once when the connection was closed, and
requeues a failed event up to five times, waiting one more second each time. Here
one task owns the connection and forwards in order; handlers only enqueue, so a slow
or absent daemon never blocks a task RPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import betterproto
import trio
from betterproto.lib.google.protobuf import Empty

from berth.core import errdefs, log
from berth.core.api.containerd import events as ev
from berth.core.api.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from berth.core.events import typeurl
from berth.core.ttrpc import NAMESPACE_KEY, Client, open_client

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
MAX_REQUEUE = 5
FORWARD_TIMEOUT = 5.0

_TOPICS: dict[type, str] = {
    ev.TaskCreate: "/tasks/create",
    ev.TaskStart: "/tasks/start",
    ev.TaskOom: "/tasks/oom",
    ev.TaskExit: "/tasks/exit",
    ev.TaskDelete: "/tasks/delete",
    ev.TaskExecAdded: "/tasks/exec-added",
    ev.TaskExecStarted: "/tasks/exec-started",
    ev.TaskPaused: "/tasks/paused",
    ev.TaskResumed: "/tasks/resumed",
    ev.TaskCheckpointed: "/tasks/checkpointed",
}
UNKNOWN_TOPIC = "/runtime/task/unknown"


def topic_of(event: betterproto.Message) -> str:
    """The topic containerd's runc shim publishes ``event`` under (runc.GetTopic)."""
    return _TOPICS.get(type(event), UNKNOWN_TOPIC)


def envelope(namespace: str, event: betterproto.Message,
             timestamp: datetime | None = None) -> Envelope:
    return Envelope(
        timestamp=timestamp or datetime.now(UTC),
        namespace=namespace,
        topic=topic_of(event),
        event=typeurl.marshal_any(event),
    )


@dataclass
class _Item:
    envelope: Envelope
    attempts: int = 0


class Publisher:
    """Queue events with ``publish``; ``run`` forwards them until ``close`` and drained."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._send, self._receive = trio.open_memory_channel[_Item](math.inf)
        self._log = log.get("shim.publisher", namespace=namespace)
        self.forwarded = 0
        self.finished = trio.Event()

    def publish(self, event: betterproto.Message) -> None:
        """Enqueue; never blocks. Events published after close are dropped (logged)."""
        item = _Item(envelope(self.namespace, event))
        try:
            self._send.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._log.warning("event after publisher close", topic=item.envelope.topic)

    def close(self) -> None:
        self._send.close()

    async def run(self) -> None:
        """Forward queued events in order, until closed and every event is handled."""
        try:
            async with trio.open_nursery() as nursery:
                client: Client | None = None
                async for item in self._receive:
                    client = await self._deliver(nursery, client, item)
                if client is not None:
                    await client.aclose()
        finally:
            self.finished.set()

    async def _deliver(self, nursery: trio.Nursery, client: Client | None, item: _Item
                       ) -> Client | None:
        metadata = {NAMESPACE_KEY: self.namespace}
        while True:
            try:
                if client is None or client.closed:
                    client = None
                    if not self.address:
                        raise errdefs.Unavailable("no TTRPC_ADDRESS to publish to")
                    client = await nursery.start(self._connection)
                await client.call(EVENTS_SERVICE, "Forward",
                                  ForwardRequest(envelope=item.envelope), Empty,
                                  metadata=metadata, timeout=FORWARD_TIMEOUT)
                self.forwarded += 1
                return client
            except errdefs.BerthError as exc:
                item.attempts += 1
                self._log.error("forward event", topic=item.envelope.topic, error=str(exc),
                                attempt=item.attempts)
                if item.attempts > MAX_REQUEUE:
                    self._log.error("evicting event after retries", topic=item.envelope.topic)
                    return client
                await trio.sleep(item.attempts)

    async def _connection(self, *, task_status: trio.TaskStatus[Client]) -> None:
        """Hold one connection open until it closes (by the peer or by ``run``)."""
        async with open_client(self.address) as client:
            task_status.started(client)
            await client.wait_closed()
