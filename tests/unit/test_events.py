"""The exchange and the durable log, without sockets."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from berth.core import errdefs
from berth.core.api.containerd.events import NamespaceCreate, TaskExit, TaskOom
from berth.core.api.containerd.services.events.v1 import Envelope
from berth.core.events import typeurl
from berth.core.events.exchange import Event, Exchange
from berth.core.events.log import EventLog
from berth.core.metadata.db import Database


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "meta.db")
    yield d
    d.close()


def test_type_urls_are_containerds() -> None:
    assert typeurl.name_of(TaskOom()) == "containerd.events.TaskOOM"
    a = typeurl.marshal_any(TaskExit(container_id="c", exit_status=3))
    assert a.type_url == "containerd.events.TaskExit"
    back = typeurl.unmarshal_any(a)
    assert isinstance(back, TaskExit) and back.exit_status == 3
    a.type_url = "types.googleapis.com/containerd.events.TaskExit"
    assert isinstance(typeurl.unmarshal_any(a), TaskExit)


async def test_publish_reaches_matching_subscribers_only() -> None:
    ex = Exchange()
    all_ = ex.subscribe()
    creates = ex.subscribe(['topic=="/namespaces/create"'])
    ex.publish("n", "/namespaces/create", NamespaceCreate(name="n"))
    ex.publish("n", "/tasks/exit", TaskExit(container_id="c"))
    all_.close()
    creates.close()
    got_all = [e.envelope.topic async for e in all_]
    got_creates = [e.envelope.topic async for e in creates]
    assert got_all == ["/namespaces/create", "/tasks/exit"]
    assert got_creates == ["/namespaces/create"]


async def test_event_field_filters() -> None:
    ex = Exchange()
    sub = ex.subscribe(['topic~="^/tasks/",event.exit_status==3', 'namespace==other'])
    ex.publish("n", "/tasks/exit", TaskExit(container_id="a", exit_status=3))
    ex.publish("n", "/tasks/exit", TaskExit(container_id="b", exit_status=0))
    ex.publish("other", "/namespaces/create", NamespaceCreate(name="other"))
    sub.close()
    got = [(e.envelope.namespace, e.envelope.topic) async for e in sub]
    assert got == [("n", "/tasks/exit"), ("other", "/namespaces/create")]


def test_bad_topics_and_envelopes() -> None:
    ex = Exchange()
    for topic, why in [("", "must not be empty"), ("x", "must start with '/'"),
                       ("/", "at least one component"), ("/a//b", "failed validation")]:
        with pytest.raises(errdefs.InvalidArgument, match=why):
            ex.publish("n", topic, TaskExit())
    with pytest.raises(errdefs.FailedPrecondition, match="namespace is required"):
        ex.publish("", "/x", TaskExit())
    with pytest.raises(errdefs.InvalidArgument, match="timestamp must be set"):
        ex.forward(Envelope(namespace="n", topic="/x"))
    with pytest.raises(errdefs.InvalidArgument, match="invalid namespace"):
        ex.forward(Envelope(namespace="b/d", topic="/x", timestamp=datetime.now(UTC)))
    with pytest.raises(errdefs.InvalidArgument, match="failed parsing subscription filters"):
        ex.subscribe(["topic=="])


async def test_slow_subscriber_is_cut_off_without_blocking_others() -> None:
    ex = Exchange(queue_size=4)
    slow = ex.subscribe()
    fast = ex.subscribe(size=100)
    for i in range(10):
        ex.publish("n", "/tasks/exit", TaskExit(exit_status=i))
    fast.close()
    assert len([e async for e in fast]) == 10
    got = []
    with pytest.raises(errdefs.ResourceExhausted, match="resume with since=4"):
        async for e in slow:
            got.append(e.seq)
    assert got == [1, 2, 3, 4]


async def test_catastrophic_regexp_subscribers_do_not_hold_up_publishers() -> None:
    # Issue 8.3: a backtracking engine spent seconds per publish on these; RE2 is linear, so
    # a hundred such subscribers and a long event field still publish in one pass.
    ex = Exchange()
    evil = [ex.subscribe(["topic~=^(([a-z/]+)+)+X$", "event.container_id~=^(a+)+$"])
            for _ in range(100)]
    plain = ex.subscribe(['event.container_id~="^a+!$"'])
    long_id = "a" * 4000 + "!"
    for _ in range(20):
        ex.publish("n", "/tasks/exit", TaskExit(container_id=long_id))
    for sub in [*evil, plain]:
        sub.close()
    for sub in evil:
        assert [e async for e in sub] == []
    assert len([e async for e in plain]) == 20


async def test_durable_log_sequences_and_replay(db: Database) -> None:
    ex = Exchange(EventLog(db, capacity=1000))
    for i in range(5):
        ex.publish("n", "/tasks/exit", TaskExit(exit_status=i))
    seqs = [e.seq async for e in ex.replay(2, follow=False)]
    assert seqs == [3, 4, 5]
    # A new exchange over the same database continues the sequence (a restart).
    ex2 = Exchange(EventLog(db, capacity=1000))
    assert ex2.publish("n", "/tasks/exit", TaskExit()).seq == 6
    assert [e.seq async for e in ex2.replay(0, ["event.exit_status==4"], follow=False)] == [5]


async def test_replay_then_follow_has_no_gap_or_duplicate(db: Database) -> None:
    ex = Exchange(EventLog(db, capacity=1000))
    for _ in range(3):
        ex.publish("n", "/a", TaskExit())
    got: list[int] = []
    async with trio.open_nursery() as nursery:
        async def consume() -> None:
            async for e in ex.replay(1):
                got.append(e.seq)
                if len(got) == 4:
                    return

        nursery.start_soon(consume)
        await trio.sleep(0.01)
        ex.publish("n", "/a", TaskExit())
        ex.publish("n", "/a", TaskExit())
    assert got == [2, 3, 4, 5]


def test_log_is_bounded(db: Database) -> None:
    log = EventLog(db, capacity=10)
    env = Envelope(timestamp=datetime.now(UTC), namespace="n", topic="/a",
                   event=typeurl.marshal_any(TaskExit()))
    for _ in range(600):
        log.append(Event.of(0, env))
    first, last = log.bounds()
    assert last == 600 and first == 591
    assert [e.seq for e in log.since(0)] == list(range(591, 601))
    (count,) = db._conn.execute("SELECT COUNT(*) FROM events").fetchone()
    assert count < 10 + 256 + 1  # trimmed in batches
