"""Mark and plan: which metadata objects are still reachable, as containerd decides it.

Pure functions over a :class:`Graph` (a snapshot of the metadata), so the rules can be
tested on small hand-made graphs. The rules are those of containerd's
``metadata/gc.go``:

Roots
  - leases, unless expired (label ``containerd.io/gc.expire``, RFC 3339), with all their
    resources (content, snapshots, ingests); ``containerd.io/gc.flat`` makes their content
    and snapshots "flat": no label references are followed from them;
  - images: their target content and their label references;
  - unexpired ingests that belong to no lease;
  - content and snapshots labelled ``containerd.io/gc.root``;
  - whatever registered root sources add (containers: their snapshot and label refs).

References
  - content: labels ``containerd.io/gc.ref.content`` and ``containerd.io/gc.ref.content.*``
    (or ``/*``) name digests, ``containerd.io/gc.ref.snapshot.<snapshotter>[/*]`` name
    snapshot keys;
  - snapshots: their parent, and (unless flat) the same label references;
  - ingests: the digest they expect (a blob shared from another namespace).

Everything unreachable goes: content and ingest records, leases, snapshots (leaves
before their parents).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from berth.core.content.ingest import parse_ns

LABEL_ROOT = "containerd.io/gc.root"
LABEL_CONTENT_REF = "containerd.io/gc.ref.content"
LABEL_SNAPSHOT_REF = "containerd.io/gc.ref.snapshot."
LABEL_EXPIRE = "containerd.io/gc.expire"
LABEL_FLAT = "containerd.io/gc.flat"


class Kind(enum.IntEnum):
    """containerd's gc resource types (same numbers)."""

    CONTENT = 1
    SNAPSHOT = 2
    CONTAINER = 3
    TASK = 4
    LEASE = 5
    INGEST = 6


class Node(NamedTuple):
    """One collectable object; a snapshot's key is ``<snapshotter>/<key>``."""

    kind: Kind
    namespace: str
    key: str


def content(namespace: str, digest: str) -> Node:
    return Node(Kind.CONTENT, namespace, digest)


def snapshot(namespace: str, snapshotter: str, key: str) -> Node:
    return Node(Kind.SNAPSHOT, namespace, f"{snapshotter}/{key}")


def label_refs(namespace: str, labels: Mapping[str, str]) -> Iterator[Node]:
    """The content and snapshots that ``labels`` keep alive."""
    for k in sorted(labels):
        v = labels[k]
        if k.startswith(LABEL_CONTENT_REF):
            rest = k[len(LABEL_CONTENT_REF):]
            # Allow names after "." or "/"; anything else is a different label.
            if rest == "" or rest[0] in "./":
                yield content(namespace, v)
        elif k.startswith(LABEL_SNAPSHOT_REF):
            snapshotter = k[len(LABEL_SNAPSHOT_REF):].split("/", 1)[0]
            yield snapshot(namespace, snapshotter, v)


@dataclass
class Lease:
    namespace: str
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    # (type, id) as in the leases API: ("content", digest), ("ingests", ref),
    # ("snapshots/<snapshotter>", key).
    resources: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Snapshot:
    namespace: str
    snapshotter: str
    key: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def node(self) -> Node:
        return snapshot(self.namespace, self.snapshotter, self.key)


@dataclass
class Ingest:
    namespace: str
    ref: str
    expected: str = ""
    expire_ns: int | None = None


@dataclass
class Graph:
    """Everything the mark phase reads, taken at one instant."""

    content: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    ingests: dict[tuple[str, str], Ingest] = field(default_factory=dict)
    leases: list[Lease] = field(default_factory=list)
    # (namespace, target digest, labels)
    images: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    snapshots: dict[Node, Snapshot] = field(default_factory=dict)
    extra_roots: list[Node] = field(default_factory=list)

    def add_snapshot(self, s: Snapshot) -> None:
        self.snapshots[s.node] = s


# A node being traced, with whether it was reached through a flat lease.
_Item = tuple[Node, bool]


def _expired(lease: Lease, now_ns: int, warn: Callable[[str, str], None]) -> bool:
    value = lease.labels.get(LABEL_EXPIRE)
    if value is None:
        return False
    try:
        return now_ns > parse_ns(value)
    except ValueError:
        warn(lease.id, value)  # an unreadable expiry is ignored: the lease stays
        return False


def roots(graph: Graph, now_ns: int,
          warn: Callable[[str, str], None] = lambda lease, value: None) -> list[_Item]:
    out: list[_Item] = []
    for lease in graph.leases:
        if _expired(lease, now_ns, warn):
            continue
        flat = LABEL_FLAT in lease.labels
        out.append((Node(Kind.LEASE, lease.namespace, lease.id), False))
        for kind, key in lease.resources:
            if kind == "content":
                out.append((content(lease.namespace, key), flat))
            elif kind == "ingests":
                out.append((Node(Kind.INGEST, lease.namespace, key), False))
            elif kind.startswith("snapshots/"):
                out.append((snapshot(lease.namespace, kind.split("/", 1)[1], key), flat))
    for ns, digest, labels in graph.images:
        out.append((content(ns, digest), False))
        out.extend((n, False) for n in label_refs(ns, labels))
    for (ns, ref), ingest in graph.ingests.items():
        if ingest.expire_ns is not None and ingest.expire_ns >= now_ns:
            out.append((Node(Kind.INGEST, ns, ref), False))
    for (ns, digest), labels in graph.content.items():
        if LABEL_ROOT in labels:
            out.append((content(ns, digest), False))
    for node, s in graph.snapshots.items():
        if LABEL_ROOT in s.labels:
            out.append((node, False))
    out.extend((n, False) for n in graph.extra_roots)
    return out


def references(graph: Graph, item: _Item) -> Iterator[_Item]:
    node, flat = item
    if node.kind is Kind.CONTENT:
        if flat:
            return
        labels = graph.content.get((node.namespace, node.key))
        if labels:
            yield from ((n, False) for n in label_refs(node.namespace, labels))
    elif node.kind is Kind.SNAPSHOT:
        s = graph.snapshots.get(node)
        if s is None:
            return  # a dead edge: referenced but not there
        if s.parent:
            yield snapshot(s.namespace, s.snapshotter, s.parent), flat
        if not flat:
            yield from ((n, False) for n in label_refs(s.namespace, s.labels))
    elif node.kind is Kind.INGEST:
        ingest = graph.ingests.get((node.namespace, node.key))
        if ingest is not None and ingest.expected:
            yield content(node.namespace, ingest.expected), False


def mark(graph: Graph, now_ns: int,
         warn: Callable[[str, str], None] = lambda lease, value: None) -> set[Node]:
    """Every node reachable from the roots (tri-color marking, depth first)."""
    grays = roots(graph, now_ns, warn)
    seen: set[_Item] = set()
    reachable: set[Node] = set()
    while grays:
        item = grays.pop()
        if item in seen:
            continue
        seen.add(item)
        reachable.add(item[0])
        grays.extend(r for r in references(graph, item) if r not in seen)
    return reachable


@dataclass
class Plan:
    """What a collection removes."""

    content: list[Node] = field(default_factory=list)
    ingests: list[Node] = field(default_factory=list)
    leases: list[Node] = field(default_factory=list)
    # snapshotter -> [(namespace, key)], children before their parents
    snapshots: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.content or self.ingests or self.leases or self.snapshots)


def plan(graph: Graph, reachable: set[Node]) -> Plan:
    p = Plan()
    p.leases = [n for lease in graph.leases
                if (n := Node(Kind.LEASE, lease.namespace, lease.id)) not in reachable]
    p.ingests = [n for ns, ref in graph.ingests
                 if (n := Node(Kind.INGEST, ns, ref)) not in reachable]
    p.content = [n for ns, digest in graph.content
                 if (n := content(ns, digest)) not in reachable]
    dead = [s for node, s in graph.snapshots.items() if node not in reachable]
    # A reachable child keeps its parent reachable, so the dead set is closed under
    # "child of": removing deepest first never leaves a child without its parent.
    depth: dict[Node, int] = {}

    def depth_of(s: Snapshot) -> int:
        chain: list[Node] = []
        cur: Snapshot | None = s
        while cur is not None and cur.node not in depth and cur.node not in chain:
            chain.append(cur.node)
            cur = graph.snapshots.get(snapshot(cur.namespace, cur.snapshotter, cur.parent)) \
                if cur.parent else None
        base = depth.get(cur.node, 0) if cur is not None else -1
        for n in reversed(chain):
            base += 1
            depth[n] = base
        return depth[s.node]

    for s in sorted(dead, key=lambda s: (-depth_of(s), s.namespace, s.key)):
        p.snapshots.setdefault(s.snapshotter, []).append((s.namespace, s.key))
    return p
