"""Many ``ctr snapshots rm`` at once with garbage collections in between, through berthd.

Issue 8.10 saw ``failed to remove backend snapshot ... not found`` about 7 times in 1,000
deletes: a Remove and a collection's cleanup both removed the same backend snapshot. The
deterministic reproduction is tests/unit/test_snapshot_gc_race.py; this runs the daemon's
own path: parallel removes while collections run (after each removal, and forced by
``ctr leases rm --sync``). Nothing may be logged as failed and nothing may be left.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import daemons
from tests.daemons import Daemon
from tests.interop.test_ctr_snapshots import collected_once

pytestmark = [pytest.mark.interop, pytest.mark.root]

SNAPSHOTS = 150
WORKERS = 6
OVERLAY = "io.containerd.snapshotter.v1.overlayfs"


def test_parallel_removes_beside_collections(berthd: Daemon) -> None:
    d = collected_once(berthd)
    keys = [f"race-{i}" for i in range(SNAPSHOTS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        for r in pool.map(lambda k: daemons.ctr(d.address, "snapshots", "prepare", k), keys):
            assert r.rc == 0, r

    done = threading.Event()

    def collections() -> None:
        while not done.is_set():
            lease = daemons.ctr(d.address, "leases", "create").out.strip()
            assert daemons.ctr(d.address, "leases", "rm", "--sync", lease).rc == 0

    with ThreadPoolExecutor(WORKERS + 1) as pool:
        gc = pool.submit(collections)
        try:
            results = list(pool.map(
                lambda k: daemons.ctr(d.address, "snapshots", "rm", k), keys))
        finally:
            done.set()
        gc.result()
    assert [r for r in results if r.rc != 0] == []

    lease = daemons.ctr(d.address, "leases", "create").out.strip()
    assert daemons.ctr(d.address, "leases", "rm", "--sync", lease).rc == 0
    assert daemons.ctr(d.address, "snapshots", "ls").out.splitlines()[1:] == []
    assert list((d.root / OVERLAY / "snapshots").iterdir()) == []
    logs = d.logs()
    assert "failed to remove" not in logs, [
        line for line in logs.splitlines() if "failed to remove" in line]
