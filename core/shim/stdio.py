"""A container process's stdio as containerd hands it to a shim.

containerd names each stream by a path or URI in the task request (pkg/process/io.go):
a FIFO path (the usual case, created by the client's cio), ``file://<path>`` (both
output streams appended to one file) or ``binary://<path>?k=v`` (a logging driver
binary that gets the output pipes as fds 3 and 4 and signals readiness on fd 5). An
empty set means /dev/null. With ``terminal`` the container gets a pty instead, whose
master the OCI runtime sends back over a console socket; the shim then copies
stdin → master → stdout.

The shim sits between the container and those targets with pipes of its own, so a
client may come and go without the container seeing EPIPE: an output FIFO is opened
read-write (a writer that never blocks on open and never gets EPIPE), and the stdin
FIFO is held open for writing by the shim until CloseIO, so the container sees EOF
only when asked to.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import stat
import struct
import tempfile
import termios
import urllib.parse
from dataclasses import dataclass

import trio

from berth.core import errdefs, log
from berth.core.oci.reaper import Reaper
from berth.core.oci.runtime import Stdio

_CHUNK = 32 * 1024
# How long Delete waits for output still being copied (pkg/process waitTimeout).
DRAIN_TIMEOUT = 2.0
# A logging binary gets this long to exit after SIGTERM before it is killed.
BINARY_STOP_TIMEOUT = 12.0


@dataclass(frozen=True)
class StdioPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


def scheme_of(uri: str) -> tuple[str, urllib.parse.ParseResult]:
    parsed = urllib.parse.urlparse(uri)
    return (parsed.scheme or "fifo"), parsed


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def _close(fd: int | None) -> None:
    """Close an fd some task may be waiting on (trio must be told first)."""
    if fd is None or fd < 0:
        return
    with contextlib.suppress(RuntimeError):
        trio.lowlevel.notify_closing(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


async def _wait_readable(fd: int, stop: trio.Event | None) -> None:
    if stop is None:
        await trio.lowlevel.wait_readable(fd)
        return
    async with trio.open_nursery() as nursery:
        async def cancel_on_stop() -> None:
            await stop.wait()
            nursery.cancel_scope.cancel()
        nursery.start_soon(cancel_on_stop)
        await trio.lowlevel.wait_readable(fd)
        nursery.cancel_scope.cancel()


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        view = view[n:]


async def copy_fd(src: int, dst: int, *, stop: trio.Event | None = None) -> None:
    """Copy until EOF (or EIO: a pty whose other side is gone) on ``src``.

    With ``stop`` set, what is already readable is copied and then the copy ends even
    without EOF: a pty master stays open while any process holds the slave. An fd
    closed under the copy (see ``_close``) ends it too.
    """
    try:
        while True:
            try:
                data = os.read(src, _CHUNK)
            except BlockingIOError:
                if stop is not None and stop.is_set():
                    return
                await _wait_readable(src, stop)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            try:
                await _write_all(dst, data)
            except (BrokenPipeError, ConnectionResetError):
                return
    except trio.ClosedResourceError:
        return


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def open_output(path: str) -> int:
    """A non-blocking writer for an output target (FIFO or regular file)."""
    if _is_fifo(path):
        # Read-write: never blocks for a reader, never EPIPE when the client leaves.
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def open_stdin(path: str) -> tuple[int, int]:
    """(reader, keep-open writer) of a stdin FIFO; close the writer for CloseIO."""
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        os.close(reader)
        raise
    return reader, writer


class ProcessIO:
    """Pipes (or a logging binary) between a container process and its stdio targets."""

    def __init__(self, paths: StdioPaths, *, container_id: str, namespace: str,
                 reaper: Reaper, uid: int = 0, gid: int = 0) -> None:
        self.paths = paths
        self._id = container_id
        self._namespace = namespace
        self._reaper = reaper
        self._uid, self._gid = uid, gid
        self._child: list[int | None] = [None, None, None]  # the container's ends
        self._ours: list[int | None] = [None, None, None]   # the shim's ends
        self._stdin_keep: int | None = None
        self._targets: list[int] = []
        self._copy = False
        self._binary_pid = 0
        self._outputs_done = trio.Event()
        self._scopes: list[trio.CancelScope] = []
        self._log = log.get("shim.io", namespace=namespace, id=container_id)

    # -- setting up ------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pipes the runtime gives the container (before create/exec)."""
        paths = self.paths
        if paths.is_null():
            self._outputs_done.set()
            return
        scheme, parsed = scheme_of(paths.stdout)
        if scheme == "fifo":
            self._copy = True
            self._pipes(stdin=bool(paths.stdin), stdout=bool(paths.stdout),
                        stderr=bool(paths.stderr))
        elif scheme == "file":
            target = parsed.path
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                             0o644))
            self.paths = StdioPaths(paths.stdin, target, target, paths.terminal)
            self._copy = True
            self._pipes(stdin=bool(paths.stdin), stdout=True, stderr=True)
        elif scheme == "binary":
            await self._start_binary(parsed)
        else:
            raise errdefs.InvalidArgument(f"unknown STDIO scheme {scheme}", raw=True)

    def _pipes(self, *, stdin: bool, stdout: bool, stderr: bool) -> None:
        for index, wanted in enumerate((stdin, stdout, stderr)):
            if not wanted:
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            child, ours = (r, w) if index == 0 else (w, r)
            self._child[index], self._ours[index] = child, ours
            if self._uid or self._gid:
                os.fchown(child, self._uid, self._gid)

    async def _start_binary(self, uri: urllib.parse.ParseResult) -> None:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        args = []
        for key, values in urllib.parse.parse_qs(uri.query, keep_blank_values=True).items():
            args.append(key)
            if values and values[0]:
                args.append(values[0])
        binary = uri.path
        if os.sep not in binary:
            binary = shutil.which(binary) or binary
        env = {"CONTAINER_ID": self._id, "CONTAINER_NAMESPACE": self._namespace}
        try:
            pid = os.posix_spawn(
                binary, [binary, *args], env,
                file_actions=[(os.POSIX_SPAWN_DUP2, out_r, 3),
                              (os.POSIX_SPAWN_DUP2, err_r, 4),
                              (os.POSIX_SPAWN_DUP2, ready_w, 5)],
                setsigdef=(signal.SIGPIPE,), setsigmask=(),
            )
        except OSError as exc:
            for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
                os.close(fd)
            raise errdefs.Unknown(f"failed to start binary process: {exc}", raw=True) from exc
        self._binary_pid = pid
        os.close(out_r)
        os.close(err_r)
        os.close(ready_w)
        try:
            _set_nonblocking(ready_r)
            while True:
                try:
                    os.read(ready_r, 1)  # one byte, or EOF when it exits: both mean go
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(ready_r)
        finally:
            os.close(ready_r)
        self._child[1], self._child[2] = out_w, err_w
        self._outputs_done.set()

    def container_stdio(self) -> Stdio:
        return Stdio(*self._child)

    def close_after_start(self) -> None:
        """The container has its ends now; holding them would hide EOF from the copies."""
        for i in range(3):
            _close(self._child[i])
            self._child[i] = None

    async def start_copy(self, nursery: trio.Nursery) -> None:
        """Open the targets and copy in ``nursery`` (which outlives the request)."""
        if not self._copy:
            return
        outputs: list[tuple[int, int]] = []
        try:
            for index, path in ((1, self.paths.stdout), (2, self.paths.stderr)):
                src = self._ours[index]
                if src is None:
                    continue
                dst = open_output(path)
                self._targets.append(dst)
                _set_nonblocking(src)
                outputs.append((src, dst))
            if self._ours[0] is not None and self.paths.stdin:
                reader, self._stdin_keep = open_stdin(self.paths.stdin)
                self._targets.append(reader)
                stdin_w = self._ours[0]
                _set_nonblocking(stdin_w)
                nursery.start_soon(self._copy_stdin, reader, stdin_w, self._new_scope())
        except OSError as exc:
            self.close()
            raise errdefs.Unknown(f"failed to start io pipe copy: {exc}", raw=True) from exc
        nursery.start_soon(self._copy_outputs, outputs, self._new_scope())

    def _new_scope(self) -> trio.CancelScope:
        scope = trio.CancelScope()
        self._scopes.append(scope)
        return scope

    async def _copy_outputs(self, pairs: list[tuple[int, int]], scope: trio.CancelScope
                            ) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    for src, dst in pairs:
                        nursery.start_soon(self._copy_one, src, dst)
        finally:
            self._outputs_done.set()

    async def _copy_one(self, src: int, dst: int) -> None:
        try:
            await copy_fd(src, dst)
        except Exception as exc:  # noqa: BLE001 - one stream failing must not end the shim
            self._log.warning("error copying output", error=str(exc))
        finally:
            # EOF reaches the client only when the last writer, we, closes.
            self._forget(dst)
            self._forget(src)

    async def _copy_stdin(self, reader: int, stdin_w: int, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await copy_fd(reader, stdin_w)
        except Exception as exc:  # noqa: BLE001 - one stream failing must not end the shim
            self._log.debug("stdin copy ended", error=str(exc))
        finally:
            # The container sees EOF on stdin.
            self._forget(stdin_w)
            self._forget(reader)

    def _forget(self, fd: int) -> None:
        if fd in self._targets:
            self._targets.remove(fd)
        for i in range(3):
            if self._ours[i] == fd:
                self._ours[i] = None
        _close(fd)

    # -- during and after ----------------------------------------------------------------

    def close_stdin(self) -> None:
        """CloseIO: stop holding the stdin FIFO open, so EOF follows the client's close."""
        _close(self._stdin_keep)
        self._stdin_keep = None

    async def wait_outputs(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        with trio.move_on_after(timeout):
            await self._outputs_done.wait()
            return True
        return False

    def close(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self.close_after_start()
        self.close_stdin()
        for i in range(3):
            _close(self._ours[i])
            self._ours[i] = None
        for fd in self._targets:
            _close(fd)
        self._targets.clear()

    async def aclose(self) -> None:
        self.close()
        if self._binary_pid:
            pid, self._binary_pid = self._binary_pid, 0
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            with trio.move_on_after(BINARY_STOP_TIMEOUT) as scope:
                await self._reaper.wait(pid)
            if scope.cancelled_caught:
                self._log.warning("logging binary did not exit, killing", pid=pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class ConsoleSocket:
    """A temporary unix socket on which the OCI runtime sends the pty master."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="pty")
        self.path = os.path.join(self._dir, "pty.sock")
        self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def __aenter__(self) -> ConsoleSocket:
        try:
            await self._sock.bind(self.path)
            self._sock.listen(1)
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def receive_master(self, timeout: float = 30.0) -> int:
        """The master fd sent by the runtime (SCM_RIGHTS)."""
        with trio.fail_after(timeout):
            conn, _ = await self._sock.accept()
            with conn:
                fds = array.array("i")
                _, ancdata, _, _ = await conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if not fds:
            raise errdefs.Unknown("console socket: no file descriptor received", raw=True)
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class Console:
    """A pty master: stdin FIFO → master → stdout target, resizable, stopped on exit."""

    def __init__(self, master: int, paths: StdioPaths, *, container_id: str,
                 namespace: str) -> None:
        self.master = master
        self.paths = paths
        self._stdin_keep: int | None = None
        self._fds: list[int] = []
        self._exited = trio.Event()
        self._outputs_done = trio.Event()
        self._log = log.get("shim.console", namespace=namespace, id=container_id)

    async def start_copy(self, nursery: trio.Nursery) -> None:
        _set_nonblocking(self.master)
        try:
            if self.paths.stdin:
                reader, self._stdin_keep = open_stdin(self.paths.stdin)
                self._fds.append(reader)
                nursery.start_soon(self._copy_in, reader)
            if self.paths.stdout:
                scheme, parsed = scheme_of(self.paths.stdout)
                target = parsed.path if scheme == "file" else self.paths.stdout
                dst = open_output(target)
                self._fds.append(dst)
            else:
                dst = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                self._fds.append(dst)
        except OSError as exc:
            self.close()
            raise errdefs.Unknown(f"failed to start console copy: {exc}", raw=True) from exc
        nursery.start_soon(self._copy_out, dst)

    async def _copy_in(self, reader: int) -> None:
        try:
            await copy_fd(reader, self.master, stop=self._exited)
        except Exception as exc:  # noqa: BLE001 - one stream failing must not end the shim
            self._log.debug("console input ended", error=str(exc))

    async def _copy_out(self, dst: int) -> None:
        try:
            await copy_fd(self.master, dst, stop=self._exited)
        except Exception as exc:  # noqa: BLE001 - one stream failing must not end the shim
            self._log.debug("console output ended", error=str(exc))
        finally:
            if dst in self._fds:
                self._fds.remove(dst)
            _close(dst)
            self._outputs_done.set()

    def resize(self, width: int, height: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def size(self) -> tuple[int, int]:
        raw = fcntl.ioctl(self.master, termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols, _, _ = struct.unpack("HHHH", raw)
        return cols, rows

    def shutdown(self) -> None:
        """The process exited: copy what is buffered, then stop."""
        self._exited.set()

    def close_stdin(self) -> None:
        _close(self._stdin_keep)
        self._stdin_keep = None

    async def wait_outputs(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        with trio.move_on_after(timeout):
            await self._outputs_done.wait()
            return True
        return False

    def close(self) -> None:
        self._exited.set()
        self.close_stdin()
        for fd in self._fds:
            _close(fd)
        self._fds.clear()
        _close(self.master)
        self.master = -1

    async def aclose(self) -> None:
        self.close()
