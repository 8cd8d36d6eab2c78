"""CRI pods and containers on berth's containers store and runtime v2 task manager.

A pod sandbox has no infra container: its IPC and UTS namespaces are pinned by berth
(:mod:`berth.plugins.cri.pins`) and containers join them by path; a hostNetwork pod uses
the node's network and UTS namespaces. Sandboxes and containers are berth containers of
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

import functools
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import betterproto
import trio
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, log
from berth.core.api.containerd.runc.v1 import Options as RuncOptions
from berth.core.api.containerd.types import Mount as ApiMount
from berth.core.api.runtime import v1 as cri
from berth.core.grpc.context import CallContext
from berth.core.images.progress import first_error
from berth.core.metadata.containers import Container, ContainerStore
from berth.core.oci import default_spec as oci
from berth.core.runtime.manager import CreateOpts, TaskManager
from berth.core.transfer.pull import Stores
from berth.plugins.cri import logs, pins, spec as cri_spec, stats as cri_stats
from berth.plugins.cri.config import CRIConfig
from berth.plugins.cri.images import NAMESPACE, ImageService, image_user
from berth.plugins.cri.runtime import RuntimeBase

KIND_LABEL = "io.cri-containerd.kind"
SANDBOX_EXT = "io.cri-containerd.sandbox.metadata"
CONTAINER_EXT = "io.cri-containerd.container.metadata"
EXT_TYPE = "berth.cri.v1.Metadata"  # JSON inside; opaque to everyone else
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
# ExecSync output cap per stream (CRI asks for 16 MiB: CVE-2022-1708, CVE-2022-31030).
EXEC_OUTPUT_CAP = 16 << 20
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
# How long an exit waits for the container's output to reach its log file.
LOG_DRAIN = 10.0
# Container events held for a watcher that does not read them.
EVENT_BUFFER = 1024
# Waits that should end by themselves; they bound a failure, they never decide one.
KILL_WAIT = 30.0
CAP_SYS_RESOURCE = 24

_log = log.get("cri", namespace=NAMESPACE)


def _now() -> int:
    return time.time_ns()


def _new_id() -> str:
    return secrets.token_hex(32)


def _ext(doc: dict[str, Any]) -> AnyMsg:
    return AnyMsg(type_url=EXT_TYPE, value=json.dumps(doc, sort_keys=True).encode())


def _unext(msg: AnyMsg | None) -> dict[str, Any]:
    try:
        doc = json.loads(msg.value) if msg is not None else {}
    except ValueError:
        doc = {}
    return doc if isinstance(doc, dict) else {}


def _msg_json(msg: betterproto.Message) -> dict[str, Any]:
    return msg.to_pydict(casing=betterproto.Casing.SNAKE)  # type: ignore[no-any-return]


def _match_labels(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _match_id(full: str, want: str) -> bool:
    return not want or full == want or (len(want) >= 4 and full.startswith(want))


@dataclass
class Sandbox:
    id: str
    config: cri.PodSandboxConfig
    handler: str
    runtime_type: str
    created_at: int
    state: int = cri.PodSandboxState.SANDBOX_READY
    folder: str = ""
    host_network: bool = False
    netns: str = ""
    ip: str = ""
    network: str = ""

    @property
    def view(self) -> cri_spec.PodView:
        return cri_spec.PodView(self.id, self.config, self.folder, self.host_network,
                                self.netns)

    @property
    def name(self) -> str:
        m = self.config.metadata
        return f"{m.name}_{m.namespace}_{m.uid}_{m.attempt}"

    def to_doc(self) -> dict[str, Any]:
        return {"config": _msg_json(self.config), "handler": self.handler,
                "runtime_type": self.runtime_type, "created_at": self.created_at,
                "state": int(self.state), "folder": self.folder,
                "host_network": self.host_network, "netns": self.netns, "ip": self.ip,
                "network": self.network}

    @classmethod
    def from_doc(cls, sid: str, doc: dict[str, Any]) -> Sandbox:
        return cls(sid, cri.PodSandboxConfig().from_pydict(doc.get("config") or {}),
                   doc.get("handler", ""), doc.get("runtime_type", ""),
                   int(doc.get("created_at", 0)), int(doc.get("state", 1)),
                   doc.get("folder", ""), bool(doc.get("host_network", False)),
                   doc.get("netns", ""), doc.get("ip", ""), doc.get("network", ""))


@dataclass
class Status:
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    pid: int = 0
    reason: str = ""
    message: str = ""


@dataclass
class CRIContainer:
    id: str
    sandbox_id: str
    config: cri.ContainerConfig
    image_id: str
    image_ref: str
    log_path: str
    folder: str
    status: Status = field(default_factory=Status)
    stop_signal: str = "SIGTERM"
    # Not persisted: what a running container has in berthd.
    exited: trio.Event = field(default_factory=trio.Event)
    log_file: logs.LogFile | None = None
    copiers: int = 0
    logs_done: trio.Event = field(default_factory=trio.Event)

    @property
    def state(self) -> int:
        if self.status.finished_at:
            return cri.ContainerState.CONTAINER_EXITED
        if self.status.started_at:
            return cri.ContainerState.CONTAINER_RUNNING
        return cri.ContainerState.CONTAINER_CREATED

    def to_doc(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "config": _msg_json(self.config),
                "image_id": self.image_id, "image_ref": self.image_ref,
                "log_path": self.log_path, "folder": self.folder,
                "status": asdict(self.status), "stop_signal": self.stop_signal}

    @classmethod
    def from_doc(cls, cid: str, doc: dict[str, Any]) -> CRIContainer:
        st = doc.get("status") or {}
        return cls(cid, doc.get("sandbox_id", ""),
                   cri.ContainerConfig().from_pydict(doc.get("config") or {}),
                   doc.get("image_id", ""), doc.get("image_ref", ""), doc.get("log_path", ""),
                   doc.get("folder", ""),
                   Status(**{k: v for k, v in st.items() if k in Status.__dataclass_fields__}),
                   doc.get("stop_signal", "SIGTERM"))


def _serialized(field_name: str) -> Any:
    """One call at a time per pod or container (``field_name`` of the request names it):
    the kubelet may stop and remove the same container at once."""
    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        async def call(self: PodService, ctx: CallContext, req: Any) -> Any:
            async with self._lock(getattr(req, field_name)):
                return await fn(self, ctx, req)
        return call
    return wrap


class PodService(RuntimeBase):
    """RuntimeService: pods and containers (with Version and Status from RuntimeBase)."""

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
        self.sandboxes: dict[str, Sandbox] = {}
        self.containers: dict[str, CRIContainer] = {}
        self._names: dict[str, str] = {}  # reserved pod and container names -> id
        self._locks: dict[str, trio.Lock] = {}
        self._watchers: set[trio.MemorySendChannel[cri.ContainerEventResponse]] = set()
        self.oom = cri_spec.OOMPolicy(cri_spec.own_oom_score_adj(),
                                      config.restrict_oom_score_adj,
                                      cri_spec.can_raise_oom_priority())

    # --- records ----------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: what berthd recorded, and what a berthd killed half way
        through a call left without a record (pins, folders, a pod's network, a task
        never reported started) undone, so nothing leaks and every call can be retried."""
        self.load()
        for kind, table in (("sandboxes", self.sandboxes), ("containers", self.containers)):
            folder = self.state / kind
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                if name not in table:
                    _log.info("removing what an interrupted call left", kind=kind, id=name)
                    await trio.to_thread.run_sync(self._remove_sandbox_files, folder / name)
        if self.networks is not None:
            for a in self.networks.store.list(NAMESPACE):
                if not a.container and _is_id(a.id) and a.id not in self.sandboxes:
                    _log.info("detaching the network of an unrecorded pod", id=a.id)
                    try:
                        await self.networks.detach(NAMESPACE, a.id)
                    except errdefs.BerthError as e:
                        _log.error("pod network teardown failed", id=a.id, error=str(e))
        for ctr in list(self.containers.values()):
            if ctr.state == cri.ContainerState.CONTAINER_CREATED \
                    and self.tasks.get(NAMESPACE, ctr.id) is not None:
                # Died in StartContainer after the task was made: back to created.
                task = self.tasks.get(NAMESPACE, ctr.id)
                try:
                    await task.kill(signal.SIGKILL, all=True)
                except errdefs.BerthError:
                    pass
                await self._delete_task(ctr)

    def load(self) -> None:
        """The sandboxes and containers berthd recorded (after a restart)."""
        for c in self.store.list(NAMESPACE, [f'labels."{KIND_LABEL}"==sandbox']):
            sb = Sandbox.from_doc(c.id, _unext(c.extensions.get(SANDBOX_EXT)))
            self.sandboxes[sb.id] = sb
            self._names[sb.name] = sb.id
        for c in self.store.list(NAMESPACE, [f'labels."{KIND_LABEL}"==container']):
            ctr = CRIContainer.from_doc(c.id, _unext(c.extensions.get(CONTAINER_EXT)))
            self.containers[ctr.id] = ctr
            self._names[self._container_name(ctr)] = ctr.id
            if ctr.state == cri.ContainerState.CONTAINER_RUNNING:
                task = self.tasks.get(NAMESPACE, ctr.id)
                if task is None:
                    ctr.status.finished_at = ctr.status.finished_at or _now()
                    ctr.status.exit_code, ctr.status.reason = 255, "Unknown"
                    self._save_container(ctr)
                    ctr.exited.set()
                else:
                    self._reattach_logs(ctr)
                    self.nursery.start_soon(self._monitor, ctr)

    def _reattach_logs(self, ctr: CRIContainer) -> None:
        """After a restart: read the running container's FIFOs again (its shim kept
        them open, so what the container wrote meanwhile waits in the pipe)."""
        ctr.log_file = logs.LogFile(Path(ctr.log_path) if ctr.log_path else None)
        for name, stream in (("stdout", logs.STDOUT), ("stderr", logs.STDERR)):
            path = Path(ctr.folder) / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                _log.warning("container log not reattached", id=ctr.id, stream=stream,
                             error=str(e))
                continue
            self._copy(ctr, trio.lowlevel.FdStream(fd), stream)

    def _copy(self, ctr: CRIContainer, src: trio.lowlevel.FdStream, stream: str) -> None:
        """Copy one stream into the container's log; the last copier to end says so."""
        assert ctr.log_file is not None
        ctr.copiers += 1
        sink = ctr.log_file.write
        max_line = self.config.max_container_log_line_size

        async def run() -> None:
            try:
                await logs.copy_stream(src, stream, sink, max_line, _now)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                _log.warning("container log copy ended", id=ctr.id, stream=stream,
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
            hits = [k for k in table if _match_id(k, wanted)] if wanted else []
            if len(hits) == 1:
                key = hits[0]
                break
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = trio.Lock()
        return lock

    def _save_sandbox(self, sb: Sandbox) -> None:
        self.store.update(NAMESPACE, Container(id=sb.id, extensions={
            SANDBOX_EXT: _ext(sb.to_doc())}), [f"extensions.{SANDBOX_EXT}"])

    def _save_container(self, ctr: CRIContainer) -> None:
        self.store.update(NAMESPACE, Container(id=ctr.id, extensions={
            CONTAINER_EXT: _ext(ctr.to_doc())}), [f"extensions.{CONTAINER_EXT}"])

    def _sandbox(self, sid: str) -> Sandbox:
        return _lookup(self.sandboxes, sid, "sandbox")

    def _container(self, cid: str) -> CRIContainer:
        return _lookup(self.containers, cid, "container")

    def _container_name(self, ctr: CRIContainer) -> str:
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
        if self.config.sandbox_mode != "pinned":
            raise errdefs.NotImplemented_(
                f"sandbox_mode {self.config.sandbox_mode!r} (a sandbox container from "
                "sandbox_image) is not implemented yet; use \"pinned\"", raw=True)
        ns_opts = config.linux.security_context.namespace_options \
            if config.linux and config.linux.security_context else None
        host_net = bool(ns_opts and ns_opts.network == cri.NamespaceMode.NODE)
        network = "" if host_net else self.pod_network()
        if len(config.hostname) > 64 or not _HOSTNAME.fullmatch(config.hostname or "x"):
            raise errdefs.InvalidArgument(f"invalid pod hostname {config.hostname!r}",
                                          raw=True)
        if config.log_directory and not config.log_directory.startswith("/"):
            raise errdefs.InvalidArgument(
                f"log directory {config.log_directory!r} must be absolute", raw=True)
        sb = Sandbox(_new_id(), config, req.runtime_handler, runtime.runtime_type, _now(),
                     host_network=host_net, network=network)
        if sb.name in self._names:
            raise errdefs.AlreadyExists(
                f"failed to reserve sandbox name {sb.name!r}: name is reserved for "
                f"{self._names[sb.name]!r}", raw=True)
        self._names[sb.name] = sb.id
        folder = self.state / "sandboxes" / sb.id
        sb.folder = str(folder)
        try:
            await trio.to_thread.run_sync(self._sandbox_files, sb, folder)
            if network:
                await self._attach(sb)
            spec = oci.default_unix_spec(NAMESPACE, sb.id)
            self.store.create(NAMESPACE, Container(
                id=sb.id, runtime_name=runtime.runtime_type, spec=oci.to_any(spec),
                labels={**config.labels, KIND_LABEL: "sandbox"},
                extensions={SANDBOX_EXT: _ext(sb.to_doc())}))
        except BaseException:
            with trio.CancelScope(shield=True):
                if network:
                    await self._detach(sb, quiet=True)
                await trio.to_thread.run_sync(self._remove_sandbox_files, folder)
            del self._names[sb.name]
            raise
        self.sandboxes[sb.id] = sb
        _log.info("sandbox ready", id=sb.id, pod=sb.name, handler=req.runtime_handler)
        self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        return cri.RunPodSandboxResponse(pod_sandbox_id=sb.id)

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

    async def _attach(self, sb: Sandbox) -> None:
        from berth.core.networks.types import PortMapping

        ports = [PortMapping(host_port=p.host_port, container_port=p.container_port,
                             protocol=cri.Protocol(p.protocol).name.lower(),
                             host_ip=p.host_ip)
                 for p in sb.config.port_mappings if p.host_port > 0]
        att = await self.networks.attach(NAMESPACE, sb.id, sb.network, ports=ports,
                                         ifname="eth0")
        sb.netns = att.netns
        addresses = att.result.addresses() if att.result else []
        sb.ip = addresses[0].split("/", 1)[0] if addresses else ""

    async def _detach(self, sb: Sandbox, *, quiet: bool = False) -> None:
        if self.networks is None or sb.host_network:
            return
        try:
            await self.networks.detach(NAMESPACE, sb.id)
        except errdefs.BerthError as e:
            if not quiet:
                raise
            _log.error("pod network teardown failed", id=sb.id, error=str(e))

    def _sandbox_files(self, sb: Sandbox, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o711)
        hostname = sb.config.hostname or (os.uname().nodename if sb.host_network else "")
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
        shutil.rmtree(folder, ignore_errors=True)

    @_serialized("pod_sandbox_id")
    async def stop_pod_sandbox(self, ctx: CallContext, req: cri.StopPodSandboxRequest
                               ) -> cri.StopPodSandboxResponse:
        sb = self._sandbox(req.pod_sandbox_id)
        for ctr in [c for c in self.containers.values() if c.sandbox_id == sb.id]:
            async with self._lock(ctr.id):
                await self._stop(ctr, 0)
        await self._detach(sb)
        if sb.state != cri.PodSandboxState.SANDBOX_NOTREADY:
            await trio.to_thread.run_sync(pins.remove, Path(sb.folder))
            sb.state = cri.PodSandboxState.SANDBOX_NOTREADY
            self._save_sandbox(sb)
            _log.info("sandbox stopped", id=sb.id, pod=sb.name)
            self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)
        return cri.StopPodSandboxResponse()

    @_serialized("pod_sandbox_id")
    async def remove_pod_sandbox(self, ctx: CallContext, req: cri.RemovePodSandboxRequest
                                 ) -> cri.RemovePodSandboxResponse:
        try:
            sb = self._sandbox(req.pod_sandbox_id)
        except errdefs.NotFound:
            return cri.RemovePodSandboxResponse()  # idempotent, as the API asks
        for ctr in [c for c in self.containers.values() if c.sandbox_id == sb.id]:
            async with self._lock(ctr.id):
                await self._remove(ctr)
        await self._detach(sb)
        await trio.to_thread.run_sync(self._remove_sandbox_files, Path(sb.folder))
        try:
            self.store.delete(NAMESPACE, sb.id)
        except errdefs.NotFound:
            pass
        self.sandboxes.pop(sb.id, None)
        self._names.pop(sb.name, None)
        self._locks.pop(sb.id, None)
        _log.info("sandbox removed", id=sb.id, pod=sb.name)
        self._event(sb.id, sb, cri.ContainerEventType.CONTAINER_DELETED_EVENT)
        return cri.RemovePodSandboxResponse()

    def _sandbox_status(self, sb: Sandbox) -> cri.PodSandboxStatus:
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
            status=self._sandbox_status(sb), timestamp=_now(),
            containers_statuses=[self._status(c) for c in self.containers.values()
                                 if c.sandbox_id == sb.id])
        if req.verbose:
            out.info = {"info": json.dumps({
                "config": _msg_json(sb.config), "runtimeHandler": sb.handler,
                "runtimeType": sb.runtime_type, "sandboxMode": self.config.sandbox_mode,
                "hostNetwork": sb.host_network, "network": sb.network, "netns": sb.netns,
                "namespaces": {k: str(v) for k, v in pins.paths(Path(sb.folder)).items()},
            })}
        return out

    def list_pod_sandbox(self, ctx: CallContext, req: cri.ListPodSandboxRequest
                         ) -> cri.ListPodSandboxResponse:
        f = cri_spec.given(req.filter, cri.PodSandboxFilter)
        out = []
        for sb in sorted(self.sandboxes.values(), key=lambda s: s.created_at):
            if not _match_id(sb.id, f.id):
                continue
            if f.state is not None and betterproto.serialized_on_wire(f.state) \
                    and sb.state != f.state.state:
                continue
            if not _match_labels(dict(sb.config.labels), dict(f.label_selector)):
                continue
            out.append(cri.PodSandbox(
                id=sb.id, metadata=sb.config.metadata, state=cri.PodSandboxState(sb.state),
                created_at=sb.created_at, labels=dict(sb.config.labels),
                annotations=dict(sb.config.annotations), runtime_handler=sb.handler))
        return cri.ListPodSandboxResponse(items=out)

    # --- containers -------------------------------------------------------------------

    @_serialized("pod_sandbox_id")
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
        ctr = CRIContainer(_new_id(), sb.id, config, image.id,
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
        ctr.status.created_at = _now()
        prepared = False
        try:
            if sn is None:
                raise errdefs.FailedPrecondition(
                    f"snapshotter {self.config.snapshotter!r} is not loaded", raw=True)
            mounts = await sn.prepare(NAMESPACE, ctr.id, image.chain_id)
            prepared = True
            spec = await trio.to_thread.run_sync(
                cri_spec.container_spec, sb.view, ctr.id, config, image.resolved.config.raw,
                image_user(image.resolved), mounts, self.oom)
            runtime = self.config.runtime(sb.handler)
            self.store.create(NAMESPACE, Container(
                id=ctr.id, runtime_name=runtime.runtime_type,
                runtime_options=_runtime_options(runtime.options),
                spec=oci.to_any(spec), image=image.id,
                labels={**config.labels, KIND_LABEL: "container"},
                snapshotter=self.config.snapshotter, snapshot_key=ctr.id,
                extensions={CONTAINER_EXT: _ext(ctr.to_doc())}))
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except BaseException:
            with trio.CancelScope(shield=True):
                if prepared and sn is not None:
                    try:
                        await sn.remove(NAMESPACE, ctr.id)
                    except errdefs.BerthError as e:
                        _log.warning("snapshot left", id=ctr.id, error=str(e))
                shutil.rmtree(folder, ignore_errors=True)
            del self._names[name]
            raise
        self.containers[ctr.id] = ctr
        _log.info("container created", id=ctr.id, sandbox=sb.id, name=config.metadata.name)
        self._event(ctr.id, sb, cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        return cri.CreateContainerResponse(container_id=ctr.id)

    @_serialized("container_id")
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
        sn = self.stores.snapshotters[record.snapshotter]
        rootfs = [ApiMount(type=m.type, source=m.source, options=list(m.options))
                  for m in await sn.mounts(NAMESPACE, ctr.id)]
        folder = Path(ctr.folder)
        out_path, err_path = folder / "stdout", folder / "stderr"
        for p in (out_path, err_path):
            logs.make_fifo(p)
        log_file = logs.LogFile(Path(ctr.log_path) if ctr.log_path else None)
        readers, keepers = [], []
        try:
            for p in (out_path, err_path):
                r, k = logs.open_fifo(p)
                readers.append(r)
                keepers.append(k)
            task = await self.tasks.create(NAMESPACE, ctr.id, CreateOpts(
                spec=record.spec, runtime=record.runtime_name, rootfs=rootfs,
                stdout=str(out_path), stderr=str(err_path) if not ctr.config.tty else "",
                terminal=bool(ctr.config.tty), runtime_options=record.runtime_options))
            try:
                ctr.status.pid = await task.start()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._delete_task(ctr)
                raise
        except BaseException:
            for r in readers:
                await r.aclose()
            log_file.close()
            raise
        finally:
            for k in keepers:
                os.close(k)
        ctr.log_file = log_file
        ctr.status.started_at = _now()
        self._save_container(ctr)
        for r, stream in zip(readers, (logs.STDOUT, logs.STDERR), strict=True):
            self._copy(ctr, r, stream)
        self.nursery.start_soon(self._monitor, ctr)
        _log.info("container started", id=ctr.id, pid=ctr.status.pid)
        self._event(ctr.id, sb, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        return cri.StartContainerResponse()

    async def _monitor(self, ctr: CRIContainer) -> None:
        """Wait for the container's exit; record it; delete the task."""
        task = self.tasks.get(NAMESPACE, ctr.id)
        status = 255
        if task is not None:
            try:
                status = (await task.wait()).status
            except errdefs.BerthError as e:
                _log.warning("wait for container failed", id=ctr.id, error=str(e))
        finished = _now()
        with trio.CancelScope(shield=True):
            await self._delete_task(ctr)  # the shim lets go of the FIFOs
        if ctr.log_file is not None:
            # What the container wrote belongs in its log before it shows as exited: the
            # copies drain first, a bounded while (a child it left may hold the pipe).
            with trio.move_on_after(LOG_DRAIN):
                await ctr.logs_done.wait()
            ctr.log_file.close()
        ctr.status.finished_at = finished
        ctr.status.exit_code = status
        ctr.status.reason = "Completed" if status == 0 else "Error"
        if self._oom_killed(ctr):
            ctr.status.reason = "OOMKilled"
        try:
            self._save_container(ctr)
        except errdefs.NotFound:
            pass  # removed meanwhile
        ctr.exited.set()
        _log.info("container exited", id=ctr.id, exit_code=status, reason=ctr.status.reason)
        self._event(ctr.id, self.sandboxes.get(ctr.sandbox_id),
                    cri.ContainerEventType.CONTAINER_STOPPED_EVENT)

    def _oom_killed(self, ctr: CRIContainer) -> bool:
        return False  # TODO(cri): read the task's OOM events (issue 12, left for later)

    async def _delete_task(self, ctr: CRIContainer) -> None:
        if self.tasks.get(NAMESPACE, ctr.id) is None:
            return
        try:
            await self.tasks.delete(NAMESPACE, ctr.id)
        except errdefs.BerthError as e:
            _log.warning("task delete failed", id=ctr.id, error=str(e))

    async def _stop(self, ctr: CRIContainer, timeout: int) -> None:
        if ctr.state != cri.ContainerState.CONTAINER_RUNNING:
            return
        task = self.tasks.get(NAMESPACE, ctr.id)
        if task is None:
            return
        if timeout > 0:
            sig = _signal_number(ctr.stop_signal)
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
            with trio.move_on_after(KILL_WAIT):
                await ctr.exited.wait()
            if not ctr.exited.is_set():
                raise errdefs.DeadlineExceeded(
                    f"container {ctr.id} did not exit {KILL_WAIT:.0f}s after SIGKILL",
                    raw=True)

    @_serialized("container_id")
    async def stop_container(self, ctx: CallContext, req: cri.StopContainerRequest
                             ) -> cri.StopContainerResponse:
        await self._stop(self._container(req.container_id), int(req.timeout))
        return cri.StopContainerResponse()

    async def _remove(self, ctr: CRIContainer) -> None:
        await self._stop(ctr, 0)
        await self._delete_task(ctr)
        record = None
        try:
            record = self.store.get(NAMESPACE, ctr.id)
        except errdefs.NotFound:
            pass
        if record is not None and record.snapshot_key:
            sn = self.stores.snapshotters.get(record.snapshotter)
            if sn is not None:
                try:
                    await sn.remove(NAMESPACE, record.snapshot_key)
                except errdefs.NotFound:
                    pass
        try:
            self.store.delete(NAMESPACE, ctr.id)
        except errdefs.NotFound:
            pass
        shutil.rmtree(ctr.folder, ignore_errors=True)
        self.containers.pop(ctr.id, None)
        self._names.pop(self._container_name(ctr), None)
        self._locks.pop(ctr.id, None)
        _log.info("container removed", id=ctr.id)
        self._event(ctr.id, self.sandboxes.get(ctr.sandbox_id),
                    cri.ContainerEventType.CONTAINER_DELETED_EVENT)

    @_serialized("container_id")
    async def remove_container(self, ctx: CallContext, req: cri.RemoveContainerRequest
                               ) -> cri.RemoveContainerResponse:
        try:
            ctr = self._container(req.container_id)
        except errdefs.NotFound:
            return cri.RemoveContainerResponse()  # idempotent, as the API asks
        await self._remove(ctr)
        return cri.RemoveContainerResponse()

    def _cri_container(self, ctr: CRIContainer) -> cri.Container:
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
            if not _match_id(ctr.id, f.id) or not _match_id(ctr.sandbox_id, f.pod_sandbox_id):
                continue
            if f.state is not None and betterproto.serialized_on_wire(f.state) \
                    and ctr.state != f.state.state:
                continue
            if not _match_labels(dict(ctr.config.labels), dict(f.label_selector)):
                continue
            out.append(self._cri_container(ctr))
        return cri.ListContainersResponse(containers=out)

    def _status(self, ctr: CRIContainer) -> cri.ContainerStatus:
        st = ctr.status
        linux = cri_spec.given(ctr.config.linux, cri.LinuxContainerConfig)
        return cri.ContainerStatus(
            id=ctr.id, metadata=ctr.config.metadata, state=cri.ContainerState(ctr.state),
            created_at=st.created_at, started_at=st.started_at, finished_at=st.finished_at,
            exit_code=st.exit_code, image=ctr.config.image, image_ref=ctr.image_ref,
            reason=st.reason, message=st.message, labels=dict(ctr.config.labels),
            annotations=dict(ctr.config.annotations), mounts=list(ctr.config.mounts),
            log_path=ctr.log_path, image_id=ctr.image_id,
            resources=cri.ContainerResources(linux=linux.resources)
            if linux.resources else None)

    def container_status(self, ctx: CallContext, req: cri.ContainerStatusRequest
                         ) -> cri.ContainerStatusResponse:
        ctr = self._container(req.container_id)
        st = ctr.status
        status = self._status(ctr)
        out = cri.ContainerStatusResponse(status=status)
        if req.verbose:
            out.info = {"info": json.dumps({
                "sandboxID": ctr.sandbox_id, "pid": st.pid, "config": _msg_json(ctr.config),
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
                        nursery.start_soon(_collect, r, buf, EXEC_OUTPUT_CAP)
                    readers = []
                    try:
                        # Our writing ends go once the shim holds its own: a shim may open
                        # an exec's FIFOs at Exec or only at Start.
                        try:
                            await task.exec(exec_id, stdin="", stdout=str(paths[0]),
                                            stderr=str(paths[1]), terminal=False,
                                            spec=oci.process_any(process))
                            with self.tasks.primer.starting():
                                await task.start(exec_id)
                        finally:
                            for k in keepers:
                                os.close(k)
                            keepers = []
                        exit_ = await self._wait_exec(task, exec_id, req.timeout)
                    finally:
                        with trio.CancelScope(shield=True):
                            try:
                                await task.delete(exec_id)
                            except errdefs.BerthError as e:
                                _log.debug("exec delete", id=ctr.id, exec_id=exec_id,
                                           error=str(e))
            except BaseExceptionGroup as group:
                raise first_error(group) from None
        finally:
            for k in keepers:
                os.close(k)
            for r in readers:
                await r.aclose()
            shutil.rmtree(folder, ignore_errors=True)
        return cri.ExecSyncResponse(stdout=bytes(outputs[0]), stderr=bytes(outputs[1]),
                                    exit_code=exit_)

    async def _wait_exec(self, task: Any, exec_id: str, timeout: int) -> int:
        if timeout <= 0:
            return (await task.wait(exec_id)).status
        with trio.move_on_after(timeout):
            return (await task.wait(exec_id)).status
        try:
            await task.kill(signal.SIGKILL, exec_id=exec_id)
        except errdefs.BerthError:
            pass
        with trio.move_on_after(KILL_WAIT):
            await task.wait(exec_id)
        raise errdefs.DeadlineExceeded(f"command timed out after {timeout}s", raw=True)

    # --- events (the kubelet's evented PLEG) -----------------------------------------

    def _event(self, cid: str, sb: Sandbox | None, kind: cri.ContainerEventType) -> None:
        if not self._watchers:
            return
        statuses = []
        if sb is not None:
            statuses = [self._status(c) for c in self.containers.values()
                        if c.sandbox_id == sb.id]
        msg = cri.ContainerEventResponse(
            container_id=cid, container_event_type=kind, created_at=_now(),
            pod_sandbox_status=self._sandbox_status(sb) if sb is not None else None,
            containers_statuses=statuses)
        for w in list(self._watchers):
            try:
                w.send_nowait(msg)
            except trio.WouldBlock:
                # A watcher this far behind has lost events: end its stream, as
                # containerd drops them; the kubelet then relists.
                _log.warning("container event watcher too slow; dropped")
                self._watchers.discard(w)
                w.close()
            except trio.ClosedResourceError:
                self._watchers.discard(w)

    async def get_container_events(self, ctx: CallContext, req: cri.GetEventsRequest,
                                   send: Any) -> None:
        tx, rx = trio.open_memory_channel[cri.ContainerEventResponse](EVENT_BUFFER)
        self._watchers.add(tx)
        try:
            async with rx:
                async for msg in rx:
                    await send(msg)
        finally:
            self._watchers.discard(tx)
            tx.close()

    # --- stats ------------------------------------------------------------------------

    async def _container_stats(self, ctr: CRIContainer) -> cri.ContainerStats:
        now = _now()
        try:
            record = self.store.get(NAMESPACE, ctr.id)
        except errdefs.NotFound:
            record = None
        running = record is not None and ctr.state == cri.ContainerState.CONTAINER_RUNNING
        raw = await trio.to_thread.run_sync(
            cri_stats.read, _cgroups_path(record), ctr.id) if running else {}
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
                _log.debug("snapshot usage", id=ctr.id, error=str(e))
        return cri.ContainerStats(
            attributes=cri.ContainerAttributes(
                id=ctr.id, metadata=ctr.config.metadata, labels=dict(ctr.config.labels),
                annotations=dict(ctr.config.annotations)),
            cpu=cpu, memory=memory, writable_layer=layer)

    async def container_stats(self, ctx: CallContext, req: cri.ContainerStatsRequest
                              ) -> cri.ContainerStatsResponse:
        ctr = self._container(req.container_id)
        return cri.ContainerStatsResponse(stats=await self._container_stats(ctr))

    async def list_container_stats(self, ctx: CallContext,
                                   req: cri.ListContainerStatsRequest
                                   ) -> cri.ListContainerStatsResponse:
        f = cri_spec.given(req.filter, cri.ContainerStatsFilter)
        out = []
        for ctr in list(self.containers.values()):
            if not _match_id(ctr.id, f.id) or not _match_id(ctr.sandbox_id, f.pod_sandbox_id):
                continue
            if not _match_labels(dict(ctr.config.labels), dict(f.label_selector)):
                continue
            if ctr.state == cri.ContainerState.CONTAINER_RUNNING:
                out.append(await self._container_stats(ctr))
        return cri.ListContainerStatsResponse(stats=out)

    async def _pod_stats(self, sb: Sandbox) -> cri.PodSandboxStats:
        now = _now()
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
        sb = self._sandbox(req.pod_sandbox_id)
        return cri.PodSandboxStatsResponse(stats=await self._pod_stats(sb))

    async def list_pod_sandbox_stats(self, ctx: CallContext,
                                     req: cri.ListPodSandboxStatsRequest
                                     ) -> cri.ListPodSandboxStatsResponse:
        f = cri_spec.given(req.filter, cri.PodSandboxStatsFilter)
        out = [await self._pod_stats(sb) for sb in list(self.sandboxes.values())
               if _match_id(sb.id, f.id)
               and _match_labels(dict(sb.config.labels), dict(f.label_selector))]
        return cri.ListPodSandboxStatsResponse(stats=out)

    @_serialized("container_id")
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
            await task.update(AnyMsg(type_url=RESOURCES_TYPE_URL,
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


def _is_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _lookup(table: dict[str, Any], wanted: str, what: str) -> Any:
    """By full id, or by a unique prefix of 4 characters or more (as crictl allows)."""
    if wanted in table:
        return table[wanted]
    hits = [v for k, v in table.items() if _match_id(k, wanted)] if wanted else []
    if len(hits) == 1:
        return hits[0]
    raise errdefs.NotFound(f"an error occurred when try to find {what} {wanted!r}: "
                           "not found", raw=True)


def _cgroups_path(record: Container) -> str:
    spec = oci.from_any(record.spec) if record.spec is not None else {}
    return str((spec.get("linux") or {}).get("cgroupsPath") or "")


async def _collect(src: trio.lowlevel.FdStream, buf: bytearray, cap: int) -> None:
    async with src:
        while True:
            data = await src.receive_some(logs.READ_SIZE)
            if not data:
                return
            room = cap - len(buf)
            if room > 0:
                buf += data[:room]


def _signal_number(name: str) -> int:
    try:
        return int(name)
    except ValueError:
        pass
    name = name.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        return int(signal.SIGTERM)


def _runtime_options(options: dict[str, Any]) -> AnyMsg | None:
    if not options:
        return None
    msg = RuncOptions(
        binary_name=options.get("BinaryName", ""), root=options.get("Root", ""),
        systemd_cgroup=bool(options.get("SystemdCgroup", False)),
        no_pivot_root=bool(options.get("NoPivotRoot", False)),
        no_new_keyring=bool(options.get("NoNewKeyring", False)),
        shim_cgroup=options.get("ShimCgroup", ""), io_uid=int(options.get("IoUid", 0)),
        io_gid=int(options.get("IoGid", 0)), criu_path=options.get("CriuPath", ""),
        criu_image_path=options.get("CriuImagePath", ""),
        criu_work_path=options.get("CriuWorkPath", ""))
    return AnyMsg(type_url=RUNC_OPTIONS_TYPE, value=bytes(msg))
