"""CRI pods and containers on berth's containers store and runtime v2 task manager.

A pod sandbox has no infra container: its IPC and UTS namespaces are pinned by berth
(:mod:`berth.plugins.cri.pins`) and containers join them by path; a pod that shares its
PID namespace gets a small holder process as that namespace's PID 1
(:mod:`berth.plugins.cri.pidns`); a hostNetwork pod uses the node's network and UTS
namespaces. Sandboxes and containers are berth containers of
namespace ``k8s.io`` (labels ``io.cri-containerd.kind=sandbox|container``, the CRI
metadata as JSON in an extension), so ``ctr -n k8s.io containers ls`` shows them. Every
container of a pod carries ``io.kubernetes.cri.sandbox-id``: berth's shim and runc's v2
shim both run all of a pod's containers in one shim process.

A container's task is made at StartContainer, as containerd's CRI does; its stdout and
stderr come through FIFOs that berthd reads into the CRI log file
(:mod:`berth.plugins.cri.logs`). An exit is recorded (finished time, exit code, OOM
reason) and the task deleted, so the shim frees what it held.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import betterproto
import trio

from berth.core import errdefs
from berth.core.api.containerd.types import Mount as ApiMount
from berth.core.api.runtime import v1 as cri
from berth.core.grpc.context import CallContext
from berth.core.metadata.containers import Container, ContainerStore
from berth.core.oci import default_spec as oci
from berth.core.runtime.manager import CreateOpts, TaskManager
from berth.core.transfer.pull import Stores
from berth.plugins.cri import logs, pidns, pins, records as rec, spec as cri_spec
from berth.plugins.cri.config import CRIConfig
from berth.plugins.cri.containers import ContainerOps
from berth.plugins.cri.images import NAMESPACE, ImageService, image_user
from berth.plugins.cri.runtime import RuntimeBase
from berth.plugins.cri.streaming.attach import AttachHub
from berth.plugins.cri.streaming.service import StreamingOps
from berth.plugins.cri.userns import for_container as userns_for


class PodService(StreamingOps, ContainerOps, RuntimeBase):
    """RuntimeService: pods, and containers (ContainerOps), with Version and Status
    from RuntimeBase."""

    def __init__(self, config: CRIConfig, *, stores: Stores, images: ImageService,
                 containers: ContainerStore, tasks: TaskManager, state: Path,
                 nursery: trio.Nursery, networks: Any = None, cni: Any = None) -> None:
        super().__init__(config)
        self.networks = networks  # core.networks.manager.NetworkManager
        self.cni = cni  # the network plugin whose first network pods join
        self.stores = stores
        self.images = images
        self.store = containers
        self.tasks = tasks
        self.state = state
        self.nursery = nursery
        self.sandboxes: dict[str, rec.Sandbox] = {}
        self.containers: dict[str, rec.CRIContainer] = {}
        self._names: dict[str, str] = {}  # reserved pod and container names -> id
        self._locks: dict[str, trio.Lock] = {}
        self._watchers: set[trio.MemorySendChannel[cri.ContainerEventResponse]] = set()
        # The waiting parents of this berthd's PID namespace holders, by pod id.
        self._holders: dict[str, trio.Process] = {}
        self.oom = cri_spec.OOMPolicy(cri_spec.own_oom_score_adj(),
                                      config.restrict_oom_score_adj,
                                      cri_spec.can_raise_oom_priority())

    # --- records ----------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: what berthd recorded, and what a berthd killed half way
        through a call left without a record (pins, folders, a pod's network, a task
        never reported started) undone, so nothing leaks and every call can be retried."""
        await self._settle_holders()
        await self._settle_running()
        for kind, table in (("sandboxes", self.sandboxes), ("containers", self.containers)):
            folder = self.state / kind
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                if name not in table:
                    rec.logger.info("removing what an interrupted call left", kind=kind, id=name)
                    await trio.to_thread.run_sync(self._remove_sandbox_files, folder / name)
        if self.networks is not None:
            for a in self.networks.store.list(NAMESPACE):
                if not a.container and rec.is_id(a.id) and a.id not in self.sandboxes:
                    rec.logger.info("detaching the network of an unrecorded pod", id=a.id)
                    try:
                        await self.networks.detach(NAMESPACE, a.id)
                    except errdefs.BerthError as e:
                        rec.logger.error("pod network teardown failed", id=a.id, error=str(e))
        for sb in list(self.sandboxes.values()):
            if sb.mode != "pause" or sb.state != cri.PodSandboxState.SANDBOX_READY:
                continue
            await self.tasks.settle(NAMESPACE, sb.id)
            task = self.tasks.get(NAMESPACE, sb.id)
            if task is None:
                sb.state = cri.PodSandboxState.SANDBOX_NOTREADY
                self._save_sandbox(sb)
            else:
                self.nursery.start_soon(self._watch_infra, sb)
        for ctr in list(self.containers.values()):
            if ctr.state != cri.ContainerState.CONTAINER_CREATED:
                continue
            await self.tasks.settle(NAMESPACE, ctr.id)
            task = self.tasks.get(NAMESPACE, ctr.id)
            if task is not None:
                # Died in StartContainer after the task was made: back to created.
                try:
                    await task.kill(signal.SIGKILL, all=True)
                except errdefs.BerthError:
                    pass
                await self._delete_task(ctr)

    async def _settle_holders(self) -> None:
        """PID namespace holders after a restart: those of ready pods watched again, any
        other one (of a pod stopped, removed, or never recorded) killed; a ready pod whose
        holder died while berthd was down is not ready any more."""
        found = await trio.to_thread.run_sync(pidns.find, self.state / "sandboxes")
        keep = {sb.folder: sb for sb in self.sandboxes.values()
                if sb.pid_holder and sb.state == cri.PodSandboxState.SANDBOX_READY}
        stale = {pid: folder for pid, folder in found.items() if folder not in keep}
        for folder in sorted(set(stale.values())):
            rec.logger.info("killing a stale PID namespace holder", folder=folder)
        await trio.to_thread.run_sync(pidns.kill_all, stale)
        for sb in keep.values():
            if found.get(sb.pid_holder) == sb.folder:
                self.nursery.start_soon(self._watch_holder, sb, None)
            else:
                rec.logger.warning("the pod's PID namespace holder died", id=sb.id,
                                   pid=sb.pid_holder)
                await self._holder_gone(sb)

    async def _watch_holder(self, sb: rec.Sandbox, proc: trio.Process | None) -> None:
        """PID 1 of the pod's PID namespace ending (and every container with it: the
        kernel kills what is left in the namespace) makes the pod not ready, as a
        pause container's end does; StopPodSandbox clears ``pid_holder`` first."""
        pid = sb.pid_holder
        if proc is not None:
            await proc.wait()  # the waiting parent ends with its child, and is reaped here
        else:
            await pidns.wait_gone(pid)
        if self._holders.get(sb.id) is proc:
            self._holders.pop(sb.id, None)
        if sb.pid_holder == pid and sb.id in self.sandboxes:
            rec.logger.warning("the pod's PID namespace holder died", id=sb.id, pid=pid)
            await self._holder_gone(sb)

    async def _holder_gone(self, sb: rec.Sandbox) -> None:
        sb.pid_holder = 0
        if sb.state != cri.PodSandboxState.SANDBOX_READY:
            return
        sb.state = cri.PodSandboxState.SANDBOX_NOTREADY
        try:
            self._save_sandbox(sb)
        except errdefs.NotFound:
            return
        self._event(sb.id, sb, cri.ContainerEventType(
            cri.ContainerEventType.CONTAINER_STOPPED_EVENT))

    async def _start_holder(self, sb: rec.Sandbox, folder: Path) -> None:
        proc, sb.pid_holder = await pidns.start(folder)
        self._holders[sb.id] = proc
        self.nursery.start_soon(self._watch_holder, sb, proc)

    async def _stop_holder(self, sb: rec.Sandbox) -> None:
        """Kill the pod's PID namespace holder and return once it is gone (and with it,
        by the kernel's hand, whatever was left in the namespace)."""
        pid, sb.pid_holder = sb.pid_holder, 0
        proc = self._holders.pop(sb.id, None)
        hit = await trio.to_thread.run_sync(pidns.stop, sb.folder, pid)
        with trio.move_on_after(rec.KILL_WAIT):
            if proc is not None:
                await proc.wait()  # berthd's child: reaped here
            for p in hit:
                await pidns.wait_gone(p)

    def load(self) -> None:
        """The sandboxes and containers berthd recorded; what still runs is settled by
        :meth:`recover` once the runtime has recovered its tasks."""
        for c in self.store.list(NAMESPACE, [f'labels."{rec.KIND_LABEL}"==sandbox']):
            sb = rec.Sandbox.from_doc(c.id, rec.unext(c.extensions.get(rec.SANDBOX_EXT)))
            self.sandboxes[sb.id] = sb
            self._names[sb.name] = sb.id
        for c in self.store.list(NAMESPACE, [f'labels."{rec.KIND_LABEL}"==container']):
            ctr = rec.CRIContainer.from_doc(c.id, rec.unext(c.extensions.get(
                rec.CONTAINER_EXT)))
            self.containers[ctr.id] = ctr
            self._names[self._container_name(ctr)] = ctr.id

    async def _settle_running(self) -> None:
        """Running containers: watched again, or their exit while berthd was down
        recorded (the status the runtime's cleanup reported, 255 when unknown)."""
        for ctr in list(self.containers.values()):
            if ctr.state != cri.ContainerState.CONTAINER_RUNNING:
                continue
            exit_ = await self.tasks.settle(NAMESPACE, ctr.id)
            if self.tasks.get(NAMESPACE, ctr.id) is None:
                ctr.status.finished_at = ctr.status.finished_at or rec.now()
                ctr.status.exit_code = exit_.status if exit_ is not None else 255
                ctr.status.reason = "Completed" if ctr.status.exit_code == 0 else "Error"
                self._save_container(ctr)
                ctr.exited.set()
            else:
                self._reattach_logs(ctr)
                self.nursery.start_soon(self._monitor, ctr)

    def _reattach_logs(self, ctr: rec.CRIContainer) -> None:
        """After a restart: read the running container's FIFOs again (its shim kept
        them open, so what the container wrote meanwhile waits in the pipe), through a
        new attach hub, and hold its stdin FIFO again, so that CRI Attach works as for
        a container started by this berthd (the shim keeps a writer of its own on stdin:
        the container saw no EOF when the old berthd died)."""
        ctr.log_file = logs.LogFile(Path(ctr.log_path) if ctr.log_path else None)
        hub = AttachHub(bool(ctr.config.tty))
        if ctr.config.stdin:
            try:
                hub.open_stdin(Path(ctr.folder) / "stdin")
            except OSError as e:
                rec.logger.warning("container stdin not reattached", id=ctr.id, error=str(e))
        ctr.attach_hub = hub
        for name, stream in (("stdout", logs.STDOUT), ("stderr", logs.STDERR)):
            path = Path(ctr.folder) / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                rec.logger.warning("container log not reattached", id=ctr.id, stream=stream,
                             error=str(e))
                continue
            self._copy(ctr, hub.tap(trio.lowlevel.FdStream(fd), stream), stream)

    def _copy(self, ctr: rec.CRIContainer, src: trio.lowlevel.FdStream, stream: str) -> None:
        """Copy one stream into the container's log; the last copier to end says so."""
        assert ctr.log_file is not None
        ctr.copiers += 1
        sink = ctr.log_file.write
        max_line = self.config.max_container_log_line_size

        async def run() -> None:
            try:
                await logs.copy_stream(src, stream, sink, max_line, rec.now)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                rec.logger.warning("container log copy ended", id=ctr.id, stream=stream,
                             error=str(e))
            finally:
                ctr.copiers -= 1
                if ctr.copiers == 0:
                    ctr.logs_done.set()

        self.nursery.start_soon(run)

    def _lock(self, wanted: str) -> trio.Lock:
        """The lock of the pod or container ``wanted`` names (a prefix resolves)."""
        key = wanted
        for table in (self.containers, self.sandboxes):
            hits = [k for k in table if rec.match_id(k, wanted)] if wanted else []
            if len(hits) == 1:
                key = hits[0]
                break
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = trio.Lock()
        return lock

    def _save_sandbox(self, sb: rec.Sandbox) -> None:
        self.store.update(NAMESPACE, Container(id=sb.id, extensions={
            rec.SANDBOX_EXT: rec.ext(sb.to_doc())}), [f"extensions.{rec.SANDBOX_EXT}"])

    def _save_container(self, ctr: rec.CRIContainer) -> None:
        self.store.update(NAMESPACE, Container(id=ctr.id, extensions={
            rec.CONTAINER_EXT: rec.ext(ctr.to_doc())}), [f"extensions.{rec.CONTAINER_EXT}"])

    def _sandbox(self, sid: str) -> rec.Sandbox:
        return rec.lookup(self.sandboxes, sid, "sandbox")

    def _container(self, cid: str) -> rec.CRIContainer:
        return rec.lookup(self.containers, cid, "container")

    def _container_name(self, ctr: rec.CRIContainer) -> str:
        sb = self.sandboxes.get(ctr.sandbox_id)
        m = ctr.config.metadata
        pod = sb.name if sb else ctr.sandbox_id
        return f"{m.name if m else ''}_{pod}_{m.attempt if m else 0}"

    # --- pod sandboxes ----------------------------------------------------------------

    async def run_pod_sandbox(self, ctx: CallContext, req: cri.RunPodSandboxRequest
                              ) -> cri.RunPodSandboxResponse:
        config = req.config
        if config is None or config.metadata is None or not config.metadata.name \
                or not config.metadata.uid or not config.metadata.namespace:
            raise errdefs.InvalidArgument("sandbox config must name the pod (metadata name, "
                                          "uid and namespace)", raw=True)
        runtime = self.config.runtime(req.runtime_handler)
        if problem := runtime.cgroup_driver_problem():
            raise errdefs.FailedPrecondition(problem, raw=True)
        userns_for(config, None, runtime)  # checked before anything is made
        ns_opts = config.linux.security_context.namespace_options \
            if config.linux and config.linux.security_context else None
        host_net = bool(ns_opts and ns_opts.network == cri.NamespaceMode.NODE)
        network = "" if host_net else self.pod_network()
        if len(config.hostname) > 64 or not rec.HOSTNAME_RE.fullmatch(config.hostname or "x"):
            raise errdefs.InvalidArgument(f"invalid pod hostname {config.hostname!r}",
                                          raw=True)
        if config.log_directory and not config.log_directory.startswith("/"):
            raise errdefs.InvalidArgument(
                f"log directory {config.log_directory!r} must be absolute", raw=True)
        sb = rec.Sandbox(rec.new_id(), config, req.runtime_handler, runtime.runtime_type, rec.now(),
                     host_network=host_net, network=network, mode=self.config.sandbox_mode)
        if sb.name in self._names:
            raise errdefs.AlreadyExists(
                f"failed to reserve sandbox name {sb.name!r}: name is reserved for "
                f"{self._names[sb.name]!r}", raw=True)
        self._names[sb.name] = sb.id
        folder = self.state / "sandboxes" / sb.id
        sb.folder = str(folder)
        try:
            await trio.to_thread.run_sync(self._sandbox_files, sb, folder)
            if sb.mode == "pinned" and sb.shares_pid:
                await self._start_holder(sb, folder)
            if network:
                await self._attach(sb)
            if sb.mode == "pause":
                await self._start_infra(sb, runtime)
            else:
                spec = oci.default_unix_spec(NAMESPACE, sb.id)
                self.store.create(NAMESPACE, Container(
                    id=sb.id, runtime_name=runtime.runtime_type, spec=oci.to_any(spec),
                    labels={**config.labels, rec.KIND_LABEL: "sandbox"},
                    extensions={rec.SANDBOX_EXT: rec.ext(sb.to_doc())}))
        except BaseException:
            with trio.CancelScope(shield=True):
                if sb.mode == "pause":
                    await self._remove_infra(sb)
                if network:
                    await self._detach(sb, quiet=True)
                await self._stop_holder(sb)
                await trio.to_thread.run_sync(self._remove_sandbox_files, folder)
            del self._names[sb.name]
            raise
        self.sandboxes[sb.id] = sb
        rec.logger.info("sandbox ready", id=sb.id, pod=sb.name, handler=req.runtime_handler)
        self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        return cri.RunPodSandboxResponse(pod_sandbox_id=sb.id)

    # --- sandbox_mode "pause": a sandbox container from sandbox_image --------------------

    async def _start_infra(self, sb: rec.Sandbox, runtime: Any) -> None:
        ref = self.config.sandbox_image
        image = await self.images.find(ref)
        if image is None:
            await self.images.pull_image(CallContext(), cri.PullImageRequest(
                image=cri.ImageSpec(image=ref)))
            image = await self.images.find(ref)
            if image is None:
                raise errdefs.NotFound(f"sandbox image {ref!r} not found after its pull",
                                       raw=True)
        sn = self.stores.snapshotters.get(self.config.snapshotter)
        if sn is None:
            raise errdefs.FailedPrecondition(
                f"snapshotter {self.config.snapshotter!r} is not loaded", raw=True)
        async with self.leased() as lease:
            mounts = await sn.prepare(NAMESPACE, sb.id, image.chain_id, lease=lease)
            spec = await trio.to_thread.run_sync(
                cri_spec.infra_spec, sb.view, image.resolved.config.raw,
                image_user(image.resolved), mounts, self.oom)
            self.store.create(NAMESPACE, Container(
                id=sb.id, runtime_name=runtime.runtime_type,
                runtime_options=rec.runtime_options(runtime.options), spec=oci.to_any(spec),
                image=image.id, snapshotter=self.config.snapshotter, snapshot_key=sb.id,
                labels={**sb.config.labels, rec.KIND_LABEL: "sandbox"},
                extensions={rec.SANDBOX_EXT: rec.ext(sb.to_doc())}))
        record = self.store.get(NAMESPACE, sb.id)
        assert record.spec is not None  # the store refuses containers without one
        task = await self.tasks.create(NAMESPACE, sb.id, CreateOpts(
            spec=record.spec, runtime=record.runtime_name,
            rootfs=[ApiMount(type=m.type, source=m.source, options=list(m.options))
                    for m in mounts], runtime_options=record.runtime_options))
        sb.infra_pid = await task.start()
        self._save_sandbox(sb)
        self.nursery.start_soon(self._watch_infra, sb)

    @contextlib.asynccontextmanager
    async def leased(self) -> AsyncIterator[str]:
        """A lease over a snapshot's first moments: until the berth container that
        names it is recorded, nothing else keeps it from the garbage collector."""
        expire = (datetime.now(UTC) + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
        lease = self.stores.leases.create(
            NAMESPACE, f"cri-{rec.new_id()[:16]}", {"containerd.io/gc.expire": expire}).id
        try:
            yield lease
        finally:
            try:
                self.stores.leases.delete(NAMESPACE, lease)
            except errdefs.BerthError as e:
                rec.logger.warning("lease left to expire", lease=lease, error=str(e))

    async def _watch_infra(self, sb: rec.Sandbox) -> None:
        """The sandbox container's end makes the pod not ready, as with containerd."""
        task = self.tasks.get(NAMESPACE, sb.id)
        if task is not None:
            try:
                await task.wait()
            except errdefs.BerthError as e:
                rec.logger.warning("wait for sandbox container failed", id=sb.id, error=str(e))
        if sb.id in self.sandboxes and sb.state == cri.PodSandboxState.SANDBOX_READY:
            sb.state = cri.PodSandboxState.SANDBOX_NOTREADY
            try:
                self._save_sandbox(sb)
            except errdefs.NotFound:
                return
            rec.logger.info("sandbox container exited", id=sb.id, pod=sb.name)
            self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)

    async def _stop_infra(self, sb: rec.Sandbox) -> None:
        task = self.tasks.get(NAMESPACE, sb.id)
        if task is None:
            return
        try:
            await task.kill(signal.SIGKILL, all=True)
        except errdefs.BerthError:
            pass
        with trio.move_on_after(rec.KILL_WAIT):
            try:
                await task.wait()
            except errdefs.BerthError:
                pass
        try:
            await self.tasks.delete(NAMESPACE, sb.id)
        except errdefs.BerthError as e:
            rec.logger.warning("sandbox task delete failed", id=sb.id, error=str(e))

    async def _remove_infra(self, sb: rec.Sandbox) -> None:
        """Undo _start_infra, whatever it got to."""
        await self._stop_infra(sb)
        await self._drop_record(sb.id, self.config.snapshotter, sb.id)

    async def _drop_record(self, id: str, snapshotter: str, snapshot_key: str) -> None:
        """A berth container of ours, and its snapshot; what is gone already is fine."""
        sn = self.stores.snapshotters.get(snapshotter)
        if sn is not None and snapshot_key:
            try:
                await sn.remove(NAMESPACE, snapshot_key)
            except errdefs.NotFound:
                pass
        try:
            self.store.delete(NAMESPACE, id)
        except errdefs.NotFound:
            pass

    def pod_network(self) -> str:
        """The network pods join: the first one of the CRI's CNI config dir."""
        if self.networks is None or self.cni is None:
            raise errdefs.FailedPrecondition(
                "cni plugin not initialized: no network manager or CNI plugin loaded",
                raw=True)
        nets = self.cni.networks()
        if not nets:
            raise errdefs.FailedPrecondition(
                "cni plugin not initialized: no network config found in "
                f"{self.config.cni_conf_dir}", raw=True)
        return str(nets[0].name)

    def network_problem(self) -> str:
        if self.networks is None or self.cni is None:
            return super().network_problem()
        try:
            self.pod_network()
        except errdefs.FailedPrecondition as e:
            return e.message
        return ""

    async def _attach(self, sb: rec.Sandbox) -> None:
        from berth.core.networks.types import PortMapping

        ports = [PortMapping(host_port=p.host_port, container_port=p.container_port,
                             protocol=str(cri.Protocol(p.protocol)).lower(),
                             host_ip=p.host_ip)
                 for p in sb.config.port_mappings if p.host_port > 0]
        att = await self.networks.attach(NAMESPACE, sb.id, sb.network, ports=ports,
                                         ifname="eth0")
        sb.netns = att.netns
        addresses = att.result.addresses() if att.result else []
        sb.ip = addresses[0].split("/", 1)[0] if addresses else ""

    async def _detach(self, sb: rec.Sandbox, *, quiet: bool = False) -> None:
        if self.networks is None or sb.host_network:
            return
        try:
            await self.networks.detach(NAMESPACE, sb.id)
        except errdefs.BerthError as e:
            if not quiet:
                raise
            rec.logger.error("pod network teardown failed", id=sb.id, error=str(e))

    def _sandbox_files(self, sb: rec.Sandbox, folder: Path) -> None:
        # 0711: a container's root mapped by a user namespace must reach the pod's /etc
        # files (containerd's sandbox folders are 0755).
        folder.mkdir(parents=True, exist_ok=True, mode=0o711)
        hostname = sb.config.hostname or (os.uname().nodename if sb.host_network else "")
        if sb.mode == "pinned":
            pins.create(folder, "" if sb.host_network else hostname)
        (folder / "hostname").write_text(hostname + "\n")
        dns = sb.config.dns_config
        if dns and (dns.servers or dns.searches or dns.options):
            lines = [f"search {' '.join(dns.searches)}"] if dns.searches else []
            lines += [f"nameserver {s}" for s in dns.servers]
            lines += [f"options {' '.join(dns.options)}"] if dns.options else []
            (folder / "resolv.conf").write_text("\n".join(lines) + "\n")
        else:
            shutil.copyfile("/etc/resolv.conf", folder / "resolv.conf")
        if sb.host_network:
            shutil.copyfile("/etc/hosts", folder / "hosts")
        else:
            (folder / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost "
                                          "ip6-loopback\n")

    def _remove_sandbox_files(self, folder: Path) -> None:
        pins.remove(folder)
        pidns.stop(folder, 0)
        shutil.rmtree(folder, ignore_errors=True)

    @rec.serialized("pod_sandbox_id")
    async def stop_pod_sandbox(self, ctx: CallContext, req: cri.StopPodSandboxRequest
                               ) -> cri.StopPodSandboxResponse:
        sb = self._sandbox(req.pod_sandbox_id)
        for ctr in [c for c in self.containers.values() if c.sandbox_id == sb.id]:
            async with self._lock(ctr.id):
                await self._stop(ctr, 0)
        if sb.mode == "pause":
            await self._stop_infra(sb)
        await self._stop_holder(sb)
        await self._detach(sb)
        if sb.state != cri.PodSandboxState.SANDBOX_NOTREADY:
            await trio.to_thread.run_sync(pins.remove, Path(sb.folder))
            sb.state = cri.PodSandboxState.SANDBOX_NOTREADY
            self._save_sandbox(sb)
            rec.logger.info("sandbox stopped", id=sb.id, pod=sb.name)
            self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)
        return cri.StopPodSandboxResponse()

    @rec.serialized("pod_sandbox_id")
    async def remove_pod_sandbox(self, ctx: CallContext, req: cri.RemovePodSandboxRequest
                                 ) -> cri.RemovePodSandboxResponse:
        try:
            sb = self._sandbox(req.pod_sandbox_id)
        except errdefs.NotFound:
            return cri.RemovePodSandboxResponse()  # idempotent, as the API asks
        for ctr in [c for c in self.containers.values() if c.sandbox_id == sb.id]:
            async with self._lock(ctr.id):
                await self._remove(ctr)
        if sb.mode == "pause":
            await self._stop_infra(sb)
            await self._remove_infra(sb)
        await self._stop_holder(sb)
        await self._detach(sb)
        await trio.to_thread.run_sync(self._remove_sandbox_files, Path(sb.folder))
        try:
            self.store.delete(NAMESPACE, sb.id)
        except errdefs.NotFound:
            pass
        self.sandboxes.pop(sb.id, None)
        self._names.pop(sb.name, None)
        self._locks.pop(sb.id, None)
        rec.logger.info("sandbox removed", id=sb.id, pod=sb.name)
        self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_DELETED_EVENT)
        return cri.RemovePodSandboxResponse()

    def _sandbox_status(self, sb: rec.Sandbox) -> cri.PodSandboxStatus:
        ns_opts = cri.NamespaceOption()
        if sb.config.linux and sb.config.linux.security_context \
                and sb.config.linux.security_context.namespace_options:
            ns_opts = sb.config.linux.security_context.namespace_options
        return cri.PodSandboxStatus(
            id=sb.id, metadata=sb.config.metadata, state=cri.PodSandboxState(sb.state),
            created_at=sb.created_at, network=cri.PodSandboxNetworkStatus(ip=sb.ip),
            linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(options=ns_opts)),
            labels=dict(sb.config.labels), annotations=dict(sb.config.annotations),
            runtime_handler=sb.handler)

    def pod_sandbox_status(self, ctx: CallContext, req: cri.PodSandboxStatusRequest
                           ) -> cri.PodSandboxStatusResponse:
        sb = self._sandbox(req.pod_sandbox_id)
        out = cri.PodSandboxStatusResponse(
            status=self._sandbox_status(sb), timestamp=rec.now(),
            containers_statuses=[self._status(c) for c in self.containers.values()
                                 if c.sandbox_id == sb.id])
        if req.verbose:
            out.info = {"info": json.dumps({
                "config": rec.msg_json(sb.config), "runtimeHandler": sb.handler,
                "runtimeType": sb.runtime_type, "sandboxMode": self.config.sandbox_mode,
                "hostNetwork": sb.host_network, "network": sb.network, "netns": sb.netns,
                "namespaces": {k: str(v) for k, v in pins.paths(Path(sb.folder)).items()}
                | ({"pid": str(pidns.pin_path(sb.folder))} if sb.pid_holder else {}),
                "pidHolder": sb.pid_holder,
            })}
        return out

    def list_pod_sandbox(self, ctx: CallContext, req: cri.ListPodSandboxRequest
                         ) -> cri.ListPodSandboxResponse:
        f = cri_spec.given(req.filter, cri.PodSandboxFilter)
        out = []
        for sb in sorted(self.sandboxes.values(), key=lambda s: s.created_at):
            if not rec.match_id(sb.id, f.id):
                continue
            if f.state is not None and betterproto.serialized_on_wire(f.state) \
                    and sb.state != f.state.state:
                continue
            if not rec.match_labels(dict(sb.config.labels), dict(f.label_selector)):
                continue
            out.append(cri.PodSandbox(
                id=sb.id, metadata=sb.config.metadata, state=cri.PodSandboxState(sb.state),
                created_at=sb.created_at, labels=dict(sb.config.labels),
                annotations=dict(sb.config.annotations), runtime_handler=sb.handler))
        return cri.ListPodSandboxResponse(items=out)

    # --- events (the kubelet's evented PLEG) -----------------------------------------

    def _event(self, cid: str, sb: rec.Sandbox | None, kind: int) -> None:
        # kind: a ContainerEventType member, which mypy sees as an int (betterproto#616);
        # ContainerEventType(kind) gives back the same member, typed.
        if not self._watchers:
            return
        statuses = []
        if sb is not None:
            statuses = [self._status(c) for c in self.containers.values()
                        if c.sandbox_id == sb.id]
        msg = cri.ContainerEventResponse(
            container_id=cid, container_event_type=cri.ContainerEventType(kind),
            created_at=rec.now(), containers_statuses=statuses)
        if sb is not None:  # unset, the field stays off the wire (as None did)
            msg.pod_sandbox_status = self._sandbox_status(sb)
        for w in list(self._watchers):
            try:
                w.send_nowait(msg)
            except trio.WouldBlock:
                # A watcher this far behind has lost events: end its stream, as
                # containerd drops them; the kubelet then relists.
                rec.logger.warning("container event watcher too slow; dropped")
                self._watchers.discard(w)
                w.close()
            except trio.ClosedResourceError:
                self._watchers.discard(w)

    async def get_container_events(self, ctx: CallContext, req: cri.GetEventsRequest,
                                   send: Any) -> None:
        tx, rx = trio.open_memory_channel[cri.ContainerEventResponse](rec.EVENT_BUFFER)
        self._watchers.add(tx)
        try:
            async with rx:
                async for msg in rx:
                    await send(msg)
        finally:
            self._watchers.discard(tx)
            tx.close()
