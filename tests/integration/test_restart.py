"""What berthd knows survives a clean stop and a SIGKILL: namespaces, leases, its UUID
and its event log, whose sequence numbers never go back."""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import daemons
from tests.daemons import Daemon


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="berth-r-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(base: Path) -> Iterator[Daemon]:
    d = daemons.berthd(base).start()
    yield d
    d.kill()


def server_uuid(d: Daemon) -> str:
    r = daemons.ctr_ok(d.address, "version")
    m = re.search(r"UUID: ([0-9a-f-]{36})\n", r.out)
    assert m, r.out
    return m.group(1)


def event_log(d: Daemon) -> list[dict]:
    r = daemons.berth(d.address, "--format", "json", "events", "--since", "0", "--no-follow")
    assert r.rc == 0, r
    return [json.loads(line) for line in r.out.strip().split("\n") if line]


def summary(events: list[dict]) -> list[tuple[int, str, str, str]]:
    return [(e["seq"], e["namespace"], e["topic"], e["event"]["name"]) for e in events]


def namespaces(d: Daemon) -> list[list[str]]:
    out = daemons.ctr_ok(d.address, "namespaces", "ls").out
    return [line.split() for line in out.strip().split("\n")[1:]]


def leases(d: Daemon, ns: str) -> dict[str, str]:
    out = daemons.ctr_ok(d.address, "leases", "ls", namespace=ns).out
    rows = [line.split() for line in out.strip().split("\n")[1:]]
    # Drop the expiry ctr adds, whose value is a timestamp.
    return {r[0]: ",".join(kv for kv in r[2].split(",") if not kv.startswith("containerd.io/"))
            for r in rows}


def test_state_survives_sigterm_then_sigkill(daemon: Daemon) -> None:
    d = daemon
    first_uuid = server_uuid(d)
    daemons.ctr_ok(d.address, "namespaces", "create", "one", "a=1", "b=2")
    daemons.ctr_ok(d.address, "leases", "create", "--id", "l1", "k=v", "x=y", namespace="one")
    before_term = summary(event_log(d))
    assert before_term == [(1, "default", "/namespaces/create", "one")]

    assert d.stop(signal.SIGTERM) == 0
    d.start()
    assert server_uuid(d) == first_uuid
    assert namespaces(d) == [["one", "a=1,b=2"]]
    assert leases(d, "one") == {"l1": "k=v,x=y"}
    assert summary(event_log(d)) == before_term

    # More changes, then no chance to shut down cleanly.
    daemons.ctr_ok(d.address, "namespaces", "create", "two", "c=3")
    daemons.ctr_ok(d.address, "leases", "create", "--id", "l2", "m=n", namespace="two")
    daemons.ctr_ok(d.address, "namespaces", "label", "one", "a=changed")
    daemons.ctr_ok(d.address, "leases", "rm", "l1", namespace="one")
    daemons.ctr_ok(d.address, "leases", "create", "--id", "l3", namespace="one")
    before_kill = summary(event_log(d))
    assert before_kill == before_term + [(2, "default", "/namespaces/create", "two"),
                                         (3, "default", "/namespaces/update", "one")]
    assert d.kill() == -signal.SIGKILL
    assert d.address.exists()  # a SIGKILL leaves the sockets behind...

    d.start()  # ...and the next start replaces them
    assert server_uuid(d) == first_uuid
    assert namespaces(d) == [["one", "a=changed,b=2"], ["two", "c=3"]]
    assert leases(d, "one") == {"l3": ""}
    assert leases(d, "two") == {"l2": "m=n"}
    logged = event_log(d)
    assert summary(logged) == before_kill
    assert logged[0]["event"]["labels"] == {"a": "1", "b": "2"}

    # New events continue the sequence; none is reused.
    daemons.ctr_ok(d.address, "namespaces", "create", "three")
    after = summary(event_log(d))
    assert after[:-1] == before_kill
    assert after[-1] == (4, "default", "/namespaces/create", "three")
    # A resumed reader gets exactly what it missed.
    r = daemons.berth(d.address, "events", "--since", "3", "--no-follow")
    assert r.rc == 0 and r.out.count("\n") == 1 and r.out.startswith("4 ")


def test_sequence_survives_kill_right_after_publish(daemon: Daemon) -> None:
    d = daemon
    for i in range(5):
        daemons.ctr_ok(d.address, "namespaces", "create", f"n{i}")
    assert d.kill() == -signal.SIGKILL
    d.start()
    seqs = [e["seq"] for e in event_log(d)]
    assert seqs == [1, 2, 3, 4, 5]
    daemons.ctr_ok(d.address, "namespaces", "rm", "n0")
    assert d.stop(signal.SIGINT) == 0
    d.start()
    daemons.ctr_ok(d.address, "namespaces", "rm", "n1")
    events = event_log(d)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6, 7]
    assert [(e["namespace"], e["topic"]) for e in events[-2:]] == [
        ("n0", "/namespaces/delete"), ("n1", "/namespaces/delete")]
    assert daemons.ctr_ok(d.address, "namespaces", "ls", "-q").out == "n2\nn3\nn4\n"
