"""The long-running shim: a child subreaper serving ``containerd.task.v2.Task``.

What containerd's shim.Run does after ``start`` forked it: log to the bundle's ``log``
FIFO, become a child subreaper (container processes re-parent here and are reaped
by the one Reaper), publish events to TTRPC_ADDRESS, serve ttrpc on the socket the
``start`` action bound, and exit on Shutdown (when no container is left) or on
SIGTERM/SIGINT. On the way out the publisher gets five seconds to flush and the
socket file is removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from functools import partial

import trio

from berth.core import log
from berth.core.oci.reaper import Reaper
from berth.core.shim import address as addr, logging as shim_logging
from berth.core.shim.flags import Flags
from berth.core.shim.publisher import Publisher
from berth.core.shim.service import TASK_SERVICE, TaskService
from berth.core.ttrpc import Server

RUNTIME_NAME = "io.containerd.berth.v1"
PUBLISHER_FLUSH_TIMEOUT = 5.0


def state_base(daemon_address: str) -> str:
    """Where runtimes keep state by default: the folder of the daemon's socket
    (``/run/containerd`` for containerd), as the runc shim's ``/run/containerd/runc``."""
    return os.path.dirname(addr.socket_dir(daemon_address))


def run(flags: Flags, listener: socket.socket, *, ttrpc_address: str | None = None) -> int:
    """Serve until shut down; the exit status for the process."""
    bundle = os.getcwd()
    try:
        fd = shim_logging.open_log(bundle)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(fd, 2)
    os.close(fd)
    shim_logging.setup(2, debug=flags.debug, runtime=RUNTIME_NAME)
    if ttrpc_address is None:
        ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    try:
        trio.run(serve, flags, listener, ttrpc_address)
    except BaseException:
        log.get("shim").exception("shim failed", namespace=flags.namespace, id=flags.id)
        return 1
    return 0


async def serve(flags: Flags, listener: socket.socket, ttrpc_address: str, *,
                task_status: trio.TaskStatus[TaskService] = trio.TASK_STATUS_IGNORED,
                runtime_factory=None, subreaper: bool = True) -> None:
    """Serve until Shutdown or a signal. ``subreaper=False`` is for a shim in a process
    that has other work (the zygote's rehearsal): containers need a subreaper."""
    logger = log.get("shim", namespace=flags.namespace, id=flags.id, pid=os.getpid())
    reaper = Reaper(subreaper=subreaper)
    publisher = Publisher(ttrpc_address, flags.namespace)
    done = trio.Event()
    service: TaskService | None = None
    async with trio.open_nursery() as root:
        await root.start(reaper.run)
        root.start_soon(publisher.run)
        try:
            async with trio.open_nursery() as work:
                extra = {"runtime_factory": runtime_factory} if runtime_factory else {}
                service = TaskService(
                    namespace=flags.namespace, publisher=publisher, reaper=reaper,
                    nursery=work, state_base=state_base(flags.address),
                    shutdown=done.set, **extra,
                )
                server = Server()
                server.register(TASK_SERVICE, service.methods())
                sock = trio.socket.from_stdlib_socket(listener)
                work.start_soon(server.serve_listener, trio.SocketListener(sock))
                work.start_soon(_exit_signals, done, logger)
                logger.info("serving", socket=listener.getsockname())
                task_status.started(service)
                await done.wait()
                # Let the Shutdown answer leave before the connection is torn down.
                await trio.sleep(0.01)
                work.cancel_scope.cancel()
        finally:
            publisher.close()
            with trio.move_on_after(PUBLISHER_FLUSH_TIMEOUT) as flush:
                await publisher.finished.wait()
            if flush.cancelled_caught:
                logger.error("publisher not closed")
            root.cancel_scope.cancel()
    _remove_socket(listener)
    logger.info("shim exited", containers=len(service.containers) if service else 0)


async def _exit_signals(done: trio.Event, logger) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            logger.debug("caught exit signal", signal=signal.Signals(sig).name)
            done.set()
            return


def _remove_socket(listener: socket.socket) -> None:
    with contextlib.suppress(OSError):
        name = listener.getsockname()
        if isinstance(name, str) and name:
            os.unlink(name)
    listener.close()


# -- rehearsal: the zygote serves throwaway shims before it forks real ones ------------------

REHEARSAL_TIMEOUT = 10.0


def rehearse(rounds: int = 10) -> None:
    """Serve ``rounds`` throwaway shims in this process, one client call of each kind a
    serving shim answers first, so that what a real shim runs is already warm here.

    CPython specialises a function's bytecode in place after a few calls, and trio,
    betterproto and structlog build objects on first use: in a zygote's child all of
    that lands on pages it shares with the zygote, which it must then copy. Ten
    rounds take about 0.15 s.
    """
    import tempfile

    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        # Log as a shim does (fd 2, info) but into /dev/null: a forked shim keeps this
        # configuration (``run`` points fd 2 at its own log and calls setup again).
        os.dup2(null, 2)
        shim_logging.setup(2, runtime=RUNTIME_NAME)
        with tempfile.TemporaryDirectory(prefix="berth-rehearsal-") as tmp:
            trio.run(_rehearsal, tmp, rounds)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


async def _rehearsal(tmp: str, rounds: int) -> None:
    from betterproto.lib.google.protobuf import Empty

    from berth.core.api.containerd.services.events.ttrpc.v1 import ForwardRequest
    from berth.core.shim.publisher import EVENTS_SERVICE
    from berth.core.ttrpc import Method

    async def forward(ctx, req: ForwardRequest) -> Empty:
        return Empty()

    events = Server()
    events.register(EVENTS_SERVICE, {"Forward": Method(ForwardRequest, forward)})
    events_path = os.path.join(tmp, "events.sock")
    with trio.move_on_after(REHEARSAL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(events.serve_unix, events_path)
            for i in range(rounds):
                await _rehearse_one(tmp, f"rehearsal-{i}", events_path)
            nursery.cancel_scope.cancel()


async def _rehearse_one(tmp: str, id: str, events_path: str) -> None:
    from betterproto.lib.google.protobuf import Empty

    from berth.core import errdefs
    from berth.core.api.containerd import events as ev
    from berth.core.api.containerd.task import v2 as api
    from berth.core.ttrpc import open_client

    path = os.path.join(tmp, f"{id}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(16)
    flags = Flags(namespace="rehearsal", id=id, address=os.path.join(tmp, "berth.sock"))
    async with trio.open_nursery() as nursery:
        service = await nursery.start(partial(serve, flags, listener, events_path,
                                              subreaper=False))
        async with open_client(path) as client:
            await client.call(TASK_SERVICE, "Connect", api.ConnectRequest(id=id),
                              api.ConnectResponse)
            for method, request, response in (
                    ("State", api.StateRequest(id=id), api.StateResponse),
                    ("Pids", api.PidsRequest(id=id), api.PidsResponse)):
                try:
                    await client.call(TASK_SERVICE, method, request, response)
                except errdefs.NotFound:
                    pass
            service.publisher.publish(ev.TaskExit(container_id=id, id=id, pid=1))
            await client.call(TASK_SERVICE, "Shutdown", api.ShutdownRequest(id=id), Empty)
