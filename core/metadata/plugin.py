"""Registers the metadata database as plugin io.containerd.metadata.v1.sqlite."""

from __future__ import annotations

from berth.core.metadata.db import Database
from berth.core.metadata.leases import LeaseStore
from berth.core.metadata.namespaces import NamespaceStore
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import METADATA


class Metadata:
    """The database and the stores over it, as one plugin instance."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.namespaces = NamespaceStore(db)
        self.leases = LeaseStore(db)


async def _init(ctx: InitContext) -> Metadata:
    ctx.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(ctx.root / "meta.db")
    ctx.exports["path"] = str(db.path)
    ctx.exports["schema"] = str(db.version)
    return Metadata(db)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=METADATA, id="sqlite", init=_init)]
