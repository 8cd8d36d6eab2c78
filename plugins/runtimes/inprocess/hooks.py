"""OCI hooks: programs run with the container's state JSON on stdin.

prestart/createRuntime/poststart/poststop run from the runtime (``run``, async, reaped
through the Reaper). createContainer/startContainer run from inside the container's
namespaces, by the init itself (``run_in_child``, plain syscalls after fork).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from typing import Any

import trio

from berth.core import errdefs
from berth.core.oci.reaper import Reaper
from berth.plugins.runtimes.inprocess import execstub

_OUTPUT_LIMIT = 64 * 1024


def _env(hook: dict[str, Any]) -> dict[str, str]:
    out = {}
    for entry in hook.get("env") or []:
        k, sep, v = entry.partition("=")
        if sep and k:
            out[k] = v
    return out


def _describe(kind: str, hook: dict[str, Any]) -> str:
    return f"{kind} hook {hook.get('path')}"


async def run(kind: str, hooks: list[dict[str, Any]], state: dict[str, Any],
              reaper: Reaper) -> None:
    """Run ``hooks`` one after another; the first failure raises ``Unknown``."""
    payload = json.dumps(state).encode()
    for hook in hooks:
        await _run_one(kind, hook, payload, reaper)


async def _run_one(kind: str, hook: dict[str, Any], payload: bytes, reaper: Reaper) -> None:
    path = hook["path"]
    args = list(hook.get("args") or [path])
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.posix_spawn(
            path, args, _env(hook),
            file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                          (os.POSIX_SPAWN_DUP2, out_w, 2)],
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD),
            setsigmask=(),
        )
    except OSError as e:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        raise errdefs.Unknown(f"{_describe(kind, hook)}: {e.strerror}", raw=True) from None
    os.close(in_r)
    os.close(out_w)
    output = bytearray()
    timeout = hook.get("timeout")
    timed_out = False
    async with trio.lowlevel.FdStream(out_r) as out, trio.lowlevel.FdStream(in_w) as stdin:
        async with trio.open_nursery() as nursery:

            async def feed() -> None:
                try:
                    await stdin.send_all(payload)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the hook need not read its stdin
                await stdin.aclose()

            async def collect() -> None:
                while chunk := await out.receive_some(8192):
                    if len(output) < _OUTPUT_LIMIT:
                        output.extend(chunk[: _OUTPUT_LIMIT - len(output)])
                eof.set()

            eof = trio.Event()

            nursery.start_soon(feed)
            nursery.start_soon(collect)
            with trio.move_on_after(timeout if timeout and timeout > 0 else float("inf")) as cs:
                exit = await reaper.wait(pid)
            if cs.cancelled_caught:
                timed_out = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                exit = await reaper.wait(pid)
            # A daemonised grandchild may keep the output pipe open: do not wait for it.
            with trio.move_on_after(0.5):
                await eof.wait()
            nursery.cancel_scope.cancel()
    text = output.decode(errors="replace").strip()
    if timed_out:
        raise errdefs.Unknown(f"{_describe(kind, hook)}: timeout after {timeout}s", raw=True)
    if exit.status != 0:
        raise errdefs.Unknown(f"{_describe(kind, hook)} exited with status {exit.status}"
                              + (f": {text}" if text else ""), raw=True)


def run_in_child(sc: Any, kind: str, hooks: list[dict[str, Any]], state_json: str, *,
                 exec_fd: int = -1) -> None:
    """Run hooks synchronously from a container process (fork, execve, waitpid); through
    the sealed exec stub ``exec_fd`` when there is one (see ``execstub``)."""
    for hook in hooks:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = sc.fork()
        if pid == 0:
            try:
                sc.dup2(r, 0)
                sc.cloexec_from(3)
                args = list(hook.get("args") or [hook["path"]])
                if exec_fd >= 0:
                    sc.execve(exec_fd, execstub.argv(hook["path"], args), _env(hook))
                else:
                    sc.execve(hook["path"], args, _env(hook))
            finally:
                sc.exit(127)
        sc.close(r)
        try:
            sc.write(w, state_json.encode())
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
        finally:
            sc.close(w)
        timeout = hook.get("timeout")
        deadline = time.monotonic() + timeout if timeout and timeout > 0 else None
        delay = 0.0005
        while True:
            done, status = sc.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() > deadline:
                sc.kill(pid, signal.SIGKILL)
                sc.waitpid(pid, 0)
                raise RuntimeError(f"{_describe(kind, hook)}: timeout after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{_describe(kind, hook)} exited with status "
                               f"{code if code >= 0 else 128 - code}")
