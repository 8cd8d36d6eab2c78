"""CRI log rotation as the kubelet does it (move the file, then ReopenContainerLog) on a
container that keeps writing: no line lost or written twice across the two files, every
line well formed; a long stdout line in P pieces then F; ReopenContainerLog of a
container that is not running is a clear FailedPrecondition."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from berth.core.api.runtime import v1 as api
from tests import daemons
from tests.cri import CRIClient
from tests.integration.test_cri_images import base  # noqa: F401 - a fixture
from tests.integration.test_cri_pods import (  # noqa: F401 - fixtures
    LOG_LINE,
    _wait,
    container_config,
    mirrored,
    pod_config,
    pulled,
)

pytest_plugins = ("tests.images",)
pytestmark = pytest.mark.root


def _lines(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for line in path.read_bytes().splitlines():
        assert LOG_LINE.match(line), line[:80]
        _, stream, tag, text = line.split(b" ", 3)
        out.append((stream, tag, text))
    return out


def test_rotation_loses_and_repeats_nothing(pulled: tuple[daemons.Daemon, CRIClient],  # noqa: F811
                                            base: Path) -> None:  # noqa: F811
    d, c = pulled
    config = pod_config(base / "logs", "rotating")
    sid = c.runtime("run_pod_sandbox", api.RunPodSandboxRequest(config=config)).pod_sandbox_id
    shared = base / "shared"
    shared.mkdir()
    # Numbered lines until told to stop, then one long line (P pieces, then F).
    script = ("i=0; until [ -e /shared/stop ]; do i=$((i+1)); echo $i; done;"
              " head -c 40000 /dev/zero | tr '\\0' z; echo; echo end")
    cid = c.runtime("create_container", api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=config, config=container_config(
            "rotating", script, mounts=[api.Mount(container_path="/shared",
                                                  host_path=str(shared))]))).container_id
    c.runtime("start_container", api.StartContainerRequest(container_id=cid))
    log = base / "logs" / "rotating" / "0.log"
    _wait(lambda: log.exists() and log.stat().st_size > 200_000, "lines in the log")
    for n in (1, 2):
        log.rename(log.with_suffix(f".log.{n}"))
        c.runtime("reopen_container_log", api.ReopenContainerLogRequest(container_id=cid))
        _wait(lambda: log.exists() and log.stat().st_size > 100_000, "lines in the new log")
    (shared / "stop").touch()
    _wait(lambda: c.runtime("container_status", api.ContainerStatusRequest(
        container_id=cid)).status.state == api.ContainerState.CONTAINER_EXITED, "exit")
    with pytest.raises(GRPCError) as e:
        c.runtime("reopen_container_log", api.ReopenContainerLogRequest(container_id=cid))
    assert e.value.status == Status.FAILED_PRECONDITION and e.value.message

    parts = [_lines(log.with_suffix(".log.1")), _lines(log.with_suffix(".log.2")),
             _lines(log)]
    assert all(parts), [len(p) for p in parts]
    everything = [x for p in parts for x in p]
    assert {s for s, _, _ in everything} == {b"stdout"}
    numbers = [int(t) for _, tag, t in everything if t.isdigit()]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) > 10_000
    tail = [(tag, t) for _, tag, t in everything if not t.isdigit()]
    assert [tag for tag, _ in tail] == [b"P", b"P", b"F", b"F"]
    assert b"".join(t for _, t in tail[:3]) == b"z" * 40000 and tail[3] == (b"F", b"end")
    c.runtime("remove_pod_sandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sid))
