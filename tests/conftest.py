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
