"""The durable event log: a bounded, sequenced copy of every event in sqlite.

containerd loses events when a subscriber disconnects (containerd issue 10390).
berth numbers every event and keeps the newest ``capacity`` of them, so a subscriber
can resume after a disconnect or a daemon restart from the last sequence it saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from berth.core.events.envelope import Event
from berth.core.metadata.db import Database

_TRIM_EVERY = 256


class EventLog:
    def __init__(self, db: Database, capacity: int = 10000) -> None:
        self.db = db
        self.capacity = capacity
        self._since_trim = 0

    def append(self, ev: Event) -> int:
        """Store ``ev`` (its sequence number is ignored); its new sequence number."""
        ts = ev.timestamp
        ts_ns = int(ts.timestamp() * 1_000_000_000) if ts else 0
        with self.db.write() as c:
            cur = c.execute(
                "INSERT INTO events(timestamp_ns, namespace, topic, type_url, value) "
                "VALUES (?, ?, ?, ?, ?)",
                (ts_ns, ev.namespace, ev.topic, ev.type_url, ev.value),
            )
            seq = cur.lastrowid
            assert seq is not None  # an INSERT's rowid
            self._since_trim += 1
            if self._since_trim >= _TRIM_EVERY:
                self._since_trim = 0
                c.execute("DELETE FROM events WHERE seq <= ?", (seq - self.capacity,))
        return seq

    def bounds(self) -> tuple[int, int]:
        """(first, last) sequence numbers held; (0, last) when empty."""
        with self.db.read() as c:
            last = c.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
            ).fetchone()
            last_seq = last[0] if last else 0
            first = c.execute(
                "SELECT MAX(MIN(seq), ?) FROM events", (last_seq - self.capacity + 1,)
            ).fetchone()[0]
        return (first or 0, last_seq)

    def since(self, seq: int, *, upto: int | None = None, batch: int = 500
              ) -> Iterator[Event]:
        """Events after ``seq`` (and at most ``upto``), oldest first, within capacity."""
        _, last = self.bounds()
        floor = max(seq, last - self.capacity)
        while True:
            with self.db.read() as c:
                rows = c.execute(
                    "SELECT seq, timestamp_ns, namespace, topic, type_url, value FROM events "
                    "WHERE seq > ? AND (? IS NULL OR seq <= ?) ORDER BY seq LIMIT ?",
                    (floor, upto, upto, batch),
                ).fetchall()
            if not rows:
                return
            for r in rows:
                yield Event(r["seq"], r["namespace"], r["topic"],
                            datetime.fromtimestamp(r["timestamp_ns"] / 1e9, UTC),
                            r["type_url"], r["value"])
            floor = rows[-1]["seq"]
