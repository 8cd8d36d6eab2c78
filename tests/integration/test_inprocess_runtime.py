"""The in-process OCI runtime on the real kernel: busybox containers, end to end.

Each test builds a bundle from Debian's busybox-static (the binary copied into rootfs/bin
with its applet symlinks) and a config like ``runc spec`` writes, runs it through
``Runtime`` with a real ``Reaper``, and checks what the container saw. Fixtures remove every
container, cgroup directory and temporary folder, also when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from berth.core import errdefs
from berth.core.oci import Reaper, Stdio, spec as oci_spec
from berth.plugins.runtimes.inprocess import Runtime, caps

pytestmark = pytest.mark.root

BUSYBOX = "/bin/busybox"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# containerd's default capability set (its spec generator gives it to every container)
CONTAINERD_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]


def _applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def applets() -> list[str]:
    return _applets()


@pytest.fixture
def workdir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="berth-rt-", dir="/tmp"))
    base.chmod(0o755)  # a user-namespaced root must be able to reach its rootfs
    yield base
    mounted = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if str(base) in line]
    shutil.rmtree(base, ignore_errors=True)
    assert not mounted, f"mounts left behind: {mounted}"


def _cgroup_dirs(name: str) -> list[Path]:
    return [p for p in CGROUP_ROOT.glob(f"*/{name}") if p.is_dir()]


@pytest.fixture
def cgroup_parent() -> Iterator[str]:
    """A unique parent for the test's container cgroups, removed afterwards."""
    name = f"berth-test-{uuid.uuid4().hex[:12]}"
    yield name
    for top in _cgroup_dirs(name):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            for pid in (d / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            d.rmdir()
        top.rmdir()


@dataclass
class Env:
    runtime: Runtime
    reaper: Reaper
    workdir: Path
    cgroup_parent: str
    applets: list[str]

    def bundle(self, id: str, args: list[str],
               mutate: Callable[[dict[str, Any]], None] | None = None) -> Path:
        b = self.workdir / id
        rootfs = b / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for name in self.applets:
            if name != "busybox":
                os.symlink("busybox", rootfs / "bin" / name)
        for d in ("proc", "sys", "dev", "tmp", "etc", "root"):
            (rootfs / d).mkdir()
        (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        cfg = oci_spec.default(args)
        cfg["process"]["terminal"] = False
        cfg["linux"]["cgroupsPath"] = f"/{self.cgroup_parent}/{id}"
        if mutate:
            mutate(cfg)
        (b / "config.json").write_text(json.dumps(cfg, indent=2))
        return b


@pytest.fixture
async def env(nursery: trio.Nursery, workdir: Path, cgroup_parent: str,
              applets: list[str]) -> Any:
    reaper = Reaper()
    await nursery.start(reaper.run)
    runtime = Runtime(workdir / "state", reaper)
    yield Env(runtime, reaper, workdir, cgroup_parent, applets)
    for id in runtime.list():
        await runtime.delete(id, force=True)


class Pipe:
    """A pipe whose write end is a container's stdout/stderr; read back after exit."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)

    def close_write(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    async def read_all(self) -> str:
        self.close_write()
        out = bytearray()
        with trio.fail_after(10):
            async with trio.lowlevel.FdStream(os.dup(self.r)) as stream:
                while chunk := await stream.receive_some(65536):
                    out += chunk
        return out.decode()

    def pending(self) -> bytes | None:
        os.set_blocking(self.r, False)
        try:
            return os.read(self.r, 4096)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self.close_write()
        os.close(self.r)


@dataclass
class Result:
    status: int
    out: str
    err: str
    pid: int


async def run(env: Env, id: str, args: list[str],
              mutate: Callable[[dict[str, Any]], None] | None = None, *,
              between: Callable[[int], Any] | None = None) -> Result:
    """create, start, wait for the init's exit, read its output, delete."""
    bundle = env.bundle(id, args, mutate)
    out, err = Pipe(), Pipe()
    try:
        pid = await env.runtime.create(id, bundle, stdio=Stdio(None, out.w, err.w))
        out.close_write()
        err.close_write()
        await env.runtime.start(id)
        if between is not None:
            await between(pid)
        with trio.fail_after(30):
            exit = await env.reaper.wait(pid)
        result = Result(exit.status, await out.read_all(), await err.read_all(), pid)
        assert (await env.runtime.state(id)).status == "stopped"
        await env.runtime.delete(id)
        return result
    finally:
        out.close()
        err.close()


async def test_echo_through_stdio_fds(env: Env) -> None:
    r = await run(env, "echo", ["sh", "-c", "echo hi; echo oops >&2"])
    assert (r.status, r.out, r.err) == (0, "hi\n", "oops\n")


async def test_exit_code(env: Env) -> None:
    r = await run(env, "exit3", ["sh", "-c", "exit 3"])
    assert r.status == 3


async def test_create_blocks_until_start(env: Env) -> None:
    bundle = env.bundle("blocked", ["echo", "started"])
    out = Pipe()
    try:
        pid = await env.runtime.create("blocked", bundle, stdio=Stdio(None, out.w, None))
        out.close_write()
        state = await env.runtime.state("blocked")
        assert (state.status, state.pid) == ("created", pid)
        await trio.sleep(0.2)
        assert out.pending() is None  # nothing ran yet
        assert env.reaper.exited(pid) is None
        # still the runtime's forked child, blocked on exec.fifo, not busybox
        assert os.readlink(f"/proc/{pid}/exe") == os.readlink("/proc/self/exe")
        await env.runtime.start("blocked")
        with trio.fail_after(10):
            assert (await env.reaper.wait(pid)).status == 0
        os.set_blocking(out.r, True)
        assert await out.read_all() == "started\n"
        with pytest.raises(errdefs.FailedPrecondition):
            await env.runtime.start("blocked")
        await env.runtime.delete("blocked")
    finally:
        out.close()


async def test_no_host_pids_visible(env: Env) -> None:
    r = await run(env, "pids", ["sh", "-c", "ps -o pid,comm; ls /proc"])
    pids = {int(w) for w in r.out.split() if w.isdigit()}
    assert 1 in pids
    assert max(pids) < 10, r.out
    assert r.pid != 1


async def test_mount_fails_without_cap_sys_admin(env: Env) -> None:
    r = await run(env, "nomount", ["mount", "-t", "tmpfs", "tmpfs", "/tmp"])
    assert r.status != 0
    assert "denied" in r.err or "not permitted" in r.err, r.err


async def test_masked_and_readonly_paths(env: Env) -> None:
    # /proc/kcore when the kernel has one (this VM's has not), else the masked files that
    # exist here: each reads as empty, each masked directory lists nothing.
    files = [p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list")
             if os.path.isfile(p) and Path(p).read_bytes()[:1]]
    dirs = [p for p in ("/proc/acpi", "/sys/firmware") if os.path.isdir(p) and os.listdir(p)]
    assert files and dirs  # something the mask visibly hides
    script = "; ".join([f"echo {p}=$(wc -c < {p})" for p in files]
                       + [f"echo {p}=$(ls -A {p} | wc -l)" for p in dirs]
                       + ["grep -E ' /(sys|proc/sys) ' /proc/mounts",
                          "echo x > /proc/sys/kernel/hostname || echo rofail"])
    r = await run(env, "masked", ["sh", "-c", script])
    lines = r.out.splitlines()
    for p in files + dirs:
        assert f"{p}=0" in lines, r.out
    sys_line = next(line for line in lines if " /sys " in line)
    assert sys_line.split()[3].split(",")[0] == "ro"
    procsys = next(line for line in lines if " /proc/sys " in line)
    assert procsys.split()[3].split(",")[0] == "ro"
    assert "rofail" in r.out


async def test_capabilities_and_no_new_privs(env: Env) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["process"]["capabilities"] = {k: list(CONTAINERD_CAPS) for k in
                                          ("bounding", "effective", "permitted",
                                           "inheritable", "ambient")}

    r = await run(env, "caps", ["grep", "-E", "^(Cap|NoNewPrivs)", "/proc/self/status"],
                  mutate)
    fields = dict(line.split(":\t") for line in r.out.splitlines())
    want = caps.mask(CONTAINERD_CAPS, known_last=caps.last_cap())
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[key], 16) == want, (key, fields)
    assert fields["NoNewPrivs"].strip() == "1"


async def test_hostname(env: Env) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["hostname"] = "berth-box"

    r = await run(env, "host", ["hostname"], mutate)
    assert r.out == "berth-box\n"
    assert socket.gethostname() != "berth-box"


async def test_memory_limit_kills_hog(env: Env) -> None:
    limit = 32 * 1024 * 1024

    def mutate(cfg: dict[str, Any]) -> None:
        cfg["linux"]["resources"]["memory"] = {"limit": limit, "swap": limit}

    stats: dict[str, Any] = {}
    bundle = env.bundle("oom", ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
                        mutate)
    pid = await env.runtime.create("oom", bundle, stdio=Stdio())
    await env.runtime.start("oom")
    with trio.fail_after(30):
        exit = await env.reaper.wait(pid)
    stats = await env.runtime.stats("oom")
    await env.runtime.delete("oom")
    assert exit.status == 128 + signal.SIGKILL
    assert stats["memory"]["limit"] == limit
    assert stats["memory"]["oom_kill"] >= 1
    assert stats["memory"]["max_usage"] == limit


async def test_pause_resume(env: Env) -> None:
    bundle = env.bundle("pause", ["sleep", "60"])
    pid = await env.runtime.create("pause", bundle, stdio=Stdio())
    await env.runtime.start("pause")
    freezer = CGROUP_ROOT / "freezer" / env.cgroup_parent / "pause" / "freezer.state"
    await env.runtime.pause("pause")
    assert (await env.runtime.state("pause")).status == "paused"
    assert freezer.read_text().strip() == "FROZEN"
    with pytest.raises(errdefs.FailedPrecondition):
        await env.runtime.pause("pause")
    await env.runtime.resume("pause")
    assert (await env.runtime.state("pause")).status == "running"
    assert freezer.read_text().strip() == "THAWED"
    await env.runtime.kill("pause", signal.SIGKILL)
    with trio.fail_after(10):
        assert (await env.reaper.wait(pid)).status == 137
    with pytest.raises(errdefs.FailedPrecondition):
        await env.runtime.kill("pause", signal.SIGKILL)
    await env.runtime.delete("pause")


def _ns_links(pid: int | str) -> dict[str, str]:
    return {n: os.readlink(f"/proc/{pid}/ns/{n}") for n in ("pid", "mnt", "net", "ipc", "uts")}


async def test_exec_joins_namespaces_and_cgroup(env: Env) -> None:
    bundle = env.bundle("exec", ["sleep", "60"])
    pid = await env.runtime.create("exec", bundle, stdio=Stdio())
    await env.runtime.start("exec")
    out = Pipe()
    try:
        process = {"args": ["sh", "-c", "for n in pid mnt net ipc uts; do readlink "
                            "/proc/self/ns/$n; done; cat /proc/self/cgroup; exit 7"],
                   "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                   "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                                    "permitted": ["CAP_KILL"]}}
        xpid = await env.runtime.exec("exec", process, stdio=Stdio(None, out.w, out.w))
        out.close_write()
        with trio.fail_after(10):
            assert (await env.reaper.wait(xpid)).status == 7
        lines = (await out.read_all()).splitlines()
        want = _ns_links(pid)
        assert lines[:5] == [want[n] for n in ("pid", "mnt", "net", "ipc", "uts")]
        assert lines[:5] != list(_ns_links("self").values())
        assert any(f"memory:/{env.cgroup_parent}/exec" in line for line in lines)
        assert sorted(await env.runtime.ps("exec")) == [pid]
    finally:
        out.close()
    await env.runtime.delete("exec", force=True)


async def test_kill_all_and_delete_leave_nothing(env: Env) -> None:
    bundle = env.bundle("gone", ["sh", "-c", "sleep 60 & sleep 60"])
    pid = await env.runtime.create("gone", bundle, stdio=Stdio())
    await env.runtime.start("gone")
    xpid = await env.runtime.exec("gone", {"args": ["sleep", "60"], "env": ["PATH=/bin"],
                                           "cwd": "/"}, stdio=Stdio())
    with trio.fail_after(10):
        while len(await env.runtime.ps("gone")) < 3:
            await trio.sleep(0.01)
    procs = await env.runtime.ps("gone")
    assert pid in procs and xpid in procs
    with pytest.raises(errdefs.FailedPrecondition):
        await env.runtime.delete("gone")
    await env.runtime.kill("gone", signal.SIGKILL, all=True)
    with trio.fail_after(10):
        assert (await env.reaper.wait(pid)).status == 137
        assert (await env.reaper.wait(xpid)).status == 137
    dirs = _cgroup_dirs(f"{env.cgroup_parent}/gone")
    assert len(dirs) >= 5
    await env.runtime.delete("gone")
    assert _cgroup_dirs(f"{env.cgroup_parent}/gone") == []
    assert not (env.workdir / "state" / "gone").exists()
    for p in procs:
        assert not Path(f"/proc/{p}").exists()
    rootfs = str(env.workdir / "gone" / "rootfs")
    assert rootfs not in Path("/proc/self/mountinfo").read_text()
    with pytest.raises(errdefs.NotFound):
        await env.runtime.state("gone")


async def test_force_delete_of_running_container(env: Env) -> None:
    bundle = env.bundle("force", ["sleep", "60"])
    pid = await env.runtime.create("force", bundle, stdio=Stdio())
    await env.runtime.start("force")
    await env.runtime.pause("force")
    await env.runtime.delete("force", force=True)
    with trio.fail_after(10):
        assert (await env.reaper.wait(pid)).status == 137
    assert _cgroup_dirs(f"{env.cgroup_parent}/force") == []


async def test_delete_created_container(env: Env) -> None:
    bundle = env.bundle("created", ["true"])
    pid = await env.runtime.create("created", bundle, stdio=Stdio())
    await env.runtime.delete("created")
    with trio.fail_after(10):
        assert (await env.reaper.wait(pid)).status == 137
    assert _cgroup_dirs(f"{env.cgroup_parent}/created") == []


async def test_terminal_goes_to_console_socket(env: Env) -> None:
    path = str(env.workdir / "console.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)

    def mutate(cfg: dict[str, Any]) -> None:
        cfg["process"]["terminal"] = True

    bundle = env.bundle("tty", ["sh", "-c", "tty; echo hello-from-tty"], mutate)
    pid = await env.runtime.create("tty", bundle, stdio=Stdio(), console_socket=path)
    conn, _ = await listener.accept()
    with conn, listener, socket.socket(fileno=os.dup(conn.fileno())) as plain:
        plain.setblocking(True)
        _, fds, _, _ = await trio.to_thread.run_sync(socket.recv_fds, plain, 1024, 1)
    assert len(fds) == 1
    master = fds[0]
    try:
        await env.runtime.start("tty")
        with trio.fail_after(10):
            assert (await env.reaper.wait(pid)).status == 0
        out = b""
        os.set_blocking(master, False)
        while True:
            try:
                chunk = os.read(master, 4096)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            out += chunk
        assert b"/dev/pts/0" in out
        assert b"hello-from-tty" in out
    finally:
        os.close(master)
    await env.runtime.delete("tty")


async def test_user_namespace(env: Env) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["linux"]["namespaces"].append({"type": "user"})
        cfg["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        cfg["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]

    r = await run(env, "userns", ["sh", "-c", "cat /proc/self/uid_map; id -u; "
                                  "ls -ln /dev/null"], mutate)
    assert r.status == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["0", "100000", "65536"]
    assert lines[1] == "0"


async def test_hooks_get_state(env: Env) -> None:
    marks = env.workdir / "marks"
    marks.mkdir()

    def hook(name: str) -> dict[str, Any]:
        return {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {marks}/{name}"]}

    def mutate(cfg: dict[str, Any]) -> None:
        cfg["hooks"] = {k: [hook(k)] for k in ("prestart", "createRuntime",
                                               "createContainer", "poststart", "poststop")}

    r = await run(env, "hooks", ["true"], mutate)
    assert r.status == 0
    states = {p.name: json.loads(p.read_text()) for p in marks.iterdir()}
    assert set(states) == {"prestart", "createRuntime", "createContainer", "poststart",
                           "poststop"}
    for name, st in states.items():
        assert st["id"] == "hooks"
        assert st["bundle"] == str(env.workdir / "hooks")
        if name != "poststop":
            assert st["pid"] == r.pid
    assert states["createRuntime"]["status"] == "creating"
    assert states["poststart"]["status"] == "running"


async def test_failing_hook_fails_create_and_cleans_up(env: Env) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["hooks"] = {"createRuntime": [{"path": "/bin/sh",
                                           "args": ["sh", "-c", "echo nope; exit 2"]}]}

    bundle = env.bundle("badhook", ["true"], mutate)
    with pytest.raises(errdefs.Unknown, match="nope"):
        await env.runtime.create("badhook", bundle, stdio=Stdio())
    assert _cgroup_dirs(f"{env.cgroup_parent}/badhook") == []
    assert env.runtime.list() == []


async def test_seccomp_errno(env: Env) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                              "options": ["nosuid", "nodev"]})
        cfg["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
            "syscalls": [{"names": ["mkdir", "mkdirat", "no_such_syscall"],
                          "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
        }

    r = await run(env, "seccomp", ["sh", "-c", "mkdir /tmp/x; echo rc=$?; touch /tmp/y && "
                                   "echo touched"], mutate)
    assert "rc=1" in r.out
    assert "Permission denied" in r.err  # errnoRet 13 is EACCES
    assert "touched" in r.out


async def test_executable_not_found(env: Env) -> None:
    bundle = env.bundle("missing", ["no-such-binary"])
    with pytest.raises(errdefs.Unknown, match="executable file not found"):
        await env.runtime.create("missing", bundle, stdio=Stdio())
    assert _cgroup_dirs(f"{env.cgroup_parent}/missing") == []
    with pytest.raises(errdefs.NotFound):
        await env.runtime.state("missing")


async def test_ids_and_states(env: Env) -> None:
    with pytest.raises(errdefs.NotFound):
        await env.runtime.kill("nope", signal.SIGKILL)
    with pytest.raises(errdefs.InvalidArgument):
        await env.runtime.create("../x", env.workdir, stdio=Stdio())
    bundle = env.bundle("dup", ["sleep", "60"])
    pid_file = env.workdir / "dup.pid"
    pid = await env.runtime.create("dup", bundle, stdio=Stdio(), pid_file=pid_file)
    assert int(pid_file.read_text()) == pid
    with pytest.raises(errdefs.AlreadyExists):
        await env.runtime.create("dup", bundle, stdio=Stdio())
    await env.runtime.start("dup")
    await env.runtime.update("dup", {"pids": {"limit": 42}})
    assert (CGROUP_ROOT / "pids" / env.cgroup_parent / "dup" / "pids.max").read_text() == "42\n"
    stats = await env.runtime.stats("dup")
    assert stats["pids"] == {"current": 1, "limit": 42}
    await env.runtime.delete("dup", force=True)
    with trio.fail_after(10):
        await env.reaper.wait(pid)


async def test_process_settings(env: Env) -> None:
    data = env.workdir / "hostdata"
    data.mkdir()
    (data / "file").write_text("from-host\n")

    def mutate(cfg: dict[str, Any]) -> None:
        cfg["process"]["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [5, 7],
                                  "umask": 0o027}
        cfg["process"]["cwd"] = "/work/dir"
        cfg["process"]["env"].append("GREETING=hello world")
        cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654}]
        cfg["mounts"].append({"destination": "/data", "type": "bind", "source": str(data),
                              "options": ["rbind", "ro", "nosuid", "nodev"]})
        cfg["root"]["readonly"] = False

    script = ("id -u; id -g; id -G; umask; pwd; echo $GREETING; ulimit -n; ulimit -Hn; "
              "cat /data/file; touch /data/new 2>/dev/null || echo data-ro; "
              "grep ' /data ' /proc/mounts")
    r = await run(env, "settings", ["sh", "-c", script], mutate)
    lines = r.out.splitlines()
    assert lines[:9] == ["1000", "1001", "1001 5 7", "0027", "/work/dir", "hello world",
                         "321", "654", "from-host"], r.out + r.err
    assert lines[9] == "data-ro"
    opts = lines[10].split()[3].split(",")
    assert {"ro", "nosuid", "nodev"} <= set(opts)
    assert not (data / "new").exists()


async def test_readonly_rootfs(env: Env) -> None:
    r = await run(env, "rootro", ["sh", "-c", "touch /x || echo rootfs-ro; touch /dev/x && "
                                  "echo dev-rw"])
    assert r.out.split() == ["rootfs-ro", "dev-rw"]
    assert not (env.workdir / "rootro" / "rootfs" / "x").exists()


async def test_join_namespace_by_path_and_cgroup_namespace(env: Env) -> None:
    first_bundle = env.bundle("ns-a", ["sleep", "60"])
    a = await env.runtime.create("ns-a", first_bundle, stdio=Stdio())
    await env.runtime.start("ns-a")

    def mutate(cfg: dict[str, Any]) -> None:
        namespaces = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
        namespaces += [{"type": "network", "path": f"/proc/{a}/ns/net"}, {"type": "cgroup"}]
        cfg["linux"]["namespaces"] = namespaces

    script = "readlink /proc/self/ns/net; readlink /proc/self/ns/uts; grep memory /proc/self/cgroup"
    r = await run(env, "ns-b", ["sh", "-c", script], mutate)
    net, uts, cgroup = r.out.splitlines()
    assert net == os.readlink(f"/proc/{a}/ns/net")
    assert uts != os.readlink(f"/proc/{a}/ns/uts")
    assert cgroup.endswith(":memory:/")  # the container's cgroup is its root
    await env.runtime.delete("ns-a", force=True)
    with trio.fail_after(10):
        await env.reaper.wait(a)


async def test_exec_in_user_namespace_container(env: Env) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["linux"]["namespaces"].append({"type": "user"})
        cfg["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
        cfg["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]

    bundle = env.bundle("userexec", ["sleep", "60"], mutate)
    pid = await env.runtime.create("userexec", bundle, stdio=Stdio())
    await env.runtime.start("userexec")
    out = Pipe()
    try:
        xpid = await env.runtime.exec(
            "userexec", {"args": ["sh", "-c", "id -u; readlink /proc/self/ns/user"],
                         "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 42, "gid": 42}},
            stdio=Stdio(None, out.w, out.w))
        out.close_write()
        with trio.fail_after(10):
            assert (await env.reaper.wait(xpid)).status == 0
        uid, userns = (await out.read_all()).splitlines()
        assert uid == "42"
        assert userns == os.readlink(f"/proc/{pid}/ns/user")
    finally:
        out.close()
    await env.runtime.delete("userexec", force=True)


async def test_device_cgroup_denies_other_devices(env: Env) -> None:
    def mutate(cfg: dict[str, Any]) -> None:
        for key in ("bounding", "effective", "permitted"):
            cfg["process"]["capabilities"][key].append("CAP_MKNOD")

    # a real block device of the host (the root disk): allowed to exist, not to be opened
    rdev = os.stat(next(p for p in ("/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop0")
                        if os.path.exists(p))).st_rdev
    major, minor = os.major(rdev), os.minor(rdev)
    script = (f"mknod /dev/blocked b {major} {minor} && echo made; "
              "head -c 1 /dev/blocked >/dev/null || echo denied; "
              "head -c 1 /dev/zero | wc -c")
    r = await run(env, "devices", ["sh", "-c", script], mutate)
    assert r.out.split() == ["made", "denied", "1"], r.out + r.err
    assert "not permitted" in r.err


async def test_exec_with_terminal(env: Env) -> None:
    path = str(env.workdir / "exec-console.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    bundle = env.bundle("xtty", ["sleep", "60"])
    await env.runtime.create("xtty", bundle, stdio=Stdio())
    await env.runtime.start("xtty")
    process = {"args": ["sh", "-c", "tty; echo exec-tty"], "env": ["PATH=/bin"], "cwd": "/",
               "terminal": True}
    async with trio.open_nursery() as nursery:
        got: list[int] = []

        async def accept() -> None:
            conn, _ = await listener.accept()
            with conn, socket.socket(fileno=os.dup(conn.fileno())) as plain:
                plain.setblocking(True)
                _, fds, _, _ = await trio.to_thread.run_sync(socket.recv_fds, plain, 1024, 1)
            got.extend(fds)

        nursery.start_soon(accept)
        xpid = await env.runtime.exec("xtty", process, stdio=Stdio(), console_socket=path)
    listener.close()
    assert len(got) == 1
    try:
        with trio.fail_after(10):
            assert (await env.reaper.wait(xpid)).status == 0
        os.set_blocking(got[0], False)
        out = b""
        while True:
            try:
                chunk = os.read(got[0], 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        assert b"/dev/pts/" in out and b"exec-tty" in out
    finally:
        os.close(got[0])
    await env.runtime.delete("xtty", force=True)


# -- mount sources and destinations (issue 8.8) -----------------------------------------------


async def test_bind_source_symlinks_are_resolved_on_the_host(env: Env) -> None:
    real = env.workdir / "real"
    real.mkdir()
    (real / "marker").write_text("in-real\n")
    (env.workdir / "dirlink").symlink_to(real)
    (env.workdir / "filelink").symlink_to(real / "marker")
    binds = [("dirlink", "/hostdir"), ("filelink", "/etc/marker")]
    if os.path.islink("/lib"):  # Debian 12: /lib -> usr/lib
        binds.append(("/lib", "/hostlib"))

    def mutate(cfg: dict[str, Any]) -> None:
        cfg["mounts"] += [{"destination": dst, "type": "bind",
                           "source": str(env.workdir / src), "options": ["rbind", "ro"]}
                          for src, dst in binds]

    script = ("cat /hostdir/marker /etc/marker; grep -c . /proc/self/mountinfo >/dev/null;"
              " ls /hostlib 2>/dev/null | head -1; touch /hostdir/x 2>/dev/null || echo ro")
    r = await run(env, "bind-links", ["sh", "-c", script], mutate)
    lines = r.out.splitlines()
    assert (r.status, lines[:2], lines[-1]) == (0, ["in-real", "in-real"], "ro"), r
    if os.path.islink("/lib"):
        assert lines[2] == sorted(os.listdir("/lib"))[0], r


async def test_destination_symlinks_cannot_leave_the_rootfs(env: Env) -> None:
    """An image's symlinks to / and to ../.. (absolute and relative) resolve inside its
    rootfs: the mount, and the directory or file made for it, land there."""
    tag = uuid.uuid4().hex[:10]
    payload = env.workdir / "payload"
    payload.mkdir()
    (payload / "marker").write_text("payload\n")
    bundle = env.workdir / "evil"

    def mutate(cfg: dict[str, Any]) -> None:
        cfg["mounts"] += [
            {"destination": f"/evil/abs-{tag}", "type": "bind", "source": str(payload),
             "options": ["rbind"]},
            {"destination": f"/up/rel-{tag}", "type": "bind", "source": str(payload),
             "options": ["rbind"]},
            {"destination": f"/evil/file-{tag}", "type": "bind",
             "source": str(payload / "marker"), "options": ["rbind"]},
            {"destination": f"/up/tmpfs-{tag}", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid"]},
        ]

    # The image: links made before the bundle's config is written by run().
    rootfs = bundle / "rootfs"
    orig = env.bundle

    def bundle_with_links(id: str, args: list[str], m: Any = None) -> Path:
        b = orig(id, args, m)
        os.symlink("/", rootfs / "evil")
        os.symlink("../../../../../../../../..", rootfs / "up")
        return b

    env.bundle = bundle_with_links  # type: ignore[method-assign]
    try:
        script = (f"cat /abs-{tag}/marker /rel-{tag}/marker /file-{tag};"
                  f" grep -c ' /tmpfs-{tag} ' /proc/self/mountinfo")
        r = await run(env, "evil", ["sh", "-c", script], mutate)
    finally:
        env.bundle = orig  # type: ignore[method-assign]
    assert (r.status, r.out) == (0, "payload\n" * 3 + "1\n"), r
    for name in (f"abs-{tag}", f"rel-{tag}", f"file-{tag}", f"tmpfs-{tag}"):
        assert not os.path.lexists(f"/{name}"), name  # nothing made on the host's /
        assert not os.path.lexists(bundle.parent.parent / name), name


def test_mount_in_root_refuses_a_target_swapped_for_a_symlink(workdir: Path) -> None:
    """The race a shared rootfs allows: the destination is resolved, then replaced by a
    symlink to / before the mount. The mount goes through openat2(RESOLVE_IN_ROOT) and
    refuses the moved target instead of mounting on the host's /. Run in a private
    mount namespace (unshare -m) so nothing reaches the host even on failure."""
    root = workdir / "root"
    (root / "a").mkdir(parents=True)
    code = f"""
import errno, os
from berth.plugins.runtimes.inprocess.syscalls import LibcSyscalls, MS_BIND
sc = LibcSyscalls()
root = {str(root)!r}
os.rmdir(root + "/a")
os.symlink("/", root + "/a")
try:
    sc.mount_in_root(root, "/proc", root + "/a", "bind", MS_BIND)
except OSError as e:
    print("refused", errno.errorcode[e.errno])
else:
    print("mounted")
"""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                        "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "refused EXDEV\n"), r


# -- the exec stub (issue 8.2) -----------------------------------------------------------------


async def test_self_exe_script_runs_nothing_and_missing_interpreter_is_an_error(
        env: Env) -> None:
    """A ``#!/proc/self/exe`` script names the exec stub, not the runtime's Python: it
    exits 127 at once. A script whose interpreter is missing fails the request."""
    def add_scripts(cfg: dict[str, Any], bundle: str) -> None:
        rootfs = env.workdir / bundle / "rootfs"
        for name, text in (("selfexe", "#!/proc/self/exe\nprint('python ran')\n"),
                           ("nointerp", "#!/no/such/sh\necho ran\n")):
            (rootfs / name).write_text(text)
            (rootfs / name).chmod(0o755)

    r = await run(env, "selfexe", ["/selfexe"], lambda cfg: add_scripts(cfg, "selfexe"))
    assert (r.status, r.out, r.err) == (127, "", ""), r
    bundle = env.bundle("nointerp", ["/nointerp"], lambda cfg: add_scripts(cfg, "nointerp"))
    with pytest.raises(errdefs.Unknown, match=r"exec /nointerp: no such file or directory "
                                              r"\(interpreter /no/such/sh\)"):
        await env.runtime.create("nointerp", bundle, stdio=Stdio())
    bundle = env.bundle("noexe", ["/no/such/exe"])
    with pytest.raises(errdefs.Unknown, match='exec: "/no/such/exe": stat /no/such/exe: no '
                                              'such file or directory'):
        await env.runtime.create("noexe", bundle, stdio=Stdio())
