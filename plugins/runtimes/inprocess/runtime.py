"""The in-process OCI runtime: ``Runtime(root, reaper)`` implements ``berth.core.oci.OCIRuntime``.

Containers are made by forking this process (no runc binary, no re-exec of Python): the
spec is parsed, the seccomp program compiled, the cgroup made and every fd opened before
``fork``, so the child only runs ``steps`` over already-imported modules. The parent and
the child talk over a SOCK_SEQPACKET socketpair with one JSON message per step:

    parent -> child  go          (child is in the cgroup)
    child -> parent  userns      (parent writes uid_map/gid_map)   parent -> child  mapped
    child -> parent  pid         (the init's pid as seen from here)
    child -> parent  hooks       (parent runs prestart+createRuntime)  parent -> child  hooked
    child -> parent  ready | error

Children are never waited for here: the Reaper given to the constructor reaps them all
(the init of a double fork is re-parented to this process, a child subreaper).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import signal
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from berth.core import errdefs, log
from berth.core.oci import spec as oci_spec
from berth.core.oci.reaper import Reaper
from berth.core.oci.runtime import State, Stdio
from berth.plugins.runtimes.inprocess import (
    caps,
    cgroups,
    execstub,
    hooks,
    seccomp,
    spec as ispec,
    steps,
    syscalls as sys_,
)
from berth.plugins.runtimes.inprocess.state import ContainerState, StateStore, alive, proc_stat
from berth.plugins.runtimes.inprocess.syscalls import LibcSyscalls, Syscalls

_O_PATH = getattr(os, "O_PATH", 0o10000000)
_GONE_TIMEOUT = 10.0


def _high(fd: int) -> int:
    """``fd`` moved to 3 or above, so dup'ing stdio onto 0-2 in the child cannot clobber it."""
    if fd >= 3:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return new


def _reset_signals() -> None:
    """The child inherits the runtime's Python signal handlers and trio's wakeup fd: a
    signal here must not wake the parent's event loop, and the container starts with
    default dispositions and an empty mask."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) not in (signal.SIG_DFL, None):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _child(entry: Callable[..., bool], sc: Syscalls, plan: Any, fd: int, parent_fd: int
           ) -> None:
    """Runs in the forked child and never returns to the caller's stack."""
    code = 1
    sync = steps.SocketSync(fd)
    try:
        gc.disable()
        # Our copy of the runtime's end would hide the runtime's exit (no EOF) from us.
        os.close(parent_fd)
        _reset_signals()
        steps.enter(sc, plan.fds() | {fd})
        if entry(sc, sync, plan):
            code = 0
    except BaseException as e:  # noqa: B036 - everything must end in os._exit
        message = str(e) or type(e).__name__
        try:
            if sync.fd >= 0:
                sync.send({"type": "error", "message": message})
            else:
                os.write(2, f"berth: container process: {message}\n".encode())
        except BaseException:  # noqa: B036
            pass
    finally:
        os._exit(code)


class Runtime:
    """Containers under ``root`` (``<root>/<id>/state.json``), children reaped by ``reaper``.

    ``reaper`` must be running (``await nursery.start(reaper.run)``) and make this process
    a child subreaper while containers are created or exec'ed into: create/exec check it.
    """

    def __init__(self, root: str | Path, reaper: Reaper, *, syscalls: Syscalls | None = None,
                 cgroup_root: str = cgroups.CGROUP_ROOT) -> None:
        self.root = Path(root)
        self._store = StateStore(self.root)
        self._reaper = reaper
        self._sc: Syscalls = syscalls or LibcSyscalls()
        self._cgroup_root = cgroup_root
        self._known_last = caps.last_cap()
        self._kcore = os.path.exists("/proc/kcore")
        self._locks: dict[str, trio.Lock] = {}
        self._start_fifos: dict[str, int] = {}  # id -> exec.fifo's read end, after start
        self._exec_fd: int | None = None  # the sealed exec stub, made at first use
        self._log = log.get("runtime.inprocess")

    def _lock(self, id: str) -> trio.Lock:
        return self._locks.setdefault(id, trio.Lock())

    # ---- status ---------------------------------------------------------------------
    def _status(self, st: ContainerState) -> str:
        if not alive(st.pid, st.pid_start):
            return "stopped"
        if self._store.fifo(st.id).exists():
            return "created"
        if cgroups.Cgroup.from_dict(st.cgroup).frozen():
            return "paused"
        return "running"

    async def state(self, id: str) -> State:
        st = self._store.load(id)
        return State(id=st.id, pid=st.pid, status=self._status(st), bundle=st.bundle,
                     created=datetime.fromisoformat(st.created),
                     annotations=dict(st.annotations))

    # ---- create ---------------------------------------------------------------------
    async def create(self, id: str, bundle: Path, *, stdio: Stdio,
                     console_socket: str | None = None, pid_file: Path | None = None) -> int:
        oci_spec.validate_id(id)
        async with self._lock(id):
            return await self._create(id, Path(bundle).resolve(), stdio, console_socket,
                                      pid_file)

    def _exec_stub(self) -> int:
        """The sealed memfd container commands are exec'ed through (-1: exec directly).
        It lives as long as this process (one page, shared by every container)."""
        if self._exec_fd is None:
            try:
                fd = execstub.open_sealed()
            except OSError as e:
                self._log.warning("exec stub failed", error=str(e))
                fd = -1
            self._exec_fd = _high(fd) if fd >= 0 else -1
            if fd < 0:
                self._log.warning("no exec stub on this machine: container commands are "
                                  "exec'ed by the runtime's own process")
        return self._exec_fd

    def _need_reaper(self) -> None:
        if not self._reaper.running:
            raise errdefs.FailedPrecondition("the runtime's reaper is not running")
        # The init of a double fork must come back to us when its first parent exits.
        if not self._sc.is_child_subreaper():
            raise errdefs.FailedPrecondition("the runtime's process is not a child subreaper")

    async def _create(self, id: str, bundle: Path, stdio: Stdio, console_socket: str | None,
                      pid_file: Path | None) -> int:
        self._need_reaper()
        logger = self._log.bind(id=id)
        config = oci_spec.load(bundle)
        c = ispec.parse(config, bundle, known_last=self._known_last)
        process = config.get("process") or {}
        if process.get("apparmorProfile") or process.get("selinuxLabel"):
            logger.debug("apparmor/selinux settings ignored")
        if c.process.terminal and not console_socket:
            raise errdefs.InvalidArgument("terminal requested but no console socket given")
        bpf = seccomp.build(c.seccomp) if c.seccomp else None
        cg = cgroups.Cgroup.resolve(c.cgroups_path, id, cgroup_root=self._cgroup_root)
        d = self._store.create_dir(id)
        fds: list[int] = []
        closers: list[Any] = []
        pids: list[int] = []
        cg_made = False
        try:
            fifo = d / "exec.fifo"
            os.mkfifo(fifo, 0o622)
            os.chmod(fifo, 0o622)  # umask must not take the others' write bit
            fifo_fd = _high(os.open(fifo, _O_PATH | os.O_CLOEXEC))
            fds.append(fifo_fd)
            ns_fds = []
            for ns in c.namespaces:
                if ns.path:
                    try:
                        fd = _high(os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC))
                    except OSError as e:
                        raise errdefs.InvalidArgument(
                            f"namespace {ns.type} path {ns.path}: {e.strerror}") from None
                    fds.append(fd)
                    ns_fds.append((ns.type, fd))
            console_fd = None
            if c.process.terminal:
                console = self._connect_console(console_socket or "")
                closers.append(console)
                console_fd = _high(os.dup(console.fileno()))
                fds.append(console_fd)
            stdio_fds = self._stdio_fds(stdio, c.process.terminal, fds)

            def make_cgroup() -> None:
                nonlocal cg_made
                cg.create()
                cg_made = True
                cg.apply(c.resources, devices=c.devices)

            direct = _direct_pid_ns(c)
            plan = steps.InitPlan(
                container=c, stdio=stdio_fds, ns_fds=ns_fds, fifo_fd=fifo_fd,
                console_fd=console_fd, cgroup_binds=cg.mount_binds(), seccomp=bpf,
                known_last=self._known_last, kcore=self._kcore, in_pid_ns=direct,
                exec_fd=self._exec_stub())
            created = datetime.now(UTC)

            async def on_hooks(init_pid: int) -> dict[str, Any]:
                creating = oci_spec.hook_state(id, "creating", init_pid, bundle, c.annotations)
                for kind in ("prestart", "createRuntime"):
                    if c.hooks.get(kind):
                        await hooks.run(kind, c.hooks[kind], creating, self._reaper)
                started = oci_spec.hook_state(id, "created", init_pid, bundle, c.annotations)
                return {"state": json.dumps(creating), "start_state": json.dumps(started)}

            def on_userns(pid: int) -> None:
                self._write_maps(pid, c)

            init_pid = await self._spawn(steps.run_init, plan, cg, pids,
                                         on_userns=on_userns, on_hooks=on_hooks,
                                         new_pid_ns=direct, before_go=make_cgroup)
            stat = proc_stat(init_pid)
            if stat is None:
                raise errdefs.Unknown(f"container {id}: init exited during create", raw=True)
            st = ContainerState(id=id, pid=init_pid, pid_start=stat[1], bundle=str(bundle),
                                created=created.isoformat(), config=config,
                                cgroup=cg.to_dict(), annotations=c.annotations)
            self._store.save(st)
            if pid_file is not None:
                _write_pid_file(pid_file, init_pid)
            logger.debug("created", pid=init_pid)
            return init_pid
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abort(pids, cg if cg_made else None)
                self._store.remove(id)
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for obj in closers:
                obj.close()

    def _connect_console(self, path: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise errdefs.InvalidArgument(f"console socket {path}: {e.strerror}") from None
        return s

    def _stdio_fds(self, stdio: Stdio, terminal: bool, fds: list[int]) -> tuple[int, int, int]:
        out = []
        null = -1
        for fd in (None, None, None) if terminal else stdio:
            if fd is None:
                if null < 0:
                    null = _high(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
                    fds.append(null)
                fd = null
            out.append(fd)
        return out[0], out[1], out[2]

    def _write_maps(self, pid: int, c: ispec.Container) -> None:
        for name, maps in (("uid_map", c.uid_mappings), ("gid_map", c.gid_mappings)):
            text = "".join(f"{m.container} {m.host} {m.size}\n" for m in maps)
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)

    async def _spawn(self, entry: Callable[..., bool], plan: Any, cg: cgroups.Cgroup,
                     pids: list[int], *, on_userns: Callable[[int], None] | None = None,
                     on_hooks: Callable[[int], Any] | None = None,
                     wait_exec: bool = False, new_pid_ns: bool = False,
                     before_go: Callable[[], None] | None = None) -> int:
        """Fork a child running ``entry`` and drive the sync conversation; the pid of the
        process that ends up exec'ing. ``pids`` collects every pid made, for clean-up.

        ``before_go`` (making the cgroup) runs after the fork, before the child is moved
        into the cgroup and told to go on: the kernel may keep cgroup calls waiting for
        a while (see ``berth.core.runtime.attach_primer``), and the fork need not wait with them.

        With ``new_pid_ns`` the child is forked straight into a new pid namespace, as
        its pid 1, and is the process that execs (see ``_fork_into_new_pid_ns``)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child_fd = _high(os.dup(child.fileno()))
        child.close()
        try:
            if new_pid_ns:
                pid1 = self._fork_into_new_pid_ns()
            else:
                pid1 = os.fork()
            if pid1 == 0:
                _child(entry, self._sc, plan, child_fd, parent.fileno())
        except BaseException:
            parent.close()
            raise
        finally:
            if child_fd >= 0:
                os.close(child_fd)
        pids.append(pid1)
        sock = trio.socket.from_stdlib_socket(parent)
        with sock:
            if before_go is not None:
                before_go()
            cg.add(pid1)
            await sock.send(json.dumps({"type": "go"}).encode())
            target = 0
            # After a fork, the grandchild's messages can overtake its parent's "pid"
            # (the parent may not run again before the grandchild is done): they wait
            # until the pid is known.
            early: list[dict[str, Any]] = []
            while True:
                if target and early:
                    msg = early.pop(0)
                else:
                    data = await sock.recv(1 << 16)
                    if not data:
                        if wait_exec and target:
                            break  # execve closed the child's end: the process runs
                        raise errdefs.Unknown("container process exited during set-up",
                                              raw=True)
                    try:
                        msg = json.loads(data)
                    except ValueError:
                        raise errdefs.Internal("garbled message from container process"
                                               ) from None
                    if not isinstance(msg, dict):
                        raise errdefs.Internal("garbled message from container process")
                kind = msg.get("type")
                if kind == "error":
                    raise errdefs.Unknown(msg.get("message") or "set-up failed", raw=True)
                if not target and kind in ("hooks", "ready"):
                    early.append(msg)
                    continue
                if kind == "userns" and on_userns is not None:
                    on_userns(pid1)
                    await sock.send(json.dumps({"type": "mapped"}).encode())
                elif kind == "pid":
                    # A child that is pid 1 of its namespace knows itself only as 1.
                    target = pid1 if new_pid_ns else int(msg["pid"])
                    if target != pid1:
                        pids.append(target)
                elif kind == "hooks" and on_hooks is not None:
                    reply = await on_hooks(target)
                    await sock.send(json.dumps({"type": "hooked", **reply}).encode())
                elif kind == "ready":
                    if not wait_exec:
                        break
                else:
                    raise errdefs.Internal(f"unexpected message from container process: {msg}")
        if target != pid1:
            first = await self._reaper.wait(pid1)
            # Reaped and claimed: a clean-up must neither signal its (reusable) pid nor
            # wait for its exit again.
            pids.remove(pid1)
            if first.status != 0:
                raise errdefs.Unknown(f"set-up process exited with {first.status}", raw=True)
        return target

    def _fork_into_new_pid_ns(self) -> int:
        """``os.fork()`` with the child as pid 1 of a new pid namespace.

        Forking twice (unshare in the child, then fork the init) costs a second copy of
        this large process; instead the calling thread unshares the pid namespace for
        its children only, forks, and at once joins its own pid namespace again. Only
        this thread is affected meanwhile, and it neither awaits nor starts threads.
        """
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        pid = -1
        try:
            self._sc.unshare(sys_.CLONE_NEWPID)
            pid = os.fork()
        finally:
            if pid != 0:  # the child runs on (and never returns to this frame)
                self._sc.setns(own, sys_.CLONE_NEWPID)
                os.close(own)
        return pid

    async def _abort(self, pids: list[int], cg: cgroups.Cgroup | None) -> None:
        """Undo a failed create/exec: kill what was forked, reap it, drop the cgroup."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with trio.move_on_after(_GONE_TIMEOUT):
            for pid in pids:
                await self._reaper.wait(pid)
        if cg is not None:
            await self._kill_cgroup(cg)
            try:
                await cg.destroy()
            except errdefs.BerthError as e:
                self._log.warning("cgroup not removed", error=str(e))

    # ---- start ----------------------------------------------------------------------
    async def start(self, id: str) -> None:
        async with self._lock(id):
            st = self._store.load(id)
            status = self._status(st)
            if status != "created":
                raise errdefs.FailedPrecondition(f"cannot start container {id}: it is {status}")
            fifo = self._store.fifo(id)
            poststart = (st.config.get("hooks") or {}).get("poststart")
            # Opening the fifo for reading is what lets the init go on.
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if poststart:
                    # The hooks run once the init is on its way: wait for its byte.
                    await self._read_start_byte(fd, st)
                    os.close(fd)
                else:
                    # An init that is gone already may have run and exited in the
                    # meantime: then its byte is in the fifo.
                    if not alive(st.pid, st.pid_start) and not _read_ready(fd):
                        raise errdefs.FailedPrecondition(
                            f"cannot start container {id}: it stopped before start")
                    # Nobody needs to wait for the init's byte (a round trip to a
                    # process just woken), but its write must find a reader: this end
                    # stays open until delete.
                    self._start_fifos[id] = fd
            except BaseException:
                os.close(fd)
                raise
            with contextlib.suppress(FileNotFoundError):
                fifo.unlink()
            if poststart:
                state = oci_spec.hook_state(id, "running", st.pid, st.bundle, st.annotations)
                try:
                    await hooks.run("poststart", poststart, state, self._reaper)
                except errdefs.BerthError as e:
                    self._log.warning("poststart hook failed", id=id, error=str(e))

    async def _read_start_byte(self, fd: int, st: ContainerState) -> None:
        while True:
            with trio.move_on_after(0.05):
                await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, 1)
            except BlockingIOError:
                data = b""
            if data:
                return
            # No writer yet (EOF) or nothing written: the init may still be on its way.
            if not alive(st.pid, st.pid_start):
                raise errdefs.FailedPrecondition(
                    f"cannot start container {st.id}: it stopped before start")

    def _close_start_fifo(self, id: str) -> None:
        fd = self._start_fifos.pop(id, None)
        if fd is not None:
            os.close(fd)

    # ---- signals ----------------------------------------------------------------------
    async def kill(self, id: str, signal: int, *, all: bool = False) -> None:
        st = self._store.load(id)
        status = self._status(st)
        if all:
            await self._kill_cgroup(cgroups.Cgroup.from_dict(st.cgroup), signal)
            return
        if status == "stopped":
            raise errdefs.FailedPrecondition(f"container {id} is not running")
        try:
            os.kill(st.pid, signal)
        except ProcessLookupError:
            raise errdefs.FailedPrecondition(f"container {id} is not running") from None

    async def _kill_cgroup(self, cg: cgroups.Cgroup, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the cgroup, frozen meanwhile so none can fork away."""
        if not cg.exists() or not cg.procs():
            return  # an empty cgroup gains no process by fork: nothing to freeze
        freezer = True
        was_frozen = cg.frozen()
        try:
            if not was_frozen:
                await cg.freeze()
        except errdefs.BerthError:
            freezer = False
        try:
            for pid in cg.procs():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        finally:
            if freezer and (not was_frozen or sig == signal.SIGKILL):
                await cg.thaw()

    # ---- delete -----------------------------------------------------------------------
    async def delete(self, id: str, *, force: bool = False) -> None:
        async with self._lock(id):
            st = self._store.load(id)
            status = self._status(st)
            if status in ("running", "paused") and not force:
                raise errdefs.FailedPrecondition(
                    f"cannot delete container {id} that is not stopped: {status}")
            cg = cgroups.Cgroup.from_dict(st.cgroup)
            if status != "stopped":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(st.pid, signal.SIGKILL)
            await self._kill_cgroup(cg)
            await self._until_gone(st, cg)
            self._close_start_fifo(id)  # no writer is left
            await cg.destroy()
            poststop = (st.config.get("hooks") or {}).get("poststop")
            if poststop:
                state = oci_spec.hook_state(id, "stopped", 0, st.bundle, st.annotations)
                try:
                    await hooks.run("poststop", poststop, state, self._reaper)
                except errdefs.BerthError as e:
                    self._log.warning("poststop hook failed", id=id, error=str(e))
            self._store.remove(id)
        self._locks.pop(id, None)

    async def _until_gone(self, st: ContainerState, cg: cgroups.Cgroup) -> None:
        delay = 0.001
        with trio.move_on_after(_GONE_TIMEOUT):
            while alive(st.pid, st.pid_start) or cg.procs():
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
                if cg.procs():
                    await self._kill_cgroup(cg)
            return
        raise errdefs.Unavailable(f"container {st.id}: processes did not exit")

    # ---- exec -------------------------------------------------------------------------
    async def exec(self, id: str, process: dict, *, stdio: Stdio,
                   console_socket: str | None = None, pid_file: Path | None = None) -> int:
        st = self._store.load(id)
        status = self._status(st)
        if status in ("stopped", "paused"):
            raise errdefs.FailedPrecondition(f"cannot exec in container {id}: it is {status}")
        self._need_reaper()
        p = ispec.parse_process(process, known_last=self._known_last)
        if p.terminal and not console_socket:
            raise errdefs.InvalidArgument("terminal requested but no console socket given")
        linux = st.config.get("linux") or {}
        bpf = seccomp.build(linux["seccomp"]) if linux.get("seccomp") else None
        cg = cgroups.Cgroup.from_dict(st.cgroup)
        fds: list[int] = []
        closers: list[Any] = []
        pids: list[int] = []
        try:
            ns_fds = self._init_namespaces(st.pid, fds)
            if not alive(st.pid, st.pid_start):
                raise errdefs.FailedPrecondition(f"cannot exec in container {id}: it stopped")
            console_fd = None
            if p.terminal:
                console = self._connect_console(console_socket or "")
                closers.append(console)
                console_fd = _high(os.dup(console.fileno()))
                fds.append(console_fd)
            plan = steps.ExecPlan(process=p, stdio=self._stdio_fds(stdio, p.terminal, fds),
                                  ns_fds=ns_fds, console_fd=console_fd, seccomp=bpf,
                                  known_last=self._known_last, exec_fd=self._exec_stub())
            pid = await self._spawn(steps.run_exec, plan, cg, pids, wait_exec=True)
            if pid_file is not None:
                _write_pid_file(pid_file, pid)
            return pid
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abort(pids, None)
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for obj in closers:
                obj.close()

    def _init_namespaces(self, pid: int, fds: list[int]) -> list[tuple[str, int]]:
        """fds of the init's namespaces that differ from ours."""
        out = []
        for ns_type, name in ispec.NAMESPACE_FILES.items():
            theirs = f"/proc/{pid}/ns/{name}"
            try:
                a, b = os.stat(f"/proc/self/ns/{name}"), os.stat(theirs)
            except FileNotFoundError:
                continue  # a kernel without this namespace type
            except PermissionError as e:
                raise errdefs.FailedPrecondition(f"{theirs}: {e.strerror}") from None
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                continue
            try:
                fd = _high(os.open(theirs, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                if e.errno == errno.ENOENT:
                    raise errdefs.FailedPrecondition("container init exited") from None
                raise
            fds.append(fd)
            out.append((ns_type, fd))
        return out

    # ---- freezer, processes, resources --------------------------------------------
    async def pause(self, id: str) -> None:
        st = self._store.load(id)
        status = self._status(st)
        if status != "running":
            raise errdefs.FailedPrecondition(f"cannot pause container {id}: it is {status}")
        await cgroups.Cgroup.from_dict(st.cgroup).freeze()

    async def resume(self, id: str) -> None:
        st = self._store.load(id)
        status = self._status(st)
        if status != "paused":
            raise errdefs.FailedPrecondition(f"cannot resume container {id}: it is {status}")
        await cgroups.Cgroup.from_dict(st.cgroup).thaw()

    async def ps(self, id: str) -> list[int]:
        st = self._store.load(id)
        return cgroups.Cgroup.from_dict(st.cgroup).procs()

    async def update(self, id: str, resources: dict) -> None:
        async with self._lock(id):
            st = self._store.load(id)
            if self._status(st) == "stopped":
                raise errdefs.FailedPrecondition(f"cannot update container {id}: it is stopped")
            cgroups.Cgroup.from_dict(st.cgroup).apply(resources)
            linux = st.config.setdefault("linux", {})
            merged = dict(linux.get("resources") or {})
            merged.update(resources)
            linux["resources"] = merged
            self._store.save(st)

    async def stats(self, id: str) -> dict:
        st = self._store.load(id)
        return cgroups.Cgroup.from_dict(st.cgroup).stats()

    def list(self) -> list[str]:
        return self._store.list()


def _read_ready(fd: int) -> bool:
    """Whether the init wrote its byte into exec.fifo (``fd``: the non-blocking read end)."""
    try:
        return bool(os.read(fd, 1))
    except BlockingIOError:
        return False


def _direct_pid_ns(c: ispec.Container) -> bool:
    """Whether the init can be forked straight into its new pid namespace: not when a
    user namespace must own that pid namespace (it is made in the child first), nor
    with a time namespace (it too applies to children only: the second fork stays)."""
    return (c.new_namespace("pid") and c.namespace("user") is None
            and c.namespace("time") is None)


def _write_pid_file(path: Path, pid: int) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)
