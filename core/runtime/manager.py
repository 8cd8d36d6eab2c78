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
  ``address`` file, in the background once berthd serves; a shim that cannot be reached
  is cleaned up as a dead one, and a shim or bundle of no container (a start cut short
  by a crash) is shut down and removed, so its id can be used again.

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
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import cgroups, errdefs, log
from berth.core.api.containerd.events import TaskDelete, TaskExit
from berth.core.api.containerd.types import Mount
from berth.core.events.exchange import Exchange
from berth.core.metadata.containers import ContainerStore
from berth.core.oci.reaper import Exit
from berth.core.runtime.attach_primer import Primer
from berth.core.runtime.binary import RuntimeResolver, ShimBinary, now
from berth.core.runtime.bundle import Bundle, list_bundles
from berth.core.runtime.shim import (
    CLEANUP_TIMEOUT,
    LOAD_TIMEOUT,
    SHUTDOWN_TIMEOUT,
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
# Where the runc shims (and berth's) write the task's init pid in the bundle.
INIT_PID = "init.pid"
# After a restart: how many shims are dialled at once, how many dead ones cleaned up at
# once (each cleanup runs the shim binary's delete action, a process of its own), and
# how long stopping one shim kept for no task may take before it is killed.
PROBE_LIMIT = 32
CLEANUP_LIMIT = max(4, 2 * (os.cpu_count() or 1))
RETIRE_TIMEOUT = 10.0

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
        # Bundles found at start-up and not yet reconnected or retired.
        self._pending: dict[tuple[str, str], Recovery] = {}
        self._recovery_started = False
        self._recovered = trio.Event()
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
        # A bundle of this id left by a previous berthd goes first (or is this task).
        await self.settle(namespace, task_id)
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

    async def _connect(self, bundle: Bundle, binary: ShimBinary | None, address: str,
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
        else:
            if not self._shares_shim(task):
                # A shim left with no task exits and hangs up. Until then it still
                # listens on the socket a new task of the same id (or group) would
                # get, and would join it only to go away under it.
                with trio.move_on_after(SHUTDOWN_TIMEOUT):
                    await task.client.wait_closed()
        await task.close()
        if shim_err is not None:
            # The shim holds no such task: a create that failed or was cut short.
            await self._remove_cgroups(task.bundle, task.bundle.cgroups_path())
        try:
            await trio.to_thread.run_sync(task.bundle.delete)
        except errdefs.BerthError as e:
            self._log.error("failed to delete bundle", namespace=task.namespace, id=task.id,
                            error=str(e))
        self._remove(task)
        if shim_err is not None:
            raise shim_err
        return exit_

    def _shares_shim(self, task: ShimTask) -> bool:
        """Whether another listed task is served by the same shim (a group)."""
        return any(t is not task and t.address == task.address
                   for t in self._tasks.get(task.namespace, {}).values())

    # -- dead shims ------------------------------------------------------------------

    async def _on_lost(self, task: ShimTask) -> None:
        if not self._known(task) and (task.namespace, task.id) in self._pending:
            return  # still being recovered: the recovery retires it
        await self._cleanup_after_dead_shim(task.bundle, task.binary, task=task)

    async def _cleanup_after_dead_shim(self, bundle: Bundle, binary: ShimBinary | None, *,
                                       task: ShimTask | None = None,
                                       publish: bool | None = None) -> Exit:
        """Clean up after a shim that is gone and report its task's end.

        ``publish``: whether to publish the exit; by default only for a task still
        listed (one that berth is not deleting itself). Returns the exit, as the shim's
        delete action reported it (status 255 when it could not).
        """
        lg = self._log.bind(namespace=bundle.namespace, id=bundle.id)
        lg.warning("cleaning up after shim disconnected")
        address = bundle.read(ADDRESS)
        cgroups_path = bundle.cgroups_path()
        exit_: Exit | None = None
        with trio.CancelScope(shield=True):
            if binary is not None:
                with trio.move_on_after(CLEANUP_TIMEOUT):
                    try:
                        exit_ = await binary.delete()
                    except errdefs.BerthError as e:
                        lg.warning("failed to clean up after shim disconnected", error=str(e))
            # Whatever the shim's delete action managed, leave nothing behind.
            await self._remove_cgroups(bundle, cgroups_path)
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
        if exit_ is None:
            exit_ = Exit(pid=0, status=LOST_EXIT_STATUS, exited_at=now())
        if not publish:
            return exit_
        ns, tid = bundle.namespace, bundle.id
        self._publish(ns, "/tasks/exit", TaskExit(
            container_id=tid, id=tid, pid=exit_.pid, exit_status=exit_.status,
            exited_at=exit_.exited_at))
        self._publish(ns, "/tasks/delete", TaskDelete(
            container_id=tid, pid=exit_.pid, exit_status=exit_.status,
            exited_at=exit_.exited_at))
        return exit_

    async def _remove_cgroups(self, bundle: Bundle, path: str) -> None:
        """Remove the empty cgroups a runtime create cut short left (runc makes them
        before its state; with no state, ``runc delete --force`` removes none): a shim's
        Create cancelled by berthd's death kills ``runc create`` half-way. ``path`` is
        the spec's cgroupsPath, read before the shim's delete action took the bundle."""
        if not path:
            return
        removed = await trio.to_thread.run_sync(cgroups.remove_empty, path)
        if removed:
            self._log.info("removed cgroups a cut-short create left",
                           namespace=bundle.namespace, id=bundle.id, cgroups=removed)

    def _publish(self, namespace: str, topic: str, event: Any) -> None:
        try:
            self.events.publish(namespace, topic, event)
        except errdefs.BerthError as e:
            self._log.error("failed to publish event", topic=topic, namespace=namespace,
                            error=str(e))

    # -- after a restart -------------------------------------------------------------
    #
    # containerd 1.6 reconnects and cleans up before it serves, one bundle after the
    # other: with many dead shims (a delete action each) its API stays down for seconds
    # to minutes (containerd issues 5597, 11409). berthd only notes the bundles before it
    # serves (``adopt_existing``); once the servers are up (``serving``) each bundle is
    # probed and then reconnected or retired in the background, a bounded number at a
    # time. Meanwhile its task answers State as UNKNOWN, the status containerd gives a
    # task whose shim does not answer, and calls that act on it (Delete, Kill, Wait...)
    # first finish its recovery, doing its cleanup at once when its turn has not come.

    def adopt_existing(self) -> None:
        """Note the bundles a previous berthd left, without dialling any shim."""
        for ns, task_id in list_bundles(self.state):
            if (ns, task_id) not in self._pending:
                self._pending[(ns, task_id)] = Recovery(Bundle.load(self.state, ns, task_id))

    def serving(self) -> None:
        """berthd serves: recover the adopted bundles in the background (once)."""
        if not self._recovery_started:
            self._recovery_started = True
            self.nursery.start_soon(self.recover_existing)

    async def load_existing(self) -> None:
        """Adopt and recover every bundle left behind, returning once all are settled."""
        self.adopt_existing()
        self._recovery_started = True
        await self.recover_existing()

    async def recovered(self) -> None:
        """Wait until the recovery after a restart is over."""
        await self._recovered.wait()

    def recovering(self, namespace: str, task_id: str) -> Recovery | None:
        return self._pending.get((namespace, task_id))

    def recovering_in(self, namespace: str) -> list[Recovery]:
        return [p for (ns, _), p in sorted(self._pending.items()) if ns == namespace]

    async def settle(self, namespace: str, task_id: str) -> Exit | None:
        """Finish the recovery of a task found at start-up, if it is one.

        Waits for its probe; a task whose shim is gone is cleaned up now (or its
        running cleanup awaited). The exit reported for it, None when it was no
        recovering task or its shim was reconnected.
        """
        p = self._pending.get((namespace, task_id))
        if p is None:
            return None
        await self._probe(p)
        if self.get(namespace, task_id) is not None:
            return None
        await self._retire(p)
        return p.exit

    async def recover_existing(self) -> None:
        """Reconnect to the adopted bundles' shims, retire the rest; in parallel."""
        pending = list(self._pending.values())
        began = trio.current_time()
        if pending:
            self._log.info("recovering tasks after restart", bundles=len(pending))
        probes = trio.CapacityLimiter(PROBE_LIMIT)
        cleanups = trio.CapacityLimiter(CLEANUP_LIMIT)
        try:
            async with trio.open_nursery() as nursery:
                for p in pending:
                    nursery.start_soon(self._recover, p, probes, cleanups)
            namespaces = {p.bundle.namespace for p in pending}
            for ns in sorted(namespaces | set(_subdirs(self.root))):
                self._cleanup_work_dirs(ns)
        finally:
            self._recovered.set()
        if pending:
            self._log.info("recovered tasks after restart", bundles=len(pending),
                           reconnected=sum(1 for p in pending if not p.retired),
                           seconds=round(trio.current_time() - began, 3))

    async def _recover(self, p: Recovery, probes: trio.CapacityLimiter,
                       cleanups: trio.CapacityLimiter) -> None:
        try:
            async with probes:
                await self._probe(p)
            if p.settled.is_set():
                return
            async with cleanups:
                await self._retire(p)
        except Exception:
            # One broken bundle must not keep the others (or berthd) from loading.
            self._log.exception("recovering the task failed", namespace=p.bundle.namespace,
                                id=p.bundle.id)
            self._settled(p)

    async def _probe(self, p: Recovery) -> None:
        """Dial the bundle's shim (once, whoever asks first): the task is reconnected,
        or left for ``_retire``."""
        async with p.lock:
            if p.probed.is_set():
                return
            lg = self._log.bind(namespace=p.bundle.namespace, id=p.bundle.id)
            task: ShimTask | None = None
            try:
                task = await self._reconnect(p, lg)
                if task is not None:
                    self._add(task)
            except Exception as e:
                lg.error("loading task", error=str(e))
                if task is not None:
                    task.closing = True
                    p.shim = task
                task = None
            finally:
                p.probed.set()
            if task is not None:
                self._settled(p)
                lg.info("reconnected to shim")

    def _settled(self, p: Recovery) -> None:
        key = (p.bundle.namespace, p.bundle.id)
        if self._pending.get(key) is p:
            del self._pending[key]
        p.probed.set()
        p.settled.set()

    async def _reconnect(self, p: Recovery, lg: Any) -> ShimTask | None:
        """The bundle's task, reached through its shim; None when it is to be retired
        (the shim is gone, or serves no task of a known container)."""
        bundle = p.bundle
        ns, task_id = bundle.namespace, bundle.id
        try:
            entries = os.listdir(bundle.path)
        except OSError as e:
            lg.error("fast path read bundle path", error=str(e))
            return None
        if not entries:
            return None
        p.pid = _read_pid(bundle.path / INIT_PID)
        try:
            container = self.containers.get(ns, task_id)
        except errdefs.NotFound:
            container = None
        runtime = bundle.read(SHIM_BINARY_PATH) or (container.runtime_name if container
                                                    else "")
        if runtime:
            try:
                p.binary = self._binary(self.resolver.resolve(runtime), bundle)
            except errdefs.BerthError as e:
                lg.error("failed to resolve runtime path", error=str(e))
        if container is None:
            # A start cut short by a crash (kill -9 during ``ctr run``): no container
            # will ever claim this task, and it would hold its id forever.
            lg.warning("bundle of no container; retiring its shim")
        p.publish = container is not None and p.binary is not None
        address = bundle.read(ADDRESS)
        if not address:
            return None
        log_fd = bundle.open_log()
        try:
            task = await self._connect(bundle, p.binary, address, log_fd)
        except OSError as e:
            lg.warning("shim unreachable after restart", error=str(e))
            return None
        try:
            resp = await task.connect(timeout=LOAD_TIMEOUT)
        except errdefs.BerthError as e:
            lg.warning("shim unreachable after restart", error=str(e))
            task.closing = True
            p.shim = task
            return None
        p.shim_pid = resp.shim_pid
        if container is None or p.binary is None or resp.task_pid == 0:
            if resp.task_pid == 0:
                p.publish = False  # the shim never created the task
            task.closing = True
            p.shim = task
            return None
        return task

    async def _retire(self, p: Recovery) -> None:
        """Stop a bundle's shim if it still runs, clean up, publish the task's end."""
        async with p.lock:
            if p.settled.is_set():
                return
            p.retired = True
            try:
                if p.shim is not None:
                    await self._stop_shim(p.shim)
                await self._end_shims_in(p.bundle, p.shim_pid)
                p.exit = await self._cleanup_after_dead_shim(p.bundle, p.binary,
                                                             publish=p.publish)
            finally:
                self._settled(p)

    async def _stop_shim(self, task: ShimTask) -> None:
        """A shim kept for no task: its processes killed and the shim told to go, as
        containerd's shim delete after a failed load does; bounded in time."""
        lg = self._log.bind(namespace=task.namespace, id=task.id)
        task.closing = True
        try:
            with trio.move_on_after(RETIRE_TIMEOUT):
                for step in (lambda: task.kill(signal.SIGKILL, all=True), task.wait,
                             task.delete, task.shutdown):
                    if task.client.closed:
                        break
                    with trio.move_on_after(SHUTDOWN_TIMEOUT):
                        try:
                            await step()
                        except errdefs.BerthError as e:
                            lg.debug("retiring shim", error=str(e))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_TIMEOUT):
                await task.close()

    async def _end_shims_in(self, bundle: Bundle, shim_pid: int) -> None:
        """SIGKILL what still runs as this bundle's shim (its pid as it told us, or a
        shim process whose working directory is the bundle) and wait for it to go."""
        pids = await trio.to_thread.run_sync(_shims_in, str(bundle.path), shim_pid)
        for pid in pids:
            with trio.move_on_after(SHUTDOWN_TIMEOUT):
                await _kill_and_wait(pid, str(bundle.path), self._log.bind(
                    namespace=bundle.namespace, id=bundle.id))

    def _cleanup_work_dirs(self, ns: str) -> None:
        for name in _subdirs(self.root / ns):
            # A bundle next to it is a task starting (or still being recovered).
            if self.get(ns, name) is None and not (self.state / ns / name).exists():
                shutil.rmtree(self.root / ns / name, ignore_errors=True)


@dataclass(eq=False)
class Recovery:
    """A bundle found at start-up, until it is reconnected or retired."""

    bundle: Bundle
    probed: trio.Event = field(default_factory=trio.Event)
    settled: trio.Event = field(default_factory=trio.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)
    binary: ShimBinary | None = None
    # An open connection to a shim that is kept for no task.
    shim: ShimTask | None = None
    shim_pid: int = 0
    # The task's init pid, from the bundle (the runc shims write it there).
    pid: int = 0
    publish: bool = False
    retired: bool = False
    exit: Exit | None = None

    @property
    def id(self) -> str:
        return self.bundle.id


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _is_shim(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"containerd-shim" in f.read()
    except OSError:
        return False


def _shims_in(bundle: str, shim_pid: int) -> list[int]:
    """Shim processes running in ``bundle`` (shims run with their bundle as working
    directory; berth's zygote-forked ones carry the zygote's command line, which names
    the shim too)."""
    candidates = [shim_pid] if shim_pid else []
    try:
        candidates += [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        pass
    me = os.getpid()
    out = []
    for pid in dict.fromkeys(candidates):
        if pid != me and _cwd(pid) == bundle and _is_shim(pid):
            out.append(pid)
    return out


async def _kill_and_wait(pid: int, bundle: str, lg: Any) -> None:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # The pidfd pins the process: check again that it is the bundle's shim.
        if _cwd(pid) != bundle:
            return
        lg.warning("killing the shim of a retired bundle", pid=pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            return
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


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

