"""The in-process runtime's create shortcuts: an init forked straight into its new pid
namespace (no second fork), the state file written without a deep copy, and the
cgroup attach-lock primer's choice of file. No root, no kernel calls."""

from __future__ import annotations

import json
from pathlib import Path

from berth.core import errdefs
from berth.plugins.runtimes.inprocess import runtime, syscalls as S
from berth.plugins.runtimes.inprocess.state import ContainerState, StateStore
from tests.unit.test_inprocess_steps import container, first, run_init


def test_init_already_in_its_pid_namespace_neither_unshares_it_nor_forks(tmp_path: Path
                                                                          ) -> None:
    c = container(tmp_path)
    assert c.new_namespace("pid")
    _, calls = run_init(c, in_pid_ns=True)
    assert not [x for x in calls if x[0] == "fork"]
    flags = calls[first(calls, "unshare")][1]
    assert not flags & S.CLONE_NEWPID
    assert flags & S.CLONE_NEWNS and flags & S.CLONE_NEWNET
    # it reports itself (the runtime maps that to the pid it forked) before the rootfs
    assert first(calls, "send", "pid") < first(calls, "mount")
    assert first(calls, "send", "ready") < first(calls, "execve")


def test_init_forked_before_its_pid_namespace_still_forks(tmp_path: Path) -> None:
    c = container(tmp_path)
    sc, calls = run_init(c, forks=[0])
    assert calls[first(calls, "unshare")][1] & S.CLONE_NEWPID
    assert first(calls, "fork") < first(calls, "mount")


def test_direct_pid_namespace_only_without_user_or_time_namespace(tmp_path: Path) -> None:
    assert runtime._direct_pid_ns(container(tmp_path))
    userns = container(tmp_path, lambda cfg: cfg["linux"].update(
        namespaces=[*cfg["linux"]["namespaces"], {"type": "user"}],
        uidMappings=[{"containerID": 0, "hostID": 100000, "size": 65536}],
        gidMappings=[{"containerID": 0, "hostID": 100000, "size": 65536}]))
    assert not runtime._direct_pid_ns(userns)
    joined = container(tmp_path, lambda cfg: cfg["linux"].update(
        namespaces=[{"type": "pid", "path": "/proc/1/ns/pid"}, {"type": "mount"},
                    {"type": "uts"}]))
    assert not runtime._direct_pid_ns(joined)
    no_pid = container(tmp_path, lambda cfg: cfg["linux"].update(
        namespaces=[{"type": "mount"}, {"type": "uts"}]))
    assert not runtime._direct_pid_ns(no_pid)


def test_state_file_round_trips_and_a_torn_one_is_not_found(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.create_dir("c1")
    config = {"process": {"args": ["true"]}, "linux": {"resources": {"pids": {"limit": 5}}}}
    st = ContainerState(id="c1", pid=10, pid_start=20, bundle="/b", created="2024-01-01",
                        config=config, cgroup={"dirs": {"": "/x"}}, annotations={"a": "b"})
    store.save(st)
    assert store.load("c1") == st
    assert json.loads((tmp_path / "c1" / "state.json").read_text())["config"] == config
    (tmp_path / "c1" / "state.json").write_bytes(b'{"id": "c1", "pi')
    try:
        store.load("c1")
    except errdefs.NotFound:
        pass
    else:
        raise AssertionError("a torn state file must read as a missing container")
