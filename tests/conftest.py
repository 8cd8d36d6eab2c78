"""Shared fixtures: real daemons in temporary folders, stopped and checked on the way out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import daemons


def _short_tmp(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    # unix socket paths are limited to 107 bytes; pytest's tmp paths can be long.
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f"berth-{name}-", dir="/tmp"))


@pytest.fixture
def berthd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Daemon]:
    base = _short_tmp(tmp_path_factory, "d")
    d = daemons.berthd(base).start()
    yield d
    d.stop()
    import shutil

    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.Daemon]:
    base = _short_tmp(tmp_path_factory, "c")
    d = daemons.containerd(base).start()
    yield d
    d.stop()
    import shutil

    shutil.rmtree(base, ignore_errors=True)


_HOST_CNI = Path("/etc/berth/cni/net.d")


def _host_cni_files() -> dict[str, int]:
    try:
        return {p.name: p.stat().st_mtime_ns for p in _HOST_CNI.iterdir()}
    except FileNotFoundError:
        return {}


@pytest.fixture(scope="session", autouse=True)
def _tests_keep_out_of_host_etc() -> Iterator[None]:
    """Test daemons keep their CNI networks in their own folders: none may write the default
    network into the host's /etc/berth (daemons.berthd gives every config a conf_dir)."""
    before = _host_cni_files()
    yield
    after = _host_cni_files()
    written = sorted(n for n, m in after.items() if before.get(n) != m)
    assert not written, f"a test daemon wrote {written} into the host's {_HOST_CNI}"
