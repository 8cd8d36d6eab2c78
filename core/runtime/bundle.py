"""The bundle directory a shim runs in (containerd runtime/v2/bundle.go).

``<state>/<namespace>/<id>`` holds ``config.json`` (the container's OCI spec), an empty
``rootfs`` the shim mounts the task's rootfs on, the shim's ``log`` fifo, its
``address`` and a ``work`` symlink to ``<root>/<namespace>/<id>``, a persistent
scratch directory for the shim. Deletion renames to a dot-name first so that a crash
half-way through leaves nothing a restart would mistake for a live bundle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from berth.core import errdefs, identifiers, mount as mounts
from berth.core.gocompat.text import go_error

CONFIG = "config.json"


def remapped_gid(spec: bytes) -> int:
    """The host gid that container gid 0 maps to (0 without user namespace mappings)."""
    try:
        doc = json.loads(spec or b"{}")
    except ValueError as e:
        raise errdefs.Unknown(f"invalid OCI spec: {e}", raw=True) from None
    linux = doc.get("linux") if isinstance(doc, dict) else None
    for m in (linux or {}).get("gidMappings") or []:
        if m.get("containerID", 0) == 0:
            return int(m.get("hostID", 0))
    return 0


@dataclass
class Bundle:
    id: str
    namespace: str
    path: Path

    @classmethod
    def load(cls, state: Path, namespace: str, bundle_id: str) -> Bundle:
        return cls(bundle_id, namespace, state / namespace / bundle_id)

    @classmethod
    def create(cls, root: Path, state: Path, namespace: str, bundle_id: str,
               spec: bytes) -> Bundle:
        try:
            identifiers.validate(bundle_id)
        except errdefs.InvalidArgument as e:
            raise errdefs.InvalidArgument(f"invalid task id {bundle_id}: {e}", raw=True) \
                from None
        b = cls.load(state, namespace, bundle_id)
        work = root / namespace / bundle_id
        made: list[Path] = []
        try:
            _mkdir(b.path.parent, 0o711, parents=True)
            _mkdir(b.path, 0o700)
            made.append(b.path)
            gid = remapped_gid(spec)
            if gid:
                # The container's root group must reach its rootfs under the bundle.
                os.chown(b.path, -1, gid)
                os.chmod(b.path, 0o710)
            _mkdir(work.parent, 0o711, parents=True)
            _mkdir(b.path / "rootfs", 0o711, parents=True)
            try:
                _mkdir(work, 0o711)
            except errdefs.AlreadyExists:
                shutil.rmtree(work, ignore_errors=True)
                _mkdir(work, 0o711)
            made.append(work)
            os.symlink(work, b.path / "work")
            fd = os.open(b.path / CONFIG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                os.write(fd, spec)
            finally:
                os.close(fd)
        except BaseException:
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
            raise
        return b

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except FileNotFoundError:
            return None

    def write(self, name: str, text: str, mode: int = 0o600) -> None:
        """Write a small file atomically (write, rename).

        No fsync, as containerd writes ``shim-binary-path``: the bundle describes a live
        shim and lives under the state folder (a tmpfs such as /run), which a power
        loss empties along with the shims; the rename keeps readers from a torn file.
        """
        tmp = self.path / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.path / name)

    def open_log(self) -> int:
        """The shim's log fifo, read end, as containerd opens it (RDWR|NONBLOCK, created).

        Holding it read-write means the shim's blocking open for writing completes
        and the fifo never reports EOF while berthd lives.
        """
        path = self.path / "log"
        try:
            if not stat.S_ISFIFO(os.lstat(path).st_mode):
                raise errdefs.FailedPrecondition(f"{path} is not a fifo", raw=True)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkfifo(path, 0o700)
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def cgroups_path(self) -> str:
        """The spec's ``linux.cgroupsPath`` ("" when unset or unreadable)."""
        try:
            doc = json.loads((self.path / CONFIG).read_bytes())
            return str(doc["linux"]["cgroupsPath"] or "")
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def delete(self) -> None:
        """Unmount the rootfs and remove the bundle and its work directory."""
        try:
            work: Path | None = Path(os.readlink(self.path / "work"))
        except OSError:
            work = None
        try:
            mounts.unmount_all(self.rootfs)
        except OSError as e:
            raise errdefs.Unknown(f"unmount rootfs {self.rootfs}: {e.strerror}", raw=True) \
                from None
        try:
            os.rmdir(self.rootfs)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise errdefs.Unknown(
                f"failed to remove bundle rootfs: {go_error('remove', self.rootfs, e)}",
                raw=True,
            ) from None
        errors = []
        for p in (self.path, work):
            if p is None:
                continue
            try:
                _atomic_delete(p)
            except OSError as e:
                errors.append(go_error("remove", p, e))
        if errors:
            raise errdefs.Unknown(
                "failed to remove both bundle and workdir locations: " + "; ".join(errors),
                raw=True,
            )


def _mkdir(path: Path, mode: int, *, parents: bool = False) -> None:
    try:
        if parents:
            path.mkdir(mode, parents=True, exist_ok=True)
        else:
            os.mkdir(path, mode)
    except FileExistsError as e:
        raise errdefs.AlreadyExists(go_error("mkdir", path, e), raw=True) from None
    except OSError as e:
        raise errdefs.Unknown(go_error("mkdir", path, e), raw=True) from None


def _atomic_delete(path: Path) -> None:
    hidden = path.parent / f".{path.name}"
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden)


def list_bundles(state: Path) -> list[tuple[str, str]]:
    """(namespace, id) of every bundle directory under ``state``, dot-names skipped."""
    out: list[tuple[str, str]] = []
    try:
        namespaces = sorted(os.scandir(state), key=lambda e: e.name)
    except FileNotFoundError:
        return out
    for ns in namespaces:
        if not ns.is_dir(follow_symlinks=False) or ns.name.startswith("."):
            continue
        for entry in sorted(os.scandir(ns.path), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                out.append((ns.name, entry.name))
    return out
