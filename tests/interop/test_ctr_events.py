"""`ctr events` as a subscriber of berthd, side by side with the real containerd.

Each scenario runs against both daemons; the lines ctr prints must be the same once
timestamps are normalised (topics, the namespace each event is published in, payloads).
"""

from __future__ import annotations

import re

import pytest

from tests import daemons
from tests.daemons import Daemon

pytestmark = pytest.mark.interop

# Go prints the envelope's time.Time: "2026-11-29 18:03:05.644594 +0000 UTC".
_GO_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \+0000 UTC")


def normalise(lines: list[str]) -> list[str]:
    return [_GO_TIME.sub("<TS>", line) for line in lines]


def _unfiltered(d: Daemon) -> list[str]:
    with daemons.ctr_events(d.address) as f:
        daemons.wait_subscribed(f, d.address)
        daemons.ctr_ok(d.address, "namespaces", "create", "ev1", "a=b", "c=d")
        # ctr sends one update per label, in Go's random map order: one at a time here.
        daemons.ctr_ok(d.address, "namespaces", "label", "ev1", "c=")
        daemons.ctr_ok(d.address, "namespaces", "label", "ev1", "e=f")
        daemons.ctr_ok(d.address, "namespaces", "create", "ev2", namespace="other")
        daemons.ctr_ok(d.address, "leases", "create", "--id", "quiet")  # leases publish nothing
        daemons.ctr_ok(d.address, "namespaces", "rm", "ev1", "ev2")
        got = daemons.events_until_marker(f, d.address)
    # The marker's create comes before its delete.
    assert got[-1].endswith('/namespaces/create {"name":"endmark"}')
    return normalise(got[:-1])


def test_events_show_namespace_changes(berthd: Daemon, containerd: Daemon) -> None:
    got = _unfiltered(berthd)
    assert got == [
        '<TS> default /namespaces/create {"name":"ev1","labels":{"a":"b","c":"d"}}',
        '<TS> default /namespaces/update {"name":"ev1","labels":{"c":""}}',
        '<TS> default /namespaces/update {"name":"ev1","labels":{"e":"f"}}',
        '<TS> other /namespaces/create {"name":"ev2"}',
        '<TS> ev1 /namespaces/delete {"name":"ev1"}',
        '<TS> ev2 /namespaces/delete {"name":"ev2"}',
    ]
    assert got == _unfiltered(containerd)


def _filtered(d: Daemon, *filters: str, via_delete: bool = True) -> list[str]:
    with daemons.ctr_events(d.address, *filters) as f:
        daemons.wait_subscribed(f, d.address, via_delete=via_delete)
        daemons.ctr_ok(d.address, "namespaces", "create", "fx", "a=b")
        daemons.ctr_ok(d.address, "namespaces", "label", "fx", "a=c")
        daemons.ctr_ok(d.address, "namespaces", "create", "fy", namespace="other")
        daemons.ctr_ok(d.address, "namespaces", "rm", "fx", "fy")
        got = daemons.events_until_marker(f, d.address)
    return normalise(got)


def test_topic_filter_shows_only_deletes(berthd: Daemon, containerd: Daemon) -> None:
    flt = 'topic=="/namespaces/delete"'
    got = _filtered(berthd, flt)
    assert got == ['<TS> fx /namespaces/delete {"name":"fx"}',
                   '<TS> fy /namespaces/delete {"name":"fy"}']
    assert got == _filtered(containerd, flt)


def test_namespace_and_payload_filters(berthd: Daemon, containerd: Daemon) -> None:
    # Two filters are ORed: deletes (for the markers) or anything published in "other".
    flts = ('topic=="/namespaces/delete"', "namespace==other")
    got = _filtered(berthd, *flts)
    assert got == ['<TS> other /namespaces/create {"name":"fy"}',
                   '<TS> fx /namespaces/delete {"name":"fx"}',
                   '<TS> fy /namespaces/delete {"name":"fy"}']
    assert got == _filtered(containerd, *flts)
    # A field of the payload itself, with a regular expression.
    flts = ('topic=="/namespaces/delete"', 'topic~="create|update",event.name==fx')
    got = _filtered(berthd, *flts)
    assert got == ['<TS> default /namespaces/create {"name":"fx","labels":{"a":"b"}}',
                   '<TS> default /namespaces/update {"name":"fx","labels":{"a":"c"}}',
                   '<TS> fx /namespaces/delete {"name":"fx"}',
                   '<TS> fy /namespaces/delete {"name":"fy"}']
    assert got == _filtered(containerd, *flts)


def test_bad_filter_fails_like_containerd(berthd: Daemon, containerd: Daemon) -> None:
    results = []
    for d in (berthd, containerd):
        with daemons.ctr_events(d.address, "topic==") as f:
            with pytest.raises(EOFError):
                f.wait_for(lambda line: True)
            results.append((f.proc.wait(), f.stderr()))
    assert results[0] == results[1]
    rc, err = results[0]
    assert rc == 1
    assert err == ("ctr: rpc error: code = Unknown desc = subscription error: failed parsing "
                   "subscription filters: filters: parse error: [topic==]: expected value or "
                   "quoted: invalid argument\n")
