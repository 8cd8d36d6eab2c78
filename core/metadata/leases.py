"""Leases: named, labelled holds on resources that keep them from garbage collection."""

from __future__ import annotations

import base64
import builtins
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from berth.core import errdefs, filters
from berth.core.metadata import namespaces
from berth.core.metadata.db import Database


@dataclass
class Lease:
    id: str
    created_at: datetime
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Resource:
    id: str
    type: str


def random_id() -> str:
    # containerd's WithRandomID: the nanosecond within the current second, then three
    # random bytes in URL-safe base64 ("889261312-dIHZ").
    nanos = time.time_ns() % 1_000_000_000
    return f"{nanos}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def validate_resource(r: Resource) -> Resource:
    """Check a resource as containerd does; content ids are normalised digests."""
    keys = r.type.split("/")
    kind = keys[0]
    if kind in ("content", "ingests"):
        if len(keys) != 1:
            raise errdefs.InvalidArgument(f"invalid resource type {r.type}")
        if kind == "content":
            from berth.core.content.digest import problem

            why = problem(r.id)
            if why is not None:
                raise errdefs.InvalidArgument(f"invalid content resource id {r.id}: {why}")
    elif kind == "snapshots":
        if len(keys) != 2:
            raise errdefs.InvalidArgument(f"invalid snapshot resource type {r.type}")
    else:
        raise errdefs.NotImplemented_(f"resource type {r.type} not supported yet")
    return r


class LeaseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, namespace: str, lease_id: str, labels: dict[str, str]) -> Lease:
        now = datetime.now(UTC)
        with self.db.write() as c:
            namespaces.ensure(c, namespace)
            try:
                c.execute(
                    "INSERT INTO leases(namespace, id, created_at, labels) VALUES (?, ?, ?, ?)",
                    (namespace, lease_id, now.isoformat(), json.dumps(labels or {})),
                )
            except sqlite3.IntegrityError:
                raise errdefs.AlreadyExists(f'lease "{lease_id}"') from None
        return Lease(lease_id, now, dict(labels or {}))

    def delete(self, namespace: str, lease_id: str) -> None:
        with self.db.write() as c:
            cur = c.execute(
                "DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)
            )
            if cur.rowcount == 0:
                raise errdefs.NotFound(f'lease "{lease_id}"')

    def get(self, namespace: str, lease_id: str) -> Lease:
        row = self.db.query_one(
            "SELECT id, created_at, labels FROM leases WHERE namespace = ? AND id = ?",
            (namespace, lease_id),
        )
        if row is None:
            raise errdefs.NotFound(f'lease "{lease_id}"')
        return _lease(row)

    def list(self, namespace: str, filter_exprs: list[str] | None = None) -> list[Lease]:
        try:
            flt = filters.parse_all(filter_exprs or [])
        except errdefs.InvalidArgument as e:
            # containerd wraps the parse error once more: "...: invalid argument: invalid argument".
            raise errdefs.InvalidArgument(e.message) from None
        with self.db.read() as c:
            rows = c.execute(
                "SELECT id, created_at, labels FROM leases WHERE namespace = ?", (namespace,)
            ).fetchall()
        out = [_lease(r) for r in rows]
        out.sort(key=lambda lease: lease.id.encode())
        return [
            lease for lease in out
            if flt.match(filters.adapt_mapping({"id": lease.id, "labels": lease.labels}))
        ]

    def add_resource(self, namespace: str, lease_id: str, r: Resource) -> None:
        with self.db.write() as c:
            self._require(c, namespace, lease_id)
            validate_resource(r)
            c.execute(
                "INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) "
                "VALUES (?, ?, ?, ?)",
                (namespace, lease_id, r.type, r.id),
            )

    def delete_resource(self, namespace: str, lease_id: str, r: Resource) -> None:
        with self.db.write() as c:
            self._require(c, namespace, lease_id)
            validate_resource(r)
            c.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? "
                "AND id = ?",
                (namespace, lease_id, r.type, r.id),
            )

    def list_resources(self, namespace: str, lease_id: str) -> builtins.list[Resource]:
        with self.db.read() as c:
            self._require(c, namespace, lease_id)
            rows = c.execute(
                "SELECT type, id FROM lease_resources WHERE namespace = ? AND lease = ? "
                "ORDER BY type, id",
                (namespace, lease_id),
            ).fetchall()
        return [Resource(id=r["id"], type=r["type"]) for r in rows]

    @staticmethod
    def _require(c: sqlite3.Connection, namespace: str, lease_id: str) -> None:
        if c.execute(
            "SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)
        ).fetchone() is None:
            raise errdefs.NotFound(f'lease "{lease_id}"')


def _lease(row: sqlite3.Row) -> Lease:
    return Lease(row["id"], datetime.fromisoformat(row["created_at"]), json.loads(row["labels"]))
