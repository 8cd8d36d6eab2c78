"""What the CRI plugin records of pods and containers (as JSON in an extension of
their berth containers), and the small helpers its services share."""

from __future__ import annotations

import functools
import json
import re
import secrets
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import betterproto
import trio
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, log
from berth.core.api.containerd.runc.v1 import Options as RuncOptions
from berth.core.api.runtime import v1 as cri
from berth.core.grpc.context import CallContext
from berth.core.metadata.containers import Container
from berth.core.oci import default_spec as oci
from berth.plugins.cri import logs, pidns, spec as cri_spec
from berth.plugins.cri.images import NAMESPACE

KIND_LABEL = "io.cri-containerd.kind"
SANDBOX_EXT = "io.cri-containerd.sandbox.metadata"
CONTAINER_EXT = "io.cri-containerd.container.metadata"
EXT_TYPE = "berth.cri.v1.Metadata"  # JSON inside; opaque to everyone else
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
# ExecSync output cap per stream (CRI asks for 16 MiB: CVE-2022-1708, CVE-2022-31030).
EXEC_OUTPUT_CAP = 16 << 20
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
# How long an exit waits for the container's output to reach its log file.
LOG_DRAIN = 10.0
# Container events held for a watcher that does not read them.
EVENT_BUFFER = 1024
# Waits that should end by themselves; they bound a failure, they never decide one.
KILL_WAIT = 30.0
# An exec's Create and Start, which run to their end even when the caller goes meanwhile:
# the process may run before Start has its pid, and a Kill sent then finds no process.
EXEC_START_TIMEOUT = 60.0

logger = log.get("cri", namespace=NAMESPACE)


def now() -> int:
    return time.time_ns()


def new_id() -> str:
    return secrets.token_hex(32)


def ext(doc: dict[str, Any]) -> AnyMsg:
    return AnyMsg(type_url=EXT_TYPE, value=json.dumps(doc, sort_keys=True).encode())


def unext(msg: AnyMsg | None) -> dict[str, Any]:
    try:
        doc = json.loads(msg.value) if msg is not None else {}
    except ValueError:
        doc = {}
    return doc if isinstance(doc, dict) else {}


def msg_json(msg: betterproto.Message) -> dict[str, Any]:
    # betterproto's Casing members are functions, so Enum leaves them plain functions
    # (what to_pydict calls); its annotation says Casing.
    return msg.to_pydict(casing=betterproto.Casing.SNAKE)  # type: ignore[arg-type]


def match_labels(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def match_id(full: str, want: str) -> bool:
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
    mode: str = "pinned"  # or "pause": a sandbox container holds the namespaces
    infra_pid: int = 0
    # PID 1 of the pod's shared PID namespace (plugins/cri/pidns), 0 when it has none.
    pid_holder: int = 0

    @property
    def view(self) -> cri_spec.PodView:
        return cri_spec.PodView(self.id, self.config, self.folder, self.host_network,
                                self.netns, self.infra_pid if self.mode == "pause" else 0,
                                str(pidns.pin_path(self.folder)) if self.pid_holder else "")

    @property
    def shares_pid(self) -> bool:
        """Whether the pod asks for one PID namespace for all its containers."""
        lsc = self.config.linux.security_context if self.config.linux else None
        opts = lsc.namespace_options if lsc else None
        # POD is the enum's zero: a pod that says nothing shares, as with containerd.
        return (opts.pid if opts else cri.NamespaceMode.POD) == cri.NamespaceMode.POD

    @property
    def name(self) -> str:
        m = self.config.metadata
        return f"{m.name}_{m.namespace}_{m.uid}_{m.attempt}"

    def to_doc(self) -> dict[str, Any]:
        return {"config": msg_json(self.config), "handler": self.handler,
                "runtime_type": self.runtime_type, "created_at": self.created_at,
                "state": int(self.state), "folder": self.folder,
                "host_network": self.host_network, "netns": self.netns, "ip": self.ip,
                "network": self.network, "mode": self.mode, "infra_pid": self.infra_pid,
                "pid_holder": self.pid_holder}

    @classmethod
    def from_doc(cls, sid: str, doc: dict[str, Any]) -> Sandbox:
        return cls(sid, cri.PodSandboxConfig().from_pydict(doc.get("config") or {}),
                   doc.get("handler", ""), doc.get("runtime_type", ""),
                   int(doc.get("created_at", 0)), int(doc.get("state", 1)),
                   doc.get("folder", ""), bool(doc.get("host_network", False)),
                   doc.get("netns", ""), doc.get("ip", ""), doc.get("network", ""),
                   doc.get("mode", "pinned"), int(doc.get("infra_pid", 0)),
                   int(doc.get("pid_holder", 0)))


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
    # The live container's stdio for CRI Attach (streaming.attach.AttachHub).
    attach_hub: Any = None

    @property
    def state(self) -> int:
        if self.status.finished_at:
            return cri.ContainerState.CONTAINER_EXITED
        if self.status.started_at:
            return cri.ContainerState.CONTAINER_RUNNING
        return cri.ContainerState.CONTAINER_CREATED

    def to_doc(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "config": msg_json(self.config),
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


def serialized(field_name: str) -> Any:
    """One call at a time per pod or container (``field_name`` of the request names it):
    the kubelet may stop and remove the same container at once."""
    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        async def call(self: Any, ctx: CallContext, req: Any) -> Any:
            async with self._lock(getattr(req, field_name)):
                return await fn(self, ctx, req)
        return call
    return wrap

def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error a nursery failed with (the others are the cancellations it caused)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def is_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def lookup(table: dict[str, Any], wanted: str, what: str) -> Any:
    """By full id, or by a unique prefix of 4 characters or more (as crictl allows)."""
    if wanted in table:
        return table[wanted]
    hits = [v for k, v in table.items() if match_id(k, wanted)] if wanted else []
    if len(hits) == 1:
        return hits[0]
    raise errdefs.NotFound(f"an error occurred when try to find {what} {wanted!r}: "
                           "not found", raw=True)


def cgroups_path(record: Container) -> str:
    spec = oci.from_any(record.spec) if record.spec is not None else {}
    return str((spec.get("linux") or {}).get("cgroupsPath") or "")


async def collect(src: trio.lowlevel.FdStream, buf: bytearray, cap: int) -> None:
    async with src:
        while True:
            data = await src.receive_some(logs.READ_SIZE)
            if not data:
                return
            room = cap - len(buf)
            if room > 0:
                buf += data[:room]


def signal_number(name: str) -> int:
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


def runtime_options(options: dict[str, Any]) -> AnyMsg | None:
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
