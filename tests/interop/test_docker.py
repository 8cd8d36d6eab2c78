"""The real dockerd (Debian docker.io 20.10) on berthd, against the same on containerd.

The seed's chain, CLI → dockerd → berthd → shim → runc: every everyday command gives
the same outcome as through the real containerd; then berthd restarts (SIGTERM and
SIGKILL) under a running dockerd, a container dies while berthd is down, and dockerd
itself restarts with --live-restore. Every dockerd is started by hand (tests/dockerd.py)
and leaves no bridge, iptables rule or chain, or mount behind.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import daemons, dockerd as dockerds, images
from tests.daemons import until
from tests.dockerd import Dockerd

pytestmark = [pytest.mark.interop, pytest.mark.root]


def _stack(kind: str) -> Iterator[tuple[daemons.Daemon, Dockerd]]:
    dockerds.require()
    base = Path(tempfile.mkdtemp(prefix=f"berth-dk{kind[0]}-", dir="/tmp"))
    d, dk = dockerds.stack_on(kind, base)
    try:
        images.write_docker_tar(base / "busybox.tar")
        dk.ok("load", "-i", str(base / "busybox.tar"))
        yield d, dk
    finally:
        dockerds.teardown(d, dk)
        left = dockerds.leftovers(dk)
        shims = subprocess.run(["pgrep", "-f", str(d.address)], capture_output=True,
                               text=True).stdout.split()
        for pid in shims:
            os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(base)], check=False)
        assert not left, f"dockerd left behind: {left}"
        assert not shims, f"shims left running after teardown: {shims}"


@pytest.fixture(scope="module")
def berth_stack() -> Iterator[tuple[daemons.Daemon, Dockerd]]:
    yield from _stack("berth")


@pytest.fixture(scope="module")
def containerd_stack() -> Iterator[tuple[daemons.Daemon, Dockerd]]:
    yield from _stack("containerd")


def state(dk: Dockerd, name: str) -> tuple[str, int]:
    s = dk.inspect(name)["State"]
    return s["Status"], s["ExitCode"]


def exec_in_pty(dk: Dockerd, name: str, *cmd: str) -> str:
    """``docker exec -it`` with a real terminal on its stdin and stdout."""
    master, slave = os.openpty()
    try:
        p = subprocess.Popen([dockerds.DOCKER, "-H", f"unix://{dk.socket}", "exec", "-it",
                              name, *cmd], stdin=slave, stdout=slave, stderr=slave,
                             env=dk.env, start_new_session=True)
    finally:
        os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(30) == 0, out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    return out.decode(errors="replace").replace("\r\n", "\n")


def fetch(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def everyday(dk: Dockerd) -> dict[str, object]:
    """The everyday commands; what each one leads to, in a form both stacks can match."""
    out: dict[str, object] = {}
    ok, docker = dk.ok, dk.docker
    ok("run", "-d", "--name", "c1", "busybox", "sh", "-c",
       "echo out; echo err >&2; exec sleep 1000")
    out["run -d"] = state(dk, "c1")
    r = docker("exec", "c1", "echo", "hi")
    out["exec"] = (r.rc, r.out)
    out["exec exit code"] = docker("exec", "c1", "sh", "-c", "exit 3").rc
    tty = exec_in_pty(dk, "c1", "sh", "-c", "tty; echo in-pty")
    out["exec -it"] = ("/dev/pts/" in tty, "in-pty" in tty)
    logs = until("logs", lambda: (lambda r: r if r.out and r.err else None)(
        docker("logs", "c1")))
    out["logs"] = (logs.out, logs.err)
    out["top"] = "sleep 1000" in ok("top", "c1")
    name, mem = ok("stats", "--no-stream", "--format", "{{.Name}}|{{.MemUsage}}",
                   "c1").split("|")
    out["stats"] = (name, not mem.startswith("0B"))
    ok("pause", "c1")
    out["pause"] = state(dk, "c1")
    ok("unpause", "c1")
    out["unpause"] = (state(dk, "c1"), docker("exec", "c1", "true").rc)
    ok("stop", "-t", "1", "c1")  # sleep as pid 1 ignores SIGTERM: SIGKILL after 1 s
    out["stop"] = state(dk, "c1")
    ok("start", "c1")
    out["start"] = (state(dk, "c1"), docker("exec", "c1", "true").rc)
    pid = dk.inspect("c1")["State"]["Pid"]
    ok("restart", "-t", "1", "c1")
    out["restart"] = (state(dk, "c1"), dk.inspect("c1")["State"]["Pid"] != pid)
    ok("kill", "c1")
    out["kill"] = state(dk, "c1")
    ok("start", "c1")
    ok("rm", "-f", "c1")
    out["rm -f"] = docker("inspect", "--type", "container", "c1").rc != 0

    r = docker("run", "--name", "oom", "-m", "32m", "--memory-swap", "32m", "busybox",
               "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1")
    s = dk.inspect("oom")["State"]
    out["-m 32m"] = (r.rc, s["OOMKilled"], s["ExitCode"])
    ok("rm", "oom")

    ok("run", "-d", "--name", "always", "--restart=always", "busybox", "sh", "-c",
       "sleep 0.2; exit 1")
    until("restart=always restarts", lambda: dk.inspect("always")["RestartCount"] >= 2)
    out["--restart=always"] = dk.inspect("always")["HostConfig"]["RestartPolicy"]["Name"]
    ok("rm", "-f", "always")

    port = images.free_port()
    ok("run", "-d", "--name", "web", "-p", f"127.0.0.1:{port}:80", "busybox", "sh", "-c",
       "mkdir -p /www && echo hello-from-busybox > /www/index.html && "
       "exec httpd -f -p 80 -h /www")
    ip = dk.inspect("web")["NetworkSettings"]["IPAddress"]
    out["-p"] = (until("httpd through dockerd's port", lambda: fetch(port)),
                 ip.startswith(dk.subnet + "."))
    ok("rm", "-f", "web")

    r = docker("run", "--rm", "--network", "none", "busybox", "ls", "/sys/class/net")
    out["--network none"] = (r.rc, r.out.split())
    r = docker("run", "--rm", "--name", "gone", "busybox", "sh", "-c", "echo ran; exit 7")
    out["run --rm"] = (r.rc, r.out, docker("inspect", "--type", "container", "gone").rc != 0)
    return out


EXPECTED = {
    "run -d": ("running", 0),
    "exec": (0, "hi\n"),
    "exec exit code": 3,
    "exec -it": (True, True),
    "logs": ("out\n", "err\n"),
    "top": True,
    "stats": ("c1", True),
    "pause": ("paused", 0),
    "unpause": (("running", 0), 0),
    "stop": ("exited", 137),
    "start": (("running", 0), 0),
    "restart": (("running", 0), True),
    "kill": ("exited", 137),
    "rm -f": True,
    "-m 32m": (137, True, 137),
    "--restart=always": "always",
    "-p": ("hello-from-busybox\n", True),
    "--network none": (0, ["lo"]),
    "run --rm": (7, "ran\n", True),
}


def test_everyday_commands_same_as_on_containerd(
        berth_stack: tuple[daemons.Daemon, Dockerd],
        containerd_stack: tuple[daemons.Daemon, Dockerd]) -> None:
    on_containerd = everyday(containerd_stack[1])
    on_berth = everyday(berth_stack[1])
    assert on_berth == on_containerd
    assert on_berth == EXPECTED


def wait_exec_works(dk: Dockerd, name: str) -> None:
    # Right after a restart dockerd is still reconnecting ("connection refused"): the
    # same on containerd. Bounded; the commands after this get one try each.
    until("docker exec after the restart",
          lambda: dk.docker("exec", name, "true", timeout=30).rc == 0, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("kind", ["berth", "containerd"])
def test_daemon_restart_under_dockerd(kind: str, sig: signal.Signals,
                                      request: pytest.FixtureRequest) -> None:
    """berthd restarted under dockerd with three containers up; containerd alike."""
    d, dk = request.getfixturevalue(f"{kind}_stack")
    names = [f"up{sig.name}{i}" for i in range(3)]
    for n in names:
        dk.ok("run", "-d", "--name", n, "busybox", "sleep", "1000")
    mark = len(dk.logs())
    d.stop(sig)
    d.start()
    wait_exec_works(dk, names[0])
    # Each of these hung or took dockerd's 10 s fallback while it was not subscribed.
    r = dk.docker("exec", names[0], "echo", "back", timeout=30)
    assert (r.rc, r.out) == (0, "back\n")
    dk.ok("stop", "-t", "2", names[0], timeout=30)
    assert state(dk, names[0]) == ("exited", 137)
    dk.ok("kill", names[1], timeout=30)
    assert state(dk, names[1]) == ("exited", 137)
    dk.ok("rm", "-f", names[2], timeout=30)
    assert dk.docker("inspect", "--type", "container", names[2]).rc != 0
    r = dk.docker("run", "--rm", "busybox", "echo", "new", timeout=30)
    assert (r.rc, r.out) == (0, "new\n")
    dk.ok("rm", names[0], names[1])
    # dockerd's fallback when the exit event never comes (the 10 s that kill and rm -f
    # took before berth served grpc.health.v1.Health).
    assert "within 10 seconds of kill" not in dk.logs()[mark:]


EXIT_PUBLISHED = '"topic": "/tasks/exit"'


def test_container_killed_while_berthd_is_down(berth_stack: tuple[daemons.Daemon, Dockerd]
                                               ) -> None:
    d, dk = berth_stack
    dk.ok("run", "-d", "--name", "victim", "busybox", "sleep", "1000")
    dk.ok("run", "-d", "--name", "bystander", "busybox", "sleep", "1000")
    pid = dk.inspect("victim")["State"]["Pid"]
    exits_before = d.logs().count(EXIT_PUBLISHED)
    # dockerd frozen stands for dockerd in its reconnect back-off, deterministically:
    # the exit the shim re-sends to the restarted berthd is published before dockerd
    # can subscribe again (on containerd that exit is lost and the container stays
    # "running"; berth holds it for dockerd's subscription).
    assert dk.proc is not None
    dk.proc.send_signal(signal.SIGSTOP)
    try:
        d.kill()
        os.kill(pid, signal.SIGKILL)
        until("the victim is gone", lambda: not Path(f"/proc/{pid}").exists())
        d.start()
        until("the shim's exit reaches the restarted berthd",
              lambda: d.logs().count(EXIT_PUBLISHED) > exits_before)
    finally:
        dk.proc.send_signal(signal.SIGCONT)
    status = until("victim shows exited", lambda: (lambda s: s if s.startswith("Exited")
                   else None)(dk.ok("ps", "-a", "--filter", "name=victim", "--format",
                                    "{{.Status}}")))
    assert status.startswith("Exited (137)")
    assert state(dk, "bystander") == ("running", 0)
    dk.ok("rm", "victim")
    dk.ok("rm", "-f", "bystander")


def test_dockerd_live_restore_adopts_containers(berth_stack: tuple[daemons.Daemon, Dockerd]
                                                ) -> None:
    d, dk = berth_stack
    dk.remove_all()
    dk.stop()
    dk.live_restore = True
    dk.start()
    try:
        for n in ("lr1", "lr2"):
            dk.ok("run", "-d", "--name", n, "busybox", "sleep", "1000")
        pids = {n: dk.inspect(n)["State"]["Pid"] for n in ("lr1", "lr2")}
        dk.stop()
        assert all(Path(f"/proc/{p}").exists() for p in pids.values())
        dk.start()
        for n, p in pids.items():
            assert state(dk, n) == ("running", 0)
            assert dk.inspect(n)["State"]["Pid"] == p
        r = dk.docker("exec", "lr1", "echo", "adopted", timeout=30)
        assert (r.rc, r.out) == (0, "adopted\n")
        dk.ok("stop", "-t", "1", "lr1", timeout=30)
        assert state(dk, "lr1") == ("exited", 137)
        dk.ok("rm", "-f", "lr1", "lr2")
    finally:
        dk.live_restore = False
