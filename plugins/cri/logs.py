"""Container logs in the CRI format, and the FIFOs a container's stdio goes through.

Each line of a log file is ``<RFC3339Nano time> <stdout|stderr> <F|P> <text>``: ``F`` for
a full line, ``P`` for a piece of one longer than ``max_container_log_line_size`` (its
rest follows on the next lines; the last piece is ``F``). A line cut by the end of the
stream is written as full, as containerd does. :class:`LineSplitter` is the sans-io
part; :func:`copy_stream` reads a FIFO in berthd (trio) and appends to the file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import trio

from berth.core import log

STDOUT = "stdout"
STDERR = "stderr"
FULL = "F"
PARTIAL = "P"
READ_SIZE = 64 << 10

_log = log.get("cri")


def timestamp(ns: int) -> str:
    """Go's time.RFC3339Nano in UTC: trailing zeros of the fraction dropped."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{frac:09d}".rstrip("0")
    return f"{base}.{fraction}Z" if fraction else f"{base}Z"


def format_line(ns: int, stream: str, tag: str, text: bytes) -> bytes:
    return f"{timestamp(ns)} {stream} {tag} ".encode() + text + b"\n"


class LineSplitter:
    """Bytes in, (tag, line) out; lines longer than ``max_size`` come out in pieces
    (``max_size`` <= 0: no limit)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[str, bytes]]:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            limit = self.max_size if self.max_size > 0 else None
            if nl >= 0 and (limit is None or nl <= limit):
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                yield FULL, line
                continue
            if limit is not None and len(self._buf) > limit:
                piece = bytes(self._buf[:limit])
                del self._buf[:limit]
                yield PARTIAL, piece
                continue
            return

    def close(self) -> Iterator[tuple[str, bytes]]:
        if self._buf:
            line = bytes(self._buf)
            self._buf.clear()
            yield FULL, line


def make_fifo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            raise


def open_fifo(path: Path) -> tuple[trio.lowlevel.FdStream, int]:
    """The FIFO's reading end, and a writing end held until the shim opened its own.

    Neither open waits. While we hold the second, the reader cannot see the end of the
    stream before the shim is there; close it (:func:`os.close`) once the task exists,
    or on failure, and the reader ends when the shim's end closes.
    """
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        keeper = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        os.close(rfd)
        raise
    return trio.lowlevel.FdStream(rfd), keeper


class LogFile:
    """One container's log file, shared by its two streams; reopened on rotation."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.reopen()

    def reopen(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        old, self.fd = self.fd, fd
        if old is not None:
            os.close(old)

    def write(self, data: bytes) -> None:
        if self.fd is None:
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                _log.warning("container log write failed", path=str(self.path), error=str(e))
                return
            view = view[n:]

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


async def copy_stream(src: trio.lowlevel.FdStream, stream: str, sink: Callable[[bytes], None],
                      max_line: int, now: Callable[[], int]) -> None:
    """Read ``src`` to its end, handing CRI-formatted lines to ``sink``."""
    splitter = LineSplitter(max_line)
    async with src:
        while True:
            data = await src.receive_some(READ_SIZE)
            if not data:
                break
            t = now()
            out = b"".join(format_line(t, stream, tag, line) for tag, line in splitter.feed(data))
            if out:
                sink(out)
    t = now()
    out = b"".join(format_line(t, stream, tag, line) for tag, line in splitter.close())
    if out:
        sink(out)
