"""berthd serves before it has cleaned up after the shims that died while it was down
(issue 8.6): with 100 dead shims' bundles, ``ctr version`` answers while the recovery
of every one of them is still running, and the recovery then ends on its own.

The state is made cheaply, as a previous berthd would have left it: 100 container
records (``ctr containers create --rootfs``), and for each a bundle whose shim socket
is gone and whose shim binary's ``delete`` action (run by berthd for a dead shim) holds
its answer until the test lets it go. So the recovery cannot be over when ``ctr
version`` answers unless berthd waited for it; the order is read from berthd's log and
from what the test saw, never from a timing threshold.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import daemons
from tests.daemons import Daemon

pytestmark = [pytest.mark.root, pytest.mark.interop]

DEAD = 100
TASK_DIR = "io.containerd.runtime.v2.task"  # the runtime plugin's state folder
NAMESPACE = "boot-dead-shims"
# Bound on the held delete action (a hang becomes a failure, nothing is timed by it).
HOLD_STEPS = 2400


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="berth-boot-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def held_shim(base: Path, flag: Path) -> Path:
    """A shim binary whose ``delete`` answers (an empty DeleteResponse) once ``flag``
    exists; every call is counted in ``deletes/``."""
    path = base / "containerd-shim-held-v2"
    (base / "deletes").mkdir()
    path.write_text(
        "#!/bin/sh\n"
        f'touch "{base}/deletes/$$"\n'
        "i=0\n"
        f'while [ ! -e "{flag}" ] && [ $i -lt {HOLD_STEPS} ]; do sleep 0.05; i=$((i+1)); done\n'
        "exit 0\n")
    path.chmod(0o755)
    return path


def leave_dead_shims(d: Daemon, base: Path, shim: Path) -> list[str]:
    """Container records and bundles of ``DEAD`` tasks whose shims are gone."""
    rootfs = base / "rootfs"
    rootfs.mkdir()
    ids = [f"dead{i:03d}" for i in range(DEAD)]

    def create(cid: str) -> None:
        daemons.ctr_ok(d.address, "containers", "create", "--rootfs", str(rootfs), cid, "true",
                       namespace=NAMESPACE)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, ids))
    for cid in ids:
        bundle = d.state / TASK_DIR / NAMESPACE / cid
        bundle.mkdir(parents=True, mode=0o700)
        (bundle / "address").write_text(f"unix://{base}/gone/{cid}.sock")
        (bundle / "shim-binary-path").write_text(str(shim))
    return ids


def test_serves_before_the_recovery_of_100_dead_shims_is_over(base: Path) -> None:
    flag = base / "let-the-deletes-answer"
    d = daemons.berthd(base / "berth")
    d.start()
    try:
        ids = leave_dead_shims(d, base, held_shim(base, flag))
        assert d.kill() < 0
        d.start()
        version = daemons.ctr(d.address, "version")
        assert version.rc == 0, version
        logs = d.logs()
        booted = logs.rindex("berthd successfully booted")
        assert "recovered tasks after restart" not in logs[booted:], logs[booted:][-3000:]
        # The tasks are there meanwhile, each waiting for its cleanup.
        listed = daemons.ctr_ok(d.address, "tasks", "ls", "-q", namespace=NAMESPACE)
        assert sorted(listed.out.split()) == ids, (listed, d.logs()[booted:][-4000:])
        assert not flag.exists()

        flag.touch()
        daemons.until("the recovery to end",
                      lambda: "recovered tasks after restart" in d.logs()[booted:],
                      timeout=300)
        logs = d.logs()
        recovering = logs.index("recovering tasks after restart", booted)
        assert booted < recovering < logs.index("recovered tasks after restart", recovering)
        assert len(list((base / "deletes").iterdir())) == DEAD
        assert daemons.ctr_ok(d.address, "tasks", "ls", "-q", namespace=NAMESPACE).out == ""
        assert not any((d.state / TASK_DIR / NAMESPACE).iterdir())
        for cid in ids:
            daemons.ctr_ok(d.address, "containers", "rm", cid, namespace=NAMESPACE)
    finally:
        flag.touch()
        d.stop()
