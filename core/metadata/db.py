"""The sqlite database behind berth's metadata, with a versioned schema.

One connection, used from the trio thread: every transaction is short (a few rows), so
running it inline costs less than a thread hop. WAL with synchronous=NORMAL survives a
killed daemon (only power loss can roll back the last commits, as with bolt's NoSync off).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

# Each entry migrates from version i to i+1. Never edit a released entry: append.
# Stores added by other plugins (content, images, snapshots, containers...) keep their own
# list and call Database.ensure_schema(component, migrations), versioned separately.
MIGRATIONS: list[str] = [
    # 1: namespaces, leases and their resources, the durable event log, server facts.
    """
    CREATE TABLE namespaces (
        name TEXT PRIMARY KEY,
        created_at TEXT NOT NULL
    );
    CREATE TABLE namespace_labels (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE TABLE leases (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE lease_resources (
        namespace TEXT NOT NULL,
        lease TEXT NOT NULL,
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        PRIMARY KEY (namespace, lease, type, id),
        FOREIGN KEY (namespace, lease) REFERENCES leases(namespace, id) ON DELETE CASCADE
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        timestamp_ns INTEGER NOT NULL,
        namespace TEXT NOT NULL,
        topic TEXT NOT NULL,
        type_url TEXT NOT NULL,
        value BLOB NOT NULL
    );
    CREATE TABLE server (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE schema_components (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

# A check answers what kind of object still lives in a namespace ("images", "blobs"...),
# or None. Stores that own namespaced objects register one with a rank that gives
# containerd's order in the error message: images 10, blobs 20, containers 30,
# snapshots 40.
NamespaceCheck = Callable[[sqlite3.Connection, str], "str | None"]
_S = TypeVar("_S")


def _make_private(path: Path) -> None:
    """The database holds every container's spec (its environment, secrets included).

    sqlite creates the file 0644 and its -wal and -shm files with the file's mode, so the
    file is made 0600 before sqlite opens it; an older berth's files are tightened.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(p, 0o600)


class Database:
    """The metadata database file and its schema."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _make_private(path)
        self.path = path
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        c = self._conn
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA foreign_keys=ON")
        c.execute("PRAGMA busy_timeout=5000")
        self.namespace_checks: list[NamespaceCheck] = []
        self._ranked_checks: list[tuple[int, NamespaceCheck]] = []
        self._shared: dict[str, Any] = {}
        self._migrate()
        # Every store's tables and namespace checks, once, here: stores only use them.
        from berth.core.metadata import schema

        schema.setup(self)

    def shared(self, name: str, factory: Callable[[], _S]) -> _S:
        """One object per database and ``name`` (made by ``factory`` on first use): what
        a store keeps in memory about its rows, so that every store object over this
        database sees the same and every write through any of them keeps it right."""
        try:
            found: _S = self._shared[name]
        except KeyError:
            found = self._shared[name] = factory()
        return found

    def add_namespace_check(self, rank: int, check: NamespaceCheck) -> None:
        self._ranked_checks.append((rank, check))
        self._ranked_checks.sort(key=lambda rc: rc[0])
        self.namespace_checks[:] = [c for _, c in self._ranked_checks]

    def ensure_schema(self, component: str, migrations: list[str]) -> int:
        """Bring a plugin's own tables to the newest of its ``migrations`` (append-only)."""
        with self.write() as c:
            row = c.execute(
                "SELECT version FROM schema_components WHERE name = ?", (component,)
            ).fetchone()
            version = row[0] if row else 0
            if version > len(migrations):
                raise RuntimeError(
                    f"metadata schema of {component} is at version {version}, newer than "
                    f"this berth ({len(migrations)})"
                )
            for target in range(version, len(migrations)):
                for statement in _statements(migrations[target]):
                    c.execute(statement)
            c.execute(
                "INSERT OR REPLACE INTO schema_components(name, version) VALUES (?, ?)",
                (component, len(migrations)),
            )
        return len(migrations)

    def _migrate(self) -> None:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"metadata schema version {version} is newer than this berth ({SCHEMA_VERSION})"
            )
        for target in range(version, SCHEMA_VERSION):
            with self.write() as c:
                for statement in _statements(MIGRATIONS[target]):
                    c.execute(statement)
                c.execute(f"PRAGMA user_version={target + 1}")

    @property
    def version(self) -> int:
        return self._conn.execute("PRAGMA user_version").fetchone()[0]

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """The rows of one SELECT. A single statement is a read transaction of its own
        in sqlite (autocommit), as consistent as one inside BEGIN/COMMIT: only reads of
        several statements need :meth:`read`. All rows are fetched, so the statement
        ends (and its read lock goes) before the lock is released."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row of one SELECT that yields at most one (a key lookup, LIMIT 1),
        or None; see :meth:`query`."""
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return rows[0] if rows else None

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read of several statements (one deferred transaction)."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN")
            try:
                yield c
            finally:
                c.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _statements(script: str) -> list[str]:
    # executescript() would commit our open transaction; split instead so a failed
    # migration rolls back whole.
    return [s.strip() for s in script.split(";") if s.strip()]
