"""A warm, forking parent for shims: each ``start`` costs a fork, not an interpreter.

A shim needs trio, the ttrpc stack and the generated API: a quarter of a second of
imports in CPython, paid on containerd's critical path by every container. The first
``start`` for a daemon (socket directory) therefore forks a zygote that imports all
of it once, freezes the heap (``gc.freeze``: the collector never touches those pages
again, so forked shims keep sharing them), forks the first shim, then rehearses
(serves throwaway shims in-process, see ``serve.rehearse``) and freezes again, so that
first-use writes are made once here rather than in every shim. Later ``start``
actions send their request (flags, working directory, environment and the listening
socket, over SCM_RIGHTS) to the zygote's socket; the zygote accepts and forks, and
the child reads the request, answers with its pid and becomes the shim.

Memory: a shim's private memory is the pages it copies from the zygote. The zygote's
loop therefore writes as little as it can between forks (a page the zygote writes
stays behind with the shims forked before). With ``BERTH_SHIM_KSM=1`` its mappings
are offered to KSM, which, where the host enables it, merges the many identical
copies shims make.

The zygote is not needed for correctness: when it cannot be reached, ``start`` forks
the shim itself. It exits after ``IDLE_TIMEOUT`` without requests once its daemon no
longer answers on its socket (``BERTH_SHIM_ZYGOTE_IDLE`` seconds, default 600), when its
socket file disappears or is replaced (its daemon's folder was removed), or on SIGTERM;
the shims it forked live on without it.

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
import time

from berth.core.shim.handover import (  # noqa: F401 - the zygote's side of the hand-over
    REPLY_MAX,
    REQUEST_TIMEOUT,
    code_key,
    make_request,
    passing,
    read_reply,
    zygote_path,
)


def _idle_timeout(default: float = 600.0) -> float:
    try:
        value = float(os.environ.get("BERTH_SHIM_ZYGOTE_IDLE", default))
    except ValueError:
        return default
    return value if value > 0 else default


IDLE_TIMEOUT = _idle_timeout()
POLL_INTERVAL = 1.0
REHEARSAL_ROUNDS = 10
PEEK_TIMEOUT = 5.0  # a client sends its request as it connects
_MAX_REQUEST = 1 << 20

_PRELOAD = (
    "berth.core.shim.serve", "berth.core.shim.oom", "berth.core.mount",
    "berth.core.api.containerd.runc.v1", "berth.core.api.io.containerd.cgroups.v1",
    "berth.core.shim.runtimes",
)


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
        except BaseException as exc:  # noqa: B036 - nothing may escape a forked child
            _report(first_request, "shim zygote failed", exc)
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

    from berth.core.shim import runtimes

    for name in _PRELOAD:
        importlib.import_module(name)
    # The OCI runtimes, as their plugin registrations name them: found once here, and
    # a runtime whose modules do not import here fails in the shim that asks for it.
    for plugin in runtimes.registered():
        for name in plugin.modules():
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    with contextlib.suppress(Exception):
        # Locating libc runs ``ldconfig -p``: once here rather than in every shim.
        from berth.core.oci.libc import load_libc

        load_libc()
    # betterproto builds each message class's field tables on first use.
    import betterproto

    from berth.core.api.containerd import events
    from berth.core.api.containerd.services.events.ttrpc import v1 as ttrpc_events
    from berth.core.api.containerd.task import v2 as task

    for module in (task, events, ttrpc_events):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, betterproto.Message) \
                    and value is not betterproto.Message:
                with contextlib.suppress(Exception):
                    value().parse(bytes(value()))
    from berth.core.events import typeurl

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
    _offer_to_ksm()
    listener_fd = listener.detach()
    try:
        pid = _spawn_shim(json.loads(first_request), listener_fd, [server, report_fd])
        os.write(report_fd, str(pid).encode())
    finally:
        os.close(report_fd)
        os.close(listener_fd)
    if server is None:
        return 0
    # The first shim is on its way; warm the serving path for the later ones. A
    # SIGTERM meanwhile waits (blocked) for the request loop, which ends on it.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        _rehearse()
        _serve_requests(server, path, inode, _daemon_socket(first_request))
    finally:
        server.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)
    return 0


def _rehearse() -> None:
    """Serve throwaway shims here, then freeze what that left (see ``serve.rehearse``).

    A shim's first run through trio, the ttrpc server and client, the publisher and
    the logger specialises bytecode in place, fills caches and builds lazily made
    objects: on pages shared with the zygote, so every shim would copy them. Done once
    here, those writes are shared instead (about 0.7 MB less private memory per shim).
    """
    try:
        from berth.core.shim import serve

        serve.rehearse(REHEARSAL_ROUNDS)
    except Exception:  # noqa: BLE001 - a warm-up only: shims work without it
        pass
    _reap()
    gc.collect()
    gc.freeze()
    _offer_to_ksm()


_MADV_MERGEABLE = 12


def _offer_to_ksm() -> None:
    """Mark the private writable mappings mergeable for KSM (same-page merging).

    Shims are near-identical copies of this process: CPython's reference counting
    makes each write to thousands of the pages it shares with the zygote, mostly to
    the same values in every shim. Where the host runs KSM
    (``/sys/kernel/mm/ksm/run`` = 1) those identical copies are merged again. Only
    mappings that exist now are marked: ``execve`` drops the mark, so containers the
    shims start never inherit it. Opt-in (``BERTH_SHIM_KSM=1`` in the daemon's
    environment), as systemd's ``MemoryKSM=``: merged pages are a timing side channel
    between processes, which an administrator should choose to accept.
    """
    if os.environ.get("BERTH_SHIM_KSM", "0") != "1":
        return
    try:
        import ctypes

        from berth.core.oci.libc import load_libc

        madvise = load_libc()["madvise"]
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except (OSError, AttributeError):
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or fields[1] != "rw-p" or (len(fields) > 5 and fields[5] in (
                "[vsyscall]", "[vvar]", "[vdso]")):
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        madvise(lo, hi - lo, _MADV_MERGEABLE)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _Stop(Exception):
    pass


def _on_term(signum: int, frame: object) -> None:
    raise _Stop


def _daemon_socket(request: bytes) -> str:
    """The socket path of the daemon whose shims a request is for ("" if unknown)."""
    try:
        from berth.core.shim import flags as shim_flags

        return shim_flags.parse(json.loads(request)["argv"]).address.removeprefix("unix://")
    except Exception:  # noqa: BLE001 - only the idle check uses it
        return ""


def daemon_alive(socket_path: str) -> bool:
    """Whether a daemon accepts connections on ``socket_path``."""
    if not socket_path:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(1.0)
    try:
        s.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _serve_requests(server: socket.socket, path: str, inode: int, daemon: str) -> None:
    """Fork a shim per connection until idle, stopped, or the socket file is replaced.

    Idle means ``IDLE_TIMEOUT`` without a request while the daemon is gone: as long as
    the daemon serves, the zygote stays, so that a container started after a quiet
    hour does not pay the imports again (one probe connection per timeout).

    Every page this loop writes after a fork stays with the shims forked before
    (the copy-on-write copy goes to the zygote), so the loop does as little as
    possible: the kernel reaps the shims (SIGCHLD ignored), the collector is off
    (nothing here makes cycles), and the forked child, not the zygote, reads and
    answers the request.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    _reap()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_term)
    gc.disable()
    last = time.monotonic()
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        while True:
            ready, _, _ = select.select([server], [], [], POLL_INTERVAL)
            if ready:
                _fork_for(server)
                last = time.monotonic()
                continue
            if time.monotonic() - last > IDLE_TIMEOUT:
                if not daemon_alive(daemon):
                    return
                last = time.monotonic()
            try:
                if os.stat(path).st_ino != inode:
                    return
            except FileNotFoundError:
                return
    except _Stop:
        return
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _reap() -> None:
    """Collect shims that exited while SIGCHLD was not ignored."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


def _fork_for(server: socket.socket) -> None:
    """Accept one request and fork: the child answers it and becomes the shim."""
    try:
        conn, _ = server.accept()
    except OSError:
        return
    try:
        # A connection that ends without a request (``stop`` asking who listens) gets
        # no child: the peek waits for the request's first byte or the hang-up.
        conn.settimeout(PEEK_TIMEOUT)
        if not conn.recv(1, socket.MSG_PEEK):
            conn.close()
            return
        pid = os.fork()
    except OSError:
        conn.close()
        return
    if pid:
        conn.close()
        return
    code = 1
    received: tuple[dict, int] | None = None
    try:
        server.close()
        _child_signals()
        gc.enable()
        received = _receive_request(conn)
        if received is not None:
            code = _become_shim(*received)
    except BaseException as exc:  # noqa: B036 - nothing may escape a forked child
        # Before the request arrived the requester gets no answer, and berthd logs that
        # with the container's id; after, the shim's own log has it.
        if received is not None:
            _report_dict(received[0], "shim failed", exc)
    finally:
        os._exit(code)


def _receive_request(conn: socket.socket) -> tuple[dict, int] | None:
    """The request on ``conn`` and its listening socket; answered with our pid."""
    fds: list[int] = []
    with conn:
        conn.settimeout(5)
        try:
            if _peer_uid(conn) != os.geteuid():
                return None
            msg, ancdata, _, _ = conn.recvmsg(_MAX_REQUEST, socket.CMSG_SPACE(4 * 4))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(data[: len(data) - len(data) % got.itemsize])
                    fds.extend(got)
            if len(fds) != 1:
                conn.send(json.dumps({"error": "expected one listening socket"}).encode())
                return None
            req = json.loads(msg)
            if not isinstance(req, dict):
                raise ValueError("request is not an object")
            fd = fds.pop()
            conn.send(json.dumps({"pid": os.getpid()}).encode())
            return req, fd
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"error": str(exc)}).encode())
            return None
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _child_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _become_shim(req: dict, listener_fd: int) -> int:
    """Run the shim the request asks for, serving on ``listener_fd``; its exit status."""
    os.setsid()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    from berth.core.shim import flags as shim_flags, serve

    listener = socket.socket(fileno=listener_fd)
    return serve.run(shim_flags.parse(req["argv"]), listener)


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
        _child_signals()
        code = _become_shim(req, listener_fd)
    except BaseException as exc:  # noqa: B036 - nothing may escape a forked child
        _report_dict(req, "shim failed", exc)
    finally:
        os._exit(code)


def _report_dict(req: dict, msg: str, exc: BaseException) -> None:
    """A failure of the shim a request asked for, to that container's log (stderr is
    /dev/null here). A clean exit (SystemExit 0) is no failure."""
    if isinstance(exc, SystemExit) and not exc.code:
        return
    from berth.core.shim import logging as shim_logging

    try:
        argv = [str(a) for a in req.get("argv", [])]
        bundle = str(req.get("cwd", ""))
    except (AttributeError, TypeError):
        return
    namespace, id_ = shim_logging.ids_from_argv(argv)
    if bundle:
        shim_logging.report_failure(bundle, msg, exc, namespace=namespace, id=id_)


def _report(request: bytes, msg: str, exc: BaseException) -> None:
    try:
        req = json.loads(request)
    except ValueError:
        return
    if isinstance(req, dict):
        _report_dict(req, msg, exc)


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
