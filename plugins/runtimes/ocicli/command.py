"""Run an OCI runtime binary and collect its exit through the shim's Reaper.

A shim reaps every child with ``waitpid(-1)``, so the usual subprocess helpers (which
wait for their own pid) would race it for the exit status. Commands here are started
with ``os.posix_spawn`` and their exit is taken from ``Reaper.wait``, which also holds
exits that arrive before anyone asks. Output is read through non-blocking pipes on trio.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from berth.core.oci.reaper import Reaper

# Marks a stream whose bytes the caller wants back.
CAPTURE = -2
_READ_SIZE = 65536


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    pid: int
    status: int
    stdout: bytes
    stderr: bytes


async def _read_all(fd: int, sink: list[bytes]) -> None:
    async with trio.lowlevel.FdStream(fd) as stream:
        while True:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                return
            sink.append(data)


async def _write_all(fd: int, data: bytes) -> None:
    async with trio.lowlevel.FdStream(fd) as stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)


async def run(
    argv: Sequence[str],
    reaper: Reaper,
    *,
    stdin: int | bytes | None = None,
    stdout: int | None = CAPTURE,
    stderr: int | None = CAPTURE,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Spawn ``argv`` (argv[0] an absolute path) and wait for it.

    ``stdin`` is an fd to hand over, bytes to feed, or None for /dev/null; ``stdout``
    and ``stderr`` are an fd to hand over, ``CAPTURE``, or None for /dev/null. Handed
    over fds stay the caller's (the child gets duplicates).
    """
    to_close: list[int] = []  # our ends of the child's descriptors, closed after spawn
    readers: list[tuple[int, list[bytes]]] = []
    feed: tuple[int, bytes] | None = None
    actions: list[tuple] = []
    devnull = -1
    try:
        def null() -> int:
            nonlocal devnull
            if devnull < 0:
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                to_close.append(devnull)
            return devnull

        if isinstance(stdin, bytes):
            r, w = os.pipe2(os.O_CLOEXEC)
            to_close.append(r)
            feed = (w, stdin)
            actions.append((os.POSIX_SPAWN_DUP2, r, 0))
        else:
            actions.append((os.POSIX_SPAWN_DUP2, null() if stdin is None else stdin, 0))
        for target, spec in ((1, stdout), (2, stderr)):
            if spec == CAPTURE:
                r, w = os.pipe2(os.O_CLOEXEC)
                to_close.append(w)
                readers.append((r, []))
                actions.append((os.POSIX_SPAWN_DUP2, w, target))
            else:
                actions.append((os.POSIX_SPAWN_DUP2, null() if spec is None else spec, target))
        pid = os.posix_spawn(
            argv[0], list(argv), dict(os.environ if env is None else env),
            file_actions=actions,
            # Python ignores SIGPIPE; the runtime and the container must not inherit that.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            setsigmask=(),
        )
    except BaseException:
        for fd, _ in readers:
            os.close(fd)
        if feed is not None:
            os.close(feed[0])
        raise
    finally:
        for fd in to_close:
            os.close(fd)

    try:
        async with trio.open_nursery() as nursery:
            for fd, sink in readers:
                nursery.start_soon(_read_all, fd, sink)
            if feed is not None:
                nursery.start_soon(_write_all, *feed)
            exit = await reaper.wait(pid)
    except BaseException:
        # Cancelled or failed while the command runs: do not leave it behind.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await reaper.wait(pid)
        raise
    out = b"".join(readers[0][1]) if stdout == CAPTURE else b""
    err_index = 1 if stdout == CAPTURE else 0
    err = b"".join(readers[err_index][1]) if stderr == CAPTURE else b""
    return Completed(tuple(argv), pid, exit.status, out, err)
