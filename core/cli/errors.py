"""The one place where the CLI turns an exception into the line it prints and its exit code.

Messages follow ctr's: ``berth: <message>``, where an error from the daemon reads as
containerd's client shows it (``namespace "x": not found``), a file error names the file
(``open /x.tar: no such file or directory``), a registry that cannot be reached names its
host, and a daemon that is not there names its socket. Tracebacks are for ``--debug``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from grpclib import GRPCError
from grpclib.exceptions import ProtocolError, StreamTerminatedError

from berth.core import errdefs
from berth.core.client import connection
from berth.core.client.client import translate

# Exit status of a command stopped by ^C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
# The daemon is not there, or went away mid-command; both exit 1 as ctr does.
EXIT_FAILURE = 1


class CommandError(Exception):
    """A failure the CLI itself words (a missing argument, flags that exclude each other)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Failure:
    message: str  # without the "berth: " prefix; empty: print nothing
    exit_code: int


def go_errno(e: OSError) -> str:
    """Go's text for an errno (``no such file or directory``): libc's, lower-cased."""
    if e.errno is not None:
        return os.strerror(e.errno).lower()
    return (e.strerror or str(e)).lower()


def path_error(e: OSError, op: str = "open") -> str:
    """Go's ``*PathError`` text: ``open /x.tar: no such file or directory``."""
    return f"{op} {e.filename}: {go_errno(e)}"


def _leaf(exc: BaseException) -> BaseException:
    # A nursery or TaskGroup reports the first real failure, as the plain error would.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _network(e: BaseException) -> str | None:
    """``failed to resolve <host>: ...`` and friends, for an httpx transport error."""
    httpx = sys.modules.get("httpx")  # not loaded: the error cannot be one of its own
    if httpx is None or not isinstance(e, httpx.TransportError):
        return None
    try:
        url = e.request.url
        host = url.host + (f":{url.port}" if url.port else "")
    except RuntimeError:
        host = "registry"
    cause: BaseException | None = e
    while cause is not None:
        # Before OSError: ssl's errors are OSErrors whose errno means nothing here.
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (f"failed to connect to {host}: tls: certificate verify failed: "
                    f"{cause.verify_message or cause.reason}")
        if isinstance(cause, ssl.SSLError):
            return f"failed to connect to {host}: tls: {cause.reason or cause}"
        if isinstance(cause, socket.gaierror):
            return f"failed to resolve {host}: {cause.strerror or cause}"
        if isinstance(cause, OSError) and cause.errno is not None:
            return f"failed to connect to {host}: {go_errno(cause)}"
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, httpx.TimeoutException):
        return f"{host}: timeout"
    return f"failed to connect to {host}: {e or type(e).__name__}"


def unreachable(address: str, detail: str) -> str:
    """ctr's words for a daemon that is not there, and ours."""
    return f'failed to dial "{connection.socket_path(address)}": {detail} (daemon not reachable)'


def _daemon_gone(address: str, detail: str) -> str:
    return f"connection to berthd at {connection.socket_path(address)} lost: {detail}"


def describe(exc: BaseException, *, address: str, connected: bool = False) -> Failure:
    """What the CLI prints and exits with for ``exc``.

    ``address`` is the daemon's socket; ``connected`` tells whether a call reached it.
    """
    exc = _leaf(exc)
    if isinstance(exc, KeyboardInterrupt):
        return Failure("", EXIT_INTERRUPTED)
    if isinstance(exc, CommandError):
        return Failure(str(exc), exc.exit_code)
    if isinstance(exc, GRPCError):
        return Failure(str(translate(exc)), EXIT_FAILURE)
    if isinstance(exc, errdefs.BerthError):
        return Failure(str(exc), EXIT_FAILURE)
    net = _network(exc)
    if net is not None:
        return Failure(net, EXIT_FAILURE)
    if isinstance(exc, StreamTerminatedError | ProtocolError):
        # The daemon answered before and is gone now (killed, restarted, crashed).
        return Failure(_daemon_gone(address, _probe_text(address) or str(exc)), EXIT_FAILURE)
    if isinstance(exc, OSError):
        if exc.filename is not None:
            return Failure(path_error(exc), EXIT_FAILURE)
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.EPIPE,
                         errno.ENOTSOCK, errno.EACCES):
            # grpclib connects lazily, so a daemon that died mid-command shows up as a
            # socket error without a path; ask the socket before blaming it.
            probe = _probe_text(address)
            if probe is not None:
                if not connected:
                    return Failure(unreachable(address, probe), EXIT_FAILURE)
                return Failure(_daemon_gone(address, probe), EXIT_FAILURE)
        return Failure(go_errno(exc) or type(exc).__name__, EXIT_FAILURE)
    if isinstance(exc, UnicodeError | ValueError):
        return Failure(str(exc) or type(exc).__name__, EXIT_FAILURE)
    # A bug of ours: still one line, and --debug shows where.
    return Failure(f"unexpected error: {type(exc).__name__}: {exc} (run with --debug for "
                   "a traceback)", EXIT_FAILURE)


def message(exc: GRPCError | errdefs.BerthError | CommandError) -> str:
    """The words for one failed item of a command that goes on with the next."""
    return describe(exc, address="").message


@contextlib.contextmanager
def naming(argument: str) -> Iterator[None]:
    """Make an error from the daemon name ``argument`` when its message does not."""
    try:
        yield
    except errdefs.BerthError as e:
        if argument in e.message:
            raise
        raise errdefs.from_status(int(e.code), f"{argument}: {e.message}") from None


def _probe_text(address: str) -> str | None:
    err = connection.probe(address)
    return None if err is None else f"connect: {go_errno(err)}"
