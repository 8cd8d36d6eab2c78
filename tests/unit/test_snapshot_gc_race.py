"""Snapshot removes and garbage collections at once agree on who removes a backend snapshot.

Issue 8.10: ``failed to remove backend snapshot ... not found`` showed up about 7 times in
1,000 deletes: a Remove dropped the record and then removed the backend snapshot outside the
snapshotter's lock, while a collection's cleanup, seeing a backend snapshot with no record,
removed it too. Here many removes (clients' and the collector's own) run beside repeated
collections over a real overlayfs backend; no removal may fail and nothing may be left.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import trio
from structlog.testing import capture_logs

from berth.core.gc.collector import Collector
from berth.core.metadata import snapshots as msnap
from berth.core.metadata.db import Database
from berth.core.metadata.leases import LeaseStore
from berth.core.metadata.snapshots import NamespacedSnapshotter
from berth.plugins.snapshotters.overlayfs import OverlaySnapshotter


class YieldingOverlay(OverlaySnapshotter):
    """The real backend, with scheduling points before each removal: other tasks (a
    collection) run in the window between a record's deletion and its backend's, as they
    do on a busy daemon (a remote or slow snapshotter widens it further)."""

    async def remove(self, key: str) -> None:
        for _ in range(50):
            await trio.lowlevel.checkpoint()
        await super().remove(key)


ROOT = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}
ROUNDS = 3
CHAINS = 25


async def test_concurrent_removes_and_collections_leave_nothing_and_log_no_failure(
        tmp_path: Path) -> None:
    db = Database(tmp_path / "meta.db")
    LeaseStore(db)
    msnap.setup(db)
    backend = YieldingOverlay(tmp_path / "overlayfs", index_off=True, userxattr=False)
    try:
        with capture_logs() as logs:
            sn = NamespacedSnapshotter(db, "overlayfs", backend)
            collector = Collector(db, snapshotters=lambda: {"overlayfs": sn})
            rng = random.Random(810)
            for r in range(ROUNDS):
                for i in range(CHAINS):
                    # Rooted chains the clients remove; unrooted ones the collector takes.
                    labels = ROOT if i % 8 else {}
                    await sn.prepare("ns", f"a{r}-{i}", labels=labels)
                    await sn.commit("ns", f"b{r}-{i}", f"a{r}-{i}", labels=labels)
                    await sn.prepare("ns", f"c{r}-{i}", f"b{r}-{i}", labels=labels)

                async def client(r: int, i: int) -> None:
                    # Spread the removes over the collections (seeded, no clock).
                    for _ in range(rng.randrange(2000)):
                        await trio.lowlevel.checkpoint()
                    if i % 8:
                        await sn.remove("ns", f"c{r}-{i}")
                        await sn.remove("ns", f"b{r}-{i}")

                async def collections() -> None:
                    for _ in range(4 * CHAINS):
                        collector.dirty_snapshotters.add("overlayfs")
                        await collector.collect()
                        await trio.lowlevel.checkpoint()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(collections)
                    for i in range(CHAINS):
                        nursery.start_soon(client, r, i)
            collector.dirty_snapshotters.add("overlayfs")
            await collector.collect()
        failures = [e for e in logs if e["log_level"] in ("warning", "error")]
        assert failures == []
        assert sn.gc_list() == []
        assert await backend.walk() == []
        assert os.listdir(tmp_path / "overlayfs" / "snapshots") == []
    finally:
        backend.close()
        db.close()
