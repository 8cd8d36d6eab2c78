"""Real daemons for tests: berthd and the real containerd, each in its own temp dirs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def until(what: str, probe: Callable[[], object], timeout: float = 60.0,
          every: float = 0.1) -> Any:
    """``probe()``'s first truthy value; the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {got!r})")
        time.sleep(every)


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


def _cni_section(base: Path) -> str:
    return f'[plugins."io.berth.network.v1.cni"]\nconf_dir = "{base / "cni" / "net.d"}"\n'


def _keep_cni_out_of_etc(cfg: Path, base: Path) -> None:
    """A test's own config file that says nothing of the cni plugin's folder gets one under
    ``base``: otherwise berthd writes its default network into the host's /etc/berth."""
    try:
        data = tomllib.loads(cfg.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return  # the test is about a bad or missing file: leave it as it is
    section = data.get("plugins", {}).get("io.berth.network.v1.cni")
    if section is None:
        with cfg.open("a") as f:
            f.write("\n" + _cni_section(base))
    elif "conf_dir" not in section and section.get("write_default", True):
        raise ValueError(f"{cfg}: give the cni plugin a conf_dir (or write_default = false) "
                         "so the test keeps out of the host's /etc/berth/cni/net.d")


def berthd(base: Path, *extra: str) -> Daemon:
    base.mkdir(parents=True, exist_ok=True)
    d = Daemon("berth", base, [])
    if "--config" not in extra and "-c" not in extra:
        # Without a file of its own a test daemon would read the host's /etc/berth/config.toml
        # and write the default CNI network into the host's /etc/berth/cni/net.d.
        cfg = base / "config.toml"
        if not cfg.exists():
            cfg.write_text(_cni_section(base))
        extra = ("--config", str(cfg), *extra)
    else:
        flag = "--config" if "--config" in extra else "-c"
        _keep_cni_out_of_etc(Path(extra[extra.index(flag) + 1]), base)
    d.argv = [
        sys.executable, "-m", "berth.core.daemon", "--root", str(d.root), "--state", str(d.state),
        "--address", str(d.address), "--log-level", "debug", *extra,
    ]
    return d


def containerd(base: Path, env: dict[str, str] | None = None, level: str = "debug") -> Daemon:
    """The real containerd, isolated: own root, state, sockets; CRI disabled.

    ``env`` is added to the daemon's environment (e.g. a PATH that finds berth's shim).
    """
    if shutil.which(CONTAINERD) is None:
        raise RuntimeError(f"{CONTAINERD} is missing: install Debian package containerd")
    base.mkdir(parents=True, exist_ok=True)
    d = Daemon("containerd", base, [], env=dict(env or {}))
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
        f'  level = "{level}"\n'
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
    argv = [sys.executable, "-m", "berth.core.cli", "--address", str(address)]
    if namespace:
        argv += ["--namespace", namespace]
    p = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


class Follower:
    """A long-running client (``ctr events``...) whose stdout lines are read by a thread.

    Tests wait for lines with a generous deadline instead of sleeping: the deadline only
    bounds a failure, it never decides a pass.
    """

    def __init__(self, argv: list[str]) -> None:
        import queue
        import threading

        self.argv = argv
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._err: str | None = None
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20.0
                 ) -> list[str]:
        """Lines read until one matches ``predicate`` (included); fails after ``timeout``."""
        import queue

        got: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise TimeoutError(
                    f"{self.argv}: no matching line within {timeout}s; got {got!r}"
                ) from None
            if line is None:
                raise EOFError(f"{self.argv} ended (rc={self.proc.wait()}, stderr="
                               f"{self.stderr()!r}); got {got!r}")
            got.append(line)
            self.seen.append(line)
            if predicate(line):
                return got

    def stderr(self) -> str:
        """What the client wrote to stderr; empty while it still runs."""
        if self._err is None and self.proc.poll() is not None and self.proc.stderr is not None:
            self._err = self.proc.stderr.read()
        return self._err or ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        rc = self.proc.wait()
        self._reader.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return rc

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ctr_events(address: Path, *filters: str, namespace: str | None = None) -> Follower:
    argv = [CTR, "--address", str(address)]
    if namespace:
        argv += ["--namespace", namespace]
    return Follower([*argv, "events", *filters])


def ctr_ok(address: Path, *args: str, namespace: str | None = None) -> Result:
    r = ctr(address, *args, namespace=namespace)
    assert r.rc == 0, (args, r)
    return r


def wait_subscribed(f: Follower, address: Path, *, via_delete: bool = False) -> None:
    """Poke the daemon until ``f`` (``ctr events``) prints the poke: it is then subscribed.

    ctr says nothing when its subscription starts, so events sent before that are
    simply lost; the short wait per poke only decides when to poke again. With a
    delete-only filter, poke by creating and removing a namespace.
    """
    for i in range(60):
        name = f"sync{i}"
        if via_delete:
            ctr_ok(address, "namespaces", "create", name)
            ctr_ok(address, "namespaces", "rm", name)
            marker = f'/namespaces/delete {{"name":"{name}"}}'
        else:
            ctr_ok(address, "namespaces", "label", "sync", f"poke={i}")
            marker = f'"poke":"{i}"'
        try:
            f.wait_for(lambda line, marker=marker: marker in line, timeout=0.5)
            return
        except TimeoutError:
            continue
    raise AssertionError(f"{f.argv} never received a poke; stderr={f.stderr()!r}")


def events_until_marker(f: Follower, address: Path) -> list[str]:
    """Everything ``f`` prints before a final marker's delete event (excluded)."""
    ctr_ok(address, "namespaces", "create", "endmark")
    ctr_ok(address, "namespaces", "rm", "endmark")
    got = f.wait_for(lambda line: '/namespaces/delete {"name":"endmark"}' in line)
    return got[:-1]
