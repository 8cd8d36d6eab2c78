"""OCI spec handling: core.oci helpers, the in-process runtime's config parsing, seccomp
translation, cgroup paths and files, and the child Reaper (no root needed)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from berth.core import errdefs
from berth.core.oci import Reaper, Stdio, spec as oci_spec
from berth.core.oci.reaper import exit_status
from berth.plugins.runtimes.inprocess import caps, cgroups, seccomp, spec as ispec, syscalls as S
from tests import forked


# ---- core.oci.spec -------------------------------------------------------------------
def test_default_spec_is_runc_like() -> None:
    cfg = oci_spec.default(["echo", "hi"])
    assert cfg["process"]["args"] == ["echo", "hi"]
    assert [m["destination"] for m in cfg["mounts"]] == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"]
    assert {n["type"] for n in cfg["linux"]["namespaces"]} == {
        "pid", "network", "ipc", "uts", "mount"}
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"]
    assert cfg["process"]["noNewPrivileges"] is True
    # a deep copy: editing one spec leaves the next alone
    cfg["mounts"][0]["options"] = ["x"]
    assert "options" not in oci_spec.default()["mounts"][0]


def test_load(tmp_path: Path) -> None:
    with pytest.raises(errdefs.NotFound):
        oci_spec.load(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(errdefs.InvalidArgument):
        oci_spec.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"ociVersion": "1.0.2"}))
    assert oci_spec.load(tmp_path) == {"ociVersion": "1.0.2"}


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 1025, "a b"])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(errdefs.InvalidArgument):
        oci_spec.validate_id(bad)


def test_hook_state() -> None:
    st = oci_spec.hook_state("c", "created", 42, "/b", {"k": "v"})
    assert st == {"ociVersion": oci_spec.OCI_VERSION, "id": "c", "status": "created",
                  "pid": 42, "bundle": "/b", "annotations": {"k": "v"}}
    assert "pid" not in oci_spec.hook_state("c", "stopped", 0, "/b")


# ---- config parsing ------------------------------------------------------------------
def bundle_config(tmp_path: Path, **linux: Any) -> dict[str, Any]:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    cfg = oci_spec.default(["sh"])
    cfg["linux"].update(linux)
    return cfg


def test_parse_mount_options(tmp_path: Path) -> None:
    m = ispec.parse_mount({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                           "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666",
                                       "mode=0620", "gid=5"]}, str(tmp_path))
    assert m.flags == S.MS_NOSUID | S.MS_NOEXEC
    assert m.data == "newinstance,ptmxmode=0666,mode=0620,gid=5"
    m = ispec.parse_mount({"destination": "data", "type": "none", "source": "src",
                           "options": ["rbind", "ro", "rw", "rslave", "tmpcopyup"]},
                          str(tmp_path))
    assert m.destination == "/data"
    assert m.source == str(tmp_path / "src")  # relative bind sources are in the bundle
    assert m.flags == S.MS_BIND | S.MS_REC and m.bind
    assert m.propagation == [S.MS_SLAVE | S.MS_REC]
    assert m.extensions == {"tmpcopyup"}
    m = ispec.parse_mount({"destination": "/x", "type": "bind", "source": "/y"}, "/b")
    assert m.bind and not m.flags & S.MS_REC
    with pytest.raises(errdefs.InvalidArgument):
        ispec.parse_mount({"destination": "/x", "options": ["idmap"]}, "/b")


def test_parse_container(tmp_path: Path) -> None:
    cfg = bundle_config(tmp_path, sysctl={"net.ipv4.ip_forward": "1"},
                        rootfsPropagation="rshared", cgroupsPath="/a/b",
                        devices=[{"path": "/dev/fuse", "type": "c", "major": 10,
                                  "minor": 229, "fileMode": 0o600}])
    cfg["process"]["rlimits"].append({"type": "RLIMIT_CORE", "soft": 0, "hard": 0})
    cfg["process"]["user"] = {"uid": 1, "gid": 2, "additionalGids": [3], "umask": 18}
    c = ispec.parse(cfg, tmp_path, known_last=40)
    assert c.rootfs == str(tmp_path / "rootfs")
    assert c.readonly and c.hostname == "berth"
    assert [n.type for n in c.namespaces] == ["pid", "network", "ipc", "uts", "mount"]
    assert c.new_namespace("pid") and not c.new_namespace("user")
    assert c.rootfs_propagation == S.MS_SHARED | S.MS_REC
    assert c.process.rlimits == [(7, 1024, 1024), (4, 0, 0)]
    assert (c.process.uid, c.process.gid, c.process.additional_gids, c.process.umask) == (
        1, 2, [3], 18)
    kill = 1 << caps.NUMBERS["CAP_KILL"]
    assert c.process.caps.bounding & kill and c.process.caps.inheritable == 0
    assert c.devices[0].file_mode == 0o600 and c.devices[0].major == 10
    assert c.process.environ()["TERM"] == "xterm"


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(hostname="h", linux={"namespaces": [{"type": "mount"}]}), "uts"),
    (lambda c: c["linux"]["namespaces"].append({"type": "user"}), "uidMappings"),
    (lambda c: c["linux"]["namespaces"].append({"type": "pid"}), "duplicate"),
    (lambda c: c["linux"]["namespaces"].append({"type": "nope"}), "unknown namespace"),
    (lambda c: c["linux"].update(namespaces=[{"type": "pid"}], hostname=None), "mount"),
    (lambda c: c["process"].update(args=[]), "args"),
    (lambda c: c["process"].update(cwd="rel"), "cwd"),
    (lambda c: c["process"]["rlimits"].append({"type": "RLIMIT_X", "soft": 1, "hard": 1}),
     "rlimit"),
    (lambda c: c["process"]["capabilities"].update(bounding=["CAP_NOPE"]), "capability"),
    (lambda c: c.update(root={"path": "missing"}), "rootfs"),
])
def test_parse_rejects(tmp_path: Path, mutate: Any, message: str) -> None:
    cfg = bundle_config(tmp_path)
    if message == "mount":
        cfg["hostname"] = None
    mutate(cfg)
    with pytest.raises(errdefs.InvalidArgument, match=message):
        ispec.parse(cfg, tmp_path, known_last=40)


def test_caps_newer_than_kernel_are_dropped() -> None:
    assert caps.mask(["CAP_CHOWN", "CAP_CHECKPOINT_RESTORE"], known_last=39) == 1
    assert caps.mask(["chown"], known_last=40) == 1  # the prefix may be left out


# ---- seccomp -------------------------------------------------------------------------
PROFILE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 38,
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
    "syscalls": [
        {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                  {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0x7E020000, "valueTwo": 0,
                   "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"},
        {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
        {"names": ["not_a_syscall"], "action": "SCMP_ACT_ALLOW"},
    ],
}


def test_seccomp_rules_translation() -> None:
    rules = seccomp.rules(PROFILE)
    allow = 0x7FFF0000
    assert ("read", allow, []) in rules
    # two conditions on one argument: ORed as separate rules
    assert ("personality", allow, [(0, 4, 0, 0)]) in rules
    assert ("personality", allow, [(0, 4, 8, 0)]) in rules
    assert ("clone", allow, [(0, 7, 0x7E020000, 0)]) in rules
    assert ("mkdir", 0x00050000 | errno.EPERM, []) in rules  # ERRNO defaults to EPERM
    assert not [r for r in rules if r[0] == "getpid"]  # same as the default action
    with pytest.raises(errdefs.InvalidArgument):
        seccomp.rules({"syscalls": [{"names": ["x"], "action": "SCMP_ACT_NOTIFY"}]})


def test_seccomp_build_and_enforce() -> None:
    """The exported program, installed in a child (no_new_privs: no root needed), turns
    mkdir into EACCES and leaves everything else alone."""
    bpf, flags = seccomp.build({
        "defaultAction": "SCMP_ACT_ALLOW",
        "flags": ["SECCOMP_FILTER_FLAG_LOG"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                      "errnoRet": errno.EACCES},
                     {"names": ["unknown_call"], "action": "SCMP_ACT_KILL"}],
    })
    assert flags == 2 and bpf and len(bpf) % 8 == 0
    sc = S.LibcSyscalls()

    def filtered() -> str:
        sc.set_no_new_privs()
        sc.seccomp_set_filter(bpf, flags)
        try:
            os.mkdir("/tmp/berth-seccomp-test-never")
            result = "made"
        except OSError as e:
            result = errno.errorcode[e.errno]
        return f"{result} {os.getpid() > 0}"

    assert forked.in_child(filtered) == "EACCES True"


# ---- cgroups -------------------------------------------------------------------------
HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /mnt/other rw - cgroup cgroup rw,pids
"""
PROC_CGROUP = """\
9:name=systemd:/user.slice
4:memory:/sandbox/abc
3:cpu,cpuacct:/
2:freezer:/
0::/user.slice
"""


def test_cgroup_paths_hybrid() -> None:
    cg = cgroups.Cgroup.resolve("/berth/c1", "c1", mountinfo=HYBRID_MOUNTINFO,
                                proc_cgroup=PROC_CGROUP)
    assert cg.dirs == {
        "cpu,cpuacct": "/sys/fs/cgroup/cpu,cpuacct/berth/c1",
        "memory": "/sys/fs/cgroup/memory/berth/c1",
        "freezer": "/sys/fs/cgroup/freezer/berth/c1",
        "systemd": "/sys/fs/cgroup/systemd/berth/c1",
        "unified": "/sys/fs/cgroup/unified/berth/c1",
    }
    assert not cg.unified
    assert cg.dir_for("cpuacct") == cg.dirs["cpu,cpuacct"]
    assert cg.dir_for("pids") is None  # mounted outside the cgroup root
    # relative paths hang below the runtime's own cgroup, per hierarchy
    rel = cgroups.Cgroup.resolve("", "c2", mountinfo=HYBRID_MOUNTINFO, proc_cgroup=PROC_CGROUP)
    assert rel.dirs["memory"] == "/sys/fs/cgroup/memory/sandbox/abc/c2"
    assert rel.dirs["systemd"] == "/sys/fs/cgroup/systemd/user.slice/c2"
    assert rel.dirs["unified"] == "/sys/fs/cgroup/unified/user.slice/c2"
    assert cgroups.Cgroup.from_dict(json.loads(json.dumps(cg.to_dict()))) == cg


def test_cgroup_paths_unified_with_nested_mount_root() -> None:
    info = "30 23 0:27 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    cg = cgroups.Cgroup.resolve("/kubepods/pod1/c", "c", mountinfo=info, proc_cgroup="0::/\n")
    assert cg.unified and cg.dirs == {"": "/sys/fs/cgroup/pod1/c"}
    assert cg.mount_binds() == [("", "/sys/fs/cgroup/pod1/c")]


@pytest.mark.parametrize("path, expanded", [
    ("system.slice:docker:abc", "/system.slice/docker-abc.scope"),
    ("a-b-c.slice:cri:x", "/a.slice/a-b.slice/a-b-c.slice/cri-x.scope"),
    (":berth:y", "/system.slice/berth-y.scope"),
    ("/a/b", "/a/b"),
    ("", "id"),
])
def test_systemd_style_paths(path: str, expanded: str) -> None:
    assert cgroups.expand_path(path, "id") == expanded


def _fake_dir(base: Path, files: dict[str, str]) -> str:
    base.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (base / name).write_text(content)
    return str(base)


def test_v1_memory_swap_order_and_devices(tmp_path: Path) -> None:
    mem = _fake_dir(tmp_path / "memory", {"memory.limit_in_bytes": "9223372036854771712",
                                          "memory.memsw.limit_in_bytes": "",
                                          "memory.soft_limit_in_bytes": "",
                                          "memory.swappiness": "", "memory.oom_control": ""})
    dev = _fake_dir(tmp_path / "devices", {"devices.allow": "", "devices.deny": ""})
    pids = _fake_dir(tmp_path / "pids", {"pids.max": ""})
    cg = cgroups.Cgroup({"memory": mem, "devices": dev, "pids": pids},
                        {"memory": ["memory"], "devices": ["devices"], "pids": ["pids"]})
    writes: list[tuple[str, str]] = []
    real = cgroups._write

    def record(d: str, name: str, value: str) -> None:
        writes.append((name, value))
        real(d, name, value)

    cgroups._write = record  # type: ignore[assignment]
    try:
        fuse = ispec.Device("/dev/fuse", "c", 10, 229)
        cg.apply({"memory": {"limit": 1 << 20, "swap": 2 << 20, "reservation": 1024,
                             "disableOOMKiller": True},
                  "pids": {"limit": 0},
                  "devices": [{"allow": False, "access": "rwm"},
                              {"allow": True, "type": "c", "major": 4, "minor": None,
                               "access": "rw"}]},
                 devices=[fuse])
    finally:
        cgroups._write = real  # type: ignore[assignment]
    # memsw first while it is the larger one: memsw >= limit at every step
    assert writes[:2] == [("memory.limit_in_bytes", str(1 << 20)),
                          ("memory.memsw.limit_in_bytes", str(2 << 20))]
    assert ("memory.soft_limit_in_bytes", "1024") in writes
    assert ("memory.oom_control", "1") in writes
    assert ("pids.max", "max") in writes
    dev_writes = [w for w in writes if w[0].startswith("devices.")]
    assert dev_writes[0] == ("devices.deny", "a")
    assert dev_writes[1] == ("devices.allow", "c 4:* rw")
    assert ("devices.allow", "c 1:3 rwm") in dev_writes
    assert ("devices.allow", "c 136:* rwm") in dev_writes
    assert dev_writes[-1] == ("devices.allow", "c 10:229 rwm")


def test_v1_memory_shrinking_swap_sets_limit_first(tmp_path: Path) -> None:
    mem = _fake_dir(tmp_path, {"memory.limit_in_bytes": str(8 << 20),
                               "memory.memsw.limit_in_bytes": ""})
    cg = cgroups.Cgroup({"memory": mem}, {"memory": ["memory"]})
    order: list[str] = []
    real = cgroups._write
    cgroups._write = lambda d, n, v: order.append(n)  # type: ignore[assignment]
    try:
        cg.apply({"memory": {"limit": 4 << 20, "swap": 6 << 20}})
    finally:
        cgroups._write = real  # type: ignore[assignment]
    assert order == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_v2_resources_and_stats(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _fake_dir(root, {"cgroup.controllers": "cpuset cpu io memory pids",
                     "cgroup.subtree_control": ""})
    leaf = _fake_dir(root / "berth" / "c", {
        "cgroup.controllers": "cpu memory pids", "memory.max": "", "memory.swap.max": "",
        "memory.low": "", "cpu.weight": "", "cpu.max": "", "pids.max": "", "io.weight": "",
        "cgroup.freeze": "0", "memory.current": "4096", "memory.high": "",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "memory.stat": "anon 100\nfile 200\n", "cpu.stat": "usage_usec 10\nuser_usec 6\n"
        "system_usec 4\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
        "pids.current": "2", "memory.peak": "8192"})
    _fake_dir(root / "berth", {"cgroup.controllers": "cpu memory pids",
                               "cgroup.subtree_control": ""})
    cg = cgroups.Cgroup({"": leaf}, {"": ["cpu", "memory", "pids"]}, {"": True}, unified=True)
    cg._enable_controllers()
    assert (root / "cgroup.subtree_control").read_text() == "+cpuset +cpu +io +memory +pids"
    assert (root / "berth" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    cg.apply({"memory": {"limit": 1 << 20, "swap": 3 << 20, "reservation": 10},
              "cpu": {"shares": 1024, "quota": 50000, "period": 100000},
              "pids": {"limit": 10}, "unified": {"memory.high": "max"}})
    leafp = Path(leaf)
    assert (leafp / "memory.max").read_text() == str(1 << 20)
    assert (leafp / "memory.swap.max").read_text() == str(2 << 20)
    assert (leafp / "memory.low").read_text() == "10"
    assert (leafp / "cpu.weight").read_text() == "39"
    assert (leafp / "cpu.max").read_text() == "50000 100000"
    assert (leafp / "pids.max").read_text() == "10"
    assert (leafp / "memory.high").read_text() == "max"
    with pytest.raises(errdefs.InvalidArgument):
        cg.apply({"unified": {"../escape": "1"}})
    (leafp / "pids.max").write_text("10\n")
    (leafp / "memory.max").write_text(f"{1 << 20}\n")
    st = cg.stats()
    assert st["memory"]["usage"] == 4096 and st["memory"]["limit"] == 1 << 20
    assert (st["memory"]["oom"], st["memory"]["oom_kill"], st["memory"]["failcnt"]) == (1, 1, 3)
    assert st["cpu"]["usage_total"] == 10_000 and st["cpu"]["usage_user"] == 6_000
    assert st["pids"] == {"current": 2, "limit": 10}
    assert not cg.frozen()


# ---- reaper --------------------------------------------------------------------------
def _child(code: int | None = None, sig: int | None = None,
           pipe: tuple[int, int] | None = None) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            if pipe is not None:
                os.close(pipe[1])
                os.read(pipe[0], 1)
            if sig is not None:
                os.kill(os.getpid(), sig)
        finally:
            os._exit(code or 0)
    return pid


def test_exit_status() -> None:
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 137


async def test_reaper_keeps_unclaimed_exits_and_reports_signals() -> None:
    reaper = Reaper(subreaper=False)
    early = _child(5)
    # exits before the reaper runs and before anyone asks
    while not os.path.exists(f"/proc/{early}") or open(f"/proc/{early}/stat").read().split(
            ")")[-1].split()[0] != "Z":
        await trio.sleep(0.005)
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        with trio.fail_after(10):
            while reaper.exited(early) is None:
                await trio.sleep(0.005)
            assert (await reaper.wait(early)).status == 5
            assert reaper.exited(early) is None  # claimed
            r, w = os.pipe()
            killed = _child(sig=signal.SIGKILL, pipe=(r, w))
            with reaper.subscribe() as exits:
                os.close(w)
                # two waiters on one pid both get the exit
                results: list[int] = []

                async def waiter() -> None:
                    results.append((await reaper.wait(killed)).status)

                async with trio.open_nursery() as inner:
                    inner.start_soon(waiter)
                    inner.start_soon(waiter)
                assert results == [137, 137]
                seen = await exits.receive()
                assert (seen.pid, seen.status) == (killed, 137)
            os.close(r)
        nursery.cancel_scope.cancel()


async def test_reaper_wait_can_be_cancelled() -> None:
    reaper = Reaper(subreaper=False)
    with trio.move_on_after(0.05) as cs:
        await reaper.wait(999_999_999)
    assert cs.cancelled_caught
    assert reaper._waiters == {}


def test_state_of_a_zombie_is_stopped(tmp_path: Path) -> None:
    from berth.plugins.runtimes.inprocess import state

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        for _ in range(1000):
            st = state.proc_stat(pid)
            if st and st[0] == "Z":
                break
            os.sched_yield()
        st = state.proc_stat(pid)
        assert st is not None and st[0] == "Z"
        assert not state.alive(pid, st[1])
        assert state.alive(os.getpid(), state.proc_stat(os.getpid())[1])  # type: ignore[index]
        assert not state.alive(os.getpid(), 0)  # another start time: a reused pid
    finally:
        os.waitpid(pid, 0)
    store = state.StateStore(tmp_path / "root")
    store.create_dir("c1")
    with pytest.raises(errdefs.AlreadyExists):
        store.create_dir("c1")
    with pytest.raises(errdefs.NotFound):
        store.load("c1")
    st_ = state.ContainerState("c1", 1, 2, "/b", "2024-01-01T00:00:00+00:00", {}, {})
    store.save(st_)
    assert store.load("c1") == st_ and store.list() == ["c1"]
    assert stat.S_IMODE((tmp_path / "root").stat().st_mode) == 0o711


async def test_reaper_is_a_subreaper_only_while_running(tmp_path: Path) -> None:
    from berth.plugins.runtimes.inprocess import Runtime

    sc = S.LibcSyscalls()
    before = sc.is_child_subreaper()
    reaper = Reaper()
    runtime = Runtime(tmp_path / "state", reaper)
    with pytest.raises(errdefs.FailedPrecondition, match="reaper is not running"):
        await runtime.create("c", tmp_path, stdio=Stdio())
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        assert reaper.running and sc.is_child_subreaper()
        nursery.cancel_scope.cancel()
    assert not reaper.running and sc.is_child_subreaper() == before
