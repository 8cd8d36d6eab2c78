"""Client-side stdio for tasks: FIFOs a shim opens, copied to and from the caller's stdio.

As containerd's ``cio`` does it: a client makes a FIFO set in a fresh directory under a
FIFO root (``<root>/<random>/<id>-stdin|stdout|stderr``), names the paths in
Tasks.Create or Tasks.Exec, and copies its own stdin into the stdin FIFO and the output
FIFOs to its stdout and stderr. The set is removed when the task or process is deleted;
a set loaded back from a task (``tasks rm``, ``tasks attach``) removes its FIFOs and then
their directory if it is empty.

The FIFO ends are opened so that nothing blocks the event loop:

- an output FIFO is opened for reading without blocking before the task exists; Linux
  reports it readable only once a writer came and wrote or left, so the copy sees EOF
  only after the shim closed it;
- the stdin FIFO is opened for writing without blocking when the shim already reads it,
  otherwise by a helper thread that waits for the shim (released by opening a reader
  ourselves if we give up first). At EOF of our stdin we close it and ask the daemon to
  close the process's stdin (Tasks.CloseIO), as ctr's stdinCloser does.

With a terminal there is no stderr FIFO, the local terminal is put in raw mode
(:func:`raw_terminal`) and its size follows SIGWINCH into Tasks.ResizePty
(:func:`forward_resizes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import stat
import tempfile
import termios
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

DEFAULT_FIFO_DIR = "/run/berth/fifo"
CHUNK = 32 * 1024

_log = logging.getLogger("berth.cio")

Closer = Callable[[], Awaitable[None]]
Resizer = Callable[[int, int], Awaitable[None]]


# --- FIFO sets ----------------------------------------------------------------------

@dataclass
class FIFOSet:
    """The stdio paths of one process; ``""`` for a stream it does not have."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    #: The directory made for this set (removed whole by close), or None for a set
    #: loaded from a task, whose FIFOs are removed one by one.
    directory: str | None = field(default=None, repr=False)

    def paths(self) -> list[str]:
        return [p for p in (self.stdin, self.stdout, self.stderr) if p]

    def close(self) -> None:
        """Remove the FIFOs (and their directory): the process is gone for good."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        dirs = []
        for p in self.paths():
            if is_fifo(p):
                with contextlib.suppress(OSError):
                    os.unlink(p)
                dirs.append(os.path.dirname(p))
        for d in dict.fromkeys(dirs):
            # Only if empty: a directory with something else in it is not ours to clear.
            with contextlib.suppress(OSError):
                os.rmdir(d)


def is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def new_fifo_set(root: str | None, process_id: str, *, terminal: bool = False,
                 stdin: bool = True, stdout: bool = True, stderr: bool = True) -> FIFOSet:
    """Paths in a new private directory under ``root`` (NewFIFOSetInDir); the FIFOs
    themselves are made when a :class:`Copier` opens them. A terminal has no stderr."""
    root = root or DEFAULT_FIFO_DIR
    os.makedirs(root, mode=0o700, exist_ok=True)
    directory = tempfile.mkdtemp(dir=root, prefix="")
    base = os.path.join(directory, process_id)
    return FIFOSet(
        stdin=f"{base}-stdin" if stdin else "",
        stdout=f"{base}-stdout" if stdout else "",
        stderr=f"{base}-stderr" if stderr and not terminal else "",
        terminal=terminal,
        directory=directory,
    )


def loaded_fifo_set(stdin: str, stdout: str, stderr: str, terminal: bool = False) -> FIFOSet:
    """The set a task was created with, as Tasks.Get reports it (cio.Load)."""
    return FIFOSet(stdin, stdout, stderr, terminal, None)


def make_fifo(path: str) -> None:
    try:
        os.mkfifo(path, 0o700)
    except FileExistsError:
        if not is_fifo(path):
            raise


# --- low-level async helpers ----------------------------------------------------------

async def _ready(fd: int, *, write: bool = False) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def _pollable(fd: int) -> bool:
    """Whether epoll can watch ``fd`` (not so for regular files and /dev/null)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return False
    import select

    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN | select.EPOLLOUT)
    except OSError:
        return False
    finally:
        ep.close()
    return True


async def write_all(fd: int, data: bytes) -> None:
    """Write everything, waiting (not spinning) when a non-blocking target is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _ready(fd, write=True)
            continue
        except InterruptedError:
            continue
        view = view[n:]


async def read_chunk(fd: int, pollable: bool) -> bytes:
    """One read of up to CHUNK bytes; b"" at EOF."""
    while True:
        if pollable:
            await _ready(fd)
        else:
            # A regular file (or /dev/null) never makes us wait; let the loop breathe.
            await asyncio.sleep(0)
        try:
            return os.read(fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            continue


async def open_fifo_writer(path: str) -> int:
    """A non-blocking writer of a FIFO, once some reader (the shim) has it open."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
    # No reader yet: a blocking open waits for one, in a thread of its own (a daemon
    # one, so a shim that never comes cannot hold up the program's exit).
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def deliver(fd: int) -> None:
        if done.cancelled():
            os.close(fd)
        else:
            done.set_result(fd)

    def fail(exc: BaseException) -> None:
        if not done.cancelled():
            done.set_exception(exc)

    def opener() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fail, exc)
            return
        try:
            loop.call_soon_threadsafe(deliver, fd)
        except RuntimeError:  # the loop is gone
            os.close(fd)

    thread = threading.Thread(target=opener, name=f"fifo-open {path}", daemon=True)
    thread.start()
    try:
        fd = await done
    except asyncio.CancelledError:
        # Release the thread: with a reader present its open completes.
        with contextlib.suppress(OSError):
            release = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            thread.join(5)
            os.close(release)
        raise
    os.set_blocking(fd, False)
    return fd


# --- copying --------------------------------------------------------------------------

class Copier:
    """Copies between a FIFO set and the caller's fds, from ``async with`` to its end.

    ``stdin``/``stdout``/``stderr`` are the caller's fds (None: not copied). Stdin is
    copied only once :meth:`attach_stdin` is called (after Create or Exec), since its
    EOF must reach the process through Tasks.CloseIO. ``wait`` returns when the output
    FIFOs reached EOF.
    """

    def __init__(self, fifos: FIFOSet, *, stdin: int | None = 0, stdout: int | None = 1,
                 stderr: int | None = 2) -> None:
        self.fifos = fifos
        self._src = stdin
        self._outputs: list[tuple[str, int]] = []
        if fifos.stdout and stdout is not None:
            self._outputs.append((fifos.stdout, stdout))
        if fifos.stderr and not fifos.terminal and stderr is not None:
            self._outputs.append((fifos.stderr, stderr))
        self._fds: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._outputs_done: asyncio.Future[None] | None = None
        self.stdin_closed = asyncio.Event()

    async def __aenter__(self) -> Copier:
        for p in self.fifos.paths():
            make_fifo(p)
        loop = asyncio.get_running_loop()
        self._outputs_done = loop.create_future()
        copies = []
        try:
            for path, dst in self._outputs:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds.append(fd)
                copies.append(self._copy_out(fd, dst))
        except BaseException:
            self._close_fds()
            raise
        self._tasks.append(loop.create_task(self._all_outputs(copies)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def attach_stdin(self, close_stdin: Closer | None = None) -> None:
        """Start copying the caller's stdin; at its EOF, close the FIFO and call
        ``close_stdin`` (Tasks.CloseIO)."""
        if self._src is None or not self.fifos.stdin:
            return
        self._tasks.append(asyncio.get_running_loop().create_task(
            self._copy_in(self._src, self.fifos.stdin, close_stdin)))

    async def wait(self) -> None:
        """Until every output FIFO reached EOF."""
        assert self._outputs_done is not None, "use the Copier in `async with`"
        await asyncio.shield(self._outputs_done)

    async def _all_outputs(self, copies: Sequence[Awaitable[None]]) -> None:
        try:
            await asyncio.gather(*copies)
        finally:
            if self._outputs_done is not None and not self._outputs_done.done():
                self._outputs_done.set_result(None)

    async def _copy_out(self, src: int, dst: int) -> None:
        sink_ok = True
        while True:
            data = await read_chunk(src, True)
            if not data:
                return
            if not sink_ok:
                continue  # keep draining so the shim is never stuck on a full FIFO
            try:
                await write_all(dst, data)
            except OSError as e:
                # Our stdout went away (EPIPE): drop output, as the process goes on.
                _log.debug("output copy: %s", e)
                sink_ok = False

    async def _copy_in(self, src: int, path: str, close_stdin: Closer | None) -> None:
        writer = await open_fifo_writer(path)
        self._fds.append(writer)
        pollable = _pollable(src)
        try:
            while True:
                try:
                    data = await read_chunk(src, pollable)
                except OSError as e:
                    # A closed stdin (EBADF), or a terminal we may not read (EIO): EOF.
                    _log.debug("stdin: %s", e)
                    break
                if not data:
                    break
                try:
                    await write_all(writer, data)
                except BrokenPipeError:
                    break  # nobody reads the process's stdin any more
        finally:
            self._fds.remove(writer)
            os.close(writer)
        self.stdin_closed.set()
        if close_stdin is not None:
            try:
                await close_stdin()
            except Exception as e:  # noqa: BLE001 - the process may be gone already
                _log.debug("close stdin: %s", e)


# --- terminals ----------------------------------------------------------------------

def terminal_fd(candidates: tuple[int, ...] = (0, 1, 2)) -> int | None:
    """The first of the caller's stdio fds that is a terminal (console.Current)."""
    for fd in candidates:
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                return fd
    return None


def make_raw(attrs: list) -> list:
    """cfmakeraw, as containerd's console package sets a terminal raw."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB)
    cflag |= termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


@contextlib.contextmanager
def raw_terminal(fd: int | None) -> Iterator[None]:
    """The terminal in raw mode for the duration, restored however we leave."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    termios.tcsetattr(fd, termios.TCSANOW, make_raw(saved))
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)


async def forward_resizes(fd: int | None, resize: Resizer) -> None:
    """Send the terminal's size now and after every SIGWINCH; runs until cancelled."""
    if fd is None:
        return
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    loop.add_signal_handler(signal.SIGWINCH, changed.set)
    try:
        while True:
            try:
                size = os.get_terminal_size(fd)
            except OSError as e:
                _log.debug("terminal size: %s", e)
            else:
                try:
                    await resize(size.columns, size.lines)
                except Exception as e:  # noqa: BLE001 - as ctr, a failed resize is logged
                    _log.warning("resize pty: %s", e)
            await changed.wait()
            changed.clear()
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
