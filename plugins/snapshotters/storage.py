"""A snapshotter backend's own bookkeeping: keys, ids, kinds, parents, labels, usage.

containerd's ``snapshots/storage`` on sqlite (one file under the backend's root). Every
snapshot has a numeric id, which names its directory and survives a commit (only the
key changes); a parent is always committed, so children point at it by id. Ids come
from AUTOINCREMENT and are never handed out twice once committed. Errors carry
containerd's messages because clients print them.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from berth.core import errdefs, filters
from berth.core.content.errors import go_quote
from berth.core.snapshots import Info, Kind, Usage, adapt_info

_SCHEMA = [
    """
    CREATE TABLE snapshots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        parent_id INTEGER REFERENCES snapshots(id),
        kind INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        inodes INTEGER NOT NULL DEFAULT 0,
        size INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX snapshots_parent ON snapshots(parent_id);
    """,
]


@dataclass
class Snapshot:
    """What mounts are built from: the id, the kind and the parent ids, nearest first."""

    id: str
    kind: Kind
    parent_ids: list[str]


def now() -> datetime:
    return datetime.now(UTC)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _labels_json(labels: Mapping[str, str] | None) -> str:
    # Empty values are never stored, as bolt's WriteLabels drops them.
    return json.dumps({k: v for k, v in (labels or {}).items() if v != ""}, sort_keys=True)


_ROW_SQL = ("SELECT s.*, p.key AS parent_key FROM snapshots s "
            "LEFT JOIN snapshots p ON p.id = s.parent_id WHERE s.key = ?")


# A snapshot and its ancestors, nearest first: (id, parent_id) each.
_CHAIN_SQL = (
    "WITH RECURSIVE chain(id, parent_id, depth) AS ("
    " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
    " UNION ALL"
    " SELECT s.id, s.parent_id, chain.depth + 1 FROM snapshots s"
    " JOIN chain ON s.id = chain.parent_id)"
    " SELECT id, parent_id FROM chain ORDER BY depth")


def _info(row: sqlite3.Row) -> Info:
    return Info(
        name=row["key"], parent=row["parent_key"] or "", kind=Kind(row["kind"]),
        labels=json.loads(row["labels"]), created=_ts(row["created_at"]),
        updated=_ts(row["updated_at"]),
    )


def _info_of(row: sqlite3.Row | None) -> tuple[str, Info, Usage]:
    if row is None:
        raise errdefs.NotFound("snapshot does not exist")
    return str(row["id"]), _info(row), Usage(row["inodes"], row["size"])


class MetaStore:
    """The database file; use :meth:`read` and :meth:`write` for transactions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        c = self._conn
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("PRAGMA foreign_keys=ON")
        (version,) = c.execute("PRAGMA user_version").fetchone()
        if version > len(_SCHEMA):
            raise RuntimeError(f"{path}: schema version {version} is newer than this berth")
        for target in range(version, len(_SCHEMA)):
            with self.write() as tx:
                for stmt in (s.strip() for s in _SCHEMA[target].split(";")):
                    if stmt:
                        tx.c.execute(stmt)
                tx.c.execute(f"PRAGMA user_version={target + 1}")

    @contextlib.contextmanager
    def write(self) -> Iterator[Transaction]:
        with self._lock:
            with self._write() as tx:
                yield tx

    @contextlib.contextmanager
    def try_write(self) -> Iterator[Transaction | None]:
        """:meth:`write`, or None at once when another thread holds the store (for a
        caller on the event loop, which must not wait out another thread's fsyncs)."""
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            with self._write() as tx:
                yield tx
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Transaction]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield Transaction(self._conn)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def get_info(self, key: str) -> tuple[str, Info, Usage]:
        """:meth:`Transaction.get_info` as one statement: a read transaction of its own in
        sqlite, so no BEGIN/COMMIT around it."""
        with self._lock:
            rows = self._conn.execute(_ROW_SQL, (key,)).fetchall()
        return _info_of(rows[0] if rows else None)

    @contextlib.contextmanager
    def read(self) -> Iterator[Transaction]:
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield Transaction(self._conn)
            finally:
                self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Transaction:
    """containerd's storage functions, inside one sqlite transaction."""

    def __init__(self, c: sqlite3.Connection) -> None:
        self.c = c

    def _row(self, key: str) -> sqlite3.Row | None:
        return self.c.execute(_ROW_SQL, (key,)).fetchone()

    def _parents(self, parent_id: int | None) -> list[str]:
        """The ids of ``parent_id`` and its ancestors, nearest first (one statement,
        however long the chain)."""
        if parent_id is None:
            return []
        rows = self.c.execute(_CHAIN_SQL, (parent_id,)).fetchall()
        # The chain ends at a snapshot without a parent; it stops short at a missing one.
        if not rows or rows[-1][1] is not None:
            raise errdefs.NotFound("missing parent")
        return [str(r[0]) for r in rows]

    def get_info(self, key: str) -> tuple[str, Info, Usage]:
        return _info_of(self._row(key))

    def get_snapshot(self, key: str) -> Snapshot:
        """An active snapshot or a view, with its parent chain."""
        row = self._row(key)
        if row is None:
            raise errdefs.NotFound("snapshot does not exist")
        kind = Kind(row["kind"])
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise errdefs.FailedPrecondition(f"requested snapshot {key} not active or view")
        return Snapshot(str(row["id"]), kind, self._parents(row["parent_id"]))

    def parent_id(self, parent: str) -> str | None:
        """The id of ``parent`` if it can be a parent (exists, committed)."""
        row = self._row(parent)
        if row is None or row["kind"] != Kind.COMMITTED:
            return None
        return str(row["id"])

    def create_snapshot(self, kind: Kind, key: str, parent: str,
                        labels: Mapping[str, str] | None) -> Snapshot:
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise errdefs.InvalidArgument(
                f"snapshot type {kind} invalid; only snapshots of type Active or View can be "
                "created"
            )
        pid = None
        if parent:
            prow = self._row(parent)
            if prow is None:
                raise errdefs.NotFound(f"missing parent {go_quote(parent)} bucket")
            if prow["kind"] != Kind.COMMITTED:
                raise errdefs.InvalidArgument(
                    f"parent {go_quote(parent)} is not committed snapshot"
                )
            pid = prow["id"]
        if not key:
            raise errdefs.Unknown("bucket name required", raw=True)
        if self._row(key) is not None:
            raise errdefs.AlreadyExists(f"snapshot {key}")
        t = now().isoformat()
        cur = self.c.execute(
            "INSERT INTO snapshots(key, parent_id, kind, created_at, updated_at, labels) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, pid, int(kind), t, t, _labels_json(labels)),
        )
        return Snapshot(str(cur.lastrowid), kind, self._parents(pid))

    def update_info(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        row = self._row(info.name)
        if row is None:
            raise errdefs.NotFound("snapshot does not exist")
        updated = _info(row)
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path.removeprefix("labels.")
                    updated.labels[k] = info.labels.get(k, "")
                elif path == "labels":
                    updated.labels = dict(info.labels)
                else:
                    raise errdefs.InvalidArgument(
                        f"cannot update {go_quote(path)} field on snapshot {go_quote(info.name)}"
                    )
        else:
            updated.labels = dict(info.labels)
        updated.labels = {k: v for k, v in updated.labels.items() if v != ""}
        updated.updated = now()
        self.c.execute(
            "UPDATE snapshots SET labels = ?, updated_at = ? WHERE id = ?",
            (_labels_json(updated.labels), updated.updated.isoformat(), row["id"]),
        )
        return updated

    def commit_active(self, key: str, name: str, usage: Usage,
                      labels: Mapping[str, str] | None) -> str:
        if not name:
            raise errdefs.Unknown("committed snapshot : bucket name required", raw=True)
        if self._row(name) is not None:
            raise errdefs.AlreadyExists(f"committed snapshot {name}")
        row = self._row(key)
        if row is None:
            raise errdefs.NotFound(f"failed to get active snapshot {go_quote(key)}")
        if row["kind"] != Kind.ACTIVE:
            raise errdefs.FailedPrecondition(f"snapshot {go_quote(key)} is not active")
        t = now().isoformat()
        # The committed snapshot keeps the id (and so the directory); labels are replaced.
        self.c.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_at = ?, updated_at = ?, "
            "labels = ?, inodes = ?, size = ? WHERE id = ?",
            (name, int(Kind.COMMITTED), t, t, _labels_json(labels), usage.inodes, usage.size,
             row["id"]),
        )
        return str(row["id"])

    def remove(self, key: str) -> tuple[str, Kind]:
        row = self._row(key)
        if row is None:
            raise errdefs.NotFound(f"snapshot {key}")
        if self.c.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)
        ).fetchone():
            raise errdefs.FailedPrecondition("cannot remove snapshot with child")
        self.c.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
        return str(row["id"]), Kind(row["kind"])

    def walk_info(self, filter_exprs: Sequence[str] = ()) -> list[Info]:
        flt = filters.parse_all(list(filter_exprs))
        rows = self.c.execute(
            "SELECT s.*, p.key AS parent_key FROM snapshots s "
            "LEFT JOIN snapshots p ON p.id = s.parent_id ORDER BY s.key"
        ).fetchall()
        infos = [_info(r) for r in rows]
        if flt is filters.ALWAYS:  # no filter (garbage collection's walk, every time)
            return infos
        return [i for i in infos if flt.match(adapt_info(i))]

    def id_map(self) -> dict[str, str]:
        return {str(r[0]): r[1] for r in self.c.execute("SELECT id, key FROM snapshots")}
