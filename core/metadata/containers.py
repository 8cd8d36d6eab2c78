"""Containers as containerd's metadata store keeps them (metadata/containers.go).

A container is only metadata: an id, a runtime, an OCI spec and references to an image
and a snapshot. Its rows live in the shared sqlite database; the spec, the runtime
options and extensions are kept as serialized ``google.protobuf.Any`` blobs, exactly as
clients sent them.

containerd quirks kept on purpose, because clients can observe them:
- an empty label value deletes the label (on create too);
- writing extensions merges into the existing ones (bolt's CreateBucketIfNotExists), and
  ``extensions.<k>`` of a key missing from the request stores an empty Any;
- "not found" is worded differently depending on whether the namespace ever had a
  container (bolt's containers bucket), so that bucket's existence is tracked too.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard, TypeVar

import betterproto
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, filters, identifiers
from berth.core.metadata import namespaces
from berth.core.metadata.db import Database

COMPONENT = "containers"
NAMESPACE_CHECK_RANK = 30

MIGRATIONS: list[str] = [
    # 1: containers and the per-namespace marker standing in for bolt's bucket.
    """
    CREATE TABLE container_buckets (
        namespace TEXT PRIMARY KEY REFERENCES namespaces(name) ON DELETE CASCADE
    );
    CREATE TABLE containers (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        id TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        image TEXT NOT NULL DEFAULT '',
        runtime_name TEXT NOT NULL DEFAULT '',
        runtime_options BLOB,
        spec BLOB,
        snapshotter TEXT NOT NULL DEFAULT '',
        snapshot_key TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        extensions TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (namespace, id)
    );
    """,
]

# Field paths an update may name; an empty mask means all of these.
FULL_UPDATE = ("labels", "spec", "extensions", "image", "snapshotkey")


@dataclass
class Container:
    id: str
    runtime_name: str = ""
    runtime_options: AnyMsg | None = None
    spec: AnyMsg | None = None
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: dict[str, AnyMsg] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.fromtimestamp(0, UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.fromtimestamp(0, UTC))


_M = TypeVar("_M", bound=betterproto.Message)
_T = TypeVar("_T")


def present(msg: _M | None) -> TypeGuard[_M]:
    """Whether a message field was set (Go's non-nil pointer)."""
    return msg is not None and betterproto.serialized_on_wire(msg)


def _any_blob(msg: AnyMsg | None) -> bytes | None:
    return bytes(msg) if present(msg) else None


def _any_from(blob: bytes | None) -> AnyMsg | None:
    if blob is None:
        return None
    msg = AnyMsg().parse(blob)
    msg._serialized_on_wire = True  # an empty blob is still a set (empty) Any
    return msg


def _ext_json(extensions: dict[str, AnyMsg]) -> str:
    return json.dumps({k: bytes(v).hex() for k, v in extensions.items()}, sort_keys=True)


def _ext_from(text: str) -> dict[str, AnyMsg]:
    out = {}
    for k, v in json.loads(text).items():
        msg = AnyMsg().parse(bytes.fromhex(v))
        msg._serialized_on_wire = True
        out[k] = msg
    return out


def validate(c: Container) -> None:
    """containerd's validateContainer; messages name the field as containerd does."""
    try:
        identifiers.validate(c.id)
    except errdefs.InvalidArgument as e:
        raise errdefs.InvalidArgument(f"container.ID: {e}", raw=True) from None
    for k in c.extensions:
        if k == "":
            raise errdefs.InvalidArgument("container.Extension keys must not be zero-length")
    for k, v in c.labels.items():
        try:
            namespaces.validate_label(k, v)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(f"containers.Labels: {e}", raw=True) from None
    if c.runtime_name == "":
        raise errdefs.InvalidArgument("container.Runtime.Name must be set")
    if not present(c.spec):
        raise errdefs.InvalidArgument("container.Spec must be set")
    if c.snapshot_key != "" and c.snapshotter == "":
        raise errdefs.InvalidArgument(
            "container.Snapshotter must be set if container.SnapshotKey is set"
        )


def adaptor(c: Container) -> filters.Adaptor:
    """containerd's adaptContainer: id, runtime.name, image and labels are filterable."""
    return filters.adapt_mapping({
        "id": c.id,
        "runtime": {"name": c.runtime_name},
        "image": c.image,
        "labels": c.labels,
    })


def _row(r: sqlite3.Row) -> Container:
    return Container(
        id=r["id"],
        runtime_name=r["runtime_name"],
        runtime_options=_any_from(r["runtime_options"]),
        spec=_any_from(r["spec"]),
        labels=json.loads(r["labels"]),
        image=r["image"],
        snapshotter=r["snapshotter"],
        snapshot_key=r["snapshot_key"],
        extensions=_ext_from(r["extensions"]),
        created_at=datetime.fromisoformat(r["created_at"]),
        updated_at=datetime.fromisoformat(r["updated_at"]),
    )


def _drop_empty_labels(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if v != ""}


def namespace_check(c: sqlite3.Connection, namespace: str) -> str | None:
    """For namespace deletion: "containers" while the namespace still holds one."""
    row = c.execute("SELECT 1 FROM containers WHERE namespace = ? LIMIT 1", (namespace,))
    return "containers" if row.fetchone() else None


# Containers kept parsed in memory, oldest loaded dropped first: with their kept answers
# up to ~40 KB each for dockerd's specs, so about 10 MB at most.
CACHE_SIZE = 256


class _Cached:
    """A container as its row reads now, parsed once, and the answers made from it."""

    __slots__ = ("container", "answers")

    def __init__(self, container: Container) -> None:
        self.container = container
        self.answers: dict[Any, Any] = {}


def _copy(c: Container) -> Container:
    # Callers may change what they get (CRI sets a new spec before an update); the
    # cached original stays as the row is. The Any messages are replaced, never edited.
    return Container(c.id, c.runtime_name, c.runtime_options, c.spec, dict(c.labels),
                     c.image, c.snapshotter, c.snapshot_key, dict(c.extensions),
                     c.created_at, c.updated_at)


class ContainerStore:
    """The containers table. Reads are served from parsed copies kept in memory: a
    ``ctr run`` asks for its container about ten times (every Tasks call looks it up),
    dockerd's ``docker run`` eight times through Containers.Get, and parsing the row
    (spec Any, labels, extensions, timestamps) cost more than the query. This store is
    the table's only writer in the process (the cache belongs to the database, shared by
    every store object over it), and every write drops the entry it touches."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache: dict[tuple[str, str], _Cached] = db.shared(COMPONENT, dict)

    def _load(self, namespace: str, container_id: str) -> _Cached:
        key = (namespace, container_id)
        entry = self._cache.get(key)
        if entry is not None:
            return entry
        row = self.db.query_one(
            "SELECT * FROM containers WHERE namespace = ? AND id = ?",
            (namespace, container_id),
        )
        if row is None:
            raise errdefs.NotFound(
                f'container "{container_id}" in namespace "{namespace}"'
            )
        entry = _Cached(_row(row))
        if len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = entry
        return entry

    @contextlib.contextmanager
    def _writing(self, namespace: str, container_id: str) -> Iterator[sqlite3.Connection]:
        """A write transaction on one container's row; its cached copy is dropped before
        and after (a reader in a worker thread may load the old row meanwhile)."""
        key = (namespace, container_id)
        self._cache.pop(key, None)
        try:
            with self.db.write() as c:
                yield c
        finally:
            self._cache.pop(key, None)

    def get(self, namespace: str, container_id: str) -> Container:
        return _copy(self._load(namespace, container_id).container)

    def answer(self, namespace: str, container_id: str, kind: Any,
               build: Callable[[Container], _T]) -> _T:
        """``build(container)``, made once per ``kind`` while the container's row stays
        as it is (a service keeps its serialized answer here); NotFound as :meth:`get`.
        ``build`` must not change the container it is given."""
        entry = self._load(namespace, container_id)
        try:
            made: _T = entry.answers[kind]
            return made
        except KeyError:
            made = entry.answers[kind] = build(entry.container)
            return made

    def list(self, namespace: str, filter_exprs: Iterable[str] = ()) -> list[Container]:
        try:
            flt = filters.parse_all(list(filter_exprs))
        except errdefs.InvalidArgument as e:
            # containerd wraps the parse error once more.
            raise errdefs.InvalidArgument(e.message) from None
        with self.db.read() as c:
            rows = c.execute(
                "SELECT * FROM containers WHERE namespace = ?", (namespace,)
            ).fetchall()
        out = [_row(r) for r in rows]
        out.sort(key=lambda x: x.id.encode())  # bolt's key order
        return [x for x in out if flt.match(adaptor(x))]

    def create(self, namespace: str, container: Container) -> Container:
        try:
            validate(container)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(
                f"create container failed validation: {e}", raw=True
            ) from None
        now = datetime.now(UTC)
        created = Container(
            id=container.id,
            runtime_name=container.runtime_name,
            runtime_options=container.runtime_options,
            spec=container.spec,
            labels=_drop_empty_labels(container.labels),
            image=container.image,
            snapshotter=container.snapshotter,
            snapshot_key=container.snapshot_key,
            extensions=dict(container.extensions),
            created_at=now,
            updated_at=now,
        )
        with self._writing(namespace, container.id) as c:
            namespaces.ensure(c, namespace)
            c.execute("INSERT OR IGNORE INTO container_buckets(namespace) VALUES (?)",
                      (namespace,))
            try:
                c.execute(
                    "INSERT INTO containers(namespace, id, labels, image, runtime_name, "
                    "runtime_options, spec, snapshotter, snapshot_key, created_at, "
                    "updated_at, extensions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (namespace, created.id, json.dumps(created.labels), created.image,
                     created.runtime_name, _any_blob(created.runtime_options),
                     _any_blob(created.spec), created.snapshotter, created.snapshot_key,
                     now.isoformat(), now.isoformat(), _ext_json(created.extensions)),
                )
            except sqlite3.IntegrityError:
                raise errdefs.AlreadyExists(f'container "{container.id}"') from None
        return created

    def update(self, namespace: str, container: Container,
               fieldpaths: Iterable[str] = ()) -> Container:
        if container.id == "":
            raise errdefs.InvalidArgument("must specify a container id")
        paths = list(fieldpaths)
        with self._writing(namespace, container.id) as c:
            if not self._has_bucket(c, namespace):
                raise errdefs.NotFound(
                    f'cannot update container "{container.id}" in namespace "{namespace}"'
                )
            row = c.execute(
                "SELECT * FROM containers WHERE namespace = ? AND id = ?",
                (namespace, container.id),
            ).fetchone()
            if row is None:
                raise errdefs.NotFound(f'container "{container.id}"')
            updated = _row(row)
            if not paths:
                paths = list(FULL_UPDATE)
                # Immutable fields must match on a full replace, so that they can become
                # mutable later without changing what a full replace means.
                if updated.snapshotter != container.snapshotter:
                    raise errdefs.InvalidArgument("container.Snapshotter field is immutable")
                if updated.runtime_name != container.runtime_name:
                    raise errdefs.InvalidArgument("container.Runtime.Name field is immutable")
            for path in paths:
                if path.startswith("labels."):
                    key = path.removeprefix("labels.")
                    updated.labels[key] = container.labels.get(key, "")
                elif path.startswith("extensions."):
                    key = path.removeprefix("extensions.")
                    updated.extensions[key] = container.extensions.get(key) or AnyMsg()
                elif path == "labels":
                    updated.labels = dict(container.labels)
                elif path == "spec":
                    updated.spec = container.spec
                elif path == "extensions":
                    # bolt's extensions bucket is only ever added to.
                    updated.extensions.update(container.extensions)
                elif path == "image":
                    updated.image = container.image
                elif path == "snapshotkey":
                    updated.snapshot_key = container.snapshot_key
                else:
                    raise errdefs.InvalidArgument(
                        f'cannot update "{path}" field on "{container.id}"'
                    )
            try:
                validate(updated)
            except errdefs.InvalidArgument as e:
                raise errdefs.InvalidArgument(f"update failed validation: {e}", raw=True) \
                    from None
            updated.labels = _drop_empty_labels(updated.labels)
            updated.updated_at = datetime.now(UTC)
            c.execute(
                "UPDATE containers SET labels = ?, image = ?, spec = ?, snapshot_key = ?, "
                "extensions = ?, updated_at = ? WHERE namespace = ? AND id = ?",
                (json.dumps(updated.labels), updated.image, _any_blob(updated.spec),
                 updated.snapshot_key, _ext_json(updated.extensions),
                 updated.updated_at.isoformat(), namespace, updated.id),
            )
        return updated

    def delete(self, namespace: str, container_id: str) -> None:
        with self._writing(namespace, container_id) as c:
            if not self._has_bucket(c, namespace):
                raise errdefs.NotFound(
                    f'cannot delete container "{container_id}" in namespace "{namespace}"'
                )
            cur = c.execute(
                "DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, container_id)
            )
            if cur.rowcount == 0:
                raise errdefs.NotFound(f"container {container_id}")

    @staticmethod
    def _has_bucket(c: sqlite3.Connection, namespace: str) -> bool:
        return c.execute(
            "SELECT 1 FROM container_buckets WHERE namespace = ?", (namespace,)
        ).fetchone() is not None


def gc_roots(c: sqlite3.Connection) -> list[Any]:
    """GC roots from containers, read in the collector's transaction: each container's
    snapshot (``<snapshotter>/<key>``) and the content and snapshots its labels name."""
    from berth.core.gc import mark

    out = []
    for ns, labels, snapshotter, key in c.execute(
            "SELECT namespace, labels, snapshotter, snapshot_key FROM containers"):
        if snapshotter:
            out.append(mark.snapshot(ns, snapshotter, key))
        out.extend(mark.label_refs(ns, json.loads(labels)))
    return out
