"""What a plugin declares, and what its init receives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import trio

    from berth.core.plugin.graph import PluginSet


class SkipPlugin(Exception):
    """Raised by an init that does not apply here (shown as "skip", not as an error)."""


# containerd's plugin types, for the built-ins and for plugin authors.
CONTENT = "io.containerd.content.v1"
EVENT = "io.containerd.event.v1"
GC = "io.containerd.gc.v1"
GRPC = "io.containerd.grpc.v1"
TTRPC = "io.containerd.ttrpc.v1"
INTERNAL = "io.containerd.internal.v1"
LEASE = "io.containerd.lease.v1"
METADATA = "io.containerd.metadata.v1"
RUNTIME_V2 = "io.containerd.runtime.v2"
SERVICE = "io.containerd.service.v1"
SNAPSHOTTER = "io.containerd.snapshotter.v1"
DIFFER = "io.containerd.differ.v1"
NETWORK = "io.berth.network.v1"
# An OCI runtime the shim can run containers with (see berth.core.shim.runtimes).
OCI_RUNTIME = "io.berth.oci-runtime.v1"

ALL = "*"


@dataclass
class Registration:
    type: str
    id: str
    init: Callable[[InitContext], Awaitable[Any]]
    requires: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"{self.type}.{self.id}"


@dataclass
class InitContext:
    """Everything an init may use; plugins own nothing outside their root and state."""

    registration: Registration
    root: Path
    state: Path
    config: dict[str, Any]
    daemon_config: Any
    plugins: PluginSet
    nursery: trio.Nursery
    exports: dict[str, str] = field(default_factory=dict)
    platforms: list[tuple[str, str, str]] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
