"""Running a shim binary: its name, and the ``start`` and ``delete`` actions.

This is containerd's runtime/v2 binary.go and shim/util.go: the runtime
``io.containerd.runc.v2`` is served by the binary ``containerd-shim-runc-v2``, found
beside the runtime name (a path), on $PATH, or beside the running program. Both actions
run in the bundle directory with ``-namespace``, ``-address`` (berthd's gRPC socket) and
``-publish-binary`` flags and ``TTRPC_ADDRESS`` (where the shim forwards its events) in
the environment, each in its own process group so a signal to berthd's group does not
reach it.

- ``start`` gets the runtime options (a serialized Any) on stdin, forks the long-lived
  shim and prints the shim's ttrpc address.
- ``delete`` cleans up after a shim that is gone and prints a DeleteResponse protobuf.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, log
from berth.core.api.containerd.task.v2 import DeleteResponse
from berth.core.oci.reaper import Exit
from berth.core.runtime.bundle import Bundle, go_error

SHIM_BINARY_FORMAT = "containerd-shim-{}-{}"
TTRPC_ADDRESS_ENV = "TTRPC_ADDRESS"
OWN_SHIM = "containerd-shim-berth-v1"


def binary_name(runtime: str) -> str:
    """``io.containerd.runc.v2`` → ``containerd-shim-runc-v2``; "" if not such a name."""
    parts = runtime.split(".")
    if len(parts) < 2:
        return ""
    return SHIM_BINARY_FORMAT.format(parts[-2], parts[-1])


def binary_path(runtime: str) -> str:
    """The shim binary next to a runtime given as a path (containerd's BinaryPath)."""
    return os.path.abspath(os.path.join(os.path.dirname(runtime), binary_name(runtime)))


class RuntimeResolver:
    """containerd's resolveRuntimePath, with its per-name cache."""

    def __init__(self, search_path: str | None = None) -> None:
        self._cache: dict[str, str] = {}
        self.search_path = search_path  # None: $PATH at lookup time

    def resolve(self, runtime: str) -> str:
        if runtime == "":
            raise errdefs.Unknown("no runtime name", raw=True)
        if os.path.isabs(runtime):
            try:
                os.stat(runtime)
            except OSError as e:
                raise errdefs.Unknown(
                    f"invalid custom binary path: {go_error('stat', runtime, e)}", raw=True
                ) from None
            return runtime
        name = binary_name(runtime)
        if name == "":
            raise errdefs.Unknown(
                f"invalid runtime name {runtime}, correct runtime name should be either "
                "format like `io.containerd.runc.v1` or a full path to the binary", raw=True,
            )
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        path = binary_path(runtime)
        if not os.path.exists(path):
            path = shutil.which(name, path=self.search_path) or ""
        if not path:
            # Beside the running program: berth's own shim lives in the same bin dir.
            beside = os.path.join(os.path.dirname(sys.executable), name)
            if os.path.exists(beside):
                path = beside
        if not path:
            raise errdefs.Unknown(
                f'runtime "{runtime}" binary not installed "{name}": file does not exist',
                raw=True,
            )
        path = os.path.abspath(path)
        return self._cache.setdefault(name, path)


def is_own_shim(path: str) -> bool:
    """Whether ``path`` is this installation's ``containerd-shim-berth-v1``, whose start
    berthd may do itself (unless ``BERTH_SHIM_ZYGOTE=0`` turns zygotes off)."""
    if os.path.basename(path) != OWN_SHIM or os.environ.get("BERTH_SHIM_ZYGOTE", "1") == "0":
        return False
    try:
        return os.path.samefile(path, Path(sys.executable).with_name(OWN_SHIM))
    except OSError:
        return False


def publish_binary() -> str:
    """What shims are told to run to publish events: berthd's own entry point."""
    beside = Path(sys.executable).with_name("berthd")
    if beside.exists():
        return str(beside)
    return shutil.which("berthd") or os.path.abspath(sys.argv[0])


@dataclass
class ShimBinary:
    """One runtime binary bound to one bundle and to berthd's addresses."""

    runtime: str
    bundle: Bundle
    address: str
    ttrpc_address: str
    debug: bool = False

    def _argv(self, *args: str) -> list[str]:
        return [self.runtime, "-namespace", self.bundle.namespace, "-address", self.address,
                "-publish-binary", publish_binary(), *args]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "GOMAXPROCS": "2", TTRPC_ADDRESS_ENV: self.ttrpc_address}

    async def start(self, options: AnyMsg | None) -> str:
        """Run ``start``; the shim's address (``unix://...``)."""
        lg = log.get("runtime", namespace=self.bundle.namespace, id=self.bundle.id)
        if is_own_shim(self.runtime):
            address = await self._start_through_zygote(options)
            if address is not None:
                lg.debug("shim started through its zygote", address=address)
                return address
        lg.debug("running the shim's start action", binary=self.runtime)
        args = ["-id", self.bundle.id]
        if self.debug:
            args.append("-debug")
        args.append("start")
        try:
            returncode, output = await _run_combined(
                self._argv(*args), cwd=str(self.bundle.path), env=self._env(),
                stdin=bytes(options) if options is not None else b"",
            )
        except OSError as e:
            raise errdefs.Unknown(f"start failed: {go_error('fork/exec', self.runtime, e)}",
                                  raw=True) from None
        out = output.decode(errors="replace")
        if returncode != 0:
            raise errdefs.Unknown(f"start failed: {out}: {_exit_text(returncode)}", raw=True)
        return out.strip()

    async def _start_through_zygote(self, options: AnyMsg | None) -> str | None:
        """berth's own shim: the start action's steps done here, the shim forked by the
        warm zygote (``berth.core.shim.handover``).

        Saves an interpreter start per container; None when no zygote runs yet (the
        binary's ``start`` forks one) or the request failed in a way ``start`` reports
        better. The steps are quick syscalls on the state folder and run inline; the
        wait for the zygote's fork is a trio socket.
        """
        from berth.core.shim import handover

        flags = handover.Flags(namespace=self.bundle.namespace, id=self.bundle.id,
                                 address=self.address, publish_binary=publish_binary(),
                                 debug=self.debug)
        bundle = str(self.bundle.path)
        lg = log.get("runtime", namespace=self.bundle.namespace, id=self.bundle.id)
        try:
            address, listener = handover.claim(flags, bundle)
        except (OSError, ValueError) as e:
            # The start action meets the same trouble and words it for the client.
            lg.debug("claiming the shim socket failed; running start", error=str(e))
            return None
        if listener is None:
            return address  # the group's shim serves already
        try:
            pid = await _ask_zygote(handover.zygote_path(self.address),
                                    handover.serve_request(flags, bundle, self._env()), listener)
        except BaseException as e:
            handover.release(address, listener)
            if isinstance(e, (OSError, RuntimeError, trio.TooSlowError)):
                lg.warning("starting the shim through its zygote failed; running start",
                           error=str(e))
                return None
            raise
        if pid is None:
            handover.release(address, listener)
            return None
        listener.close()
        handover.settle(pid, bytes(options) if options is not None else b"",
                     parent=os.getpid(), follow=True)
        return address

    async def delete(self) -> Exit:
        """Run ``delete`` for a shim that is gone, then remove the bundle."""
        lg = log.get("runtime", namespace=self.bundle.namespace, id=self.bundle.id)
        lg.info("cleaning up dead shim")
        try:
            done = await trio.run_process(
                self._argv("-id", self.bundle.id, "-bundle", str(self.bundle.path), "delete"),
                cwd=self.bundle.path, env=self._env(), stdin=b"", capture_stdout=True,
                capture_stderr=True, check=False, process_group=0,
            )
        except OSError as e:
            raise errdefs.Unknown(go_error("fork/exec", self.runtime, e), raw=True) from None
        err = done.stderr.decode(errors="replace")
        if done.returncode != 0:
            lg.error("failed to delete", error=err, rc=done.returncode)
            raise errdefs.Unknown(f"{err}: {_exit_text(done.returncode)}", raw=True)
        if err:
            lg.warning("cleanup warnings", warnings=err)
        try:
            resp = DeleteResponse().parse(done.stdout)
        except Exception as e:  # betterproto raises several types on garbage
            raise errdefs.Unknown(f"shim delete: bad response: {e}", raw=True) from None
        await trio.to_thread.run_sync(self.bundle.delete)
        return Exit(pid=resp.pid, status=resp.exit_status, exited_at=resp.exited_at)


# How long a cancelled action may take to end on SIGTERM before it gets SIGKILL
# (trio.run_process's default).
_TERM_GRACE = 5.0


async def _run_combined(argv: list[str], *, cwd: str, env: dict[str, str], stdin: bytes
                        ) -> tuple[int, bytes]:
    """Run ``argv`` in its own process group with ``stdin`` fed to it; its exit code and
    its stdout and stderr together (Go's CombinedOutput), as trio.run_process would.

    ``Popen`` runs here rather than in a worker thread (trio.run_process's way): Python
    starts the child with vfork, so the loop waits until the child has exec'd (~0.2 ms
    here, ~1 ms at worst under load), and the thread hop with the GIL hand-offs around
    it, the process object's tasks and their nursery cost more CPU than that: 570 ->
    290 us per start (and with only Popen left in a thread, ~450). A cancel ends the
    process as trio.run_process does: SIGTERM, SIGKILL after ``_TERM_GRACE``.
    """
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    try:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        os.close(in_r)
        os.close(in_w)
        raise
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=in_r, stdout=out_w,
                                stderr=out_w, process_group=0)
    except BaseException:
        for fd in (in_w, out_r):
            os.close(fd)
        raise
    finally:
        os.close(in_r)
        os.close(out_w)
    try:
        pidfd = os.pidfd_open(proc.pid)
    except BaseException:
        os.close(in_w)
        os.close(out_r)
        _kill_and_reap(proc)
        raise
    try:
        stdin_stream = trio.lowlevel.FdStream(in_w)  # non-blocking from here on
        stdout_stream = trio.lowlevel.FdStream(out_r)
        try:
            async with stdin_stream, stdout_stream:
                # Runtime options are small: the pipe takes them at once, no feeding task.
                rest = stdin[_write_some(in_w, stdin):]
                output = await _exchange(stdin_stream, stdout_stream, rest)
                await trio.lowlevel.wait_readable(pidfd)
        except BaseException:
            with trio.CancelScope(shield=True):
                await _end(proc, pidfd)
            raise
        return proc.wait(), output
    finally:
        os.close(pidfd)


def _write_some(fd: int, data: bytes) -> int:
    """What a non-blocking pipe took of ``data`` (all of it if the reader is gone)."""
    if not data:
        return 0
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
    except BrokenPipeError:
        return len(data)  # the process closed its stdin without reading it


async def _exchange(stdin: trio.lowlevel.FdStream, stdout: trio.lowlevel.FdStream,
                    data: bytes) -> bytes:
    """Feed ``data`` to the process and read its output to the end."""
    chunks: list[bytes] = []

    async def read_all() -> None:
        while chunk := await stdout.receive_some(65536):
            chunks.append(chunk)

    async def feed() -> None:
        try:
            await stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the process closed its stdin without reading all of it
        await stdin.aclose()

    if not data:
        await stdin.aclose()
        await read_all()
    else:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            await read_all()
    return b"".join(chunks)


async def _end(proc: subprocess.Popen[bytes], pidfd: int) -> None:
    """SIGTERM, SIGKILL after ``_TERM_GRACE``, and reap."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.terminate()
        with trio.move_on_after(_TERM_GRACE):
            await trio.lowlevel.wait_readable(pidfd)
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            await trio.lowlevel.wait_readable(pidfd)
    proc.wait()


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()


async def _ask_zygote(path: str, payload: bytes, listener: socket.socket) -> int | None:
    """``berth.core.shim.handover.request`` on a trio socket: the zygote's shim pid, None
    when no zygote listens or it gave no usable answer."""
    from berth.core.shim import handover

    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with s:
        try:
            await s.connect(path)
        except OSError:
            return None
        with trio.fail_after(handover.REQUEST_TIMEOUT):
            await s.sendmsg([payload], handover.passing(listener))
            reply = await s.recv(handover.REPLY_MAX)
    return handover.read_reply(reply)


def _exit_text(returncode: int) -> str:
    # Go's *exec.ExitError wording.
    if returncode < 0:
        name = signal.strsignal(-returncode) or f"signal {-returncode}"
        return f"signal: {name[:1].lower()}{name[1:]}"
    return f"exit status {returncode}"


def now() -> datetime:
    return datetime.now(UTC)
