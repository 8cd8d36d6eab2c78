"""berth's shim outlives berthd, and berthd outlives berth's shim.

- berthd SIGKILLed and restarted: the task keeps running under its shim, berthd
  reconnects to it (``ctr tasks ls`` RUNNING, exec works), and a kill afterwards is
  reported with its exit status.
- the shim SIGKILLed (while berthd runs, or while berthd is down, when berthd cleans
  up in the background after it serves): the task's exit is reported (137: the
  container dies with its shim), the task is deleted by berthd itself as containerd
  does, and nothing stays behind: processes, mounts under the bundle's rootfs, cgroups,
  the shim's socket, the bundle.

The ``berth`` fixture (berthd in a temporary folder, its cleanup and leak checks) comes
from ``test_ctr_berth_runtime``.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests import daemons
from tests.interop.test_ctr_berth_runtime import (
    Berth,
    alive,
    assert_task_left_nothing,
    berth as berth,  # noqa: F401
    cgroup_dirs,
    mounts_under,
    wait_for,
)

pytestmark = [pytest.mark.interop, pytest.mark.root]


def shim_socket(berth: Berth, cid: str) -> Path:
    """The socket of the shim serving ``cid``, from the address file in its bundle."""
    address = (berth.bundle(cid) / "address").read_text().strip()
    path = Path(address.removeprefix("unix://"))
    assert path.is_socket() and path.parent == berth.socket_dir, path
    return path


def test_task_survives_berthd_sigkill_and_is_stopped_after_restart(berth: Berth) -> None:
    cid = berth.id("r1")
    e1, e2 = berth.id("e1"), berth.id("e2")
    assert berth.run(cid, "sleep", "1000", detach=True).rc == 0
    berth.ok("tasks", "exec", "-d", "--exec-id", e1, cid, "sleep", "1000")
    pid, status = berth.tasks()[cid]
    assert status == "RUNNING"
    shim = berth.shim_of(pid)
    sock = shim_socket(berth, cid)

    assert berth.daemon.kill() == -signal.SIGKILL
    assert alive(pid) and alive(shim) and sock.is_socket()
    berth.daemon.start()
    assert berth.tasks() == {cid: (pid, "RUNNING")}
    # berthd reached the shim again: new calls go through.
    r = berth.ctr("tasks", "exec", "--exec-id", e2, cid, "sh", "-c", "echo after; exit 2")
    assert (r.rc, r.out) == (2, "after\n"), (r, berth.daemon.logs()[-3000:])
    ps = berth.ok("tasks", "ps", cid).splitlines()
    assert ps[1].split() == [str(pid), "-"] and f"ExecID:{e1}," in ps[2], ps

    with berth.events() as events:
        # An exec is no pid 1: the default SIGTERM kills it (128+15).
        berth.ok("tasks", "kill", "--exec-id", e1, cid)
        killed = events.wait("/tasks/exit", cid, exec_id=e1)
        assert killed["exit_status"] == 143
        # The init is pid 1 of its namespace, which has no SIGTERM handler: the kernel
        # drops SIGTERM for it, so the task is stopped with SIGKILL (128+9).
        berth.ok("tasks", "kill", "-s", "KILL", cid)
        exited = events.wait("/tasks/exit", cid, exec_id=cid)
    assert (exited["pid"], exited["exit_status"]) == (pid, 137)
    assert berth.tasks() == {cid: (pid, "STOPPED")}
    berth.ok("tasks", "rm", cid)
    berth.ok("containers", "rm", cid)
    wait_for("the shim to exit", lambda: not alive(shim))
    assert_task_left_nothing(berth, cid, pid, shim)
    assert not sock.exists()
    berth.wait_no_shim_sockets()


def test_killed_shim_reports_exit_and_leaks_nothing(berth: Berth) -> None:
    cid = berth.id("k1")
    e1 = berth.id("e1")
    assert berth.run(cid, "sleep", "1000", detach=True).rc == 0
    berth.ok("tasks", "exec", "-d", "--exec-id", e1, cid, "sleep", "1000")
    pid, _ = berth.tasks()[cid]
    shim = berth.shim_of(pid)
    exec_pid = next(int(line.split()[0]) for line in
                    berth.ok("tasks", "ps", cid).splitlines() if f"ExecID:{e1}," in line)
    sock = shim_socket(berth, cid)
    rootfs = berth.bundle(cid) / "rootfs"
    assert mounts_under(rootfs) == [str(rootfs)]
    assert cgroup_dirs(berth.namespace, cid)

    with berth.events() as events:
        os.kill(shim, signal.SIGKILL)
        exited = events.wait("/tasks/exit", cid)
        deleted = events.wait("/tasks/delete", cid)
    # The container's processes die with their shim; berthd's cleanup (the shim's
    # delete action) reports them as killed.
    assert (exited["id"], exited["pid"], exited["exit_status"]) == (cid, pid, 137)
    assert (deleted["pid"], deleted["exit_status"]) == (pid, 137)
    assert berth.tasks() == {}
    # berthd already deleted the dead shim's task, as containerd does; ctr says so.
    r = berth.ctr("tasks", "rm", cid)
    assert r.rc == 1 and f"no running task found: task {cid} not found: not found" in r.err, r
    berth.ok("containers", "rm", cid)
    assert not alive(exec_pid)
    assert_task_left_nothing(berth, cid, pid, shim)
    assert not sock.exists()
    berth.wait_no_shim_sockets()
    assert "Active" not in berth.ok("snapshots", "ls")


def test_shim_killed_while_berthd_is_down(berth: Berth) -> None:
    cid = berth.id("x1")
    assert berth.run(cid, "sleep", "1000", detach=True).rc == 0
    pid, _ = berth.tasks()[cid]
    shim = berth.shim_of(pid)
    sock = shim_socket(berth, cid)
    berth.daemon.kill()
    os.kill(shim, signal.SIGKILL)
    wait_for("the shim to die", lambda: not alive(shim))
    berth.daemon.start()
    # berthd serves first and cleans up after the dead shim in the background: until
    # then the task shows as UNKNOWN (with its pid), then it is gone.
    assert berth.tasks() in ({cid: (pid, "UNKNOWN")}, {})
    wait_for("the dead shim's cleanup", lambda: berth.tasks() == {})
    logged = daemons.berth(berth.daemon.address, "events", "--since", "0", "--no-follow",
                           f'namespace=={berth.namespace},topic~="^/tasks/(exit|delete)"')
    assert logged.rc == 0, logged
    # "<seq> <date> <time> <namespace> <topic> <json>"
    lines = logged.out.splitlines()
    assert [line.split()[4] for line in lines] == ["/tasks/exit", "/tasks/delete"], lines
    exit_ = json.loads(lines[0].split(" ", 5)[5])
    assert (exit_["container_id"], exit_["pid"], exit_["exit_status"]) == (cid, pid, 137)
    berth.ok("containers", "rm", cid)
    assert_task_left_nothing(berth, cid, pid, shim)
    assert not sock.exists()
