"""What the overlayfs and native snapshotters share: storage, crash-safe directories.

Layout under the root: ``metadata.db`` (``storage.MetaStore``) and ``snapshots/<id>``.
A snapshot directory is built under a temporary name (``new-*``) and renamed to its id
inside the transaction that records the snapshot, so after a crash a directory either
belongs to a committed record or is an orphan that :meth:`cleanup` removes. Removal
commits the record's deletion first, then renames the directory (``rm-<id>``) and
deletes it; a crash in between leaves only orphans.

Metadata-only calls run inline (short sqlite transactions); anything that walks or
copies a tree runs in a worker thread.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from berth.core import errdefs, log
from berth.core.mount import Mount
from berth.core.snapshots import Info, Kind, Usage
from berth.plugins.snapshotters import fsutil
from berth.plugins.snapshotters.storage import MetaStore, Snapshot, Transaction


def wrap(prefix: str, e: errdefs.BerthError) -> errdefs.BerthError:
    """Go's fmt.Errorf("prefix: %w", err), keeping the error's class."""
    return type(e)(f"{prefix}: {e.message}", raw=True)


class LocalSnapshotter:
    """A snapshotter keeping snapshots as directories under ``root``; see module doc."""

    #: The wording of a Mounts failure ("failed to get active mount: ...").
    mounts_error = "failed to get snapshot mount"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(exist_ok=True, mode=0o700)
        self.ms = MetaStore(self.root / "metadata.db")
        # Working directories (new-*, rm-*) of calls in progress in this process; any
        # other directory without a record is an orphan of a crash.
        self._inflight: set[str] = set()
        self._inflight_lock = threading.Lock()
        self._log = log.get("snapshotter", root=str(self.root))

    # --- what a subclass decides -------------------------------------------------------

    def snapshot_dir(self, id_: str) -> str:
        return os.path.join(self.snapshots_dir, id_)

    def data_dir(self, id_: str) -> str:
        """The tree whose usage is the snapshot's usage."""
        return self.snapshot_dir(id_)

    def needs_dir(self, kind: Kind, parent: str) -> bool:
        return True

    #: Whether :meth:`populate` uses the parent's id (a copy of the parent's tree); when
    #: not, no read is made for it before the recording transaction.
    populate_uses_parent = True

    def populate(self, td: str, kind: Kind, parent_id: str | None) -> None:
        """Fill a new snapshot directory before the transaction that records it."""

    def finish(self, td: str, s: Snapshot) -> None:
        """Last touches inside the recording transaction (the parent chain is known)."""

    def build_mounts(self, s: Snapshot) -> list[Mount]:
        raise NotImplementedError

    # --- the Snapshotter protocol -------------------------------------------------------

    async def stat(self, key: str) -> Info:
        return self.ms.get_info(key)[1]

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        with self.ms.write() as tx:
            return tx.update_info(info, fieldpaths)

    async def usage(self, key: str) -> Usage:
        id_, info, usage = self.ms.get_info(key)
        if info.kind == Kind.ACTIVE:
            usage = await trio.to_thread.run_sync(fsutil.disk_usage, self.data_dir(id_))
        return usage

    async def mounts(self, key: str) -> list[Mount]:
        try:
            with self.ms.read() as tx:
                s = tx.get_snapshot(key)
        except errdefs.BerthError as e:
            raise wrap(self.mounts_error, e) from None
        return self.build_mounts(s)

    async def prepare(self, key: str, parent: str = "",
                      labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await trio.to_thread.run_sync(self._create, Kind.ACTIVE, key, parent, labels)

    async def view(self, key: str, parent: str = "",
                   labels: Mapping[str, str] | None = None) -> list[Mount]:
        return await trio.to_thread.run_sync(self._create, Kind.VIEW, key, parent, labels)

    async def commit(self, name: str, key: str,
                     labels: Mapping[str, str] | None = None) -> None:
        await trio.to_thread.run_sync(self._commit, name, key, labels)

    async def remove(self, key: str) -> None:
        await trio.to_thread.run_sync(self._remove, key)

    async def walk(self, filter_exprs: Sequence[str] = ()) -> list[Info]:
        with self.ms.read() as tx:
            return tx.walk_info(filter_exprs)

    async def cleanup(self) -> None:
        # The search is one short transaction and one directory listing, less work than
        # a thread hop (garbage collection asks after every snapshot removal); only
        # trees found to remove go to a worker thread.
        with self.ms.try_write() as tx:
            doomed = None if tx is None else self._orphans(tx)
        if doomed is None:
            # A worker thread holds the store (a create's fsyncs): search over there.
            await trio.to_thread.run_sync(self._cleanup)
        elif doomed:
            await trio.to_thread.run_sync(self._remove_dirs, doomed)

    def close(self) -> None:
        self.ms.close()

    # --- blocking halves ----------------------------------------------------------------

    def _claim(self, name: str) -> str:
        """Mark a working directory as in use, so that cleanup leaves it alone."""
        with self._inflight_lock:
            self._inflight.add(name)
        return os.path.join(self.snapshots_dir, name)

    def _release(self, path: str) -> None:
        with self._inflight_lock:
            self._inflight.discard(os.path.basename(path))

    def _create(self, kind: Kind, key: str, parent: str,
                labels: Mapping[str, str] | None) -> list[Mount]:
        td = work = None
        if self.needs_dir(kind, parent):
            td = work = self._claim("new-" + secrets.token_hex(8))
        try:
            if td is not None:
                os.mkdir(td, 0o700)
                parent_id = None
                if parent and self.populate_uses_parent:
                    # Copy outside the transaction; the parent is checked again inside it.
                    with self.ms.read() as tx:
                        parent_id = tx.parent_id(parent)
                try:
                    self.populate(td, kind, parent_id)
                except OSError as e:
                    raise errdefs.Unknown(
                        f"failed to create prepare snapshot dir: {e}", raw=True) from None
            with self.ms.write() as tx:
                try:
                    s = tx.create_snapshot(kind, key, parent, labels)
                except errdefs.BerthError as e:
                    raise wrap("failed to create snapshot", e) from None
                if td is not None:
                    self.finish(td, s)
                    path = self.snapshot_dir(s.id)
                    try:
                        os.rename(td, path)
                    except OSError:
                        # Only an orphan of a crashed create can be there (ids of recorded
                        # snapshots are never reused); rename replaced an empty one.
                        fsutil.remove_tree(path)
                        os.rename(td, path)
                    td = None
                    _fsync_dir(self.snapshots_dir)
            return self.build_mounts(s)
        finally:
            if td is not None:
                fsutil.remove_tree(td)
            if work is not None:
                self._release(work)

    def _commit(self, name: str, key: str, labels: Mapping[str, str] | None) -> None:
        id_, _, _ = self.ms.get_info(key)
        usage = fsutil.disk_usage(self.data_dir(id_))
        with self.ms.write() as tx:
            try:
                tx.commit_active(key, name, usage, labels)
            except errdefs.BerthError as e:
                raise wrap("failed to commit snapshot", e) from None

    def _remove(self, key: str) -> None:
        with self.ms.write() as tx:
            try:
                id_, _ = tx.remove(key)
            except errdefs.BerthError as e:
                raise wrap("failed to remove", e) from None
            doomed = self._claim(f"rm-{id_}")
        try:
            try:
                os.rename(self.snapshot_dir(id_), doomed)
            except FileNotFoundError:
                return  # a native view of a parent has no directory of its own
            fsutil.remove_tree(doomed)
        except OSError as e:
            # The record is gone: what is left is an orphan for cleanup.
            self._log.warning("failed to remove snapshot directory", path=doomed, error=str(e))
        finally:
            self._release(doomed)

    def _cleanup(self) -> None:
        with self.ms.write() as tx:
            doomed = self._orphans(tx)
        self._remove_dirs(doomed)

    def _orphans(self, tx: Transaction) -> list[str]:
        """Directories of no recorded snapshot and of no call in progress. ``tx`` is a
        write transaction: a create renames its directory to the id before it commits,
        and holds the store from its BEGIN to its COMMIT. The calls in progress are read
        after the listing: a call claims its directory before making it, so one listed
        is claimed by then (or already released and gone)."""
        ids = tx.id_map()
        listed = os.listdir(self.snapshots_dir)
        with self._inflight_lock:
            busy = set(self._inflight)
        return [
            os.path.join(self.snapshots_dir, d) for d in listed
            if d not in ids and d not in busy
        ]

    def _remove_dirs(self, doomed: list[str]) -> None:
        for d in doomed:
            try:
                fsutil.remove_tree(d)
            except OSError as e:
                self._log.warning("failed to remove directory", path=d, error=str(e))


def _fsync_dir(path: os.PathLike[str] | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
