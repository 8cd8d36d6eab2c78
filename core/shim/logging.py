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
        # structlog's WriteLogger calls only write() and flush() (and keys a lock on the
        # object); its stub asks for a whole TextIO.
        logger_factory=structlog.WriteLoggerFactory(sink),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    with contextlib.suppress(Exception):
        structlog.contextvars.bind_contextvars(**bound)
    _active = (key, sink, structlog.get_config())
    return sink


def _logfmt_value(value: str) -> str:
    if value and all(c.isalnum() or c in "-._/:@" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def ids_from_argv(argv: list[str]) -> tuple[str, str]:
    """(namespace, id) from a shim command line that may not parse."""
    found = {"namespace": "", "id": ""}
    for i, arg in enumerate(argv):
        name, _, value = arg.lstrip("-").partition("=")
        if name in found and arg.startswith("-"):
            found[name] = value if value else (argv[i + 1] if i + 1 < len(argv) else "")
    return found["namespace"], found["id"]


def report_failure(bundle: str, msg: str, exc: BaseException, *, namespace: str,
                   id: str) -> None:
    """Write one error line (with the traceback) to ``<bundle>/log``, for a shim process
    that fails before or outside its logger: berthd (or containerd) copies that FIFO
    into its own log. Only the standard library, and never raises."""
    import time
    import traceback

    try:
        fields = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "level": "error", "msg": msg, "namespace": namespace, "id": id,
            "pid": str(os.getpid()), "error": f"{type(exc).__name__}: {exc}",
            "exception": "".join(traceback.format_exception(exc)),
        }
        line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items()) + "\n"
        fd = open_log(bundle)
        try:
            os.write(fd, line.encode(errors="replace"))
        finally:
            os.close(fd)
    except Exception:  # noqa: BLE001, S110 - the report is the last resort; nothing is left
        pass
