"""The overlayfs snapshotter: each snapshot is an upper directory over its parents.

``snapshots/<id>/fs`` holds a snapshot's own changes and ``snapshots/<id>/work`` is
overlayfs's work directory (active snapshots only). Mounts are built exactly as
containerd's overlay snapshotter builds them:

- no parent: a bind mount of ``fs`` (``rw``, or ``ro`` for a view);
- a view of a single parent: a read-only bind mount of the parent's ``fs``;
- otherwise an ``overlay`` mount with ``lowerdir`` = the parents' ``fs``, nearest first,
  plus ``workdir``/``upperdir`` for an active snapshot.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from berth.core.mount import Mount
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.graph import host_platform
from berth.core.plugin.registration import SNAPSHOTTER
from berth.core.snapshots import Kind
from berth.plugins.snapshotters.local import LocalSnapshotter
from berth.plugins.snapshotters.storage import Snapshot

_INDEX_PARAM = "/sys/module/overlay/parameters/index"


def supports_index() -> bool:
    """Whether the kernel knows overlayfs's ``index`` option (then berth turns it off)."""
    return os.path.exists(_INDEX_PARAM)


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields[:3] != ["0", "0", "4294967295"]


def needs_userxattr(root: str) -> bool:
    """containerd's NeedsUserXAttr, minus the probe mount for pre-5.11 kernels."""
    if not _in_user_namespace() or _on_tmpfs(root):
        return False
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return m is not None and (int(m[1]), int(m[2])) >= (5, 11)


def _on_tmpfs(path: str) -> bool:
    # statfs's f_type is not exposed by os.statvfs; /proc/self/mountinfo tells the fs type.
    best, fstype = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split(" ")[4]
            if (real == point or real.startswith(point.rstrip("/") + "/")) \
                    and len(point) >= len(best):
                best, fstype = point, right.split(" ")[0]
    return fstype == "tmpfs"


class OverlaySnapshotter(LocalSnapshotter):
    mounts_error = "failed to get active mount"

    def __init__(self, root: Path | str, *, index_off: bool | None = None,
                 userxattr: bool | None = None) -> None:
        super().__init__(root)
        self.index_off = supports_index() if index_off is None else index_off
        self.userxattr = needs_userxattr(str(self.root)) if userxattr is None else userxattr

    def upper_path(self, id_: str) -> str:
        return os.path.join(self.snapshots_dir, id_, "fs")

    def work_path(self, id_: str) -> str:
        return os.path.join(self.snapshots_dir, id_, "work")

    def data_dir(self, id_: str) -> str:
        return self.upper_path(id_)

    populate_uses_parent = False

    def populate(self, td: str, kind: Kind, parent_id: str | None) -> None:
        os.mkdir(os.path.join(td, "fs"), 0o755)
        os.chmod(os.path.join(td, "fs"), 0o755)  # whatever the umask
        if kind == Kind.ACTIVE:
            os.mkdir(os.path.join(td, "work"), 0o711)

    def finish(self, td: str, s: Snapshot) -> None:
        if s.parent_ids:
            # The new upper directory belongs to whoever owns the parent's root.
            st = os.stat(self.upper_path(s.parent_ids[0]))
            os.lchown(os.path.join(td, "fs"), st.st_uid, st.st_gid)

    def build_mounts(self, s: Snapshot) -> list[Mount]:
        return overlay_mounts(s, self.upper_path, self.work_path, index_off=self.index_off,
                              userxattr=self.userxattr)


def overlay_mounts(s: Snapshot, upper, work, *, index_off: bool, userxattr: bool
                   ) -> list[Mount]:
    """The mounts for ``s``; ``upper(id)`` and ``work(id)`` give its directories."""
    if not s.parent_ids:
        # Overlay needs a lower layer: a lone snapshot is a bind mount of its directory.
        return [Mount("bind", upper(s.id), ["ro" if s.kind == Kind.VIEW else "rw", "rbind"])]
    options = []
    if index_off:
        options.append("index=off")
    if userxattr:
        options.append("userxattr")
    if s.kind == Kind.ACTIVE:
        options += [f"workdir={work(s.id)}", f"upperdir={upper(s.id)}"]
    elif len(s.parent_ids) == 1:
        return [Mount("bind", upper(s.parent_ids[0]), ["ro", "rbind"])]
    options.append("lowerdir=" + ":".join(upper(p) for p in s.parent_ids))
    return [Mount("overlay", "overlay", options)]


async def _init(ctx: InitContext) -> OverlaySnapshotter:
    ctx.platforms.append(host_platform())
    root = Path(ctx.config.get("root_path") or ctx.root)
    ctx.exports["root"] = str(root)
    return OverlaySnapshotter(root)


@hookimpl
def berth_plugins() -> list[Registration]:
    return [Registration(type=SNAPSHOTTER, id="overlayfs", init=_init,
                         config={"root_path": ""})]
