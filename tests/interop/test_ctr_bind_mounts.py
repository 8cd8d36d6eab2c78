"""Bind mounts through the real ctr (issue 8.8): a source that is a symlink on the host
(Debian 12's ``/lib -> usr/lib``) is resolved as runc resolves it, so berth's runtime
mounts what containerd-shim-runc-v2 + runc mount; the outputs are compared."""

from __future__ import annotations

import os

import pytest

from tests.images import NAME
from tests.interop.test_ctr_berth_runtime import Berth, berth as berth  # noqa: F401

pytestmark = [pytest.mark.interop, pytest.mark.root]

SCRIPT = ("ls /hostlib | head -20; test -d /hostlib && echo dir;"
          " touch /hostlib/berth-probe 2>/dev/null || echo read-only;"
          " grep -c ' /hostlib ' /proc/self/mountinfo")


def run_with_lib(berth: Berth, runtime: str, name: str, *extra: str) -> str:
    assert os.path.islink("/lib"), "the host's /lib is expected to be a symlink (Debian 12)"
    r = berth.ctr("run", "--rm", "--runtime", runtime, *extra, "--mount",
                  "type=bind,src=/lib,dst=/hostlib,options=rbind:ro", NAME, berth.id(name),
                  "sh", "-c", SCRIPT)
    assert (r.rc, r.err) == (0, ""), (runtime, r)
    return r.out


def test_symlinked_bind_source_mounts_as_with_runc(berth: Berth) -> None:
    reference = run_with_lib(berth, "io.containerd.runc.v2", "runc-v2")
    lines = reference.splitlines()
    assert lines[-3:] == ["dir", "read-only", "1"], reference
    assert lines[:-3] == sorted(os.listdir("/lib"))[:20], reference
    assert run_with_lib(berth, "io.containerd.berth.v1", "berth") == reference
    config = str(berth.runtime_config("runc"))
    assert run_with_lib(berth, "io.containerd.berth.v1", "berth-runc",
                        "--runtime-config-path", config) == reference
