"""A container's processes inside the shim: the init process and exec'd processes.

The states and their messages follow containerd's pkg/process (init_state.go,
exec_state.go): created → running ⇄ paused, → stopped → deleted, with the same
"cannot <verb> a <state> process" refusals, because clients show them verbatim.
Errors the Go shim creates untyped travel as Unknown here too; the ones it wraps in
errdefs keep their codes. The service (``berth.core.shim.service``) decides when events go
out; processes only change state and talk to the OCI runtime.
"""

from __future__ import annotations

import contextlib
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import trio

from berth.core import errdefs, log
from berth.core.oci.reaper import Reaper
from berth.core.oci.runtime import OCIRuntime, Stdio
from berth.core.shim.stdio import Console, ConsoleSocket, ProcessIO, StdioPaths

INIT_PID_FILE = "init.pid"
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)  # Go's time.Time{}


def _unknown(message: str) -> errdefs.Unknown:
    return errdefs.Unknown(message, raw=True)


def runtime_error(exc: BaseException, what: str) -> errdefs.BerthError:
    """"OCI runtime create failed: <runtime's message>", keeping the error's code."""
    if isinstance(exc, errdefs.BerthError):
        return type(exc)(f"{what}: {exc.message}", raw=True)
    return _unknown(f"{what}: {exc}")


class Process:
    """What init and exec processes share: stdio, pid, exit and waiting for it."""

    kind = "process"

    def __init__(self, id: str, paths: StdioPaths, *, namespace: str, container_id: str,
                 reaper: Reaper, io_uid: int = 0, io_gid: int = 0) -> None:
        self.id = id
        self.paths = paths
        self.namespace = namespace
        self.container_id = container_id
        self.reaper = reaper
        self.io_uid, self.io_gid = io_uid, io_gid
        self.pid = 0
        self.state = "created"
        self.exit_status = 0
        self.exited_at: datetime | None = None
        self._exited = trio.Event()
        self.io: ProcessIO | Console | None = None
        keys = {"exec_id": id} if id != container_id else {}
        self.log = log.get(f"shim.{self.kind}", namespace=namespace, id=container_id, **keys)

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def wait(self) -> None:
        await self._exited.wait()

    def set_exited(self, status: int, at: datetime | None = None) -> None:
        """Record the exit once; later calls (a stopped or deleted process) do nothing."""
        if self._exited.is_set() or self.state == "deleted":
            return
        self.exit_status = status
        self.exited_at = at or datetime.now(UTC)
        self.state = "stopped"
        if isinstance(self.io, Console):
            self.io.shutdown()
        self._exited.set()

    def status(self) -> str:
        return "stopped" if self.state == "deleted" else self.state

    async def _with_stdio(self, nursery: trio.Nursery, spawn) -> int:
        """Run ``spawn(stdio, console_socket)`` with this process's stdio wired up."""
        if self.paths.terminal:
            async with ConsoleSocket() as console_socket:
                pid = await spawn(Stdio(), console_socket.path)
                master = await console_socket.receive_master()
            console = Console(master, self.paths, container_id=self.container_id,
                              namespace=self.namespace)
            self.io = console
            await console.start_copy(nursery)
            return pid
        pio = ProcessIO(self.paths, container_id=self.container_id,
                        namespace=self.namespace, reaper=self.reaper,
                        uid=self.io_uid, gid=self.io_gid)
        await pio.open()
        try:
            pid = await spawn(pio.container_stdio(), None)
        except BaseException:
            await pio.aclose()
            raise
        finally:
            pio.close_after_start()
        self.io = pio
        await pio.start_copy(nursery)
        return pid

    def close_stdin(self) -> None:
        if self.io is not None:
            self.io.close_stdin()

    def resize(self, width: int, height: int) -> None:
        if self.state in ("stopped", "deleted") and self.kind == "exec":
            raise _unknown("cannot resize a stopped container" if self.state == "stopped"
                           else "cannot resize a deleted process")
        if isinstance(self.io, Console):
            self.io.resize(width, height)

    async def _drain_and_close(self) -> None:
        if self.io is not None:
            await self.io.wait_outputs()
            with trio.CancelScope(shield=True):
                await self.io.aclose()

    async def kill(self, sig: int, all: bool = False) -> None:
        raise NotImplementedError  # Init and Exec each signal their own way

    async def delete(self) -> None:
        raise NotImplementedError


class Init(Process):
    kind = "init"

    def __init__(self, id: str, bundle: str, paths: StdioPaths, runtime: OCIRuntime, *,
                 namespace: str, reaper: Reaper, rootfs: str = "", io_uid: int = 0,
                 io_gid: int = 0) -> None:
        super().__init__(id, paths, namespace=namespace, container_id=id, reaper=reaper,
                         io_uid=io_uid, io_gid=io_gid)
        self.bundle = bundle
        self.runtime = runtime
        self.rootfs = rootfs
        self.pausing = False
        self._thaw_after_exit = False

    def status(self) -> str:
        if self.pausing:
            return "pausing"
        return super().status()

    async def create(self, nursery: trio.Nursery) -> None:
        async def spawn(stdio: Stdio, console_socket: str | None) -> int:
            return await self.runtime.create(
                self.id, Path(self.bundle), stdio=stdio, console_socket=console_socket,
                pid_file=Path(self.bundle) / INIT_PID_FILE)

        try:
            self.pid = await self._with_stdio(nursery, spawn)
        except errdefs.BerthError as exc:
            raise runtime_error(exc, "OCI runtime create failed") from exc
        except OSError as exc:
            raise runtime_error(exc, "OCI runtime create failed") from exc

    async def start(self) -> None:
        if self.state != "created":
            raise _unknown(f"cannot start a {self._noun()}")
        try:
            await self.runtime.start(self.id)
        except errdefs.BerthError as exc:
            raise runtime_error(exc, "OCI runtime start failed") from exc
        if self.state == "created":
            self.state = "running"

    def _noun(self) -> str:
        if self.state == "paused":
            return "paused process"
        if self.state in ("stopped", "deleted"):
            return f"{self.state} process"
        return "running process"

    async def kill(self, sig: int, all: bool = False) -> None:
        if self.state == "deleted":
            raise errdefs.NotFound("cannot kill a deleted process", raw=True)
        try:
            await self.runtime.kill(self.id, sig, all=all)
        except errdefs.BerthError as exc:
            raise kill_error(exc) from exc

    async def kill_all(self) -> None:
        try:
            await self.runtime.kill(self.id, signal.SIGKILL, all=True)
        except errdefs.BerthError as exc:
            self.log.debug("kill --all after init exit", error=str(exc))

    async def pause(self) -> None:
        if self.state == "created":
            raise _unknown("cannot pause task in created state")
        if self.state == "paused":
            raise _unknown("cannot pause a paused container")
        if self.state in ("stopped", "deleted"):
            word = "container" if self.state == "stopped" else "process"
            raise _unknown(f"cannot pause a {self.state} {word}")
        self.pausing = True
        try:
            await self.runtime.pause(self.id)
        except errdefs.BerthError as exc:
            raise runtime_error(exc, "OCI runtime pause failed") from exc
        finally:
            self.pausing = False
        if self.state == "running":
            self.state = "paused"

    async def resume(self) -> None:
        if self.state == "created":
            raise _unknown("cannot resume task in created state")
        if self.state == "running":
            raise _unknown("cannot resume a running process")
        if self.state in ("stopped", "deleted"):
            word = "container" if self.state == "stopped" else "process"
            raise _unknown(f"cannot resume a {self.state} {word}")
        try:
            await self.runtime.resume(self.id)
        except errdefs.BerthError as exc:
            raise runtime_error(exc, "OCI runtime resume failed") from exc
        if self.state == "paused":
            self.state = "running"

    def set_exited(self, status: int, at: datetime | None = None) -> None:
        was_paused = self.state == "paused"
        super().set_exited(status, at)
        if was_paused and self.state == "stopped":
            # A frozen cgroup would keep the dead container's other processes stuck.
            self._thaw_after_exit = True

    async def after_exit(self) -> None:
        """Work an exit needs beyond bookkeeping (thawing a container that was paused)."""
        if self._thaw_after_exit:
            self._thaw_after_exit = False
            with contextlib.suppress(errdefs.BerthError):
                await self.runtime.resume(self.id)

    async def update(self, resources: dict) -> None:
        if self.state in ("stopped", "deleted"):
            word = "container" if self.state == "stopped" else "process"
            raise _unknown(f"cannot update a {self.state} {word}")
        await self.runtime.update(self.id, resources)

    def check_exec(self) -> None:
        if self.state in ("created", "running"):
            return
        raise _unknown(f"cannot exec in a {self.state} state")

    async def delete(self) -> None:
        if self.state == "deleted":
            raise errdefs.NotFound("cannot delete a deleted process", raw=True)
        if self.state in ("running", "paused"):
            raise _unknown(f"cannot delete a {self.state} process")
        error: errdefs.BerthError | None = None
        if self.io is not None:
            await self.io.wait_outputs()
        try:
            await self.runtime.delete(self.id)
        except errdefs.NotFound:
            pass
        except errdefs.BerthError as exc:
            if "does not exist" not in exc.message:
                error = runtime_error(exc, "failed to delete task")
        if self.io is not None:
            with trio.CancelScope(shield=True):
                await self.io.aclose()
        if self.rootfs:
            try:
                from berth.core import mount

                mount.unmount_all(self.rootfs)
            except OSError as exc:
                self.log.warning("failed to cleanup rootfs mount", error=str(exc))
                if error is None:
                    error = _unknown(f"failed rootfs umount: {exc}")
        if error is not None:
            raise error
        self.state = "deleted"
        self._exited.set()  # a process deleted before it ran: nobody waits forever


class Exec(Process):
    kind = "exec"

    def __init__(self, id: str, parent: Init, spec: dict, paths: StdioPaths) -> None:
        super().__init__(id, paths, namespace=parent.namespace, container_id=parent.id,
                         reaper=parent.reaper, io_uid=parent.io_uid, io_gid=parent.io_gid)
        self.parent = parent
        self.spec = dict(spec)
        self.spec["terminal"] = paths.terminal
        # Start, Kill and Delete take turns (the Go shim's execProcess mutex): the process
        # exists before runc exec returns its pid, so a Kill or Delete arriving meanwhile
        # must wait for that pid rather than fail with "process not created" and leave
        # the process running with nobody to reap or signal it.
        self._turn = trio.Lock()

    @property
    def pid_file(self) -> Path:
        return Path(self.parent.bundle) / f"{self.id}.pid"

    def status(self) -> str:
        parent = self.parent.status()
        if parent in ("paused", "pausing"):
            return parent
        return super().status()

    async def start(self, nursery: trio.Nursery) -> None:
        async with self._turn:
            await self._start(nursery)

    async def _start(self, nursery: trio.Nursery) -> None:
        if self.state != "created":
            raise _unknown(f"cannot start a {self.state} process")

        async def spawn(stdio: Stdio, console_socket: str | None) -> int:
            return await self.parent.runtime.exec(
                self.parent.id, self.spec, stdio=stdio, console_socket=console_socket,
                pid_file=self.pid_file)

        try:
            self.pid = await self._with_stdio(nursery, spawn)
        except (errdefs.BerthError, OSError) as exc:
            self._exited.set()  # as the Go shim does: a waiter learns it will not run
            raise runtime_error(exc, "OCI runtime exec failed") from exc
        if self.state == "created":
            self.state = "running"

    async def kill(self, sig: int, all: bool = False) -> None:
        async with self._turn:
            self._kill(sig)

    def _kill(self, sig: int) -> None:
        if self.state == "deleted":
            raise errdefs.NotFound("cannot kill a deleted process", raw=True)
        if self.pid == 0:
            raise errdefs.FailedPrecondition("process not created", raw=True)
        if self.exited:
            raise errdefs.NotFound("process already finished", raw=True)
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise errdefs.NotFound("exec kill error: process already finished",
                                   raw=True) from None

    async def delete(self) -> None:
        async with self._turn:
            await self._delete()

    async def _delete(self) -> None:
        if self.state == "deleted":
            raise errdefs.NotFound("cannot delete a deleted process", raw=True)
        if self.state == "running":
            raise _unknown("cannot delete a running process")
        await self._drain_and_close()
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        self.state = "deleted"
        self._exited.set()


def kill_error(exc: errdefs.BerthError) -> errdefs.BerthError:
    """containerd's checkKillError: a process that is gone is NotFound."""
    text = exc.message.lower()
    if ("process already finished" in text or "container not running" in text
            or "no such process" in text or "not running" in text
            or isinstance(exc, errdefs.FailedPrecondition)):
        return errdefs.NotFound("process already finished", raw=True)
    if "does not exist" in text or isinstance(exc, errdefs.NotFound):
        return errdefs.NotFound("no such container", raw=True)
    return _unknown(f"unknown error after kill: {exc.message}")
