"""The boot hold: events since a restart, for the subscribers the previous life had."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import trio
import trio.testing

from berth.core.api.containerd.events import NamespaceCreate, TaskExit
from berth.core.events import hold as holds
from berth.core.events.exchange import Exchange, Subscription

MOBY = ("namespace==moby,topic~=|^/tasks/|",)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def exits(ex: Exchange, *ids: str, ns: str = "moby") -> None:
    for i in ids:
        ex.publish(ns, "/tasks/exit", TaskExit(container_id=i, exit_status=137))


async def drain(sub: Subscription) -> list[tuple[str, str]]:
    sub.close()
    out = []
    async for ev in sub:
        out.append((ev.envelope.namespace, ev.envelope.topic))
    return out


async def test_recorded_subscriber_gets_what_it_missed_then_live_events() -> None:
    ex = Exchange(hold=holds.BootHold(Counter({MOBY: 1}), grace=30))
    exits(ex, "a")
    ex.publish("moby", "/namespaces/create", NamespaceCreate(name="moby"))  # not its topic
    exits(ex, "b", ns="other")                                            # not its namespace
    sub = ex.subscribe(list(MOBY), client=True)
    exits(ex, "c")
    got = []
    sub.close()
    async for ev in sub:
        got.append((ev.seq, ev.envelope.namespace, ev.envelope.topic))
    assert [g[1:] for g in got] == [("moby", "/tasks/exit"), ("moby", "/tasks/exit")]
    assert [g[0] for g in got] == sorted({g[0] for g in got})  # in order, no duplicate


async def test_others_see_what_containerd_shows_them() -> None:
    ex = Exchange(hold=holds.BootHold(Counter({MOBY: 1}), grace=30))
    exits(ex, "a")
    # A client with other filters, an internal subscriber and a non-client are not
    # the recorded subscriber: they start from now, as on containerd.
    assert await drain(ex.subscribe(["namespace==moby"], client=True)) == []
    assert await drain(ex.subscribe(list(MOBY))) == []
    # The record is claimed once: a second identical client starts from now.
    assert len(await drain(ex.subscribe(list(MOBY), client=True))) == 1
    assert await drain(ex.subscribe(list(MOBY), client=True)) == []


async def test_two_recorded_subscribers_each_get_the_hold() -> None:
    ex = Exchange(hold=holds.BootHold(Counter({MOBY: 2, (): 1}), grace=30))
    exits(ex, "a")
    assert len(await drain(ex.subscribe(list(MOBY), client=True))) == 1
    assert len(await drain(ex.subscribe([], client=True))) == 1
    assert len(await drain(ex.subscribe(list(MOBY), client=True))) == 1
    assert ex.hold is not None and ex.hold.events == []  # all claimed: memory freed


async def test_nothing_is_held_after_the_grace_period() -> None:
    clock = Clock()
    ex = Exchange(hold=holds.BootHold(Counter({MOBY: 1}), grace=5, clock=clock))
    exits(ex, "a")
    clock.now += 5
    exits(ex, "b")
    assert await drain(ex.subscribe(list(MOBY), client=True)) == []


async def test_hold_is_bounded() -> None:
    ex = Exchange(hold=holds.BootHold(Counter({MOBY: 1}), grace=30, limit=3))
    exits(ex, "a", "b", "c", "d")
    # Past the limit the hold is dropped whole rather than giving a partial history.
    assert await drain(ex.subscribe(list(MOBY), client=True)) == []


async def test_nothing_is_held_without_recorded_subscribers() -> None:
    ex = Exchange(hold=holds.BootHold(Counter(), grace=30))
    exits(ex, "a")
    assert ex.hold is not None and ex.hold.events == []
    assert await drain(ex.subscribe([], client=True)) == []


def test_record_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "subscribers.json"
    assert holds.load(path) == Counter()
    holds.save(path, Counter({MOBY: 2, (): 1}))
    assert holds.load(path) == Counter({MOBY: 2, (): 1})
    for bad in ("", "{", "[]", '{"subscribers": 3}', '{"subscribers": [1, "x"]}'):
        path.write_text(bad)
        assert holds.load(path) == Counter()


async def test_record_follows_clients_but_not_a_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "subscribers.json"
    ex = Exchange(hold=holds.BootHold(Counter(), grace=30))

    def recorded() -> list[list[str]]:
        return json.loads(path.read_text())["subscribers"]

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as daemon:
            daemon.start_soon(holds.keep_record, path, ex.hold, lambda: ex.clients,
                              ex.clients_changed)
            await trio.testing.wait_all_tasks_blocked()
            assert recorded() == []
            gone = ex.subscribe(["namespace==x"], client=True)
            ex.subscribe(list(MOBY))  # internal: not recorded
            stays = ex.subscribe(list(MOBY), client=True)
            await trio.testing.wait_all_tasks_blocked()
            assert recorded() == [list(MOBY), ["namespace==x"]]
            gone.close()  # a client going away is recorded
            await trio.testing.wait_all_tasks_blocked()
            assert recorded() == [list(MOBY)]
            # A shutdown cancels the writer with everything else: the subscriptions
            # it ends stay recorded for the next boot.
            daemon.cancel_scope.cancel()
            stays.close()
        outer.cancel_scope.cancel()
    assert recorded() == [list(MOBY)]


async def test_unclaimed_expectations_are_carried_to_the_next_boot(tmp_path: Path) -> None:
    path = tmp_path / "subscribers.json"
    holds.save(path, Counter({MOBY: 1}))
    ex = Exchange(hold=holds.BootHold(holds.load(path), grace=30))
    async with trio.open_nursery() as n:
        n.start_soon(holds.keep_record, path, ex.hold, lambda: ex.clients, ex.clients_changed)
        await trio.testing.wait_all_tasks_blocked()
        ex.subscribe([], client=True)
        await trio.testing.wait_all_tasks_blocked()
        assert Counter(tuple(s) for s in json.loads(path.read_text())["subscribers"]) == \
            Counter({MOBY: 1, (): 1})
        n.cancel_scope.cancel()
