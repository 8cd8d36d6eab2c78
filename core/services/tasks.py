"""containerd.services.tasks.v1.Tasks over the runtime v2 task manager.

A thin translation, as containerd's services/tasks/local.go: find the container, find
its task, call the shim. Status codes and messages are containerd's, since ctr prints
them (``task t1 not found``, ``container "t1" in namespace "default": not found``).
Task events come from the shims (see core.runtime.manager), never from here.

Right after a restart, the tasks a previous berthd left are still being recovered in
the background (see ``TaskManager.settle``): reads answer at once (UNKNOWN for a task
whose shim is not reconnected), and a call that acts on such a task first finishes its
recovery: Delete, Kill and Wait on a task whose shim died get its cleanup's outcome.

berth's addition: a container whose labels name networks (``io.berth.network``) is
attached before its task is created, runs in the namespace berth pinned for it, and is
detached when its task is deleted (core.networks.manager).
"""

from __future__ import annotations

from datetime import UTC, datetime

import trio
from betterproto.lib.google.protobuf import Any as AnyMsg, Empty

from berth.core import errdefs, filters, identifiers, log
from berth.core.api.containerd.runc.v1 import Options as RuncOptions
from berth.core.api.containerd.services.tasks.v1 import (
    CheckpointTaskRequest,
    CheckpointTaskResponse,
    CloseIoRequest,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteProcessRequest,
    DeleteResponse,
    DeleteTaskRequest,
    ExecProcessRequest,
    GetRequest,
    GetResponse,
    KillRequest,
    ListPidsRequest,
    ListPidsResponse,
    ListTasksRequest,
    ListTasksResponse,
    MetricsRequest,
    MetricsResponse,
    PauseTaskRequest,
    ResizePtyRequest,
    ResumeTaskRequest,
    StartRequest,
    StartResponse,
    TasksBase,
    UpdateTaskRequest,
    WaitRequest,
    WaitResponse,
)
from berth.core.api.containerd.types import Metric
from berth.core.api.containerd.v1.types import Process, Status
from berth.core.grpc.context import CallContext
from berth.core.identifiers import namespace_required
from berth.core.metadata.containers import Container, ContainerStore, present
from berth.core.networks.manager import NetworkManager, apply_to_spec, spec_hostname
from berth.core.networks.plugin import ID as NETWORKS_ID
from berth.core.oci.reaper import Exit
from berth.core.plugin import InitContext, Registration, hookimpl
from berth.core.plugin.registration import EVENT, GRPC, INTERNAL, METADATA, RUNTIME_V2, SERVICE
from berth.core.runtime.manager import CreateOpts, Recovery, TaskManager, wrap
from berth.core.runtime.shim import ShimTask

# containerd's io.containerd.timeout.task.state.
STATE_TIMEOUT = 2.0
RUNC_OPTIONS = "containerd.runc.v1.Options"


def _opt(msg: AnyMsg | None) -> AnyMsg | None:
    return msg if present(msg) else None


def restore_path(runtime: str, options: AnyMsg | None) -> str:
    """The CRIU image a runc task is to be restored from, if its options name one."""
    if options is None or not runtime.startswith("io.containerd.runc"):
        return ""
    if options.type_url.rsplit("/", 1)[-1] != RUNC_OPTIONS:
        raise errdefs.Unknown(f"invalid task create option for {runtime}", raw=True)
    return RuncOptions().parse(options.value).criu_image_path


class TasksLocal:
    """The tasks service (``io.containerd.service.v1.tasks-service``), as containerd's
    services/tasks/local.go: the API's requests and answers, for a namespace that is
    checked where containerd checks it (``None``: the call named none)."""

    def __init__(self, runtime: TaskManager, containers: ContainerStore,
                 networks: NetworkManager | None = None) -> None:
        self.runtime = runtime
        self.containers = containers
        self.networks = networks
        self._log = log.get("tasks")

    # -- lookups ---------------------------------------------------------------------

    def _container(self, ns: str | None, container_id: str) -> tuple[str, Container]:
        ns = namespace_required(ns)
        return ns, self.containers.get(ns, container_id)

    def _task(self, ns: str | None, container_id: str) -> ShimTask:
        ns, container = self._container(ns, container_id)
        task = self.runtime.get(ns, container.id)
        if task is None:
            raise errdefs.NotFound(f"task {container.id} not found", raw=True)
        return task

    async def _settled(self, ns: str | None, container_id: str
                       ) -> tuple[ShimTask | None, Exit | None]:
        """The task once its recovery after a restart (if any) is over, and the exit
        that recovery's cleanup reported when the task's shim was found dead."""
        ns, container = self._container(ns, container_id)
        exit_ = await self.runtime.settle(ns, container.id)
        task = self.runtime.get(ns, container.id)
        if task is None and exit_ is None:
            raise errdefs.NotFound(f"task {container.id} not found", raw=True)
        return task, exit_

    async def _live(self, ns: str | None, container_id: str) -> ShimTask:
        task, _ = await self._settled(ns, container_id)
        if task is None:
            raise errdefs.NotFound(f"task {container_id} not found", raw=True)
        return task

    async def _process(self, task: ShimTask, exec_id: str) -> None:
        """containerd's Task.Process: an exec'd process exists if the shim has its state."""
        if exec_id:
            await task.state(exec_id)

    # -- the API ---------------------------------------------------------------------

    async def create(self, ns: str | None, req: CreateTaskRequest) -> CreateTaskResponse:
        container_id = req.container_id  # once: a betterproto field read costs microseconds
        ns, container = self._container(ns, container_id)
        options = _opt(req.options)
        if restore_path(container.runtime_name, options) or present(req.checkpoint):
            raise errdefs.NotImplemented_("restoring a task from a checkpoint")
        # A task left by a previous berthd is reconnected or retired first.
        await self.runtime.settle(ns, container_id)
        if self.runtime.get(ns, container_id) is not None:
            raise errdefs.AlreadyExists(f"task {container_id}")
        assert container.spec is not None  # the store refuses containers without one
        key = (ns, container_id)
        if self.networks is None:
            return await self._create(ns, req, container, container.spec, options)
        if key in self.networks.creating:
            raise errdefs.AlreadyExists(f"task {container_id}")
        self.networks.creating.add(key)
        try:
            spec = container.spec
            prepared = await self.networks.prepare_container(
                ns, container.id, container.labels, lambda: spec_hostname(spec))
            if prepared is None:
                return await self._create(ns, req, container, container.spec, options)
            try:
                return await self._create(ns, req, container,
                                          apply_to_spec(container.spec, prepared), options)
            except BaseException:
                with trio.CancelScope(shield=True):
                    try:
                        await self.networks.release_container(ns, container.id)
                    except errdefs.BerthError as e:
                        self._log.error("detach after failed task create", namespace=ns,
                                        id=container.id, error=str(e))
                raise
        finally:
            self.networks.creating.discard(key)

    async def _create(self, ns: str, req: CreateTaskRequest, container: Container,
                      spec: AnyMsg, options: AnyMsg | None
                      ) -> CreateTaskResponse:
        opts = CreateOpts(
            spec=spec,
            runtime=req.runtime_path or container.runtime_name,
            # The request's own mounts: the runtime reads their type, source and options
            # into the shim's request and keeps none of them.
            rootfs=list(req.rootfs),
            stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal,
            runtime_options=container.runtime_options, task_options=options,
        )
        task = await self.runtime.create(ns, req.container_id, opts)
        # containerd asks the shim again (Connect) for the pid Create just answered:
        # one round trip less per container here.
        pid = task.created_pid
        if not pid:
            try:
                pid = await task.pid()
            except errdefs.BerthError as e:
                raise wrap("failed to get task pid", e) from None
        return CreateTaskResponse(container_id=req.container_id, pid=pid)

    async def start(self, ns: str | None, req: StartRequest) -> StartResponse:
        exec_id = req.exec_id  # once: each read of a betterproto field costs microseconds
        task = await self._live(ns, req.container_id)
        await self._process(task, exec_id)
        # The shim's Start answer carries the pid containerd reads back with State.
        if exec_id:
            with self.runtime.primer.starting():  # the exec'd process joins the cgroups
                pid = await task.start(exec_id)
        else:
            pid = await task.start(exec_id)
        return StartResponse(pid=pid)

    async def delete(self, ns: str | None, req: DeleteTaskRequest) -> DeleteResponse:
        container_id = req.container_id
        ns, container = self._container(ns, container_id)
        task, exit_ = await self._settled(ns, container_id)
        # exit_ alone: its shim was found dead at start-up, its cleanup deleted it.
        if task is not None or exit_ is None:
            exit_ = await self.runtime.delete(ns, container_id)
        if self.networks is not None:
            try:
                await self.networks.release_container(ns, container.id)
            except errdefs.BerthError as e:
                # The task is gone; its records stay for the next event or the collector.
                self._log.error("network teardown after task delete", namespace=ns,
                                id=container.id, error=str(e))
        return DeleteResponse(exit_status=exit_.status, exited_at=exit_.exited_at,
                              pid=exit_.pid)

    async def delete_process(self, ns: str | None, req: DeleteProcessRequest
                             ) -> DeleteResponse:
        task = await self._live(ns, req.container_id)
        await self._process(task, req.exec_id)
        exit_ = await task.delete(req.exec_id)
        return DeleteResponse(id=req.exec_id, exit_status=exit_.status,
                              exited_at=exit_.exited_at, pid=exit_.pid)

    async def _process_state(self, task: ShimTask, exec_id: str = "") -> Process:
        """containerd's getProcessState: a failing shim shows as UNKNOWN, not an error."""
        pid_id = exec_id or task.id
        try:
            state = await task.state(exec_id, timeout=STATE_TIMEOUT)
        except errdefs.NotFound:
            raise
        except errdefs.BerthError as e:
            self._log.error("get state", namespace=task.namespace, id=pid_id, error=str(e))
            # Status(member): betterproto's enum members look like plain ints to mypy
            # (betterproto#616); the constructor gives back the same member, typed.
            return Process(id=pid_id, status=Status(Status.UNKNOWN))
        return Process(
            id=pid_id, pid=state.pid, status=state.status, stdin=state.stdin,
            stdout=state.stdout, stderr=state.stderr, terminal=state.terminal,
            exit_status=state.exit_status, exited_at=state.exited_at,
        )

    def _recovering(self, p: Recovery, exec_id: str = "") -> Process:
        """A task whose shim is not reconnected (yet): what containerd reports for a
        task whose shim does not answer."""
        return Process(id=exec_id or p.id, pid=0 if exec_id else p.pid,
                       status=Status(Status.UNKNOWN))

    async def get(self, ns: str | None, req: GetRequest) -> GetResponse:
        container_id, exec_id = req.container_id, req.exec_id  # each field read once
        ns, container = self._container(ns, container_id)
        p = self.runtime.recovering(ns, container.id)
        if p is not None:
            # A live shim answers its probe in a moment; a dead one's cleanup is
            # not waited for.
            with trio.move_on_after(STATE_TIMEOUT):
                await p.probed.wait()
            if self.runtime.get(ns, container.id) is None and not p.settled.is_set():
                return GetResponse(process=self._recovering(p, exec_id))
        task = self._task(ns, container_id)
        await self._process(task, exec_id)
        return GetResponse(process=await self._process_state(task, exec_id))

    async def list(self, ns: str | None, req: ListTasksRequest) -> ListTasksResponse:
        ns = namespace_required(ns)
        with trio.move_on_after(STATE_TIMEOUT):
            for p in self.runtime.recovering_in(ns):
                await p.probed.wait()
        out = []
        for task in self.runtime.tasks(ns):
            try:
                out.append(await self._process_state(task))
            except errdefs.NotFound:
                continue  # deleted meanwhile
        listed = {t.id for t in out}
        out += [self._recovering(p) for p in self.runtime.recovering_in(ns)
                if p.id not in listed and self.runtime.get(ns, p.id) is None]
        out.sort(key=lambda t: t.id)
        return ListTasksResponse(tasks=out)

    async def pause(self, ns: str | None, req: PauseTaskRequest) -> Empty:
        await (await self._live(ns, req.container_id)).pause()
        return Empty()

    async def resume(self, ns: str | None, req: ResumeTaskRequest) -> Empty:
        await (await self._live(ns, req.container_id)).resume()
        return Empty()

    async def kill(self, ns: str | None, req: KillRequest) -> Empty:
        task, _ = await self._settled(ns, req.container_id)
        if task is None:
            # Its shim was found dead at start-up: the cleanup stopped everything.
            return Empty()
        await self._process(task, req.exec_id)
        await task.kill(req.signal, req.all, req.exec_id)
        return Empty()

    async def list_pids(self, ns: str | None, req: ListPidsRequest) -> ListPidsResponse:
        task = await self._live(ns, req.container_id)
        return ListPidsResponse(processes=await task.pids())

    async def exec(self, ns: str | None, req: ExecProcessRequest) -> Empty:
        if req.exec_id == "":
            raise errdefs.InvalidArgument("exec id cannot be empty", raw=True)
        task = await self._live(ns, req.container_id)
        try:
            identifiers.validate(req.exec_id)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(f"invalid exec id {req.exec_id}: {e}", raw=True) \
                from None
        await task.exec(req.exec_id, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                        terminal=req.terminal, spec=_opt(req.spec))
        return Empty()

    async def resize_pty(self, ns: str | None, req: ResizePtyRequest) -> Empty:
        task = await self._live(ns, req.container_id)
        await self._process(task, req.exec_id)
        await task.resize_pty(req.width, req.height, req.exec_id)
        return Empty()

    async def close_io(self, ns: str | None, req: CloseIoRequest) -> Empty:
        task = await self._live(ns, req.container_id)
        await self._process(task, req.exec_id)
        if req.stdin:
            await task.close_io(req.exec_id)
        return Empty()

    async def checkpoint(self, ns: str | None, req: CheckpointTaskRequest
                         ) -> CheckpointTaskResponse:
        await self._live(ns, req.container_id)
        raise errdefs.NotImplemented_("task checkpoint")

    async def update(self, ns: str | None, req: UpdateTaskRequest) -> Empty:
        task = await self._live(ns, req.container_id)
        await task.update(_opt(req.resources), dict(req.annotations))
        return Empty()

    async def metrics(self, ns: str | None, req: MetricsRequest) -> MetricsResponse:
        try:
            flt = filters.parse_all(list(req.filters))
        except errdefs.InvalidArgument as e:
            # containerd returns the parse error unconverted.
            raise errdefs.Unknown(e.message, raw=True) from None
        ns = namespace_required(ns)
        out = []
        for task in self.runtime.tasks(ns):
            if not flt.match(_task_adaptor(task)):
                continue
            collected = datetime.now(UTC)
            try:
                stats = await task.stats()
            except errdefs.NotFound:
                continue
            except errdefs.BerthError as e:
                self._log.error("collecting metrics", namespace=ns, id=task.id, error=str(e))
                continue
            metric = Metric(timestamp=collected, id=task.id)
            if stats is not None:
                metric.data = stats
            out.append(metric)
        return MetricsResponse(metrics=out)

    async def wait(self, ns: str | None, req: WaitRequest) -> WaitResponse:
        exec_id = req.exec_id  # once: each read of a betterproto field costs microseconds
        task, exit_ = await self._settled(ns, req.container_id)
        if task is None:
            assert exit_ is not None
            if exec_id:
                raise errdefs.NotFound(f"process {exec_id}: not found", raw=True)
            return WaitResponse(exit_status=exit_.status, exited_at=exit_.exited_at)
        await self._process(task, exec_id)
        exit_ = await task.wait(exec_id)
        return WaitResponse(exit_status=exit_.status, exited_at=exit_.exited_at)


class TasksService:
    """``containerd.services.tasks.v1.Tasks``: translation only, over :class:`TasksLocal`."""

    base = TasksBase

    def __init__(self, local: TasksLocal) -> None:
        self.local = local

    async def create(self, ctx: CallContext, req: CreateTaskRequest) -> CreateTaskResponse:
        return await self.local.create(ctx.namespace, req)

    async def start(self, ctx: CallContext, req: StartRequest) -> StartResponse:
        return await self.local.start(ctx.namespace, req)

    async def delete(self, ctx: CallContext, req: DeleteTaskRequest) -> DeleteResponse:
        return await self.local.delete(ctx.namespace, req)

    async def delete_process(self, ctx: CallContext, req: DeleteProcessRequest) -> DeleteResponse:
        return await self.local.delete_process(ctx.namespace, req)

    async def get(self, ctx: CallContext, req: GetRequest) -> GetResponse:
        return await self.local.get(ctx.namespace, req)

    async def list(self, ctx: CallContext, req: ListTasksRequest) -> ListTasksResponse:
        return await self.local.list(ctx.namespace, req)

    async def pause(self, ctx: CallContext, req: PauseTaskRequest) -> Empty:
        return await self.local.pause(ctx.namespace, req)

    async def resume(self, ctx: CallContext, req: ResumeTaskRequest) -> Empty:
        return await self.local.resume(ctx.namespace, req)

    async def kill(self, ctx: CallContext, req: KillRequest) -> Empty:
        return await self.local.kill(ctx.namespace, req)

    async def list_pids(self, ctx: CallContext, req: ListPidsRequest) -> ListPidsResponse:
        return await self.local.list_pids(ctx.namespace, req)

    async def exec(self, ctx: CallContext, req: ExecProcessRequest) -> Empty:
        return await self.local.exec(ctx.namespace, req)

    async def resize_pty(self, ctx: CallContext, req: ResizePtyRequest) -> Empty:
        return await self.local.resize_pty(ctx.namespace, req)

    async def close_io(self, ctx: CallContext, req: CloseIoRequest) -> Empty:
        return await self.local.close_io(ctx.namespace, req)

    async def checkpoint(self, ctx: CallContext, req: CheckpointTaskRequest
                         ) -> CheckpointTaskResponse:
        return await self.local.checkpoint(ctx.namespace, req)

    async def update(self, ctx: CallContext, req: UpdateTaskRequest) -> Empty:
        return await self.local.update(ctx.namespace, req)

    async def metrics(self, ctx: CallContext, req: MetricsRequest) -> MetricsResponse:
        return await self.local.metrics(ctx.namespace, req)

    async def wait(self, ctx: CallContext, req: WaitRequest) -> WaitResponse:
        return await self.local.wait(ctx.namespace, req)


def _task_adaptor(task: ShimTask) -> filters.Adaptor:
    def field(path: tuple[str, ...]) -> tuple[str, bool]:
        if path and path[0] == "id":
            return task.id, True
        if path and path[0] == "namespace":
            return task.namespace, True
        return "", False
    return field


SERVICE_ID = "tasks-service"


async def _init_service(ctx: InitContext) -> TasksLocal:
    try:
        networks = ctx.plugins.get(INTERNAL, NETWORKS_ID)
    except errdefs.NotFound:
        networks = None  # containers then get no networks from their labels
    return TasksLocal(ctx.plugins.get(RUNTIME_V2, "task"),
                      ctx.plugins.get(METADATA).containers, networks)


async def _init(ctx: InitContext) -> TasksService:
    # The service is registered just before this plugin (below), so initialised first.
    return TasksService(ctx.plugins.get(SERVICE, SERVICE_ID))


@hookimpl
def berth_plugins() -> list[Registration]:
    return [
        # INTERNAL: the network manager, which it gives containers their networks with.
        Registration(type=SERVICE, id=SERVICE_ID, init=_init_service,
                     requires=(RUNTIME_V2, METADATA, EVENT, INTERNAL)),
        Registration(type=GRPC, id="tasks", init=_init, requires=(RUNTIME_V2, METADATA, EVENT)),
    ]
