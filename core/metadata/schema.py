"""Every table of the metadata database, created or migrated once, when it opens.

Each store keeps its own append-only migrations (versioned per component in
``schema_components``) and, where a namespace must be empty before it is deleted, a check
of what it still holds. They are applied here, in one order, by the database's opener (the
metadata plugin, ``io.containerd.metadata.v1.sqlite``): a store's constructor only uses
the tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from berth.core.metadata.db import Database


def setup(db: Database) -> None:
    """Bring every component's tables to its newest schema; register the namespace checks
    (the ranks order containerd's "namespace not empty" message)."""
    from berth.core.metadata import containers, content, images, networks, snapshots

    db.ensure_schema(content.COMPONENT, content.MIGRATIONS)
    db.ensure_schema(images.COMPONENT, images.MIGRATIONS)
    db.ensure_schema(snapshots.COMPONENT, snapshots.MIGRATIONS)
    db.ensure_schema(containers.COMPONENT, containers.MIGRATIONS)
    db.ensure_schema(networks.COMPONENT, networks.MIGRATIONS)
    db.add_namespace_check(images.NAMESPACE_CHECK_RANK, images.namespace_check)
    db.add_namespace_check(content.NAMESPACE_CHECK_RANK, content.namespace_check)
    db.add_namespace_check(containers.NAMESPACE_CHECK_RANK, containers.namespace_check)
    db.add_namespace_check(snapshots.NAMESPACE_CHECK_RANK, snapshots.namespace_check)
