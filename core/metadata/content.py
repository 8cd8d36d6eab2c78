"""Namespaced content: which blobs each namespace has, with labels, and its open ingests.

The model is containerd's ``metadata/content.go`` over the local blob store
(:mod:`berth.core.content`):

- A blob is visible in a namespace only once committed there. Committing bytes the
  backend already holds (pulled in another namespace) only records them; with an
  expected digest already in the backend, a writer does not even need the bytes
  ("shared" policy, containerd's default).
- Each namespace ingest maps the client's ref to a backend ref ``<ns>/<id>/<ref>``, so
  two namespaces writing the same ref never share a file.
- An ingest written without a lease expires after a day; with a lease
  (``containerd-lease`` header) it lives as long as the lease. Committed content and
  ingests join the caller's lease, so garbage collection keeps them.
- Backend blobs and ingests that no namespace refers to any more are removed by
  :meth:`NamespacedContent.cleanup`, which garbage collection runs after it drops records.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from berth.core import errdefs, filters, log
from berth.core.content import ContentStore, Reader, Status, Writer, digest as dg
from berth.core.content.errors import go_quote
from berth.core.content.ingest import ns_to_datetime
from berth.core.metadata import namespaces
from berth.core.metadata.db import Database

# Append-only, versioned through Database.ensure_schema("content", MIGRATIONS).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE content_blobs (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (namespace, digest)
    );
    CREATE INDEX content_blobs_by_digest ON content_blobs(digest);
    CREATE TABLE content_ingests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        ref TEXT NOT NULL,
        bref TEXT NOT NULL DEFAULT '',
        expected TEXT NOT NULL DEFAULT '',
        expected_size INTEGER NOT NULL DEFAULT 0,
        expire_ns INTEGER,
        UNIQUE (namespace, ref)
    );
    """,
]

# An unleased ingest may be resumed for this long before garbage collection takes it.
INGEST_EXPIRY_NS = 24 * 3600 * 1_000_000_000
COPY_CHUNK = 1 << 20

Mutated = Callable[[bool], None]


@dataclass
class Info:
    """containerd's content.Info as one namespace sees it."""

    digest: str
    size: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestRecord:
    namespace: str
    ref: str
    bref: str
    expected: str
    expected_size: int
    expire_ns: int | None


COMPONENT = "content"
NAMESPACE_CHECK_RANK = 20


def namespace_check(c: sqlite3.Connection, namespace: str) -> str | None:
    row = c.execute("SELECT 1 FROM content_blobs WHERE namespace = ? LIMIT 1",
                    (namespace,)).fetchone()
    return "blobs" if row else None


def validate_labels(labels: dict[str, str], what: str = "info.Labels") -> None:
    for k, v in labels.items():
        try:
            namespaces.validate_label(k, v)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(f"{what}: {e}", raw=True) from None


def _clean(labels: dict[str, str] | None) -> dict[str, str]:
    # As bolt stores them: an empty value is no label at all.
    return {k: v for k, v in (labels or {}).items() if v != ""}


# The columns an Info is made from, in the order info_of takes them.
INFO_COLUMNS = "digest, size, created_ns, updated_ns, labels"


def info_of(raw: tuple[Any, ...]) -> Info:
    """The Info of a blob's INFO_COLUMNS values."""
    digest, size, created_ns, updated_ns, labels = raw
    return Info(digest=digest, size=size, created_at=ns_to_datetime(created_ns),
                updated_at=ns_to_datetime(updated_ns), labels=json.loads(labels))


def _info(row: sqlite3.Row) -> Info:
    return info_of((row["digest"], row["size"], row["created_ns"], row["updated_ns"],
                    row["labels"]))


def adapt(info: Info) -> filters.Adaptor:
    """containerd's content.AdaptInfo: digest and labels; size is not filterable."""
    return filters.adapt_mapping({"digest": info.digest, "labels": info.labels})


# --- leases: the caller's lease gains (or loses) what it wrote ---------------------------

def _require_lease(c: sqlite3.Connection, namespace: str, lease: str) -> None:
    if c.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?",
                 (namespace, lease)).fetchone() is None:
        raise errdefs.NotFound("lease does not exist")


def lease_add(c: sqlite3.Connection, namespace: str, lease: str | None, kind: str,
              key: str) -> bool:
    if not lease:
        return False
    _require_lease(c, namespace, lease)
    c.execute("INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) "
              "VALUES (?, ?, ?, ?)", (namespace, lease, kind, key))
    return True


def lease_remove(c: sqlite3.Connection, namespace: str, lease: str | None, kind: str,
                 key: str) -> None:
    if lease:
        c.execute("DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? "
                  "AND id = ?", (namespace, lease, kind, key))


# --- what garbage collection reads and drops, inside its own transaction -----------------

def gc_records(c: sqlite3.Connection) -> list[tuple[str, str, dict[str, str]]]:
    """(namespace, digest, labels) of every committed blob record."""
    return [(r[0], r[1], json.loads(r[2])) for r in
            c.execute("SELECT namespace, digest, labels FROM content_blobs")]


def gc_ingest_records(c: sqlite3.Connection) -> list[IngestRecord]:
    return [_ingest(r) for r in c.execute("SELECT * FROM content_ingests")]


def gc_drop(c: sqlite3.Connection, namespace: str, digest: str) -> bool:
    cur = c.execute("DELETE FROM content_blobs WHERE namespace = ? AND digest = ?",
                    (namespace, digest))
    return cur.rowcount > 0


def gc_drop_ingest(c: sqlite3.Connection, namespace: str, ref: str) -> IngestRecord | None:
    row = c.execute("SELECT * FROM content_ingests WHERE namespace = ? AND ref = ?",
                    (namespace, ref)).fetchone()
    if row is None:
        return None
    c.execute("DELETE FROM content_ingests WHERE id = ?", (row["id"],))
    return _ingest(row)


def _ingest(row: sqlite3.Row) -> IngestRecord:
    return IngestRecord(row["namespace"], row["ref"], row["bref"], row["expected"],
                        row["expected_size"], row["expire_ns"])


def _referenced(c: sqlite3.Connection, digest: str) -> bool:
    # Expected digests of shared ingests may come from another namespace: they keep the
    # backend blob until that ingest is committed or gone.
    return c.execute(
        "SELECT 1 FROM content_blobs WHERE digest = ? UNION ALL "
        "SELECT 1 FROM content_ingests WHERE expected = ? LIMIT 1", (digest, digest),
    ).fetchone() is not None


class SharedExclusive:
    """A reader-writer lock for trio tasks: commits share it, backend cleanup excludes them.

    containerd holds the same kind of lock so that a blob renamed into the backend, but
    not yet recorded in any namespace, is never taken for garbage.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._idle = trio.Event()
        self._idle.set()
        self._exclusive = False
        self._released = trio.Event()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._exclusive:
            await self._released.wait()
        self._shared += 1
        if self._shared == 1:
            self._idle = trio.Event()
        try:
            yield
        finally:
            self._shared -= 1
            if self._shared == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        while self._exclusive:
            await self._released.wait()
        self._exclusive = True
        self._released = trio.Event()
        try:
            while self._shared:
                await self._idle.wait()
            yield
        finally:
            self._exclusive = False
            self._released.set()


class NamespacedContent:
    """containerd's namespaced content store (``metadata.contentStore``)."""

    def __init__(self, db: Database, backend: ContentStore, *, shared: bool = True,
                 mutated: Mutated | None = None) -> None:
        self.db = db
        self.backend = backend
        self.shared = shared
        self.lock = SharedExclusive()
        self._mutated = mutated or (lambda deletion: None)
        self._log = log.get("content")

    def mutated(self, deletion: bool) -> None:
        try:
            self._mutated(deletion)
        except Exception:  # a scheduler problem must not fail a committed change
            self._log.exception("mutation callback failed")

    # --- blobs --------------------------------------------------------------------------

    def info(self, namespace: str, digest: str) -> Info:
        return _info(self._blob(namespace, digest, "*"))

    def info_raw(self, namespace: str, digest: str) -> tuple[Any, ...]:
        """The blob's INFO_COLUMNS as stored (equal values, equal Info), NotFound as
        :meth:`info`: a caller that keeps an answer made from the Info need not parse
        the row to see that nothing changed."""
        return tuple(self._blob(namespace, digest, INFO_COLUMNS))

    def size(self, namespace: str, digest: str) -> int:
        """The blob's size, NotFound as :meth:`info` (a read needs no more)."""
        return int(self._blob(namespace, digest, "size")[0])

    def _blob(self, namespace: str, digest: str, columns: str) -> sqlite3.Row:
        row = self.db.query_one(f"SELECT {columns} FROM content_blobs "
                                "WHERE namespace = ? AND digest = ?", (namespace, digest))
        if row is None:
            raise errdefs.NotFound(f"content digest {digest}")
        return row

    def update(self, namespace: str, info: Info, paths: Iterable[str] = ()) -> Info:
        paths = list(paths)
        with self.db.write() as c:
            row = c.execute("SELECT * FROM content_blobs WHERE namespace = ? AND digest = ?",
                            (namespace, info.digest)).fetchone()
            if row is None:
                raise errdefs.NotFound(f"content digest {info.digest}")
            updated = _info(row)
            given = info.labels or {}
            if paths:
                for path in paths:
                    if path.startswith("labels."):
                        key = path.removeprefix("labels.")
                        updated.labels[key] = given.get(key, "")
                    elif path == "labels":
                        updated.labels = dict(given)
                    else:
                        raise errdefs.InvalidArgument(
                            f"cannot update {go_quote(path)} field on content info "
                            f"{go_quote(info.digest)}")
            else:
                updated.labels = dict(given)
            validate_labels(updated.labels)
            updated.labels = _clean(updated.labels)
            now = time.time_ns()
            updated.updated_at = ns_to_datetime(now)
            c.execute("UPDATE content_blobs SET labels = ?, updated_ns = ? "
                      "WHERE namespace = ? AND digest = ?",
                      (json.dumps(updated.labels), now, namespace, info.digest))
        self.mutated(False)
        return updated

    def list(self, namespace: str, filter_exprs: Iterable[str] = ()) -> list[Info]:
        flt = filters.parse_all(list(filter_exprs))
        with self.db.read() as c:
            rows = c.execute("SELECT * FROM content_blobs WHERE namespace = ? ORDER BY digest",
                             (namespace,)).fetchall()
        out = []
        for row in rows:
            info = _info(row)
            if flt.match(adapt(info)):
                out.append(info)
        return out

    def delete(self, namespace: str, digest: str, lease: str | None = None) -> None:
        with self.db.write() as c:
            if not gc_drop(c, namespace, digest):
                raise errdefs.NotFound(f"content digest {digest}")
            lease_remove(c, namespace, lease, "content", digest)
        self.mutated(True)

    def reader(self, namespace: str, digest: str) -> Reader:
        """The backend blob, once this namespace is known to have it."""
        self.info(namespace, digest)
        return self.backend.reader(digest)

    def blob_path(self, namespace: str, digest: str) -> Path:
        """The local file of a blob this namespace has (NotFound otherwise), for readers
        that work in a worker thread, such as a differ unpacking a layer. Blobs are
        immutable once committed; a delete unlinks the file but leaves open files readable."""
        self.info(namespace, digest)
        return self.backend.blob_path(digest)

    # --- ingests ------------------------------------------------------------------------

    def _record(self, namespace: str, ref: str) -> IngestRecord | None:
        row = self.db.query_one("SELECT * FROM content_ingests WHERE namespace = ? AND ref = ?",
                                (namespace, ref))
        return _ingest(row) if row else None

    async def status(self, namespace: str, ref: str) -> Status:
        rec = self._record(namespace, ref)
        if rec is None or not rec.bref:
            raise errdefs.NotFound(f"reference {ref}")
        st = await self.backend.status(rec.bref)
        return dataclasses.replace(st, ref=ref)

    async def list_statuses(self, namespace: str, filter_exprs: Iterable[str] = ()
                            ) -> builtins.list[Status]:
        flt = filters.parse_all(list(filter_exprs))
        with self.db.read() as c:
            rows = c.execute("SELECT ref, bref FROM content_ingests WHERE namespace = ? "
                             "ORDER BY ref", (namespace,)).fetchall()
        out = []
        for ref, bref in rows:
            if not flt.match(filters.adapt_mapping({"ref": ref})):
                continue
            try:
                st = await self.backend.status(bref)
            except errdefs.NotFound:
                continue  # shared ingest without bytes yet, or gone meanwhile
            out.append(dataclasses.replace(st, ref=ref))
        return out

    async def abort(self, namespace: str, ref: str, lease: str | None = None) -> None:
        async with self.lock.shared():
            with self.db.write() as c:
                rec = gc_drop_ingest(c, namespace, ref)
                if rec is None or not rec.bref:
                    raise errdefs.NotFound(f"reference {ref}")
                lease_remove(c, namespace, lease, "ingests", ref)
            if not rec.expected:
                with contextlib.suppress(errdefs.NotFound):
                    await self.backend.abort(rec.bref)
        self.mutated(False)

    async def writer(self, namespace: str, ref: str, total: int = 0, expected: str = "",
                     lease: str | None = None) -> NamespacedWriter:
        """Open (or resume) the ingest ``ref`` of ``namespace``.

        AlreadyExists when ``expected`` is already committed in the namespace (the
        caller's lease still gains it, as in containerd).
        """
        if not ref:
            raise errdefs.InvalidArgument("ref must not be empty")
        async with self.lock.shared():
            return await self._open(namespace, ref, total, expected, lease)

    async def _open(self, namespace: str, ref: str, total: int, expected: str,
                    lease: str | None) -> NamespacedWriter:
        exists = created = leased = shared = False
        with self.db.write() as c:
            if expected and c.execute(
                    "SELECT 1 FROM content_blobs WHERE namespace = ? AND digest = ?",
                    (namespace, expected)).fetchone():
                try:
                    lease_add(c, namespace, lease, "content", expected)
                except errdefs.BerthError as e:
                    raise type(e)(f"unable to lease content: {e}", raw=True) from None
                exists = True
            else:
                if expected and self.shared:
                    size = self._backend_size(expected)
                    if size is not None and (total == 0 or total == size):
                        shared, total = True, size
                namespaces.ensure(c, namespace)
                row = c.execute("SELECT * FROM content_ingests WHERE namespace = ? AND ref = ?",
                                (namespace, ref)).fetchone()
                leased = lease_add(c, namespace, lease, "ingests", ref)
                if row is None:
                    rowid = c.execute("INSERT INTO content_ingests(namespace, ref) VALUES (?, ?)",
                                      (namespace, ref)).lastrowid
                    bref = f"{namespace}/{rowid}/{ref}"
                    c.execute("UPDATE content_ingests SET bref = ? WHERE id = ?", (bref, rowid))
                    created = True
                else:
                    rowid, bref = row["id"], row["bref"]
                if not leased:
                    # A leased ingest lives as long as its lease; any other one expires.
                    c.execute("UPDATE content_ingests SET expire_ns = ? WHERE id = ?",
                              (time.time_ns() + INGEST_EXPIRY_NS, rowid))
                if shared:
                    c.execute("UPDATE content_ingests SET expected = ?, expected_size = ? "
                              "WHERE id = ?", (expected, total, rowid))
        if exists:
            raise errdefs.AlreadyExists(f"content {expected}")
        self.mutated(False)
        w = NamespacedWriter(self, namespace, ref, bref, lease, size=total,
                             digest=expected if shared else "")
        if shared:
            return w
        try:
            # The expected digest was checked against this namespace above: the backend
            # must not refuse the write because another namespace has the blob.
            w.backend = await self.backend.writer(bref, total)
        except BaseException:
            if created:
                with self.db.write() as c:
                    c.execute("DELETE FROM content_ingests WHERE id = ?", (rowid,))
                    lease_remove(c, namespace, lease, "ingests", ref)
            raise
        return w

    def _backend_size(self, digest: str) -> int | None:
        try:
            return os.stat(self.backend.blob_path(digest)).st_size
        except (OSError, errdefs.InvalidArgument):
            return None

    # --- garbage collection -------------------------------------------------------------

    def gc_list(self) -> builtins.list[tuple[str, str, dict[str, str]]]:
        with self.db.read() as c:
            return gc_records(c)

    def gc_ingests(self) -> builtins.list[IngestRecord]:
        with self.db.read() as c:
            return gc_ingest_records(c)

    async def gc_remove(self, namespace: str, digest: str) -> None:
        """Drop a namespace's record; the blob goes when no namespace refers to it."""
        async with self.lock.exclusive():
            with self.db.write() as c:
                gc_drop(c, namespace, digest)
                keep = _referenced(c, digest)
            if not keep:
                with contextlib.suppress(errdefs.NotFound):
                    await self.backend.delete(digest)

    async def gc_remove_ingest(self, namespace: str, ref: str) -> None:
        async with self.lock.exclusive():
            with self.db.write() as c:
                rec = gc_drop_ingest(c, namespace, ref)
            if rec is not None and rec.bref and not rec.expected:
                with contextlib.suppress(errdefs.NotFound):
                    await self.backend.abort(rec.bref)

    async def cleanup(self) -> tuple[builtins.list[str], builtins.list[str]]:
        """Remove backend blobs and ingests that no namespace refers to any more.

        Returns the digests and backend refs removed.
        """
        async with self.lock.exclusive():
            with self.db.read() as c:
                keep = {r[0] for r in c.execute("SELECT digest FROM content_blobs")}
                keep |= {r[0] for r in c.execute(
                    "SELECT expected FROM content_ingests WHERE expected != ''")}
                brefs = {r[0] for r in c.execute("SELECT bref FROM content_ingests")}
            blobs: list[str] = []
            async with contextlib.aclosing(self.backend.walk()) as walk:
                async for info in walk:
                    if info.digest in keep:
                        continue
                    with contextlib.suppress(errdefs.NotFound):
                        await self.backend.delete(info.digest)
                        blobs.append(info.digest)
                        self._log.debug("removed content", digest=info.digest)
            stale = [st.ref async for st in self.backend.list_statuses()
                     if st.ref not in brefs]
            for bref in stale:
                with contextlib.suppress(errdefs.NotFound):
                    await self.backend.abort(bref)
                    self._log.debug("cleanup aborting ingest", ref=bref)
        return blobs, stale


class NamespacedWriter:
    """One namespace's view of an ingest (containerd's namespacedWriter).

    ``backend`` is None for a shared ingest whose bytes the backend already has: the
    first write (or truncate) copies them into a real ingest, so that a client that
    writes anyway gets the semantics of an ordinary append.
    """

    def __init__(self, store: NamespacedContent, namespace: str, ref: str, bref: str,
                 lease: str | None, *, size: int, digest: str) -> None:
        self.store = store
        self.namespace = namespace
        self.ref = ref
        self.bref = bref
        self.lease = lease
        self.size = size
        self.expected_digest = digest
        self.started = ns_to_datetime(time.time_ns())
        self.backend: Writer | None = None

    def status(self) -> Status:
        if self.backend is not None:
            return dataclasses.replace(self.backend.status(), ref=self.ref, expected=None)
        return Status(ref=self.ref, offset=self.size, total=self.size,
                      expected=self.expected_digest or None, started_at=self.started,
                      updated_at=self.started)

    def digest(self) -> str:
        if self.backend is not None:
            return self.backend.digest(dg.CANONICAL)
        return self.expected_digest

    async def write(self, data: bytes) -> int:
        if self.backend is None:
            if not data:
                return 0
            await self._create_and_copy(self.size)
            assert self.backend is not None  # _create_and_copy made it
        return await self.backend.write(data)

    async def truncate(self, size: int) -> None:
        if self.backend is not None:
            await self.backend.truncate(size)
            return
        await self._create_and_copy(size)

    async def _create_and_copy(self, size: int) -> None:
        w = await self.store.backend.writer(self.bref, size)
        try:
            if size > 0:
                async with self.store.backend.reader(self.expected_digest) as r:
                    pos = 0
                    while pos < size:
                        chunk = await r.read_at(pos, min(COPY_CHUNK, size - pos))
                        if not chunk:
                            raise errdefs.FailedPrecondition(
                                f"content {self.expected_digest} shorter than {size} bytes")
                        await w.write(chunk)
                        pos += len(chunk)
        except BaseException:
            with trio.CancelScope(shield=True):
                await w.close()
            raise
        self.backend = w

    async def commit(self, size: int = 0, expected: str = "",
                     labels: dict[str, str] | None = None) -> str:
        """Verify, publish in the backend, record in the namespace; returns the digest.

        AlreadyExists when the namespace already had the blob (the ingest is gone all
        the same, as in containerd).
        """
        labels = dict(labels or {})
        try:
            validate_labels(labels)
        except errdefs.InvalidArgument:
            await self.close()
            raise
        store = self.store
        async with store.lock.shared():
            if self.backend is None:
                if size != 0 and size != self.size:
                    raise errdefs.FailedPrecondition(
                        f"{go_quote(self.ref)} failed size validation: {self.size} != {size}")
                if expected and expected != self.expected_digest:
                    raise errdefs.FailedPrecondition(f"{go_quote(self.ref)} unexpected digest")
                size, actual = self.size, self.expected_digest
            else:
                offset = self.backend.offset
                if size != 0 and size != offset:
                    await self.backend.close()
                    raise errdefs.FailedPrecondition(
                        f"{go_quote(self.ref)} failed size validation: {offset} != {size}")
                size = offset
                with contextlib.suppress(errdefs.AlreadyExists):
                    await self.backend.commit(size, expected or None)
                actual = self.backend.digest(dg.parse(expected).algorithm if expected
                                             else dg.CANONICAL)
            inner: errdefs.BerthError | None = None
            now = time.time_ns()
            with store.db.write() as c:
                namespaces.ensure(c, self.namespace)
                cur = c.execute(
                    "INSERT OR IGNORE INTO content_blobs(namespace, digest, size, created_ns, "
                    "updated_ns, labels) VALUES (?, ?, ?, ?, ?, ?)",
                    (self.namespace, actual, size, now, now, json.dumps(_clean(labels))))
                if cur.rowcount == 0:
                    inner = errdefs.AlreadyExists(f"content {actual}")
                c.execute("DELETE FROM content_ingests WHERE namespace = ? AND ref = ?",
                          (self.namespace, self.ref))
                lease_remove(c, self.namespace, self.lease, "ingests", self.ref)
                lease_add(c, self.namespace, self.lease, "content", actual)
        store.mutated(False)
        if inner is not None:
            raise inner
        return actual

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()
