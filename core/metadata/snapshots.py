"""Snapshots per namespace: containerd's metadata snapshotter over a backend.

A backend (overlayfs, native) has one flat key space and keeps only the labels it
inherits (``containerd.io/snapshot/*``). This layer gives every namespace its own keys:
a namespaced key maps to a backend key ``<namespace>/<seq>/<key>`` (containerd's
format, so backend errors read the same), and labels, timestamps and parents live in
the metadata database.

sqlite transactions never span an await here: a call records what it needs in short
transactions around the backend call, and the per-snapshotter trio lock orders the
writers (sequence numbers, commit, remove, collection) so no other writer slips in
between. Backend snapshots created but not yet recorded are tracked so that
:meth:`cleanup` never collects them.

Removing a record removes its backend snapshot right away (containerd leaves that to
its next collection); whatever a crash leaves behind, :meth:`cleanup` removes. Who removes
a backend snapshot is decided by one more lock, taken before the per-snapshotter one:
a remove (a client's or the collector's) holds it from before it drops the record until
its backend snapshot is gone, and :meth:`cleanup` holds it while it looks for orphans. So
cleanup never sees a snapshot whose record is gone but whose removal is still under way
(it would remove it too, and one of the two would fail with "not found"), and a parent's
backend removal never overtakes its child's.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio

from berth.core import errdefs, filters, log
from berth.core.api.containerd.events import SnapshotCommit, SnapshotPrepare, SnapshotRemove
from berth.core.content.errors import go_quote
from berth.core.metadata import namespaces
from berth.core.metadata.db import Database
from berth.core.mount import Mount
from berth.core.snapshots import (
    LABEL_SNAPSHOT_REF,
    Info,
    Kind,
    Snapshotter,
    Usage,
    adapt_info,
    filter_inherited_labels,
    validate_labels,
)

COMPONENT = "snapshots"
NAMESPACE_CHECK_RANK = 40

# Append-only, applied through Database.ensure_schema(COMPONENT, MIGRATIONS).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE snapshots (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        snapshotter TEXT NOT NULL,
        key TEXT NOT NULL,
        backend_key TEXT NOT NULL,
        parent TEXT NOT NULL DEFAULT '',
        labels TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (namespace, snapshotter, key)
    );
    CREATE INDEX snapshots_children ON snapshots(namespace, snapshotter, parent);
    CREATE INDEX snapshots_backend ON snapshots(snapshotter, backend_key);
    CREATE TABLE snapshot_sequences (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        snapshotter TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (namespace, snapshotter)
    );
    """,
]

Publish = Callable[[str, str, Any], Any]
# Told after each committed write; True when something was deleted (the collector's cue).
Mutated = Callable[[bool], None]


def namespace_check(c: sqlite3.Connection, namespace: str) -> str | None:
    """What a namespace still holds, worded as containerd's namespace delete reports it."""
    names = [r[0] for r in c.execute(
        "SELECT DISTINCT snapshotter FROM snapshots WHERE namespace = ?", (namespace,))]
    names.sort(key=lambda n: n.encode())
    return ", ".join(f"snapshots on {go_quote(n)} snapshotter" for n in names) or None


def _now() -> datetime:
    return datetime.now(UTC)


def _labels(text: str) -> dict[str, str]:
    return json.loads(text)


def _stored(labels: Mapping[str, str] | None) -> str:
    # Empty values are not stored (bolt's WriteLabels drops them too).
    return json.dumps({k: v for k, v in (labels or {}).items() if v != ""}, sort_keys=True)


@dataclass
class _Record:
    key: str
    backend_key: str
    parent: str
    labels: dict[str, str]
    created: datetime
    updated: datetime

    @classmethod
    def of(cls, row: sqlite3.Row) -> _Record:
        return cls(row["key"], row["backend_key"], row["parent"], _labels(row["labels"]),
                   datetime.fromisoformat(row["created_at"]),
                   datetime.fromisoformat(row["updated_at"]))

    def local(self) -> Info:
        return Info(name=self.key, parent=self.parent, labels=dict(self.labels),
                    created=self.created, updated=self.updated)


def overlay_info(backend: Info, local: Info) -> Info:
    """The backend's kind and labels under the namespaced name, parent, times and labels."""
    labels = dict(backend.labels)
    labels.update(local.labels)
    return Info(name=local.name, parent=local.parent, kind=backend.kind, labels=labels,
                created=local.created, updated=local.updated)


class NamespacedSnapshotter:
    """One backend seen through namespaces; all calls take the namespace explicitly."""

    def __init__(self, db: Database, name: str, backend: Snapshotter,
                 publish: Publish | None = None, mutated: Mutated | None = None) -> None:
        self.db = db
        self.name = name
        self.backend = backend
        self.publish = publish
        self.mutated = mutated
        self._lock = trio.Lock()
        # Backend removals and cleanup's search for orphans; always taken before _lock.
        self._removals = trio.Lock()
        self._inflight: set[str] = set()
        self._log = log.get("snapshots", snapshotter=name)

    # --- rows ---------------------------------------------------------------------------

    def _row(self, c: sqlite3.Connection, ns: str, key: str) -> _Record | None:
        row = c.execute(
            "SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
            (ns, self.name, key),
        ).fetchone()
        return _Record.of(row) if row is not None else None

    def _backend_key(self, c: sqlite3.Connection, ns: str, key: str) -> str | None:
        """The snapshot's backend key, or None when there is no such snapshot: what an
        existence check needs, without parsing the row's labels and times."""
        row = c.execute(
            "SELECT backend_key FROM snapshots WHERE namespace = ? AND snapshotter = ? AND "
            "key = ?", (ns, self.name, key),
        ).fetchone()
        return None if row is None else str(row[0])

    def _bucket(self, c: sqlite3.Connection, ns: str) -> int | None:
        """The namespace's sequence; None when nothing was ever created there (no bucket)."""
        row = c.execute(
            "SELECT seq FROM snapshot_sequences WHERE namespace = ? AND snapshotter = ?",
            (ns, self.name),
        ).fetchone()
        return None if row is None else row[0]

    def _require(self, c: sqlite3.Connection, ns: str, key: str) -> _Record:
        rec = self._row(c, ns, key)
        if rec is None:
            raise errdefs.NotFound(f"snapshot {key} does not exist")
        return rec

    def _has_children(self, c: sqlite3.Connection, ns: str, key: str) -> bool:
        return c.execute(
            "SELECT 1 FROM snapshots WHERE namespace = ? AND snapshotter = ? AND parent = ? "
            "LIMIT 1", (ns, self.name, key),
        ).fetchone() is not None

    def _lease_check(self, c: sqlite3.Connection, ns: str, lease: str | None) -> None:
        if lease and c.execute(
            "SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (ns, lease)
        ).fetchone() is None:
            raise errdefs.NotFound("lease does not exist")

    def _lease_add(self, c: sqlite3.Connection, ns: str, lease: str | None, key: str) -> None:
        if lease:
            self._lease_check(c, ns, lease)
            c.execute(
                "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) "
                "VALUES (?, ?, ?, ?)", (ns, lease, f"snapshots/{self.name}", key),
            )

    def _lease_remove(self, c: sqlite3.Connection, ns: str, lease: str | None,
                      key: str) -> None:
        if lease:
            c.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? "
                "AND id = ?", (ns, lease, f"snapshots/{self.name}", key),
            )

    def _emit(self, ns: str, topic: str, event: Any) -> None:
        if self.publish is not None:
            self.publish(ns, topic, event)

    def _mutated(self, deletion: bool = False) -> None:
        if self.mutated is not None:
            self.mutated(deletion)

    # --- reads --------------------------------------------------------------------------

    def _lookup(self, ns: str, key: str) -> sqlite3.Row:
        """The snapshot's row (one statement: no transaction needed), NotFound as
        :meth:`_require`."""
        row = self.db.query_one(
            "SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
            (ns, self.name, key),
        )
        if row is None:
            raise errdefs.NotFound(f"snapshot {key} does not exist")
        return row

    def _resolve(self, ns: str, key: str) -> str:
        backend_key: str = self._lookup(ns, key)["backend_key"]
        return backend_key

    async def stat(self, ns: str, key: str) -> Info:
        rec = _Record.of(self._lookup(ns, key))
        return overlay_info(await self.backend.stat(rec.backend_key), rec.local())

    async def usage(self, ns: str, key: str) -> Usage:
        return await self.backend.usage(self._resolve(ns, key))

    async def mounts(self, ns: str, key: str) -> list[Mount]:
        return await self.backend.mounts(self._resolve(ns, key))

    async def walk(self, ns: str, filter_exprs: Sequence[str] = ()) -> list[Info]:
        flt = filters.parse_all(list(filter_exprs))
        rows = [_Record.of(r) for r in self.db.query(
            "SELECT * FROM snapshots WHERE namespace = ? AND snapshotter = ?",
            (ns, self.name))]
        if not rows:
            return []
        rows.sort(key=lambda r: r.key.encode())  # bolt's byte order
        backend = {i.name: i for i in await self.backend.walk()}
        out = []
        for rec in rows:
            b = backend.get(rec.backend_key)
            if b is None:
                continue  # recorded but gone from the backend: not listed, as containerd
            info = overlay_info(b, rec.local())
            if flt.match(adapt_info(info)):
                out.append(info)
        return out

    # --- writes -------------------------------------------------------------------------

    async def prepare(self, ns: str, key: str, parent: str = "",
                      labels: Mapping[str, str] | None = None, *, lease: str | None = None
                      ) -> list[Mount]:
        mounts = await self._create(ns, key, parent, labels, lease, readonly=False)
        self._emit(ns, "/snapshot/prepare", SnapshotPrepare(key=key, parent=parent))
        return mounts

    async def view(self, ns: str, key: str, parent: str = "",
                   labels: Mapping[str, str] | None = None, *, lease: str | None = None
                   ) -> list[Mount]:
        return await self._create(ns, key, parent, labels, lease, readonly=True)

    async def _create(self, ns: str, key: str, parent: str,
                      labels: Mapping[str, str] | None, lease: str | None, *,
                      readonly: bool) -> list[Mount]:
        base = dict(labels or {})
        validate_labels(base)
        target = base.get(LABEL_SNAPSHOT_REF, "")
        bparent = ""
        async with self._lock:
            with self.db.write() as c:
                namespaces.ensure(c, ns)
                if target and self._backend_key(c, ns, target) is not None:
                    raise errdefs.AlreadyExists(f"target snapshot {go_quote(target)}")
                if self._backend_key(c, ns, key) is not None:
                    raise errdefs.AlreadyExists(f"snapshot {go_quote(key)}")
                if parent:
                    pkey = self._backend_key(c, ns, parent)
                    if pkey is None:
                        raise errdefs.NotFound(f"parent snapshot {parent} does not exist")
                    bparent = pkey
                seq = (self._bucket(c, ns) or 0) + 1
                c.execute(
                    "INSERT OR REPLACE INTO snapshot_sequences(namespace, snapshotter, seq) "
                    "VALUES (?, ?, ?)", (ns, self.name, seq),
                )
            self._mutated()
            bkey = f"{ns}/{seq}/{key}"
            self._inflight.add(bkey)
        try:
            return await self._create_backend(ns, key, parent, base, lease, bkey, bparent,
                                              target, readonly)
        finally:
            self._inflight.discard(bkey)

    async def _create_backend(self, ns: str, key: str, parent: str, base: dict[str, str],
                              lease: str | None, bkey: str, bparent: str, target: str,
                              readonly: bool) -> list[Mount]:
        create = self.backend.view if readonly else self.backend.prepare
        created = ""
        failure: errdefs.BerthError | None = None
        mounts: list[Mount] = []
        try:
            mounts = await create(bkey, bparent, filter_inherited_labels(base))
        except errdefs.AlreadyExists as e:
            if not target:
                # The key is fresh: a backend saying otherwise is confused.
                raise errdefs.Unknown(f"unexpected error from snapshotter: {e.message}") \
                    from None
            # The backend already holds the target (a remote snapshotter's shortcut):
            # record the existing snapshot under the target's name instead.
            found = await self._find_target(target, bparent)
            key, bkey, bparent = target, found.name, found.parent
            created_at, updated_at = found.created, found.updated
            for k, v in found.labels.items():
                base.setdefault(k, v)
            failure = errdefs.AlreadyExists(
                f"target snapshot {go_quote(target)} from snapshotter")
        else:
            created = bkey
            created_at = updated_at = _now()
        try:
            async with self._lock:
                with self.db.write() as c:
                    self._lease_add(c, ns, lease, key)
                    if not key:
                        raise errdefs.Unknown("bucket name required", raw=True)
                    if self._backend_key(c, ns, key) is not None:
                        failure = failure or errdefs.AlreadyExists(f"snapshot {go_quote(key)}")
                    else:
                        if parent:
                            pkey = self._backend_key(c, ns, parent)
                            if pkey is None:
                                raise errdefs.NotFound(
                                    f"parent snapshot {parent} does not exist")
                            if pkey != bparent:
                                raise errdefs.InvalidArgument(
                                    f"mismatched parent {parent} from target {target}")
                        c.execute(
                            "INSERT INTO snapshots(namespace, snapshotter, key, backend_key, "
                            "parent, labels, created_at, updated_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (ns, self.name, key, bkey, parent, _stored(base),
                             created_at.isoformat(), updated_at.isoformat()),
                        )
            self._mutated()
        except errdefs.BerthError as e:
            failure = e
        if failure is not None:
            if created:
                async with self._removals:
                    await self._remove_backend(created)
            raise failure
        return mounts

    async def _find_target(self, target: str, bparent: str) -> Info:
        expr = f'labels."{LABEL_SNAPSHOT_REF}"=={target},parent=={go_quote(bparent)}'
        try:
            infos = await self.backend.walk([expr])
        except errdefs.BerthError as e:
            raise type(e)(f"failed walking backend snapshots: {e.message}", raw=True) from None
        for i in infos:
            if i.kind == Kind.COMMITTED and i.labels.get(LABEL_SNAPSHOT_REF) == target \
                    and i.parent == bparent:
                return i
        raise errdefs.NotFound(f"target snapshot {go_quote(target)} in backend")

    async def commit(self, ns: str, name: str, key: str,
                     labels: Mapping[str, str] | None = None, *, lease: str | None = None
                     ) -> None:
        base = dict(labels or {})
        validate_labels(base)
        async with self._lock:
            with self.db.read() as c:
                seq = self._bucket(c, ns)
                if seq is None:
                    raise errdefs.NotFound(f"can not find snapshotter {go_quote(self.name)}")
                if not name:
                    raise errdefs.Unknown("bucket name required", raw=True)
                if self._backend_key(c, ns, name) is not None:
                    raise errdefs.AlreadyExists(f"snapshot {go_quote(name)}")
                self._lease_check(c, ns, lease)
                rec = self._require(c, ns, key)
                if rec.parent and self._backend_key(c, ns, rec.parent) is None:
                    raise errdefs.NotFound(f"parent snapshot {rec.parent} does not exist")
            seq += 1
            name_key = f"{ns}/{seq}/{name}"
            await self.backend.commit(name_key, rec.backend_key, filter_inherited_labels(base))
            now = _now().isoformat()
            try:
                with self.db.write() as c:
                    c.execute(
                        "UPDATE snapshot_sequences SET seq = ? WHERE namespace = ? AND "
                        "snapshotter = ?", (seq, ns, self.name),
                    )
                    c.execute(
                        "INSERT INTO snapshots(namespace, snapshotter, key, backend_key, "
                        "parent, labels, created_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (ns, self.name, name, name_key, rec.parent, _stored(base), now, now),
                    )
                    c.execute(
                        "DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND "
                        "key = ?", (ns, self.name, key),
                    )
                    self._lease_add(c, ns, lease, name)
                    self._lease_remove(c, ns, lease, key)
            except Exception:
                self._log.error("uncommittable snapshot: transaction failed after commit, "
                                "snapshot should be removed", ns=ns, key=key, bname=name_key)
                raise
            self._mutated()
        self._emit(ns, "/snapshot/commit", SnapshotCommit(key=key, name=name))

    async def remove(self, ns: str, key: str, *, lease: str | None = None) -> None:
        async with self._removals:
            async with self._lock:
                with self.db.write() as c:
                    rec = self._require(c, ns, key)
                    if self._has_children(c, ns, key):
                        raise errdefs.FailedPrecondition("cannot remove snapshot with child")
                    if rec.parent and self._backend_key(c, ns, rec.parent) is None:
                        raise errdefs.NotFound(f"parent snapshot {rec.parent} does not exist")
                    self._delete(c, ns, key)
                    self._lease_remove(c, ns, lease, key)
                    shared = self._backend_in_use(c, rec.backend_key)
                self._mutated(deletion=True)
            # Unrecorded now, so no other call reaches it: they need not wait for the
            # backend; only other removals and cleanup do (see the module's doc).
            if not shared:
                await self._remove_backend(rec.backend_key)
        self._emit(ns, "/snapshot/remove", SnapshotRemove(key=key))

    async def update(self, ns: str, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        if not info.name:
            raise errdefs.InvalidArgument()
        async with self._lock:
            with self.db.read() as c:
                rec = self._require(c, ns, info.name)
            local = rec.local()
            if fieldpaths:
                for path in fieldpaths:
                    if path.startswith("labels."):
                        k = path.removeprefix("labels.")
                        local.labels[k] = info.labels.get(k, "")
                    elif path == "labels":
                        local.labels = dict(info.labels)
                    else:
                        raise errdefs.InvalidArgument(
                            f"cannot update {go_quote(path)} field on snapshot "
                            f"{go_quote(info.name)}"
                        )
            else:
                local.labels = dict(info.labels)
            validate_labels(local.labels)
            local.labels = {k: v for k, v in local.labels.items() if v != ""}
            local.updated = _now()
            inner = Info(name=rec.backend_key, labels=filter_inherited_labels(local.labels))
            binfo = await self.backend.update(inner, list(fieldpaths))
            with self.db.write() as c:
                c.execute(
                    "UPDATE snapshots SET labels = ?, updated_at = ? WHERE namespace = ? AND "
                    "snapshotter = ? AND key = ?",
                    (_stored(local.labels), local.updated.isoformat(), ns, self.name,
                     info.name),
                )
            self._mutated()
        return overlay_info(binfo, local)

    # --- collection ---------------------------------------------------------------------

    def _delete(self, c: sqlite3.Connection, ns: str, key: str) -> None:
        c.execute("DELETE FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                  (ns, self.name, key))

    def _backend_in_use(self, c: sqlite3.Connection, bkey: str) -> bool:
        return c.execute(
            "SELECT 1 FROM snapshots WHERE snapshotter = ? AND backend_key = ? LIMIT 1",
            (self.name, bkey),
        ).fetchone() is not None

    async def _remove_backend(self, bkey: str) -> None:
        """Remove a backend snapshot whose record is gone; the caller holds _removals.

        One left behind (a failure) is an orphan that cleanup() collects later. One
        already gone is done: only a crash between backend and record could cause that.
        """
        try:
            await self.backend.remove(bkey)
        except errdefs.NotFound:
            self._log.debug("backend snapshot already removed", key=bkey)
        except errdefs.BerthError as e:
            self._log.warning("failed to remove backend snapshot", key=bkey, error=str(e))

    def gc_list(self) -> list[tuple[str, str, str, dict[str, str]]]:
        """Every snapshot of this snapshotter: (namespace, key, parent or "", labels)."""
        return [
            (ns, key, parent, _labels(labels))
            for ns, key, parent, labels in self.db.query(
                "SELECT namespace, key, parent, labels FROM snapshots WHERE "
                "snapshotter = ?", (self.name,))
        ]

    async def gc_remove(self, namespace: str, key: str) -> None:
        """Drop a snapshot the collector found unreachable (children are its business)."""
        async with self._removals:
            async with self._lock:
                with self.db.write() as c:
                    rec = self._row(c, namespace, key)
                    if rec is None:
                        return
                    self._delete(c, namespace, key)
                    shared = self._backend_in_use(c, rec.backend_key)
            if not shared:
                await self._remove_backend(rec.backend_key)

    async def cleanup(self) -> None:
        """Remove backend snapshots no record refers to (children first), then let the
        backend drop its own leftovers (directories of interrupted calls)."""
        async with self._removals, self._lock:
            seen = {r[0] for r in self.db.query(
                "SELECT backend_key FROM snapshots WHERE snapshotter = ?", (self.name,))}
            infos = await self.backend.walk()
            children: dict[str, list[str]] = {}
            for i in infos:
                children.setdefault(i.parent, []).append(i.name)
            doomed: list[str] = []

            def visit(name: str) -> None:
                for child in children.get(name, []):
                    visit(child)
                if name and name not in seen and name not in self._inflight:
                    doomed.append(name)

            visit("")
            for bkey in doomed:
                try:
                    await self.backend.remove(bkey)
                except errdefs.NotFound:
                    continue  # the backend dropped it on its own: done all the same
                except errdefs.BerthError as e:
                    # A child that could not be removed, say: the next collection retries.
                    self._log.warning("failed to remove snapshot", key=bkey, error=str(e))
                else:
                    self._log.debug("removed snapshot", key=bkey)
        await self.backend.cleanup()
