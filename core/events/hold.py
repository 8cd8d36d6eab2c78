"""Events a restarted berthd holds for the subscribers its previous life had.

A client's event stream dies with berthd. The client reconnects after its own back-off
(dockerd: health polling, then grpc-go's reconnect, 1-4 s), but shims re-send the exits
they queued while berthd was down within 0.01-1.5 s of its boot, and dead-shim cleanup
publishes exits right after the servers are up. On containerd those events are simply
lost for such a client; dockerd then shows a dead container as "running" for good.

Who is a reconnecting subscriber? Its filters are what a client re-sends unchanged
(dockerd: its namespace and task topics), so the Events subscriptions that are open
are recorded, as lists of filters, in a small file on the state dir. The next boot
reads it and keeps every event published from then on, for ``grace`` seconds. A
subscriber whose filters match a recorded one, arriving within the grace period, is
first given the held events its filters match (older than its subscription, so never
twice), then live ones; each record is claimed once. Anyone else (a new ``ctr events``,
a differently filtered client, anything after the grace period) sees exactly what
containerd would show it. Nothing is held when the previous life had no subscribers.

Why not the durable event log (``core/events/log.py``)? It answers an explicit
``since``, which containerd's Subscribe cannot carry, and it may be disabled
(``log_capacity = 0``); the window here is seconds long and bounded in memory.

The record is written by one task that the daemon's cancellation stops first-hand:
subscriptions cancelled by a shutdown are never written out as gone, so after SIGTERM
as after SIGKILL the file still lists the subscribers that will come back.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import trio

if TYPE_CHECKING:
    from berth.core.events.exchange import Event

log = structlog.get_logger("events")

Key = tuple[str, ...]
DEFAULT_GRACE = 30
DEFAULT_LIMIT = 10000


def key(filter_exprs: Sequence[str]) -> Key:
    return tuple(filter_exprs)


def load(path: Path) -> Counter[Key]:
    """The subscribers recorded by the previous life; none when the file is missing or bad."""
    try:
        doc = json.loads(path.read_text())
        subs = doc["subscribers"]
        return Counter(tuple(str(f) for f in s) for s in subs if isinstance(s, list))
    except FileNotFoundError:
        return Counter()
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable subscriber record", path=str(path), error=str(e))
        return Counter()


def save(path: Path, subscribers: Counter[Key]) -> None:
    # The state dir is a tmpfs: write and rename, no fsync (as containerd does there).
    doc = {"subscribers": [list(k) for k, n in sorted(subscribers.items()) for _ in range(n)]}
    tmp = path.with_name(path.name + ".tmp")
    # Subscribers' filters can name containers and labels: private, like the rest of state.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as f:
        f.write(json.dumps(doc))
    os.replace(tmp, path)


class BootHold:
    """The events since boot, for the expected subscribers, until claimed or expired."""

    def __init__(self, expected: Counter[Key], grace: float = DEFAULT_GRACE,
                 limit: int = DEFAULT_LIMIT, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.expected = +expected
        self.limit = limit
        self._clock = clock
        self.deadline = clock() + grace
        self.events: list[Event] = []
        if self.expected:
            log.info("holding events for the subscribers of the previous boot",
                     subscribers=sum(self.expected.values()), grace=grace)

    @property
    def active(self) -> bool:
        if self.expected and self._clock() >= self.deadline:
            self.release("grace period over")
        return bool(self.expected)

    def record(self, ev: Event) -> None:
        if not self.active:
            return
        if len(self.events) >= self.limit:
            self.release(f"more than {self.limit} events")
            return
        self.events.append(ev)

    def claim(self, k: Key) -> list[Event]:
        """The held events for a subscriber with filters ``k``, once per record."""
        if not self.active or self.expected[k] <= 0:
            return []
        self.expected[k] -= 1
        self.expected = +self.expected
        held = list(self.events)
        if not self.expected:
            self.events = []
        return held

    def release(self, why: str) -> None:
        if self.expected:
            log.info("dropping events held for subscribers that did not come back",
                     why=why, subscribers=sum(self.expected.values()),
                     events=len(self.events))
        self.expected = Counter()
        self.events = []


async def keep_record(path: Path, hold: BootHold | None, current: Callable[[], Counter[Key]],
                      changed: Callable[[], trio.Event]) -> None:
    """Rewrite ``path`` whenever the open subscriptions change, until cancelled.

    Runs as the exchange plugin's task: when the daemon shuts down, this is cancelled
    with everyone else, so the subscriptions the shutdown itself ends never reach the
    file. Unclaimed expectations are carried over while the grace period lasts, so a
    second quick restart still waits for a client that has not come back yet.
    """
    def write() -> None:
        subs = current()
        if hold is not None and hold.active:
            subs = subs + hold.expected
        try:
            save(path, subs)
        except OSError as e:
            log.warning("cannot record event subscribers", path=str(path), error=str(e))

    write()
    expiry_pending = hold is not None and hold.active
    while True:
        event = changed()
        if expiry_pending and hold is not None:
            with trio.move_on_at(trio.current_time() + max(hold.deadline - time.monotonic(), 0)):
                await event.wait()
            if not event.is_set():
                expiry_pending = False
                write()  # drops the expectations that expired
                continue
        else:
            await event.wait()
        write()
