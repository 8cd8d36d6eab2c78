"""A ctr events that was subscribed before berthd died, re-subscribing after its
restart, is given what was published meanwhile; any other subscriber is not."""

from __future__ import annotations

import signal

import pytest

from tests import daemons
from tests.daemons import Daemon

pytestmark = [pytest.mark.interop]

WATCHED = 'topic~="^/namespaces/"'


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resubscriber_misses_nothing_published_before_it_came_back(
        berthd: Daemon, sig: signal.Signals) -> None:
    with daemons.ctr_events(berthd.address, WATCHED) as before:
        daemons.wait_subscribed(before, berthd.address, via_delete=True)
        berthd.stop(sig)
        before.proc.wait(20)  # its stream ended with the daemon
    berthd.start()
    # Published after the boot, before anyone subscribed again: on containerd, lost.
    daemons.ctr_ok(berthd.address, "namespaces", "create", "while-away")
    with daemons.ctr_events(berthd.address, WATCHED) as again, \
            daemons.ctr_events(berthd.address, 'topic~="^/namespaces/",namespace!=x') as other:
        again.wait_for(lambda line: '"name":"while-away"' in line)
        # The differently filtered newcomer sees only what comes after it subscribed.
        daemons.wait_subscribed(other, berthd.address, via_delete=True)
        got = daemons.events_until_marker(other, berthd.address)
        assert not [line for line in other.seen + got if "while-away" in line]
