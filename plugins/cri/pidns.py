"""A pod's shared PID namespace without a pause container.

A PID namespace cannot be kept by a bind mount alone: once its PID 1 dies nobody can
enter it again (fork in it fails). So a pod whose sandbox config asks for
``NamespaceOption.pid = POD`` gets a holder, two small processes of util-linux and
coreutils (both Essential in Debian, no Python: ~3 ms to start, ~0.4 MB PSS):
``unshare --pid --fork --kill-child -- env --ignore-signal=CHLD sleep infinity``.
``unshare`` makes the namespace and waits for its child; the child is PID 1 there, a
``sleep`` with SIGCHLD ignored, so the kernel reaps the pod's orphans for it. The
namespace is pinned by a bind mount at ``<pod folder>/pidns``: containers join it by that
path (never ``/proc/<pid>/ns/pid``, which a reused pid could turn into another
process's namespace), whatever runtime handler runs them (berth's shim in-process or
with runc, or runc's v2 shim), as all of them take a namespace path from the OCI spec.

The holder belongs to the pod, not to berthd's lifetime: it runs in a session of its
own and survives a ``kill -9`` of berthd. Both processes carry the pod folder in their
environment (``BERTH_PIDNS_HOLDER``), so berthd finds them again in /proc after a
restart and kills the holders of pods that were stopped, removed, or never recorded (a
berthd killed in RunPodSandbox). Killing PID 1 of a PID namespace makes the kernel kill
everything left in it; killing ``unshare`` kills its child (``--kill-child``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import trio

from berth.core import errdefs, nspin

PIN = "pidns"
MARKER = "BERTH_PIDNS_HOLDER"
# How long a new holder may take to fork its PID 1 (bounds a failure, decides nothing).
START_WAIT = 30.0
# Both are in Essential Debian packages (util-linux, coreutils).
TOOLS = ("unshare", "env", "sleep")


def pin_path(folder: Path | str) -> Path:
    return Path(folder) / PIN


def command() -> list[str]:
    """The holder's command line, with the tools' paths."""
    paths = {}
    for tool in TOOLS:
        found = shutil.which(tool, path=os.environ.get("PATH") or os.defpath)
        if found is None:
            raise errdefs.FailedPrecondition(
                f"{tool!r} not found: a pod that shares its PID namespace needs util-linux's "
                "unshare and coreutils' env and sleep", raw=True)
        paths[tool] = found
    return [paths["unshare"], "--pid", "--fork", "--kill-child", "--",
            paths["env"], "--ignore-signal=CHLD", paths["sleep"], "infinity"]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


async def start(folder: Path) -> tuple[trio.Process, int]:
    """Start the holder of the pod whose state folder is ``folder`` and pin its PID
    namespace at :func:`pin_path`; returns ``unshare`` and PID 1's pid."""
    argv = command()
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, close_fds=True,
        env={"PATH": os.environ.get("PATH") or os.defpath, MARKER: str(folder)})
    try:
        assert proc.stderr is not None
        pid = 0
        with trio.move_on_after(START_WAIT):
            # unshare forks its PID 1 at once; bounded polling, as /proc gives no event.
            while proc.poll() is None and not (kids := _children(proc.pid)):
                await trio.sleep(0.001)
            pid = kids[0] if proc.poll() is None and kids else 0
        if not pid:
            err = b""
            with trio.move_on_after(1):
                err = bytes(await proc.stderr.receive_some(4096))
            raise errdefs.Internal(
                "the pod's PID namespace holder did not start: "
                f"{err.decode(errors='replace').strip() or 'no PID 1 forked'}", raw=True)
        await proc.stderr.aclose()
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


def holder_folder(pid: int) -> str | None:
    """The pod folder a holder process serves, or None when ``pid`` is none of ours."""
    prefix = f"{MARKER}=".encode()
    try:
        # Only berthd's own user's processes: no other user can have one killed.
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return None
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
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


def is_ns_init(pid: int) -> bool:
    """Whether ``pid`` is PID 1 of a PID namespace below ours (the holder's child)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) > 1 and ids[-1] == "1"
    except OSError:
        pass
    return False


def stop(folder: Path | str, pid: int) -> list[int]:
    """End the holder whose PID 1 is ``pid`` (none when 0) and unpin the namespace;
    idempotent; the pids to wait for. Only PID 1 is killed: ``unshare`` reaps it and
    exits by itself (killed first, it would leave PID 1 to whoever adopts orphans).
    Blocking: call it from a thread."""
    folder = str(folder)
    hit = []
    if pid > 0:
        parent = _parent(pid)
        if kill(pid, folder):
            hit.append(pid)
        if parent > 1 and holder_folder(parent) == folder:
            hit.append(parent)
    nspin.unpin(pin_path(folder))
    return hit


def kill_all(found: dict[int, str]) -> None:
    """Kill the holders :func:`find` gave: PID 1 of each (its ``unshare`` follows), or
    a lone process of a pair that lost its other half."""
    inits = {f for p, f in found.items() if is_ns_init(p)}
    for p, f in found.items():
        if is_ns_init(p) or f not in inits:
            kill(p, f)


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
