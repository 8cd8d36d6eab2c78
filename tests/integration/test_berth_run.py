"""`berth run`, `berth tasks` and `berth containers` against real daemons.

Each test runs against berthd (berth's shim, runtime io.containerd.berth.v1) and against
the real containerd (its runc shim, io.containerd.runc.v2): the CLI speaks containerd's
API and must work with both. Containers run Debian's busybox-static, as a root
filesystem directory (``--rootfs``) or as an image imported from an OCI tar.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import daemons, images

# Bounds a wait that should end by itself; nothing is measured by it.
HANG_GUARD = 60.0


def uid(name: str) -> str:
    """A container id no other test shares: runc keeps its state per namespace in one
    host-wide root, whichever daemon started it."""
    import uuid

    return f"{name}-{uuid.uuid4().hex[:8]}"


@dataclass
class Target:
    """A daemon and how to run containers on it."""

    daemon: daemons.Daemon
    runtime: str  # "" for the CLI's default (berth's own)
    fifo_dir: Path

    def berth(self, *args: str, input: str | None = None, ns: str | None = None
              ) -> daemons.Result:
        argv = [sys.executable, "-m", "berth.core.cli", "--address", str(self.daemon.address)]
        if ns:
            argv += ["--namespace", ns]
        p = subprocess.run([*argv, *args], capture_output=True, text=True,
                           timeout=HANG_GUARD, input=input,
                           stdin=subprocess.DEVNULL if input is None else None)
        return daemons.Result(p.returncode, p.stdout, p.stderr)

    def ok(self, *args: str, input: str | None = None) -> daemons.Result:
        r = self.berth(*args, input=input)
        assert r.rc == 0, f"berth {' '.join(args)}: rc={r.rc}\n{r.err}\n{r.out}\n" \
                          f"{self.daemon.logs()[-3000:]}"
        return r

    def create_flags(self) -> list[str]:
        return ["--runtime", self.runtime] if self.runtime else []

    def run_flags(self) -> list[str]:
        return ["--fifo-dir", str(self.fifo_dir), *self.create_flags()]

    def task_status(self, cid: str) -> str:
        for line in self.ok("tasks", "ls").out.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return fields[2]
        return ""

    def wait_status(self, cid: str, status: str) -> None:
        deadline = time.monotonic() + HANG_GUARD
        while (now := self.task_status(cid)) != status:
            assert time.monotonic() < deadline, f"{cid} is {now!r}, never {status}"
            time.sleep(0.05)

    def fifos_left(self) -> list[str]:
        if not self.fifo_dir.exists():
            return []
        return sorted(str(p) for p in self.fifo_dir.rglob("*"))


def busybox_rootfs(dest: Path) -> Path:
    """busybox-static and its applets, with an /etc/passwd and /etc/group."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(images.BUSYBOX, dest / "bin" / "busybox")
    for applet in images.applets():
        link = dest / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink("/bin/busybox", link)
    for d in ("proc", "dev", "sys", "tmp", "etc", "root", "run"):
        (dest / d).mkdir(exist_ok=True)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "app:x:1000:1000::/:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n")
    return dest


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="berth-run-rootfs-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield busybox_rootfs(base / "rootfs")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["berthd", "containerd"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    d: daemons.Daemon = request.getfixturevalue(request.param)
    runtime = "" if request.param == "berthd" else "io.containerd.runc.v2"
    t = Target(d, runtime, d.base / "fifo")
    yield t
    # Whatever a failed test left running must not outlive the daemon's folder.
    for cid in t.berth("tasks", "ls", "-q").out.split():
        t.berth("tasks", "rm", "-f", cid)


def test_run_rm_prints_and_exits_with_the_status(target: Target, rootfs: Path) -> None:
    t1 = uid("t1")
    r = target.ok("run", "--rm", *target.run_flags(), "--rootfs", str(rootfs), t1,
                  "echo", "hi")
    assert r.out == "hi\n"
    r = target.berth("run", "--rm", *target.run_flags(), "--rootfs", str(rootfs), t1,
                     "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.rc, r.out, r.err) == (3, "out\n", "err\n")
    assert target.ok("containers", "ls", "-q").out == ""
    assert target.ok("tasks", "ls", "-q").out == ""
    assert target.fifos_left() == []


def test_run_environment_user_and_mounts(target: Target, rootfs: Path,
                                         tmp_path: Path) -> None:
    t2 = uid("t2")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "note").write_text("from the host\n")
    r = target.ok("run", "--rm", *target.run_flags(), "--rootfs", str(rootfs),
                  "--env", "GREETING=hello", "--cwd", "/tmp", "--user", "app",
                  "--mount", f"type=bind,src={shared},dst=/mnt,options=rbind:ro",
                  t2, "sh", "-c",
                  'echo "$GREETING $PATH"; pwd; id -u; id -G; cat /mnt/note; '
                  "touch /mnt/x 2>/dev/null || echo read-only")
    assert r.out.splitlines() == [
        "hello /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "/tmp",
        "1000", "1000", "from the host", "read-only"]


def test_run_copies_stdin_and_closes_it(target: Target, rootfs: Path) -> None:
    t3 = uid("t3")
    text = "".join(f"line {i}\n" for i in range(5000))
    r = target.ok("run", "--rm", *target.run_flags(), "--rootfs", str(rootfs), t3, "cat",
                  input=text)
    assert r.out == text
    # EOF reaches the process: `wc` ends by itself.
    r = target.ok("run", "--rm", *target.run_flags(), "--rootfs", str(rootfs), t3,
                  "wc", "-l", input=text)
    assert r.out.strip() == "5000"


def test_run_forwards_signals(target: Target, rootfs: Path) -> None:
    t4 = uid("t4")
    argv = [sys.executable, "-m", "berth.core.cli", "--address", str(target.daemon.address),
            "run", "--rm", *target.run_flags(), "--rootfs", str(rootfs), t4, "sh", "-c",
            'trap "echo got-term; exit 11" TERM; echo ready; while :; do sleep 0.05; done']
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=HANG_GUARD)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (p.returncode, out) == (11, "got-term\n"), err
    assert target.ok("containers", "ls", "-q").out == ""


def test_detached_task_exec_kill_and_remove(target: Target, rootfs: Path) -> None:
    d1 = uid("d1")
    target.ok("run", "-d", *target.run_flags(), "--rootfs", str(rootfs), d1,
              "sleep", "1000")
    assert target.task_status(d1) == "RUNNING"
    pid = next(line.split()[1] for line in target.ok("tasks", "ls").out.splitlines()
               if line.split()[0] == d1)
    assert pid in target.ok("tasks", "ps", d1).out.split()

    r = target.berth("tasks", "exec", "--fifo-dir", str(target.fifo_dir), "--exec-id", "e1",
                     d1, "sh", "-c", "echo in-exec; echo to-err >&2; exit 5")
    assert (r.rc, r.out, r.err) == (5, "in-exec\n", "to-err\n")
    r = target.ok("tasks", "exec", "--fifo-dir", str(target.fifo_dir), "--exec-id", "e2",
                  d1, "cat", input="through exec\n")
    assert r.out == "through exec\n"

    metrics = target.ok("tasks", "metrics", d1).out
    assert "pids.current" in metrics and "memory.usage_in_bytes" in metrics
    doc = json.loads(target.ok("tasks", "metrics", "--format", "json", d1).out)
    assert doc["type_url"].endswith("io.containerd.cgroups.v1.Metrics")
    assert doc["metrics"]["pids.current"] >= 1

    target.ok("tasks", "pause", d1)
    assert target.task_status(d1) == "PAUSED"
    target.ok("tasks", "resume", d1)
    assert target.task_status(d1) == "RUNNING"

    r = target.berth("tasks", "rm", d1)
    assert r.rc == 1 and "must be stopped" in r.err
    r = target.berth("containers", "rm", d1)
    assert r.rc == 1 and "non stopped" in r.err

    target.ok("tasks", "kill", "-s", "KILL", d1)
    target.wait_status(d1, "STOPPED")
    r = target.ok("tasks", "rm", d1)
    assert "non-zero exit code 137" in r.err
    assert target.ok("tasks", "ls", "-q").out == ""
    target.ok("containers", "rm", d1)
    assert target.ok("containers", "ls", "-q").out == ""
    assert target.fifos_left() == []


def test_create_start_attach(target: Target, rootfs: Path) -> None:
    a1 = uid("a1")
    target.ok("containers", "create", *target.create_flags(), "--rootfs", str(rootfs),
              "--label", "team=blue", "--label", "flag", a1,
              "sh", "-c", "read x; echo got $x; exit 4")
    info = json.loads(target.ok("containers", "info", a1).out)
    assert info["ID"] == a1 and info["Labels"] == {"team": "blue", "flag": "true"}
    assert info["Spec"]["process"]["args"] == ["sh", "-c", "read x; echo got $x; exit 4"]
    assert info["Spec"]["root"]["path"] == str(rootfs)
    assert info["Spec"]["linux"]["cgroupsPath"] == f"/default/{a1}"
    assert info["Spec"]["annotations"] == {"team": "blue", "flag": "true"}
    spec = json.loads(target.ok("containers", "info", "--spec", a1).out)
    assert spec == info["Spec"]
    r = target.ok("containers", "label", a1, "team=red", "flag=")
    assert r.out.strip() == "team=red"
    assert a1 in target.ok("containers", "ls").out

    target.ok("tasks", "start", "-d", "--fifo-dir", str(target.fifo_dir), a1)
    assert target.task_status(a1) == "RUNNING"
    r = target.berth("tasks", "attach", a1, input="hi\n")
    assert (r.rc, r.out) == (4, "got hi\n"), r.err
    # attach deletes the task when it ends, with its FIFOs.
    assert target.ok("tasks", "ls", "-q").out == ""
    assert target.fifos_left() == []
    target.ok("containers", "rm", a1)


def _tty_run(target: Target, args: list[str], *, rows: int, cols: int,
             resize_to: tuple[int, int] | None = None, ready: bytes = b"") -> tuple[int, bytes]:
    """Run the CLI on a new pty (our terminal); optionally resize it once ``ready``
    has been printed. Returns the exit code and everything printed."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.execv(sys.executable, [sys.executable, "-m", "berth.core.cli", "--address",
                                      str(target.daemon.address), *args])
        finally:
            os._exit(127)
    import fcntl

    def set_size(r: int, c: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", r, c, 0, 0))

    set_size(rows, cols)
    out = b""
    resized = resize_to is None
    deadline = time.monotonic() + HANG_GUARD
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: the other side is gone
                    break
                if not data:
                    break
                out += data
            if not resized and ready in out:
                assert resize_to is not None
                set_size(*resize_to)
                os.kill(pid, signal.SIGWINCH)
                resized = True
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the tty run did not end: {out!r}")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out


def test_run_with_a_terminal(target: Target, rootfs: Path) -> None:
    tty1 = uid("tty1")
    code, out = _tty_run(target, ["run", "--rm", "-t", *target.run_flags(), "--rootfs",
                                  str(rootfs), tty1, "sh", "-c",
                                  # The size may come by ResizePty just after the start.
                                  'while [ "$(stty size 2>&1)" != "33 101" ]; do sleep 0.05; '
                                  "done; stty size; tty; echo $TERM; exit 7"],
                         rows=33, cols=101)
    text = out.decode(errors="replace")
    assert code == 7, text
    assert "33 101\r\n" in text  # our size reached the container's pty
    assert "/dev/pts/" in text and "xterm" in text
    assert target.ok("containers", "ls", "-q").out == ""


def test_terminal_resize_follows_sigwinch(target: Target, rootfs: Path) -> None:
    tty2 = uid("tty2")
    # The trap is set once the first size arrived, so only our resize can fire it.
    script = ('while [ "$(stty size)" != "20 70" ]; do sleep 0.05; done; '
              'trap "stty size; exit 9" WINCH; echo READY; while :; do sleep 0.05; done')
    code, out = _tty_run(target, ["run", "--rm", "-t", *target.run_flags(), "--rootfs",
                                  str(rootfs), tty2, "sh", "-c", script],
                         rows=20, cols=70, resize_to=(44, 120), ready=b"READY")
    text = out.decode(errors="replace")
    assert code == 9, text
    assert "44 120" in text


def test_run_an_image(target: Target, tmp_path: Path) -> None:
    i1 = uid("i1")
    i2 = uid("i2")
    tar = tmp_path / "busybox.tar"
    images.write_oci_tar(tar)
    target.ok("images", "import", str(tar))
    r = target.ok("run", "--rm", *target.run_flags(), images.NAME, i1,
                  "sh", "-c", 'echo "$PATH"; id -u; cat /etc/hostname')
    assert r.out.splitlines() == [images.PATH_ENV.removeprefix("PATH="), "0", "busybox"]
    assert i1 not in target.ok("snapshots", "ls").out  # --rm removed its snapshot

    # The image's Cmd is the default command; the container keeps its image and labels.
    target.ok("containers", "create", *target.create_flags(), images.NAME, i2)
    info = json.loads(target.ok("containers", "info", i2).out)
    assert info["Image"] == images.NAME
    assert info["SnapshotKey"] == i2 and info["Snapshotter"] == "overlayfs"
    assert info["Labels"]["io.containerd.image.config.stop-signal"] == "SIGTERM"
    assert info["Spec"]["process"]["args"] == ["sh"]
    assert info["Spec"]["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}
    assert i2 in target.ok("snapshots", "ls").out
    r = target.berth("tasks", "start", "--fifo-dir", str(target.fifo_dir), i2,
                     input="echo from-stdin; exit 6\n")
    assert (r.rc, r.out) == (6, "from-stdin\n"), r.err
    target.ok("containers", "rm", i2)
    assert i2 not in target.ok("snapshots", "ls").out
    assert target.fifos_left() == []


def test_errors(target: Target, rootfs: Path) -> None:
    x = uid("x")
    r = target.berth("run", "--rm", "-d", "--rootfs", str(rootfs), x, "true")
    assert r.rc == 1 and "--detach and --rm" in r.err
    r = target.berth("run", "--rm", *target.run_flags(), "--rootfs", str(rootfs), x,
                     "/no/such/binary")
    assert r.rc != 0
    assert target.ok("containers", "ls", "-q").out == ""  # --rm cleaned up after a failure
    assert target.fifos_left() == []
    r = target.berth("tasks", "kill", "nothere")
    assert r.rc == 1 and "not found" in r.err
    r = target.berth("run", "--rm", *target.run_flags(), "no.such/image:1", x, "true")
    assert r.rc == 1 and "not found" in r.err
