"""Garbage collection of metadata and backends, as containerd's metadata GC does it.

- :mod:`berth.core.gc.mark`: the marking rules (roots, label references, leases, expiry) as
  pure functions over a snapshot of the metadata;
- :mod:`berth.core.gc.collector`: one collection (mark, drop records, clean backends);
- :mod:`berth.core.gc.scheduler`: when to collect, plugin ``io.containerd.gc.v1.scheduler``.

A store outside this package takes part by registering a root source with the
scheduler's collector (``scheduler.collector.add_root_source(name, fn)``) and by
reporting its changes (``scheduler.mutated(deletion=...)`` or
:func:`berth.core.gc.scheduler.notifier`).
"""

from berth.core.gc.collector import Collector, Stats
from berth.core.gc.mark import Kind, Node, content, label_refs, snapshot

__all__ = ["Collector", "Kind", "Node", "Stats", "content", "label_refs", "snapshot"]
