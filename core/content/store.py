"""Berth's local content store: digest-addressed blobs plus resumable ingests.

The model is containerd's ``content/local``: blobs live at
``<root>/blobs/<algorithm>/<hex>`` and are only ever created by renaming a verified,
fsynced ingest file, so a blob path either does not exist or holds exactly the bytes
of its digest. Labels and per-namespace visibility belong to the metadata store above.

Only one writer per ref at a time (in this store object): a second one waits briefly,
as containerd's retry loop does, then fails with Unavailable.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio

from berth.core import log
from berth.core.content import digest as dg, ingest
from berth.core.content.errors import OutOfRange, go_quote
from berth.core.content.ingest import Status
from berth.core.content.writer import Writer
from berth.core.errdefs import AlreadyExists, InvalidArgument, NotFound, Unavailable
from berth.core.gocompat.duration import go_duration

# Reads up to this size run inline: a pread from the page cache is cheaper than a
# thread hop. Anything larger goes to a worker thread.
INLINE_READ = 64 << 10
READ_CHUNK = 1 << 20
# Hash states kept for closed ingests, so an in-process resume skips the rehash.
SAVED_MAX = 256


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """containerd's content.Info without labels (those live in metadata)."""

    digest: dg.Digest
    size: int
    created_at: datetime
    updated_at: datetime


class _RefLock:
    __slots__ = ("ref", "since_ns", "released", "writer")

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.since_ns = time.time_ns()
        self.released = trio.Event()
        self.writer: Writer | None = None


class ContentStore:
    """Blobs and ingests under ``root``; see the module docstring for the layout."""

    def __init__(self, root: Path | str, *, lock_wait: float = 0.5) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.ingests = self.root / "ingest"
        self.ingests.mkdir(parents=True, exist_ok=True)
        (self.blobs / dg.CANONICAL).mkdir(parents=True, exist_ok=True)
        self.lock_wait = lock_wait
        self._locks: dict[str, _RefLock] = {}
        self._saved: collections.OrderedDict[str, ingest.Saved] = collections.OrderedDict()
        self._log = log.get("content", root=str(self.root))

    # --- paths --------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        d = dg.parse(digest)
        return self.blobs / d.algorithm / d.hex

    def ingest_path(self, ref: str) -> Path:
        return self.ingests / ingest.dir_name(ref)

    # --- blobs --------------------------------------------------------------------

    async def info(self, digest: str) -> BlobInfo:
        d = dg.parse(digest)
        try:
            st = os.stat(self.blob_path(d))
        except FileNotFoundError:
            raise NotFound(f"content {d}") from None
        return _blob_info(d, st)

    def reader(self, digest: str) -> Reader:
        """``async with store.reader(d) as r``: an open blob (NotFound on entry)."""
        return Reader(self, dg.parse(digest))

    async def read_at(self, digest: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (short at the end, like pread)."""
        async with self.reader(digest) as r:
            return await r.read_at(offset, size)

    async def delete(self, digest: str) -> None:
        d = dg.parse(digest)
        try:
            os.unlink(self.blob_path(d))
        except FileNotFoundError:
            raise NotFound(f"content {d}") from None

    async def walk(self) -> AsyncGenerator[BlobInfo, None]:
        """Every blob, one directory listing per algorithm (taken in a worker thread)."""
        for algorithm in sorted(os.listdir(self.blobs)):
            if not dg.is_supported(algorithm):
                continue
            found = await trio.to_thread.run_sync(self._scan, algorithm)
            for info in found:
                yield info

    def _scan(self, algorithm: str) -> list[BlobInfo]:
        out: list[BlobInfo] = []
        try:
            it = os.scandir(self.blobs / algorithm)
        except FileNotFoundError:
            return out
        with it:
            for entry in it:
                value = f"{algorithm}:{entry.name}"
                if dg.problem(value) is not None:
                    self._log.error("invalid digest for blob path", path=entry.path)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we listed
                out.append(_blob_info(dg.Digest(value), st))
        return out

    # --- ingests ------------------------------------------------------------------

    async def writer(self, ref: str, total: int = 0, expected: str | None = None) -> Writer:
        """Open (or resume) the ingest for ``ref``; its ``offset`` is where to continue."""
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if expected:
            expected = dg.parse(expected)
            if os.path.lexists(self.blob_path(expected)):
                raise AlreadyExists(f"content {expected}")
        lock = await self._acquire(ref)
        try:
            path = self.ingest_path(ref)
            algorithms = [dg.CANONICAL]
            if expected:
                algorithms.append(dg.Digest(expected).algorithm)
            saved = self._saved.pop(ref, None)
            opened = await trio.to_thread.run_sync(
                ingest.open_ingest, path, ref, total, expected or None, algorithms, saved,
                self._log)
        except BaseException:
            self._unlock(lock)
            raise
        w = Writer(self, ref, path, opened, lock)
        lock.writer = w
        if opened.rehashed:
            self._log.debug("ingest resumed with rehash", ref=ref, offset=opened.offset)
        return w

    async def _acquire(self, ref: str) -> _RefLock:
        deadline = trio.current_time() + self.lock_wait
        while (held := self._locks.get(ref)) is not None:
            if trio.current_time() >= deadline:
                now = time.time_ns()
                raise Unavailable(
                    f"ref {ref} locked for {go_duration(now - held.since_ns)} "
                    f"(since {_go_time(held.since_ns)})")
            with trio.move_on_at(deadline):
                await held.released.wait()
        lock = _RefLock(ref)
        self._locks[ref] = lock
        return lock

    def _unlock(self, lock: _RefLock) -> None:
        if self._locks.get(lock.ref) is lock:
            del self._locks[lock.ref]
        lock.released.set()

    def _release(self, w: Writer) -> None:
        """Called by a writer when it is done (closed, committed or failed)."""
        if w.saved is not None and not w.aborted:
            self._saved[w.ref] = w.saved
            self._saved.move_to_end(w.ref)
            while len(self._saved) > SAVED_MAX:
                self._saved.popitem(last=False)
        w.saved = None
        self._unlock(w._lock)

    def _active(self, ref: str) -> Writer | None:
        """The open writer for ``ref``, whose in-memory status is the live one."""
        lock = self._locks.get(ref)
        w = lock.writer if lock is not None else None
        return w if w is not None and not w.closed and not w.aborted else None

    async def status(self, ref: str) -> Status:
        w = self._active(ref)
        if w is not None:
            return w.status()
        try:
            return await trio.to_thread.run_sync(ingest.read_status, self.ingest_path(ref))
        except (FileNotFoundError, NotADirectoryError, ValueError, UnicodeDecodeError):
            raise NotFound(f"ingest ref {go_quote(ref)}") from None

    async def list_statuses(
        self,
        filter_regexp: str | re.Pattern[str] | None = None,
        *,
        predicate: Callable[[Status], bool] | None = None,
    ) -> AsyncIterator[Status]:
        """Ingests whose ref matches ``filter_regexp`` (re.search) and ``predicate``."""
        pattern = re.compile(filter_regexp) if isinstance(filter_regexp, str) else filter_regexp
        found = await trio.to_thread.run_sync(ingest.list_statuses, self.ingests)
        for st in found:
            w = self._active(st.ref)
            if w is not None:
                st = w.status()  # live offset includes bytes not yet flushed
            if pattern is not None and not pattern.search(st.ref):
                continue
            if predicate is not None and not predicate(st):
                continue
            yield st

    async def abort(self, ref: str) -> None:
        """Remove the ingest for ``ref``; an open writer on it fails from now on."""
        lock = self._locks.get(ref)
        if lock is not None and lock.writer is not None:
            lock.writer.aborted = True
        self._saved.pop(ref, None)
        if not await trio.to_thread.run_sync(ingest.remove, self.ingest_path(ref)):
            raise NotFound(f"ingest ref {go_quote(ref)}")

    async def cleanup(self, max_age: float, *, now: float | None = None) -> list[str]:
        """Remove ingests untouched for ``max_age`` seconds (not those being written).

        Returns the refs removed (a damaged ingest without a readable ref shows as its
        directory name). This is the hook for garbage collection.
        """
        cutoff = int(((time.time() if now is None else now) - max_age) * 1e9)
        busy = {ingest.dir_name(ref) for ref in self._locks}
        removed = await trio.to_thread.run_sync(self._cleanup_sync, cutoff, busy)
        for ref in removed:
            self._saved.pop(ref, None)
        if removed:
            self._log.info("removed stale ingests", count=len(removed))
        return removed

    def _cleanup_sync(self, cutoff_ns: int, busy: set[str]) -> list[str]:
        removed = []
        for path in ingest.list_dirs(self.ingests):
            if path.name in busy:
                continue
            try:
                if not ingest.stale(path, cutoff_ns):
                    continue
                try:
                    name = (path / ingest.REF).read_bytes().decode("utf-8", "surrogatepass")
                except (OSError, UnicodeDecodeError):
                    name = path.name
                if ingest.remove(path):
                    removed.append(name)
            except FileNotFoundError:
                continue
        return removed


class Reader:
    """An open blob. Holds its descriptor, so a delete does not cut a read short."""

    def __init__(self, store: ContentStore, digest: dg.Digest) -> None:
        self.digest = digest
        self._path = store.blob_path(digest)
        self._fd: int | None = None
        self.size = 0

    async def __aenter__(self) -> Reader:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content {self.digest}") from None
        self._fd = fd
        self.size = os.fstat(fd).st_size
        return self

    async def __aexit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    async def read_at(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            raise ValueError("reader is not open")
        if offset < 0 or size < 0:
            raise InvalidArgument(f"negative read range {offset}+{size}")
        size = max(0, min(size, self.size - offset))
        if size <= INLINE_READ:
            return _pread_all(self._fd, size, offset)
        return await trio.to_thread.run_sync(_pread_all, self._fd, size, offset)

    async def chunks(self, offset: int = 0, size: int = 0,
                     chunk_size: int = READ_CHUNK) -> AsyncGenerator[bytes, None]:
        """The range containerd's Read RPC serves, in chunks.

        Negative offset means 0; an offset past the end is OutOfRange; size <= 0 or a
        range past the end means "to the end".
        """
        offset = max(offset, 0)
        if offset > self.size:
            raise OutOfRange(f"read past object length {self.size} bytes", raw=True)
        end = self.size if size <= 0 or offset + size > self.size else offset + size
        while offset < end:
            data = await self.read_at(offset, min(chunk_size, end - offset))
            if not data:
                return  # truncated underneath us; blobs are immutable so this is damage
            yield data
            offset += len(data)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _blob_info(d: dg.Digest, st: os.stat_result) -> BlobInfo:
    # As in containerd: created is the commit time (mtime), updated the access time.
    return BlobInfo(
        digest=d,
        size=st.st_size,
        created_at=ingest.ns_to_datetime(st.st_mtime_ns),
        updated_at=ingest.ns_to_datetime(st.st_atime_ns),
    )




def _go_time(ns: int) -> str:
    """Go's time.Time.String in UTC."""
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(secs, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    fraction = f".{frac:09d}".rstrip("0").rstrip(".")
    return f"{stamp}{fraction} +0000 UTC"


__all__ = ["BlobInfo", "ContentStore", "Reader", "Status", "Writer"]
