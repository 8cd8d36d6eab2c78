"""The serving shim's log: logfmt lines on the bundle's ``log`` FIFO.

containerd opens ``<bundle>/log`` (a FIFO) before starting a shim and copies whatever
arrives there into its own log; the Go shim dup2s it onto stderr and logs logrus text
(``time=... level=info msg=...``). Berth's shim does the same with structlog's logfmt
renderer. Writes never block: the trio loop must not stall because nobody reads the
FIFO, so a full pipe drops the line, and a FIFO without a reader is opened read-write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class NonBlockingWriter:
    """A file-like sink for structlog that drops what it cannot write at once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dropped = 0

    def write(self, text: str) -> int:
        data = text.encode(errors="replace")
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += 1
        except OSError:
            self.dropped += 1
        return 0

    def flush(self) -> None:
        pass


def open_log(bundle: str) -> int:
    """An fd for ``<bundle>/log``: the FIFO containerd reads, or a plain file."""
    path = os.path.join(bundle, "log")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = 0
    if stat.S_ISFIFO(mode):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            # Nobody reads yet: hold the read side too, so opening cannot fail and
            # lines wait in the pipe for a reader that comes later.
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return fd
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.set_blocking(fd, False)
    return fd


# What the last ``setup`` configured: a shim forked from the zygote finds the zygote's
# configuration (for fd 2, which the shim points at its log) and keeps it, rather than
# building processors of its own on pages it would then have to copy.
_active: tuple[tuple, NonBlockingWriter, dict] | None = None


def setup(fd: int, *, debug: bool = False, **bound: str) -> NonBlockingWriter:
    """Send structlog output (logfmt, logrus-like keys) to ``fd``."""
    global _active
    key = (fd, debug, sorted(bound.items()))
    if _active is not None and _active[0] == key and structlog.get_config() == _active[2]:
        bound_now = structlog.contextvars.get_contextvars()
        if all(bound_now.get(k) == v for k, v in bound.items()):
            return _active[1]
    sink = NonBlockingWriter(fd)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("msg"),
            structlog.processors.LogfmtRenderer(key_order=["time", "level", "msg"],
                                                drop_missing=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(10 if debug else 20),
        logger_factory=structlog.WriteLoggerFactory(sink),
        cache_logger_on_first_use=True,
    )
    with contextlib.suppress(Exception):
        structlog.contextvars.bind_contextvars(**bound)
    _active = (key, sink, structlog.get_config())
    return sink
