"""berthd as a process: one per root, clean shutdown on signals, clear config errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import daemons
from tests.daemons import Daemon


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="berth-dm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def berthd_cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "berth.core.daemon", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def serves(d: Daemon) -> bool:
    r = daemons.ctr(d.address, "version")
    return r.rc == 0 and "Revision: berth" in r.out


def test_second_daemon_on_same_root_refuses(berthd: Daemon, base: Path) -> None:
    daemons.ctr_ok(berthd.address, "namespaces", "create", "keep")
    # Same root with the same sockets, and with sockets of its own.
    for address in (berthd.address, base / "other.sock"):
        r = berthd_cmd("--root", str(berthd.root), "--state", str(base / "state"),
                       "--address", str(address))
        assert r.returncode == 1, r
        assert r.stderr == (f"berthd: root {berthd.root} is in use by another berthd "
                            f"(pid {berthd.proc.pid})\n")
        assert "Traceback" not in r.stdout
    assert not (base / "other.sock").exists()
    assert not (base / "other.sock.ttrpc").exists()
    # The first one never noticed.
    assert berthd.proc.poll() is None
    assert berthd.address.exists() and berthd.ttrpc_address.exists()
    assert serves(berthd)
    assert daemons.ctr_ok(berthd.address, "namespaces", "ls", "-q").out == "keep\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_shut_down_cleanly(base: Path, sig: signal.Signals) -> None:
    d = daemons.berthd(base).start()
    try:
        daemons.ctr_ok(d.address, "namespaces", "create", "kept")
        # Open streams must not hold the shutdown up.
        with daemons.ctr_events(d.address) as ctr_events, daemons.Follower([
                sys.executable, "-m", "berth.core.cli", "--address", str(d.address), "events",
                "--since", "0"]) as berth_events:
            berth_events.wait_for(lambda line: "/namespaces/create" in line)
            daemons.wait_subscribed(ctr_events, d.address)
            assert d.stop(sig) == 0
            assert ctr_events.proc.wait(20) != 0
            assert berth_events.proc.wait(20) != 0
        assert not d.address.exists()
        assert not d.ttrpc_address.exists()
        logs = d.logs()
        assert f'"signal": "{sig.name}", "event": "stopping"' in logs
        assert '"event": "stopped"' in logs
        assert "Traceback" not in logs
        # The root is free again, with everything in it.
        d.start()
        assert daemons.ctr_ok(d.address, "namespaces", "ls", "-q").out == "kept\nsync\n"
    finally:
        d.kill()


def test_config_default_is_toml() -> None:
    r = berthd_cmd("config", "default")
    assert r.returncode == 0, r
    data = tomllib.loads(r.stdout)
    assert data["version"] == 2
    assert data["root"] == "/var/lib/berth"
    assert data["state"] == "/run/berth"
    assert data["grpc"]["address"] == "/run/berth/berth.sock"
    assert data["grpc"]["max_recv_message_size"] == 16 << 20
    assert data["ttrpc"]["address"] == "/run/berth/berth.sock.ttrpc"
    assert data["plugins"]["io.containerd.event.v1.exchange"]["log_capacity"] > 0


def test_config_file_and_flags(base: Path) -> None:
    cfg = base / "c.toml"
    cfg.write_text(f'root = "{base}/from-file"\n[debug]\nlevel = "warn"\n')
    r = berthd_cmd("--config", str(cfg), "--address", str(base / "b.sock"), "config", "dump")
    assert r.returncode == 0, r
    data = tomllib.loads(r.stdout)
    assert data["root"] == f"{base}/from-file"
    assert data["debug"]["level"] == "warn"
    assert data["grpc"]["address"] == str(base / "b.sock")
    assert data["ttrpc"]["address"] == str(base / "b.sock") + ".ttrpc"


@pytest.mark.parametrize("text,message", [
    ("root = [\n", "Invalid value"),
    ("version = 1\n", "unsupported version 1"),
    ("grpc = 5\n", "grpc must be a table"),
    ('root = 5\n', "root must be a string"),
    ('[grpc]\nmax_recv_message_size = "big"\n', "grpc.max_recv_message_size must be an integer"),
    ("disabled_plugins = \"x\"\n", "disabled_plugins must be an array"),
])
def test_bad_config_file_is_a_clear_error(base: Path, text: str, message: str) -> None:
    cfg = base / "bad.toml"
    cfg.write_text(text)
    r = berthd_cmd("--config", str(cfg), "--root", str(base / "root"), "--state",
                   str(base / "state"), "--address", str(base / "b.sock"))
    assert r.returncode == 1, r
    assert r.stderr.startswith(f"berthd: config file {cfg}: ") and message in r.stderr, r
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stdout + r.stderr
    assert not (base / "b.sock").exists()


def test_other_start_failures_are_clear(base: Path) -> None:
    r = berthd_cmd("--config", str(base / "missing.toml"))
    assert (r.returncode, r.stderr) == (1, f"berthd: config file {base}/missing.toml: not found\n")

    cfg = base / "req.toml"
    cfg.write_text('required_plugins = ["io.containerd.grpc.v1.nothing"]\n'
                   '[plugins."io.berth.network.v1.cni"]\nwrite_default = false\n')
    r = berthd_cmd("--config", str(cfg), "--root", str(base / "root"), "--state",
                   str(base / "state"), "--address", str(base / "b.sock"))
    assert r.returncode == 1, r
    assert r.stderr.endswith("berthd: required plugin io.containerd.grpc.v1.nothing did not "
                             "load: not registered\n"), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (base / "b.sock").exists()

    # A socket path under a regular file cannot be created.
    (base / "file").write_text("")
    cfg = base / "cni.toml"  # keeps the default network out of the host's /etc
    cfg.write_text('[plugins."io.berth.network.v1.cni"]\nwrite_default = false\n')
    # At warn level: plugins that started before the failure log their info lines.
    r = berthd_cmd("--config", str(cfg), "--log-level", "warn", "--root", str(base / "root"),
                   "--state", str(base / "state"),
                   "--address", str(base / "file" / "b.sock"))
    assert r.returncode == 1, r
    assert r.stderr == (f"berthd: [Errno 20] cannot serve ttrpc on {base}/file/b.sock.ttrpc: "
                        "Not a directory\n"), r
    assert "Traceback" not in r.stdout
    assert os.path.isfile(base / "file")
