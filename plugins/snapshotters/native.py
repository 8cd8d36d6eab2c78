"""The native snapshotter: every snapshot is a full copy of its parent's tree.

Slow and space-hungry, but it needs nothing from the kernel beyond bind mounts, so it
works on any filesystem. ``snapshots/<id>`` is the snapshot's tree; a view of a parent
has no directory of its own and mounts the parent read-only.
"""

from __future__ import annotations

import os
from pathlib import Path

from berth.core.mount import Mount
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.graph import host_platform
from berth.core.plugin.registration import SNAPSHOTTER
from berth.core.snapshots import Kind
from berth.plugins.snapshotters import fsutil
from berth.plugins.snapshotters.local import LocalSnapshotter
from berth.plugins.snapshotters.storage import Snapshot


class NativeSnapshotter(LocalSnapshotter):
    mounts_error = "failed to get snapshot mount"

    def needs_dir(self, kind: Kind, parent: str) -> bool:
        return kind == Kind.ACTIVE or not parent

    def populate(self, td: str, kind: Kind, parent_id: str | None) -> None:
        os.chmod(td, 0o755)
        if parent_id is not None:
            fsutil.copy_dir(td, self.snapshot_dir(parent_id))

    def build_mounts(self, s: Snapshot) -> list[Mount]:
        if not s.parent_ids or s.kind == Kind.ACTIVE:
            source = self.snapshot_dir(s.id)
        else:
            source = self.snapshot_dir(s.parent_ids[0])
        return [Mount("bind", source, ["rbind", "ro" if s.kind == Kind.VIEW else "rw"])]


async def _init(ctx: InitContext) -> NativeSnapshotter:
    ctx.platforms.append(host_platform())
    return NativeSnapshotter(Path(ctx.config.get("root_path") or ctx.root))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=SNAPSHOTTER, id="native", init=_init, config={"root_path": ""})]
