"""One open ingest: bytes in, verified blob out.

Small writes collect in memory and reach the file (and the hashers) in one worker
thread call per ~1 MiB, so a stream of small gRPC frames costs a memcpy each rather
than a thread hop each. The hashers only ever see bytes that are on disk, which keeps
the in-memory hash state valid for a later resume.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from berth.core.content import digest as dg, ingest
from berth.core.content.errors import OutOfRange, go_quote
from berth.core.errdefs import AlreadyExists, FailedPrecondition

if TYPE_CHECKING:
    from berth.core.content.store import ContentStore, _RefLock

# Buffered bytes above this go to disk; writes at least this large skip the buffer.
FLUSH_AT = 1 << 20


def _write_all(fd: int, views: list[memoryview]) -> None:
    for view in views:
        while view:
            view = view[os.write(fd, view):]


class Writer:
    """Writes one ingest. Obtain with ``await store.writer(ref)``; close or commit it.

    ``async with`` closes it on exit (a committed writer is already closed).
    """

    def __init__(self, store: ContentStore, ref: str, path: Path, opened: ingest.Opened,
                 lock: _RefLock) -> None:
        self.ref = ref
        self.total = opened.total
        self.expected = opened.expected
        self.started_ns = opened.started_ns
        self.updated_ns = opened.updated_ns
        self.resumed = opened.resumed
        self.rehashed = opened.rehashed
        self._store = store
        self._path = path
        self._fd: int | None = opened.fd
        self._lock = lock
        self._hashers = opened.hashers  # cover exactly the bytes on disk
        self._disk = opened.offset      # bytes on disk
        self._buf = bytearray()         # bytes accepted but not yet on disk
        self._busy = False
        self._broken: str | None = None  # why the hash state no longer matches the file
        self._gone = False  # data renamed into blobs/ or ingest removed by commit
        self.aborted = False
        self.saved: ingest.Saved | None = None  # hash state left by close, for a resume

    # --- state --------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Bytes accepted so far (what the next write continues from)."""
        return self._disk + len(self._buf)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def digest(self, algorithm: str | None = None) -> dg.Digest:
        """Digest of the bytes accepted so far."""
        if self._busy:
            raise trio.BusyResourceError("another task is using this content writer")
        algorithm = algorithm or (dg.parse(self.expected).algorithm if self.expected
                                  else dg.CANONICAL)
        hasher = self._hashers.get(algorithm)
        if hasher is None:
            raise FailedPrecondition(f"writer does not track {algorithm} digests")
        hasher = hasher.copy()
        hasher.update(self._buf)
        return dg.Digest.from_hasher(hasher)

    def status(self) -> ingest.Status:
        return ingest.Status(
            ref=self.ref, offset=self.offset, total=self.total, expected=self.expected,
            started_at=ingest.ns_to_datetime(self.started_ns),
            updated_at=ingest.ns_to_datetime(self.updated_ns),
        )

    def _check_usable(self) -> None:
        if self._busy:
            raise trio.BusyResourceError("another task is using this content writer")
        if self._fd is None:
            raise FailedPrecondition("writer is closed")
        if self.aborted:
            raise FailedPrecondition(f"ingest ref {go_quote(self.ref)} was aborted")
        if self._broken is not None:
            raise FailedPrecondition(f"ingest ref {go_quote(self.ref)}: {self._broken}")

    # --- writing ------------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview, offset: int | None = None,
                    ) -> int:
        """Append ``data``; ``offset`` (if given) must be the current offset.

        As in containerd's Write RPC, offset 0 on a non-empty ingest restarts it and any
        other offset but the current one is OutOfRange.
        """
        self._check_usable()
        if offset is not None and offset != self.offset:
            if offset != 0:
                raise OutOfRange(
                    f"write @{offset} must occur at current offset {self.offset}", raw=True)
            await self.truncate(0)
        n = len(data)
        if n == 0:
            return 0
        self.updated_ns = time.time_ns()
        if len(self._buf) + n < FLUSH_AT:
            self._buf += data
            return n
        await self._run(self._write_sync, memoryview(data).cast("B"))
        return n

    async def truncate(self, size: int = 0) -> None:
        """Throw away everything written (only size 0 is supported, as in containerd)."""
        self._check_usable()
        if size != 0:
            raise FailedPrecondition("Truncate: unsupported size")
        await self._run(self._truncate_sync)

    async def _run(self, fn: Any, *args: Any) -> Any:
        self._busy = True
        try:
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            self._busy = False

    def _write_sync(self, extra: memoryview | None = None) -> None:
        """Move the buffer (and ``extra``) to disk and through the hashers."""
        views = [memoryview(self._buf)] if self._buf else []
        if extra is not None and len(extra):
            views.append(extra)
        if not views:
            return
        try:
            _write_all(self._open_fd(), views)
        except BaseException:
            # Some unknown prefix may have reached the file: only a rehash can tell.
            self._broken = "write failed; reopen the ingest to resume"
            raise
        for hasher in self._hashers.values():
            for view in views:
                hasher.update(view)
        # A fresh buffer, never a resize: the old one may still be exported to a view.
        self._buf = bytearray()
        self._disk += sum(len(v) for v in views)

    def _truncate_sync(self) -> None:
        fd = self._open_fd()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        self._hashers = ingest.new_hashers(self._hashers)
        self._buf = bytearray()
        self._disk = 0
        self._broken = None
        self.updated_ns = time.time_ns()

    # --- finishing ----------------------------------------------------------------

    async def commit(self, size: int = 0, expected: str | None = None) -> dg.Digest:
        """Verify and publish the blob; the writer is closed afterwards, success or not.

        ``size`` <= 0 and ``expected`` None fall back to what the writer was opened
        with (then to "any size" and sha256). A wrong size or digest publishes nothing
        and keeps the ingest; an existing blob discards it (AlreadyExists).
        """
        if self._fd is None:
            raise FailedPrecondition("cannot commit on closed writer")
        self._check_usable()
        self._busy = True
        try:
            expected = expected or self.expected
            want = dg.parse(expected) if expected else None
            size = size if size > 0 else self.total
            return await trio.to_thread.run_sync(self._commit_sync, size, want)
        finally:
            self._busy = False
            await self._finish()

    def _commit_sync(self, size: int, want: dg.Digest | None) -> dg.Digest:
        fd = self._fd
        assert fd is not None
        self._write_sync()
        actual_size = self._disk
        if size > 0 and size != actual_size:
            raise FailedPrecondition(f"unexpected commit size {actual_size}, expected {size}")
        algorithm = want.algorithm if want else dg.CANONICAL
        hasher = self._hashers.get(algorithm)
        if hasher is None:
            # Not known when the ingest was opened: one extra pass over the file.
            hasher = dg.new_hasher(algorithm)
            rfd = os.open(self._path / ingest.DATA, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ingest.rehash(rfd, [hasher], actual_size)
            finally:
                os.close(rfd)
            self._hashers[algorithm] = hasher
        actual = dg.Digest.from_hasher(hasher)
        if want is not None and want != actual:
            raise FailedPrecondition(f"unexpected commit digest {actual}, expected {want}")

        target = self._store.blob_path(actual)
        if os.path.lexists(target):
            self._close_fd()
            self._gone = True
            ingest.remove(self._path)
            raise AlreadyExists(f"content {actual}")
        # Readers get a read-only file dated at commit. The data must be on disk before
        # its name appears under blobs/, and the name before the ingest goes away.
        now = time.time_ns()
        os.fchmod(fd, os.fstat(fd).st_mode & 0o444)
        os.utime(fd, ns=(now, now))
        os.fsync(fd)
        self._close_fd()
        self._gone = True
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self._path / ingest.DATA, target)
        _fsync_dir(target.parent)
        ingest.remove(self._path)
        return actual

    async def close(self) -> None:
        """Keep the ingest for a later resume and release the ref. Idempotent."""
        if self._fd is None:
            return
        if self._busy:
            raise trio.BusyResourceError("another task is using this content writer")
        await self._finish()

    async def _finish(self) -> None:
        try:
            if self._fd is not None:
                # Shielded: a cancelled owner still gets its buffered bytes kept and its
                # descriptor closed; the work is bounded by FLUSH_AT.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._close_sync)
        finally:
            self._close_fd()
            self._store._release(self)

    def _close_sync(self) -> None:
        if self.aborted or self._gone:
            self._close_fd()
            return
        try:
            if self._broken is None:
                self._write_sync()
        finally:
            if self._broken is None:
                st = os.fstat(self._open_fd())
                self.saved = ingest.Saved(st.st_ino, st.st_size, st.st_mtime_ns,
                                          {a: h.copy() for a, h in self._hashers.items()})
            self._close_fd()
            with contextlib.suppress(OSError):  # advisory: status() also reads mtime
                ingest.write_updated(self._path, self.updated_ns)

    def _open_fd(self) -> int:
        """The descriptor, for the steps that only run while the writer is open."""
        if self._fd is None:
            raise FailedPrecondition("writer is closed")
        return self._fd

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    async def __aenter__(self) -> Writer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
