"""The in-process runtime's set-up sequence, recorded with a fake Syscalls (no root).

These tests pin the order that makes a container work and keeps it confined: namespaces
before mounts, every mount before pivot_root, masking after it, the bounding set before
the uid switch, seccomp last, and the sync points with the runtime in between.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from berth.core.oci import spec as oci_spec
from berth.plugins.runtimes.inprocess import hooks, mounts, spec as ispec, steps, syscalls as S

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o755


class Exec(Exception):
    """Raised by the fake execve: the sequence reached its end."""


class FakeSyscalls:
    """Records every call as (name, *args); answers file queries from ``files``."""

    def __init__(self, files: dict[str, int] | None = None, forks: list[int] | None = None,
                 fail: dict[str, list[BaseException]] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.files = dict(files or {})
        self.links: dict[str, str] = {}
        self.forks = list(forks or [0])
        self.fail = {k: list(v) for k, v in (fail or {}).items()}
        self._next_fd = 100
        self.mountinfo = ""

    def _rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        pending = self.fail.get(name)
        if pending:
            raise pending.pop(0)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any) -> None:
            self._rec(name, *args)

        return call

    def _fd(self) -> int:
        self._next_fd += 1
        return self._next_fd

    def lstat(self, path: str) -> os.stat_result | None:
        mode = self.files.get(path)
        return None if mode is None else os.stat_result((mode, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    def readlink(self, path: str) -> str:
        return self.links[path]

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._rec("mkdir", path)
        self.files[path] = stat.S_IFDIR | mode

    def touch(self, path: str, mode: int = 0o644) -> None:
        self._rec("touch", path)
        self.files[path] = stat.S_IFREG | mode

    def mknod(self, path: str, mode: int, device: int) -> None:
        self._rec("mknod", path, mode, device)
        self.files[path] = mode

    def symlink(self, target: str, path: str) -> None:
        self._rec("symlink", target, path)
        self.files[path] = stat.S_IFLNK | 0o777
        self.links[path] = target

    def unlink(self, path: str) -> None:
        self._rec("unlink", path)
        self.files.pop(path, None)

    def open(self, path: str, flags: int, mode: int = 0o777) -> int:
        self._rec("open", path, flags)
        return self._fd()

    def dup_above(self, fd: int, lowest: int) -> int:
        self._rec("dup_above", fd, lowest)
        return self._fd()

    def open_pty(self, ptmx: str) -> tuple[int, str]:
        self._rec("open_pty", ptmx)
        return self._fd(), "/dev/pts/0"

    def fork(self) -> int:
        pid = self.forks.pop(0)
        self._rec("fork", pid)
        return pid

    def getpid(self) -> int:
        return 4321

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        self._rec("waitpid", pid)
        return pid, 0

    def mount_flags(self, path: str) -> int:
        return S.MS_NOSUID | S.MS_NODEV

    def mount_in_root(self, root: str, source: str | None, target: str, fstype: str | None,
                      flags: int, data: str | None = None) -> None:
        assert target == root or target.startswith(root.rstrip("/") + "/"), (root, target)
        self.mount(source, target, fstype, flags, data)

    def resolve(self, path: str) -> str:
        while path in self.links:
            path = self.links[path]
        return path

    def executable(self, path: str) -> bool:
        return stat.S_ISREG(self.files.get(path, 0))

    def read_file(self, path: str) -> str:
        return self.mountinfo

    def execve(self, path: str, args: list[str], env: dict[str, str]) -> None:
        self._rec("execve", path, args, env)
        raise Exec(path)

    def exit(self, code: int) -> None:
        self._rec("exit", code)
        raise SystemExit(code)


class FakeSync:
    """Scripted runtime side: answers each request; logs into the syscall record."""

    def __init__(self, calls: list[tuple[Any, ...]], replies: dict[str, dict[str, Any]]
                 ) -> None:
        self.calls = calls
        self.queue = ["go"]
        self.replies = replies

    def send(self, msg: dict[str, Any]) -> None:
        self.calls.append(("send", msg["type"], msg))
        answer = {"userns": "mapped", "hooks": "hooked"}.get(msg["type"])
        if answer:
            self.queue.append(answer)

    def recv(self) -> dict[str, Any]:
        kind = self.queue.pop(0)
        self.calls.append(("recv", kind))
        return {"type": kind, **self.replies.get(kind, {})}

    def close(self) -> None:
        self.calls.append(("sync_close",))


# ---- helpers -----------------------------------------------------------------------
def container(tmp_path: Path, mutate: Any = None) -> ispec.Container:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir(exist_ok=True)
    cfg = oci_spec.default(["sh", "-c", "true"])
    cfg["process"]["terminal"] = False
    if mutate:
        mutate(cfg)
    return ispec.parse(cfg, tmp_path, known_last=40)


def host_files(c: ispec.Container) -> dict[str, int]:
    return {c.rootfs: DIR, "/bin/sh": REG, "/proc/keys": REG, "/proc/timer_list": REG,
            "/sys/firmware": DIR, "/proc/acpi": DIR, "/proc/sys": DIR, "/proc/bus": DIR}


def first(calls: list[tuple[Any, ...]], name: str, *args: Any) -> int:
    for i, call in enumerate(calls):
        if call[0] == name and call[1:1 + len(args)] == args:
            return i
    raise AssertionError(f"no call {name}{args} in {[c[0] for c in calls]}")


def last(calls: list[tuple[Any, ...]], name: str, *args: Any) -> int:
    for i in range(len(calls) - 1, -1, -1):
        if calls[i][0] == name and calls[i][1:1 + len(args)] == args:
            return i
    raise AssertionError(f"no call {name}{args}")


def mount_targets(calls: list[tuple[Any, ...]]) -> list[str]:
    return [c[2] for c in calls if c[0] == "mount"]


def run_init(c: ispec.Container, *, forks: list[int] | None = None,
             replies: dict[str, dict[str, Any]] | None = None, **plan: Any
             ) -> tuple[FakeSyscalls, list[tuple[Any, ...]]]:
    sc = FakeSyscalls(host_files(c), forks=forks)
    sync = FakeSync(sc.calls, replies or {"hooked": {"state": "{}", "start_state": "{}"}})
    plan.setdefault("cgroup_binds", [("memory", "/sys/fs/cgroup/memory/x")])
    p = steps.InitPlan(container=c, stdio=(10, 11, 12), fifo_fd=50, known_last=40, **plan)
    with pytest.raises(Exec):
        steps.run_init(sc, sync, p)
    return sc, sc.calls


# ---- init --------------------------------------------------------------------------
def test_init_sequence_order(tmp_path: Path) -> None:
    c = container(tmp_path, lambda cfg: cfg["linux"].update(
        seccomp={"defaultAction": "SCMP_ACT_ALLOW"}))
    _, calls = run_init(c, seccomp=(b"\x06\0\0\0\0\0\xff\x7f", 0))
    rootfs = c.rootfs

    # stdio first, through high copies so overlapping fds survive
    assert [x[0] for x in calls[:6]] == ["dup_above"] * 3 + ["dup2"] * 3
    assert [x[2] for x in calls[3:6]] == [0, 1, 2]
    go = first(calls, "recv", "go")
    unshare = first(calls, "unshare")
    assert calls[unshare][1] == (S.CLONE_NEWPID | S.CLONE_NEWNET | S.CLONE_NEWIPC
                                 | S.CLONE_NEWUTS | S.CLONE_NEWNS)
    fork = first(calls, "fork")
    assert first(calls, "set_pdeathsig") < go < unshare < fork < first(calls, "setsid")

    # no mount event may reach the host; the rootfs becomes a mount point
    mounts_ = [x for x in calls if x[0] == "mount"]
    assert mounts_[0][1:] == ("", "/", "", S.MS_SLAVE | S.MS_REC, "")
    assert mounts_[1][1:] == (rootfs, rootfs, "bind", S.MS_BIND | S.MS_REC, "")
    assert first(calls, "setsid") < first(calls, "mount")
    targets = mount_targets(calls)
    spec_targets = [rootfs + m.destination for m in c.mounts]
    positions = [targets.index(t) for t in spec_targets]
    assert positions == sorted(positions), "spec mounts keep their order"

    # devices go into the new /dev tmpfs, before the pivot
    dev_mount = first(calls, "mount", "tmpfs", rootfs + "/dev")
    mknods = [i for i, x in enumerate(calls) if x[0] == "mknod"]
    assert [calls[i][1] for i in mknods] == [rootfs + d for d in (
        "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")]
    assert calls[mknods[0]][3] == os.makedev(1, 3)
    pivot = first(calls, "pivot_root", ".", ".")
    assert dev_mount < mknods[0] and mknods[-1] < pivot
    assert first(calls, "symlink", "pts/ptmx", rootfs + "/dev/ptmx") < pivot
    assert first(calls, "symlink", "/proc/self/fd", rootfs + "/dev/fd") < pivot
    assert max(targets.index(t) for t in spec_targets) < targets.index(".")

    # the pivot dance: old root made a slave and detached
    assert calls[pivot + 1][0] == "fchdir"
    assert calls[pivot + 2][1:] == ("", ".", "", S.MS_SLAVE | S.MS_REC, "")
    assert calls[pivot + 3][1:] == (".", S.MNT_DETACH)
    assert calls[pivot + 4] == ("chdir", "/")

    # after the pivot: read-only root, hostname, read-only and masked paths
    ro_root = last(calls, "mount", "", "/")
    assert calls[ro_root][4] & S.MS_RDONLY and calls[ro_root][4] & S.MS_REMOUNT
    assert calls[ro_root][4] & S.MS_NOSUID  # kernel-locked flags are kept
    host = first(calls, "sethostname", "berth")
    ro_sys = first(calls, "mount", "/proc/sys", "/proc/sys")
    mask_file = first(calls, "mount", "/dev/null", "/proc/keys")
    mask_dir = first(calls, "mount", "tmpfs", "/sys/firmware")
    assert calls[mask_dir][3:5] == ("tmpfs", S.MS_RDONLY)
    assert pivot < ro_root < host < ro_sys < mask_file
    assert "/proc/kcore" not in targets  # masked paths that do not exist are skipped

    # identity and capabilities, then ready, the exec fifo, seccomp, exec
    rlimit = first(calls, "setrlimit", 7, 1024, 1024)
    nnp = first(calls, "set_no_new_privs")
    bound = first(calls, "cap_bound_drop")
    keep = first(calls, "set_keepcaps", True)
    groups = first(calls, "setgroups", [])
    gid = last(calls, "setresgid", 0)
    uid = last(calls, "setresuid", 0)
    unkeep = first(calls, "set_keepcaps", False)
    capset = first(calls, "capset")
    chdir = last(calls, "chdir", "/")
    ready = first(calls, "send", "ready")
    fifo = first(calls, "open", "/proc/self/fd/50")
    cloexec = first(calls, "cloexec_from", 3)
    seccomp = first(calls, "seccomp_set_filter")
    execve = first(calls, "execve")
    assert (mask_file < rlimit < nnp < bound < keep < groups < gid < uid < unkeep < capset
            < chdir < ready < fifo < cloexec < seccomp < execve == len(calls) - 1)
    assert calls[fifo + 1][0] == "write" and calls[fifo + 1][2] == b"0"
    assert calls[execve][1:3] == ("/bin/sh", ["sh", "-c", "true"])
    assert calls[execve][3]["PATH"].startswith("/usr/local/sbin")


def test_first_child_reports_init_pid_and_stops(tmp_path: Path) -> None:
    c = container(tmp_path)
    sc = FakeSyscalls(host_files(c), forks=[777])
    sync = FakeSync(sc.calls, {})
    plan = steps.InitPlan(container=c, stdio=(0, 1, 2), fifo_fd=50)
    assert steps.run_init(sc, sync, plan) is True
    assert sc.calls[-1] == ("send", "pid", {"type": "pid", "pid": 777})
    assert not [x for x in sc.calls if x[0] in ("mount", "setsid", "execve")]


def test_without_pid_namespace_there_is_no_second_fork(tmp_path: Path) -> None:
    c = container(tmp_path, lambda cfg: cfg["linux"].update(
        namespaces=[{"type": "mount"}, {"type": "uts"}]))
    _, calls = run_init(c)
    assert not [x for x in calls if x[0] == "fork"]
    assert first(calls, "send", "pid") < first(calls, "mount")
    assert calls[first(calls, "send", "pid")][2]["pid"] == 4321
    assert calls[first(calls, "unshare")][1] == S.CLONE_NEWNS | S.CLONE_NEWUTS
    # a runtime exit must not kill a created container without its own pid namespace
    assert first(calls, "set_pdeathsig", 0) < first(calls, "send", "ready")


def test_user_namespace_waits_for_maps_and_binds_devices(tmp_path: Path) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["linux"]["namespaces"].append({"type": "user"})
        cfg["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 100}]
        cfg["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 100}]

    _, calls = run_init(container(tmp_path, mutate))
    newuser = first(calls, "unshare", S.CLONE_NEWUSER)
    asked = first(calls, "send", "userns")
    mapped = first(calls, "recv", "mapped")
    others = last(calls, "unshare")
    assert newuser < asked < mapped < first(calls, "setresgid", 0) < first(
        calls, "setresuid", 0) < others
    assert not calls[others][1] & S.CLONE_NEWUSER
    assert not [x for x in calls if x[0] == "mknod"]
    rootfs = str(tmp_path / "rootfs")
    bind = first(calls, "mount", "/dev/null", rootfs + "/dev/null")
    assert calls[bind][3:5] == ("bind", S.MS_BIND)


def test_join_namespaces_others_then_user_then_mount() -> None:
    """The pod's namespaces while the host's capabilities still count (a CRI pod's
    pinned IPC namespace belongs to the host's user namespace), the user namespace
    after them, the mount namespace last."""
    sc = FakeSyscalls()
    steps.join_namespaces(sc, [("mount", 5), ("network", 6), ("user", 7), ("ipc", 8)])
    setns = [x[1:] for x in sc.calls if x[0] == "setns"]
    assert setns == [(6, S.CLONE_NEWNET), (8, S.CLONE_NEWIPC), (7, S.CLONE_NEWUSER),
                     (5, S.CLONE_NEWNS)]
    assert [x for x in sc.calls if x[0] == "close"] == [("close", fd) for fd in (6, 8, 7, 5)]


def test_join_namespaces_retries_after_the_user_namespace() -> None:
    """One that needs the user namespace's rights (EPERM before) is joined after it."""
    sc = FakeSyscalls(fail={"setns": [OSError(errno.EPERM, "setns")]})
    steps.join_namespaces(sc, [("ipc", 8), ("user", 7), ("uts", 9)])
    setns = [x[1] for x in sc.calls if x[0] == "setns"]
    assert setns == [8, 9, 7, 8]
    sc = FakeSyscalls(fail={"setns": [OSError(errno.EPERM, "setns")]})
    with pytest.raises(OSError):  # without a user namespace to join, EPERM is final
        steps.join_namespaces(sc, [("ipc", 8), ("uts", 9)])


def test_seccomp_without_no_new_privs_goes_before_dropping_caps(tmp_path: Path) -> None:
    c = container(tmp_path, lambda cfg: cfg["process"].update(noNewPrivileges=False))
    _, calls = run_init(c, seccomp=(b"\0" * 8, 1))
    filters = [i for i, x in enumerate(calls) if x[0] == "seccomp_set_filter"]
    assert len(filters) == 1
    assert calls[filters[0]][1:] == (b"\0" * 8, 1)
    assert filters[0] < first(calls, "cap_bound_drop") < first(calls, "capset")
    assert not [x for x in calls if x[0] == "set_no_new_privs"]


def test_bounding_set_drops_everything_else(tmp_path: Path) -> None:
    _, calls = run_init(container(tmp_path))
    dropped = {x[1] for x in calls if x[0] == "cap_bound_drop"}
    kept = {5, 10, 29}  # CAP_KILL, CAP_NET_BIND_SERVICE, CAP_AUDIT_WRITE
    assert dropped == set(range(41)) - kept
    capset = calls[first(calls, "capset")]
    mask = sum(1 << n for n in kept)
    assert capset[1:] == (mask, mask, 0)
    assert [x[1] for x in calls if x[0] == "cap_ambient_raise"] == sorted(kept)


def test_user_and_groups_from_spec(tmp_path: Path) -> None:
    c = container(tmp_path, lambda cfg: cfg["process"].update(
        user={"uid": 1000, "gid": 100, "additionalGids": [5, 6], "umask": 0o077},
        cwd="/work"))
    sc, calls = run_init(c)
    assert first(calls, "setgroups", [5, 6]) < first(calls, "setresgid", 100) < first(
        calls, "setresuid", 1000) < last(calls, "chdir", "/work")
    assert ("umask", 0o077) in calls
    assert ("mkdir", c.rootfs + "/work") in calls  # a missing cwd is created in the image


def test_hooks_sync_points(tmp_path: Path) -> None:
    hook = {"path": "/bin/hook", "args": ["hook", "x"], "env": ["A=1"]}

    def mutate(cfg: dict[str, Any]) -> None:
        cfg["hooks"] = {"createRuntime": [hook], "createContainer": [hook],
                        "startContainer": [hook]}

    sc, calls = run_init(container(tmp_path, mutate), forks=[0, 901, 902],
                         replies={"hooked": {"state": '{"status": "creating"}',
                                             "start_state": '{"status": "created"}'}})
    asked = first(calls, "send", "hooks")
    answered = first(calls, "recv", "hooked")
    create_hook = first(calls, "fork", 901)
    start_hook = first(calls, "fork", 902)
    pivot = first(calls, "pivot_root")
    assert last(calls, "mknod") < asked < answered < create_hook < pivot
    assert first(calls, "open", "/proc/self/fd/50") < start_hook < first(calls, "execve")
    writes = [x[2] for x in calls if x[0] == "write"]
    assert b'{"status": "creating"}' in writes and b'{"status": "created"}' in writes
    assert ("waitpid", 901) in calls and ("waitpid", 902) in calls


def test_terminal_sends_pty_master_and_binds_console(tmp_path: Path) -> None:
    c = container(tmp_path, lambda cfg: cfg["process"].update(terminal=True))
    _, calls = run_init(c, console_fd=60)
    pty = first(calls, "open_pty", "/dev/ptmx")
    sent = first(calls, "send_fd", 60)
    slave = first(calls, "open", "/dev/pts/0")
    console = first(calls, "mount", "/dev/pts/0", "/dev/console")
    ctty = first(calls, "set_ctty", 0)
    assert first(calls, "pivot_root") < pty < sent < slave < console < ctty
    assert [x[2] for x in calls[console:ctty] if x[0] == "dup2"] == [0, 1, 2]


def test_missing_executable_is_reported_before_ready(tmp_path: Path) -> None:
    c = container(tmp_path, lambda cfg: cfg["process"].update(args=["nope"]))
    sc = FakeSyscalls(host_files(c))
    sync = FakeSync(sc.calls, {})
    plan = steps.InitPlan(container=c, stdio=(0, 1, 2), fifo_fd=50)
    with pytest.raises(steps.SetupError, match=r'exec: "nope": executable file not found'):
        steps.run_init(sc, sync, plan)
    assert not [x for x in sc.calls if x[:2] == ("send", "ready")]


# ---- exec ----------------------------------------------------------------------------
def test_exec_sequence(tmp_path: Path) -> None:
    p = ispec.parse_process({"args": ["sh"], "env": ["PATH=/bin"], "cwd": "/",
                             "noNewPrivileges": True, "user": {"uid": 7, "gid": 8}},
                            known_last=40)
    sc = FakeSyscalls({"/bin/sh": REG}, forks=[0])
    sync = FakeSync(sc.calls, {})
    plan = steps.ExecPlan(process=p, stdio=(3, 4, 5),
                          ns_fds=[("pid", 20), ("mount", 21), ("user", 22)],
                          seccomp=(b"\0" * 8, 0))
    with pytest.raises(Exec):
        steps.run_exec(sc, sync, plan)
    calls = sc.calls
    setns = [x[1] for x in calls if x[0] == "setns"]
    assert setns == [20, 22, 21]
    assert first(calls, "recv", "go") < first(calls, "setns") < first(calls, "fork")
    assert first(calls, "fork") < first(calls, "setsid") < first(calls, "set_no_new_privs")
    assert first(calls, "setresuid", 7) < first(calls, "capset") < first(calls, "send", "ready")
    assert first(calls, "send", "ready") < first(calls, "seccomp_set_filter") < first(
        calls, "execve")
    assert not [x for x in calls if x[0] in ("mount", "pivot_root", "unshare", "sync_close")]


def test_exec_intermediate_reports_pid() -> None:
    p = ispec.parse_process({"args": ["sh"]}, known_last=40)
    sc = FakeSyscalls(forks=[555])
    sync = FakeSync(sc.calls, {})
    assert steps.run_exec(sc, sync, steps.ExecPlan(process=p, stdio=(0, 1, 2),
                                                   ns_fds=[("pid", 9)])) is True
    assert sc.calls[-1][:2] == ("send", "pid") and sc.calls[-1][2]["pid"] == 555


# ---- mounts ----------------------------------------------------------------------------
def test_secure_join_keeps_symlinks_inside_rootfs() -> None:
    sc = FakeSyscalls({"/r": DIR})
    sc.files["/r/evil"] = stat.S_IFLNK | 0o777
    sc.links["/r/evil"] = "/../../etc"
    sc.files["/r/rel"] = stat.S_IFLNK | 0o777
    sc.links["/r/rel"] = "../../../../x/y"
    assert mounts.secure_join(sc, "/r", "/evil/passwd") == "/r/etc/passwd"
    assert mounts.secure_join(sc, "/r", "rel/z") == "/r/x/y/z"
    assert mounts.secure_join(sc, "/r", "/../..") == "/r"
    sc.files["/r/loop"] = stat.S_IFLNK | 0o777
    sc.links["/r/loop"] = "loop"
    with pytest.raises(OSError) as e:
        mounts.secure_join(sc, "/r", "/loop")
    assert e.value.errno == errno.ELOOP


class LockedNodev(FakeSyscalls):
    """A mount whose nodev flag the kernel locked: remounts without it are refused."""

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        self._rec("mount", source, target, fstype, flags, data)
        if flags & S.MS_REMOUNT and not flags & S.MS_NODEV:
            raise PermissionError(errno.EPERM, "locked")


def test_bind_mount_read_only_remount_keeps_locked_flags(tmp_path: Path) -> None:
    c = container(tmp_path)
    m = ispec.parse_mount({"destination": "/data", "type": "bind", "source": "/srv",
                           "options": ["rbind", "ro", "nosuid", "rprivate"]}, str(tmp_path))
    sc = LockedNodev({c.rootfs: DIR, "/srv": DIR})
    mounts.mount_one(sc, c, m, [])
    ms = [x for x in sc.calls if x[0] == "mount"]
    dest = c.rootfs + "/data"
    assert ("mkdir", dest) in sc.calls
    assert ms[0][1:] == ("/srv", dest, "bind", S.MS_BIND | S.MS_REC, "")
    assert ms[1][4] == S.MS_RDONLY | S.MS_NOSUID | S.MS_REMOUNT | S.MS_BIND
    assert ms[2][4] == ms[1][4] | S.MS_NODEV
    assert ms[3][1:] == ("", dest, "", S.MS_PRIVATE | S.MS_REC, "")


def test_file_bind_creates_a_file(tmp_path: Path) -> None:
    c = container(tmp_path)
    m = ispec.parse_mount({"destination": "/etc/resolv.conf", "type": "bind",
                           "source": "/host/resolv.conf", "options": ["rbind"]}, str(tmp_path))
    sc = FakeSyscalls({c.rootfs: DIR, "/host/resolv.conf": REG})
    mounts.mount_one(sc, c, m, [])
    assert ("mkdir", c.rootfs + "/etc") in sc.calls
    assert ("touch", c.rootfs + "/etc/resolv.conf") in sc.calls


def test_cgroup_mount_v1_and_v2(tmp_path: Path) -> None:
    c = container(tmp_path)
    m = next(m for m in c.mounts if m.type == "cgroup")
    dest = c.rootfs + "/sys/fs/cgroup"
    sc = FakeSyscalls({c.rootfs: DIR})
    mounts.mount_one(sc, c, m, [("cpu", "/h/cpu/x"), ("memory", "/h/memory/x")])
    ms = [x[1:] for x in sc.calls if x[0] == "mount"]
    assert ms[0][:3] == ("tmpfs", dest, "tmpfs") and not ms[0][3] & S.MS_RDONLY
    assert ms[1][:2] == ("/h/cpu/x", dest + "/cpu")
    assert ms[2][3] & S.MS_RDONLY and ms[2][3] & S.MS_REMOUNT
    assert ms[3][:2] == ("/h/memory/x", dest + "/memory")
    assert ms[-1][1] == dest and ms[-1][3] & S.MS_RDONLY and ms[-1][3] & S.MS_REMOUNT

    sc = FakeSyscalls({c.rootfs: DIR})
    mounts.mount_one(sc, c, m, [("", "/sys/fs/cgroup/x")])
    ms = [x[1:] for x in sc.calls if x[0] == "mount"]
    assert ms[0][:4] == ("/sys/fs/cgroup/x", dest, "bind", S.MS_BIND)
    assert ms[1][3] & S.MS_RDONLY and len(ms) == 2


def test_pivot_root_falls_back_to_move_and_chroot() -> None:
    sc = FakeSyscalls(fail={"pivot_root": [OSError(errno.EINVAL, "initramfs")]})
    mounts.pivot_root(sc, "/r")
    names = [x[0] for x in sc.calls]
    move = first(sc.calls, "mount", "/r", "/")
    assert sc.calls[move][4] == S.MS_MOVE
    assert names[move + 1:move + 3] == ["chroot", "chdir"]
    assert "umount2" not in names
    assert names.count("close") == 2


def test_read_only_dev_is_remounted_after_devices(tmp_path: Path) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["mounts"][1]["options"].append("ro")

    c = container(tmp_path, mutate)
    _, calls = run_init(c)
    dev = first(calls, "mount", "tmpfs", c.rootfs + "/dev")
    assert not calls[dev][4] & S.MS_RDONLY
    remount = first(calls, "mount", "", c.rootfs + "/dev")
    assert calls[remount][4] & S.MS_RDONLY
    assert last(calls, "mknod") < remount < first(calls, "pivot_root")


# ---- entering a container: nothing of the shim goes in --------------------------------
def test_enter_goes_non_dumpable_then_keeps_only_the_plans_fds(tmp_path: Path) -> None:
    p = ispec.parse_process({"args": ["sh"]}, known_last=40)
    plan = steps.ExecPlan(process=p, stdio=(7, 8, 9), ns_fds=[("pid", 20), ("mount", 21)],
                          console_fd=30, exec_fd=40)
    assert plan.fds() == {7, 8, 9, 20, 21, 30, 40}
    init = steps.InitPlan(container=container(tmp_path), stdio=(3, 3, 4), fifo_fd=50)
    assert init.fds() == {3, 4, 50}  # no stub: -1 is not an fd
    sc = FakeSyscalls()
    steps.enter(sc, plan.fds() | {60})
    assert sc.calls == [("set_dumpable", False), ("close_fds_except", {7, 8, 9, 20, 21, 30,
                                                                       40, 60})]


def test_commands_are_exec_ed_through_the_stub(tmp_path: Path) -> None:
    p = ispec.parse_process({"args": ["sh", "-c", "x"], "env": ["PATH=/bin"], "cwd": "/"},
                            known_last=40)
    sc = FakeSyscalls({"/bin/sh": REG}, forks=[0])
    plan = steps.ExecPlan(process=p, stdio=(3, 4, 5), exec_fd=77)
    with pytest.raises(Exec):
        steps.run_exec(sc, FakeSync(sc.calls, {}), plan)
    name, path, args, env = sc.calls[-1]
    assert (name, path, args) == ("execve", 77, ["berth-ex", "/bin/sh", "sh", "-c", "x"])
    assert first(sc.calls, "cloexec_from", 3) < len(sc.calls) - 1
    # Through its /proc link when the container has a /proc: a plain execve.
    sc = FakeSyscalls({"/bin/sh": REG, "/proc/self/fd/77": stat.S_IFLNK | 0o700}, forks=[0])
    with pytest.raises(Exec):
        steps.run_exec(sc, FakeSync(sc.calls, {}), plan)
    assert sc.calls[-1][1:3] == ("/proc/self/fd/77", ["berth-ex", "/bin/sh", "sh", "-c", "x"])
    # The init too, and the hooks it runs in the container.
    _, calls = run_init(container(tmp_path), exec_fd=88)
    assert calls[-1][1] == 88 and calls[-1][2][0] == "berth-ex"
    sc = FakeSyscalls(forks=[0])
    with pytest.raises(SystemExit):  # the forked hook process ends after its execve
        hooks.run_in_child(sc, "startContainer", [{"path": "/bin/hook", "args": ["h", "a"]}],
                           "{}", exec_fd=88)
    assert [x[1:3] for x in sc.calls if x[0] == "execve"] == [
        (88, ["berth-ex", "/bin/hook", "h", "a"])]


def test_bind_source_symlink_is_followed_on_the_host(tmp_path: Path) -> None:
    c = container(tmp_path)
    m = ispec.parse_mount({"destination": "/hostlib", "type": "bind", "source": "/lib",
                           "options": ["rbind", "ro"]}, str(tmp_path))
    sc = FakeSyscalls({c.rootfs: DIR, "/usr/lib": DIR, "/lib": stat.S_IFLNK | 0o777})
    sc.links["/lib"] = "/usr/lib"
    mounts.mount_one(sc, c, m, [])
    dest = c.rootfs + "/hostlib"
    assert ("mkdir", dest) in sc.calls and ("touch", dest) not in sc.calls
    ms = [x for x in sc.calls if x[0] == "mount"]
    assert ms[0][1:] == ("/usr/lib", dest, "bind", S.MS_BIND | S.MS_REC, "")


def test_lookup_and_interpreter_fail_as_errors_of_the_request() -> None:
    class Heads(FakeSyscalls):
        def read_head(self, path: str, size: int) -> bytes:
            return {"/s": b"#!/no/sh -e\necho\n", "/t": b"#!/bin/sh\n",
                    "/e": b"\x7fELF"}.get(path, b"")[:size]

    sc = Heads({"/s": REG, "/t": REG, "/e": REG, "/bin/sh": REG, "/d": DIR})
    p = ispec.parse_process({"args": ["/missing"]}, known_last=40)
    with pytest.raises(steps.SetupError, match='stat /missing: no such file'):
        steps.lookup(sc, p)
    p = ispec.parse_process({"args": ["/d"]}, known_last=40)
    with pytest.raises(steps.SetupError, match='"/d": permission denied'):
        steps.lookup(sc, p)
    with pytest.raises(steps.SetupError, match=r"exec /s: .*\(interpreter /no/sh\)"):
        steps.check_interpreter(sc, "/s")
    for path in ("/t", "/e", "/unreadable"):
        steps.check_interpreter(sc, path)


def test_init_in_a_joined_user_namespace_becomes_its_root(tmp_path: Path) -> None:
    """A pod's user namespace joined by path: root there before the rootfs is set up (the
    host's root is unmapped in it); the oom score set before any of it."""
    def joined(cfg: dict[str, Any]) -> None:
        cfg["linux"]["namespaces"].append({"type": "user", "path": "/run/pod/userns"})
        cfg["linux"]["uidMappings"] = cfg["linux"]["gidMappings"] = [
            {"containerID": 0, "hostID": 100000, "size": 65536}]
        cfg["process"]["oomScoreAdj"] = 5
    c = container(tmp_path, joined)
    _, calls = run_init(c, ns_fds=[("ipc", 8), ("user", 7)])
    assert not [x for x in calls if x[0] == "unshare" and x[1] & S.CLONE_NEWUSER]
    oom = first(calls, "write_file", "/proc/self/oom_score_adj")
    assert oom < first(calls, "setns", 8) < first(calls, "setns", 7) < \
        first(calls, "setresuid", 0) < first(calls, "mount")
