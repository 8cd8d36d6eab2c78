"""``containerd.task.v2.Task``: the ttrpc API containerd (or berthd) drives a shim with.

Semantics follow containerd's runc shim (runtime/v2/runc/task/service.go and
container.go): one shim may serve several containers (a group), a missing container
is NotFound "container not created", events go out in containerd's order (TaskCreate
after the runtime's create, TaskStart before any TaskExit of that process, TaskDelete
last), and Shutdown ends the shim only when no container is left.

Every background task (stdio copies, exit and OOM watchers) runs in the nursery the
serve loop gives the service, so Shutdown cancels them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from betterproto.lib.google.protobuf import Any as AnyMsg, Empty

from berth.core import errdefs, log
from berth.core.api.containerd import events as ev
from berth.core.api.containerd.task import v2 as api
from berth.core.api.containerd.v1.types import ProcessInfo, Status
from berth.core.oci.reaper import Reaper
from berth.core.oci.runtime import OCIRuntime
from berth.core.shim import metrics, options
from berth.core.shim.process import ZERO_TIME, Exec, Init, Process
from berth.core.shim.publisher import Publisher
from berth.core.shim.stdio import StdioPaths
from berth.core.ttrpc import Context, Method

TASK_SERVICE = "containerd.task.v2.Task"
PROCESS_DETAILS = "containerd.runc.v1.ProcessDetails"

_STATUS = {
    "created": Status.CREATED, "running": Status.RUNNING, "stopped": Status.STOPPED,
    "paused": Status.PAUSED, "pausing": Status.PAUSING,
}

RuntimeFactory = Callable[[options.RuntimeChoice, str, Reaper], OCIRuntime]


def default_runtime(choice: options.RuntimeChoice, bundle: str, reaper: Reaper) -> OCIRuntime:
    """The runtime a container's options ask for, from the registered runtime plugins."""
    from berth.core.shim import runtimes

    return runtimes.new_runtime(choice, bundle, reaper)


def kills_all_on_exit(bundle: str) -> bool:
    """Without a private pid namespace, init's exit does not end its children: kill them
    (containerd's ShouldKillAllOnExit)."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return True
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "pid" and not ns.get("path"):
            return False
    return True


def _exec_spec(any_msg: AnyMsg | None) -> dict:
    if any_msg is None or not any_msg.value:
        raise errdefs.InvalidArgument("exec process spec is required", raw=True)
    try:
        spec = json.loads(any_msg.value)
    except ValueError as exc:
        raise errdefs.InvalidArgument(f"exec process spec: {exc}", raw=True) from exc
    if not isinstance(spec, dict):
        raise errdefs.InvalidArgument("exec process spec is not an object", raw=True)
    return spec


class _StartedOnce:
    """A TaskStatus whose ``started`` may be called again (later calls do nothing)."""

    def __init__(self, status: trio.TaskStatus[None]) -> None:
        self._status = status
        self._done = False

    def started(self, value: None = None) -> None:
        if not self._done:
            self._done = True
            self._status.started(value)


@dataclass
class Container:
    id: str
    bundle: str
    init: Init
    choice: options.RuntimeChoice
    execs: dict[str, Exec] = field(default_factory=dict)
    reserved: set[str] = field(default_factory=set)
    oom_scope: trio.CancelScope | None = None

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise errdefs.NotFound(f"process does not exist {exec_id}", raw=True)
        return p


class TaskService:
    def __init__(
        self,
        *,
        namespace: str,
        publisher: Publisher,
        reaper: Reaper,
        nursery: trio.Nursery,
        state_base: str,
        shutdown: Callable[[], None],
        runtime_factory: RuntimeFactory = default_runtime,
        watch_oom: bool = True,
    ) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.reaper = reaper
        self.nursery = nursery
        self.state_base = state_base
        self._shutdown = shutdown
        self._runtime_factory = runtime_factory
        self._oom_enabled = watch_oom
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        # Held while a process starts and while an exit is published, so that a
        # process's TaskStart always precedes its TaskExit (the Go shim's eventSendMu).
        self._send_lock = trio.Lock()
        self._log = log.get("shim.service", namespace=namespace)

    def methods(self) -> dict[str, Method]:
        return {
            "State": Method(api.StateRequest, self.state),
            "Create": Method(api.CreateTaskRequest, self.create),
            "Start": Method(api.StartRequest, self.start),
            "Delete": Method(api.DeleteRequest, self.delete),
            "Pids": Method(api.PidsRequest, self.pids),
            "Pause": Method(api.PauseRequest, self.pause),
            "Resume": Method(api.ResumeRequest, self.resume),
            "Checkpoint": Method(api.CheckpointTaskRequest, self.checkpoint),
            "Kill": Method(api.KillRequest, self.kill),
            "Exec": Method(api.ExecProcessRequest, self.exec),
            "ResizePty": Method(api.ResizePtyRequest, self.resize_pty),
            "CloseIO": Method(api.CloseIoRequest, self.close_io),
            "Update": Method(api.UpdateTaskRequest, self.update),
            "Wait": Method(api.WaitRequest, self.wait),
            "Stats": Method(api.StatsRequest, self.stats),
            "Connect": Method(api.ConnectRequest, self.connect),
            "Shutdown": Method(api.ShutdownRequest, self.shutdown),
        }

    # -- helpers -------------------------------------------------------------------------

    def _container(self, id: str) -> Container:
        c = self.containers.get(id)
        if c is None:
            raise errdefs.NotFound("container not created", raw=True)
        return c

    def _send(self, event: Any) -> None:
        self.publisher.publish(event)

    def _background(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` in the service's nursery; a failure is logged, never fatal."""
        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                self._log.exception("background task failed", task=fn.__name__)
        self.nursery.start_soon(guarded, name=fn.__name__)

    def _watch(self, container: Container, process: Process) -> None:
        self._background(self._wait_exit, container, process)

    async def _wait_exit(self, container: Container, process: Process) -> None:
        exit = await self.reaper.wait(process.pid)
        if process is container.init and kills_all_on_exit(container.bundle):
            await container.init.kill_all()
        if process.state == "deleted":
            return
        process.set_exited(exit.status, exit.exited_at)
        async with self._send_lock:
            self._send(ev.TaskExit(container_id=container.id, id=process.id,
                                   pid=exit.pid, exit_status=exit.status,
                                   exited_at=process.exited_at or exit.exited_at))
        if process is container.init:
            if container.oom_scope is not None:
                container.oom_scope.cancel()
            await container.init.after_exit()

    async def _watch_oom(self, container: Container) -> None:
        """Watch the container's memory cgroup from before it starts (it may OOM at once)."""
        from berth.core.shim import oom

        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            status = _StartedOnce(task_status)
            with trio.CancelScope() as scope:
                container.oom_scope = scope
                try:
                    await oom.watch(container.init.pid,
                                    lambda: self._send(ev.TaskOom(container_id=container.id)),
                                    task_status=status)
                except Exception:
                    self._log.exception("oom watch failed", id=container.id)
                finally:
                    status.started()  # a failed watch must not fail Create

        await self.nursery.start(run)

    # -- Task API ------------------------------------------------------------------------

    async def create(self, ctx: Context, req: api.CreateTaskRequest) -> api.CreateTaskResponse:
        if not req.id:
            raise errdefs.InvalidArgument("container id is required", raw=True)
        if req.id in self.containers or req.id in self._creating:
            raise errdefs.AlreadyExists(f"container {req.id}")
        if req.checkpoint:
            raise errdefs.NotImplemented_("restore from checkpoint is not supported by berth",
                                          raw=True)
        self._creating.add(req.id)
        try:
            return await self._create(req)
        finally:
            self._creating.discard(req.id)

    async def _create(self, req: api.CreateTaskRequest) -> api.CreateTaskResponse:
        opts = req.options
        choice = options.choose(opts.type_url if opts else "", opts.value if opts else b"",
                                namespace=self.namespace, state_base=self.state_base)
        rootfs = ""
        if req.rootfs:
            from berth.core import mount

            rootfs = os.path.join(req.bundle, "rootfs")
            os.makedirs(rootfs, mode=0o711, exist_ok=True)
            try:
                for m in req.rootfs:
                    mount.mount(mount.Mount(m.type, m.source, list(m.options)), rootfs)
            except (OSError, errdefs.BerthError) as exc:
                mount.unmount_all(rootfs)
                raise errdefs.Unknown(f"failed to mount rootfs component: {exc}",
                                      raw=True) from exc
        try:
            runtime = self._runtime_factory(choice, req.bundle, self.reaper)
            # Saved once the runtime is known: ``delete`` cleans up with the same one.
            options.save(req.bundle, choice)
            paths = StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal)
            init = Init(req.id, req.bundle, paths, runtime, namespace=self.namespace,
                        reaper=self.reaper, rootfs=rootfs, io_uid=choice.io_uid,
                        io_gid=choice.io_gid)
            await init.create(self.nursery)
        except BaseException:
            if rootfs:
                from berth.core import mount

                mount.unmount_all(rootfs)
            raise
        container = Container(req.id, req.bundle, init, choice)
        self.containers[req.id] = container
        self._watch(container, init)
        if self._oom_enabled:
            await self._watch_oom(container)
        self._send(ev.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs),
            io=ev.TaskIo(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal),
            checkpoint=req.checkpoint, pid=init.pid,
        ))
        self._log.info("created", id=req.id, pid=init.pid, oci_runtime=choice.name)
        return api.CreateTaskResponse(pid=init.pid)

    async def start(self, ctx: Context, req: api.StartRequest) -> api.StartResponse:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        async with self._send_lock:
            if isinstance(process, Exec):
                await process.start(self.nursery)
                self._watch(container, process)
                self._send(ev.TaskExecStarted(container_id=container.id,
                                              exec_id=process.id, pid=process.pid))
            else:
                await container.init.start()
                self._send(ev.TaskStart(container_id=container.id, pid=process.pid))
        return api.StartResponse(pid=process.pid)

    async def delete(self, ctx: Context, req: api.DeleteRequest) -> api.DeleteResponse:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        await process.delete()
        exited_at = process.exited_at or ZERO_TIME
        if isinstance(process, Exec):
            container.execs.pop(process.id, None)
        else:
            self.containers.pop(container.id, None)
            if container.oom_scope is not None:
                container.oom_scope.cancel()
            self._send(ev.TaskDelete(container_id=container.id, pid=process.pid,
                                     exit_status=process.exit_status, exited_at=exited_at))
            self._log.info("deleted", id=container.id)
        return api.DeleteResponse(pid=process.pid, exit_status=process.exit_status,
                                  exited_at=exited_at)

    async def exec(self, ctx: Context, req: api.ExecProcessRequest) -> Empty:
        container = self._container(req.id)
        if not req.exec_id:
            raise errdefs.InvalidArgument("exec id is required", raw=True)
        if req.exec_id in container.execs or req.exec_id in container.reserved:
            raise errdefs.AlreadyExists(f"id {req.exec_id}")
        container.init.check_exec()
        spec = _exec_spec(req.spec)
        paths = StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal)
        container.execs[req.exec_id] = Exec(req.exec_id, container.init, spec, paths)
        self._send(ev.TaskExecAdded(container_id=container.id, exec_id=req.exec_id))
        return Empty()

    async def resize_pty(self, ctx: Context, req: api.ResizePtyRequest) -> Empty:
        container = self._container(req.id)
        container.process(req.exec_id).resize(req.width, req.height)
        return Empty()

    async def state(self, ctx: Context, req: api.StateRequest) -> api.StateResponse:
        container = self._container(req.id)
        p = container.process(req.exec_id)
        return api.StateResponse(
            id=p.id, bundle=container.bundle, pid=p.pid,
            # Status(member): betterproto's enum members look like plain ints to mypy
            # (betterproto#616); the constructor gives back the same member, typed.
            status=Status(_STATUS.get(p.status(), Status.UNKNOWN)),
            stdin=p.paths.stdin, stdout=p.paths.stdout, stderr=p.paths.stderr,
            terminal=p.paths.terminal, exit_status=p.exit_status,
            exited_at=p.exited_at or ZERO_TIME,
            exec_id=req.exec_id,
        )

    async def pause(self, ctx: Context, req: api.PauseRequest) -> Empty:
        container = self._container(req.id)
        await container.init.pause()
        self._send(ev.TaskPaused(container_id=container.id))
        return Empty()

    async def resume(self, ctx: Context, req: api.ResumeRequest) -> Empty:
        container = self._container(req.id)
        await container.init.resume()
        self._send(ev.TaskResumed(container_id=container.id))
        return Empty()

    async def kill(self, ctx: Context, req: api.KillRequest) -> Empty:
        container = self._container(req.id)
        await container.process(req.exec_id).kill(req.signal, req.all)
        return Empty()

    async def pids(self, ctx: Context, req: api.PidsRequest) -> api.PidsResponse:
        container = self._container(req.id)
        try:
            pids = await container.init.runtime.ps(container.id)
        except errdefs.BerthError as exc:
            raise type(exc)(f"failed to list pids: {exc.message}", raw=True) from exc
        by_pid = {p.pid: p for p in container.execs.values() if p.pid}
        processes = []
        for pid in pids:
            info = ProcessInfo(pid=pid)
            exec_process = by_pid.get(pid)
            if exec_process is not None:
                from berth.core.api.containerd.runc.v1 import ProcessDetails

                info.info = AnyMsg(type_url=PROCESS_DETAILS,
                                   value=bytes(ProcessDetails(exec_id=exec_process.id)))
            processes.append(info)
        return api.PidsResponse(processes=processes)

    async def close_io(self, ctx: Context, req: api.CloseIoRequest) -> Empty:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        if req.stdin:
            process.close_stdin()
        return Empty()

    async def checkpoint(self, ctx: Context, req: api.CheckpointTaskRequest) -> Empty:
        self._container(req.id)
        raise errdefs.NotImplemented_("checkpoint is not supported by berth's shim", raw=True)

    async def update(self, ctx: Context, req: api.UpdateTaskRequest) -> Empty:
        container = self._container(req.id)
        if req.resources is None or not req.resources.value:
            raise errdefs.InvalidArgument("resources are required", raw=True)
        try:
            resources = json.loads(req.resources.value)
        except ValueError as exc:
            raise errdefs.InvalidArgument(f"resources: {exc}", raw=True) from exc
        await container.init.update(resources)
        return Empty()

    async def wait(self, ctx: Context, req: api.WaitRequest) -> api.WaitResponse:
        container = self._container(req.id)
        p = container.process(req.exec_id)
        await p.wait()
        return api.WaitResponse(exit_status=p.exit_status,
                                exited_at=p.exited_at or ZERO_TIME)

    async def stats(self, ctx: Context, req: api.StatsRequest) -> api.StatsResponse:
        container = self._container(req.id)
        data = await container.init.runtime.stats(container.id)
        return api.StatsResponse(stats=AnyMsg(type_url=metrics.METRICS_TYPE_URL,
                                              value=metrics.encode(data)))

    async def connect(self, ctx: Context, req: api.ConnectRequest) -> api.ConnectResponse:
        container = self.containers.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(),
                                   task_pid=container.init.pid if container else 0)

    async def shutdown(self, ctx: Context, req: api.ShutdownRequest) -> Empty:
        if not self.containers and not self._creating:
            # Stop once this answer has been written: the client is waiting for it.
            ctx.on_replied(self._shutdown)
        return Empty()


