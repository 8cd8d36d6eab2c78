"""Typed errors, mapped to gRPC and ttrpc status codes in one place.

The classes mirror containerd's errdefs so that a client sees the same status code
for the same situation. Messages follow containerd's ``<what>: <class>`` shape
(``namespace "x": not found``) because clients such as ctr print them verbatim.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code), shared by gRPC and ttrpc."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class BerthError(Exception):
    """Base of every error that crosses an API boundary."""

    code: Code = Code.UNKNOWN
    suffix: str = "unknown"

    def __init__(self, what: str = "", *, raw: bool = False) -> None:
        # raw=True keeps the message as given (used when relaying a peer's message).
        if raw or not what:
            message = what or self.suffix
        else:
            message = f"{what}: {self.suffix}"
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(BerthError):
    code = Code.INVALID_ARGUMENT
    suffix = "invalid argument"


class NotFound(BerthError):
    code = Code.NOT_FOUND
    suffix = "not found"


class AlreadyExists(BerthError):
    code = Code.ALREADY_EXISTS
    suffix = "already exists"


class FailedPrecondition(BerthError):
    code = Code.FAILED_PRECONDITION
    suffix = "failed precondition"


class Unavailable(BerthError):
    code = Code.UNAVAILABLE
    suffix = "unavailable"


class NotImplemented_(BerthError):
    code = Code.UNIMPLEMENTED
    suffix = "not implemented"


class Cancelled(BerthError):
    code = Code.CANCELLED
    suffix = "context canceled"


class DeadlineExceeded(BerthError):
    code = Code.DEADLINE_EXCEEDED
    suffix = "context deadline exceeded"


class ResourceExhausted(BerthError):
    code = Code.RESOURCE_EXHAUSTED
    suffix = "resource exhausted"


class OutOfRange(BerthError):
    code = Code.OUT_OF_RANGE
    suffix = "out of range"


class Internal(BerthError):
    code = Code.INTERNAL
    suffix = "internal error"


class Unknown(BerthError):
    code = Code.UNKNOWN
    suffix = "unknown"


_BY_CODE: dict[Code, type[BerthError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        NotImplemented_,
        Cancelled,
        DeadlineExceeded,
        ResourceExhausted,
        OutOfRange,
        Internal,
        Unknown,
    )
}


def from_status(code: int, message: str) -> BerthError:
    """Turn a status received from a peer back into a typed error."""
    try:
        cls = _BY_CODE[Code(code)]
    except (ValueError, KeyError):
        cls = Unknown
    return cls(message, raw=True)


def to_status(exc: BaseException) -> tuple[Code, str]:
    """The (code, message) pair a server sends for ``exc``."""
    if isinstance(exc, BerthError):
        return exc.code, exc.message
    return Code.UNKNOWN, str(exc) or type(exc).__name__


def unwrap_group(exc: BaseException, *, first: bool = False) -> BaseException:
    """The error inside the exception groups nurseries and task groups wrap it in.

    By default only a group of one is opened (a lone failure, described as itself);
    with ``first`` the first member is taken at every level, for callers that expect
    one error (the others are usually the cancellations it caused).
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions and (
            first or len(exc.exceptions) == 1):
        exc = exc.exceptions[0]
    return exc
