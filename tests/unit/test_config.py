"""Configuration: defaults, file, flags, and clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from berth.core import config, daemon, errdefs


def test_defaults() -> None:
    c = config.Config()
    assert c.root == Path("/var/lib/berth")
    assert c.address == Path("/run/berth/berth.sock")
    assert c.ttrpc_address == Path("/run/berth/berth.sock.ttrpc")


def test_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('root = "/r"\n[grpc]\naddress = "/a.sock"\n[plugins."x.y"]\nk = 1\n')
    c = config.load(f, overrides={"root": "/flag"})
    assert c.root == Path("/flag")
    assert c.address == Path("/a.sock")
    assert c.data["grpc"]["max_recv_message_size"] == 16 << 20  # default kept
    assert c.plugins == {"x.y": {"k": 1}}


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(errdefs.NotFound, match="config file"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("root = [")
    with pytest.raises(errdefs.InvalidArgument, match="bad.toml"):
        config.load(bad)
    v1 = tmp_path / "v1.toml"
    v1.write_text("version = 1\n")
    with pytest.raises(errdefs.InvalidArgument, match="unsupported version"):
        config.load(v1)


def test_config_default_prints_every_plugin_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.main(["config", "default"]) == 0
    data = tomllib.loads(capsys.readouterr().out)
    assert data["root"] == "/var/lib/berth"
    assert data["plugins"]["io.containerd.event.v1.exchange"]["log_capacity"] == 10000
