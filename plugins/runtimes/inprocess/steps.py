"""The ordered set-up sequence of container processes, as plain functions.

Each function takes the ``Syscalls`` object (``sc``) and a ``Sync`` channel to the runtime,
so unit tests run the exact sequence against a recording fake without root. Everything
here runs in a forked child of the runtime: only modules imported before the fork are
used, and errors propagate as exceptions that the caller reports and turns into an exit.

Init (``run_init``), first child: join namespaces given by path (user first, mount last),
unshare a new user namespace and wait while the runtime writes its id maps, unshare the
other namespaces, then fork again when a pid namespace needs it (the grandchild is pid 1;
the first child reports its pid and exits). The init then builds the root filesystem,
lets the runtime run prestart/createRuntime hooks, runs createContainer hooks, pivots,
applies the rest of the process settings, reports "ready", blocks on the exec fifo until
``start`` and finally installs seccomp (when no_new_privileges) and execs.

Exec (``run_exec``): join every namespace of the init, fork when the pid namespace needs
it, apply the process settings and exec.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Protocol

from berth.plugins.runtimes.inprocess import (
    caps,
    devices,
    execstub,
    hooks,
    mounts,
    syscalls as sys_,
)
from berth.plugins.runtimes.inprocess.spec import NAMESPACE_FLAGS, Container, Process

_O_PATH = getattr(os, "O_PATH", 0o10000000)


class Sync(Protocol):
    def send(self, msg: dict[str, Any]) -> None: ...
    def recv(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class SocketSync:
    """JSON messages over the child's end of a SOCK_SEQPACKET socketpair."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, msg: dict[str, Any]) -> None:
        os.write(self.fd, json.dumps(msg).encode())

    def recv(self) -> dict[str, Any]:
        data = os.read(self.fd, 1 << 16)
        if not data:
            raise EOFError("the runtime closed the sync channel")
        return json.loads(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SetupError(Exception):
    """A failure the runtime reports verbatim (like runc's "exec: ... not found")."""


@dataclass
class InitPlan:
    container: Container
    stdio: tuple[int, int, int]
    ns_fds: list[tuple[str, int]] = field(default_factory=list)  # joined by path
    fifo_fd: int = -1  # O_PATH fd of exec.fifo
    console_fd: int | None = None
    cgroup_binds: list[tuple[str, str]] = field(default_factory=list)
    seccomp: tuple[bytes, int] | None = None
    known_last: int = 40
    kcore: bool = True
    # The runtime forked this process straight into the container's new pid namespace
    # (as its pid 1): no pid namespace to unshare and no second fork.
    in_pid_ns: bool = False
    exec_fd: int = -1  # the sealed exec stub (see ``execstub``), -1 to exec directly

    def fds(self) -> set[int]:
        """Every fd this plan needs in the forked child (all others are closed)."""
        return _plan_fds(self.stdio, self.ns_fds, self.console_fd, self.exec_fd,
                         self.fifo_fd)


@dataclass
class ExecPlan:
    process: Process
    stdio: tuple[int, int, int]
    ns_fds: list[tuple[str, int]] = field(default_factory=list)  # all of the init's
    console_fd: int | None = None
    seccomp: tuple[bytes, int] | None = None
    known_last: int = 40
    exec_fd: int = -1

    def fds(self) -> set[int]:
        return _plan_fds(self.stdio, self.ns_fds, self.console_fd, self.exec_fd)


def _plan_fds(stdio: tuple[int, int, int], ns_fds: list[tuple[str, int]],
              console_fd: int | None, *more: int) -> set[int]:
    fds = {*stdio, *(fd for _, fd in ns_fds), *more}
    if console_fd is not None:
        fds.add(console_fd)
    fds.discard(-1)
    return fds


def enter(sc: sys_.Syscalls, keep: set[int]) -> None:
    """First steps of every forked container process, before it joins anything: it
    becomes non-dumpable (no process of the container may ptrace it, open its
    /proc/<pid>/fd or /proc/<pid>/exe, or take its fds with pidfd_getfd), and it closes
    every fd of the shim that the container is not meant to have (the shim's ttrpc
    sockets, other containers' stdio...): a copy made by fork is still open, close-on-exec
    or not, until the execve."""
    sc.set_dumpable(False)
    sc.close_fds_except(keep)


def expect(sync: Sync, kind: str) -> dict[str, Any]:
    msg = sync.recv()
    if msg.get("type") != kind:
        raise SetupError(f"sync: expected {kind!r}, got {msg!r}")
    return msg


def setup_stdio(sc: sys_.Syscalls, fds: tuple[int, int, int]) -> None:
    """Put ``fds`` on 0/1/2. Copies are taken first so that overlapping numbers
    (stdout given as fd 0, say) are not clobbered."""
    high = [sc.dup_above(fd, 3) for fd in fds]
    for target, fd in enumerate(high):
        sc.dup2(fd, target)
    for fd in high:
        sc.close(fd)


def join_namespaces(sc: sys_.Syscalls, ns_fds: list[tuple[str, int]]) -> None:
    """setns into each: the others while this process still has its own capabilities (a
    container in a user namespace may share a pod's namespaces that the host's user
    namespace owns, over which a joined user namespace gives no rights), then the user
    namespace and what needed its rights, the mount namespace last (it changes the root
    the other paths were opened from)."""
    user = [t for t in ns_fds if t[0] == "user"]
    retry = []
    for ns_type, fd in ns_fds:
        if ns_type in ("user", "mount"):
            continue
        try:
            sc.setns(fd, NAMESPACE_FLAGS[ns_type])
        except OSError as e:
            if e.errno != errno.EPERM or not user:
                raise
            retry.append((ns_type, fd))
            continue
        sc.close(fd)
    for ns_type, fd in [*user, *retry, *(t for t in ns_fds if t[0] == "mount")]:
        sc.setns(fd, NAMESPACE_FLAGS[ns_type])
        sc.close(fd)


def needs_fork(ns_types: set[str]) -> bool:
    """A new or joined pid (or time) namespace only applies to children."""
    return bool(ns_types & {"pid", "time"})


# ---- init ----------------------------------------------------------------------------
def run_init(sc: sys_.Syscalls, sync: Sync, plan: InitPlan) -> bool:
    """First child. Returns True when the caller is done (it forked the init and must
    exit 0); otherwise never returns (execve)."""
    c = plan.container
    setup_stdio(sc, plan.stdio)
    sc.set_pdeathsig(signal.SIGKILL)
    expect(sync, "go")  # the runtime has put us into the cgroup
    if c.process.oom_score_adj is not None:
        # Before any user namespace: in one the file is no longer ours to write (as
        # runc, which sets it before it clones).
        sc.write_file("/proc/self/oom_score_adj", str(c.process.oom_score_adj))
    join_namespaces(sc, plan.ns_fds)
    if c.new_namespace("user"):
        sc.unshare(sys_.CLONE_NEWUSER)
        sync.send({"type": "userns"})
        expect(sync, "mapped")
        sc.setresgid(0)
        sc.setresuid(0)
    elif any(t == "user" for t, _ in plan.ns_fds):
        # A joined user namespace (a pod's): become its root too, or the host's root,
        # unmapped there, could create no file (EOVERFLOW) while the rootfs is set up.
        sc.setresgid(0)
        sc.setresuid(0)
    types = {ns.type for ns in c.namespaces}
    done = {"user", "pid"} if plan.in_pid_ns else {"user"}
    flags = 0
    for ns in c.namespaces:
        if not ns.path and ns.type not in done:
            flags |= NAMESPACE_FLAGS[ns.type]
    if flags:
        sc.unshare(flags)
    if needs_fork(types - done):
        pid = sc.fork()
        if pid:
            sync.send({"type": "pid", "pid": pid})
            return True
    else:
        sync.send({"type": "pid", "pid": sc.getpid()})
    init_container(sc, sync, plan)
    return False


def prepare_rootfs(sc: sys_.Syscalls, plan: InitPlan) -> None:
    c = plan.container
    mounts.prepare_root(sc, c)
    dev_readonly = False
    for m in c.mounts:
        dev_readonly |= mounts.mount_one(sc, c, m, plan.cgroup_binds)
    host_dev = any(m.destination == "/dev" and m.bind for m in c.mounts)
    if not host_dev:
        devices.create_devices(sc, c.rootfs, devices.all_devices(c.devices),
                               bind=c.namespace("user") is not None)
        devices.ensure_dirs(sc, c.rootfs)
        devices.setup_ptmx(sc, c.rootfs)
        devices.setup_symlinks(sc, c.rootfs, kcore=plan.kcore)
    if dev_readonly:
        mounts.remount_readonly(sc, mounts.secure_join(sc, c.rootfs, "/dev"))
    cwd = mounts.secure_join(sc, c.rootfs, c.process.cwd)
    if sc.lstat(cwd) is None:
        try:
            mounts.mkdir_all(sc, c.rootfs, cwd)
        except OSError:
            pass  # a read-only image: chdir reports it later


def setup_console(sc: sys_.Syscalls, console_fd: int, *, bind_console: bool) -> None:
    """Create a pty in the container's devpts, hand the master to the console socket
    (SCM_RIGHTS, like runc) and make the slave the controlling terminal and stdio."""
    master, slave_path = sc.open_pty("/dev/ptmx")
    try:
        sc.send_fd(console_fd, master, "/dev/ptmx")
    finally:
        sc.close(master)
        sc.close(console_fd)
    slave = sc.open(slave_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    if bind_console:
        if sc.lstat("/dev/console") is None:
            sc.touch("/dev/console", 0o600)
        sc.mount(slave_path, "/dev/console", "bind", sys_.MS_BIND, "")
    for target in (0, 1, 2):
        sc.dup2(slave, target)
    sc.close(slave)
    sc.set_ctty(0)


def set_rlimits(sc: sys_.Syscalls, p: Process) -> None:
    for resource, soft, hard in p.rlimits:
        sc.setrlimit(resource, soft, hard)


def finalize(sc: sys_.Syscalls, p: Process, known_last: int) -> None:
    """Capabilities and identity, in the only order that works: the bounding set while
    CAP_SETPCAP is there, keep caps across setuid, switch ids, then set the sets."""
    caps.apply_bounding(sc, p.caps, known_last=known_last)
    sc.set_keepcaps(True)
    try:
        sc.setgroups(p.additional_gids)
    except PermissionError:
        if p.additional_gids:
            raise  # setgroups denied in this user namespace
    sc.setresgid(p.gid)
    sc.setresuid(p.uid)
    sc.set_keepcaps(False)
    caps.apply_sets(sc, p.caps)
    sc.chdir(p.cwd)


def lookup(sc: sys_.Syscalls, p: Process) -> str:
    """The executable for args[0], searched in the process's PATH (after pivot_root)."""
    name = p.args[0]
    if "/" in name:
        # Checked here, as runc's LookPath does, so that the failure is the request's
        # error: the exec stub could only tell it on stderr.
        if sc.executable(name):
            return name
        if sc.lstat(name) is None:
            raise SetupError(f'exec: "{name}": stat {name}: no such file or directory')
        raise SetupError(f'exec: "{name}": permission denied')
    for d in p.search_path():
        candidate = os.path.join(d or ".", name)
        if sc.executable(candidate):
            return candidate
    raise SetupError(f'exec: "{name}": executable file not found in $PATH')


def check_interpreter(sc: sys_.Syscalls, path: str) -> None:
    """A script whose ``#!`` interpreter is missing fails here, as an error of the
    request, rather than in the exec stub (which can only say so on stderr and exit 127).
    Anything else the kernel decides (ELF, binfmt_misc formats)."""
    head = sc.read_head(path, 256)
    if not head or not head.startswith(b"#!"):
        return
    words = head[2:].split(b"\n", 1)[0].split()
    if not words or len(head) == 256 and b"\n" not in head:
        return  # the kernel's own limits decide
    interpreter = words[0].decode(errors="surrogateescape")
    if sc.lstat(interpreter) is None:
        raise SetupError(f"exec {path}: no such file or directory (interpreter "
                         f"{interpreter})")


def wait_for_start(sc: sys_.Syscalls, fifo_fd: int) -> None:
    """Block until ``start`` opens exec.fifo for reading, then tell it we go on."""
    fd = sc.open(f"/proc/self/fd/{fifo_fd}", os.O_WRONLY | os.O_CLOEXEC)
    sc.write(fd, b"0")
    sc.close(fd)
    sc.close(fifo_fd)


def init_container(sc: sys_.Syscalls, sync: Sync, plan: InitPlan) -> None:
    c = plan.container
    p = c.process
    # Without a pid namespace this is still the first child: a runtime exit must not kill
    # a created container (the sync channel's EOF stops an unfinished set-up instead).
    sc.set_pdeathsig(0)
    sc.setsid()
    if c.new_namespace("network"):
        sc.loopback_up()
    prepare_rootfs(sc, plan)
    hook_states: dict[str, Any] = {}
    if any(c.hooks.get(k) for k in ("prestart", "createRuntime", "createContainer",
                                     "startContainer")):
        sync.send({"type": "hooks"})
        hook_states = expect(sync, "hooked")
    if c.hooks.get("createContainer"):
        hooks.run_in_child(sc, "createContainer", c.hooks["createContainer"],
                           hook_states["state"], exec_fd=plan.exec_fd)
    mounts.pivot_root(sc, c.rootfs)
    if c.readonly:
        mounts.remount_readonly(sc, "/")
    sc.umask(0o022 if p.umask is None else p.umask)
    if p.terminal:
        if plan.console_fd is None:
            raise SetupError("terminal requested without a console socket")
        setup_console(sc, plan.console_fd, bind_console=True)
    if c.hostname:
        sc.sethostname(c.hostname)
    if c.domainname:
        sc.setdomainname(c.domainname)
    for key, value in c.sysctl.items():
        sc.write_file("/proc/sys/" + key.replace(".", "/"), value)
    mounts.readonly_paths(sc, c.readonly_paths)
    mounts.mask_paths(sc, c.masked_paths)
    set_rlimits(sc, p)
    if p.no_new_privileges:
        sc.set_no_new_privs()
    if plan.seccomp and not p.no_new_privileges:
        # Without no_new_privs the filter needs CAP_SYS_ADMIN, so before caps are dropped.
        sc.seccomp_set_filter(*plan.seccomp)
    finalize(sc, p, plan.known_last)
    path = lookup(sc, p)
    check_interpreter(sc, path)
    sync.send({"type": "ready"})
    sync.close()
    wait_for_start(sc, plan.fifo_fd)
    if c.hooks.get("startContainer"):
        hooks.run_in_child(sc, "startContainer", c.hooks["startContainer"],
                           hook_states.get("start_state") or hook_states["state"],
                           exec_fd=plan.exec_fd)
    exec_process(sc, plan.seccomp if p.no_new_privileges else None, path, p,
                 exec_fd=plan.exec_fd)


def exec_process(sc: sys_.Syscalls, seccomp: tuple[bytes, int] | None, path: str, p: Process, *,
                 exec_fd: int = -1) -> None:
    """Last steps before execve: nothing of the runtime leaks, seccomp as late as possible.

    With ``exec_fd`` (the sealed stub, close-on-exec like every other fd here) the stub
    execs ``path``: this process's /proc/self/exe, the host's Python, is then never what
    a ``#!`` line in the container can name (see ``execstub``)."""
    sc.cloexec_from(3)
    if seccomp:
        sc.seccomp_set_filter(*seccomp)
    if exec_fd < 0:
        sc.execve(path, p.args, p.environ())
        return
    # execve of the fd's /proc link rather than execveat (fexecve): a seccomp profile
    # that allows the container execve need not know execveat. Without a /proc, fexecve.
    link = f"/proc/self/fd/{exec_fd}"
    sc.execve(link if sc.lstat(link) is not None else exec_fd,
              execstub.argv(path, p.args), p.environ())


# ---- exec ----------------------------------------------------------------------------
def run_exec(sc: sys_.Syscalls, sync: Sync, plan: ExecPlan) -> bool:
    """Like ``run_init`` for an extra process in a running container. The exec'ed process
    keeps the sync socket (close-on-exec) so the runtime sees execve succeed as EOF."""
    p = plan.process
    setup_stdio(sc, plan.stdio)
    sc.set_pdeathsig(signal.SIGKILL)
    expect(sync, "go")
    types = {t for t, _ in plan.ns_fds}
    join_namespaces(sc, plan.ns_fds)
    if needs_fork(types):
        pid = sc.fork()
        if pid:
            sync.send({"type": "pid", "pid": pid})
            return True
    else:
        sync.send({"type": "pid", "pid": sc.getpid()})
        sc.set_pdeathsig(0)
    sc.setsid()
    if p.terminal:
        if plan.console_fd is None:
            raise SetupError("terminal requested without a console socket")
        setup_console(sc, plan.console_fd, bind_console=False)
    if p.umask is not None:
        sc.umask(p.umask)
    set_rlimits(sc, p)
    if p.no_new_privileges:
        sc.set_no_new_privs()
    if plan.seccomp and not p.no_new_privileges:
        sc.seccomp_set_filter(*plan.seccomp)
    finalize(sc, p, plan.known_last)
    path = lookup(sc, p)
    check_interpreter(sc, path)
    sync.send({"type": "ready"})
    exec_process(sc, plan.seccomp if p.no_new_privileges else None, path, p,
                 exec_fd=plan.exec_fd)
    return False
