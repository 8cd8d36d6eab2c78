"""A real dockerd (Debian docker.io) started by hand over berthd or containerd.

Each dockerd gets its own data root, exec root, socket, pidfile and bridge (made here,
with its own subnet), and no systemd. It may not touch the host beyond that: it runs
with ``--ip-forward=false`` (enabling forwarding makes dockerd set the FORWARD policy
to DROP, which would cut off every other network on a shared machine), and
``cleanup`` removes what it leaves behind: its bridge, the rules it put into the
built-in chains, the DOCKER* chains it made once no dockerd of ours is left (never a
system dockerd's), and any mount under its folders.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import daemons

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # the Debian client, whatever else is on PATH
_subnets = itertools.cycle(range(200, 255))


def _free_subnet() -> int:
    """A 172.31.N.0/24 no interface has (other processes may run dockerds too)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for n in itertools.islice(_subnets, 55):
        if f" 172.31.{n}." not in used:
            return n
    raise RuntimeError("no free 172.31.N.0/24 subnet (200-254) for a dockerd bridge")
_alive: set[Dockerd] = set()
# DOCKER* chains that were there before our first dockerd (a system dockerd's): kept.
_foreign_chains: set[str] | None = None


def require() -> None:
    for b in (DOCKERD, DOCKER, "/usr/sbin/docker-proxy", "/usr/sbin/iptables"):
        if not os.access(b, os.X_OK):
            raise RuntimeError(f"{b} is missing: install Debian package docker.io (and iptables)")


@dataclass
class Result:
    rc: int
    out: str
    err: str


@dataclass(eq=False)
class Dockerd:
    base: Path
    containerd: Path
    live_restore: bool = False
    proc: subprocess.Popen | None = None
    bridge: str = ""
    subnet: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = _free_subnet()
        self.bridge = self.bridge or f"bdk{os.getpid() % 10000}x{n}"[:15]
        self.subnet = f"172.31.{n}"
        # The client reads no user's ~/.docker and no DOCKER_HOST.
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "DOCKER_CONFIG": str(self.base / "client"), "HOME": str(self.base)}

    @property
    def socket(self) -> Path:
        return self.base / "docker.sock"

    @property
    def log_path(self) -> Path:
        return self.base / "dockerd.log"

    def argv(self) -> list[str]:
        a = [DOCKERD, "--data-root", str(self.base / "data"),
             "--exec-root", str(self.base / "exec"), "-H", f"unix://{self.socket}",
             "--pidfile", str(self.base / "dockerd.pid"), f"--containerd={self.containerd}",
             f"--bridge={self.bridge}", "--ip-forward=false", "--log-level=debug"]
        if self.live_restore:
            a.append("--live-restore")
        return a

    def start(self, timeout: float = 60.0) -> Dockerd:
        require()
        self.base.mkdir(parents=True, exist_ok=True)
        if not Path(f"/sys/class/net/{self.bridge}").exists():
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        global _foreign_chains
        if not _alive:
            _foreign_chains = _docker_chains()
        _alive.add(self)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n"
                                   f"{self.logs()[-3000:]}")
            if self.socket.exists() and self.docker("version", timeout=10).rc == 0:
                return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"dockerd not serving after {timeout}s:\n"
                                   f"{self.logs()[-3000:]}")
            time.sleep(0.1)

    def docker(self, *args: str, timeout: float = 60, input: str | None = None) -> Result:
        p = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", *args], capture_output=True,
                           text=True, timeout=timeout, input=input, env=self.env)
        return Result(p.returncode, p.stdout, p.stderr)

    def ok(self, *args: str, timeout: float = 60) -> str:
        r = self.docker(*args, timeout=timeout)
        assert r.rc == 0, (args, r)
        return r.out.strip()

    def inspect(self, name: str) -> dict:
        return json.loads(self.ok("inspect", "--type", "container", name))[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def remove_all(self) -> None:
        ids = self.docker("ps", "-aq").out.split()
        if ids:
            self.docker("rm", "-f", *ids, timeout=60)

    def cleanup(self) -> None:
        """Stop dockerd (after removing its containers) and undo what it did to the host."""
        if self.proc is not None and self.proc.poll() is None:
            self.remove_all()
        self.stop()
        _alive.discard(self)
        _unmount_under(self.base)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _ip("link", "del", self.bridge)
        _drop_rules(lambda rule: self.bridge in rule or f"{self.subnet}.0/24" in rule)
        if not _alive:
            _drop_docker_chains()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)


def _drop_rules(pred: object) -> None:
    """Delete the rules ``pred`` picks from every chain of the filter and nat tables."""
    for table in ("filter", "nat"):
        for line in _iptables("-t", table, "-S").stdout.splitlines():
            if line.startswith("-A ") and pred(line):  # type: ignore[operator]
                _iptables("-t", table, "-D", *_split(line[3:]))


def _docker_chains() -> set[str]:
    """``table:chain`` of every DOCKER* chain now."""
    return {f"{table}:{line.split()[1]}" for table in ("filter", "nat")
            for line in _iptables("-t", table, "-S").stdout.splitlines()
            if line.startswith("-N DOCKER")}


def _ours() -> set[str]:
    return _docker_chains() - (_foreign_chains or set())


def _drop_docker_chains() -> None:
    ours = _ours()
    if not ours:
        return
    names = {c.split(":", 1)[1] for c in ours}

    def jumps_to_ours(rule: str) -> bool:
        return any(part.split()[0] in names for part in rule.split(" -j ")[1:])

    _drop_rules(jumps_to_ours)
    for c in sorted(ours):
        table, chain = c.split(":", 1)
        _iptables("-t", table, "-F", chain)
    for c in sorted(ours):
        table, chain = c.split(":", 1)
        _iptables("-t", table, "-X", chain)


def _split(rule: str) -> list[str]:
    import shlex

    return shlex.split(rule)


def _unmount_under(base: Path) -> None:
    prefix = str(base.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True)


def leftovers(d: Dockerd) -> list[str]:
    """What of ``d`` is still on the host after cleanup (empty when all is gone)."""
    left = []
    if Path(f"/sys/class/net/{d.bridge}").exists():
        left.append(f"bridge {d.bridge}")
    for table in ("filter", "nat"):
        for line in _iptables("-t", table, "-S").stdout.splitlines():
            if d.bridge in line or f"{d.subnet}.0/24" in line:
                left.append(f"{table}: {line}")
    if not _alive:
        left += [f"chain {c}" for c in sorted(_ours())]
    prefix = str(d.base.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        left += [f"mount {p}" for p in (line.split()[4] for line in f) if p.startswith(prefix)]
    return left


def stack_on(kind: str, base: Path, level: str = "debug",
             **kw: object) -> tuple[daemons.Daemon, Dockerd]:
    """berthd or the real containerd (both logging at ``level``), then a dockerd over it."""
    d = (daemons.berthd(base / "d", "--log-level", level) if kind == "berth"
         else daemons.containerd(base / "d", level=level))
    d.start()
    try:
        return d, Dockerd(base / "docker", d.address, **kw).start()  # type: ignore[arg-type]
    except BaseException:
        d.stop()
        raise


def teardown(d: daemons.Daemon, dk: Dockerd) -> None:
    try:
        dk.cleanup()
    finally:
        d.stop()
        shutil.rmtree(dk.base, ignore_errors=True)
