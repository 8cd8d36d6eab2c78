"""Namespaces as containerd's metadata store keeps them.

containerd creates a namespace implicitly whenever an object is stored in it, and
`Labels` of a missing namespace is an empty map, not an error: both are mirrored here
because clients (ctr, dockerd) rely on them.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime

from berth.core import errdefs, identifiers
from berth.core.metadata.db import Database

MAX_LABEL_SIZE = 4096


@dataclass
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


def validate_label(key: str, value: str) -> None:
    if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
        short = key[:10] if len(key) > 10 else key
        raise errdefs.InvalidArgument(
            f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), key: {short}"
        )


def ensure(c: sqlite3.Connection, name: str) -> None:
    """Create ``name`` if missing, inside the caller's write transaction."""
    c.execute(
        "INSERT OR IGNORE INTO namespaces(name, created_at) VALUES (?, ?)",
        (name, datetime.now(UTC).isoformat()),
    )


class NamespaceStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str, labels: dict[str, str]) -> Namespace:
        identifiers.validate(name)
        for k, v in labels.items():
            try:
                validate_label(k, v)
            except errdefs.InvalidArgument as e:
                raise errdefs.InvalidArgument(f"namespace.Labels: {e}", raw=True) from None
        with self.db.write() as c:
            try:
                c.execute(
                    "INSERT INTO namespaces(name, created_at) VALUES (?, ?)",
                    (name, datetime.now(UTC).isoformat()),
                )
            except sqlite3.IntegrityError:
                raise errdefs.AlreadyExists(f'namespace "{name}"') from None
            c.executemany(
                "INSERT INTO namespace_labels(namespace, key, value) VALUES (?, ?, ?)",
                [(name, k, v) for k, v in labels.items() if v != ""],
            )
        return Namespace(name, dict(labels))

    def labels(self, name: str) -> dict[str, str]:
        return {k: v for k, v in self.db.query(
            "SELECT key, value FROM namespace_labels WHERE namespace = ?", (name,))}

    def list(self) -> list[Namespace]:
        with self.db.read() as c:
            names = [r[0] for r in c.execute("SELECT name FROM namespaces")]
            labels: dict[str, dict[str, str]] = {n: {} for n in names}
            for ns, k, v in c.execute("SELECT namespace, key, value FROM namespace_labels"):
                labels[ns][k] = v
        # bolt iterates keys in byte order; clients print in that order.
        names.sort(key=lambda n: n.encode())
        return [Namespace(n, labels[n]) for n in names]

    def set_label(self, name: str, key: str, value: str) -> None:
        self.set_labels(name, {key: value})

    def set_labels(self, name: str, labels: dict[str, str], *, replace: bool = False) -> None:
        """Set (empty value: clear) labels; ``replace`` clears all others first."""
        for k, v in labels.items():
            try:
                validate_label(k, v)
            except errdefs.InvalidArgument as e:
                raise errdefs.InvalidArgument(f"namespace.Labels: {e}", raw=True) from None
        with self.db.write() as c:
            ensure(c, name)
            if replace:
                c.execute("DELETE FROM namespace_labels WHERE namespace = ?", (name,))
            for k, v in labels.items():
                if v == "":
                    c.execute(
                        "DELETE FROM namespace_labels WHERE namespace = ? AND key = ?", (name, k)
                    )
                else:
                    c.execute(
                        "INSERT OR REPLACE INTO namespace_labels(namespace, key, value) "
                        "VALUES (?, ?, ?)",
                        (name, k, v),
                    )

    def delete(self, name: str) -> None:
        with self.db.write() as c:
            if c.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone() is None:
                raise errdefs.NotFound(f'namespace "{name}"')
            still = [kind for check in self.db.namespace_checks if (kind := check(c, name))]
            if still:
                raise errdefs.FailedPrecondition(
                    f'namespace "{name}" must be empty, but it still has {", ".join(still)}'
                )
            c.execute("DELETE FROM namespaces WHERE name = ?", (name,))

