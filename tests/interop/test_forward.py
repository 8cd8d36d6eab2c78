"""Shims' side of events: ttrpc Events/Forward reaches `ctr events` subscribers.

berth's own ttrpc client plays the shim, against berthd and against the real
containerd; the subscriber is the real ctr. Envelope timestamps are fixed, so the
lines ctr prints must be identical, byte for byte.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import trio
from betterproto.lib.google.protobuf import Any as AnyMsg, Empty

from berth.core import errdefs
from berth.core.api.containerd.events import TaskExit, TaskOom
from berth.core.api.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from berth.core.events.typeurl import marshal_any
from berth.core.ttrpc.client import open_client
from tests import daemons
from tests.daemons import Daemon

pytestmark = pytest.mark.interop

SERVICE = "containerd.services.events.ttrpc.v1.Events"
WHEN = datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
EXITED = datetime(2024, 1, 2, 3, 4, 5, 654321, tzinfo=UTC)


def forward(d: Daemon, *envelopes: Envelope | None) -> list[errdefs.BerthError | None]:
    """Forward each envelope on one ttrpc connection; the error each call got, or None."""
    out: list[errdefs.BerthError | None] = []

    async def run() -> None:
        async with open_client(str(d.ttrpc_address)) as client:
            for env in envelopes:
                try:
                    resp = await client.call(SERVICE, "Forward", ForwardRequest(envelope=env),
                                             Empty, timeout=20)
                except errdefs.BerthError as e:
                    out.append(e)
                else:
                    assert resp == Empty()
                    out.append(None)

    trio.run(run)
    return out


def exit_envelope() -> Envelope:
    return Envelope(
        timestamp=WHEN, namespace="default", topic="/tasks/exit",
        event=marshal_any(TaskExit(container_id="c1", id="c1", pid=4242, exit_status=7,
                                   exited_at=EXITED)),
    )


INVALID = [
    # (envelope, the message both daemons answer with)
    (Envelope(namespace="default", topic="/tasks/exit", event=marshal_any(TaskOom("c"))),
     "timestamp must be set on forwarded event: invalid argument"),
    (Envelope(timestamp=WHEN, namespace="default", topic="tasks/exit"),
     "envelope topic \"tasks/exit\": must start with '/': invalid argument"),
    (Envelope(timestamp=WHEN, namespace="default", topic="/tasks//exit"),
     'envelope topic "/tasks//exit": failed validation on component "": identifier must not '
     "be empty: invalid argument"),
    (Envelope(timestamp=WHEN, namespace="default", topic="/"),
     'envelope topic "/": must have at least one component: invalid argument'),
    (Envelope(timestamp=WHEN, namespace="bad/ns", topic="/tasks/exit"),
     'event envelope has invalid namespace: identifier "bad/ns" must match '
     "^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$: invalid argument"),
]


def _scenario(d: Daemon) -> tuple[list[str], list[tuple[int, str] | None]]:
    with daemons.ctr_events(d.address) as f:
        daemons.wait_subscribed(f, d.address)
        results = forward(d, exit_envelope(), *(env for env, _ in INVALID), Envelope(
            timestamp=WHEN, namespace="k8s.io", topic="/tasks/oom",
            event=marshal_any(TaskOom(container_id="c2"))))
        daemons.ctr_ok(d.address, "version")
        got = daemons.events_until_marker(f, d.address)
    errors = [None if e is None else (int(e.code), e.message) for e in results]
    return got[:-1], errors  # [:-1]: the marker's create


def test_forward_reaches_subscribers(berthd: Daemon, containerd: Daemon) -> None:
    lines, errors = _scenario(berthd)
    assert lines == [
        '2024-01-02 03:04:05.123456 +0000 UTC default /tasks/exit {"container_id":"c1",'
        '"id":"c1","pid":4242,"exit_status":7,"exited_at":"2024-01-02T03:04:05.654321Z"}',
        '2024-01-02 03:04:05.123456 +0000 UTC k8s.io /tasks/oom {"container_id":"c2"}',
    ]
    assert errors[0] is None and errors[-1] is None
    assert errors[1:-1] == [(int(errdefs.Code.INVALID_ARGUMENT), msg) for _, msg in INVALID]
    assert (lines, errors) == _scenario(containerd)


def test_forwarded_events_are_logged_with_sequence(berthd: Daemon) -> None:
    assert forward(berthd, exit_envelope()) == [None]
    r = daemons.berth(berthd.address, "--format", "json", "events", "--since", "0",
                      "--no-follow", 'topic=="/tasks/exit"')
    assert r.rc == 0, r
    (item,) = [json.loads(line) for line in r.out.strip().split("\n")]
    assert item["seq"] >= 1 and item["namespace"] == "default"
    assert item["type"] == "containerd.events.TaskExit"
    assert item["event"]["exit_status"] == 7 and item["event"]["pid"] == 4242
    assert item["timestamp"] == "2024-01-02T03:04:05.123456+00:00"


def test_forward_keeps_unknown_payloads(berthd: Daemon) -> None:
    # A shim may forward types berth cannot decode; they are relayed, not refused.
    env = Envelope(timestamp=WHEN, namespace="default", topic="/custom/thing",
                   event=AnyMsg(type_url="example.com/Thing", value=b"\x08\x01"))
    assert forward(berthd, env) == [None]
    r = daemons.berth(berthd.address, "events", "--since", "0", "--no-follow",
                      'topic=="/custom/thing"')
    assert r.rc == 0 and r.out.count("\n") == 1
    assert r.out.rstrip().endswith("default /custom/thing example.com/Thing")


def test_forward_without_envelope_is_refused(berthd: Daemon) -> None:
    # containerd 1.6 dereferences the missing envelope and dies of it; berth refuses the
    # call and carries on.
    (err,) = forward(berthd, None)
    assert err is not None and err.code == errdefs.Code.INVALID_ARGUMENT
    assert err.message == ("event envelope has invalid namespace: identifier must not be "
                           "empty: invalid argument")
    assert forward(berthd, exit_envelope()) == [None]
    r = daemons.ctr(berthd.address, "version")
    assert r.rc == 0 and "Revision: berth" in r.out
