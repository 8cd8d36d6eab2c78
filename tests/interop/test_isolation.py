"""What a container run by ``ctr run`` through berth's shim and in-process runtime sees.

ctr builds its default spec (containerd 1.6's oci.WithDefaultSpec plus the image's
config): new pid, ipc, uts, mount and network namespaces, containerd's default
capability set, masked and read-only /proc and /sys paths, ``noNewPrivileges: true``,
no seccomp profile (ctr adds one only with ``--seccomp``). Each check compares what the
container sees with what that spec asks for, read back with ``ctr containers info``.

A memory limit (``--memory-limit``) goes to the container's memory cgroup; exceeding it
gets the process OOM-killed, reported as ``/tasks/oom`` on berthd's event stream (the
shim watches the cgroup's OOM notifications) and as exit status 137.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.interop.test_ctr_berth_runtime import (
    CGROUP_ROOT,
    Berth,
    alive,
    assert_task_left_nothing,
    berth as berth,  # noqa: F401
    wait_for,
)

pytestmark = [pytest.mark.interop, pytest.mark.root]

# linux/capability.h, by number: the kernel's bit order in /proc/<pid>/status.
CAPS = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]
LIMIT = 33554432  # 32 MiB


def decode_caps(hex_mask: str) -> set[str]:
    mask = int(hex_mask, 16)
    unknown = mask >> len(CAPS)
    assert unknown == 0, f"capability bits beyond {CAPS[-1]}: {hex_mask}"
    return {f"CAP_{name}" for i, name in enumerate(CAPS) if mask >> i & 1}


def sections(text: str) -> dict[str, list[str]]:
    """Output of a probe script, split at its ``== name`` lines."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("== "):
            current = line[3:]
            out[current] = []
        else:
            out.setdefault(current, []).append(line)
    return out


def probe_script(masked: list[str]) -> str:
    return "\n".join([
        "echo '== ps'; ps -o pid,comm",
        "echo '== mount'; mkdir -p /mnt; mount -t tmpfs x /mnt 2>&1; echo rc=$?",
        "echo '== mounted'; grep ' /mnt ' /proc/self/mountinfo",
        "echo '== init'; grep -E '^(Cap[A-Za-z]+|NoNewPrivs|Seccomp):' /proc/1/status",
        "echo '== self'; grep -E '^(Cap[A-Za-z]+|NoNewPrivs|Seccomp):' /proc/self/status",
        "echo '== masked'",
        f"for p in {' '.join(masked)}; do",
        "  if [ -d $p ]; then echo \"$p dir $(ls -A $p | wc -l)\";",
        "  elif [ -e $p ]; then echo \"$p $(stat -c %t:%T $p) $(head -c 64 $p | wc -c)\";",
        "  else echo \"$p missing\"; fi",
        "done",
        "echo '== sys'; touch /sys/berth-probe 2>&1; echo rc=$?",
        "echo '== proc-sys'; echo x 2>&1 > /proc/sys/kernel/hostname; echo rc=$?",
        "echo '== net'; tail -n +3 /proc/net/dev",
        "echo '== mountinfo'; cat /proc/self/mountinfo",
    ])


def status_fields(lines: list[str]) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def test_default_container_is_isolated(berth: Berth) -> None:
    cid = berth.id("iso")
    assert berth.run(cid, "sleep", "1000", detach=True).rc == 0
    pid, _ = berth.tasks()[cid]
    shim = berth.shim_of(pid)
    spec = berth.spec(cid)
    process, linux = spec["process"], spec["linux"]
    assert {ns["type"] for ns in linux["namespaces"]} >= {"pid", "mount", "network"}
    masked = linux["maskedPaths"]

    r = berth.ctr("tasks", "exec", "--exec-id", berth.id("probe"), cid, "sh", "-c",
                  probe_script(masked))
    assert r.rc == 0, r
    got = sections(r.out)

    # Only the container's processes: its init (pid 1 there) and the probe.
    rows = [line.split() for line in got["ps"][1:]]
    assert rows[0] == ["1", "sleep"] and [c for _, c in rows[1:]] == ["sh", "ps"], rows
    assert pid != 1 and alive(pid)

    # No CAP_SYS_ADMIN: no new mounts.
    assert got["mount"][-1] != "rc=0" and "permission denied" in got["mount"][0], got["mount"]
    assert got["mounted"] == []

    # Capabilities: exactly the spec's sets (ctr's default: containerd's 14 caps).
    caps = process["capabilities"]
    for status in (status_fields(got["init"]), status_fields(got["self"])):
        assert decode_caps(status["CapEff"]) == set(caps["effective"])
        assert decode_caps(status["CapPrm"]) == set(caps["permitted"])
        assert decode_caps(status["CapBnd"]) == set(caps["bounding"])
        assert decode_caps(status["CapInh"]) == set(caps.get("inheritable") or [])
        assert decode_caps(status["CapAmb"]) == set(caps.get("ambient") or [])
        # ctr 1.6's default spec sets noNewPrivileges and no seccomp profile.
        assert process["noNewPrivileges"] is True
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == ("2" if linux.get("seccomp") else "0")
    assert "CAP_SYS_ADMIN" not in caps["effective"] and len(caps["effective"]) == 14

    # Masked paths: files become /dev/null (char 1:3, nothing to read), folders an empty
    # read-only tmpfs. /proc/kcore is missing on kernels without CONFIG_PROC_KCORE.
    state = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in got["masked"]}
    for path in masked:
        if not os.path.exists(path):
            continue  # absent on this host's kernel: nothing to hide
        if os.path.isdir(path):
            assert state[path] == "dir 0", (path, state[path])
        else:
            assert state[path] == "1:3 0", (path, state[path])
    must = (["/proc/kcore"] if os.path.exists("/proc/kcore")
            else ["/proc/keys", "/proc/timer_list", "/sys/firmware"])
    assert set(must) <= set(masked)
    for path in must:
        assert state[path] in ("1:3 0", "dir 0"), (path, state[path])
    assert os.listdir("/sys/firmware"), "the host's /sys/firmware has entries to hide"

    # /sys and the read-only /proc paths are read-only mounts.
    assert "Read-only file system" in got["sys"][0] and got["sys"][-1] != "rc=0"
    assert got["proc-sys"][-1] != "rc=0"
    options = {}
    for line in got["mountinfo"]:
        fields = line.split(" ")
        options[fields[4]] = fields[5].split(",")
    assert "ro" in options["/sys"]
    for path in linux["readonlyPaths"]:
        if os.path.exists(path):
            assert "ro" in options[path], (path, options.get(path))

    # A new network namespace: only a loopback device.
    assert [line.split(":")[0].strip() for line in got["net"]] == ["lo"]

    berth.ok("tasks", "kill", "-s", "KILL", cid)
    berth.ok("tasks", "rm", "-f", cid)
    berth.ok("containers", "rm", cid)
    wait_for("the shim to exit", lambda: not alive(shim))
    assert_task_left_nothing(berth, cid, pid, shim)
    berth.wait_no_shim_sockets()


def test_memory_limit_oom_kill_is_reported(berth: Berth) -> None:
    cid = berth.id("oom")
    with berth.events() as events:
        # tail keeps the last line of an endless line of zeros: memory without end.
        r = berth.run(cid, "tail", "/dev/zero", extra=("--memory-limit", str(LIMIT)))
        assert r.rc == 137, (r, berth.daemon.logs()[-3000:])
        oom = events.wait("/tasks/oom", cid)
        exited = events.wait("/tasks/exit", cid)
        events.wait("/containers/delete", cid)
    assert oom == {"container_id": cid}
    assert exited["exit_status"] == 137
    topics = [t for t, _ in events.of(cid)]
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
    assert_task_left_nothing(berth, cid, exited["pid"])


def test_memory_limit_is_the_cgroup_limit(berth: Berth) -> None:
    """The same limit on a running task: in its memory cgroup and its metrics; an exec
    that exceeds it is killed (137) while the init, small, keeps running."""
    cid = berth.id("mem")
    assert berth.run(cid, "sleep", "1000", detach=True,
                     extra=("--memory-limit", str(LIMIT))).rc == 0
    pid, _ = berth.tasks()[cid]
    spec = berth.spec(cid)
    assert spec["linux"]["resources"]["memory"]["limit"] == LIMIT
    cgroup = CGROUP_ROOT / "memory" / berth.namespace / cid
    if cgroup.is_dir():  # cgroup v1
        assert int((cgroup / "memory.limit_in_bytes").read_text()) == LIMIT
        assert str(pid) in (cgroup / "cgroup.procs").read_text().split()
    else:
        unified = Path("/sys/fs/cgroup") / berth.namespace / cid
        assert int((unified / "memory.max").read_text()) == LIMIT
    metrics = berth.ok("tasks", "metrics", cid)
    assert re.search(rf"^memory\.limit_in_bytes\s+{LIMIT}\s*$", metrics, re.M), metrics
    hog_id = berth.id("hog")
    with berth.events() as events:
        r = berth.ctr("tasks", "exec", "--exec-id", hog_id, cid, "tail", "/dev/zero")
        assert r.rc == 137, r
        events.wait("/tasks/oom", cid)
        hog = events.wait("/tasks/exit", cid, exec_id=hog_id)
    assert hog["exit_status"] == 137
    assert berth.tasks()[cid] == (pid, "RUNNING")
    berth.ok("tasks", "kill", "-s", "KILL", cid)
    berth.ok("tasks", "rm", "-f", cid)
    berth.ok("containers", "rm", cid)
    assert_task_left_nothing(berth, cid, pid)
