"""Images: named, labelled references to a target descriptor, per namespace.

The model is containerd's ``metadata/images.go``: names are free-form (only non-empty),
the target must have a valid digest, a positive size and a media type, labels and
target annotations with an empty value are not stored, and listing is in byte order
of the name (bolt's key order).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from berth.core import errdefs, filters, log
from berth.core.content import digest as dg
from berth.core.content.errors import go_quote
from berth.core.content.ingest import ns_to_datetime
from berth.core.images.manifest import Descriptor
from berth.core.metadata import namespaces
from berth.core.metadata.content import validate_labels
from berth.core.metadata.db import Database

MIGRATIONS: list[str] = [
    """
    CREATE TABLE images (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        media_type TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        annotations TEXT NOT NULL DEFAULT '{}',
        created_ns INTEGER NOT NULL,
        updated_ns INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    """,
]


@dataclass
class Image:
    name: str
    target: Descriptor = field(default_factory=Descriptor)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


COMPONENT = "images"
NAMESPACE_CHECK_RANK = 10


def namespace_check(c: sqlite3.Connection, namespace: str) -> str | None:
    row = c.execute("SELECT 1 FROM images WHERE namespace = ? LIMIT 1", (namespace,)).fetchone()
    return "images" if row else None


def _image(row: sqlite3.Row) -> Image:
    return Image(
        name=row["name"],
        target=Descriptor(row["media_type"], row["digest"], row["size"],
                          annotations=json.loads(row["annotations"])),
        labels=json.loads(row["labels"]),
        created_at=ns_to_datetime(row["created_ns"]),
        updated_at=ns_to_datetime(row["updated_ns"]),
    )


def adapt(image: Image) -> filters.Adaptor:
    """containerd's adaptImage: name, target.digest, target.mediatype, labels, annotations."""
    return filters.adapt_mapping({
        "name": image.name,
        "target": {"digest": image.target.digest, "mediatype": image.target.media_type},
        "labels": image.labels,
        "annotations": image.target.annotations,
    })


def validate(image: Image) -> None:
    if not image.name:
        raise errdefs.InvalidArgument("image name must not be empty")
    validate_labels(image.labels, "image.Labels")
    t = image.target
    why = dg.problem(t.digest)
    if why is not None:
        raise errdefs.InvalidArgument(f"Target.Digest {go_quote(t.digest)} invalid: {why}")
    if t.size <= 0:
        raise errdefs.InvalidArgument("Target.Size must be greater than zero")
    if not t.media_type:
        raise errdefs.InvalidArgument("Target.MediaType must be set")


def _clean(m: dict[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (m or {}).items() if v != ""}


def gc_roots(c: sqlite3.Connection) -> list[tuple[str, str, dict[str, str]]]:
    """(namespace, target digest, labels) of every image, for garbage collection."""
    return [(r[0], r[1], json.loads(r[2])) for r in
            c.execute("SELECT namespace, digest, labels FROM images")]


class ImageStore:
    def __init__(self, db: Database, *, mutated: Callable[[bool], None] | None = None) -> None:
        self.db = db
        self._mutated = mutated or (lambda deletion: None)
        self._log = log.get("images")

    def mutated(self, deletion: bool) -> None:
        try:
            self._mutated(deletion)
        except Exception:
            self._log.exception("mutation callback failed")

    def get(self, namespace: str, name: str) -> Image:
        row = self.db.query_one("SELECT * FROM images WHERE namespace = ? AND name = ?",
                                (namespace, name))
        if row is None:
            raise errdefs.NotFound(f"image {go_quote(name)}")
        return _image(row)

    def list(self, namespace: str, filter_exprs: Iterable[str] = ()) -> list[Image]:
        try:
            flt = filters.parse_all(list(filter_exprs))
        except errdefs.InvalidArgument as e:
            # containerd wraps the parse error once more ("...: invalid argument: invalid
            # argument").
            raise errdefs.InvalidArgument(e.message) from None
        with self.db.read() as c:
            rows = c.execute("SELECT * FROM images WHERE namespace = ? ORDER BY name",
                             (namespace,)).fetchall()
        return [img for img in map(_image, rows) if flt.match(adapt(img))]

    def create(self, namespace: str, image: Image) -> Image:
        validate(image)
        now = time.time_ns()
        out = Image(image.name, Descriptor(image.target.media_type, image.target.digest,
                                           image.target.size,
                                           annotations=_clean(image.target.annotations)),
                    _clean(image.labels), ns_to_datetime(now), ns_to_datetime(now))
        with self.db.write() as c:
            namespaces.ensure(c, namespace)
            try:
                self._insert(c, namespace, out, now, now)
            except sqlite3.IntegrityError:
                raise errdefs.AlreadyExists(f"image {go_quote(image.name)}") from None
        self.mutated(False)
        return out

    def update(self, namespace: str, image: Image, paths: Iterable[str] = ()) -> Image:
        paths = list(paths)
        if not image.name:
            raise errdefs.InvalidArgument("image name is required for update")
        with self.db.write() as c:
            row = c.execute("SELECT * FROM images WHERE namespace = ? AND name = ?",
                            (namespace, image.name)).fetchone()
            if row is None:
                raise errdefs.NotFound(f"image {go_quote(image.name)}")
            current = _image(row)
            created = row["created_ns"]
            if paths:
                updated = current
                for path in paths:
                    if path.startswith("labels."):
                        key = path.removeprefix("labels.")
                        updated.labels[key] = image.labels.get(key, "")
                    elif path.startswith("annotations."):
                        key = path.removeprefix("annotations.")
                        updated.target.annotations[key] = image.target.annotations.get(key, "")
                    elif path == "labels":
                        updated.labels = dict(image.labels)
                    elif path == "target":
                        # The target is replaced as a unit: a digest without its media type
                        # and size makes no sense.
                        t = image.target
                        updated.target = Descriptor(t.media_type, t.digest, t.size,
                                                    annotations=dict(t.annotations))
                    elif path == "annotations":
                        updated.target.annotations = dict(image.target.annotations)
                    else:
                        raise errdefs.InvalidArgument(
                            f"cannot update {go_quote(path)} field on image "
                            f"{go_quote(image.name)}")
            else:
                t = image.target
                updated = Image(image.name, Descriptor(t.media_type, t.digest, t.size,
                                                       annotations=dict(t.annotations)),
                                dict(image.labels))
            validate(updated)
            now = time.time_ns()
            updated.labels = _clean(updated.labels)
            updated.target.annotations = _clean(updated.target.annotations)
            updated.created_at = ns_to_datetime(created)
            updated.updated_at = ns_to_datetime(now)
            c.execute("DELETE FROM images WHERE namespace = ? AND name = ?",
                      (namespace, image.name))
            self._insert(c, namespace, updated, created, now)
        self.mutated(False)
        return updated

    def delete(self, namespace: str, name: str) -> None:
        with self.db.write() as c:
            cur = c.execute("DELETE FROM images WHERE namespace = ? AND name = ?",
                            (namespace, name))
            if cur.rowcount == 0:
                raise errdefs.NotFound(f"image {go_quote(name)}")
        self.mutated(True)

    @staticmethod
    def _insert(c: sqlite3.Connection, namespace: str, image: Image, created: int,
                updated: int) -> None:
        t = image.target
        c.execute(
            "INSERT INTO images(namespace, name, labels, media_type, digest, size, annotations,"
            " created_ns, updated_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (namespace, image.name, json.dumps(image.labels), t.media_type, t.digest, t.size,
             json.dumps(t.annotations), created, updated),
        )
