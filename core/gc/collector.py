"""One garbage collection: snapshot the metadata, mark, drop records, clean backends.

Phase one runs without a single checkpoint, inside one metadata write transaction:
no other trio task can change the metadata between reading the graph and dropping what
is unreachable, which is what containerd gets from its exclusive database lock. Phase
two asks the backends (snapshotters, the blob store) to remove what no record refers
to any more; those awaits are where other tasks may run again.

Other stores take part through two hooks:

- ``Collector.add_root_source(name, fn)``: ``fn(conn)`` returns extra root nodes, read
  through the collector's sqlite connection, inside its transaction (so never opening
  another); a containers store adds each container's snapshot and
  :func:`berth.core.gc.mark.label_refs` of its labels;
- ``Collector.add_cleaner(name, fn)``: ``await fn()`` runs in phase two of every
  collection and removes what its own store holds for objects that are gone (the
  network attachments of deleted containers); it returns how many it removed;
- snapshotters come from the snapshot service plugin: a dict name -> object with
  ``gc_list() -> [(namespace, key, parent_or_empty, labels)]``,
  ``async gc_remove(namespace, key)`` and ``async cleanup()``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from berth.core import log
from berth.core.gc import mark
from berth.core.gc.mark import Graph, Node, Plan
from berth.core.metadata import content as content_meta, images as images_meta
from berth.core.metadata.db import Database

RootSource = Callable[[sqlite3.Connection], Iterable[Node]]
Cleaner = Callable[[], Awaitable[int]]

_log = log.get("gc")


@dataclass
class Stats:
    """What one collection removed and how long its phases took (seconds)."""

    content: int = 0
    ingests: int = 0
    leases: int = 0
    snapshots: dict[str, int] = field(default_factory=dict)
    blobs: int = 0             # backend blobs deleted by the content cleanup
    backend_ingests: int = 0   # backend ingests aborted by the content cleanup
    meta_d: float = 0.0
    content_d: float = 0.0
    snapshot_d: dict[str, float] = field(default_factory=dict)
    cleaned: dict[str, int] = field(default_factory=dict)  # by add_cleaner's name

    @property
    def elapsed(self) -> float:
        """The pause: the time the metadata was locked (containerd's GCStats.Elapsed)."""
        return self.meta_d


class Collector:
    """Collects garbage across all namespaces of one metadata database."""

    def __init__(
        self,
        db: Database,
        *,
        snapshotters: Callable[[], dict[str, Any]] = dict,
        content: Callable[[], content_meta.NamespacedContent | None] = lambda: None,
    ) -> None:
        content_meta.ensure_schema(db)
        images_meta.ensure_schema(db)
        self.db = db
        self._snapshotters = snapshotters
        self._content = content
        self._root_sources: dict[str, RootSource] = {}
        self._cleaners: dict[str, Cleaner] = {}
        # Backends to clean at the next collection even if it drops nothing (a record
        # deleted by a client leaves its blob behind).
        self.dirty_content = False
        self.dirty_snapshotters: set[str] = set()

    def add_root_source(self, name: str, fn: RootSource) -> None:
        self._root_sources[name] = fn

    def remove_root_source(self, name: str) -> None:
        self._root_sources.pop(name, None)

    def add_cleaner(self, name: str, fn: Cleaner) -> None:
        self._cleaners[name] = fn

    # --- phase one ------------------------------------------------------------------

    def graph(self, c: sqlite3.Connection,
              snapshots: dict[str, list[tuple[str, str, str, dict[str, str]]]]) -> Graph:
        g = Graph()
        for ns, digest, labels in content_meta.gc_records(c):
            g.content[(ns, digest)] = labels
        for rec in content_meta.gc_ingest_records(c):
            g.ingests[(rec.namespace, rec.ref)] = mark.Ingest(
                rec.namespace, rec.ref, rec.expected, rec.expire_ns)
        g.images = images_meta.gc_roots(c)
        leases: dict[tuple[str, str], mark.Lease] = {}
        for ns, lid, labels in c.execute("SELECT namespace, id, labels FROM leases"):
            leases[(ns, lid)] = mark.Lease(ns, lid, json.loads(labels))
        for ns, lid, kind, key in c.execute(
                "SELECT namespace, lease, type, id FROM lease_resources"):
            lease = leases.get((ns, lid))
            if lease is not None:
                lease.resources.append((kind, key))
        g.leases = list(leases.values())
        for name, listed in snapshots.items():
            for ns, key, parent, labels in listed:
                g.add_snapshot(mark.Snapshot(ns, name, key, parent or "", dict(labels or {})))
        for name, source in self._root_sources.items():
            try:
                g.extra_roots.extend(source(c))
            except Exception:
                # Without this source's roots, its objects' resources would be taken.
                _log.exception("gc root source failed", source=name)
                raise
        return g

    def _sweep_metadata(self, snapshotters: dict[str, Any]) -> Plan:
        def warn(lease: str, value: str) -> None:
            _log.info("ignoring invalid expiration value", lease=lease, value=value)

        # Snapshotters read their own records (their own transactions), so before ours
        # opens; nothing between here and the end of ours yields to another task.
        snapshots = {name: list(sn.gc_list()) for name, sn in snapshotters.items()}
        with self.db.write() as c:
            g = self.graph(c, snapshots)
            reachable = mark.mark(g, time.time_ns(), warn)
            p = mark.plan(g, reachable)
            for n in p.content:
                content_meta.gc_drop(c, n.namespace, n.key)
            for n in p.ingests:
                content_meta.gc_drop_ingest(c, n.namespace, n.key)
            for n in p.leases:
                c.execute("DELETE FROM leases WHERE namespace = ? AND id = ?",
                          (n.namespace, n.key))
        return p

    # --- the whole collection -------------------------------------------------------

    async def collect(self) -> Stats:
        stats = Stats()
        t0 = time.perf_counter()
        snapshotters = self._snapshotters()
        p = self._sweep_metadata(snapshotters)
        stats.meta_d = time.perf_counter() - t0
        stats.content, stats.ingests, stats.leases = (
            len(p.content), len(p.ingests), len(p.leases))
        for n in p.content:
            _log.debug("remove content", namespace=n.namespace, digest=n.key)
        for n in p.ingests:
            _log.debug("remove ingest", namespace=n.namespace, ref=n.key)
        for n in p.leases:
            _log.debug("remove lease", namespace=n.namespace, lease=n.key)
        if p.content or p.ingests:
            self.dirty_content = True
        dirty_snapshotters = self.dirty_snapshotters | set(p.snapshots)
        self.dirty_snapshotters = set()

        async with trio.open_nursery() as nursery:
            for name in dirty_snapshotters:
                sn = snapshotters.get(name)
                if sn is not None:
                    nursery.start_soon(self._clean_snapshotter, name, sn,
                                       p.snapshots.get(name, []), stats)
            if self.dirty_content:
                self.dirty_content = False
                nursery.start_soon(self._clean_content, stats)
            for name, fn in self._cleaners.items():
                nursery.start_soon(self._clean_other, name, fn, stats)
        return stats

    async def _clean_other(self, name: str, fn: Cleaner, stats: Stats) -> None:
        try:
            stats.cleaned[name] = await fn()
        except Exception as e:
            # Its store keeps the records: the next collection retries.
            _log.warning("garbage collection failed", cleaner=name, error=str(e))

    async def _clean_snapshotter(self, name: str, sn: Any, keys: list[tuple[str, str]],
                                 stats: Stats) -> None:
        t0 = time.perf_counter()
        removed = 0
        for ns, key in keys:
            try:
                await sn.gc_remove(ns, key)
            except Exception as e:
                # Its children are already gone; the next collection retries it.
                _log.warning("snapshot removal failed", snapshotter=name, namespace=ns,
                             key=key, error=str(e))
                continue
            removed += 1
            _log.debug("remove snapshot", snapshotter=name, namespace=ns, key=key)
        try:
            await sn.cleanup()
        except Exception as e:
            _log.warning("snapshot garbage collection failed", snapshotter=name, error=str(e))
        stats.snapshots[name] = removed
        stats.snapshot_d[name] = time.perf_counter() - t0

    async def _clean_content(self, stats: Stats) -> None:
        cs = self._content()
        if cs is None:
            return
        t0 = time.perf_counter()
        try:
            blobs, ingests = await cs.cleanup()
        except Exception as e:
            self.dirty_content = True
            _log.warning("content garbage collection failed", error=str(e))
            return
        stats.blobs, stats.backend_ingests = len(blobs), len(ingests)
        stats.content_d = time.perf_counter() - t0
