"""A pod's shared PID namespace without a pause container.

A PID namespace cannot be kept by a bind mount alone: once its PID 1 dies nobody can
enter it again (fork in it fails). So a pod whose sandbox config asks for
``NamespaceOption.pid = POD`` gets a holder: ``pidns_init.py``, a small Python process
started in a session of its own that unshares a PID namespace and forks its PID 1 (it
reaps the pod's orphans and sleeps). The namespace is also pinned by a bind mount at
``<pod folder>/pidns``: containers join it by that path (never ``/proc/<pid>/ns/pid``,
which a reused pid could turn into another process's namespace), whatever runtime
handler runs them (berth's shim in-process or with runc, or runc's v2 shim), because
all of them take a namespace path from the OCI spec.

The holder belongs to the pod, not to berthd's lifetime: it is not in berthd's process
group and survives a ``kill -9`` of berthd. berthd finds it again by its command line
(``pidns_init.py <pod folder>``) in /proc, so a restart kills the holders of pods that
were stopped, removed, or never recorded (a berthd killed in RunPodSandbox). Killing
PID 1 of a PID namespace makes the kernel kill everything left in it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from berth.core import errdefs, nspin

SCRIPT = Path(__file__).with_name("pidns_init.py")
PIN = "pidns"
# How long a new holder may take to say its pid (bounds a failure, decides nothing).
START_WAIT = 30.0


def pin_path(folder: Path | str) -> Path:
    return Path(folder) / PIN


async def start(folder: Path) -> tuple[trio.Process, int]:
    """Start the holder of the pod whose state folder is ``folder`` and pin its PID
    namespace at :func:`pin_path`; returns the waiting parent and PID 1's pid."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-I", "-S", str(SCRIPT), str(folder)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, close_fds=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = b""
        with trio.move_on_after(START_WAIT):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(64)
                if not chunk:
                    break
                line += bytes(chunk)
        await proc.stdout.aclose()
        if not line.strip().isdigit():
            err = b""
            with trio.move_on_after(1):
                err = bytes(await proc.stderr.receive_some(4096))
            raise errdefs.Internal(
                "the pod's PID namespace holder did not start: "
                f"{err.decode(errors='replace').strip() or 'no pid reported'}", raw=True)
        await proc.stderr.aclose()
        pid = int(line)
        await trio.to_thread.run_sync(_pin, pid, pin_path(folder))
    except BaseException:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
            await trio.to_thread.run_sync(nspin.unpin, pin_path(folder))
        raise
    return proc, pid


def _pin(pid: int, path: Path) -> None:
    if not path.exists():
        nspin.placeholder(path)
    nspin.pin_path(f"/proc/{pid}/ns/pid", "pid", path)
    if os.stat(path).st_ino == os.stat("/proc/self/ns/pid").st_ino:
        raise errdefs.Internal("the pod's PID namespace holder shares berthd's", raw=True)


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def holder_folder(pid: int) -> str | None:
    """The pod folder a holder process serves, or None when ``pid`` is none of ours."""
    argv = _argv(pid)
    if len(argv) >= 2 and os.path.basename(argv[-2]) == SCRIPT.name:
        return argv[-1]
    return None


def find(under: Path) -> dict[int, str]:
    """Every holder process (both of each pair) of a pod folder under ``under``."""
    prefix = str(under).rstrip("/") + "/"
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        folder = holder_folder(int(name))
        if folder is not None and folder.startswith(prefix):
            out[int(name)] = folder
    return out


def kill(pid: int, folder: str) -> bool:
    """SIGKILL ``pid`` if it is still the holder of ``folder`` (a pidfd makes the check
    and the signal reach the same process); whether it was."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if holder_folder(pid) != folder:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def stop(folder: Path | str, pid: int) -> list[int]:
    """End the holder ``pid`` of ``folder`` and its waiting parent (none when ``pid`` is
    0), and unpin the namespace; idempotent; the pids signalled. Blocking: call it from
    a thread."""
    folder = str(folder)
    hit = []
    if pid > 0:
        parent = _parent(pid)
        for p in (pid, parent):
            if p > 1 and kill(p, folder):
                hit.append(p)
    nspin.unpin(pin_path(folder))
    return hit


async def wait_gone(pid: int) -> None:
    """Until process ``pid`` has exited (a pidfd turns readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
