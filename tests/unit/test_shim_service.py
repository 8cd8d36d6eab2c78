"""The Task service's semantics with a fake OCI runtime and reaper: no root, no processes.

What is checked is what containerd relies on: the order of published events, the
state machine's refusals (with the Go shim's wording and codes), Wait returning the
exit, exec ids being unique, Shutdown being a no-op while containers remain.
"""

from __future__ import annotations

import json
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import pytest
import trio

from berth.core import errdefs
from berth.core.api.containerd.runc.v1 import ProcessDetails
from berth.core.api.containerd.task import v2 as api
from berth.core.api.containerd.v1.types import Status
from berth.core.oci.reaper import Exit
from berth.core.shim import options
from berth.core.shim.process import kill_error
from berth.core.shim.service import TaskService, kills_all_on_exit

CTX = None  # handlers ignore the ttrpc context


class FakeReaper:
    def __init__(self) -> None:
        self._exits: dict[int, Exit] = {}
        self._events: dict[int, trio.Event] = {}

    def _event(self, pid: int) -> trio.Event:
        return self._events.setdefault(pid, trio.Event())

    async def wait(self, pid: int) -> Exit:
        await self._event(pid).wait()
        return self._exits[pid]

    def exit(self, pid: int, status: int) -> None:
        self._exits[pid] = Exit(pid, status)
        self._event(pid).set()


class FakeRuntime:
    def __init__(self, reaper: FakeReaper) -> None:
        self.reaper = reaper
        self.calls: list[tuple] = []
        self.pids: dict[str, int] = {}
        self.next_pid = 100
        self.fail_create: errdefs.BerthError | None = None

    def _pid(self) -> int:
        self.next_pid += 1
        return self.next_pid

    async def create(self, id, bundle, *, stdio, console_socket=None, pid_file=None):
        self.calls.append(("create", id))
        if self.fail_create is not None:
            raise self.fail_create
        self.pids[id] = self._pid()
        return self.pids[id]

    async def start(self, id):
        self.calls.append(("start", id))

    async def kill(self, id, signal, *, all=False):
        self.calls.append(("kill", id, signal, all))
        pid = self.pids[id]
        if pid in self.reaper._exits:
            raise errdefs.FailedPrecondition("container not running", raw=True)
        if not all:
            self.reaper.exit(pid, 128 + signal)

    async def delete(self, id, *, force=False):
        self.calls.append(("delete", id))

    async def exec(self, id, process, *, stdio, console_socket=None, pid_file=None):
        self.calls.append(("exec", id, tuple(process["args"])))
        return self._pid()

    async def pause(self, id):
        self.calls.append(("pause", id))

    async def resume(self, id):
        self.calls.append(("resume", id))

    async def ps(self, id):
        return [self.pids[id], self.next_pid]

    async def update(self, id, resources):
        self.calls.append(("update", id, json.dumps(resources, sort_keys=True)))

    async def stats(self, id):
        return {"pids": {"current": 2, "limit": 0}}


class FakePublisher:
    def __init__(self) -> None:
        self.events: list = []

    def publish(self, event) -> None:
        self.events.append(event)


class Env:
    def __init__(self, service: TaskService, runtime: FakeRuntime, reaper: FakeReaper,
                 published: FakePublisher, bundle: Path, shutdowns: list[int]) -> None:
        self.service, self.runtime, self.reaper = service, runtime, reaper
        self.published, self.bundle, self.shutdowns = published, bundle, shutdowns

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.published.events]

    async def create(self, id: str = "c1") -> int:
        reply = await self.service.create(CTX, api.CreateTaskRequest(id=id,
                                                                     bundle=str(self.bundle)))
        return reply.pid


@pytest.fixture
async def env(nursery, tmp_path: Path):
    reaper = FakeReaper()
    runtime = FakeRuntime(reaper)
    published = FakePublisher()
    shutdowns: list[int] = []
    (tmp_path / "config.json").write_text(json.dumps(
        {"linux": {"namespaces": [{"type": "pid"}]}}))
    service = TaskService(
        namespace="ns", publisher=published, reaper=reaper, nursery=nursery,
        state_base=str(tmp_path / "state"), shutdown=lambda: shutdowns.append(1),
        runtime_factory=lambda choice, bundle, r: runtime, watch_oom=False,
    )
    return Env(service, runtime, reaper, published, tmp_path, shutdowns)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_lifecycle_events_in_containerds_order(env: Env):
    pid = await env.create()
    assert env.kinds() == ["TaskCreate"]
    state = await env.service.state(CTX, api.StateRequest(id="c1"))
    assert (state.status, state.pid) == (Status.CREATED, pid)
    started = await env.service.start(CTX, api.StartRequest(id="c1"))
    assert started.pid == pid

    waiter_result: list[api.WaitResponse] = []

    async def waiter() -> None:
        waiter_result.append(await env.service.wait(CTX, api.WaitRequest(id="c1")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await settle()
        assert waiter_result == []
        env.reaper.exit(pid, 7)
    assert waiter_result[0].exit_status == 7
    await settle()
    state = await env.service.state(CTX, api.StateRequest(id="c1"))
    assert (state.status, state.exit_status) == (Status.STOPPED, 7)

    deleted = await env.service.delete(CTX, api.DeleteRequest(id="c1"))
    assert (deleted.pid, deleted.exit_status) == (pid, 7)
    assert env.kinds() == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"]
    exit_event = env.published.events[2]
    assert (exit_event.container_id, exit_event.id, exit_event.pid,
            exit_event.exit_status) == ("c1", "c1", pid, 7)
    assert env.published.events[3].exited_at == exit_event.exited_at
    assert options.load(str(env.bundle)).binary == ""  # the runtime choice is recorded
    with pytest.raises(errdefs.NotFound, match="^container not created$"):
        await env.service.state(CTX, api.StateRequest(id="c1"))


async def test_exit_during_start_is_published_after_task_start(env: Env):
    pid = await env.create()
    original_start = env.runtime.start

    async def start_and_die(id):
        await original_start(id)
        env.reaper.exit(pid, 0)  # the process exits before Start returns
        await settle()

    env.runtime.start = start_and_die
    await env.service.start(CTX, api.StartRequest(id="c1"))
    await settle()
    assert env.kinds() == ["TaskCreate", "TaskStart", "TaskExit"]
    state = await env.service.state(CTX, api.StateRequest(id="c1"))
    assert state.status == Status.STOPPED  # Start did not overwrite the exit


async def test_state_machine_refusals(env: Env):
    pid = await env.create()
    with pytest.raises(errdefs.Unknown, match="^cannot pause task in created state$"):
        await env.service.pause(CTX, api.PauseRequest(id="c1"))
    with pytest.raises(errdefs.Unknown, match="^cannot resume task in created state$"):
        await env.service.resume(CTX, api.ResumeRequest(id="c1"))
    await env.service.start(CTX, api.StartRequest(id="c1"))
    with pytest.raises(errdefs.Unknown, match="^cannot start a running process$"):
        await env.service.start(CTX, api.StartRequest(id="c1"))
    with pytest.raises(errdefs.Unknown, match="^cannot delete a running process$"):
        await env.service.delete(CTX, api.DeleteRequest(id="c1"))
    with pytest.raises(errdefs.Unknown, match="^cannot resume a running process$"):
        await env.service.resume(CTX, api.ResumeRequest(id="c1"))
    await env.service.pause(CTX, api.PauseRequest(id="c1"))
    assert (await env.service.state(CTX, api.StateRequest(id="c1"))).status == Status.PAUSED
    with pytest.raises(errdefs.Unknown, match="^cannot exec in a paused state$"):
        await env.service.exec(CTX, api.ExecProcessRequest(
            id="c1", exec_id="e", spec=pb.Any(value=b'{"args": ["true"]}')))
    await env.service.resume(CTX, api.ResumeRequest(id="c1"))
    env.reaper.exit(pid, 0)
    await settle()
    with pytest.raises(errdefs.Unknown, match="^cannot update a stopped container$"):
        await env.service.update(CTX, api.UpdateTaskRequest(id="c1", resources=pb.Any(
            value=b"{}")))
    with pytest.raises(errdefs.NotFound, match="^process already finished$"):
        await env.service.kill(CTX, api.KillRequest(id="c1", signal=9))
    await env.service.delete(CTX, api.DeleteRequest(id="c1"))
    assert env.kinds() == ["TaskCreate", "TaskStart", "TaskPaused", "TaskResumed", "TaskExit",
                           "TaskDelete"]


async def test_exec_processes(env: Env):
    await env.create()
    await env.service.start(CTX, api.StartRequest(id="c1"))
    spec = pb.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                  value=json.dumps({"args": ["sh", "-c", "exit 2"]}).encode())
    await env.service.exec(CTX, api.ExecProcessRequest(id="c1", exec_id="e1", spec=spec))
    with pytest.raises(errdefs.AlreadyExists, match="^id e1: already exists$"):
        await env.service.exec(CTX, api.ExecProcessRequest(id="c1", exec_id="e1", spec=spec))
    with pytest.raises(errdefs.InvalidArgument):
        await env.service.exec(CTX, api.ExecProcessRequest(id="c1", exec_id="e2"))
    with pytest.raises(errdefs.FailedPrecondition, match="^process not created$"):
        await env.service.kill(CTX, api.KillRequest(id="c1", exec_id="e1", signal=9))
    with pytest.raises(errdefs.NotFound, match="^process does not exist nope$"):
        await env.service.state(CTX, api.StateRequest(id="c1", exec_id="nope"))

    started = await env.service.start(CTX, api.StartRequest(id="c1", exec_id="e1"))
    assert ("exec", "c1", ("sh", "-c", "exit 2")) in env.runtime.calls
    pids = await env.service.pids(CTX, api.PidsRequest(id="c1"))
    info = {p.pid: p.info for p in pids.processes}
    assert ProcessDetails().parse(info[started.pid].value).exec_id == "e1"
    init = next(p for p in pids.processes if p.pid == env.runtime.pids["c1"])
    assert bytes(init) == bytes([0x08]) + bytes([init.pid])  # no info for the init


    env.reaper.exit(started.pid, 2)
    waited = await env.service.wait(CTX, api.WaitRequest(id="c1", exec_id="e1"))
    assert waited.exit_status == 2
    deleted = await env.service.delete(CTX, api.DeleteRequest(id="c1", exec_id="e1"))
    assert (deleted.pid, deleted.exit_status) == (started.pid, 2)
    with pytest.raises(errdefs.NotFound):
        await env.service.wait(CTX, api.WaitRequest(id="c1", exec_id="e1"))
    kinds = env.kinds()
    assert kinds == ["TaskCreate", "TaskStart", "TaskExecAdded", "TaskExecStarted",
                     "TaskExit"]
    assert env.published.events[4].id == "e1"


async def _shutdown(env: Env) -> None:
    """Shutdown as the ttrpc server runs it: the stop comes once the answer is written."""
    from berth.core.ttrpc import Context

    ctx = Context(service="containerd.task.v2.Task", method="Shutdown")
    before = list(env.shutdowns)
    await env.service.shutdown(ctx, api.ShutdownRequest())
    assert env.shutdowns == before  # not before the answer has left
    for fn in ctx.replied:
        fn()


async def test_shutdown_waits_for_containers_to_go(env: Env):
    await _shutdown(env)
    assert env.shutdowns == [1]
    pid = await env.create()
    await _shutdown(env)
    assert env.shutdowns == [1]  # a container remains: no-op
    env.reaper.exit(pid, 0)
    await settle()
    await env.service.delete(CTX, api.DeleteRequest(id="c1"))
    await _shutdown(env)
    assert env.shutdowns == [1, 1]


async def test_create_failure_publishes_nothing(env: Env):
    env.runtime.fail_create = errdefs.Unknown("boom", raw=True)
    with pytest.raises(errdefs.Unknown, match="^OCI runtime create failed: boom$"):
        await env.create()
    assert env.kinds() == []
    assert env.service.containers == {}
    connect = await env.service.connect(CTX, api.ConnectRequest(id="c1"))
    assert connect.task_pid == 0


async def test_update_stats_checkpoint_and_kill_all(env: Env):
    pid = await env.create()
    await env.service.start(CTX, api.StartRequest(id="c1"))
    await env.service.update(CTX, api.UpdateTaskRequest(id="c1", resources=pb.Any(
        value=json.dumps({"pids": {"limit": 5}}).encode())))
    assert ("update", "c1", '{"pids": {"limit": 5}}') in env.runtime.calls
    stats = await env.service.stats(CTX, api.StatsRequest(id="c1"))
    assert stats.stats.type_url == "io.containerd.cgroups.v1.Metrics"
    with pytest.raises(errdefs.NotImplemented_):
        await env.service.checkpoint(CTX, api.CheckpointTaskRequest(id="c1"))
    await env.service.kill(CTX, api.KillRequest(id="c1", signal=15, all=True))
    assert ("kill", "c1", 15, True) in env.runtime.calls
    # Own pid namespace in config.json: no kill --all after init exits.
    env.reaper.exit(pid, 0)
    await settle()
    assert sum(1 for c in env.runtime.calls if c[0] == "kill") == 1


def test_kill_all_on_exit_follows_the_pid_namespace(tmp_path: Path):
    assert kills_all_on_exit(str(tmp_path))  # no config: be safe
    (tmp_path / "config.json").write_text(json.dumps(
        {"linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}}))
    assert kills_all_on_exit(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"linux": {"namespaces": [
        {"type": "pid"}]}}))
    assert not kills_all_on_exit(str(tmp_path))


@pytest.mark.parametrize(("error", "kind", "message"), [
    (errdefs.FailedPrecondition("container not running", raw=True), errdefs.NotFound,
     "process already finished"),
    (errdefs.Unknown("no such process", raw=True), errdefs.NotFound,
     "process already finished"),
    (errdefs.NotFound("container does not exist", raw=True), errdefs.NotFound,
     "no such container"),
    (errdefs.Unknown("weird", raw=True), errdefs.Unknown, "unknown error after kill: weird"),
])
def test_kill_errors_like_containerd(error, kind, message):
    got = kill_error(error)
    assert type(got) is kind and got.message == message




async def test_deleting_a_created_task_releases_waiters(env: Env):
    await env.create()
    results: list[api.WaitResponse] = []

    async def waiter() -> None:
        results.append(await env.service.wait(CTX, api.WaitRequest(id="c1")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await settle()
        deleted = await env.service.delete(CTX, api.DeleteRequest(id="c1"))
    assert results and results[0].exit_status == deleted.exit_status == 0
    assert ("delete", "c1") in env.runtime.calls
    assert env.kinds() == ["TaskCreate", "TaskDelete"]


async def test_kill_and_delete_during_an_exec_start_wait_for_its_pid(env: Env):
    """runc exec's process runs before runc returns its pid: a Kill (a streaming client
    hanging up) or Delete arriving meanwhile waits for the pid, as the Go shim's exec mutex
    makes it, instead of failing "process not created" and leaving the process running."""
    await env.create()
    await env.service.start(CTX, api.StartRequest(id="c1"))
    spec = pb.Any(value=json.dumps({"args": ["sleep", "1000"]}).encode())
    await env.service.exec(CTX, api.ExecProcessRequest(id="c1", exec_id="e1", spec=spec))
    gate = trio.Event()
    procs: list[trio.Process] = []

    async def slow_exec(id, process, *, stdio, console_socket=None, pid_file=None):
        # A real process, so that the Kill's signal lands on something of ours.
        procs.append(await trio.lowlevel.open_process(["sleep", "1000"]))
        await gate.wait()
        return procs[0].pid

    env.runtime.exec = slow_exec
    outcomes: list[object] = []

    async def call(name: str, req: object) -> None:
        try:
            outcomes.append((name, await getattr(env.service, name)(CTX, req)))
        except errdefs.BerthError as exc:
            outcomes.append((name, exc))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "start", api.StartRequest(id="c1", exec_id="e1"))
            with trio.fail_after(30):  # bounds a hang; Start's stdio setup uses threads
                while not procs:
                    await trio.sleep(0.01)
            assert procs[0].returncode is None
            nursery.start_soon(call, "kill", api.KillRequest(id="c1", exec_id="e1", signal=9))
            nursery.start_soon(call, "delete", api.DeleteRequest(id="c1", exec_id="e1"))
            await settle()
            assert outcomes == []  # both wait for Start
            gate.set()
        got = dict(outcomes)  # type: ignore[arg-type]
        assert outcomes[0][0] == "start" and got["start"].pid == procs[0].pid
        assert got["kill"] == pb.Empty()
        assert await procs[0].wait() == -9
        # Delete ran once the exec was running (before or after the kill's reap): refused,
        # as for any running exec, never marking it deleted under a live process.
        assert isinstance(got["delete"], errdefs.Unknown)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
