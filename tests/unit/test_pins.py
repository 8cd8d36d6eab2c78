"""The libraries berth depends on closely are installed at the versions pyproject pins.

The client library is grpclib (on h2, hpack and hyperframe), and every message is
betterproto: a release of any of them can change behaviour a client sees, so a fresh
install must get exactly the versions the suite was run with. (berthd's gRPC server is
on the system's libnghttp2: its version is checked in test_nghttp2_session.py.)
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PINNED = ("h2", "hpack", "hyperframe", "grpclib", "betterproto", "wsproto")


def _requirements() -> dict[str, Requirement]:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {r.name.lower(): r for r in map(Requirement, deps)}


def test_close_dependencies_are_pinned_exactly() -> None:
    reqs = _requirements()
    for name in PINNED:
        spec = list(reqs[name].specifier)
        assert len(spec) == 1 and spec[0].operator == "==", (name, str(reqs[name]))


def test_installed_versions_match_the_pins() -> None:
    reqs = _requirements()
    for name in PINNED:
        pinned = next(iter(reqs[name].specifier)).version
        assert metadata.version(name) == pinned, name
