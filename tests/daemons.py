"""Real daemons for tests: berthd and the real containerd, each in its own temp dirs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before serving {path}")
        if path.exists():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise TimeoutError(f"{path} not served after {timeout}s")


@dataclass
class Daemon:
    """A daemon process with its root, state and socket."""

    name: str
    base: Path
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def address(self) -> Path:
        return self.base / "sock" / f"{self.name}.sock"

    @property
    def ttrpc_address(self) -> Path:
        return Path(str(self.address) + ".ttrpc")

    @property
    def log_path(self) -> Path:
        return self.base / f"{self.name}.log"

    def start(self, timeout: float = 30.0) -> Daemon:
        self.address.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env}, start_new_session=True,
            )
        finally:
            log.close()
        wait_for_socket(self.address, self.proc, timeout)
        return self

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def berthd(base: Path, *extra: str) -> Daemon:
    base.mkdir(parents=True, exist_ok=True)
    d = Daemon("berth", base, [])
    d.argv = [
        sys.executable, "-m", "core.daemon", "--root", str(d.root), "--state", str(d.state),
        "--address", str(d.address), "--log-level", "debug", *extra,
    ]
    return d


def containerd(base: Path) -> Daemon:
    """The real containerd, isolated: own root, state, sockets; CRI disabled."""
    if shutil.which(CONTAINERD) is None:
        raise RuntimeError(f"{CONTAINERD} is missing: install Debian package containerd")
    base.mkdir(parents=True, exist_ok=True)
    d = Daemon("containerd", base, [])
    cfg = base / "config.toml"
    cfg.write_text(
        "version = 2\n"
        f'root = "{d.root}"\n'
        f'state = "{d.state}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{d.address}"\n'
        "[ttrpc]\n"
        f'  address = "{d.ttrpc_address}"\n'
        "[debug]\n"
        f'  address = "{base / "sock" / "debug.sock"}"\n'
        '  level = "debug"\n'
    )
    d.argv = [CONTAINERD, "--config", str(cfg)]
    return d


@dataclass
class Result:
    rc: int
    out: str
    err: str


def ctr(address: Path, *args: str, namespace: str | None = None, timeout: float = 60,
        input: str | None = None) -> Result:
    argv = [CTR, "--address", str(address)]
    if namespace:
        argv += ["--namespace", namespace]
    p = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                       input=input)
    return Result(p.returncode, p.stdout, p.stderr)


def berth(address: Path, *args: str, namespace: str | None = None, timeout: float = 60
          ) -> Result:
    argv = [sys.executable, "-m", "core.cli", "--address", str(address)]
    if namespace:
        argv += ["--namespace", namespace]
    p = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)
