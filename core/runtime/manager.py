"""The runtime v2 task manager: shims started, tracked, reconnected and cleaned up after.

containerd 1.6's runtime/v2 (manager.go, shim.go, shim_load.go) is the model:

- Create: a bundle, the shim's ``start`` action, a ttrpc connection, then the shim's
  Task.Create. Any failure tears down what was made, in reverse.
- Delete: the shim's Task.Delete, Shutdown (a shim serving other tasks stays), closing
  the connection, removing the bundle.
- A connection the shim ends is a dead shim: its ``delete`` action cleans up
  (``runc delete --force``, unmount) and reports the exit; berthd publishes
  ``/tasks/exit`` and ``/tasks/delete`` for the task (exit status 255 when even that
  failed) and forgets it, so the container can be deleted.
- At start-up, bundles left in the state directory are reconnected through their
  ``address`` file; a shim that cannot be reached is cleaned up as a dead one.

Task events of live shims (create, start, exit, delete, exec, pause, oom...) are
published by the shims themselves through berthd's ttrpc Events service, so the
manager publishes only what no shim can: the death of a shim.

Deliberate difference: containerd 1.6 reports nothing for a shim found dead at
start-up (its check for a known task runs before the task is added); berth publishes
the exit and delete events there too, so a client that waited across the restart
learns the outcome.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import errdefs, log
from berth.core.api.containerd.events import TaskDelete, TaskExit
from berth.core.api.containerd.types import Mount
from berth.core.events.exchange import Exchange
from berth.core.metadata.containers import ContainerStore
from berth.core.runtime.attach_primer import Primer
from berth.core.runtime.binary import Exit, RuntimeResolver, ShimBinary, now
from berth.core.runtime.bundle import Bundle, list_bundles
from berth.core.runtime.shim import (
    CLEANUP_TIMEOUT,
    LOAD_TIMEOUT,
    ShimTask,
    closed_error,
    from_grpc,
    is_closed,
    serve_connection,
)

SHIM_BINARY_PATH = "shim-binary-path"
ADDRESS = "address"
# What containerd reports for a task whose shim died and could not even be cleaned up.
LOST_EXIT_STATUS = 255

def wrap(prefix: str, exc: BaseException) -> errdefs.BerthError:
    """``prefix: <error>``, keeping the error's status code, like Go's %w."""
    if isinstance(exc, errdefs.BerthError):
        return type(exc)(f"{prefix}: {exc.message}", raw=True)
    if isinstance(exc, OSError):
        return errdefs.Unknown(f"{prefix}: {exc.strerror or exc}", raw=True)
    return errdefs.Unknown(f"{prefix}: {exc}", raw=True)


@dataclass
class CreateOpts:
    spec: AnyMsg
    runtime: str
    rootfs: list[Mount] = field(default_factory=list)
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    checkpoint: str = ""
    runtime_options: AnyMsg | None = None
    task_options: AnyMsg | None = None


class TaskManager:
    """containerd's ShimManager and TaskManager in one: the tasks of every namespace."""

    def __init__(self, *, root: Path, state: Path, address: str, ttrpc_address: str,
                 events: Exchange, containers: ContainerStore, nursery: trio.Nursery,
                 debug: bool = False, resolver: RuntimeResolver | None = None) -> None:
        self.root = root
        self.state = state
        self.address = address
        self.ttrpc_address = ttrpc_address
        self.events = events
        self.containers = containers
        self.nursery = nursery
        self.debug = debug
        self.resolver = resolver or RuntimeResolver()
        self.primer = Primer(nursery)
        self._tasks: dict[str, dict[str, ShimTask]] = {}
        self._log = log.get("runtime")
        for d in (root, state):
            d.mkdir(parents=True, exist_ok=True, mode=0o711)

    # -- the task list ---------------------------------------------------------------

    def get(self, namespace: str, task_id: str) -> ShimTask | None:
        return self._tasks.get(namespace, {}).get(task_id)

    def tasks(self, namespace: str | None = None) -> list[ShimTask]:
        """Tasks of ``namespace`` (all namespaces for None), by id."""
        spaces = [namespace] if namespace is not None else sorted(self._tasks)
        out = [t for ns in spaces for t in self._tasks.get(ns, {}).values()]
        return sorted(out, key=lambda t: (t.namespace, t.id))

    def _add(self, task: ShimTask) -> None:
        tasks = self._tasks.setdefault(task.namespace, {})
        if task.id in tasks:
            raise errdefs.AlreadyExists(f"{task.id}: task already exists", raw=True)
        tasks[task.id] = task

    def _remove(self, task: ShimTask) -> None:
        tasks = self._tasks.get(task.namespace, {})
        if tasks.get(task.id) is task:
            del tasks[task.id]

    def _known(self, task: ShimTask) -> bool:
        return self._tasks.get(task.namespace, {}).get(task.id) is task

    # -- create and delete -----------------------------------------------------------

    async def create(self, namespace: str, task_id: str, opts: CreateOpts) -> ShimTask:
        with self.primer.starting():
            return await self._create(namespace, task_id, opts)

    async def _create(self, namespace: str, task_id: str, opts: CreateOpts) -> ShimTask:
        try:
            task = await self._start(namespace, task_id, opts)
        except (errdefs.BerthError, OSError) as e:
            raise wrap("failed to start shim", e) from None
        try:
            await task.create(
                rootfs=opts.rootfs, stdin=opts.stdin, stdout=opts.stdout, stderr=opts.stderr,
                terminal=opts.terminal, checkpoint=opts.checkpoint,
                options=opts.task_options or opts.runtime_options,
            )
        except BaseException as e:
            self._remove(task)
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                try:
                    await self._teardown(task)
                except errdefs.BerthError as te:
                    self._log.warning("failed to clean up after failed create",
                                      namespace=namespace, id=task_id, error=str(te))
            if isinstance(e, errdefs.BerthError):
                raise wrap("failed to create shim task", e) from None
            raise
        return task

    async def _start(self, namespace: str, task_id: str, opts: CreateOpts) -> ShimTask:
        # A few mkdirs and one small file under the state folder: cheaper inline than
        # a thread hop, which costs GIL hand-offs when many containers start at once.
        bundle = Bundle.create(self.root, self.state, namespace, task_id,
                               bytes(opts.spec.value))
        task: ShimTask | None = None
        try:
            try:
                runtime = self.resolver.resolve(opts.runtime)
            except errdefs.BerthError as e:
                raise wrap("failed to resolve runtime path", e) from None
            binary = self._binary(runtime, bundle)
            log_fd = bundle.open_log()
            try:
                address = await binary.start(opts.task_options or opts.runtime_options)
            except BaseException:
                os.close(log_fd)
                raise
            try:
                task = await self._connect(bundle, binary, address, log_fd)
            except BaseException:
                # The shim runs but cannot be reached: have it cleaned up as a dead one.
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    try:
                        await binary.delete()
                    except errdefs.BerthError:
                        pass
                raise
            bundle.write(SHIM_BINARY_PATH, runtime)
            if bundle.read(ADDRESS) != address:
                bundle.write(ADDRESS, address)
            self._add(task)
        except BaseException:
            with trio.CancelScope(shield=True):
                if task is not None:
                    await task.close()
                try:
                    await trio.to_thread.run_sync(bundle.delete)
                except errdefs.BerthError as e:
                    self._log.warning("failed to delete bundle", namespace=namespace,
                                      id=task_id, error=str(e))
            raise
        return task

    def _binary(self, runtime: str, bundle: Bundle) -> ShimBinary:
        return ShimBinary(runtime=runtime, bundle=bundle, address=self.address,
                          ttrpc_address=self.ttrpc_address, debug=self.debug)

    async def _connect(self, bundle: Bundle, binary: ShimBinary, address: str,
                       log_fd: int) -> ShimTask:
        return await self.nursery.start(serve_connection, bundle, binary, address, log_fd,
                                        self._on_lost)

    async def delete(self, namespace: str, task_id: str) -> Exit:
        task = self.get(namespace, task_id)
        if task is None:
            raise errdefs.NotFound(f"task {task_id}", raw=False)
        try:
            return await self._teardown(task)
        except errdefs.BerthError as e:
            raise wrap("failed to delete task", e) from None

    async def _teardown(self, task: ShimTask) -> Exit:
        """containerd's shimTask.delete: Delete, Shutdown, close, remove the bundle."""
        try:
            exit_ = await task.delete(convert=False)
        except errdefs.BerthError as e:
            if is_closed(e):
                # The shim is gone: its connection's owner cleans up after it.
                await task.ended.wait()
                raise closed_error() from None
            e = from_grpc(e)
            if not isinstance(e, errdefs.NotFound):
                raise e from None
            shim_err: errdefs.BerthError | None = e
        else:
            shim_err = None
            self._remove(task)
        task.closing = True  # the shim hanging up after Shutdown is no death
        try:
            await task.shutdown()
        except errdefs.BerthError as e:
            self._log.error("failed to shutdown shim task", namespace=task.namespace,
                            id=task.id, error=str(e))
        await task.close()
        try:
            await trio.to_thread.run_sync(task.bundle.delete)
        except errdefs.BerthError as e:
            self._log.error("failed to delete bundle", namespace=task.namespace, id=task.id,
                            error=str(e))
        self._remove(task)
        if shim_err is not None:
            raise shim_err
        return exit_

    # -- dead shims ------------------------------------------------------------------

    async def _on_lost(self, task: ShimTask) -> None:
        await self._cleanup_after_dead_shim(task.bundle, task.binary, task=task)

    async def _cleanup_after_dead_shim(self, bundle: Bundle, binary: ShimBinary | None, *,
                                       task: ShimTask | None = None,
                                       publish: bool | None = None) -> None:
        """Clean up after a shim that is gone and report its task's end.

        ``publish``: whether to publish the exit; by default only for a task still
        listed (one that berth is not deleting itself).
        """
        lg = self._log.bind(namespace=bundle.namespace, id=bundle.id)
        lg.warning("cleaning up after shim disconnected")
        address = bundle.read(ADDRESS)
        exit_: Exit | None = None
        with trio.CancelScope(shield=True):
            if binary is not None:
                with trio.move_on_after(CLEANUP_TIMEOUT):
                    try:
                        exit_ = await binary.delete()
                    except errdefs.BerthError as e:
                        lg.warning("failed to clean up after shim disconnected", error=str(e))
            # Whatever the shim's delete action managed, leave nothing behind.
            try:
                await trio.to_thread.run_sync(bundle.delete)
            except errdefs.BerthError as e:
                lg.error("failed to delete bundle", error=str(e))
            if address:
                remove_stale_socket(address)
        if publish is None:
            publish = task is not None and self._known(task)
        if task is not None:
            self._remove(task)
        if not publish:
            return
        if exit_ is None:
            exit_ = Exit(pid=0, status=LOST_EXIT_STATUS, timestamp=now())
        ns, tid = bundle.namespace, bundle.id
        self._publish(ns, "/tasks/exit", TaskExit(
            container_id=tid, id=tid, pid=exit_.pid, exit_status=exit_.status,
            exited_at=exit_.timestamp))
        self._publish(ns, "/tasks/delete", TaskDelete(
            container_id=tid, pid=exit_.pid, exit_status=exit_.status,
            exited_at=exit_.timestamp))

    def _publish(self, namespace: str, topic: str, event: Any) -> None:
        try:
            self.events.publish(namespace, topic, event)
        except errdefs.BerthError as e:
            self._log.error("failed to publish event", topic=topic, namespace=namespace,
                            error=str(e))

    # -- after a restart -------------------------------------------------------------

    async def load_existing(self) -> None:
        """Reconnect to the shims of bundles left by a previous berthd."""
        namespaces: set[str] = set()
        for ns, task_id in list_bundles(self.state):
            namespaces.add(ns)
            try:
                await self._load(ns, task_id)
            except Exception as e:
                # One broken bundle must not keep the others (or berthd) from loading.
                self._log.error("loading task", namespace=ns, id=task_id, error=str(e))
        for ns in sorted(namespaces | set(_subdirs(self.root))):
            self._cleanup_work_dirs(ns)

    async def _load(self, ns: str, task_id: str) -> None:
        bundle = Bundle.load(self.state, ns, task_id)
        lg = self._log.bind(namespace=ns, id=task_id)
        try:
            entries = os.listdir(bundle.path)
        except OSError as e:
            lg.error("fast path read bundle path", error=str(e))
            await trio.to_thread.run_sync(bundle.delete)
            return
        if not entries:
            await trio.to_thread.run_sync(bundle.delete)
            return
        runtime = bundle.read(SHIM_BINARY_PATH) or ""
        if not runtime:
            try:
                runtime = self.containers.get(ns, task_id).runtime_name
            except errdefs.NotFound as e:
                lg.error("loading container", error=str(e))
                await trio.to_thread.run_sync(bundle.delete)
                return
        try:
            runtime = self.resolver.resolve(runtime)
        except errdefs.BerthError as e:
            lg.error("failed to resolve runtime path", error=str(e))
            await trio.to_thread.run_sync(bundle.delete)
            return
        binary = self._binary(runtime, bundle)
        task: ShimTask | None = None
        try:
            address = bundle.read(ADDRESS)
            if not address:
                raise errdefs.NotFound(f"{bundle.path / ADDRESS}: no shim address", raw=True)
            log_fd = bundle.open_log()
            task = await self._connect(bundle, binary, address, log_fd)
            await task.connect(timeout=LOAD_TIMEOUT)
        except (errdefs.BerthError, OSError) as e:
            lg.warning("shim unreachable after restart", error=str(e))
            if task is not None:
                await task.close()
            await self._cleanup_after_dead_shim(bundle, binary, publish=True)
            return
        self._add(task)
        lg.info("reconnected to shim")

    def _cleanup_work_dirs(self, ns: str) -> None:
        for name in _subdirs(self.root / ns):
            if self.get(ns, name) is None:
                shutil.rmtree(self.root / ns / name, ignore_errors=True)


def _subdirs(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def remove_stale_socket(address: str) -> None:
    """Remove a dead shim's unix socket (the runc shim only removes it on a clean exit)."""
    if not address.startswith("unix://"):
        return
    path = address.removeprefix("unix://")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return
    finally:
        probe.close()

