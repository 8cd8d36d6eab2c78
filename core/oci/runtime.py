"""The interface every OCI runtime plugin implements (in-process, runc/crun wrappers).

It follows the OCI runtime's command-line operations (create/start/state/kill/delete) plus
runc's extensions that containerd's shim needs (exec, pause/resume, ps, update, stats).
Errors are ``berth.core.errdefs`` classes: ``NotFound`` for an unknown id, ``AlreadyExists`` for a
reused id, ``FailedPrecondition`` when the container is in the wrong state for the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

STATUSES = ("creating", "created", "running", "paused", "stopped")


class Stdio(NamedTuple):
    """File descriptors dup'ed onto 0/1/2 of a container process (None means /dev/null).

    When the process has a terminal they are unused: the pty master goes to the console
    socket instead.
    """

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


@dataclass
class State:
    id: str
    pid: int
    status: str  # one of STATUSES
    bundle: str
    created: datetime
    annotations: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class OCIRuntime(Protocol):
    async def create(
        self,
        id: str,
        bundle: Path,
        *,
        stdio: Stdio,
        console_socket: str | None = None,
        pid_file: Path | None = None,
    ) -> int:
        """Set the container up; returns the init pid, blocked before exec until start()."""
        ...

    async def start(self, id: str) -> None: ...

    async def state(self, id: str) -> State: ...

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None: ...

    async def delete(self, id: str, *, force: bool = False) -> None: ...

    async def exec(
        self,
        id: str,
        process: dict,
        *,
        stdio: Stdio,
        console_socket: str | None = None,
        pid_file: Path | None = None,
    ) -> int:
        """Start an OCI ``process`` inside the container's namespaces and cgroup; its pid."""
        ...

    async def pause(self, id: str) -> None: ...

    async def resume(self, id: str) -> None: ...

    async def ps(self, id: str) -> list[int]: ...

    async def update(self, id: str, resources: dict) -> None:
        """Apply OCI ``linux.resources`` to the running container."""
        ...

    async def stats(self, id: str) -> dict:
        """cgroup statistics; see ``berth.core.oci.spec.STATS_SHAPE`` for the keys."""
        ...
