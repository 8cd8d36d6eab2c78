"""Container state under the runtime's root directory (like runc's /run/runc/<id>).

``<root>/<id>/state.json`` holds what later calls (from this or another process) need: the
init pid and its start time (to tell a live init from a reused pid), the bundle, the
config as created, and the cgroup directories. ``<root>/<id>/exec.fifo`` exists while the
container is "created": the init blocks opening it until ``start`` reads it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from berth.core import errdefs
from berth.core.oci.spec import validate_id

STATE_FILE = "state.json"
FIFO = "exec.fifo"


@dataclass
class ContainerState:
    id: str
    pid: int
    pid_start: int
    bundle: str
    created: str  # ISO 8601, UTC
    config: dict[str, Any]
    cgroup: dict[str, Any]
    annotations: dict[str, str] = field(default_factory=dict)


class StateStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ensure_root(self) -> None:
        # 0711: a container's user (maybe unprivileged) reaches exec.fifo by inode only.
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)

    def dir(self, id: str) -> Path:
        return self.root / validate_id(id)

    def fifo(self, id: str) -> Path:
        return self.dir(id) / FIFO

    def create_dir(self, id: str) -> Path:
        self.ensure_root()
        d = self.dir(id)
        try:
            d.mkdir(mode=0o711)
        except FileExistsError:
            raise errdefs.AlreadyExists(f"container {id}") from None
        return d

    def save(self, st: ContainerState) -> None:
        """Replace the state file atomically (readers see the old or the new one).

        No fsync, as runc: the file describes live processes, which a power loss ends
        too, while a crash of this process leaves the written data in the page cache.
        """
        d = self.dir(st.id)
        tmp = d / (STATE_FILE + ".tmp")
        # A shallow dict: asdict() would deep-copy the whole OCI config first.
        data = json.dumps({f.name: getattr(st, f.name) for f in fields(st)},
                          separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, d / STATE_FILE)

    def load(self, id: str) -> ContainerState:
        try:
            raw = (self.dir(id) / STATE_FILE).read_bytes()
        except FileNotFoundError:
            raise errdefs.NotFound(f"container {id}") from None
        try:
            return ContainerState(**json.loads(raw))
        except (ValueError, TypeError):
            # Torn by a power loss (it is not fsynced): its processes are gone as well.
            raise errdefs.NotFound(f"container {id}") from None

    def remove(self, id: str) -> None:
        shutil.rmtree(self.dir(id), ignore_errors=True)

    def list(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if (p / STATE_FILE).exists())
        except FileNotFoundError:
            return []


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rfind(")") + 2:].split()
    return fields[0], int(fields[19])


def alive(pid: int, start: int) -> bool:
    """True while ``pid`` is the same process and has not exited (zombies are dead)."""
    st = proc_stat(pid)
    return st is not None and st[1] == start and st[0] not in ("Z", "X")
