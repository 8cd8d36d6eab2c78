"""CRI containers: create (spec, snapshot, record), start (task, FIFOs into the CRI log),
the exit monitor, stop, remove, list, status, ExecSync, UpdateContainerResources,
ReopenContainerLog and stats; mixed into :class:`berth.plugins.cri.pods.PodService`,
whose state (stores, task manager, records, locks) these methods use."""

from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import betterproto
import trio
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, nspin
from berth.core.api.containerd.types import Mount as ApiMount
from berth.core.api.runtime import v1 as cri
from berth.core.grpc.context import CallContext
from berth.core.metadata.containers import Container
from berth.core.oci import default_spec as oci
from berth.core.runtime.manager import CreateOpts
from berth.plugins.cri import logs, pidns, records as rec, spec as cri_spec, stats as cri_stats
from berth.plugins.cri.cdi import for_container as with_cdi_devices
from berth.plugins.cri.images import NAMESPACE, image_user
from berth.plugins.cri.streaming.attach import AttachHub
from berth.plugins.cri.userns import for_container as userns_for, pod_userns, remap_rootfs

if TYPE_CHECKING:
    from berth.core.metadata.containers import ContainerStore
    from berth.core.runtime.manager import TaskManager
    from berth.core.transfer.pull import Stores
    from berth.plugins.cri.config import CRIConfig
    from berth.plugins.cri.images import ImageService

# The exit code containerd records for a container whose start failed.
START_ERROR_EXIT = 128


def _pin_pid_namespace(pid: int, container_id: str, pin: Path) -> None:
    """Pin the PID namespace of process ``pid`` at ``pin``, making sure it is the
    container's: a pidfd holds the process while its cgroup (which names the container)
    is read, so a pid reused since the container's exit is caught."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise errdefs.FailedPrecondition(
            f"target container {container_id} is not running", raw=True) from None
    try:
        nspin.placeholder(pin)
        nspin.pin_path(f"/proc/{pid}/ns/pid", "pid", pin)
        with open(f"/proc/{pid}/cgroup") as f:
            ours = container_id in f.read()
        alive = not select.select([fd], [], [], 0)[0]
        if not (ours and alive):
            nspin.unpin(pin)
            raise errdefs.FailedPrecondition(
                f"target container {container_id} is not running", raw=True)
    except OSError as e:
        nspin.unpin(pin)
        raise errdefs.FailedPrecondition(
            f"target container {container_id}: {e.strerror}", raw=True) from None
    finally:
        os.close(fd)


class ContainerOps:
    """The container half of the RuntimeService (see the module docstring)."""

    if TYPE_CHECKING:  # what PodService gives these methods
        config: CRIConfig
        stores: Stores
        images: ImageService
        store: ContainerStore
        tasks: TaskManager
        state: Path
        nursery: trio.Nursery
        oom: cri_spec.OOMPolicy
        sandboxes: dict[str, rec.Sandbox]
        containers: dict[str, rec.CRIContainer]
        _names: dict[str, str]
        _locks: dict[str, trio.Lock]

        def leased(self) -> AbstractAsyncContextManager[str]: ...
        def _sandbox(self, sid: str) -> rec.Sandbox: ...
        def _container(self, cid: str) -> rec.CRIContainer: ...
        def _container_name(self, ctr: rec.CRIContainer) -> str: ...
        def _save_container(self, ctr: rec.CRIContainer) -> None: ...
        def _copy(self, ctr: rec.CRIContainer, src: trio.lowlevel.FdStream,
                  stream: str) -> None: ...
        async def _drop_record(self, id: str, snapshotter: str, snapshot_key: str
                               ) -> None: ...
        def _event(self, cid: str, sb: rec.Sandbox | None, kind: int) -> None: ...

    # --- containers -------------------------------------------------------------------

    @rec.serialized("pod_sandbox_id")
    async def create_container(self, ctx: CallContext, req: cri.CreateContainerRequest
                               ) -> cri.CreateContainerResponse:
        sb = self._sandbox(req.pod_sandbox_id)
        if sb.state != cri.PodSandboxState.SANDBOX_READY:
            raise errdefs.FailedPrecondition(f"sandbox {sb.id} is not ready", raw=True)
        config = req.config
        if config is None or config.metadata is None or not config.metadata.name:
            raise errdefs.InvalidArgument("container config must have a metadata name",
                                          raw=True)
        if config.log_path:
            cri_spec.check_relative(config.log_path, "log path")
        spec_ref = config.image.image if config.image else ""
        if not spec_ref:
            raise errdefs.InvalidArgument("container config must name an image", raw=True)
        image = await self.images.find(spec_ref)
        if image is None:
            raise errdefs.NotFound(f"image {spec_ref!r} not found: pull it first", raw=True)
        ctr = rec.CRIContainer(rec.new_id(), sb.id, config, image.id,
                           image.repo_digests[0] if image.repo_digests else image.id,
                           "", "")
        ctr.stop_signal = oci.image_stop_signal(image.resolved.config.raw)
        if config.log_path and sb.config.log_directory:
            ctr.log_path = str(Path(sb.config.log_directory) / config.log_path)
        name = self._container_name(ctr)
        if name in self._names:
            raise errdefs.AlreadyExists(f"failed to reserve container name {name!r}: name is "
                                        f"reserved for {self._names[name]!r}", raw=True)
        self._names[name] = ctr.id
        sn = self.stores.snapshotters.get(self.config.snapshotter)
        folder = self.state / "containers" / ctr.id
        ctr.folder = str(folder)
        ctr.status.created_at = rec.now()
        prepared = False
        try:
            target_pidns = await self._pin_target(sb, config, folder)
            if sn is None:
                raise errdefs.FailedPrecondition(
                    f"snapshotter {self.config.snapshotter!r} is not loaded", raw=True)
            maps = userns_for(sb.config, config.linux.security_context
                              if config.linux is not None else None,
                              self.config.runtime(sb.handler))
            if maps is not None:
                await trio.to_thread.run_sync(pod_userns, Path(sb.folder), maps)
            async with self.leased() as lease:
                mounts = await sn.prepare(NAMESPACE, ctr.id, image.chain_id, lease=lease)
                prepared = True
                if maps is not None:
                    await trio.to_thread.run_sync(remap_rootfs, mounts, maps)
                spec = await trio.to_thread.run_sync(functools.partial(
                    cri_spec.container_spec, sb.view, ctr.id, config,
                    image.resolved.config.raw, image_user(image.resolved), mounts, self.oom,
                    target_pidns, unset_seccomp_profile=self.config.unset_seccomp_profile))
                spec = await trio.to_thread.run_sync(with_cdi_devices, spec, config,
                                                     self.config)
                runtime = self.config.runtime(sb.handler)
                self.store.create(NAMESPACE, Container(
                    id=ctr.id, runtime_name=runtime.runtime_type,
                    runtime_options=rec.runtime_options(runtime.options),
                    spec=oci.to_any(spec), image=image.id,
                    labels={**config.labels, rec.KIND_LABEL: "container"},
                    snapshotter=self.config.snapshotter, snapshot_key=ctr.id,
                    extensions={rec.CONTAINER_EXT: rec.ext(ctr.to_doc())}))
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except BaseException:
            with trio.CancelScope(shield=True):
                if prepared and sn is not None:
                    try:
                        await sn.remove(NAMESPACE, ctr.id)
                    except errdefs.BerthError as e:
                        rec.logger.warning("snapshot left", id=ctr.id, error=str(e))
                await trio.to_thread.run_sync(nspin.unpin, pidns.pin_path(folder))
                shutil.rmtree(folder, ignore_errors=True)
            del self._names[name]
            raise
        self.containers[ctr.id] = ctr
        rec.logger.info("container created", id=ctr.id, sandbox=sb.id, name=config.metadata.name)
        self._event(ctr.id, sb, cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        return cri.CreateContainerResponse(container_id=ctr.id)

    async def _pin_target(self, sb: rec.Sandbox, config: cri.ContainerConfig,
                          folder: Path) -> str:
        """For NamespaceMode.TARGET (``kubectl debug --target``): pin the running target
        container's PID namespace in the new container's folder, so that the path the
        spec names stays that namespace even if the target's pid is reused (a namespace
        whose PID 1 died can no longer be entered: the start fails, safely)."""
        lsc = config.linux.security_context if config.linux else None
        opts = lsc.namespace_options if lsc else None
        if opts is None or opts.pid != cri.NamespaceMode.TARGET:
            return ""
        if not opts.target_id:
            raise errdefs.InvalidArgument(
                "PID namespace mode TARGET needs a target container id", raw=True)
        target = self._container(opts.target_id)
        if target.sandbox_id != sb.id:
            raise errdefs.InvalidArgument(
                f"target container {target.id} is not in pod {sb.id}", raw=True)
        if target.state != cri.ContainerState.CONTAINER_RUNNING or not target.status.pid:
            raise errdefs.FailedPrecondition(
                f"target container {target.id} is not running", raw=True)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        await trio.to_thread.run_sync(_pin_pid_namespace, target.status.pid, target.id,
                                      pidns.pin_path(folder))
        return str(pidns.pin_path(folder))

    @rec.serialized("container_id")
    async def start_container(self, ctx: CallContext, req: cri.StartContainerRequest
                              ) -> cri.StartContainerResponse:
        ctr = self._container(req.container_id)
        if ctr.state != cri.ContainerState.CONTAINER_CREATED:
            raise errdefs.FailedPrecondition(
                f"container {ctr.id} is in {cri.ContainerState(ctr.state).name} state",
                raw=True)
        sb = self._sandbox(ctr.sandbox_id)
        if sb.state != cri.PodSandboxState.SANDBOX_READY:
            raise errdefs.FailedPrecondition(f"sandbox {sb.id} is not ready", raw=True)
        record = self.store.get(NAMESPACE, ctr.id)
        assert record.spec is not None  # the store refuses containers without one
        sn = self.stores.snapshotters[record.snapshotter]
        rootfs = [ApiMount(type=m.type, source=m.source, options=list(m.options))
                  for m in await sn.mounts(NAMESPACE, ctr.id)]
        folder = Path(ctr.folder)
        out_path, err_path = folder / "stdout", folder / "stderr"
        for p in (out_path, err_path):
            logs.make_fifo(p)
        log_file = logs.LogFile(Path(ctr.log_path) if ctr.log_path else None)
        hub = AttachHub(bool(ctr.config.tty))
        stdin_path = folder / "stdin" if ctr.config.stdin else None
        readers, keepers = [], []
        try:
            if stdin_path is not None:
                logs.make_fifo(stdin_path)
                hub.open_stdin(stdin_path)
            for p in (out_path, err_path):
                r, k = logs.open_fifo(p)
                readers.append(r)
                keepers.append(k)
            task = await self.tasks.create(NAMESPACE, ctr.id, CreateOpts(
                spec=record.spec, runtime=record.runtime_name, rootfs=rootfs,
                stdin=str(stdin_path or ""),
                stdout=str(out_path), stderr=str(err_path) if not ctr.config.tty else "",
                terminal=bool(ctr.config.tty), runtime_options=record.runtime_options))
            try:
                ctr.status.pid = await task.start()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._delete_task(ctr)
                raise
        except BaseException as exc:
            for r in readers:
                await r.aclose()
            log_file.close()
            with trio.CancelScope(shield=True):
                await hub.close()
            if isinstance(exc, Exception):  # not a berthd going down: that is retried
                self._start_failed(ctr, sb, exc)
            raise
        finally:
            for k in keepers:
                os.close(k)
        ctr.log_file = log_file
        ctr.attach_hub = hub
        ctr.status.started_at = rec.now()
        self._save_container(ctr)
        for r, stream in zip(readers, (logs.STDOUT, logs.STDERR), strict=True):
            self._copy(ctr, hub.tap(r, stream), stream)
        self.nursery.start_soon(self._monitor, ctr)
        rec.logger.info("container started", id=ctr.id, pid=ctr.status.pid)
        self._event(ctr.id, sb, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        return cri.StartContainerResponse()

    def _start_failed(self, ctr: rec.CRIContainer, sb: rec.Sandbox, exc: Exception) -> None:
        """A container whose start failed has exited, as containerd records it (exit
        code 128, reason StartError): the kubelet then restarts it by its policy instead
        of finding it created forever."""
        ctr.status.finished_at = rec.now()
        ctr.status.exit_code = START_ERROR_EXIT
        ctr.status.reason = "StartError"
        ctr.status.message = getattr(exc, "message", "") or str(exc)
        try:
            self._save_container(ctr)
        except errdefs.NotFound:
            return
        ctr.exited.set()
        rec.logger.warning("container start failed", id=ctr.id, error=ctr.status.message)
        self._event(ctr.id, sb, cri.ContainerEventType(
            cri.ContainerEventType.CONTAINER_STOPPED_EVENT))

    async def _monitor(self, ctr: rec.CRIContainer) -> None:
        """Wait for the container's exit; record it; delete the task."""
        task = self.tasks.get(NAMESPACE, ctr.id)
        status = 255
        if task is not None:
            try:
                status = (await task.wait()).status
            except errdefs.BerthError as e:
                rec.logger.warning("wait for container failed", id=ctr.id, error=str(e))
        finished = rec.now()
        oom = await self._oom_killed(ctr)
        with trio.CancelScope(shield=True):
            await self._delete_task(ctr)  # the shim lets go of the FIFOs
        if ctr.log_file is not None:
            # What the container wrote belongs in its log before it shows as exited: the
            # copies drain first, a bounded while (a child it left may hold the pipe).
            with trio.move_on_after(rec.LOG_DRAIN):
                await ctr.logs_done.wait()
            ctr.log_file.close()
        if ctr.attach_hub is not None:
            with trio.CancelScope(shield=True):
                await ctr.attach_hub.close()
        ctr.status.finished_at = finished
        ctr.status.exit_code = status
        ctr.status.reason = "Completed" if status == 0 else "Error"
        if oom:
            ctr.status.reason = "OOMKilled"
        try:
            self._save_container(ctr)
        except errdefs.NotFound:
            pass  # removed meanwhile
        ctr.exited.set()
        rec.logger.info("container exited", id=ctr.id, exit_code=status, reason=ctr.status.reason)
        self._event(ctr.id, self.sandboxes.get(ctr.sandbox_id),
                    cri.ContainerEventType.CONTAINER_STOPPED_EVENT)

    async def _oom_killed(self, ctr: rec.CRIContainer) -> bool:
        """Whether the kernel's OOM killer ended a process of the container's cgroup
        (read before the task is deleted, which removes the cgroup)."""
        try:
            record = self.store.get(NAMESPACE, ctr.id)
        except errdefs.NotFound:
            return False
        raw = await trio.to_thread.run_sync(cri_stats.read, rec.cgroups_path(record), ctr.id)
        return int((raw.get("memory") or {}).get("oom_kill", 0)) > 0

    async def _delete_task(self, ctr: rec.CRIContainer) -> None:
        if self.tasks.get(NAMESPACE, ctr.id) is None:
            return
        try:
            await self.tasks.delete(NAMESPACE, ctr.id)
        except errdefs.BerthError as e:
            rec.logger.warning("task delete failed", id=ctr.id, error=str(e))

    async def _stop(self, ctr: rec.CRIContainer, timeout: int) -> None:
        if ctr.state != cri.ContainerState.CONTAINER_RUNNING:
            return
        task = self.tasks.get(NAMESPACE, ctr.id)
        if task is None:
            return
        if timeout > 0:
            sig = rec.signal_number(ctr.stop_signal)
            try:
                await task.kill(sig, all=True)
            except errdefs.NotFound:
                pass
            with trio.move_on_after(timeout):
                await ctr.exited.wait()
        if not ctr.exited.is_set():
            try:
                await task.kill(signal.SIGKILL, all=True)
            except (errdefs.NotFound, errdefs.FailedPrecondition):
                pass
            with trio.move_on_after(rec.KILL_WAIT):
                await ctr.exited.wait()
            if not ctr.exited.is_set():
                raise errdefs.DeadlineExceeded(
                    f"container {ctr.id} did not exit {rec.KILL_WAIT:.0f}s after SIGKILL",
                    raw=True)

    @rec.serialized("container_id")
    async def stop_container(self, ctx: CallContext, req: cri.StopContainerRequest
                             ) -> cri.StopContainerResponse:
        await self._stop(self._container(req.container_id), int(req.timeout))
        return cri.StopContainerResponse()

    async def _remove(self, ctr: rec.CRIContainer) -> None:
        await self._stop(ctr, 0)
        await self._delete_task(ctr)
        try:
            record = self.store.get(NAMESPACE, ctr.id)
        except errdefs.NotFound:
            pass
        else:
            await self._drop_record(ctr.id, record.snapshotter, record.snapshot_key)
        await trio.to_thread.run_sync(nspin.unpin, pidns.pin_path(ctr.folder))
        shutil.rmtree(ctr.folder, ignore_errors=True)
        self.containers.pop(ctr.id, None)
        self._names.pop(self._container_name(ctr), None)
        self._locks.pop(ctr.id, None)
        rec.logger.info("container removed", id=ctr.id)
        self._event(ctr.id, self.sandboxes.get(ctr.sandbox_id),
                    cri.ContainerEventType.CONTAINER_DELETED_EVENT)

    @rec.serialized("container_id")
    async def remove_container(self, ctx: CallContext, req: cri.RemoveContainerRequest
                               ) -> cri.RemoveContainerResponse:
        try:
            ctr = self._container(req.container_id)
        except errdefs.NotFound:
            return cri.RemoveContainerResponse()  # idempotent, as the API asks
        await self._remove(ctr)
        return cri.RemoveContainerResponse()

    def _cri_container(self, ctr: rec.CRIContainer) -> cri.Container:
        return cri.Container(
            id=ctr.id, pod_sandbox_id=ctr.sandbox_id, metadata=ctr.config.metadata,
            image=cri.ImageSpec(image=ctr.image_id), image_ref=ctr.image_ref,
            state=cri.ContainerState(ctr.state), created_at=ctr.status.created_at,
            labels=dict(ctr.config.labels), annotations=dict(ctr.config.annotations),
            image_id=ctr.image_id)

    def list_containers(self, ctx: CallContext, req: cri.ListContainersRequest
                        ) -> cri.ListContainersResponse:
        f = cri_spec.given(req.filter, cri.ContainerFilter)
        out = []
        for ctr in sorted(self.containers.values(), key=lambda c: c.status.created_at):
            if not rec.match_id(ctr.id, f.id) or not rec.match_id(ctr.sandbox_id, f.pod_sandbox_id):
                continue
            if f.state is not None and betterproto.serialized_on_wire(f.state) \
                    and ctr.state != f.state.state:
                continue
            if not rec.match_labels(dict(ctr.config.labels), dict(f.label_selector)):
                continue
            out.append(self._cri_container(ctr))
        return cri.ListContainersResponse(containers=out)

    def _status(self, ctr: rec.CRIContainer) -> cri.ContainerStatus:
        st = ctr.status
        linux = cri_spec.given(ctr.config.linux, cri.LinuxContainerConfig)
        status = cri.ContainerStatus(
            id=ctr.id, metadata=ctr.config.metadata, state=cri.ContainerState(ctr.state),
            created_at=st.created_at, started_at=st.started_at, finished_at=st.finished_at,
            exit_code=st.exit_code, image=ctr.config.image, image_ref=ctr.image_ref,
            reason=st.reason, message=st.message, labels=dict(ctr.config.labels),
            annotations=dict(ctr.config.annotations), mounts=list(ctr.config.mounts),
            log_path=ctr.log_path, image_id=ctr.image_id)
        if linux.resources:  # unset, the field stays off the wire (as None did)
            status.resources = cri.ContainerResources(linux=linux.resources)
        return status

    def container_status(self, ctx: CallContext, req: cri.ContainerStatusRequest
                         ) -> cri.ContainerStatusResponse:
        ctr = self._container(req.container_id)
        st = ctr.status
        status = self._status(ctr)
        out = cri.ContainerStatusResponse(status=status)
        if req.verbose:
            out.info = {"info": json.dumps({
                "sandboxID": ctr.sandbox_id, "pid": st.pid, "config": rec.msg_json(ctr.config),
                "snapshotKey": ctr.id, "snapshotter": self.config.snapshotter,
            })}
        return out

    async def exec_sync(self, ctx: CallContext, req: cri.ExecSyncRequest
                        ) -> cri.ExecSyncResponse:
        ctr = self._container(req.container_id)
        if ctr.state != cri.ContainerState.CONTAINER_RUNNING:
            raise errdefs.FailedPrecondition(f"container {ctr.id} is not running", raw=True)
        if not req.cmd:
            raise errdefs.InvalidArgument("exec command is empty", raw=True)
        task = self.tasks.get(NAMESPACE, ctr.id)
        if task is None:
            raise errdefs.NotFound(f"task of container {ctr.id} not found", raw=True)
        record = self.store.get(NAMESPACE, ctr.id)
        process = dict(oci.from_any(record.spec).get("process") or {})
        process["args"] = list(req.cmd)
        process["terminal"] = False
        exec_id = secrets.token_hex(8)
        folder = Path(ctr.folder) / f"exec-{exec_id}"
        paths = (folder / "stdout", folder / "stderr")
        for p in paths:
            logs.make_fifo(p)
        outputs = [bytearray(), bytearray()]
        readers, keepers = [], []
        try:
            for p in paths:
                r, k = logs.open_fifo(p)
                readers.append(r)
                keepers.append(k)
            try:
                async with trio.open_nursery() as nursery:
                    for r, buf in zip(readers, outputs, strict=True):
                        nursery.start_soon(rec.collect, r, buf, rec.EXEC_OUTPUT_CAP)
                    readers = []
                    exit_: int | None = None
                    try:
                        # Our writing ends go once the shim holds its own: a shim may open
                        # an exec's FIFOs at Exec or only at Start.
                        try:
                            with trio.CancelScope(shield=True) as setup:
                                setup.deadline = trio.current_time() + rec.EXEC_START_TIMEOUT
                                await task.exec(exec_id, stdin="", stdout=str(paths[0]),
                                                stderr=str(paths[1]), terminal=False,
                                                spec=oci.process_any(process))
                                with self.tasks.primer.starting():
                                    await task.start(exec_id)
                            if setup.cancelled_caught:
                                raise errdefs.DeadlineExceeded(
                                    f"exec did not start within {rec.EXEC_START_TIMEOUT:.0f}s",
                                    raw=True)
                        finally:
                            for k in keepers:
                                os.close(k)
                            keepers = []
                        exit_ = await self._wait_exec(task, exec_id, req.timeout)
                    finally:
                        with trio.CancelScope(shield=True):
                            if exit_ is None:
                                # The caller went (its deadline, a hang-up) or Start failed:
                                # nobody will read this process's output (containerd kills
                                # it too).
                                await self._kill_exec(task, exec_id)
                            try:
                                await task.delete(exec_id)
                            except errdefs.BerthError as e:
                                rec.logger.debug("exec delete", id=ctr.id, exec_id=exec_id,
                                           error=str(e))
            except BaseExceptionGroup as group:
                raise rec.first_error(group) from None
        finally:
            for k in keepers:
                os.close(k)
            for r in readers:
                await r.aclose()
            shutil.rmtree(folder, ignore_errors=True)
        return cri.ExecSyncResponse(stdout=bytes(outputs[0]), stderr=bytes(outputs[1]),
                                    exit_code=exit_)

    async def _kill_exec(self, task: Any, exec_id: str) -> None:
        try:
            await task.kill(signal.SIGKILL, exec_id=exec_id)
        except errdefs.BerthError as e:  # gone already, or never started
            rec.logger.debug("exec kill", exec_id=exec_id, error=str(e))
            return
        with trio.move_on_after(rec.KILL_WAIT):
            await task.wait(exec_id)

    async def _wait_exec(self, task: Any, exec_id: str, timeout: int) -> int:
        if timeout <= 0:
            return (await task.wait(exec_id)).status
        with trio.move_on_after(timeout):
            return (await task.wait(exec_id)).status
        await self._kill_exec(task, exec_id)
        raise errdefs.DeadlineExceeded(f"command timed out after {timeout}s", raw=True)

    # --- stats ------------------------------------------------------------------------

    async def _container_stats(self, ctr: rec.CRIContainer) -> cri.ContainerStats:
        now = rec.now()
        try:
            record = self.store.get(NAMESPACE, ctr.id)
        except errdefs.NotFound:
            record = None
        raw: dict[str, Any] = {}
        if record is not None and ctr.state == cri.ContainerState.CONTAINER_RUNNING:
            raw = await trio.to_thread.run_sync(cri_stats.read, rec.cgroups_path(record), ctr.id)
        cpu, memory = cri_stats.usage(raw, now)
        layer = cri.FilesystemUsage(timestamp=now, fs_id=cri.FilesystemIdentifier(
            mountpoint=str(self.images.snapshot_root or "")))
        sn = self.stores.snapshotters.get(record.snapshotter) if record else None
        if sn is not None and record is not None and record.snapshot_key:
            try:
                u = await sn.usage(NAMESPACE, record.snapshot_key)
                layer.used_bytes = cri.UInt64Value(u.size)
                layer.inodes_used = cri.UInt64Value(u.inodes)
            except errdefs.BerthError as e:
                rec.logger.debug("snapshot usage", id=ctr.id, error=str(e))
        return cri.ContainerStats(
            attributes=cri.ContainerAttributes(
                id=ctr.id, metadata=ctr.config.metadata, labels=dict(ctr.config.labels),
                annotations=dict(ctr.config.annotations)),
            cpu=cpu, memory=memory, writable_layer=layer)

    async def container_stats(self, ctx: CallContext, req: cri.ContainerStatsRequest
                              ) -> cri.ContainerStatsResponse:
        stats = await self._container_stats(self._container(req.container_id))
        return cri.ContainerStatsResponse(stats=stats)

    async def list_container_stats(self, ctx: CallContext,
                                   req: cri.ListContainerStatsRequest
                                   ) -> cri.ListContainerStatsResponse:
        f = cri_spec.given(req.filter, cri.ContainerStatsFilter)
        out = []
        for ctr in list(self.containers.values()):
            if not rec.match_id(ctr.id, f.id) or not rec.match_id(ctr.sandbox_id, f.pod_sandbox_id):
                continue
            if not rec.match_labels(dict(ctr.config.labels), dict(f.label_selector)):
                continue
            if ctr.state == cri.ContainerState.CONTAINER_RUNNING:
                out.append(await self._container_stats(ctr))
        return cri.ListContainerStatsResponse(stats=out)

    async def _pod_stats(self, sb: rec.Sandbox) -> cri.PodSandboxStats:
        now = rec.now()
        members = [c for c in self.containers.values() if c.sandbox_id == sb.id]
        stats = [await self._container_stats(c) for c in members
                 if c.state == cri.ContainerState.CONTAINER_RUNNING]
        parent = sb.config.linux.cgroup_parent if sb.config.linux else ""
        raw = await trio.to_thread.run_sync(cri_stats.read, parent, sb.id) if parent else {}
        if raw:
            cpu, memory = cri_stats.usage(raw, now)
            procs = cri_stats.process_count(raw)
        else:  # no pod cgroup: the sum of its containers
            cpu = cri.CpuUsage(timestamp=now, usage_core_nano_seconds=cri.UInt64Value(sum(
                s.cpu.usage_core_nano_seconds.value for s in stats)))
            fields = ("working_set_bytes", "usage_bytes", "rss_bytes", "page_faults",
                      "major_page_faults")
            memory = cri.MemoryUsage(timestamp=now, **{
                k: cri.UInt64Value(sum(getattr(s.memory, k).value for s in stats))
                for k in fields})
            procs = 0
        return cri.PodSandboxStats(
            attributes=cri.PodSandboxAttributes(
                id=sb.id, metadata=sb.config.metadata, labels=dict(sb.config.labels),
                annotations=dict(sb.config.annotations)),
            linux=cri.LinuxPodSandboxStats(
                cpu=cpu, memory=memory, containers=stats,
                process=cri.ProcessUsage(timestamp=now,
                                         process_count=cri.UInt64Value(procs))))

    async def pod_sandbox_stats(self, ctx: CallContext, req: cri.PodSandboxStatsRequest
                                ) -> cri.PodSandboxStatsResponse:
        return cri.PodSandboxStatsResponse(
            stats=await self._pod_stats(self._sandbox(req.pod_sandbox_id)))

    async def list_pod_sandbox_stats(self, ctx: CallContext,
                                     req: cri.ListPodSandboxStatsRequest
                                     ) -> cri.ListPodSandboxStatsResponse:
        f = cri_spec.given(req.filter, cri.PodSandboxStatsFilter)
        out = [await self._pod_stats(sb) for sb in list(self.sandboxes.values())
               if rec.match_id(sb.id, f.id)
               and rec.match_labels(dict(sb.config.labels), dict(f.label_selector))]
        return cri.ListPodSandboxStatsResponse(stats=out)

    @rec.serialized("container_id")
    async def update_container_resources(self, ctx: CallContext,
                                         req: cri.UpdateContainerResourcesRequest
                                         ) -> cri.UpdateContainerResourcesResponse:
        ctr = self._container(req.container_id)
        if req.linux is None or not betterproto.serialized_on_wire(req.linux):
            raise errdefs.InvalidArgument("linux resources are required", raw=True)
        if ctr.state == cri.ContainerState.CONTAINER_EXITED:
            raise errdefs.FailedPrecondition(f"container {ctr.id} has exited", raw=True)
        record = self.store.get(NAMESPACE, ctr.id)
        spec = oci.from_any(record.spec)
        resources = cri_spec.linux_resources(req.linux)
        spec.setdefault("linux", {}).setdefault("resources", {}).update(resources)
        task = self.tasks.get(NAMESPACE, ctr.id)
        if task is not None:
            await task.update(AnyMsg(type_url=rec.RESOURCES_TYPE_URL,
                                     value=json.dumps(resources).encode()),
                              dict(req.annotations))
        # The record follows what the cgroup has now, so a restart keeps it.
        record.spec = oci.to_any(spec)
        self.store.update(NAMESPACE, record, ["spec"])
        if ctr.config.linux is None:
            ctr.config.linux = cri.LinuxContainerConfig()
        ctr.config.linux.resources = req.linux
        self._save_container(ctr)
        return cri.UpdateContainerResourcesResponse()

    async def reopen_container_log(self, ctx: CallContext, req: cri.ReopenContainerLogRequest
                                   ) -> cri.ReopenContainerLogResponse:
        ctr = self._container(req.container_id)
        if ctr.state != cri.ContainerState.CONTAINER_RUNNING or ctr.log_file is None:
            raise errdefs.FailedPrecondition("container is not running", raw=True)
        ctr.log_file.reopen()
        return cri.ReopenContainerLogResponse()
