"""A warm, forking parent for shims: each ``start`` costs a fork, not an interpreter.

A shim needs trio, the ttrpc stack and the generated API: a quarter of a second of
imports in CPython, paid on containerd's critical path by every container. The first
``start`` for a daemon (socket directory) therefore forks a zygote that imports all
of it once, freezes the heap (``gc.freeze``: the collector never touches those pages
again, so forked shims keep sharing them), and then forks one ready-to-serve shim per
request. Later ``start`` actions send their request (flags, working directory,
environment and the listening socket, over SCM_RIGHTS) to the zygote's socket.

The zygote is not needed for correctness: when it cannot be reached, ``start`` forks
the shim itself. It exits after ``IDLE_TIMEOUT`` without requests, when its socket
file disappears or is replaced (its daemon's folder was removed), or on SIGTERM; the
shims it forked live on without it.

The zygote's socket name carries a digest of the interpreter and of the shim's code,
so a zygote never serves code older than the files on disk.
"""

from __future__ import annotations

import array
import contextlib
import errno
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import time

from core.shim import address as addr

IDLE_TIMEOUT = 600.0
POLL_INTERVAL = 0.25
REQUEST_TIMEOUT = 30.0
_MAX_REQUEST = 1 << 20

# Code the shims run: a change to any of these files means a new zygote.
_CODE_DIRS = ("core/shim", "core/ttrpc", "core/oci", "core/events", "plugins/runtimes/ocicli",
              "plugins/runtimes/inprocess")
_PRELOAD = (
    "core.shim.serve", "core.shim.oom", "core.mount", "core.api.containerd.runc.v1",
    "plugins.runtimes.ocicli",
)
_OPTIONAL_PRELOAD = ("plugins.runtimes.inprocess",)


def code_key() -> str:
    """A digest of the interpreter and the shim's source files (names, sizes, mtimes)."""
    h = addr.sha256(os.path.realpath(sys.executable).encode() + sys.version.encode())
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for rel in _CODE_DIRS:
        directory = os.path.join(top, rel)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".py"):
                continue
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(directory, name))
                h.update(f"{rel}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def zygote_path(daemon_address: str) -> str:
    name = f"zygote-{code_key()}"
    path = os.path.join(addr.socket_dir(daemon_address), name)
    if len(path) > addr.SOCKET_PATH_LIMIT:
        path = os.path.join(addr.FALLBACK_SOCKET_DIR, name)
    return path


# -- the requesting side (the ``start`` action) ---------------------------------------------


def make_request(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    return json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()


def request(path: str, payload: bytes, listener: socket.socket,
            timeout: float = REQUEST_TIMEOUT) -> int | None:
    """Ask the zygote at ``path`` for a shim; its pid, or None when no zygote answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError:
            return None
        fds = array.array("i", [listener.fileno()])
        s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        reply = s.recv(4096)
    except OSError:
        return None
    finally:
        s.close()
    try:
        answer = json.loads(reply)
    except ValueError:
        return None
    if "error" in answer:
        raise RuntimeError(f"zygote: {answer['error']}")
    pid = answer.get("pid")
    return pid if isinstance(pid, int) and pid > 0 else None


def fork_zygote(path: str, first_request: bytes, listener: socket.socket) -> int | None:
    """Fork a zygote that serves ``first_request`` at once; the first shim's pid.

    The zygote is detached (own session, stdio on /dev/null: containerd collects the
    ``start`` action's output until every holder closes it).
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the zygote
        code = 1
        try:
            os.close(r)
            _detach()
            code = _zygote(path, first_request, listener, w)
        except BaseException:  # noqa: B036 - nothing may escape a forked child
            pass
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = b""
        while True:
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    # The zygote forked the shim; reap nothing here: the zygote lives on, the start
    # process exits and the zygote re-parents to init.
    try:
        first = int(data.decode() or "0")
    except ValueError:
        first = 0
    return first or None


# -- the zygote ------------------------------------------------------------------------------


def _detach() -> None:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    os.chdir("/")


def preload() -> None:
    """Import and warm everything a shim uses, so that a fork is ready to serve."""
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    for name in _OPTIONAL_PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    with contextlib.suppress(Exception):
        # Locating libc runs ``ldconfig -p``: once here rather than in every shim.
        from core.oci.libc import load_libc

        load_libc()
    # betterproto builds each message class's field tables on first use.
    import betterproto

    from core.api.containerd import events
    from core.api.containerd.services.events.ttrpc import v1 as ttrpc_events
    from core.api.containerd.task import v2 as task

    for module in (task, events, ttrpc_events):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, betterproto.Message) \
                    and value is not betterproto.Message:
                with contextlib.suppress(Exception):
                    value().parse(bytes(value()))
    from core.events import typeurl

    typeurl.name_of(events.TaskExit())


def _listen(path: str) -> socket.socket | None:
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    for _ in range(2):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(path)
            s.listen(64)
            return s
        except OSError as exc:
            s.close()
            if exc.errno != errno.EADDRINUSE:
                return None
        finally:
            os.umask(old)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
            return None  # another zygote serves this path
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            probe.close()
    return None


def _zygote(path: str, first_request: bytes, listener: socket.socket, report_fd: int) -> int:
    server = _listen(path)
    inode = os.stat(path).st_ino if server is not None else 0
    preload()
    gc.collect()
    gc.freeze()
    children: set[int] = set()
    listener_fd = listener.detach()
    try:
        pid = _spawn_shim(json.loads(first_request), listener_fd, [server, report_fd])
        children.add(pid)
        os.write(report_fd, str(pid).encode())
    finally:
        os.close(report_fd)
        os.close(listener_fd)
    if server is None:
        return 0
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    last = time.monotonic()
    try:
        while not stop:
            try:
                ready, _, _ = select.select([server], [], [], POLL_INTERVAL)
            except InterruptedError:
                ready = []
            _reap(children)
            if ready:
                _serve_one(server, children)
                last = time.monotonic()
            if time.monotonic() - last > IDLE_TIMEOUT:
                break
            try:
                if os.stat(path).st_ino != inode:
                    break
            except FileNotFoundError:
                break
    finally:
        server.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)
    return 0


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)


def _peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


def _serve_one(server: socket.socket, children: set[int]) -> None:
    try:
        conn, _ = server.accept()
    except OSError:
        return
    fds: list[int] = []
    with conn:
        conn.settimeout(5)
        try:
            if _peer_uid(conn) != os.geteuid():
                return
            msg, ancdata, _, _ = conn.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(data[: len(data) - len(data) % got.itemsize])
                    fds.extend(got)
            if len(fds) != 1:
                conn.send(json.dumps({"error": "expected one listening socket"}).encode())
                return
            pid = _spawn_shim(json.loads(msg), fds[0], [server, conn])
            children.add(pid)
            conn.send(json.dumps({"pid": pid}).encode())
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"error": str(exc)}).encode())
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _spawn_shim(req: dict, listener_fd: int, close: list[socket.socket | int | None]) -> int:
    """Fork a shim serving on ``listener_fd`` (which the child takes over)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for item in close:
            if isinstance(item, socket.socket):
                item.close()
            elif item is not None:
                os.close(item)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        from core.shim import flags as shim_flags, serve

        listener = socket.socket(fileno=listener_fd)
        code = serve.run(shim_flags.parse(req["argv"]), listener)
    except BaseException:  # noqa: B036 - nothing may escape a forked child
        pass
    finally:
        os._exit(code)


def stop(path: str, timeout: float = 5.0) -> int:
    """SIGTERM the zygote listening at ``path`` and wait for it; its pid (0: none)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", raw)[0]
    except OSError:
        return 0
    finally:
        s.close()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.01)
    return pid
